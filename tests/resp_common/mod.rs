//! Helpers for the Redis-mode integration tests: a replhub started in-process in Redis mode
//! alone, a raw RESP client over a real loopback socket, and a real `redis-server` to compare
//! against.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use replhub::config::{IoBackend, ServeConfig, SourceConfig};
use replhub::resp::RespConfig;
use replhub::server::Server;

/// Failure guard for every wait (never a synchronisation mechanism).
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// Both backends, for tests that run on each.
pub(crate) const BACKENDS: [IoBackend; 2] = [IoBackend::Epoll, IoBackend::Uring];

/// Declares, for each named `fn(IoBackend)` of the calling test file, one `#[test]` on each
/// backend: `epoll::<name>` and `uring::<name>`.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod epoll {
            $( #[test] fn $name() { super::$name($crate::resp_common::BACKENDS[0]); } )*
        }
        mod uring {
            $( #[test] fn $name() { super::$name($crate::resp_common::BACKENDS[1]); } )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_both_backends;

/// A configuration bridged to the real Redis `upstream` names (`--upstream-redis`): RESP on a
/// free port, the channels it bridges, metrics off, two cores on `io`.
pub(crate) fn bridge_config(io: IoBackend, upstream: replhub::config::RedisUpstream) -> ServeConfig {
    let mut config = ServeConfig::new(SourceConfig::Redis(upstream.clone()));
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.resp_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.resp.upstream_channels = upstream.channels;
    config.metrics_listen = None;
    config.threads = 2;
    config.io = io;
    config
}

/// Reads `n` messages on `sn` published as `<local|remote> <seq>`; checks each publisher's
/// order and returns how many came from each.
pub(crate) fn read_ordered(c: &mut Client, n: usize) -> [usize; 2] {
    let mut next = [0usize; 2];
    for _ in 0..n {
        let (channel, payload) = message(&c.read());
        assert_eq!(channel, "sn");
        let (who, seq) = payload.split_once(' ').expect("who seq");
        let who = usize::from(who == "remote");
        assert_eq!(seq.parse::<usize>().expect("seq"), next[who], "publisher {who} out of order");
        next[who] += 1;
    }
    next
}

/// How many subscribers of `sn` the Redis behind `probe` counts (`PUBSUB NUMSUB sn`).
pub(crate) fn numsub(probe: &mut Client) -> Reply {
    probe.call(&["PUBSUB", "NUMSUB", "sn"])
}

/// Waits until the real Redis behind `probe` counts `n` subscribers on `channel`.
pub(crate) fn wait_numsub(probe: &mut Client, channel: &str, n: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = probe.call(&["PUBSUB", "NUMSUB", channel]);
        if r == Reply::Array(vec![Reply::bulk(channel), Reply::Int(n)]) {
            return;
        }
        assert!(Instant::now() < deadline, "never {n} subscribers on the real Redis: {r:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Across a bridge, `n` messages on `sn` from each side: `local <i>` published on replhub
/// (`local_pub`, whose one local receiver is `subs[0]`) and `remote <i>` on the real Redis
/// (`remote_pub`; it counts replhub as one subscriber, and `subs[1]`). Every subscriber gets
/// all `2n`, each publisher's in order, and nothing twice: the next thing each sees is the
/// answer to its PING.
pub(crate) fn publish_both_ways(
    local_pub: &mut Client,
    remote_pub: &mut Client,
    subs: [&mut Client; 2],
    n: usize,
) {
    for i in 0..n {
        assert_eq!(local_pub.call(&["PUBLISH", "sn", &format!("local {i}")]), Reply::Int(1));
        assert_eq!(remote_pub.call(&["PUBLISH", "sn", &format!("remote {i}")]), Reply::Int(2));
    }
    let [local_sub, remote_sub] = subs;
    assert_eq!(read_ordered(local_sub, 2 * n), [n, n]);
    assert_eq!(read_ordered(remote_sub, 2 * n), [n, n]);
    for c in [local_sub, remote_sub] {
        assert_eq!(c.call(&["PING"]), Reply::Array(vec![Reply::bulk("pong"), Reply::bulk("")]));
    }
}

/// SUBSCRIBEs `c` to `ch`, its first subscription.
pub(crate) fn subscribe_one(c: &mut Client, ch: &str) {
    assert_eq!(
        c.call(&["SUBSCRIBE", ch]),
        Reply::Array(vec![Reply::bulk("subscribe"), Reply::bulk(ch), Reply::Int(1)])
    );
}

/// Starts replhub as a pure pub/sub broker: no upstream, RESP on a free port, `threads` cores.
pub(crate) fn start(io: IoBackend, threads: usize, resp: RespConfig) -> Server {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    let mut config = ServeConfig::new(SourceConfig::None);
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.resp_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.resp = resp;
    config.metrics_listen = None;
    config.threads = threads;
    config.io = io;
    Server::start(config).expect("server starts")
}

/// A RESP reply, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `+text`.
    Simple(String),
    /// `-text`.
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$n bytes`, or nil.
    Bulk(Option<Vec<u8>>),
    /// `*n ...`.
    Array(Vec<Self>),
}

impl Reply {
    /// A bulk reply's text.
    pub(crate) fn bulk(s: &str) -> Self {
        Self::Bulk(Some(s.as_bytes().to_vec()))
    }
}

/// A raw RESP client.
pub(crate) struct Client {
    pub(crate) stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects (with a read timeout as a failure guard).
    pub(crate) fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Self { stream, buf: Vec::new() }
    }

    /// Encodes a command as an array of bulk strings.
    pub(crate) fn encode(args: &[&[u8]]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// Sends a command.
    pub(crate) fn send(&mut self, args: &[&str]) {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.stream.write_all(&Self::encode(&args)).expect("write");
    }

    /// Sends a command and reads its reply.
    pub(crate) fn call(&mut self, args: &[&str]) -> Reply {
        self.send(args);
        self.read()
    }

    /// Reads one reply.
    pub(crate) fn read(&mut self) -> Reply {
        loop {
            if let Some((reply, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return reply;
            }
            let mut chunk = [0u8; 65536];
            let n = match self.stream.read(&mut chunk) {
                // A signal (a child process of another test exiting) is not an answer.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => other.expect("read a reply"),
            };
            assert!(
                n > 0,
                "the server closed the connection; unparsed: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads one reply if one arrives within `limit`, else `None` (to count what comes in a
    /// window, never to wait for something expected).
    pub(crate) fn read_within(&mut self, limit: Duration) -> Option<Reply> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((reply, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Some(reply);
            }
            let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
            self.stream.set_read_timeout(Some(left)).expect("timeout");
            let mut chunk = [0u8; 65536];
            let res = self.stream.read(&mut chunk);
            self.stream.set_read_timeout(Some(WAIT)).expect("timeout");
            match res {
                Ok(0) => panic!("the server closed the connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    return None
                }
                Err(e) => panic!("read a reply: {e}"),
            }
        }
    }

    /// Reads until the server closes; returns every byte.
    pub(crate) fn read_to_eof(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        self.stream.read_to_end(&mut out).expect("read to EOF");
        out
    }
}

/// Parses one reply from the front of `buf`: the reply and the bytes it used.
pub(crate) fn parse(buf: &[u8]) -> Option<(Reply, usize)> {
    let nl = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..nl]).expect("utf-8 header");
    let rest = nl + 2;
    match buf.first()? {
        b'+' => Some((Reply::Simple(line.to_owned()), rest)),
        b'-' => Some((Reply::Error(line.to_owned()), rest)),
        b':' => Some((Reply::Int(line.parse().expect("int")), rest)),
        b'$' => {
            let n: i64 = line.parse().expect("len");
            if n < 0 {
                return Some((Reply::Bulk(None), rest));
            }
            let n = n as usize;
            if buf.len() < rest + n + 2 {
                return None;
            }
            Some((Reply::Bulk(Some(buf[rest..rest + n].to_vec())), rest + n + 2))
        }
        b'*' => {
            let n: usize = line.parse().expect("count");
            let mut at = rest;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                let (r, used) = parse(&buf[at..])?;
                items.push(r);
                at += used;
            }
            Some((Reply::Array(items), at))
        }
        other => panic!("not a RESP reply: {:?}", char::from(*other)),
    }
}

/// A `message` delivery's channel and payload.
pub(crate) fn message(r: &Reply) -> (String, String) {
    match r {
        Reply::Array(items) if items.len() == 3 && items[0] == Reply::bulk("message") => {
            let text = |r: &Reply| match r {
                Reply::Bulk(Some(b)) => String::from_utf8(b.clone()).expect("utf-8"),
                other => panic!("not a bulk: {other:?}"),
            };
            (text(&items[1]), text(&items[2]))
        }
        other => panic!("not a message: {other:?}"),
    }
}

/// A real `redis-server` on a free loopback port, killed on drop.
pub(crate) struct RedisServer {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl RedisServer {
    /// Starts `redis-server` with no persistence and `extra` arguments on a free port. Fails
    /// the test with a clear message if it is not installed.
    pub(crate) fn start(extra: &[&str]) -> Self {
        on_a_free_port("redis-server", |port| Self::try_start_on(port, extra))
    }

    /// As [`RedisServer::start`], on `port` (to restart one where its clients expect it).
    pub(crate) fn start_on(port: u16, extra: &[&str]) -> Self {
        Self::try_start_on(port, extra)
            .unwrap_or_else(|| panic!("redis-server could not listen on 127.0.0.1:{port}: the port is taken"))
    }

    /// Starts redis-server on `port` and waits until it listens there; `None` if the port was
    /// taken ([`wait_own_listener`]).
    pub(crate) fn try_start_on(port: u16, extra: &[&str]) -> Option<Self> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        cmd.args(extra).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run redis-server ({e}): these tests compare replhub with a real Redis; install it \
                 (apt-get install -y redis-server)"
            )
        });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        // Killed on drop if it is not ours to keep.
        let mut server = Self { child, addr };
        wait_own_listener(&mut server.child, port).then_some(server)
    }
}

/// Runs `try_port` on free ports until it returns something, up to 5 times. A port found free
/// can be taken by another test's server (tests run in parallel, each starting its own) before
/// the process meant for it binds it: `try_port` then gives `None` ([`wait_own_listener`]).
pub(crate) fn on_a_free_port<T>(what: &str, mut try_port: impl FnMut(u16) -> Option<T>) -> T {
    const TRIES: usize = 5;
    for _ in 0..TRIES {
        if let Some(started) = try_port(free_port()) {
            return started;
        }
    }
    panic!("{what} found its port taken {TRIES} times in a row");
}

/// Waits until `child` listens on 127.0.0.1:`port`: true once a connection there is accepted
/// and the listener is the child's ([`listened_by`]); false if the child exits first (it could
/// not bind) or another process answers there.
pub(crate) fn wait_own_listener(child: &mut Child, port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + WAIT;
    loop {
        if child.try_wait().expect("the child's status").is_some() {
            return false;
        }
        if TcpStream::connect(addr).is_ok() {
            return listened_by(child.id(), port);
        }
        assert!(Instant::now() < deadline, "nothing listened on {addr} within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether process `pid` listens on 127.0.0.1:`port` (or on every IPv4 address there): its
/// descriptors include the listening socket `/proc/net/tcp` names for that port.
pub(crate) fn listened_by(pid: u32, port: u16) -> bool {
    const LISTEN: &str = "0A";
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else { return false };
    let want = [format!("0100007F:{port:04X}"), format!("00000000:{port:04X}")];
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 9 && want.iter().any(|w| w == f[1]) && f[3] == LISTEN)
                .then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// A port free right now on 127.0.0.1.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Sends `bytes` on a fresh connection, then reads until the server closes (the script ends
/// with QUIT or a protocol error).
pub(crate) fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut c = Client::connect(addr);
    c.stream.write_all(bytes).expect("write");
    c.read_to_eof()
}

/// `/metrics` as text.
pub(crate) fn scrape(addr: SocketAddr) -> String {
    let mut http = TcpStream::connect(addr).expect("connect");
    http.set_read_timeout(Some(WAIT)).expect("timeout");
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
    let mut out = String::new();
    http.read_to_string(&mut out).expect("response");
    out
}

/// Polls `/metrics` until it has `line`.
pub(crate) fn wait_metric(addr: SocketAddr, line: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if scrape(addr).lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "/metrics never showed {line:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
