//! Fan-out through the hub core (no sockets): one upstream batch of RDATA delivered to N
//! in-memory subscribers, next to the reference master's way in the same run (encode every
//! line once per connection: `json.dumps(row)` then `"RDATA s t " + json`).
//!
//! Both sides stop at the bytes handed to the kernel (the hub: the gathered iovecs; the
//! baseline: a per-connection buffer), so the kernel's copy, equal for both, is left out.
//! `Throughput::Elements` counts delivered lines (lines × subscribers).
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::IoSlice;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

use replhub::hub::{Batch, Hub, HubConfig, HubOutput, LineMeta, UpstreamEvent};
use replhub::proto::{fields, json, Command, StreamId, Token};
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
        lines = (0..n)
            .map(|i| Bytes::from(format!("RDATA events {} [\"ev\", [\"$e{i}:hs\", \"!r:hs\", \"m.room.message\", null, null, null]]\n", 1000 + i)))
            .collect();
    }
    lines.into_iter().cycle().take(n).collect()
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
    dirty: Vec<replhub::hub::ConnId>,
}

fn hub_with(subscribers: usize) -> Setup {
    let mut hub = Hub::new(HubConfig { max_pending_bytes: u64::MAX, ..HubConfig::default() });
    let now = Now::new(1, 1);
    hub.on_upstream(&UpstreamEvent::Connected { server_name: "hs".into(), positions: [Some(0); 16] }, now);
    for _ in 0..subscribers {
        let id = hub.accept(now);
        hub.on_bytes(id, b"NAME bench\nREPLICATE ALL\n", now);
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

/// The reference master: rows decoded once, then for every connection every row is encoded to
/// JSON and formatted into its own line.
fn per_connection_encode(rows: &[(StreamId, Token, json::Value)], subscribers: usize, out: &mut BytesMut) -> usize {
    let mut bytes = 0;
    let mut row_json = Vec::with_capacity(512);
    for _ in 0..subscribers {
        out.clear();
        for (stream, token, row) in rows {
            row_json.clear();
            json::encode(row, &mut row_json);
            Command::Rdata { stream: stream.name(), token: *token, row: &row_json }.encode_into(out).expect("encodes");
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
            (StreamId::from_name(rd.stream.as_bytes()).expect("known"), rd.token, json::parse(rd.row).expect("json"))
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
            b.iter_batched(
                || make_batch(&lines),
                |batch| {
                    setup.hub.on_batch(batch, setup.now);
                    deliver(&mut setup)
                },
                BatchSize::SmallInput,
            );
        });
        let mut out = BytesMut::with_capacity(64 * 1024);
        group.bench_with_input(BenchmarkId::new("baseline_encode_per_connection", n), &n, |b, &n| {
            b.iter(|| per_connection_encode(&rows, n, &mut out));
        });
    }
    group.finish();

    // O(1) per batch for a subscriber to every stream: the cost of a batch barely depends on
    // how many lines it holds.
    let mut group = c.benchmark_group("full_subscriber_cost_per_batch");
    for &lines_per_batch in &[10usize, 1_000] {
        let lines = sample_lines(lines_per_batch);
        group.throughput(Throughput::Elements(1));
        let mut setup = hub_with(100);
        group.bench_with_input(BenchmarkId::from_parameter(lines_per_batch), &lines_per_batch, |b, _| {
            b.iter_batched(
                || make_batch(&lines),
                |batch| {
                    setup.hub.on_batch(batch, setup.now);
                    deliver(&mut setup)
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

/// Memory with 10 000 subscribers of which 1 000 never read: the log stays under the eviction
/// bound and each connection costs a small constant. Printed, not timed.
fn memory(_c: &mut Criterion) {
    const N: usize = 10_000;
    let max_pending: u64 = 8 << 20;
    let before = LIVE.load(Ordering::Relaxed);
    let mut hub = Hub::new(HubConfig { max_pending_bytes: max_pending, ..HubConfig::default() });
    let now = Now::new(1, 1);
    hub.on_upstream(&UpstreamEvent::Connected { server_name: "hs".into(), positions: [Some(0); 16] }, now);
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

criterion_group!(benches, fanout, memory);
criterion_main!(benches);
