use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread;
use std::time::Instant;

use super::*;
use crate::hub::Batch;

/// Fails a test that would otherwise hang; never reached when the code is right.
const PATIENCE: Duration = Duration::from_secs(20);
const MAILBOX: usize = 4;

fn no_wake() -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(|| {})
}

/// A source context with `n` cores (mailboxes of [`MAILBOX`]) and the given queue limit.
fn context(
    source: SourceConfig,
    n: usize,
    limit: u64,
) -> (SourceContext, SourceHandle, Vec<Receiver<CoreMsg>>) {
    let (handle, commands, control, wakeup, stop) = SourceHandle::new();
    let (cores, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| Inbox::bounded(no_wake(), MAILBOX)).unzip();
    let hub = HubConfig { max_pending_bytes: limit, ..HubConfig::default() };
    let ctx = SourceContext {
        source,
        hub,
        backoff: BackoffConfig::default(),
        cores,
        commands,
        control,
        wakeup,
        stop,
        clock: Clock::new(),
        resp: None,
        start: crate::driver::StartGate::open_now(),
        redis_tls: None,
    };
    (ctx, handle, rxs)
}

fn batch(len: usize) -> Arc<Batch> {
    Arc::new(Batch::new(Bytes::from(vec![b'x'; len]), Vec::new()))
}

/// Drains a core on a thread, forwarding each batch to the returned receiver.
fn drain_core(rx: Receiver<CoreMsg>) -> Receiver<Arc<Batch>> {
    let (tx, out) = mpsc::channel();
    thread::spawn(move || {
        while let Ok(msg) = rx.recv() {
            if let CoreMsg::Batch(b) = msg {
                if tx.send(b).is_err() {
                    return;
                }
            }
        }
    });
    out
}

fn recv(rx: &Receiver<Arc<Batch>>) -> Arc<Batch> {
    match rx.recv_timeout(PATIENCE) {
        Ok(b) => b,
        Err(RecvTimeoutError::Timeout) => panic!("no batch within {PATIENCE:?}"),
        Err(RecvTimeoutError::Disconnected) => panic!("the core's drain ended"),
    }
}

/// The hold rule: read data waits only while a core has a message queued behind its full
/// mailbox, and stops waiting as soon as that core takes one.
#[test]
fn reads_are_held_only_while_a_core_has_a_message_behind_a_full_mailbox() {
    let synthetic = SourceConfig::Synthetic { rate: 0, line_size: None };
    let (ctx, _handle, rxs) = context(synthetic, 2, 1 << 20);
    let mut src = Source::new(ctx);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut up = SynthHolder(SyntheticSource::new(SyntheticConfig::default(), "s".to_owned()));
    let mut send = |src: &mut Source| {
        let b = batch(10);
        assert!(rt.block_on(src.broadcast(&mut up, || CoreMsg::Batch(Arc::clone(&b)))));
    };

    // Idle cores: every read is cut at once.
    assert!(!src.busy());
    for _ in 0..MAILBOX {
        send(&mut src);
    }
    assert!(!src.busy(), "full mailboxes with nothing queued behind them hold nothing");
    // One message waits behind core 0's and core 1's full mailboxes: hold.
    send(&mut src);
    assert_eq!(src.queue_report().messages, vec![1, 1]);
    assert!(src.busy());
    // Core 0 takes one: its queued message moves in, but core 1 is still busy.
    rxs[0].try_recv().unwrap();
    assert!(src.busy());
    assert_eq!(src.queue_report().messages, vec![0, 1]);
    // Core 1 takes one: nobody is busy any more.
    rxs[1].try_recv().unwrap();
    assert!(!src.busy());
    assert_eq!(src.queue_report().messages, vec![0, 0]);
}

/// One core's loop never drains its mailbox. The other cores still get every batch, the
/// source keeps generating at full speed until that core's queue in the source passes the
/// limit, and stops exactly there; when the core drains again, it gets every batch in order
/// and the source resumes.
#[test]
// Measures how long the stalled source waits on real threads.
#[allow(clippy::disallowed_methods)]
fn a_stalled_core_slows_the_source_only_past_the_limit() {
    const LIMIT: u64 = 256 << 10;
    let synthetic = SourceConfig::Synthetic { rate: 0, line_size: None };
    let (ctx, handle, mut rxs) = context(synthetic, 3, LIMIT);
    let stalled = rxs.remove(1);
    let fast: Vec<_> = rxs.into_iter().map(drain_core).collect();
    let source = thread::spawn(move || run(ctx));

    // Wait (on the source's own reports, not a sleep) until it has stopped for core 1.
    let start = Instant::now();
    let report = loop {
        let r = handle.queues(PATIENCE).expect("the source answers while it waits");
        if r.blocked {
            break r;
        }
        assert!(start.elapsed() < PATIENCE, "the source never stopped for the stalled core");
        thread::yield_now();
    };
    // Nothing is generated while it waits, so this report stays true.
    assert_eq!(handle.queues(PATIENCE).unwrap(), report);

    // The fast cores got every batch handed out, in the same order.
    let seen: Vec<Vec<Arc<Batch>>> =
        fast.iter().map(|rx| (0..report.batches).map(|_| recv(rx)).collect()).collect();
    assert!(seen[0].iter().zip(&seen[1]).all(|(a, b)| Arc::ptr_eq(a, b)));
    assert_eq!(report.messages[0], 0);
    assert_eq!(report.messages[2], 0);

    // Core 1 holds the `Up` message and the first batches in its mailbox; every other
    // batch waits in the source, and those bytes passed the limit with the last batch only.
    let queued = report.messages[1];
    let queued_batches = usize::try_from(report.batches).unwrap() + 1 - MAILBOX;
    assert_eq!(queued, queued_batches);
    let tail = &seen[0][seen[0].len() - queued..];
    let bytes: usize = tail.iter().map(|b| b.data().len()).sum();
    assert_eq!(report.bytes[1], bytes);
    let last = tail.last().unwrap().data().len();
    assert!(bytes as u64 > LIMIT, "stopped at {bytes} bytes, not over the limit {LIMIT}");
    assert!(((bytes - last) as u64) <= LIMIT, "kept reading past the limit: {bytes} bytes queued");

    // The stalled core comes back: it gets the same batches in the same order, and the
    // source hands out new ones again.
    let slow = drain_core(stalled);
    for b in &seen[0] {
        assert!(Arc::ptr_eq(&recv(&slow), b), "the stalled core lost or reordered a batch");
    }
    let next = recv(&fast[0]);
    assert!(Arc::ptr_eq(&recv(&slow), &next));

    handle.stop();
    source.join().unwrap().unwrap();
}

/// Upstream mode with one core stalled: every line the master writes reaches the other
/// cores by itself (one read, one batch), without waiting for the stalled core; the
/// stalled core's share waits in the source and arrives complete and in order later.
#[test]
fn a_stalled_core_does_not_hold_back_upstream_lines_for_the_others() {
    use std::io::Write;

    const LINES: usize = 50;
    let master = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = master.local_addr().unwrap().to_string();
    let upstream = SourceConfig::Upstream { addr, client_name: "test".to_owned() };
    let (ctx, handle, mut rxs) = context(upstream, 3, 64 << 20);
    let stalled = rxs.remove(1);
    let fast: Vec<_> = rxs.into_iter().map(drain_core).collect();
    let source = thread::spawn(move || run(ctx));

    let (go, next) = mpsc::channel::<()>();
    let writer = thread::spawn(move || {
        let (mut sock, _) = master.accept().unwrap();
        sock.write_all(b"SERVER test\nPING 1\nPOSITION events 0\n").unwrap();
        for n in 1..=LINES {
            sock.write_all(format!("RDATA events {n} [\"x\"]\n").as_bytes()).unwrap();
            if next.recv().is_err() {
                return;
            }
        }
        // Keep the connection open until the test is done.
        let _ = next.recv();
    });

    // Each line is written only after the previous one reached both fast cores.
    let mut seen: Vec<Vec<Arc<Batch>>> = vec![Vec::new(), Vec::new()];
    for n in 1..=LINES {
        let line = format!("RDATA events {n} [\"x\"]\n");
        for (rx, seen) in fast.iter().zip(&mut seen) {
            loop {
                let b = recv(rx);
                seen.push(Arc::clone(&b));
                if (0..b.lines().len()).any(|i| b.line(i) == line.as_bytes()) {
                    break;
                }
            }
        }
        go.send(()).unwrap();
    }
    assert_eq!(seen[0].len(), LINES, "one read per line, so one batch per line");
    assert!(seen[0].iter().zip(&seen[1]).all(|(a, b)| Arc::ptr_eq(a, b)));

    // The stalled core's mailbox holds `Up` and the first batches; the rest wait for it in
    // the source, which never stopped reading.
    let report = handle.queues(PATIENCE).unwrap();
    assert!(!report.blocked);
    assert_eq!(report.messages[1] + MAILBOX, LINES + 1);
    let slow = drain_core(stalled);
    for b in &seen[0] {
        assert!(Arc::ptr_eq(&recv(&slow), b), "the stalled core lost or reordered a batch");
    }

    handle.stop();
    source.join().unwrap().unwrap();
    drop(go);
    writer.join().unwrap();
}

/// Broker mode with one core that never drains its mailbox: the cores' PUBLISH batches keep
/// reaching every other core in full, the queue for the stalled core stays within the limit
/// (the batches past it are dropped for that core alone), and when the core drains again it
/// gets what was queued, in order, then one `PublishLost` naming the channels it missed.
#[test]
fn a_stalled_core_bounds_its_queue_of_published_batches() {
    use crate::hub::{LineMeta, Published};

    const LIMIT: u64 = 64 << 10;
    const BATCHES: usize = 300;
    const CHANNEL: u32 = 7;
    let (ctx, handle, mut rxs) = context(SourceConfig::None, 2, LIMIT);
    let stalled = rxs.remove(1);
    let fast = drain_core(rxs.remove(0));
    let commands = handle.commands();
    let source = thread::spawn(move || run(ctx));

    let published: Vec<Arc<Batch>> = (0..BATCHES)
        .map(|i| {
            let mut data = vec![b'a' + (i % 26) as u8; 1024];
            data[1023] = b'\n';
            Arc::new(Batch::new(Bytes::from(data), vec![LineMeta::pubsub(0, 1024, CHANNEL)]))
        })
        .collect();
    // The draining core gets every batch, in order, whatever the stalled one does (each is
    // published once the one before it arrived, so that its own queue never fills).
    for b in &published {
        assert!(commands.send((0, UpstreamCmd::Publish(Published(Arc::clone(b))))));
        assert!(Arc::ptr_eq(&recv(&fast), b), "the draining core lost or reordered a batch");
    }
    let report = handle.queues(PATIENCE).expect("the source answers");
    assert!(!report.blocked, "a publisher is never held back");
    assert!(
        report.bytes[1] as u64 <= LIMIT + 4,
        "the stalled core's queue grew to {} bytes past the limit {LIMIT}",
        report.bytes[1]
    );
    let queued = usize::try_from(LIMIT).unwrap() / 1024;
    let dropped = BATCHES - MAILBOX - queued;
    assert_eq!(report.dropped, vec![0, dropped as u64]);

    // The stalled core comes back: the batches that fit, in order, then what it lost.
    for b in &published[..MAILBOX + queued] {
        match stalled.recv_timeout(PATIENCE) {
            Ok(CoreMsg::Batch(got)) => assert!(Arc::ptr_eq(&got, b), "reordered"),
            other => panic!("a batch expected, got {other:?}"),
        }
    }
    match stalled.recv_timeout(PATIENCE) {
        Ok(CoreMsg::PublishLost { channels, batches }) => {
            assert_eq!(channels, vec![CHANNEL]);
            assert_eq!(batches, dropped as u64);
        }
        other => panic!("PublishLost expected, got {other:?}"),
    }
    // Later batches reach it again once it drains.
    let after = Arc::new(Batch::new(Bytes::from_static(b"after\n"), vec![LineMeta::pubsub(0, 6, CHANNEL)]));
    assert!(commands.send((0, UpstreamCmd::Publish(Published(Arc::clone(&after))))));
    match stalled.recv_timeout(PATIENCE) {
        Ok(CoreMsg::Batch(got)) => assert!(Arc::ptr_eq(&got, &after)),
        other => panic!("the batch after the loss expected, got {other:?}"),
    }

    handle.stop();
    source.join().unwrap().unwrap();
}
