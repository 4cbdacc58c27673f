//! The driver's send path over real loopback TCP: one gathered write to each of N sockets,
//! through the io_uring driver's submissions (`testing::driver::SendRing`: a ring built
//! like a core's, the core loop's `SENDMSG` preparation, submitted together and every
//! completion reaped) next to a plain `writev` loop, in the same run.
//!
//! Each iteration writes one 16-line batch of 300-byte lines to every socket, as one slice (the
//! common case: the driver sends it with `SEND`) or as two (a gathered write spanning two
//! batches: `SENDMSG`); only that is timed. Between iterations the
//! receiving ends are emptied with `MSG_TRUNC` (no copy), so no send ever finds a full socket.
//! `Throughput::Elements` counts lines delivered (lines × sockets), so the figures read as
//! ns per delivery like the load test's.

// The baseline is a raw `writev` loop and the drain a raw `recv(MSG_TRUNC)`: libc calls, each
// with its SAFETY comment, in a bench that is not part of the crate.
#![allow(unsafe_code)]
// A bench times with the wall clock; only the product code must read it through `time::Clock`.
#![allow(clippy::disallowed_methods)]

use std::io::IoSlice;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use replhub::testing::driver as uring;

const LINE: usize = 300;
const LINES: usize = 16;

struct Pairs {
    /// The sending ends (the hub's sockets) and the receiving ends (the workers').
    send: Vec<TcpStream>,
    recv: Vec<TcpStream>,
}

impl Pairs {
    fn new(n: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = listener.local_addr().expect("addr");
        let (mut send, mut recv) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let worker = TcpStream::connect(addr).expect("connect");
            let (hub, _) = listener.accept().expect("accept");
            hub.set_nodelay(true).expect("nodelay");
            hub.set_nonblocking(true).expect("nonblocking");
            worker.set_nonblocking(true).expect("nonblocking");
            send.push(hub);
            recv.push(worker);
        }
        Self { send, recv }
    }

    fn fds(&self) -> Vec<RawFd> {
        self.send.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Empties every receiving end without copying; waits until `bytes` arrived at each.
    fn drain(&self, bytes: usize) {
        for s in &self.recv {
            let mut left = bytes;
            let deadline = Instant::now() + Duration::from_secs(5);
            while left > 0 {
                // SAFETY: with MSG_TRUNC a TCP recv discards up to `len` bytes and writes
                // nothing through the (null) buffer pointer.
                let n = unsafe {
                    libc::recv(
                        s.as_raw_fd(),
                        std::ptr::null_mut(),
                        left,
                        libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    left -= n as usize;
                } else {
                    assert!(Instant::now() < deadline, "the bytes sent never arrived");
                    std::hint::spin_loop();
                }
            }
        }
    }
}

fn writev_all(fds: &[RawFd], iov: &[IoSlice<'_>]) -> usize {
    let mut sent = 0;
    for &fd in fds {
        // SAFETY: `iov` is a live array of `iov.len()` slices (IoSlice is an iovec on Unix).
        let n = unsafe { libc::writev(fd, iov.as_ptr().cast(), iov.len() as i32) };
        assert!(n >= 0, "writev: {}", std::io::Error::last_os_error());
        sent += n as usize;
    }
    sent
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write one live local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(65_536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn send_path(c: &mut Criterion) {
    raise_fd_limit();
    let batch: Vec<u8> = (0..LINE * LINES).map(|i| if i % LINE == LINE - 1 { b'\n' } else { b'x' }).collect();
    let (a, b) = batch.split_at(LINE * LINES / 2);
    let two = [IoSlice::new(a), IoSlice::new(b)];
    let one = [IoSlice::new(&batch)];
    let uring_ok = uring::probe().is_ok();
    if !uring_ok {
        eprintln!("send_path: io_uring is not usable here; only the writev baseline runs");
    }
    let mut group = c.benchmark_group("send_path");
    group.measurement_time(Duration::from_secs(3));
    for (shape, iov, n) in [
        ("1slice", &one[..], 1usize),
        ("1slice", &one[..], 100),
        ("2slices", &two[..], 100),
        ("2slices", &two[..], 1000),
    ] {
        let pairs = Pairs::new(n);
        let fds = pairs.fds();
        group.throughput(Throughput::Elements((n * LINES) as u64));
        group.bench_with_input(BenchmarkId::new(format!("writev/{shape}"), n), &n, |bch, _| {
            bch.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let sent = writev_all(&fds, iov);
                    spent += t.elapsed();
                    assert_eq!(sent, n * batch.len());
                    pairs.drain(batch.len());
                }
                spent
            });
        });
        if uring_ok {
            let mut ring = uring::SendRing::new(n).expect("ring");
            group.bench_with_input(BenchmarkId::new(format!("uring/{shape}"), n), &n, |bch, _| {
                bch.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let t = Instant::now();
                        let sent = ring.send_all(&fds, iov).expect("sends");
                        spent += t.elapsed();
                        assert_eq!(sent, n * batch.len());
                        pairs.drain(batch.len());
                    }
                    spent
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, send_path);
criterion_main!(benches);
