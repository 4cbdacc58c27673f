//! The publisher side, one design for both targets: lines from [`payload`] are generated in
//! chunks into one buffer with the current time in each, and written with one blocking
//! `write_all` per chunk. Pacing (`--rate`) and a window of lines in flight (published but not
//! yet received by the slowest live subscriber) decide how many lines each chunk holds; the
//! window keeps "max rate" honest: as fast as the server delivers, never queueing without bound.
//!
//! For replhub the publisher is a tiny replication *master* on a loopback port: replhub dials it
//! (`--upstream`), gets `SERVER` and a `POSITION` per stream, then the RDATA lines: real TCP in,
//! replhub, real TCP out. For Redis each line (without `\n`) is the payload of a pipelined
//! `PUBLISH <stream> <line>`; a second thread reads the integer replies.
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{payload, resp, Shared};
use crate::proto::StreamId;

/// At most this many lines per write.
const CHUNK_LINES: u64 = 256;
/// Give up when the window stays full (no subscriber progress) this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The server name the load test's master announces.
pub(super) const SERVER_NAME: &str = "loadtest.replhub";

/// How long to publish.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    /// For this many seconds.
    Seconds(f64),
    /// This many lines in all.
    Messages(u64),
}

/// What to publish.
#[derive(Clone, Debug)]
pub(super) struct PubPlan {
    pub streams: Vec<StreamId>,
    pub size: usize,
    /// Lines per second; 0 = as fast as the window allows.
    pub rate: u64,
    pub limit: Limit,
    /// Most lines published but not received by the slowest live subscriber.
    pub window: u64,
}

/// What was published.
#[derive(Clone, Debug, Default)]
pub(super) struct Published {
    pub lines: u64,
    /// The last token of each stream (0 = none published).
    pub tokens: [u64; StreamId::COUNT],
    pub start_ns: u64,
    pub end_ns: u64,
    /// Why publishing stopped early, if it did.
    pub error: Option<String>,
}

/// Where chunks go: frames lines for its target and writes them.
pub(super) trait Sink {
    /// Appends one line (framed for the target) to `buf`.
    fn append(&mut self, buf: &mut Vec<u8>, stream: StreamId, token: u64, ts_ns: u64, size: usize);
    /// Writes a chunk.
    fn write(&mut self, buf: &[u8]) -> io::Result<()>;
}

/// Publishes per `plan` until the limit (or `shared.abort`, or an error, which is recorded in
/// [`Published::error`] next to what was published before it).
pub(super) fn publish(sink: &mut dyn Sink, plan: &PubPlan, shared: &Shared) -> Published {
    let mut out = Published::default();
    if let Err(e) = publish_into(sink, plan, shared, &mut out) {
        out.error = Some(e.to_string());
    }
    out.end_ns = shared.clock.now_ns();
    out
}

fn publish_into(sink: &mut dyn Sink, plan: &PubPlan, shared: &Shared, out: &mut Published) -> io::Result<()> {
    let clock = shared.clock;
    let mut buf = Vec::with_capacity((CHUNK_LINES as usize + 1) * (plan.size + 64));
    let max_lines = match plan.limit {
        Limit::Messages(m) => m,
        Limit::Seconds(_) => u64::MAX,
    };
    let start = clock.now_ns();
    let end = match plan.limit {
        Limit::Seconds(s) => start.saturating_add((s * 1e9) as u64),
        Limit::Messages(_) => u64::MAX,
    };
    out.start_ns = start;
    let mut rr = 0usize;
    let mut floor = 0u64;
    let mut progress_at = Instant::now();
    loop {
        let now = clock.now_ns();
        if now >= end || out.lines >= max_lines || shared.abort.load(Ordering::Relaxed) {
            break;
        }
        let mut allowed = max_lines - out.lines;
        if plan.rate > 0 {
            let due = (u128::from(plan.rate) * u128::from(now - start) / 1_000_000_000) as u64 + 1;
            allowed = allowed.min(due.saturating_sub(out.lines));
        }
        let want = allowed.min(CHUNK_LINES);
        if out.lines + want > floor.saturating_add(plan.window) {
            match shared.slowest_received() {
                Some(f) => {
                    if f > floor {
                        progress_at = Instant::now();
                    }
                    floor = f;
                }
                None if shared.subscribers == 0 => floor = u64::MAX / 2,
                None => {
                    return Err(io::Error::other("every subscriber is gone"));
                }
            }
        }
        let room = floor.saturating_add(plan.window).saturating_sub(out.lines);
        let n = want.min(room);
        if n == 0 {
            if room == 0 && progress_at.elapsed() > STALL_TIMEOUT {
                return Err(io::Error::other(format!(
                    "no subscriber progress for {STALL_TIMEOUT:?} with {} lines in flight",
                    plan.window
                )));
            }
            let wait = if allowed == 0 && plan.rate > 0 {
                // Until the next line is due (at most 1 ms, to look at the clock again).
                let next = start + out.lines * 1_000_000_000 / plan.rate;
                Duration::from_nanos(next.saturating_sub(now).clamp(1_000, 1_000_000))
            } else {
                Duration::from_micros(20)
            };
            std::thread::sleep(wait);
            continue;
        }
        buf.clear();
        let ts = clock.now_ns();
        for _ in 0..n {
            let stream = plan.streams[rr];
            rr = (rr + 1) % plan.streams.len();
            let token = &mut out.tokens[stream.index()];
            *token += 1;
            sink.append(&mut buf, stream, *token, ts, plan.size);
        }
        sink.write(&buf)?;
        out.lines += n;
        shared.published.store(out.lines, Ordering::Relaxed);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// replhub: a tiny master

/// The load test's master: a listener replhub dials.
pub(super) struct Master {
    listener: TcpListener,
}

impl Master {
    /// Listens on a free loopback port.
    pub(super) fn bind() -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener })
    }

    /// Where replhub should connect.
    pub(super) fn addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Waits (up to `timeout`, or until `give_up` says so) for replhub to connect, sends the
    /// handshake (`SERVER`, then `POSITION <stream> 0` for all 16 streams in map order) and
    /// starts a thread that reads and discards what replhub sends (PINGs, forwarded commands).
    pub(super) fn accept(
        &self,
        timeout: Duration,
        give_up: &dyn Fn() -> Option<String>,
    ) -> anyhow::Result<(ReplhubSink, JoinHandle<()>)> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(why) = give_up() {
                        anyhow::bail!("the hub did not connect to the load test's master: {why}");
                    }
                    if Instant::now() >= deadline {
                        anyhow::bail!("the hub did not connect to the load test's master within {timeout:?}");
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        let mut hello = format!("SERVER {SERVER_NAME}\n");
        for s in StreamId::ALL {
            hello.push_str(&format!("POSITION {} 0\n", s.name()));
        }
        (&stream).write_all(hello.as_bytes())?;
        let mut reader = stream.try_clone()?;
        let drain = std::thread::Builder::new().name("lt-master-rd".to_owned()).spawn(move || {
            let mut sink = [0u8; 16 << 10];
            while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
        })?;
        Ok((ReplhubSink { stream }, drain))
    }
}

/// Writes RDATA lines to replhub's upstream connection.
pub(super) struct ReplhubSink {
    stream: TcpStream,
}

impl ReplhubSink {
    /// Closes the connection (replhub sees its upstream go away).
    pub(super) fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl Sink for ReplhubSink {
    fn append(&mut self, buf: &mut Vec<u8>, stream: StreamId, token: u64, ts_ns: u64, size: usize) {
        payload::write_line(buf, stream, token, ts_ns, size);
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        self.stream.write_all(buf)
    }
}

// ---------------------------------------------------------------------------------------------
// Redis: pipelined PUBLISH

/// Publishes to Redis; a thread counts the replies.
pub(super) struct RedisSink {
    stream: TcpStream,
    line: Vec<u8>,
}

/// What the reply reader saw.
#[derive(Clone, Debug, Default)]
pub(super) struct Replies {
    /// PUBLISH replies read.
    pub count: u64,
    /// The sum of their receiver counts.
    pub receivers: u64,
    /// An error reply or a broken connection.
    pub error: Option<String>,
}

impl RedisSink {
    /// Connects, and starts the reply reader; it stops after `expect()` replies (once that is
    /// known), at EOF, or at `stop`.
    pub(super) fn connect(
        addr: SocketAddr,
        expect: Arc<std::sync::atomic::AtomicU64>,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> io::Result<(Self, JoinHandle<Replies>)> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        let mut reader = stream.try_clone()?;
        reader.set_read_timeout(Some(Duration::from_millis(50)))?;
        let handle = std::thread::Builder::new().name("lt-pub-replies".to_owned()).spawn(move || {
            let mut r = Replies::default();
            let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
            let mut chunk = vec![0u8; 64 << 10];
            while r.count < expect.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                match reader.read(&mut chunk) {
                    Ok(0) => {
                        r.error.get_or_insert_with(|| "redis closed the publisher's connection".into());
                        break;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                        continue
                    }
                    Err(e) => {
                        r.error.get_or_insert_with(|| e.to_string());
                        break;
                    }
                }
                let mut used = 0;
                loop {
                    match resp::parse(&buf[used..]) {
                        Ok(Some((frame, n))) => {
                            used += n;
                            if let resp::Frame::Int(i) = frame {
                                r.count += 1;
                                r.receivers += i.max(0) as u64;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            r.error.get_or_insert_with(|| e.to_string());
                            return r;
                        }
                    }
                }
                buf.drain(..used);
            }
            r
        })?;
        Ok((Self { stream, line: Vec::with_capacity(1024) }, handle))
    }
}

impl Sink for RedisSink {
    fn append(&mut self, buf: &mut Vec<u8>, stream: StreamId, token: u64, ts_ns: u64, size: usize) {
        self.line.clear();
        payload::write_line(&mut self.line, stream, token, ts_ns, size);
        let body = &self.line[..self.line.len() - 1];
        resp::write_publish_head(buf, stream.name().as_bytes(), body.len());
        buf.extend_from_slice(body);
        buf.extend_from_slice(b"\r\n");
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        self.stream.write_all(buf)
    }
}
