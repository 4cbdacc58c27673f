//! Fan-out through the hub core (no sockets): one upstream batch of RDATA delivered to N
//! in-memory subscribers, next to the reference master's way in the same run (encode every
//! line once per connection: `json.dumps(row)` then `"RDATA s t " + json`).
//!
//! Both sides stop at the bytes handed to the kernel (the hub: the gathered iovecs; the
//! baseline: a per-connection buffer), so the kernel's copy, equal for both, is left out.
//! `Throughput::Elements` counts delivered lines (lines × subscribers).

// The bench measures memory with a counting global allocator and CPU time with
// `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`; both need `unsafe`, which the crate otherwise denies.
#![allow(unsafe_code)]
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::IoSlice;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Bencher, BenchmarkId, Criterion, Throughput};

use replhub::config::HubConfig;
use replhub::proto::{fields, json, Command, Rdata, StreamId, Token};
use replhub::testing::hub::{Batch, ConnId, Hub, HubOutput, LineMeta, UpstreamEvent};
use replhub::time::Now;

/// Counts live heap bytes, to state the per-connection memory constant.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the system allocator with the caller's layout unchanged;
// the counter is only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// RDATA lines from Synapse's own output (the vectors), or a generated stand-in.
fn sample_lines(n: usize) -> Vec<Bytes> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors/stream-sample.txt");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<Bytes> =
        text.lines().filter(|l| l.starts_with("RDATA ")).map(|l| Bytes::from(format!("{l}\n"))).collect();
    if lines.is_empty() {
        lines = events_lines(n);
    }
    lines.into_iter().cycle().take(n).collect()
}

/// `n` RDATA lines of the events stream alone (the load test's shape).
fn events_lines(n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| {
            Bytes::from(format!(
                "RDATA events {} [\"ev\", [\"$e{i}:hs\", \"!r:hs\", \"m.room.message\", null, null, null]]\n",
                1000 + i
            ))
        })
        .collect()
}

/// One batch over the lines, indexed as the upstream link does.
fn make_batch(lines: &[Bytes]) -> Arc<Batch> {
    let mut data = BytesMut::new();
    let mut metas = Vec::new();
    for l in lines {
        let start = data.len() as u32;
        data.extend_from_slice(l);
        let rd = fields::parse_rdata(&l[6..l.len() - 1]).expect("sample RDATA parses");
        let stream = StreamId::from_name(rd.stream.as_bytes()).expect("known stream");
        let token = match rd.token {
            Token::Batch => None,
            Token::Value(t) => Some(t),
        };
        metas.push(LineMeta { start, end: data.len() as u32, stream: stream as u8, token });
    }
    Arc::new(Batch::new(data.freeze(), metas))
}

struct Setup {
    hub: Hub,
    now: Now,
    dirty: Vec<replhub::testing::hub::ConnId>,
}

/// A hub with at most `max_pending_bytes` unread per connection, whose upstream has connected
/// with every stream at token 0.
fn connected_hub(max_pending_bytes: u64) -> (Hub, Now) {
    let mut hub = Hub::new(HubConfig { max_pending_bytes, ..HubConfig::default() });
    let now = Now::new(1, 1);
    hub.on_upstream(
        &UpstreamEvent::Connected {
            server_name: "hs".into(),
            positions: [Some(0); replhub::proto::StreamId::COUNT],
            generation: replhub::proto::Generation::Seed,
            instance: "master".into(),
        },
        now,
    );
    (hub, now)
}

fn hub_with(subscribers: usize) -> Setup {
    hub_replicating(subscribers, b"NAME bench\nREPLICATE ALL\n")
}

/// A hub whose `subscribers` each sent `opening` (NAME and REPLICATE lines).
fn hub_replicating(subscribers: usize, opening: &[u8]) -> Setup {
    let (mut hub, now) = connected_hub(u64::MAX);
    for _ in 0..subscribers {
        let id = hub.accept(now);
        hub.on_bytes(id, opening, now);
    }
    let mut s = Setup { hub, now, dirty: Vec::new() };
    deliver(&mut s);
    s
}

/// The driver's write loop with an in-memory "socket" that takes everything.
fn deliver(s: &mut Setup) -> usize {
    let mut bytes = 0;
    loop {
        s.dirty.clear();
        s.hub.take_dirty(&mut s.dirty);
        if s.dirty.is_empty() {
            break;
        }
        let ids = std::mem::take(&mut s.dirty);
        for &id in &ids {
            let mut iov: Vec<IoSlice<'_>> = Vec::new();
            let n = s.hub.gather(id, &mut iov);
            drop(iov);
            bytes += n;
            s.hub.on_written(id, n, s.now);
        }
        s.dirty = ids;
    }
    while let Some(out) = s.hub.poll_output() {
        if let HubOutput::Close { conn, .. } = out {
            s.hub.on_peer_closed(conn, false, s.now);
        }
    }
    bytes
}

/// Times one batch over `lines` through the hub to every subscriber of `setup` (indexing it
/// is set-up, not timed).
fn batch_after_batch(b: &mut Bencher<'_>, setup: &mut Setup, lines: &[Bytes]) {
    b.iter_batched(
        || make_batch(lines),
        |batch| {
            setup.hub.on_batch(batch, setup.now);
            deliver(setup)
        },
        BatchSize::SmallInput,
    );
}

/// The reference master: rows decoded once, then for every connection every row is encoded to
/// JSON and formatted into its own line.
fn per_connection_encode(
    rows: &[(StreamId, Token, json::Value)],
    subscribers: usize,
    out: &mut BytesMut,
) -> usize {
    let mut bytes = 0;
    let mut row_json = Vec::with_capacity(512);
    for _ in 0..subscribers {
        out.clear();
        for (stream, token, row) in rows {
            row_json.clear();
            json::encode(row, &mut row_json);
            Command::Rdata(Rdata { stream: stream.name(), token: *token, row: &row_json })
                .encode_into(out)
                .expect("encodes");
        }
        bytes += out.len();
    }
    bytes
}

fn fanout(c: &mut Criterion) {
    let lines = sample_lines(100);
    let rows: Vec<(StreamId, Token, json::Value)> = lines
        .iter()
        .map(|l| {
            let rd = fields::parse_rdata(&l[6..l.len() - 1]).expect("parses");
            (
                StreamId::from_name(rd.stream.as_bytes()).expect("known"),
                rd.token,
                json::parse(rd.row).expect("json"),
            )
        })
        .collect();
    let mut group = c.benchmark_group("fanout_100_lines");
    for &n in &[1usize, 100, 10_000] {
        group.throughput(Throughput::Elements((lines.len() * n) as u64));
        if n == 10_000 {
            group.sample_size(10);
        }
        let mut setup = hub_with(n);
        group.bench_with_input(BenchmarkId::new("hub_encode_once", n), &n, |b, _| {
            batch_after_batch(b, &mut setup, &lines);
        });
        let mut out = BytesMut::with_capacity(64 * 1024);
        group.bench_with_input(BenchmarkId::new("baseline_encode_per_connection", n), &n, |b, &n| {
            b.iter(|| per_connection_encode(&rows, n, &mut out));
        });
    }
    group.finish();

    // O(1) per batch for a subscriber to every stream: the cost of a batch barely depends on
    // how many lines it holds. The same for a subscriber to one stream, per run of that stream
    // (`events_only`: batches of the events stream alone, as in the load test); next to it,
    // the same subscriber on batches whose streams change at every line (`one_stream_mixed`,
    // every line looked at: the line-by-line cost the runs avoid).
    let mut group = c.benchmark_group("full_subscriber_cost_per_batch");
    for &lines_per_batch in &[10usize, 1_000] {
        let cases = [
            ("all_streams", sample_lines(lines_per_batch), &b"NAME bench\nREPLICATE ALL\n"[..]),
            ("events_only", events_lines(lines_per_batch), &b"NAME bench\nREPLICATE events\n"[..]),
            ("one_stream_mixed", sample_lines(lines_per_batch), &b"NAME bench\nREPLICATE events\n"[..]),
        ];
        for (name, lines, opening) in cases {
            group.throughput(Throughput::Elements(1));
            let mut setup = hub_replicating(100, opening);
            group.bench_with_input(BenchmarkId::new(name, lines_per_batch), &lines_per_batch, |b, _| {
                batch_after_batch(b, &mut setup, &lines);
            });
        }
    }
    group.finish();
}

/// Memory with 10 000 subscribers of which 1 000 never read: the log stays under the eviction
/// bound and each connection costs a small constant. Printed, not timed.
fn memory(_c: &mut Criterion) {
    const N: usize = 10_000;
    let max_pending: u64 = 8 << 20;
    let before = LIVE.load(Ordering::Relaxed);
    let (mut hub, now) = connected_hub(max_pending);
    let ids: Vec<_> = (0..N).map(|_| hub.accept(now)).collect();
    for &id in &ids {
        hub.on_bytes(id, b"NAME bench\nREPLICATE ALL\n", now);
    }
    let mut s = Setup { hub, now, dirty: Vec::new() };
    deliver(&mut s);
    let idle = LIVE.load(Ordering::Relaxed) - before;
    let lines = sample_lines(1_000);
    let mut peak_log = 0;
    for _ in 0..200 {
        s.hub.on_batch(make_batch(&lines), s.now);
        // The first 1 000 connections never read: their writes report 0 bytes.
        s.dirty.clear();
        s.hub.take_dirty(&mut s.dirty);
        for &id in &std::mem::take(&mut s.dirty) {
            let mut iov: Vec<IoSlice<'_>> = Vec::new();
            let n = s.hub.gather(id, &mut iov);
            drop(iov);
            let stalled = (id.index as usize) < 1_000;
            s.hub.on_written(id, if stalled { 0 } else { n }, s.now);
        }
        while let Some(out) = s.hub.poll_output() {
            if let HubOutput::Close { conn, .. } = out {
                s.hub.on_peer_closed(conn, false, s.now);
            }
        }
        peak_log = peak_log.max(s.hub.log().held_bytes());
    }
    let live = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "memory: {N} subscribers: {} bytes/connection idle; after 200 batches of 1000 lines with 1000 stalled readers: \
         log peak {peak_log} bytes (bound {max_pending}), heap {} MiB, {} evicted",
        idle / N,
        live >> 20,
        s.hub.stats().evictions[0] + s.hub.stats().evictions[1],
    );
}

/// A connected loopback TCP pair: a live socket for the snapshot's ioctls.
fn loopback_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server_side, _) = listener.accept().expect("accept");
    (client, server_side)
}

/// What the drivers pass to [`Hub::snapshot`]: SIOCOUTQ, SIOCINQ and the peer address of the
/// connection's socket. Here every connection reads the same live socket: the cost is the three
/// syscalls.
fn kernel_queues_of(
    fd: std::os::fd::RawFd,
) -> impl Fn(ConnId) -> replhub::testing::hub::stats::SocketSample + Copy {
    use replhub::testing::driver::sockq;
    move |_| replhub::testing::hub::stats::SocketSample {
        send_queue: sockq::send_queue(fd).map_or(0, u64::from),
        read_queue: sockq::recv_queue(fd).map_or(0, u64::from),
        peer: sockq::peer_addr(fd).map_or_else(|_| String::new(), |a| a.to_string()),
    }
}

/// What metrics cost on the fan-out path (ARCHITECTURE.md invariant 8). The hub's per-core
/// counters are plain additions that are always on; a scrape sends each core a message, and the
/// core answers with [`Hub::snapshot`], reading SIOCOUTQ and SIOCINQ for every connection. The
/// same fan-out (100 subscribers to every stream, batches of 100 lines) runs with no scrape, with
/// one scrape every `SCRAPE_EVERY` batches (about 100 ms of this work: a scraper ten times more
/// eager than a fast Prometheus), and with one every 50 batches (far beyond any scraper). The
/// snapshot makes the real ioctls, one pair per connection, on a live loopback socket.
fn metrics_overhead(c: &mut Criterion) {
    /// About 100 ms of the work below (≈ 20 µs per batch of 100 lines × 100 subscribers).
    const SCRAPE_EVERY: u64 = 5_000;
    let (client, _server_side) = loopback_pair();
    let kernel_queues = kernel_queues_of(std::os::fd::AsRawFd::as_raw_fd(&client));

    let lines = sample_lines(100);
    let subscribers = 100;
    let mut group = c.benchmark_group("metrics_overhead_100_lines_100_subscribers");
    group.throughput(Throughput::Elements((lines.len() * subscribers) as u64));
    for every in [None, Some(SCRAPE_EVERY), Some(50)] {
        let mut setup = hub_with(subscribers);
        let mut batches = 0u64;
        let id = every.map_or_else(|| "no_scrape".to_owned(), |n| format!("scrape_every_{n}_batches"));
        group.bench_function(id, |b| {
            b.iter_batched(
                || make_batch(&lines),
                |batch| {
                    setup.hub.on_batch(batch, setup.now);
                    let n = deliver(&mut setup);
                    batches += 1;
                    if every.is_some_and(|e| batches % e == 0) {
                        std::hint::black_box(setup.hub.snapshot(0, Now::default(), kernel_queues));
                    }
                    n
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();

    // One scrape's share of the work on a core, directly: the snapshot of 100 connections.
    let mut group = c.benchmark_group("metrics_snapshot");
    for n in [100usize, 10_000] {
        let setup = hub_with(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("core_snapshot_with_ioctls", n), &n, |b, _| {
            b.iter(|| setup.hub.snapshot(0, Now::default(), kernel_queues));
        });
    }
    group.finish();
}

/// CPU time of the calling thread: unlike the wall clock, it does not count the time this
/// thread waits for a CPU, so other load on the machine does not land in one arm only.
fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the whole call, and
    // CLOCK_THREAD_CPUTIME_ID is supported by every Linux kernel replhub runs on.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The same question as [`metrics_overhead`], answered so that it survives a busy machine:
/// two identical hubs run blocks of the same work in alternating order, one of them also
/// answering scrapes, and the ratio of the thread CPU time of each pair of blocks is kept.
/// An A/A row (neither scrapes) shows the noise floor. Printed, not timed.
fn metrics_overhead_paired(_c: &mut Criterion) {
    const ROUNDS: usize = 20;
    const BLOCK: u64 = 5_000;
    let (client, _server_side) = loopback_pair();
    let kernel_queues = kernel_queues_of(std::os::fd::AsRawFd::as_raw_fd(&client));
    let batch = make_batch(&sample_lines(100));
    let block = |s: &mut Setup, scrape_every: Option<u64>| -> std::time::Duration {
        let t0 = thread_cpu_time();
        for k in 1..=BLOCK {
            s.hub.on_batch(Arc::clone(&batch), s.now);
            std::hint::black_box(deliver(s));
            if scrape_every.is_some_and(|e| k % e == 0) {
                std::hint::black_box(s.hub.snapshot(0, Now::default(), kernel_queues));
            }
        }
        thread_cpu_time() - t0
    };
    // The two costs on their own (medians of thread CPU time), which give the overhead with far
    // less noise than any difference of two runs: one batch fanned out, one snapshot.
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut s = hub_with(100);
    let per_batch = median((0..ROUNDS).map(|_| block(&mut s, None).as_secs_f64() / BLOCK as f64).collect());
    let per_snapshot = median(
        (0..ROUNDS)
            .map(|_| {
                let t0 = thread_cpu_time();
                for _ in 0..100 {
                    std::hint::black_box(s.hub.snapshot(0, Now::default(), kernel_queues));
                }
                (thread_cpu_time() - t0).as_secs_f64() / 100.0
            })
            .collect(),
    );
    println!(
        "metrics overhead, 100 subscribers × 100-line batches: {:.1} µs CPU per batch, {:.1} µs CPU \
         per snapshot (100 connections, 200 ioctls): 1 scrape per 100 ms of work costs {:.3}%, \
         1 per {BLOCK} batches {:.3}%, 1 per 50 batches {:.2}%",
        per_batch * 1e6,
        per_snapshot * 1e6,
        per_snapshot / 0.1 * 100.0,
        per_snapshot / (BLOCK as f64 * per_batch) * 100.0,
        per_snapshot / (50.0 * per_batch) * 100.0,
    );

    for (label, every) in [
        ("A/A control: neither hub scrapes", u64::MAX),
        ("1 scrape per 5000 batches (~100 ms of work)", BLOCK),
        ("1 scrape per 50 batches", 50),
    ] {
        let (mut plain, mut scraped) = (hub_with(100), hub_with(100));
        block(&mut plain, None);
        block(&mut scraped, Some(every));
        let mut ratios: Vec<f64> = (0..ROUNDS)
            .map(|r| {
                let (a, b) = if r % 2 == 0 {
                    let a = block(&mut plain, None);
                    (a, block(&mut scraped, Some(every)))
                } else {
                    let b = block(&mut scraped, Some(every));
                    (block(&mut plain, None), b)
                };
                b.as_secs_f64() / a.as_secs_f64()
            })
            .collect();
        ratios.sort_by(f64::total_cmp);
        let pct = |q: f64| (ratios[((ratios.len() - 1) as f64 * q).round() as usize] - 1.0) * 100.0;
        println!(
            "metrics overhead, {label}, 100 subscribers × 100-line batches, {ROUNDS} paired blocks of \
             {BLOCK} batches: CPU time with scrapes / without = median {:+.2}% (p10 {:+.2}%, p90 {:+.2}%)",
            pct(0.5),
            pct(0.1),
            pct(0.9),
        );
    }
}

criterion_group!(benches, fanout, memory, metrics_overhead, metrics_overhead_paired);
criterion_main!(benches);
