//! Shared helpers for the integration tests: a test master (a real TCP server in the server
//! role), raw-socket workers, the shared vectors, and a server started in-process.
//!
//! Every server test body lives in [`serve`] as a function taking the [`IoBackend`]; the
//! `serve_tests!` macro instantiates all of them for one backend (`tests/serve_epoll.rs`,
//! `tests/serve_uring.rs`).
#![allow(dead_code)]

pub(crate) mod serve;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use replhub::config::BackoffConfig;
use replhub::config::HubConfig;
use replhub::config::{IoBackend, ServeConfig, SourceConfig};
use replhub::proto::StreamId;
use replhub::server::Server;

/// Failure guard for every wait in these tests (never a synchronisation mechanism).
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// Instantiates every server test of [`serve`] for one backend.
#[macro_export]
macro_rules! serve_tests {
    ($backend:expr) => {
        $crate::serve_tests!(@each $backend;
            handshake_uses_the_upstream_server_name,
            configured_server_name_is_checked_against_the_upstream,
            workers_wait_for_the_upstream_before_their_greeting,
            an_unreachable_master_counts_failed_connects,
            one_core_thread_carries_the_upstream,
            cores_with_no_worker_are_current_for_their_first_one,
            replicate_answers_positions_in_map_order,
            relays_the_sample_to_many_workers_byte_identical,
            filters_by_stream,
            invalid_commands_get_their_policy_outcome,
            slow_worker_is_evicted_and_others_get_everything,
            moderated_cores_share_writes_and_lose_nothing,
            connections_go_to_the_core_with_the_fewest,
            upstream_restart_gives_fresh_positions_before_newer_rdata,
            a_batch_run_cut_by_an_upstream_drop_never_reaches_workers,
            a_fin_after_an_unterminated_fragment_is_connection_done,
            user_sync_is_merged_across_workers,
            forwards_worker_commands_upstream,
            ping_timeout_closes_a_silent_worker,
            shutdown_says_so_to_every_worker,
            metrics_endpoint_renders_a_scrape,
            metrics_scrape_has_synapse_names_and_follows_traffic,
            metrics_kernel_send_queue_rises_for_a_stalled_worker,
            synthetic_mode_serves_rows_as_localhost,
            synthetic_unpaced_stays_responsive_and_bounded,
            a_closed_worker_that_never_closes_is_dropped_after_the_linger,
        );
    };
    (@each $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                common::serve::$name($backend);
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// Logs and the in-process server

/// Logs to the test output (`RUST_LOG=debug cargo test … -- --nocapture` to see them).
pub(crate) fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// A test configuration: port 0, metrics off, two cores, the given backend, upstream mode.
pub(crate) fn upstream_config(io: IoBackend, upstream: SocketAddr) -> ServeConfig {
    let mut config = ServeConfig::new(SourceConfig::Upstream {
        addr: upstream.to_string(),
        client_name: "replhub-test".to_owned(),
    });
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.metrics_listen = None;
    config.threads = 2;
    config.io = io;
    config.hub = HubConfig { ..config.hub };
    config
}

/// Reconnect quickly in tests.
pub(crate) fn fast_backoff() -> BackoffConfig {
    BackoffConfig { initial_ms: 20, max_ms: 200, jitter_percent: 0 }
}

/// Starts a server in-process.
pub(crate) fn start(config: ServeConfig) -> Server {
    init_logs();
    Server::start_with(config, fast_backoff()).expect("server starts")
}

// ---------------------------------------------------------------------------------------------
// Shared vectors

/// `../shared/vectors/<name>`.
pub(crate) fn vector_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors").join(name)
}

/// The RDATA lines of `stream-sample.txt`, each with its `\n`.
pub(crate) fn sample_rdata() -> Vec<Vec<u8>> {
    let text = std::fs::read(vector_path("stream-sample.txt")).expect("stream-sample.txt");
    text.split_inclusive(|b| *b == b'\n').filter(|l| l.starts_with(b"RDATA ")).map(<[u8]>::to_vec).collect()
}

/// How many of `lines` (RDATA) reach workers while the rest is all the upstream sent: those up
/// to the end of the last complete `batch` run (replhub holds an open run until its numbered
/// line arrives).
pub(crate) fn complete_runs(lines: &[Vec<u8>]) -> usize {
    let mut open: std::collections::HashSet<&str> = Default::default();
    let mut done = 0;
    for (i, l) in lines.iter().enumerate() {
        let token = std::str::from_utf8(l).ok().and_then(|t| t.split(' ').nth(2));
        if token == Some("batch") {
            open.insert(rdata_stream(l));
        } else {
            open.remove(rdata_stream(l));
        }
        if open.is_empty() {
            done = i + 1;
        }
    }
    done
}

/// The stream name of an RDATA line.
pub(crate) fn rdata_stream(line: &[u8]) -> &str {
    let s = std::str::from_utf8(line).expect("utf-8");
    s.split(' ').nth(1).expect("stream")
}

/// Positions in map order, all different: `base + i`.
pub(crate) fn positions(base: i64) -> [i64; StreamId::COUNT] {
    std::array::from_fn(|i| base + i as i64)
}

// ---------------------------------------------------------------------------------------------
// The test master

/// Options of a [`TestMaster`].
#[derive(Clone, Debug)]
pub(crate) struct MasterOptions {
    /// The `SERVER` name it announces.
    pub server_name: String,
    /// Send `PING` every this often (a real master sends one every 5 s of silence).
    pub keepalive: Option<Duration>,
}

impl Default for MasterOptions {
    fn default() -> Self {
        Self { server_name: "example.com".to_owned(), keepalive: None }
    }
}

#[derive(Default)]
struct MasterState {
    /// Every line received, with the number of the connection it came on (1-based).
    lines: Vec<(usize, String)>,
    /// Connections accepted so far.
    connections: usize,
    /// Connections whose `REPLICATE ALL` was answered.
    handshakes: usize,
    /// The write half of the current connection.
    current: Option<TcpStream>,
    /// Positions for the next `REPLICATE ALL` answer.
    positions: Option<[i64; StreamId::COUNT]>,
    /// Connections that ended (EOF or error seen by the reader).
    closed: usize,
}

/// A Synapse master stand-in: accepts replhub, greets it (`SERVER`, `PING`), answers
/// `REPLICATE ALL` with 16 `POSITION`s in map order, records every line it receives, and lets
/// the test push raw bytes (RDATA) to the current connection.
pub(crate) struct TestMaster {
    addr: SocketAddr,
    state: Arc<(Mutex<MasterState>, Condvar)>,
    options: MasterOptions,
}

impl TestMaster {
    /// Listens on 127.0.0.1:0 with default options and `positions(100)`.
    pub(crate) fn start() -> Self {
        Self::start_with(MasterOptions::default(), positions(100))
    }

    /// Listens on 127.0.0.1:0.
    pub(crate) fn start_with(options: MasterOptions, pos: [i64; StreamId::COUNT]) -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").expect("bind master"), options, pos)
    }

    /// Serves on an already bound listener (replhub may have dialed it already).
    pub(crate) fn start_on(
        listener: TcpListener,
        options: MasterOptions,
        pos: [i64; StreamId::COUNT],
    ) -> Self {
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new((
            Mutex::new(MasterState { positions: Some(pos), ..MasterState::default() }),
            Condvar::new(),
        ));
        let st = Arc::clone(&state);
        let opts = options.clone();
        thread::Builder::new()
            .name("test-master".to_owned())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { break };
                    let _ = stream.set_nodelay(true);
                    let n = {
                        let (m, cv) = &*st;
                        let mut s = m.lock().expect("lock");
                        s.connections += 1;
                        if let Some(old) = s.current.take() {
                            let _ = old.shutdown(Shutdown::Both);
                        }
                        s.current = stream.try_clone().ok();
                        let greeting = format!("SERVER {}\nPING 1\n", opts.server_name);
                        if let Some(w) = s.current.as_mut() {
                            let _ = w.write_all(greeting.as_bytes());
                        }
                        cv.notify_all();
                        s.connections
                    };
                    let st2 = Arc::clone(&st);
                    thread::spawn(move || master_reader(n, stream, &st2));
                    if let Some(every) = opts.keepalive {
                        let st3 = Arc::clone(&st);
                        thread::spawn(move || loop {
                            thread::sleep(every);
                            let (m, _) = &*st3;
                            let mut s = m.lock().expect("lock");
                            if s.connections != n {
                                return;
                            }
                            let Some(w) = s.current.as_mut() else { return };
                            if w.write_all(b"PING 2\n").is_err() {
                                return;
                            }
                        });
                    }
                }
            })
            .expect("spawn master");
        Self { addr, state, options }
    }

    /// Where replhub should dial.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server name it announces.
    pub(crate) fn server_name(&self) -> &str {
        &self.options.server_name
    }

    fn lock(&self) -> MutexGuard<'_, MasterState> {
        self.state.0.lock().expect("lock")
    }

    /// Waits until `cond` holds on the state (failure guard: [`WAIT`]).
    fn wait(&self, what: &str, cond: impl Fn(&MasterState) -> bool) {
        let (m, cv) = &*self.state;
        let deadline = Instant::now() + WAIT;
        let mut s = m.lock().expect("lock");
        while !cond(&s) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "test master: timed out waiting for {what}; got lines {:?}", s.lines);
            s = cv.wait_timeout(s, left).expect("wait").0;
        }
    }

    /// Waits for the `n`th connection's `REPLICATE ALL` to be answered.
    pub(crate) fn wait_handshakes(&self, n: usize) {
        self.wait(&format!("handshake {n}"), |s| s.handshakes >= n);
    }

    /// Waits until `n` connections have ended.
    pub(crate) fn wait_closed(&self, n: usize) {
        self.wait(&format!("{n} closed connections"), |s| s.closed >= n);
    }

    /// Waits until a received line satisfies `pred`, returning it.
    pub(crate) fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait(what, |s| s.lines.iter().any(|(_, l)| pred(l)));
        self.lines().into_iter().find(|l| pred(l)).expect("found")
    }

    /// Every line received so far (all connections).
    pub(crate) fn lines(&self) -> Vec<String> {
        self.lock().lines.iter().map(|(_, l)| l.clone()).collect()
    }

    /// Writes raw bytes to the current connection.
    pub(crate) fn push(&self, bytes: &[u8]) {
        let mut s = self.lock();
        let w = s.current.as_mut().expect("replhub is connected");
        w.write_all(bytes).expect("push to replhub");
    }

    /// Positions for the next connection's `REPLICATE ALL`.
    pub(crate) fn set_positions(&self, pos: [i64; StreamId::COUNT]) {
        self.lock().positions = Some(pos);
    }

    /// Closes the current connection (both directions).
    pub(crate) fn drop_connection(&self) {
        let mut s = self.lock();
        if let Some(w) = s.current.take() {
            let _ = w.shutdown(Shutdown::Both);
        }
    }
}

fn master_reader(n: usize, stream: TcpStream, st: &Arc<(Mutex<MasterState>, Condvar)>) {
    let mut reader = LineReader::new(stream);
    while let Ok(Some(line)) = reader.line_within(Duration::from_secs(3600)) {
        let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
        let (m, cv) = &**st;
        let mut s = m.lock().expect("lock");
        if text == "REPLICATE ALL" && s.connections == n {
            let pos = s.positions.unwrap_or_else(|| positions(0));
            let mut out = String::new();
            for (i, stream) in StreamId::SEED.iter().enumerate() {
                out.push_str(&format!("POSITION {} {}\n", stream.name(), pos[i]));
            }
            if let Some(w) = s.current.as_mut() {
                let _ = w.write_all(out.as_bytes());
            }
            s.handshakes += 1;
        }
        s.lines.push((n, text));
        cv.notify_all();
    }
    let (m, cv) = &**st;
    m.lock().expect("lock").closed += 1;
    cv.notify_all();
}

// ---------------------------------------------------------------------------------------------
// Line reading with deadlines

/// Reads `\n`-terminated lines from a blocking socket with a deadline per call.
pub(crate) struct LineReader {
    stream: TcpStream,
    buf: VecDeque<u8>,
    eof: bool,
}

impl LineReader {
    /// Wraps a connected socket.
    pub(crate) fn new(stream: TcpStream) -> Self {
        Self { stream, buf: VecDeque::new(), eof: false }
    }

    /// The next line with its `\n`; `Ok(None)` at EOF (a partial last line is returned as is);
    /// `TimedOut` after `timeout`.
    pub(crate) fn line_within(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                return Ok(Some(self.buf.drain(..=pos).collect()));
            }
            if self.eof {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(self.buf.drain(..).collect()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no line in time"));
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut tmp = [0u8; 64 << 10];
            match self.stream.read(&mut tmp) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend(&tmp[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A reset counts as the end of the stream for these tests.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => self.eof = true,
                Err(e) => return Err(e),
            }
        }
    }

    /// The underlying socket.
    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

// ---------------------------------------------------------------------------------------------
// Raw-socket workers

/// `count` workers connected to `addr` one after another with `connect` (such as
/// [`Worker::connect_small_rcvbuf`] for a crowd that will stall), each subscribed to every
/// stream under the name `{prefix}{i}`.
pub(crate) fn subscribed_workers(
    addr: SocketAddr,
    prefix: &str,
    count: usize,
    connect: fn(SocketAddr) -> Worker,
) -> Vec<Worker> {
    (0..count)
        .map(|i| {
            let mut w = connect(addr);
            w.subscribe(&format!("{prefix}{i}"), &["ALL"]);
            w
        })
        .collect()
}

/// One thread per worker that reads `all` in order (RDATA only: `Worker::rdata` panics on
/// anything but RDATA and PING, so an eviction's ERROR fails the reader) and returns the worker.
pub(crate) fn spawn_checking_readers(
    workers: Vec<Worker>,
    all: &std::sync::Arc<Vec<Vec<u8>>>,
) -> Vec<std::thread::JoinHandle<Worker>> {
    workers
        .into_iter()
        .enumerate()
        .map(|(i, mut w)| {
            let all = std::sync::Arc::clone(all);
            std::thread::spawn(move || {
                for (n, want) in all.iter().enumerate() {
                    let got = w.rdata(1).remove(0);
                    assert!(&got == want, "reader{i}: line {n} differs");
                }
                w
            })
        })
        .collect()
}

/// A worker speaking the protocol by hand over a real socket.
pub(crate) struct Worker {
    reader: LineReader,
    writer: TcpStream,
}

impl Worker {
    /// Connects.
    pub(crate) fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect to replhub");
        Self::from_stream(stream)
    }

    /// Connects with a tiny receive buffer (a worker that will stall).
    pub(crate) fn connect_small_rcvbuf(addr: SocketAddr) -> Self {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        socket.connect(&addr.into()).expect("connect");
        Self::from_stream(socket.into())
    }

    fn from_stream(stream: TcpStream) -> Self {
        stream.set_nodelay(true).expect("nodelay");
        let writer = stream.try_clone().expect("clone");
        Self { reader: LineReader::new(stream), writer }
    }

    /// Sends raw bytes.
    pub(crate) fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Sends one line (`\n` appended).
    pub(crate) fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes());
    }

    /// The next line with its `\n`, `None` at EOF; panics after [`WAIT`].
    pub(crate) fn next_raw(&mut self) -> Option<Vec<u8>> {
        match self.reader.line_within(WAIT) {
            Ok(l) => l,
            Err(e) => panic!("worker: no line within {WAIT:?}: {e}"),
        }
    }

    /// The next line without `\n`; panics at EOF or after [`WAIT`].
    pub(crate) fn line(&mut self) -> String {
        let raw = self.next_raw().expect("worker: unexpected EOF");
        String::from_utf8(raw).expect("utf-8").trim_end_matches('\n').to_owned()
    }

    /// The next line that is not a `PING`.
    pub(crate) fn line_skip_ping(&mut self) -> String {
        loop {
            let l = self.line();
            if !l.starts_with("PING ") {
                return l;
            }
        }
    }

    /// The next line, or `None` if nothing arrives within `timeout` (or at EOF).
    pub(crate) fn line_within(&mut self, timeout: Duration) -> Option<String> {
        match self.reader.line_within(timeout) {
            Ok(Some(raw)) => Some(String::from_utf8_lossy(&raw).trim_end_matches('\n').to_owned()),
            Ok(None) => None,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => None,
            Err(e) => panic!("worker: {e}"),
        }
    }

    /// Reads `SERVER <name>` and `PING <ms>`, returning the name.
    pub(crate) fn greeting(&mut self) -> String {
        let server = self.line();
        let name =
            server.strip_prefix("SERVER ").unwrap_or_else(|| panic!("expected SERVER, got {server:?}"));
        let ping = self.line();
        let ms = ping.strip_prefix("PING ").unwrap_or_else(|| panic!("expected PING, got {ping:?}"));
        assert!(ms.parse::<i64>().is_ok(), "PING carries a timestamp: {ping:?}");
        name.to_owned()
    }

    /// Greeting, `NAME`, `REPLICATE <stream>` for each, and the POSITION answers (checked in
    /// order against the streams, skipping PINGs); returns the POSITION lines.
    pub(crate) fn subscribe(&mut self, name: &str, streams: &[&str]) -> Vec<String> {
        self.greeting();
        self.send(&format!("NAME {name}"));
        for s in streams {
            self.send(&format!("REPLICATE {s}"));
        }
        let want: Vec<&str> =
            streams
                .iter()
                .flat_map(|s| {
                    if *s == "ALL" {
                        StreamId::SEED.iter().map(|x| x.name()).collect()
                    } else {
                        vec![*s]
                    }
                })
                .collect();
        let mut got = Vec::new();
        for s in want {
            let l = self.line_skip_ping();
            assert!(l.starts_with(&format!("POSITION {s} ")), "expected POSITION {s}, got {l:?}");
            got.push(l);
        }
        got
    }

    /// Reads until EOF; returns every line (with `\n` stripped, lossy UTF-8).
    pub(crate) fn read_to_eof(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(raw) = self.next_raw() {
            out.push(String::from_utf8_lossy(&raw).trim_end_matches('\n').to_owned());
        }
        out
    }

    /// Collects `n` RDATA lines (raw, with `\n`), skipping PINGs; panics on anything else.
    pub(crate) fn rdata(&mut self, n: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let raw = self.next_raw().unwrap_or_else(|| panic!("EOF after {} of {n} RDATA", out.len()));
            if raw.starts_with(b"PING ") {
                continue;
            }
            assert!(raw.starts_with(b"RDATA "), "expected RDATA, got {:?}", String::from_utf8_lossy(&raw));
            out.push(raw);
        }
        out
    }

    /// Closes the socket.
    pub(crate) fn close(self) {
        let _ = self.writer.shutdown(Shutdown::Both);
    }

    /// The socket (e.g. to set options).
    pub(crate) fn stream(&self) -> &TcpStream {
        &self.writer
    }
}

/// Waits until `cond()` holds, polling every few ms (failure guard: [`WAIT`]).
pub(crate) fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Shuts the server down while `workers` read to EOF: each must end with
/// `ERROR server shutting down` (they also close at once, so the shutdown does not wait).
pub(crate) fn stop(server: Server, workers: Vec<Worker>) {
    let stopping = thread::spawn(move || server.shutdown());
    for (i, mut w) in workers.into_iter().enumerate() {
        let lines = w.read_to_eof();
        assert_eq!(
            lines.last().map(String::as_str),
            Some("ERROR server shutting down"),
            "worker {i}: {lines:?}"
        );
    }
    stopping.join().expect("no panic").expect("clean shutdown");
}
