//! What filling a crowd of stalled workers costs a core, at CI scale (issue D3's fairness item):
//! 100 workers subscribe and never read, 2 read everything, on one core with the default
//! `--worker-sndbuf` and no `--worker-notsent-lowat`, and a limit high enough that nobody is
//! evicted while the stream runs.
//!
//! Beside such a crowd the readers wait for one thing: the core copying into the crowd's
//! sockets until each one blocks. Measured with 1000 stalled workers on two cores, that fill
//! is where the readers' p99 comes from (their latency is over a millisecond for as long as
//! it lasts, and fine before and after), so its size is what this test bounds: a worker that
//! has not yet proven it reads must block once its peer's receive window is full and a small
//! not-yet-sent allowance (`UNPROVEN_NOTSENT_LOWAT`, 64 KiB) is queued, instead of once its
//! whole send buffer (256 KiB, doubled by Linux) is full as well. A build that lets unproven
//! sockets fill their send buffers writes about 376 KiB into each stalled socket here (70 KiB
//! with the allowance) and fails; the bound is 192 KiB. The readers must still get every
//! line in order, and be written past the proof threshold, which lifts the allowance for them.
// Integration tests wait for real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
#[macro_use]
mod common;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{
    sample_rdata, spawn_checking_readers, start, stop, subscribed_workers, upstream_config, TestMaster,
    Worker, WAIT,
};
use replhub::config::IoBackend;

const STALLED: usize = 100;
const READERS: usize = 2;
/// Bytes the hub may write into a stalled worker's socket before it blocks: the worker's
/// receive window (its receive buffer is 4 KiB, so a few KiB), the 64 KiB allowance, and
/// what one write may take past the allowance (the kernel checks it between segments),
/// with room to spare; a full send buffer does not fit.
const FILL_BOUND: u64 = 192 << 10;
/// Lines per step and the pause between steps: a steady stream the readers keep up with.
const STEP_LINES: usize = 250;
const STEP_PAUSE: Duration = Duration::from_millis(2);
/// Copies of the sample stream sent in all (about 3 MB: several times what any stalled
/// socket can take, and enough to prove the readers).
const COPIES: usize = 10;

fn a_stalled_worker_costs_its_receive_window_and_a_small_allowance(io: IoBackend) {
    let master = TestMaster::start();
    let mut config = upstream_config(io, master.addr());
    config.threads = 1;
    config.hub.max_pending_bytes = 256 << 20;
    config.hub.write_timeout_ms = 60_000;
    let server = start(config);
    master.wait_handshakes(1);

    let sample = sample_rdata();
    let all: Arc<Vec<Vec<u8>>> = Arc::new((0..COPIES).flat_map(|_| sample.iter().cloned()).collect());
    let total: u64 = all.iter().map(|l| l.len() as u64).sum();

    let stalled = subscribed_workers(server.local_addr(), "stalled", STALLED, Worker::connect_small_rcvbuf);
    let readers = spawn_checking_readers(
        subscribed_workers(server.local_addr(), "reader", READERS, Worker::connect),
        &all,
    );
    for chunk in all.chunks(STEP_LINES) {
        master.push(&chunk.concat());
        thread::sleep(STEP_PAUSE);
    }
    let readers: Vec<Worker> =
        readers.into_iter().map(|r| r.join().expect("every reader got every line, in order")).collect();

    // Every stalled socket has blocked by now: the readers got the whole stream after them.
    let conns: Vec<_> = server.core_snapshots(WAIT).into_iter().flat_map(|s| s.conns).collect();
    let taken: Vec<u64> =
        conns.iter().filter(|c| c.name.starts_with("stalled")).map(|c| c.bytes_delivered).collect();
    assert_eq!(taken.len(), STALLED, "no stalled worker was evicted or lost");
    let most = taken.iter().copied().max().unwrap_or(0);
    let sum: u64 = taken.iter().sum();
    eprintln!(
        "{io:?}: {} KiB written into {STALLED} stalled sockets ({} KiB at most into one); stream {} KiB",
        sum >> 10,
        most >> 10,
        total >> 10
    );
    assert!(
        most <= FILL_BOUND,
        "a stalled worker's socket took {most} bytes before it blocked (bound {FILL_BOUND})"
    );
    for c in conns.iter().filter(|c| c.name.starts_with("reader")) {
        assert!(c.bytes_delivered >= total, "{} was written {} of {total} bytes", c.name, c.bytes_delivered);
    }
    drop(stalled);
    stop(server, readers);
}

#[test]
fn a_stalled_worker_costs_its_receive_window_and_a_small_allowance_epoll() {
    a_stalled_worker_costs_its_receive_window_and_a_small_allowance(IoBackend::Epoll);
}

#[test]
fn a_stalled_worker_costs_its_receive_window_and_a_small_allowance_uring() {
    a_stalled_worker_costs_its_receive_window_and_a_small_allowance(IoBackend::Uring);
}
