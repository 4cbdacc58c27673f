//! A crowd of stalled workers costs the healthy ones nothing, over real loopback sockets on both
//! drivers: 200 workers subscribe and never read, 2 workers read everything while the master
//! sends at a steady rate. The readers get every line in order and are never evicted; every
//! stalled worker is evicted (for its backlog or the write timeout).
//!
//! The production case scaled down by five with the same ratios of workers: 1000 stalled and
//! 10 readers at 15 MB/s with a 4 MiB limit and the default 256 KiB send buffer become 200 and
//! 2 at 3.5 MB/s with 1 MiB and 64 KiB (the limit is the same time of stream). On one core the stalled workers' sockets and the readers' share one event loop,
//! which is what made the hub evict its healthy readers for its own lag.
// Integration tests wait for real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
#[macro_use]
mod common;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    eventually, sample_rdata, spawn_checking_readers, start, stop, subscribed_workers, upstream_config,
    TestMaster, Worker, WAIT,
};
use replhub::config::IoBackend;

const STALLED: usize = 200;
const READERS: usize = 2;
const MAX_PENDING: u64 = 1 << 20;
const SNDBUF: usize = 64 << 10;
/// Lines the master sends per step, and the pause between steps: about 3.5 MB/s, so the
/// limit is about 300 ms of stream, as 4 MiB is at 15 MB/s.
const STEP_LINES: usize = 250;
const STEP_PAUSE: Duration = Duration::from_millis(10);
/// Copies of the sample stream sent in all (about 7 MB).
const COPIES: usize = 14;

fn a_crowd_of_stalled_workers_costs_the_readers_nothing(io: IoBackend) {
    let master = TestMaster::start();
    let mut config = upstream_config(io, master.addr());
    config.threads = 1;
    config.hub.max_pending_bytes = MAX_PENDING;
    config.hub.write_timeout_ms = 500;
    config.worker_sndbuf = SNDBUF;
    let server = start(config);
    master.wait_handshakes(1);

    let sample = sample_rdata();
    let all: Arc<Vec<Vec<u8>>> = Arc::new((0..COPIES).flat_map(|_| sample.iter().cloned()).collect());

    let stalled = subscribed_workers(server.local_addr(), "stalled", STALLED, Worker::connect_small_rcvbuf);
    let readers = spawn_checking_readers(
        subscribed_workers(server.local_addr(), "reader", READERS, Worker::connect),
        &all,
    );

    // A steady rate, not a lockstep with the readers: the hub must keep up on its own.
    let started = Instant::now();
    for chunk in all.chunks(STEP_LINES) {
        master.push(&chunk.concat());
        thread::sleep(STEP_PAUSE);
    }
    let readers: Vec<Worker> =
        readers.into_iter().map(|r| r.join().expect("every reader got every line, in order")).collect();
    let took = started.elapsed();

    let evictions = || -> (u64, u64) {
        let snaps = server.core_snapshots(WAIT);
        let backlog = snaps.iter().map(|s| s.stats.evictions[0]).sum();
        let timeout = snaps.iter().map(|s| s.stats.evictions[1]).sum();
        (backlog, timeout)
    };
    eventually("every stalled worker's eviction", || {
        let (backlog, timeout) = evictions();
        backlog + timeout >= STALLED as u64
    });
    let (backlog, timeout) = evictions();
    assert_eq!(backlog + timeout, STALLED as u64, "only the stalled workers are evicted");
    eprintln!(
        "{io:?}: {} lines in {took:?}; evicted {backlog} for backlog, {timeout} for the write timeout",
        all.len()
    );
    // The readers are still served: one more line reaches both (a numbered one: a `batch`
    // line alone would open a run that replhub holds until its numbered line arrives).
    let last = all
        .iter()
        .find(|l| l.split(|b| *b == b' ').nth(2).is_some_and(|t| t != b"batch"))
        .expect("a numbered RDATA in the sample");
    master.push(last);
    let mut readers = readers;
    for (i, r) in readers.iter_mut().enumerate() {
        assert_eq!(r.rdata(1), vec![last.to_vec()], "reader{i} after the crowd's eviction");
    }
    drop(stalled);
    stop(server, readers);
}

#[test]
fn a_crowd_of_stalled_workers_costs_the_readers_nothing_epoll() {
    a_crowd_of_stalled_workers_costs_the_readers_nothing(IoBackend::Epoll);
}

#[test]
fn a_crowd_of_stalled_workers_costs_the_readers_nothing_uring() {
    a_crowd_of_stalled_workers_costs_the_readers_nothing(IoBackend::Uring);
}
