//! The io_uring driver on real loopback sockets, driven directly through `run_core` (no server
//! glue): handshake, POSITION, byte-identical relay, slow-consumer eviction, forwarding,
//! closes, shutdown, and many connections at once.
// Integration tests wait for real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use replhub::config::HubConfig;
use replhub::proto::StreamId;
use replhub::testing::driver::{
    new_wakeup, run_core, Balance, CoreContext, CoreMsg, IdleCore, Inbox, StartGate,
};
use replhub::testing::hub::stats::CoreSnapshot;
use replhub::testing::hub::{UpstreamCmd, UpstreamEvent};
use replhub::testing::upstream::index_chunk;
use replhub::time::Clock;
use socket2::{Domain, Socket, Type};

const TIMEOUT: Duration = Duration::from_secs(10);

struct Core {
    addr: SocketAddr,
    inbox: Inbox<CoreMsg>,
    upstream: Receiver<(usize, UpstreamCmd)>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Core {
    fn start(hub: HubConfig) -> Self {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_reuse_port(true).unwrap();
        socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        socket.listen(1024).unwrap();
        socket.set_nonblocking(true).unwrap();
        let listener: std::net::TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        let (wakeup, wake) = new_wakeup().unwrap();
        let (inbox, rx) = Inbox::new(wake);
        let (upstream_tx, upstream) = Inbox::new(Arc::new(|| {}));
        let ctx = CoreContext {
            index: 0,
            listener,
            hub,
            inbox: rx,
            wakeup,
            upstream: upstream_tx,
            clock: Clock::new(),
            worker_sndbuf: 0,
            resp: None,
            start: StartGate::open_now(),
            worker_notsent_lowat: 0,
            moderation: replhub::config::ModerationConfig::default(),
            peers: Vec::new(),
            balance: Arc::new(Balance::new(1)),
            hosted_source: None,
            idle: IdleCore::new(64),
        };
        let thread = std::thread::spawn(move || run_core(ctx));
        let core = Self { addr, inbox, upstream, thread: Some(thread) };
        core.inbox.send(CoreMsg::Upstream(UpstreamEvent::Connected {
            server_name: "master.example".to_owned(),
            positions: [Some(1); StreamId::COUNT],
            generation: replhub::proto::Generation::Seed,
            instance: "master".to_owned(),
        }));
        core
    }

    fn batch(&self, text: &str) {
        let chunk = Bytes::copy_from_slice(text.as_bytes());
        let batch = index_chunk(&chunk).into_batch();
        assert!(self.inbox.send(CoreMsg::Batch(Arc::new(batch))));
    }

    fn snapshot(&self) -> CoreSnapshot {
        let (tx, rx) = mpsc::channel();
        assert!(self.inbox.send(CoreMsg::Snapshot(tx)));
        rx.recv_timeout(TIMEOUT).expect("snapshot")
    }

    /// Waits until the core reports `n` live connections.
    fn wait_conns(&self, n: usize) {
        let start = Instant::now();
        loop {
            let have = self.snapshot().conns.len();
            if have == n {
                return;
            }
            assert!(start.elapsed() < TIMEOUT, "core has {have} connections, want {n}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn shutdown(mut self) -> Duration {
        let start = Instant::now();
        self.inbox.send(CoreMsg::Shutdown);
        self.thread.take().unwrap().join().unwrap().unwrap();
        start.elapsed()
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.inbox.send(CoreMsg::Shutdown);
            let _ = t.join();
        }
    }
}

struct Worker {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Worker {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Self { reader: BufReader::new(stream.try_clone().unwrap()), stream }
    }

    /// Connects with a small receive buffer, so the server's socket fills up quickly.
    fn connect_small(addr: SocketAddr) -> Self {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&addr.into()).unwrap();
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Self { reader: BufReader::new(stream.try_clone().unwrap()), stream }
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        let n = self.reader.read_line(&mut s).expect("read a line");
        assert!(n > 0, "EOF while waiting for a line");
        s
    }

    /// Reads the greeting: `SERVER`, then `PING`.
    fn handshake(&mut self) {
        assert_eq!(self.line(), "SERVER master.example\n");
        assert!(self.line().starts_with("PING "));
    }

    fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
    }

    /// Everything up to EOF.
    fn rest(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.reader.read_to_end(&mut out).expect("read to EOF");
        out
    }
}

fn rdata_lines(stream: &str, first_token: i64, n: usize, pad: usize) -> String {
    let filler = "x".repeat(pad);
    (0..n)
        .map(|i| format!("RDATA {stream} {} [\"row\", {i}, \"{filler}\"]\n", first_token + i as i64))
        .collect()
}

#[test]
fn relays_the_handshake_position_and_rdata_byte_identical() {
    let core = Core::start(HubConfig::default());
    let mut w = Worker::connect(core.addr);
    w.handshake();
    w.send("NAME worker1\nREPLICATE events\n");
    assert_eq!(w.line(), "POSITION events 1\n");
    let events = rdata_lines("events", 2, 50, 10);
    // A batch run, a line of another stream (filtered out), then more events.
    let mixed =
        format!("RDATA events batch [\"a\"]\nRDATA events 100 [\"b\"]\nRDATA caches 7 [\"c\"]\n{events}");
    core.batch(&mixed);
    let mut got = String::new();
    got.push_str(&w.line());
    got.push_str(&w.line());
    for _ in 0..50 {
        got.push_str(&w.line());
    }
    assert_eq!(got, format!("RDATA events batch [\"a\"]\nRDATA events 100 [\"b\"]\n{events}"));
    drop(w);
    core.wait_conns(0);
    assert!(core.shutdown() < Duration::from_secs(1));
}

#[test]
fn forwards_worker_commands_upstream() {
    let core = Core::start(HubConfig::default());
    let mut w = Worker::connect(core.addr);
    w.handshake();
    w.send("FEDERATION_ACK 42\n");
    let (core_index, cmd) = core.upstream.recv_timeout(TIMEOUT).expect("a forwarded command");
    assert_eq!(core_index, 0);
    assert_eq!(cmd, UpstreamCmd::Forward(Bytes::from_static(b"FEDERATION_ACK 42\n")));
}

#[test]
fn a_bad_command_gets_an_error_and_a_close() {
    let core = Core::start(HubConfig::default());
    let mut w = Worker::connect(core.addr);
    w.handshake();
    w.send("RDATA events 5 []\n");
    let rest = String::from_utf8(w.rest()).unwrap();
    assert!(rest.starts_with("ERROR "), "{rest:?}");
    assert_eq!(rest.matches('\n').count(), 1, "{rest:?}");
    // The core shut its write side and waits for our EOF before it forgets the connection.
    assert_eq!(core.snapshot().conns.len(), 1);
    drop(w);
    core.wait_conns(0);
}

#[test]
fn a_stalled_worker_is_evicted_and_a_fast_one_gets_everything() {
    let hub = HubConfig { max_pending_bytes: 1 << 20, ..HubConfig::default() };
    let core = Core::start(hub);
    let mut slow = Worker::connect_small(core.addr);
    let mut fast = Worker::connect(core.addr);
    slow.handshake();
    fast.handshake();
    slow.send("REPLICATE ALL\n");
    fast.send("REPLICATE ALL\n");
    // POSITION for each of the 16 streams.
    for _ in 0..StreamId::COUNT {
        assert!(slow.line().starts_with("POSITION "));
        assert!(fast.line().starts_with("POSITION "));
    }
    // The fast worker reads on its own thread and reports each batch it got; at most two
    // batches (~120 KB) are ever outstanding for it, well under the cap, while the stalled
    // one falls behind by ~18 MB.
    const BATCHES: usize = 300;
    const PER_BATCH: usize = 30;
    let (progress_tx, progress) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        while got.len() < BATCHES * PER_BATCH {
            got.push(fast.line());
            if got.len() % PER_BATCH == 0 {
                let _ = progress_tx.send(got.len() / PER_BATCH);
            }
        }
        got
    });
    let mut want = Vec::new();
    let mut done = 0;
    for b in 0..BATCHES {
        while done + 2 < b {
            done = progress.recv_timeout(TIMEOUT).expect("the fast worker keeps up");
        }
        let text = rdata_lines("events", 2 + (b * PER_BATCH) as i64, PER_BATCH, 2000);
        want.extend(text.split_inclusive('\n').map(str::to_owned));
        core.batch(&text);
    }
    let got = reader.join().unwrap();
    assert!(got == want, "the fast worker got every line in order");
    // The slow worker now drains: whole lines, ending with the eviction notice, then EOF.
    let rest = String::from_utf8(slow.rest()).unwrap();
    assert!(rest.ends_with("ERROR Failed to keep up\n"), "{:?}", &rest[rest.len().saturating_sub(200)..]);
    assert!(rest.split_inclusive('\n').all(|l| l.ends_with('\n')));
    let relayed = rest.split_inclusive('\n').filter(|l| l.starts_with("RDATA")).count();
    assert!(relayed < BATCHES * PER_BATCH, "the slow worker was evicted before the end ({relayed} lines)");
    assert!(rest.split_inclusive('\n').filter(|l| l.starts_with("RDATA")).zip(&want).all(|(a, b)| a == b));
    let snap = core.snapshot();
    assert_eq!(snap.stats.evictions.iter().sum::<u64>(), 1);
}

#[test]
fn shutdown_says_server_shutting_down_and_closes() {
    let core = Core::start(HubConfig::default());
    let mut w = Worker::connect(core.addr);
    w.handshake();
    core.wait_conns(1);
    let inbox = core.inbox.clone();
    let mut core = core;
    let thread = core.thread.take().unwrap();
    inbox.send(CoreMsg::Shutdown);
    let rest = String::from_utf8(w.rest()).unwrap();
    assert_eq!(rest, "ERROR server shutting down\n");
    drop(w);
    let start = Instant::now();
    thread.join().unwrap().unwrap();
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn shutdown_resets_a_worker_that_never_closes_after_the_grace() {
    let core = Core::start(HubConfig::default());
    let mut w = Worker::connect(core.addr);
    w.handshake();
    core.wait_conns(1);
    // The worker reads the ERROR and the EOF but keeps its end open: the core gives up after
    // its 2 s grace and resets it.
    let reader = std::thread::spawn(move || {
        let rest = w.rest();
        (w, rest)
    });
    let took = core.shutdown();
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(4), "{took:?}");
    let (_w, rest) = reader.join().unwrap();
    assert_eq!(String::from_utf8(rest).unwrap(), "ERROR server shutting down\n");
}

#[test]
fn many_workers_all_get_every_line() {
    const WORKERS: usize = 300;
    let core = Core::start(HubConfig::default());
    let mut workers: Vec<Worker> = (0..WORKERS).map(|_| Worker::connect(core.addr)).collect();
    for w in &mut workers {
        w.handshake();
        w.send("REPLICATE caches\n");
    }
    for w in &mut workers {
        assert_eq!(w.line(), "POSITION caches 1\n");
    }
    let text = rdata_lines("caches", 2, 200, 100);
    for chunk in text.split_inclusive('\n').collect::<Vec<_>>().chunks(20) {
        core.batch(&chunk.concat());
    }
    // Every worker also pings, all at once (many small recvs in one turn).
    for w in &mut workers {
        w.send("PING 1\n");
    }
    let want_len = text.len();
    for w in &mut workers {
        let mut got = vec![0u8; want_len];
        w.reader.read_exact(&mut got).unwrap();
        assert!(got == text.as_bytes());
    }
    drop(workers);
    core.wait_conns(0);
    let snap = core.snapshot();
    assert_eq!(snap.stats.accepted, WORKERS as u64);
}
