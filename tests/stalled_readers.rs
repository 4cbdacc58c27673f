//! The scenario of issue D3 at a fifth of its scale: a crowd of workers that never read, and a
//! hundredth as many readers, all subscribed before the stream starts, on one core with
//! `--max-pending-bytes 4MiB` and the default `--worker-sndbuf`. The stalled workers have
//! ordinary receive buffers, so each one takes a receive window plus the 64 KiB an unproven
//! socket may hold unsent before it blocks (its whole send buffer as well, before that limit):
//! tens of megabytes the core has to push while its readers wait, the readers unproven at
//! first (they have taken no more than the stalled workers yet). `tests/stalled_fill.rs`
//! bounds what each stalled socket takes.
//!
//! The outcome is checked, not the speed: no reader is evicted, every reader gets every line in
//! order, and every stalled worker is evicted. Latency belongs to `scripts/stalled-crowd`. The
//! readers compare whole reads against what is due, so that they keep up at this rate even in a
//! debug build: a reader slower than the stream would rightly be evicted and prove nothing.
// Integration tests wait for real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
#[macro_use]
mod common;

use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{
    eventually, sample_rdata, start, stop, subscribed_workers, upstream_config, TestMaster, Worker, WAIT,
};
use replhub::config::IoBackend;

const STALLED: usize = 200;
const READERS: usize = 2;
const MAX_PENDING: u64 = 4 << 20;
/// Lines the master sends per step, and the pause between steps: about 10 MB/s, three times
/// the production scenario's rate (10 000 lines/s of 300 bytes), so that the readers' backlog
/// would pass the limit within half a second of being passed over. (At 30 MB/s, a 1 ms pause,
/// a debug build on a VM half as fast as the one this was written on evicted a reader while
/// the core was still filling the crowd's first socket buffers, in 4 to 7 of 8 runs, before
/// and after the ninth session's changes alike.)
const STEP_LINES: usize = 250;
const STEP_PAUSE: Duration = Duration::from_millis(3);
/// Copies of the sample stream sent in all (about 12 MB: three times the limit, so every
/// stalled worker goes over it).
const COPIES: usize = 24;

fn readers_keep_up_beside_a_stalled_crowd(io: IoBackend) {
    common::init_logs();
    let master = TestMaster::start();
    let mut config = upstream_config(io, master.addr());
    config.threads = 1;
    config.hub.max_pending_bytes = MAX_PENDING;
    let server = start(config);
    master.wait_handshakes(1);

    let sample = sample_rdata();
    let all: Vec<Vec<u8>> = (0..COPIES).flat_map(|_| sample.iter().cloned()).collect();
    let want: Arc<Vec<u8>> = Arc::new(all.concat());

    let stalled = subscribed_workers(server.local_addr(), "stalled", STALLED, Worker::connect);
    let readers: Vec<_> = subscribed_workers(server.local_addr(), "reader", READERS, Worker::connect)
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let want = Arc::clone(&want);
            let stream = w.stream().try_clone().expect("clone");
            thread::spawn(move || {
                // An eviction's ERROR, or a line lost, fails here.
                if let Err(e) = read_exactly(stream, &want) {
                    panic!("reader{i}: {e}");
                }
                w
            })
        })
        .collect();

    for chunk in all.chunks(STEP_LINES) {
        master.push(&chunk.concat());
        thread::sleep(STEP_PAUSE);
    }
    let readers: Vec<Worker> = readers
        .into_iter()
        .map(|r| r.join().expect("every reader got every line, in order, and was not evicted"))
        .collect();

    let evicted =
        || -> u64 { server.core_snapshots(WAIT).iter().map(|s| s.stats.evictions.iter().sum::<u64>()).sum() };
    eventually("every stalled worker's eviction", || evicted() >= STALLED as u64);
    assert_eq!(evicted(), STALLED as u64, "only the stalled workers are evicted");
    drop(stalled);
    stop(server, readers);
}

/// Reads from `stream` until it has received exactly `want` (RDATA lines, byte for byte), PINGs
/// aside. Compares whole received chunks against what is due (memcmp), so the reader keeps up
/// at any rate the hub can deliver even in a debug build, and only a line that differs (an
/// eviction's `ERROR`) is looked at line by line. Returns why it stopped short, if it did.
fn read_exactly(mut stream: TcpStream, want: &[u8]) -> Result<(), String> {
    stream.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256 << 10];
    // Received bytes not yet matched: at most a partial line.
    let mut held: Vec<u8> = Vec::new();
    let mut pos = 0;
    while pos < want.len() {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Err(format!("EOF after {pos} of {} bytes", want.len())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("after {pos} of {} bytes: {e}", want.len())),
        };
        held.extend_from_slice(&buf[..n]);
        let mut i = 0;
        while i < held.len() && pos < want.len() {
            let rest = &held[i..];
            let take = rest.len().min(want.len() - pos);
            if rest[..take] == want[pos..pos + take] {
                i += take;
                pos += take;
                break;
            }
            // Something else arrived: it must be a whole line of its own, at a line start.
            let same = rest.iter().zip(&want[pos..]).take_while(|(a, b)| a == b).count();
            let at_line_start = pos + same == 0 || want[pos + same - 1] == b'\n';
            let other = &rest[same..];
            match other.iter().position(|b| *b == b'\n') {
                Some(end) if at_line_start && other.starts_with(b"PING ") => {
                    i += same + end + 1;
                    pos += same;
                }
                Some(end) => {
                    return Err(format!(
                        "after {} of {} bytes: {:?}",
                        pos + same,
                        want.len(),
                        String::from_utf8_lossy(&other[..=end])
                    ))
                }
                // The rest of that line has not arrived yet.
                None => {
                    i += same;
                    pos += same;
                    break;
                }
            }
        }
        held.drain(..i);
    }
    Ok(())
}

#[test]
fn readers_keep_up_beside_a_stalled_crowd_epoll() {
    readers_keep_up_beside_a_stalled_crowd(IoBackend::Epoll);
}

#[test]
fn readers_keep_up_beside_a_stalled_crowd_uring() {
    readers_keep_up_beside_a_stalled_crowd(IoBackend::Uring);
}
