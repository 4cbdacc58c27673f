//! The hub's words for what happens to connections (close and eviction reasons, life stages,
//! per-connection command counters) and the plain data a core hands to the scraper: no atomics,
//! no locks, no prometheus types.
//!
//! Each core owns one [`CoreStats`] and bumps its fields with ordinary additions on the hot
//! path; at scrape time [`Hub::snapshot`] copies it into a [`CoreSnapshot`] together with one
//! [`ConnSample`] per live connection (kernel queues read by the driver on that core). The
//! metrics layer only reads these.

use super::{ConnId, Hub};
use crate::proto::{CommandWord, Generation, StreamId};
use crate::time::Now;

/// Number of command words tracked per connection.
pub const WORDS: usize = CommandWord::ALL.len();

/// Why a connection ended (the `reason_type` label of `..._close_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CloseReason {
    /// The peer closed cleanly (EOF), or we closed after our ERROR.
    ConnectionDone = 0,
    /// A socket error.
    ConnectionLost,
    /// Aborted by us (close linger expired, shutdown).
    ConnectionAborted,
    /// Protocol violation by the peer (we sent ERROR).
    ProtocolError,
    /// Evicted as a slow consumer.
    SlowConsumer,
    /// Ping timeout.
    PingTimeout,
}

impl CloseReason {
    /// Every reason, in label order.
    pub const ALL: [Self; 6] = [
        Self::ConnectionDone,
        Self::ConnectionLost,
        Self::ConnectionAborted,
        Self::ProtocolError,
        Self::SlowConsumer,
        Self::PingTimeout,
    ];

    /// The label value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::ConnectionDone => "ConnectionDone",
            Self::ConnectionLost => "ConnectionLost",
            Self::ConnectionAborted => "ConnectionAborted",
            Self::ProtocolError => "ProtocolError",
            Self::SlowConsumer => "SlowConsumer",
            Self::PingTimeout => "PingTimeout",
        }
    }
}

/// Why a slow consumer was evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EvictReason {
    /// Backlog over `max_pending_bytes`.
    Backlog = 0,
    /// No write progress for `write_timeout` while backlogged.
    WriteTimeout,
}

impl EvictReason {
    /// Every reason.
    pub const ALL: [Self; 2] = [Self::Backlog, Self::WriteTimeout];

    /// The label value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Backlog => "backlog",
            Self::WriteTimeout => "write_timeout",
        }
    }
}

/// A connection's life stage, for the `connections by state` gauge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnPhase {
    /// Accepted, waiting for the upstream's server name before greeting.
    #[default]
    Waiting = 0,
    /// Greeted; no stream subscribed yet.
    Connected,
    /// Subscribed to at least one stream.
    Subscribed,
    /// Closing (ERROR sent or close requested), not yet gone.
    Closing,
}

impl ConnPhase {
    /// Every phase.
    pub const ALL: [Self; 4] = [Self::Waiting, Self::Connected, Self::Subscribed, Self::Closing];

    /// The label value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Connected => "connected",
            Self::Subscribed => "subscribed",
            Self::Closing => "closing",
        }
    }
}

/// Per-core counters (monotonic unless noted). Plain integers: only the owning core writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Log lines (RDATA, relayed REMOTE_SERVER_UP) written to workers.
    pub lines_delivered: u64,
    /// Bytes written to workers (log lines and private lines).
    pub bytes_delivered: u64,
    /// Gathered writes issued.
    pub writes: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Closed connections by [`CloseReason`] (index = discriminant).
    pub close_reasons: [u64; CloseReason::ALL.len()],
    /// Slow-consumer evictions by [`EvictReason`].
    pub evictions: [u64; EvictReason::ALL.len()],
    /// `USER_SYNC` received from workers.
    pub user_sync: u64,
    /// `FEDERATION_ACK` received.
    pub federation_ack: u64,
    /// `REMOVE_PUSHER` received.
    pub remove_pusher: u64,
    /// `INVALIDATE_CACHE` received.
    pub invalidate_cache: u64,
    /// `USER_IP` received.
    pub user_ip: u64,
    /// Worker commands not forwarded because the upstream's release may not know them
    /// (`INVALIDATE_CACHE` from 1.14, `REMOVE_PUSHER` from 1.29) and it is not pinned.
    pub withheld_commands: u64,
    /// Upstream batches appended to this core's log.
    pub batches: u64,
    /// Write moderation windows this core opened (filled in by the driver's loop, which
    /// moderates; the hub does not).
    pub coalesce_windows: u64,
    /// Gauge: 1 while this core's write moderation is engaged (as `coalesce_windows`).
    pub coalescing: u64,
    /// Connections this core accepted and handed to a core with fewer (filled in by the
    /// driver's loop, as `coalesce_windows`).
    pub handed_off: u64,
    /// Bytes currently held by this core's log (gauge).
    pub log_bytes: u64,
    /// Gauge: bytes of batches the 1.10–1.12 catch-up history holds (shared with the log and
    /// the other cores).
    pub history_bytes: u64,
    /// Gauge: per stream, the token above which the history holds every row (`None` before
    /// the upstream's position is known, or while it is being moved past an evicted run).
    pub history_floor: [Option<i64>; StreamId::COUNT],
}

/// What the driver reads from a connection's socket at scrape time, on the core that owns it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketSample {
    /// `SIOCOUTQ`: bytes in the kernel send queue not yet acknowledged.
    pub send_queue: u64,
    /// `SIOCINQ`: bytes received by the kernel not yet read.
    pub read_queue: u64,
    /// The peer's address as text (`getpeername`), empty if unknown. Text, so the sans-IO hub
    /// holds no socket types.
    pub peer: String,
}

/// One live connection at scrape time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnSample {
    /// The connection's id on its core (`index.generation`, as in the logs).
    pub id: String,
    /// The worker's NAME, or `anon` before NAME.
    pub name: String,
    /// The peer's address, as the driver reported it (empty if unknown).
    pub peer: String,
    /// How the worker is connected: `tcp` for the replication protocol.
    pub transport: &'static str,
    /// The protocol generation the connection is served in (the upstream's, once known).
    pub generation: Option<&'static str>,
    /// Wall-clock Unix milliseconds when it was accepted.
    pub connected_wall_ms: i64,
    /// Milliseconds since it was accepted.
    pub uptime_ms: u64,
    /// Log lines (RDATA, relayed REMOTE_SERVER_UP) written to it.
    pub lines_delivered: u64,
    /// Bytes its socket took (log lines and private lines).
    pub bytes_delivered: u64,
    /// Milliseconds it has had a backlog without catching up to the head; `None` when it has
    /// no backlog.
    pub backlogged_ms: Option<u64>,
    /// Milliseconds since it last sent `PING`; `None` if it never did.
    pub last_ping_ago_ms: Option<u64>,
    /// Why it is closing, once decided.
    pub closing: Option<CloseReason>,
    /// Life stage.
    pub phase: ConnPhase,
    /// Subscribed streams (bit i = `StreamId::ALL[i]`).
    pub subscribed: u32,
    /// Lines waiting for this connection (log lines behind its cursor plus private lines).
    pub pending_commands: u64,
    /// Bytes of log the connection holds back (its backlog).
    pub backlog_bytes: u64,
    /// `SIOCOUTQ`: bytes in the kernel send queue not yet acknowledged.
    pub kernel_send_queue: u64,
    /// `SIOCINQ`: bytes received by the kernel not yet read.
    pub kernel_read_queue: u64,
    /// Inbound commands past the direction check, by [`CommandWord`] discriminant.
    pub inbound: [u64; WORDS],
    /// Outbound private commands written, by [`CommandWord`] discriminant (RDATA counted per line).
    pub outbound: [u64; WORDS],
}

impl ConnSample {
    /// Whether the connection subscribes to `s`.
    pub const fn subscribes(&self, s: StreamId) -> bool {
        self.subscribed & s.bit() != 0
    }
}

/// What one core reports at scrape time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreSnapshot {
    /// Core index.
    pub core: usize,
    /// Its counters.
    pub stats: CoreStats,
    /// Its live connections.
    pub conns: Vec<ConnSample>,
    /// Redis mode: what this core's RESP clients published.
    pub resp: RespStats,
}

/// Redis mode: what a core's RESP clients published (each message is counted once, on the
/// publisher's core).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RespStats {
    /// Messages published (to at least one subscriber).
    pub published: u64,
    /// Replication `RDATA` messages by (stream, writer instance), read from the payload's
    /// first words.
    pub rdata: Vec<(String, String, u64)>,
    /// Batches of messages dropped for this core in the source, its queue there at its bound
    /// (their subscribers on this core were cut off).
    pub batches_dropped: u64,
}

impl Hub {
    /// A metrics snapshot at `now`. `socket` reads a connection's socket (kernel queues, peer
    /// address); the driver calls it on this core.
    pub fn snapshot(
        &self,
        core: usize,
        now: Now,
        mut socket: impl FnMut(ConnId) -> SocketSample,
    ) -> CoreSnapshot {
        let mut stats = self.stats.clone();
        stats.log_bytes = self.log.held_bytes();
        let generation = self.generation.map(Generation::label);
        stats.history_bytes = self.history.bytes();
        stats.history_floor = StreamId::ALL.map(|s| self.history.floor(s));
        let conns = self
            .conns
            .iter()
            .map(|(id, c)| {
                let SocketSample { send_queue: outq, read_queue: inq, peer } = socket(id);
                let backlog_bytes = c.outbox.backlog_bytes(&self.log);
                let since = |ms: u64| now.mono_ms.saturating_sub(ms);
                ConnSample {
                    id: id.to_string(),
                    name: c.display_name().to_owned(),
                    peer,
                    transport: if c.resp.is_some() { "resp" } else { "tcp" },
                    generation,
                    connected_wall_ms: c.connected_at.wall_ms,
                    uptime_ms: since(c.connected_at.mono_ms),
                    lines_delivered: c.outbox.outbound()[CommandWord::Rdata as usize],
                    bytes_delivered: c.written,
                    backlogged_ms: c.outbox.busy_since_ms().filter(|_| backlog_bytes > 0).map(since),
                    last_ping_ago_ms: c.last_ping_ms.map(since),
                    closing: c.close.reason(),
                    phase: c.phase,
                    subscribed: c.subs.mask.0,
                    pending_commands: c.outbox.pending_lines(&self.log),
                    backlog_bytes,
                    kernel_send_queue: outq,
                    kernel_read_queue: inq,
                    inbound: c.inbound,
                    outbound: *c.outbox.outbound(),
                }
            })
            .collect();
        CoreSnapshot { core, stats, conns, resp: self.resp_stats() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::sim::{Capacity, Sim};
    use crate::hub::HubConfig;
    use crate::proto::Token;

    fn sample(sim: &Sim, id: ConnId) -> ConnSample {
        let snap = sim.hub.snapshot(0, sim.now, |_| SocketSample {
            send_queue: 7,
            read_queue: 3,
            peer: "127.0.0.1:5000".to_owned(),
        });
        snap.conns.into_iter().find(|c| c.id == id.to_string()).expect("the connection is live")
    }

    /// What `/connections` shows per connection comes from the hub's own state at `now`.
    #[test]
    fn a_sample_says_since_when_and_how_far_behind() {
        let mut sim = Sim::new(HubConfig::default());
        sim.connect_upstream("example.com", Sim::positions());
        let accepted = sim.now;
        let reader = sim.accept();
        let stalled = sim.accept();
        sim.send(reader, "NAME reader\nREPLICATE events");
        sim.send(stalled, "NAME stalled\nREPLICATE events");
        sim.set_capacity(stalled, Capacity::Stalled);
        sim.advance(2_000);
        sim.send(reader, "PING 1");
        sim.batch(&[(StreamId::Events, Token::Value(200)), (StreamId::Events, Token::Value(201))]);
        sim.advance(1_500);

        let r = sample(&sim, reader);
        assert_eq!((r.name.as_str(), r.peer.as_str(), r.transport), ("reader", "127.0.0.1:5000", "tcp"));
        assert_eq!((r.kernel_send_queue, r.kernel_read_queue), (7, 3));
        assert_eq!(r.generation, Some("seed"));
        assert_eq!(r.connected_wall_ms, accepted.wall_ms);
        assert_eq!(r.uptime_ms, 3_500);
        assert_eq!(r.lines_delivered, 2);
        assert!(r.bytes_delivered > 0);
        assert_eq!((r.backlog_bytes, r.backlogged_ms), (0, None));
        assert_eq!(r.last_ping_ago_ms, Some(1_500));
        assert_eq!(r.closing, None);

        let s = sample(&sim, stalled);
        assert_eq!(s.lines_delivered, 0);
        assert!(s.backlog_bytes > 0);
        // Behind since the batch arrived (its outbox left idle then), not since it connected.
        assert_eq!(s.backlogged_ms, Some(1_500));
        assert_eq!(s.last_ping_ago_ms, None);
    }
}
