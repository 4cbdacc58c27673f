//! Scrape-time rendering of the per-core snapshots as Prometheus text exposition (0.0.4).
//!
//! The cores never touch a Prometheus type: they keep plain counters
//! ([`CoreStats`](crate::hub::stats::CoreStats)) and, when a scrape asks, copy them into a
//! [`CoreSnapshot`] with one [`ConnSample`] per live connection. [`render`] folds those
//! together here, on the scrape thread, into fresh metric objects in a throw-away [`Registry`],
//! and encodes them with the crate's [`TextEncoder`]. At one scrape every 15 s, building the
//! registry per scrape costs nothing worth caching, and it leaves no state shared between
//! scrapes.
//!
//! Synapse's names and labels (PROTOCOL.md §7) are kept so that existing dashboards work, and,
//! as Synapse's own exporter does, every Synapse counter is printed under its bare name and
//! again with `_total`. One deliberate difference: the per-connection gauges labelled `name`
//! are summed over all connections sharing a name (Synapse lets the last one win). Series are
//! never per socket. The full list is in `docs/metrics.md`.

use std::collections::BTreeMap;

use prometheus::core::{
    AtomicI64, AtomicU64, Collector, GenericCounter, GenericCounterVec, GenericGauge, GenericGaugeVec,
};
use prometheus::{Opts, Registry, TextEncoder};

use super::snapshot::UpstreamSnapshot;
use crate::hub::stats::{CloseReason, ConnPhase, ConnSample, CoreSnapshot, EvictReason, WORDS};
use crate::proto::{CommandWord, StreamId};

/// Process-wide facts that are not in any core's snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RenderInfo {
    /// The I/O driver in use: `"uring"` or `"epoll"`.
    pub io_backend: &'static str,
    /// Why io_uring was not used, when `--io auto` fell back to epoll.
    pub io_fallback_reason: Option<String>,
    /// The build's version (`CARGO_PKG_VERSION`).
    pub version: &'static str,
    /// Worker threads (cores) configured.
    pub threads: usize,
    /// The configured `--max-pending-bytes`.
    pub max_pending_bytes: u64,
}

/// The `name` label of connections that have not sent `NAME` (Synapse's spelling).
const ANON: &str = "anon";

/// Renders one scrape: every metric of `docs/metrics.md`, from the cores' snapshots, the
/// upstream's snapshot and the process facts.
///
/// Never fails: the metric names and label sets are fixed, so an encoding error would be a bug;
/// it is logged and reported as a comment line rather than taking the endpoint down.
pub fn render(cores: &[CoreSnapshot], upstream: &UpstreamSnapshot, info: &RenderInfo) -> String {
    match build(cores, upstream, info).and_then(|reg| {
        let mut out = String::with_capacity(16 * 1024);
        TextEncoder::new().encode_utf8(&reg.gather(), &mut out)?;
        Ok(out)
    }) {
        Ok(out) => out,
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            format!("# replhub: rendering metrics failed: {}\n", e.to_string().replace('\n', " "))
        }
    }
}

/// Per-worker-name sums of the per-connection gauges.
#[derive(Clone, Debug, Default)]
struct NameSums {
    pending_commands: u64,
    backlog_bytes: u64,
    kernel_send_queue: u64,
    kernel_read_queue: u64,
    inbound: [u64; WORDS],
    outbound: [u64; WORDS],
}

impl NameSums {
    fn add(&mut self, c: &ConnSample) {
        self.pending_commands = self.pending_commands.saturating_add(c.pending_commands);
        self.backlog_bytes = self.backlog_bytes.saturating_add(c.backlog_bytes);
        self.kernel_send_queue = self.kernel_send_queue.saturating_add(c.kernel_send_queue);
        self.kernel_read_queue = self.kernel_read_queue.saturating_add(c.kernel_read_queue);
        for (sum, v) in self.inbound.iter_mut().zip(c.inbound) {
            *sum = sum.saturating_add(v);
        }
        for (sum, v) in self.outbound.iter_mut().zip(c.outbound) {
            *sum = sum.saturating_add(v);
        }
    }
}

/// Everything summed over the cores and their connections.
#[derive(Debug, Default)]
struct Totals<'a> {
    by_name: BTreeMap<&'a str, NameSums>,
    conns: u64,
    per_stream: [u64; StreamId::COUNT],
    per_phase: [u64; ConnPhase::ALL.len()],
    backlog_max: u64,
    backlog_sum: u64,
    lines_delivered: u64,
    bytes_delivered: u64,
    writes: u64,
    accepted: u64,
    close_reasons: [u64; CloseReason::ALL.len()],
    evictions: [u64; EvictReason::ALL.len()],
    user_sync: u64,
    federation_ack: u64,
    remove_pusher: u64,
    invalidate_cache: u64,
    user_ip: u64,
    withheld_commands: u64,
    batches: u64,
    coalesce_windows: u64,
    coalescing: u64,
    handed_off: u64,
    log_bytes: u64,
    history_bytes: u64,
    /// Per stream, the highest floor of any core (how far back every core's history reaches).
    history_floor: [Option<i64>; StreamId::COUNT],
}

fn sum_into<const N: usize>(acc: &mut [u64; N], v: &[u64; N]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a = a.saturating_add(*b);
    }
}

impl<'a> Totals<'a> {
    fn gather(cores: &'a [CoreSnapshot]) -> Self {
        let mut t = Self::default();
        for core in cores {
            let s = &core.stats;
            t.lines_delivered = t.lines_delivered.saturating_add(s.lines_delivered);
            t.bytes_delivered = t.bytes_delivered.saturating_add(s.bytes_delivered);
            t.writes = t.writes.saturating_add(s.writes);
            t.accepted = t.accepted.saturating_add(s.accepted);
            sum_into(&mut t.close_reasons, &s.close_reasons);
            sum_into(&mut t.evictions, &s.evictions);
            t.user_sync = t.user_sync.saturating_add(s.user_sync);
            t.federation_ack = t.federation_ack.saturating_add(s.federation_ack);
            t.remove_pusher = t.remove_pusher.saturating_add(s.remove_pusher);
            t.invalidate_cache = t.invalidate_cache.saturating_add(s.invalidate_cache);
            t.user_ip = t.user_ip.saturating_add(s.user_ip);
            t.withheld_commands = t.withheld_commands.saturating_add(s.withheld_commands);
            t.batches = t.batches.saturating_add(s.batches);
            t.coalesce_windows = t.coalesce_windows.saturating_add(s.coalesce_windows);
            t.coalescing = t.coalescing.saturating_add(s.coalescing);
            t.handed_off = t.handed_off.saturating_add(s.handed_off);
            t.log_bytes = t.log_bytes.saturating_add(s.log_bytes);
            t.history_bytes = t.history_bytes.max(s.history_bytes);
            for (acc, f) in t.history_floor.iter_mut().zip(s.history_floor) {
                *acc = (*acc).max(f);
            }

            for c in &core.conns {
                t.conns += 1;
                let name = if c.name.is_empty() { ANON } else { c.name.as_str() };
                t.by_name.entry(name).or_default().add(c);
                for s in StreamId::ALL {
                    if c.subscribes(s) {
                        t.per_stream[s.index()] += 1;
                    }
                }
                t.per_phase[c.phase as usize] += 1;
                t.backlog_max = t.backlog_max.max(c.backlog_bytes);
                t.backlog_sum = t.backlog_sum.saturating_add(c.backlog_bytes);
            }
        }
        t
    }
}

/// Registers fresh metric objects, already holding their values, in one registry.
struct Exposition {
    reg: Registry,
}

type U64Counter = GenericCounter<AtomicU64>;
type U64CounterVec = GenericCounterVec<AtomicU64>;
type U64Gauge = GenericGauge<AtomicU64>;
type U64GaugeVec = GenericGaugeVec<AtomicU64>;
type I64GaugeVec = GenericGaugeVec<AtomicI64>;

impl Exposition {
    fn register(&self, c: impl Collector + 'static) -> prometheus::Result<()> {
        self.reg.register(Box::new(c))
    }

    fn counter(&self, name: &str, help: &str, v: u64) -> prometheus::Result<()> {
        let c = U64Counter::new(name, help)?;
        c.inc_by(v);
        self.register(c)
    }

    /// A Synapse counter: printed under the bare name and again with `_total`.
    fn synapse_counter(&self, name: &str, help: &str, v: u64) -> prometheus::Result<()> {
        self.counter(name, help, v)?;
        self.counter(&format!("{name}_total"), help, v)
    }

    fn counter_vec<const N: usize>(
        &self,
        name: &str,
        help: &str,
        labels: [&str; N],
        samples: &[([&str; N], u64)],
    ) -> prometheus::Result<()> {
        let c = U64CounterVec::new(Opts::new(name, help), &labels)?;
        for (values, v) in samples {
            c.get_metric_with_label_values(values)?.inc_by(*v);
        }
        self.register(c)
    }

    /// A labelled Synapse counter: printed under the bare name and again with `_total`.
    fn synapse_counter_vec<const N: usize>(
        &self,
        name: &str,
        help: &str,
        labels: [&str; N],
        samples: &[([&str; N], u64)],
    ) -> prometheus::Result<()> {
        self.counter_vec(name, help, labels, samples)?;
        self.counter_vec(&format!("{name}_total"), help, labels, samples)
    }

    fn gauge(&self, name: &str, help: &str, v: u64) -> prometheus::Result<()> {
        let g = U64Gauge::new(name, help)?;
        g.set(v);
        self.register(g)
    }

    fn gauge_vec<const N: usize>(
        &self,
        name: &str,
        help: &str,
        labels: [&str; N],
        samples: &[([&str; N], u64)],
    ) -> prometheus::Result<()> {
        let g = U64GaugeVec::new(Opts::new(name, help), &labels)?;
        for (values, v) in samples {
            g.get_metric_with_label_values(values)?.set(*v);
        }
        self.register(g)
    }

    fn gauge_vec_i64<const N: usize>(
        &self,
        name: &str,
        help: &str,
        labels: [&str; N],
        samples: &[([&str; N], i64)],
    ) -> prometheus::Result<()> {
        let g = I64GaugeVec::new(Opts::new(name, help), &labels)?;
        for (values, v) in samples {
            g.get_metric_with_label_values(values)?.set(*v);
        }
        self.register(g)
    }
}

const P: &str = "synapse_replication_tcp_protocol_";
const R: &str = "synapse_replication_tcp_resource_";

fn build(cores: &[CoreSnapshot], up: &UpstreamSnapshot, info: &RenderInfo) -> prometheus::Result<Registry> {
    let t = Totals::gather(cores);
    let x = Exposition { reg: Registry::new() };

    synapse_metrics(&x, &t, up)?;
    replhub_metrics(&x, &t, cores, up, info)?;
    Ok(x.reg)
}

/// The metrics named as Synapse names them (PROTOCOL.md §7).
fn synapse_metrics(x: &Exposition, t: &Totals<'_>, up: &UpstreamSnapshot) -> prometheus::Result<()> {
    let close: Vec<_> =
        CloseReason::ALL.iter().map(|r| ([r.label()], t.close_reasons[*r as usize])).collect();
    x.synapse_counter_vec(
        &format!("{P}close_reason"),
        "Closed replication connections by close-reason class.",
        ["reason_type"],
        &close,
    )?;

    let per_name = |f: fn(&NameSums) -> u64| -> Vec<([&str; 1], u64)> {
        t.by_name.iter().map(|(n, s)| ([*n], f(s))).collect()
    };
    x.gauge_vec(
        &format!("{P}pending_commands"),
        "Lines queued for the worker's connections (log lines behind their cursors plus \
         private lines), summed per worker name.",
        ["name"],
        &per_name(|s| s.pending_commands),
    )?;
    x.gauge_vec(
        &format!("{P}transport_send_buffer"),
        "Bytes of log held back for the worker's connections (user-space backlog), summed per \
         worker name.",
        ["name"],
        &per_name(|s| s.backlog_bytes),
    )?;
    x.gauge_vec(
        &format!("{P}transport_kernel_send_buffer"),
        "SIOCOUTQ: bytes in the kernel send queues of the worker's sockets not yet acknowledged, \
         summed per worker name.",
        ["name"],
        &per_name(|s| s.kernel_send_queue),
    )?;
    x.gauge_vec(
        &format!("{P}transport_kernel_read_buffer"),
        "SIOCINQ: bytes received by the kernel on the worker's sockets not yet read, summed per \
         worker name.",
        ["name"],
        &per_name(|s| s.kernel_read_queue),
    )?;

    let per_command = |dir: fn(&NameSums) -> &[u64; WORDS]| -> Vec<([&str; 2], u64)> {
        let mut v = Vec::new();
        for (name, s) in &t.by_name {
            for w in CommandWord::ALL {
                let n = dir(s)[w as usize];
                if n != 0 {
                    v.push(([w.as_str(), *name], n));
                }
            }
        }
        v
    };
    x.gauge_vec(
        &format!("{P}inbound_commands"),
        "Commands received on the worker's live connections (past the direction check), by \
         command, summed per worker name.",
        ["command", "name"],
        &per_command(|s| &s.inbound),
    )?;
    x.gauge_vec(
        &format!("{P}outbound_commands"),
        "Commands written to the worker's live connections, by command, summed per worker name.",
        ["command", "name"],
        &per_command(|s| &s.outbound),
    )?;

    let per_stream = |a: &[u64; StreamId::COUNT]| -> Vec<([&str; 1], u64)> {
        StreamId::ALL.iter().map(|s| ([s.name()], a[s.index()])).collect()
    };
    x.synapse_counter_vec(
        &format!("{P}inbound_rdata_count"),
        "RDATA lines received from the upstream master, by stream.",
        ["stream_name"],
        &per_stream(&up.inbound_rdata),
    )?;
    x.synapse_counter_vec(
        &format!("{R}stream_updates"),
        "Rows received from the upstream (or generated) per stream, counted once, not per \
         connection.",
        ["stream_name"],
        &per_stream(&up.stream_updates),
    )?;

    x.synapse_counter(&format!("{R}user_sync"), "USER_SYNC commands received.", t.user_sync)?;
    x.synapse_counter(&format!("{R}federation_ack"), "FEDERATION_ACK commands received.", t.federation_ack)?;
    x.synapse_counter(&format!("{R}remove_pusher"), "REMOVE_PUSHER commands received.", t.remove_pusher)?;
    x.synapse_counter(
        &format!("{R}invalidate_cache"),
        "INVALIDATE_CACHE commands received.",
        t.invalidate_cache,
    )?;
    x.synapse_counter(&format!("{R}user_ip_cache"), "USER_IP commands received.", t.user_ip)?;

    x.gauge(&format!("{R}total_connections"), "Live worker connections.", t.conns)?;
    x.gauge_vec(
        &format!("{R}connections_per_stream"),
        "Live worker connections subscribed to the stream.",
        ["stream_name"],
        &per_stream(&t.per_stream),
    )
}

/// replhub's own metrics.
/// Redis mode: what Redis itself cannot show. RESP connections appear in the per-connection
/// metrics like workers (named by `CLIENT SETNAME`, else the peer address); here the messages
/// published, and the replication RDATA among them by stream and writer instance.
fn resp_metrics(x: &Exposition, cores: &[CoreSnapshot]) -> prometheus::Result<()> {
    x.counter(
        "replhub_resp_published_total",
        "Redis mode: messages PUBLISHed to at least one subscriber.",
        cores.iter().map(|c| c.resp.published).sum(),
    )?;
    x.counter(
        "replhub_resp_batches_dropped_total",
        "Redis mode: batches of messages dropped for a core that took none while its queue in the source was at max_pending_bytes (its subscribers of their channels were cut off).",
        cores.iter().map(|c| c.resp.batches_dropped).sum(),
    )?;
    let mut rdata: std::collections::BTreeMap<(&str, &str), u64> = std::collections::BTreeMap::new();
    for c in cores {
        for (stream, instance, n) in &c.resp.rdata {
            *rdata.entry((stream.as_str(), instance.as_str())).or_default() += n;
        }
    }
    let samples: Vec<_> = rdata.iter().map(|(&(s, i), &n)| ([s, i], n)).collect();
    x.counter_vec(
        "replhub_resp_rdata_published_total",
        "Redis mode: replication RDATA messages published, by stream and writer instance.",
        ["stream", "instance"],
        &samples,
    )
}

fn replhub_metrics(
    x: &Exposition,
    t: &Totals<'_>,
    cores: &[CoreSnapshot],
    up: &UpstreamSnapshot,
    info: &RenderInfo,
) -> prometheus::Result<()> {
    x.counter(
        "replhub_lines_delivered_total",
        "Log lines (RDATA, relayed REMOTE_SERVER_UP) written to workers.",
        t.lines_delivered,
    )?;
    x.counter(
        "replhub_bytes_delivered_total",
        "Bytes written to workers (log lines and private lines).",
        t.bytes_delivered,
    )?;
    x.counter("replhub_writes_total", "Gathered writes issued to worker sockets.", t.writes)?;
    x.counter(
        "replhub_withheld_commands_total",
        "Worker commands not forwarded because the upstream's release may not know them \
         (INVALIDATE_CACHE, REMOVE_PUSHER); pin --synapse-version to answer them as it would.",
        t.withheld_commands,
    )?;
    x.counter("replhub_connections_accepted_total", "Worker connections accepted.", t.accepted)?;
    x.gauge(
        "replhub_backlog_bytes_max",
        "Largest backlog (bytes of log held back) of any live connection.",
        t.backlog_max,
    )?;
    x.gauge("replhub_backlog_bytes_sum", "Backlog bytes summed over all live connections.", t.backlog_sum)?;
    x.gauge(
        "replhub_max_pending_bytes",
        "The configured backlog limit per connection (--max-pending-bytes).",
        info.max_pending_bytes,
    )?;
    x.gauge(
        "replhub_log_bytes",
        "Bytes currently held by the cores' fan-out logs, summed over cores.",
        t.log_bytes,
    )?;
    x.gauge(
        "replhub_history_bytes",
        "Bytes of recent batches held to catch Synapse 1.10-1.12 workers up from a token, largest \
         over cores (the cores hold the same batches).",
        t.history_bytes,
    )?;
    let floors: Vec<_> =
        StreamId::ALL.iter().filter_map(|s| Some(([s.name()], t.history_floor[s.index()]?))).collect();
    x.gauge_vec_i64(
        "replhub_history_floor_token",
        "Per stream, the token after which the catch-up history holds every row: a 1.10-1.12 \
         worker asking from an older token gets `has fallen behind`.",
        ["stream"],
        &floors,
    )?;
    x.counter(
        "replhub_log_batches_appended_total",
        "Upstream batches appended to a core's log, summed over cores (each batch is appended \
         once per core).",
        t.batches,
    )?;
    x.counter(
        "replhub_coalesce_windows_total",
        "Write moderation windows the cores opened: fan-out turns after which a core left its \
         mailbox alone for --coalesce-window, so that the lines arriving meanwhile share writes.",
        t.coalesce_windows,
    )?;
    x.gauge(
        "replhub_cores_coalescing",
        "Cores whose write moderation is engaged (their fan-out would make --coalesce-above \
         writes per second or more).",
        t.coalescing,
    )?;
    x.counter(
        "replhub_connections_handed_off_total",
        "Connections a core accepted and handed, before reading them, to a core with fewer \
         connections (the kernel's SO_REUSEPORT hash spreads a few connections unevenly).",
        t.handed_off,
    )?;
    let evict: Vec<_> = EvictReason::ALL.iter().map(|r| ([r.label()], t.evictions[*r as usize])).collect();
    x.counter_vec(
        "replhub_slow_consumer_disconnects_total",
        "Workers disconnected with `ERROR Failed to keep up`, by reason.",
        ["reason"],
        &evict,
    )?;
    resp_metrics(x, cores)?;
    let phases: Vec<_> = ConnPhase::ALL.iter().map(|p| ([p.label()], t.per_phase[*p as usize])).collect();
    x.gauge_vec("replhub_connections", "Live worker connections by life stage.", ["state"], &phases)?;

    x.gauge(
        "replhub_upstream_connected",
        "1 while the upstream link is up (always 1 in synthetic mode).",
        u64::from(up.connected),
    )?;
    if !up.mode.is_empty() {
        x.gauge_vec(
            "replhub_upstream_mode",
            "Always 1; the label says where the log comes from (upstream or synthetic).",
            ["mode"],
            &[([up.mode], 1)],
        )?;
    }
    if let Some(generation) = up.generation {
        x.gauge_vec(
            "replhub_upstream_generation",
            "Always 1; the label names the upstream's protocol generation in use (seed, 1.13, 1.22).",
            ["generation"],
            &[([generation], 1)],
        )?;
    }
    x.counter("replhub_upstream_reconnects_total", "Reconnects to the upstream master.", up.reconnects)?;
    x.counter(
        "replhub_upstream_connect_failures_total",
        "Attempts to connect to the upstream that failed (connect, TLS handshake, AUTH).",
        up.connect_failures,
    )?;
    let tokens: Vec<_> =
        StreamId::ALL.iter().filter_map(|s| up.tokens[s.index()].map(|tok| ([s.name()], tok))).collect();
    x.gauge_vec_i64(
        "replhub_upstream_token",
        "Current upstream token per stream (streams whose token is not yet known are absent).",
        ["stream_name"],
        &tokens,
    )?;
    x.gauge(
        "replhub_upstream_syncing_users",
        "Users currently reported syncing to the upstream (merged USER_SYNC).",
        up.syncing_users,
    )?;
    x.counter(
        "replhub_upstream_forwarded_total",
        "Commands forwarded to the upstream master.",
        up.forwarded,
    )?;
    x.counter(
        "replhub_upstream_rdata_dropped_total",
        "RDATA lines from the upstream that were not relayed: an unknown stream, or malformed.",
        up.rdata_dropped,
    )?;
    x.counter(
        "replhub_upstream_forwards_dropped_total",
        "Worker commands dropped because the queue for a disconnected upstream was full.",
        up.forwards_dropped,
    )?;

    x.gauge_vec(
        "replhub_io_backend",
        "Always 1; the label names the I/O driver in use.",
        ["backend"],
        &[([info.io_backend], 1)],
    )?;
    if let Some(reason) = &info.io_fallback_reason {
        x.gauge_vec(
            "replhub_io_fallback",
            "Present (1) only when --io auto fell back to epoll; the label says why.",
            ["reason"],
            &[([reason.as_str()], 1)],
        )?;
    }
    x.gauge_vec(
        "replhub_build_info",
        "Always 1; the label carries the build's version.",
        ["version"],
        &[([info.version], 1)],
    )?;
    x.gauge("replhub_threads", "Worker threads (cores) configured.", info.threads as u64)?;
    x.gauge(
        "replhub_scrape_cores_reported",
        "Cores whose snapshot this scrape includes (below replhub_threads if a core did not \
         answer in time).",
        cores.len() as u64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::stats::{CoreStats, RespStats};

    fn word(w: CommandWord) -> usize {
        w as usize
    }

    fn conn(name: &str, phase: ConnPhase, streams: &[StreamId]) -> ConnSample {
        ConnSample {
            name: name.to_owned(),
            phase,
            subscribed: streams.iter().fold(0, |m, s| m | s.bit()),
            ..ConnSample::default()
        }
    }

    /// Two cores, three connections; `synchrotron1` has one on each core.
    fn fixture() -> (Vec<CoreSnapshot>, UpstreamSnapshot, RenderInfo) {
        let mut a = conn("synchrotron1", ConnPhase::Subscribed, &[StreamId::Events, StreamId::Typing]);
        a.pending_commands = 3;
        a.backlog_bytes = 100;
        a.kernel_send_queue = 10;
        a.kernel_read_queue = 1;
        a.inbound[word(CommandWord::Name)] = 1;
        a.inbound[word(CommandWord::Replicate)] = 2;
        a.inbound[word(CommandWord::Ping)] = 5;
        a.outbound[word(CommandWord::Rdata)] = 40;

        let mut b = conn("synchrotron1", ConnPhase::Subscribed, &[StreamId::Events]);
        b.pending_commands = 4;
        b.backlog_bytes = 250;
        b.kernel_send_queue = 20;
        b.kernel_read_queue = 2;
        b.inbound[word(CommandWord::Name)] = 1;
        b.inbound[word(CommandWord::Ping)] = 7;
        b.outbound[word(CommandWord::Rdata)] = 2;

        let mut c = conn(ANON, ConnPhase::Waiting, &[]);
        c.kernel_read_queue = 9;

        let core0 = CoreSnapshot {
            core: 0,
            stats: CoreStats {
                lines_delivered: 1000,
                bytes_delivered: 64_000,
                writes: 50,
                accepted: 4,
                close_reasons: [1, 0, 0, 2, 0, 0],
                evictions: [1, 0],
                user_sync: 3,
                federation_ack: 1,
                remove_pusher: 0,
                invalidate_cache: 2,
                user_ip: 6,
                withheld_commands: 2,
                batches: 10,
                coalesce_windows: 30,
                coalescing: 1,
                handed_off: 3,
                log_bytes: 4096,
                history_bytes: 2048,
                history_floor: StreamId::ALL.map(|s| (s == StreamId::Events).then_some(90)),
            },
            conns: vec![a, c],
            resp: RespStats {
                published: 7,
                rdata: vec![("events".into(), "master".into(), 4), ("typing".into(), "w1".into(), 1)],
                batches_dropped: 1,
            },
        };
        let core1 = CoreSnapshot {
            core: 1,
            stats: CoreStats {
                lines_delivered: 500,
                bytes_delivered: 32_000,
                writes: 25,
                accepted: 2,
                close_reasons: [0, 1, 0, 0, 0, 3],
                evictions: [0, 2],
                user_sync: 4,
                federation_ack: 0,
                remove_pusher: 1,
                invalidate_cache: 0,
                user_ip: 1,
                withheld_commands: 0,
                batches: 10,
                coalesce_windows: 12,
                coalescing: 0,
                handed_off: 2,
                log_bytes: 1024,
                ..CoreStats::default()
            },
            conns: vec![b],
            resp: RespStats {
                published: 2,
                rdata: vec![("events".into(), "master".into(), 2)],
                batches_dropped: 2,
            },
        };
        let mut up = UpstreamSnapshot {
            mode: "upstream",
            connected: true,
            reconnects: 2,
            connect_failures: 6,
            generation: Some("1.22"),
            syncing_users: 5,
            forwarded: 17,
            rdata_dropped: 3,
            forwards_dropped: 4,
            ..UpstreamSnapshot::default()
        };
        up.tokens[StreamId::Events.index()] = Some(5321);
        up.tokens[StreamId::Typing.index()] = Some(42);
        up.stream_updates[StreamId::Events.index()] = 300;
        up.inbound_rdata[StreamId::Events.index()] = 310;
        let info = RenderInfo {
            io_backend: "epoll",
            io_fallback_reason: Some("io_uring_setup: Operation not permitted".to_owned()),
            version: "0.1.0",
            threads: 2,
            max_pending_bytes: 64 << 20,
        };
        (vec![core0, core1], up, info)
    }

    fn rendered() -> String {
        let (cores, up, info) = fixture();
        render(&cores, &up, &info)
    }

    fn has(out: &str, line: &str) {
        assert!(out.lines().any(|l| l == line), "missing line {line:?} in:\n{out}");
    }

    fn lacks_prefix(out: &str, prefix: &str) {
        assert!(!out.lines().any(|l| l.starts_with(prefix)), "unexpected {prefix:?} in:\n{out}");
    }

    #[test]
    fn redis_mode_rdata_is_counted_by_stream_and_instance_over_cores() {
        let out = rendered();
        has(&out, "replhub_resp_published_total 9");
        has(&out, "replhub_resp_batches_dropped_total 3");
        has(&out, "replhub_resp_rdata_published_total{instance=\"master\",stream=\"events\"} 6");
        has(&out, "replhub_resp_rdata_published_total{instance=\"w1\",stream=\"typing\"} 1");
    }

    #[test]
    fn per_name_gauges_are_summed_across_cores() {
        let out = rendered();
        has(&out, r#"synapse_replication_tcp_protocol_pending_commands{name="synchrotron1"} 7"#);
        has(&out, r#"synapse_replication_tcp_protocol_pending_commands{name="anon"} 0"#);
        has(&out, r#"synapse_replication_tcp_protocol_transport_send_buffer{name="synchrotron1"} 350"#);
        has(&out, r#"synapse_replication_tcp_protocol_transport_kernel_send_buffer{name="synchrotron1"} 30"#);
        has(&out, r#"synapse_replication_tcp_protocol_transport_kernel_read_buffer{name="synchrotron1"} 3"#);
        has(&out, r#"synapse_replication_tcp_protocol_transport_kernel_read_buffer{name="anon"} 9"#);
        // One series per name, never one per socket.
        let series = out
            .lines()
            .filter(|l| l.starts_with("synapse_replication_tcp_protocol_pending_commands{"))
            .count();
        assert_eq!(series, 2);
    }

    #[test]
    fn per_command_gauges_omit_unseen_commands() {
        let out = rendered();
        has(
            &out,
            r#"synapse_replication_tcp_protocol_inbound_commands{command="PING",name="synchrotron1"} 12"#,
        );
        has(
            &out,
            r#"synapse_replication_tcp_protocol_inbound_commands{command="NAME",name="synchrotron1"} 2"#,
        );
        has(
            &out,
            r#"synapse_replication_tcp_protocol_inbound_commands{command="REPLICATE",name="synchrotron1"} 2"#,
        );
        has(
            &out,
            r#"synapse_replication_tcp_protocol_outbound_commands{command="RDATA",name="synchrotron1"} 42"#,
        );
        lacks_prefix(&out, r#"synapse_replication_tcp_protocol_inbound_commands{command="USER_SYNC""#);
        lacks_prefix(&out, r#"synapse_replication_tcp_protocol_outbound_commands{command="PING""#);
        let inbound = out
            .lines()
            .filter(|l| l.starts_with("synapse_replication_tcp_protocol_inbound_commands{"))
            .count();
        assert_eq!(inbound, 3);
    }

    #[test]
    fn connections_per_stream_has_every_stream() {
        let out = rendered();
        has(&out, "synapse_replication_tcp_resource_total_connections 3");
        has(&out, r#"synapse_replication_tcp_resource_connections_per_stream{stream_name="events"} 2"#);
        has(&out, r#"synapse_replication_tcp_resource_connections_per_stream{stream_name="typing"} 1"#);
        has(
            &out,
            r#"synapse_replication_tcp_resource_connections_per_stream{stream_name="user_signature"} 0"#,
        );
        let n = out
            .lines()
            .filter(|l| l.starts_with("synapse_replication_tcp_resource_connections_per_stream{"))
            .count();
        assert_eq!(n, StreamId::COUNT);
    }

    #[test]
    fn synapse_counters_appear_bare_and_with_total() {
        let out = rendered();
        for name in
            ["synapse_replication_tcp_resource_user_sync", "synapse_replication_tcp_resource_user_sync_total"]
        {
            has(&out, &format!("# TYPE {name} counter"));
            has(&out, &format!("{name} 7"));
        }
        has(&out, "synapse_replication_tcp_resource_federation_ack 1");
        has(&out, "synapse_replication_tcp_resource_federation_ack_total 1");
        has(&out, "synapse_replication_tcp_resource_remove_pusher_total 1");
        has(&out, "synapse_replication_tcp_resource_invalidate_cache 2");
        has(&out, "synapse_replication_tcp_resource_user_ip_cache_total 7");
        has(&out, r#"synapse_replication_tcp_protocol_close_reason{reason_type="ConnectionDone"} 1"#);
        has(&out, r#"synapse_replication_tcp_protocol_close_reason_total{reason_type="PingTimeout"} 3"#);
        has(&out, r#"synapse_replication_tcp_protocol_close_reason{reason_type="SlowConsumer"} 0"#);
        has(&out, r#"synapse_replication_tcp_resource_stream_updates{stream_name="events"} 300"#);
        has(&out, r#"synapse_replication_tcp_resource_stream_updates_total{stream_name="caches"} 0"#);
        has(&out, r#"synapse_replication_tcp_protocol_inbound_rdata_count_total{stream_name="events"} 310"#);
    }

    #[test]
    fn replhub_metrics() {
        let out = rendered();
        for line in [
            "replhub_lines_delivered_total 1500",
            "replhub_bytes_delivered_total 96000",
            "replhub_writes_total 75",
            "replhub_connections_accepted_total 6",
            "replhub_backlog_bytes_max 250",
            "replhub_backlog_bytes_sum 350",
            "replhub_max_pending_bytes 67108864",
            "replhub_log_bytes 5120",
            "replhub_history_bytes 2048",
            r#"replhub_history_floor_token{stream="events"} 90"#,
            "replhub_log_batches_appended_total 20",
            "replhub_coalesce_windows_total 42",
            "replhub_cores_coalescing 1",
            "replhub_connections_handed_off_total 5",
            r#"replhub_slow_consumer_disconnects_total{reason="backlog"} 1"#,
            r#"replhub_slow_consumer_disconnects_total{reason="write_timeout"} 2"#,
            r#"replhub_connections{state="waiting"} 1"#,
            r#"replhub_connections{state="connected"} 0"#,
            r#"replhub_connections{state="subscribed"} 2"#,
            r#"replhub_connections{state="closing"} 0"#,
            "replhub_upstream_connected 1",
            r#"replhub_upstream_mode{mode="upstream"} 1"#,
            r#"replhub_upstream_generation{generation="1.22"} 1"#,
            "replhub_upstream_reconnects_total 2",
            "replhub_upstream_connect_failures_total 6",
            r#"replhub_upstream_token{stream_name="events"} 5321"#,
            r#"replhub_upstream_token{stream_name="typing"} 42"#,
            "replhub_upstream_syncing_users 5",
            "replhub_upstream_forwarded_total 17",
            "replhub_upstream_rdata_dropped_total 3",
            "replhub_upstream_forwards_dropped_total 4",
            r#"replhub_io_backend{backend="epoll"} 1"#,
            r#"replhub_io_fallback{reason="io_uring_setup: Operation not permitted"} 1"#,
            r#"replhub_build_info{version="0.1.0"} 1"#,
            "replhub_threads 2",
            "replhub_scrape_cores_reported 2",
        ] {
            has(&out, line);
        }
        // Only known tokens.
        let tokens = out.lines().filter(|l| l.starts_with("replhub_upstream_token{")).count();
        assert_eq!(tokens, 2);
        // Replhub's counters are not doubled.
        lacks_prefix(&out, "replhub_writes_total_total");
    }

    #[test]
    fn every_family_has_help_and_a_type() {
        let out = rendered();
        let types: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(types.len() > 40, "{types:?}");
        for name in types {
            assert!(out.lines().any(|l| l.starts_with(&format!("# HELP {name} "))), "no HELP for {name}");
        }
    }

    #[test]
    fn empty_process_still_renders() {
        let info = RenderInfo { io_backend: "uring", version: "0.1.0", threads: 1, ..RenderInfo::default() };
        let out = render(&[], &UpstreamSnapshot::default(), &info);
        has(&out, "synapse_replication_tcp_resource_total_connections 0");
        has(&out, r#"replhub_io_backend{backend="uring"} 1"#);
        has(&out, "replhub_upstream_connected 0");
        lacks_prefix(&out, "replhub_io_fallback");
        lacks_prefix(&out, "replhub_upstream_token");
        lacks_prefix(&out, "replhub_upstream_mode");
        // No names: the per-name families have no samples and are omitted, as Synapse does.
        lacks_prefix(&out, "synapse_replication_tcp_protocol_pending_commands");
        has(&out, r#"synapse_replication_tcp_resource_connections_per_stream{stream_name="events"} 0"#);
    }

    #[test]
    fn hostile_names_are_escaped() {
        let (mut cores, up, info) = fixture();
        cores[0].conns[0].name = "evil\"}\nfake_metric 1\\".to_owned();
        let out = render(&cores, &up, &info);
        has(&out, r#"synapse_replication_tcp_protocol_pending_commands{name="evil\"}\nfake_metric 1\\"} 3"#);
        lacks_prefix(&out, "fake_metric");
    }

    /// docs/metrics.md lists exactly the families rendered (with every optional one present).
    #[test]
    fn docs_table_matches_output() {
        let doc = include_str!("../../docs/metrics.md");
        let documented: std::collections::BTreeSet<&str> =
            doc.lines().filter_map(|l| l.strip_prefix("| `")).filter_map(|l| l.split('`').next()).collect();
        let out = rendered();
        let rendered: std::collections::BTreeSet<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .filter(|n| !n.starts_with("synapse_") || !n.ends_with("_total"))
            .collect();
        assert_eq!(documented, rendered);
    }
}
