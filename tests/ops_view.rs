//! The operator's view end to end over real loopback: `/connections` of a running server with
//! real workers (the client library, and a raw worker that stops reading), `/healthz` before
//! and after the upstream goes away, and `replhub top` (the binary) in a pseudo-terminal,
//! read back through a terminal emulator.
// Integration tests wait for real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::serve::http_get;
use common::{eventually, init_logs, positions, start, upstream_config, TestMaster, Worker, WAIT};
use replhub::client::{Client, ClientOptions, Event};
use replhub::config::{IoBackend, ServeConfig, SourceConfig};
use replhub::proto::StreamId;
use replhub::server::Server;
use serde_json::Value;

/// `/connections` with `query`, parsed (a 200 is required).
fn connections(server: &Server, query: &str) -> Value {
    let (status, body) =
        http_get(server.metrics_addr().expect("metrics on"), &format!("/connections{query}"));
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The connection named `name` in a page.
fn by_name<'a>(page: &'a Value, name: &str) -> &'a Value {
    page["connections"]
        .as_array()
        .expect("connections array")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no connection {name} in {page:#}"))
}

/// Workers on the client library that read everything, on a thread of their own; each counts
/// the RDATA it received. They stop at the server's close, or at the next event once dropped
/// (the thread is not joined: a reader may wait for a line that never comes).
struct Readers {
    received: Vec<Arc<AtomicU64>>,
    locals: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
}

impl Readers {
    fn start(addr: SocketAddr, workers: &[(&str, &[&str])]) -> Self {
        let received: Vec<Arc<AtomicU64>> = workers.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let specs: Vec<(String, Vec<String>)> = workers
            .iter()
            .map(|(n, s)| ((*n).to_owned(), s.iter().map(|x| (*x).to_owned()).collect()))
            .collect();
        let (counts, stopping) = (received.clone(), Arc::clone(&stop));
        thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for ((name, streams), count) in specs.into_iter().zip(counts) {
                    let options = ClientOptions { name, streams, ..ClientOptions::default() };
                    let mut client = Client::connect(addr, options).await.expect("client connects");
                    tx.send(client.local_addr().expect("local addr")).expect("report");
                    let stopping = Arc::clone(&stopping);
                    tasks.push(tokio::spawn(async move {
                        while let Ok(Some(event)) = client.next().await {
                            if matches!(event, Event::Rdata { .. }) {
                                count.fetch_add(1, Ordering::SeqCst);
                            }
                            if stopping.load(Ordering::SeqCst) {
                                return;
                            }
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        let locals = (0..workers.len()).map(|_| rx.recv_timeout(WAIT).expect("client connected")).collect();
        Self { received, locals, stop }
    }

    fn count(&self, i: usize) -> u64 {
        self.received[i].load(Ordering::SeqCst)
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `n` RDATA lines of `events` from `first` on, each about `size` bytes.
fn events(first: i64, n: usize, size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let token = first + i as i64;
        out.extend_from_slice(
            format!("RDATA events {token} [\"$e{token}\", \"{:>size$}\"]\n", "x").as_bytes(),
        );
    }
    out
}

#[test]
fn connections_lists_every_worker_with_what_it_was_sent_epoll() {
    connections_lists_every_worker_with_what_it_was_sent(IoBackend::Epoll);
}

/// The io_uring driver reads the peer address and kernel queues through its own sockets.
#[test]
fn connections_lists_every_worker_with_what_it_was_sent_uring() {
    connections_lists_every_worker_with_what_it_was_sent(IoBackend::Uring);
}

fn connections_lists_every_worker_with_what_it_was_sent(io: IoBackend) {
    let master = TestMaster::start();
    let mut config = upstream_config(io, master.addr());
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.worker_sndbuf = 4096;
    let server = start(config);
    master.wait_handshakes(1);

    let readers = Readers::start(server.local_addr(), &[("synchrotron1", &["events", "typing"])]);
    let mut stalled = Worker::connect_small_rcvbuf(server.local_addr());
    stalled.subscribe("stalled_worker", &["events"]);
    eventually("both workers subscribed", || {
        let page = connections(&server, "");
        page["total"] == 2
            && page["connections"].as_array().is_some_and(|cs| cs.iter().all(|c| c["state"] == "subscribed"))
    });

    // 200 lines, then 2000 more (about 1 MB): the reader takes them all, the stalled worker
    // stops reading after its greeting, so most of it stays behind in the hub.
    master.push(&events(101, 200, 400));
    eventually("the reader got the first lines", || readers.count(0) == 200);
    eventually("the hub counted them", || {
        by_name(&connections(&server, ""), "synchrotron1")["lines_delivered"] == 200
    });
    master.push(&events(301, 2000, 400));
    eventually("the reader got everything", || readers.count(0) == 2200);
    // With io_uring the core may see the write's completion just after the reader has the bytes.
    eventually("the hub counted every line", || {
        by_name(&connections(&server, ""), "synchrotron1")["lines_delivered"] == 2200
    });
    let page = connections(&server, "?sort=backlog");
    assert_eq!(page["upstream"]["mode"], "upstream");
    assert_eq!(page["upstream"]["connected"], true);
    assert_eq!((page["cores"].as_u64(), page["cores_answered"].as_u64()), (Some(2), Some(2)));
    assert_eq!((page["total"].as_u64(), page["num_connections"].as_u64()), (Some(2), Some(2)));
    assert_eq!((page["offset"].as_u64(), page["limit"].as_u64()), (Some(0), Some(1024)));
    assert!(page["now"].as_str().is_some_and(|t| t.ends_with('Z') && t.contains('T')), "{page:#}");
    assert!(page["totals"]["lines_delivered"].as_u64() >= Some(2200), "{page:#}");

    // Sorted by backlog, the stalled worker comes first.
    let first = &page["connections"][0];
    assert_eq!(first["name"], "stalled_worker", "{page:#}");
    assert!(first["backlog_bytes"].as_u64() > Some(100_000), "{first:#}");
    assert!(first["backlogged_ms"].is_u64(), "{first:#}");
    assert!(first["pending_lines"].as_u64() > Some(100), "{first:#}");
    assert_eq!(first["peer"], stalled.stream().local_addr().expect("addr").to_string());
    assert_eq!(first["streams"], serde_json::json!(["events"]));
    // A raw worker that never sent PING.
    assert_eq!(first["last_ping_ago_ms"], Value::Null);

    let reader = by_name(&page, "synchrotron1");
    assert_eq!(reader["peer"], readers.locals[0].to_string());
    assert_eq!(reader["transport"], "tcp");
    assert_eq!(reader["streams"], serde_json::json!(["events", "typing"]));
    assert_eq!(reader["lines_delivered"], 2200);
    assert!(reader["bytes_delivered"].as_u64() > Some(2200 * 400), "{reader:#}");
    assert_eq!(reader["backlog_bytes"], 0);
    assert_eq!(reader["backlogged_ms"], Value::Null);
    assert_eq!(reader["state"], "subscribed");
    assert_eq!(reader["close_reason"], Value::Null);
    // The client library sends PING as soon as it connects.
    assert!(reader["last_ping_ago_ms"].is_u64(), "{reader:#}");
    assert!(reader["core"].as_u64() < Some(2));
    assert!(reader["cid"].as_str().is_some_and(|c| c.contains('.')), "{reader:#}");
    assert!(reader["connected_since"].as_str().is_some_and(|t| t.starts_with("20") && t.ends_with('Z')));
    assert!(reader["uptime_ms"].is_u64() && reader["uptime"].is_string(), "{reader:#}");

    // Pages: by name, one at a time.
    let second = connections(&server, "?sort=name&limit=1&offset=1");
    assert_eq!((second["num_connections"].as_u64(), second["total"].as_u64()), (Some(1), Some(2)));
    assert_eq!(second["connections"][0]["name"], "synchrotron1");
    assert_eq!(second["sort"], "name");

    // Bad parameters are refused with a reason, without asking the cores.
    let addr = server.metrics_addr().expect("metrics on");
    let (status, body) = http_get(addr, "/connections?sort=colour");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert!(body.contains("sort=\"colour\" is not a sort key"), "{body}");
    let (status, body) = http_get(addr, "/connections?limit=lots");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert!(body.contains("limit=\"lots\""), "{body}");

    drop(readers);
    stalled.close();
    server.shutdown().expect("clean shutdown");
}

/// A master that serves one connection (greeting, POSITIONs for `REPLICATE ALL`) and goes
/// away, listener and all, when told to: replhub's reconnects are then refused.
fn one_shot_master() -> (SocketAddr, std::sync::mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (go_away, gone) = std::sync::mpsc::channel::<()>();
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream.write_all(b"SERVER example.com\nPING 1\n").expect("greet");
        let mut reader = common::LineReader::new(stream.try_clone().expect("clone"));
        while let Ok(Some(line)) = reader.line_within(WAIT) {
            if line == b"REPLICATE ALL\n" {
                let pos = positions(100);
                let out: String = StreamId::SEED
                    .iter()
                    .enumerate()
                    .map(|(i, s)| format!("POSITION {} {}\n", s.name(), pos[i]))
                    .collect();
                stream.write_all(out.as_bytes()).expect("positions");
                break;
            }
        }
        let _ = gone.recv();
        drop(listener);
        let _ = stream.shutdown(std::net::Shutdown::Both);
    });
    (addr, go_away)
}

#[test]
fn healthz_is_ok_until_the_upstream_stays_away_past_the_grace() {
    const GRACE: Duration = Duration::from_millis(600);
    let (master, go_away) = one_shot_master();
    let mut config = upstream_config(IoBackend::Epoll, master);
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.health_upstream_grace_ms = GRACE.as_millis() as u64;
    let server = start(config);
    let addr = server.metrics_addr().expect("metrics on");
    eventually("the upstream is up", || connections(&server, "")["upstream"]["connected"] == true);
    assert_eq!(http_get(addr, "/healthz"), ("HTTP/1.1 200 OK".to_owned(), "ok\n".to_owned()));

    let dropped = Instant::now();
    go_away.send(()).expect("master still there");
    eventually("the upstream is seen down", || connections(&server, "")["upstream"]["connected"] == false);
    let (status, body) = loop {
        let (status, body) = http_get(addr, "/healthz");
        if status != "HTTP/1.1 200 OK" || dropped.elapsed() > WAIT {
            break (status, body);
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
    assert!(body.starts_with("upstream disconnected for "), "{body}");
    // Not before the grace: the link noticed the drop after we made it.
    assert!(dropped.elapsed() >= GRACE, "503 after {:?}", dropped.elapsed());
    let page = connections(&server, "");
    assert!(page["upstream"]["down_for_ms"].as_u64() >= Some(GRACE.as_millis() as u64), "{page:#}");
    server.shutdown().expect("clean shutdown");
}

/// A synthetic-mode server with metrics on, one core.
fn synthetic_server(rate: u64) -> Server {
    init_logs();
    let mut config = ServeConfig::new(SourceConfig::Synthetic { rate, line_size: None });
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.threads = 1;
    config.io = IoBackend::Epoll;
    config.health_upstream_grace_ms = 0;
    config.worker_sndbuf = 4096;
    Server::start(config).expect("server starts")
}

/// The binary's `top` in a pseudo-terminal of 80x24, its screen kept by a terminal emulator.
struct TopInPty {
    screen: Arc<Mutex<vt100::Parser>>,
    writer: Box<dyn Write + Send>,
    child: Box<dyn portable_pty::Child + Send + Sync>,
    _master: Box<dyn portable_pty::MasterPty + Send>,
}

impl TopInPty {
    fn spawn(metrics: SocketAddr) -> Self {
        use portable_pty::{native_pty_system, CommandBuilder, PtySize};
        let pair = native_pty_system()
            .openpty(PtySize { rows: 24, cols: 80, pixel_width: 0, pixel_height: 0 })
            .expect("openpty");
        let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_replhub"));
        cmd.args(["top", "--metrics", &metrics.to_string(), "--interval", "200ms"]);
        cmd.env("TERM", "xterm-256color");
        let child = pair.slave.spawn_command(cmd).expect("spawn replhub top");
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().expect("pty reader");
        let writer = pair.master.take_writer().expect("pty writer");
        let screen = Arc::new(Mutex::new(vt100::Parser::new(24, 80, 0)));
        let parser = Arc::clone(&screen);
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                parser.lock().expect("lock").process(&buf[..n]);
            }
        });
        Self { screen, writer, child, _master: pair.master }
    }

    fn contents(&self) -> String {
        self.screen.lock().expect("lock").screen().contents()
    }

    /// Waits until the screen satisfies `cond`; returns it.
    fn wait_for(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.contents();
            if cond(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; screen:\n{text}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit; its exit status.
    fn wait_exit(&mut self) -> portable_pty::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("replhub top did not exit; screen:\n{}", self.contents());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn top_in_a_terminal_shows_workers_and_rates_and_quits_on_q() {
    let server = synthetic_server(2000);
    let metrics = server.metrics_addr().expect("metrics on");
    // Synthetic mode is always healthy.
    assert_eq!(http_get(metrics, "/healthz").0, "HTTP/1.1 200 OK");
    let readers = Readers::start(
        server.local_addr(),
        &[("synchrotron1", &["ALL"]), ("federation_sender1", &["events", "federation"])],
    );
    eventually("both workers receive", || readers.count(0) > 0 && readers.count(1) > 0);
    // A worker that stops reading after its greeting falls behind.
    let mut stalled = Worker::connect_small_rcvbuf(server.local_addr());
    stalled.subscribe("stuck_pusher", &["ALL"]);

    let mut top = TopInPty::spawn(metrics);
    // Rates appear from the second poll on; the table lists every worker, the stalled one
    // first (by backlog) and marked as the slowest.
    let screen = top.wait_for("the workers, a delivery rate and the slowest marked", |s| {
        s.contains("synchrotron1")
            && s.contains("federation_sender1")
            && s.lines().nth(4).is_some_and(|l| l.starts_with(">stuck_pusher"))
            && s.lines().nth(2).is_some_and(|l| l.contains(" lines/s") && !l.starts_with('-'))
    });
    let lines: Vec<&str> = screen.lines().collect();
    assert!(lines[0].starts_with(&format!("replhub top {metrics}  sort: backlog")), "{screen}");
    assert!(lines[1].contains("upstream: synthetic master"), "{screen}");
    assert!(lines[2].contains("workers 3"), "{screen}");
    assert!(lines[3].starts_with("WORKER"), "{screen}");
    // REPLHUB_TOP_SCREEN=FILE keeps the screen of a few seconds later for the docs.
    if let Ok(path) = std::env::var("REPLHUB_TOP_SCREEN") {
        thread::sleep(Duration::from_secs(4));
        std::fs::write(path, top.contents()).expect("write the screen");
    }
    // Switching the sort by key: by name, federation_sender1 comes first.
    top.writer.write_all(b"n").expect("key");
    let screen = top.wait_for("sort by name", |s| s.lines().next().is_some_and(|l| l.contains("sort: name")));
    let rows: Vec<&str> = screen.lines().skip(4).take(3).map(|r| r.trim_start_matches([' ', '>'])).collect();
    assert!(rows[0].starts_with("federation_sender1"), "{screen}");
    assert!(rows[1].starts_with("stuck_pusher"), "{screen}");
    assert!(rows[2].starts_with("synchrotron1"), "{screen}");

    top.writer.write_all(b"q").expect("key");
    let status = top.wait_exit();
    assert!(status.success(), "exit status {status:?}");
    drop(readers);
    stalled.close();
    server.shutdown().expect("clean shutdown");
}
