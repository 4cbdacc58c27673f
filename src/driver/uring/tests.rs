//! Driver-level tests: the probe, and a core started and stopped without the server glue.
// These tests wait on a real ring and real sockets, with real deadlines.
#![allow(clippy::disallowed_methods)]
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::driver::{CoreMsg, IdleCore, Inbox};
use crate::hub::HubConfig;
use crate::time::Clock;

#[test]
fn probe_succeeds_on_this_machine() {
    // io_uring is enabled here (kernel.io_uring_disabled=0, no seccomp filter).
    let started = Instant::now();
    assert_eq!(probe(), Ok(()));
    assert!(started.elapsed() < Duration::from_millis(500), "probe took {:?}", started.elapsed());
}

fn context(wakeup: CoreWakeup, inbox: std::sync::mpsc::Receiver<CoreMsg>) -> CoreContext {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let (upstream, _rx) = Inbox::new(Arc::new(|| {}));
    CoreContext {
        index: 0,
        listener,
        hub: HubConfig::default(),
        inbox,
        wakeup,
        upstream,
        clock: Clock::new(),
        worker_sndbuf: 0,
        resp: None,
        start: crate::driver::StartGate::open_now(),
        worker_notsent_lowat: 0,
        moderation: crate::driver::moderation::ModerationConfig::default(),
        peers: Vec::new(),
        balance: Arc::new(crate::driver::Balance::new(1)),
        hosted_source: None,
        idle: IdleCore::new(64),
    }
}

/// A core on its own thread, as [`start_core`] leaves it.
struct RunningCore {
    /// Its mailbox.
    mailbox: Inbox<CoreMsg>,
    /// What it forwards upstream.
    upstream: std::sync::mpsc::Receiver<(usize, crate::hub::UpstreamCmd)>,
    /// Where its listener accepts workers.
    addr: std::net::SocketAddr,
    /// The thread, which returns the loop's counters.
    thread: std::thread::JoinHandle<anyhow::Result<event_loop::LoopStats>>,
}

/// A core's context with an eventfd wake-up, its mailbox, what it forwards upstream and
/// where it accepts workers.
type Wired = (
    CoreContext,
    Inbox<CoreMsg>,
    std::sync::mpsc::Receiver<(usize, crate::hub::UpstreamCmd)>,
    std::net::SocketAddr,
);

fn wired_context() -> Wired {
    let (wakeup, wake) = new_wakeup().unwrap();
    let (mailbox, rx) = Inbox::new(wake);
    let mut ctx = context(wakeup, rx);
    let (upstream, upstream_rx) = Inbox::new(Arc::new(|| {}));
    ctx.upstream = upstream;
    let addr = ctx.listener.local_addr().unwrap();
    (ctx, mailbox, upstream_rx, addr)
}

/// Starts a core with `buf_count` recv buffers on a thread of its own.
fn start_core(buf_count: u16) -> RunningCore {
    let (ctx, mailbox, upstream_rx, addr) = wired_context();
    let thread = std::thread::spawn(move || event_loop::run_core_with(ctx, buf_count));
    RunningCore { mailbox, upstream: upstream_rx, addr, thread }
}

#[test]
fn a_core_without_connections_stops_at_once_on_shutdown() {
    let (wakeup, wake) = new_wakeup().unwrap();
    let (tx, rx) = Inbox::new(wake);
    let ctx = context(wakeup, rx);
    let core = std::thread::spawn(move || run_core(ctx));
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    assert!(tx.send(CoreMsg::Shutdown));
    core.join().unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_millis(500), "took {:?}", started.elapsed());
}

#[test]
fn a_core_stops_when_its_mailbox_is_dropped() {
    let (wakeup, wake) = new_wakeup().unwrap();
    let (tx, rx) = Inbox::new(wake);
    let ctx = context(wakeup, rx);
    let core = std::thread::spawn(move || run_core(ctx));
    std::thread::sleep(Duration::from_millis(50));
    drop(tx);
    // Dropping the sender does not fire the eventfd; the hub's tick notices within ~100 ms.
    core.join().unwrap().unwrap();
}

#[test]
fn run_core_refuses_a_notify_wakeup() {
    let (_tx, rx) = Inbox::<CoreMsg>::new(Arc::new(|| {}));
    let ctx = context(CoreWakeup::Notify(Arc::new(tokio::sync::Notify::new())), rx);
    let err = run_core(ctx).unwrap_err();
    assert!(err.to_string().contains("eventfd"), "{err}");
}

/// With a ring of only two 4 KiB buffers, 40 workers that each send 21 KiB at once run the
/// ring dry again and again: every byte must still arrive (each worker's lines are forwarded
/// upstream in order), and no recv is re-armed into an empty ring, so every ENOBUFS is paid
/// for by completions that carried data (no spinning).
#[test]
fn an_empty_buffer_ring_neither_loses_input_nor_spins() {
    use std::io::Write;

    const WORKERS: usize = 40;
    const LINES: usize = 1000;
    let RunningCore { mailbox: tx, upstream: upstream_rx, addr, thread: core } = start_core(2);
    let mut workers: Vec<std::net::TcpStream> =
        (0..WORKERS).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    // FEDERATION_ACK <token> is forwarded verbatim: 20 bytes a line, 20 KB a worker.
    let payloads: Vec<Vec<u8>> = (0..WORKERS)
        .map(|w| {
            (0..LINES)
                .map(|i| format!("FEDERATION_ACK {:05}\n", w * LINES + i))
                .collect::<String>()
                .into_bytes()
        })
        .collect();
    for (w, p) in workers.iter_mut().zip(&payloads) {
        w.write_all(p).unwrap();
    }
    let mut per_worker = vec![Vec::new(); WORKERS];
    for _ in 0..WORKERS * LINES {
        let (_, cmd) = upstream_rx.recv_timeout(Duration::from_secs(10)).expect("every line forwarded");
        let crate::hub::UpstreamCmd::Forward(line) = cmd else { panic!("a forward") };
        let n: usize = std::str::from_utf8(&line[15..20]).unwrap().parse().unwrap();
        per_worker[n / LINES].push(n % LINES);
    }
    for got in &per_worker {
        assert!(got.iter().copied().eq(0..LINES), "in order, none lost");
    }
    assert!(tx.send(CoreMsg::Shutdown));
    drop(workers);
    let stats = core.join().unwrap().unwrap();
    assert!(stats.enobufs > 0, "the ring never ran dry: the test does not test anything");
    // A turn that ends in ENOBUFS used the whole ring (two data completions) and re-arms at
    // most two recvs; only first-time arms (one per worker) come on top.
    assert!(stats.enobufs <= stats.data + WORKERS as u64, "{stats:?}");
}

/// A core whose mailbox is gone while a worker is still connected waits out the shutdown grace
/// asleep, not spinning: the closed mailbox is news once (it starts the grace), not at every
/// look before a sleep. The worker neither reads nor closes, so the core holds it for the
/// whole grace (two seconds), in which a spinning loop turns hundreds of thousands of times.
#[test]
fn a_core_whose_mailbox_closed_waits_out_the_grace_asleep() {
    use std::io::Write;

    let RunningCore { mailbox: tx, upstream: upstream_rx, addr, thread: core } = start_core(8);
    let mut worker = std::net::TcpStream::connect(addr).unwrap();
    // Forwarded upstream once the core holds the connection.
    worker.write_all(b"FEDERATION_ACK 1\n").unwrap();
    upstream_rx.recv_timeout(Duration::from_secs(10)).expect("the core took the worker");
    drop(tx);
    let stats = core.join().unwrap().unwrap();
    assert!(stats.turns < 10_000, "the loop spun through the grace: {stats:?}");
    drop(worker);
}

/// A core with no connection is left asleep by batches until half its mailbox waits; once a
/// worker is connected, every batch wakes it. The core itself says which it is (at the top of
/// each mailbox drain), so this runs the real loop and counts the senders' wake-ups.
#[test]
fn an_idle_core_is_not_woken_per_batch_and_a_busy_one_is() {
    use std::io::{BufRead, BufReader};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let (wakeup, wake) = new_wakeup().unwrap();
    let CoreWakeup::EventFd { asleep, .. } = &wakeup else { unreachable!("an eventfd wake-up") };
    let asleep = Arc::clone(asleep);
    let wakes = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&wakes);
    let counting: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        wake();
    });
    let idle = IdleCore::new(64);
    let (mailbox, rx) = Inbox::bounded(counting, 64);
    let mailbox = mailbox.with_idle(Arc::clone(&idle));
    let mut ctx = context(wakeup, rx);
    ctx.idle = idle;
    let addr = ctx.listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || event_loop::run_core_with(ctx, 16));
    let batch = |token: i64| {
        let line = format!(
            "RDATA events {token} [\"ev\", [\"$e:hs\", \"!r:hs\", \"m.room.message\", null, null, null]]\n"
        );
        CoreMsg::Batch(Arc::new(crate::upstream::index_chunk(&bytes::Bytes::from(line)).into_batch()))
    };
    let wait_asleep = || {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !asleep.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the core never went to sleep");
            std::thread::yield_now();
        }
    };
    assert!(mailbox.send(CoreMsg::Upstream(crate::hub::UpstreamEvent::Connected {
        server_name: "hs".to_owned(),
        positions: [Some(1); crate::proto::StreamId::COUNT],
        generation: crate::proto::Generation::Seed,
        instance: "master".to_owned(),
    })));
    wait_asleep();
    let before = wakes.load(Ordering::SeqCst);
    for token in 2..33 {
        mailbox.try_send_update(batch(token)).unwrap();
    }
    assert_eq!(wakes.load(Ordering::SeqCst), before, "31 batches left the idle core alone");
    // However the core's own tick fell, the 32nd batch since it last took its mail wakes it.
    let mut sent = 0;
    while wakes.load(Ordering::SeqCst) == before {
        mailbox.try_send_update(batch(33 + sent)).unwrap();
        sent += 1;
        assert!(sent <= 32, "{sent} more batches and still asleep");
    }

    // A worker: from now on the core has a connection, and every batch wakes it.
    let worker = std::net::TcpStream::connect(addr).unwrap();
    worker.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(worker);
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("SERVER "), "{greeting:?}");
    let before = wakes.load(Ordering::SeqCst);
    for token in 100..105 {
        mailbox.try_send_update(batch(token)).unwrap();
    }
    assert_eq!(wakes.load(Ordering::SeqCst), before + 5);
    assert!(mailbox.send(CoreMsg::Shutdown));
    drop(reader);
    thread.join().unwrap().unwrap();
}

/// A core with writes left for its next turn, or news in its mailbox, whenever a turn ends
/// never sleeps, as under a steady load (100 lines/s to 10 000 workers). The ring runs
/// DEFER_TASKRUN: the kernel posts an accept's or a recv's completion only when the loop asks
/// for completions. So a turn must ask for them as it ends even when it does not sleep, or
/// new workers and their input wait until the load stops. Driven turn by turn, never allowed
/// to sleep, the core must still take a new worker and forward its command.
#[test]
fn a_core_that_never_sleeps_still_takes_its_workers_input() {
    use std::io::Write;

    let (ctx, _mailbox, upstream_rx, addr) = wired_context();
    let mut core = event_loop::Driver::stepped(ctx, 16).unwrap();
    // The first turn arms the accept.
    assert!(core.turn().is_some());
    core.end_turn(false).unwrap();
    let mut worker = std::net::TcpStream::connect(addr).unwrap();
    worker.write_all(b"FEDERATION_ACK 7\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut forwarded = None;
    let mut turns = 0u32;
    while forwarded.is_none() && Instant::now() < deadline {
        assert!(core.turn().is_some(), "the core stopped");
        core.end_turn(false).unwrap();
        turns += 1;
        forwarded = upstream_rx.try_recv().ok().map(|(_, cmd)| cmd);
    }
    // The ring's memory is only freed once its ops are done: end the core before asserting.
    drop(worker);
    let stats = core.finish().unwrap();
    assert_eq!(stats.sleeps, 0, "the test let the core sleep");
    let Some(cmd) = forwarded else {
        panic!("a core that never slept never took the worker's command ({turns} turns)");
    };
    assert!(
        matches!(cmd, crate::hub::UpstreamCmd::Forward(ref l) if &l[..] == b"FEDERATION_ACK 7\n"),
        "{cmd:?}"
    );
}
