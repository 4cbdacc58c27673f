//! `replhub loadtest` end to end, kept small (a few seconds): every line reaches every
//! subscriber, in order, and the report adds up. The Redis mode runs against a real
//! `redis-server` when one is installed (the test says so and passes when it is not).
// Integration tests wait for real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use replhub::config::IoBackend;
use replhub::loadtest::{self, Check, Limit, LoadtestOptions, Report, ServerMode, StreamSet, Target};

fn options(
    target: Target,
    subscribers: usize,
    rate: u64,
    seconds: f64,
    streams: StreamSet,
) -> LoadtestOptions {
    LoadtestOptions {
        target,
        subscribers,
        rate,
        limit: Limit::Seconds(seconds),
        streams,
        client_threads: 2,
        ..LoadtestOptions::default()
    }
}

fn replhub(server: ServerMode, io: IoBackend) -> Target {
    Target::Replhub { server, io, threads: 2 }
}

/// What every clean run satisfies.
fn assert_clean(r: &Report, subscribers: usize, rate: u64, seconds: f64) {
    let text = r.to_text();
    assert_eq!(r.lost, 0, "{text}");
    assert_eq!((r.reordered, r.unexpected, r.disconnected), (0, 0, 0), "{text}");
    assert!(r.errors.is_empty(), "{text}");
    assert_eq!(r.expected, r.published * subscribers as u64, "{text}");
    assert_eq!(r.delivered, r.expected, "{text}");
    assert!(r.is_clean(), "{text}");
    // Paced: never ahead of rate × seconds. The window holds the publisher back when the
    // subscribers fall behind, which an unoptimized build on a busy machine does, so the lower
    // bound is only checked in optimized builds.
    let want = rate as f64 * seconds;
    assert!(r.published > 0 && (r.published as f64) < want * 1.02 + 10.0, "{text}");
    if !cfg!(debug_assertions) {
        assert!(r.published as f64 > want * 0.5, "{text}");
    }
    let l = &r.latency;
    assert_eq!(l.samples, r.delivered, "{text}");
    assert!(0 < l.p50 && l.p50 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max, "{text}");
    assert!(r.deliveries_per_sec > 0.0 && r.mb_per_sec > 0.0, "{text}");
    // The run ends at the last delivery, which may come before the publisher, sleeping until
    // its deadline, stops; but never before the last line was due (line k goes out at k / rate
    // at the earliest), and every line waited at most the run.
    assert!((r.published - 1) as f64 / rate as f64 <= r.elapsed_seconds + 1e-9, "{text}");
    assert!(l.max as f64 <= r.elapsed_seconds * 1e9 + 1.0, "{text}");
}

#[tokio::test(flavor = "current_thread")]
async fn twenty_subscribers_get_every_line_in_order() {
    let opts = options(replhub(ServerMode::InProcess, IoBackend::Epoll), 20, 20_000, 2.0, StreamSet::One);
    let r = loadtest::run(opts).await.expect("load test runs");
    assert_clean(&r, 20, 20_000, 2.0);
    assert_eq!(
        (r.target.as_str(), r.backend.as_str(), r.server.as_str()),
        ("replhub", "epoll", "in-process")
    );
    // The hub's threads did the fan-out, so their CPU time is there.
    assert!(r.server_cpu_ns_per_delivery.is_some_and(|ns| ns > 0.0), "{}", r.to_text());
    assert!(r.rss_ready_bytes.is_some_and(|b| b > 0));
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("JSON report");
    assert_eq!(json["lost"], 0);
    assert_eq!(json["delivered"].as_u64(), Some(r.delivered));
}

#[tokio::test(flavor = "current_thread")]
async fn all_streams_through_the_default_backend() {
    // REPLICATE ALL, lines round-robin over the 16 streams; io auto (io_uring where it works).
    let opts = options(replhub(ServerMode::InProcess, IoBackend::Auto), 10, 8_000, 1.0, StreamSet::All);
    let r = loadtest::run(opts).await.expect("load test runs");
    assert_clean(&r, 10, 8_000, 1.0);
    // Four REPLICATE lines, max rate for a fixed number of lines.
    let mut opts = options(replhub(ServerMode::InProcess, IoBackend::Auto), 10, 0, 1.0, StreamSet::Several);
    opts.limit = Limit::Messages(20_000);
    let r = loadtest::run(opts).await.expect("load test runs");
    assert_eq!((r.published, r.delivered, r.lost), (20_000, 200_000, 0), "{}", r.to_text());
}

#[tokio::test(flavor = "current_thread")]
async fn the_hub_as_its_own_process() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_replhub"));
    let opts = options(replhub(ServerMode::Process(exe), IoBackend::Epoll), 5, 5_000, 1.0, StreamSet::One);
    let r = loadtest::run(opts).await.expect("load test runs");
    assert_clean(&r, 5, 5_000, 1.0);
    assert_eq!((r.server.as_str(), r.backend.as_str()), ("process", "epoll"));
    assert_eq!(r.rss_scope, "hub process");
    assert!(r.rss_end_bytes.is_some_and(|b| b > 1 << 20), "{}", r.to_text());
}

/// `redis-server` from PATH.
fn find_redis() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("redis-server")).find(|p| p.is_file())
}

/// A redis-server on a free loopback port, killed when dropped.
struct Redis {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis(exe: &PathBuf) -> Redis {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let child = Command::new(exe)
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .args(["--client-output-buffer-limit", "pubsub 0 0 0", "--daemonize", "no", "--logfile", ""])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let redis = Redis { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(redis.addr).is_err() {
        assert!(Instant::now() < deadline, "redis-server does not listen on {}", redis.addr);
        std::thread::sleep(Duration::from_millis(20));
    }
    redis
}

#[tokio::test(flavor = "current_thread")]
async fn the_same_load_against_redis() {
    let Some(exe) = find_redis() else {
        eprintln!("skipped: redis-server is not installed (apt-get install redis-server to run this test)");
        return;
    };
    let redis = start_redis(&exe);
    let target = Target::Redis { addr: redis.addr, pid: Some(redis.child.id()) };
    let r =
        loadtest::run(options(target, 10, 10_000, 1.0, StreamSet::Several)).await.expect("load test runs");
    assert_clean(&r, 10, 10_000, 1.0);
    assert_eq!(r.target, "redis");
    // PUBLISH said how many subscribers got each message: all of them, every time.
    assert_eq!(r.publish_receivers, Some(r.expected), "{}", r.to_text());
    assert!(r.server_cpu_ns_per_delivery.is_some_and(|ns| ns > 0.0), "{}", r.to_text());
    // Counting Redis subscribers (max-rate runs): every message still counted, tokens sampled.
    let target = Target::Redis { addr: redis.addr, pid: Some(redis.child.id()) };
    let mut opts = options(target, 10, 10_000, 1.0, StreamSet::One);
    opts.check = Check::Count;
    let r = loadtest::run(opts).await.expect("load test runs");
    let text = r.to_text();
    assert!(r.is_clean(), "{text}");
    assert_eq!(r.check, "count", "{text}");
    assert!(r.published > 0 && r.delivered == r.published * 10, "{text}");
    assert!(r.latency.samples > 0 && r.latency.samples <= r.delivered, "{text}");
}

/// The counting subscribers ([`Check::Count`]) against the hub and the ideal server: every line
/// arrives (the count and the sampled tokens say so), one latency sample per read at most.
#[tokio::test(flavor = "current_thread")]
async fn counting_subscribers_and_the_ideal_server() {
    for target in [
        replhub(ServerMode::InProcess, IoBackend::Auto),
        Target::Ideal { server: ServerMode::InProcess, threads: 2 },
    ] {
        let mut opts = options(target, 20, 20_000, 1.0, StreamSet::One);
        opts.check = Check::Count;
        let r = loadtest::run(opts).await.expect("load test runs");
        let text = r.to_text();
        assert!(r.is_clean(), "{text}");
        assert_eq!(r.check, "count", "{text}");
        assert!(r.published > 0 && r.delivered == r.published * 20, "{text}");
        assert!(r.latency.samples > 0 && r.latency.samples <= r.delivered, "{text}");
        assert!(r.server_cpu_ns_per_delivery.is_some_and(|ns| ns > 0.0), "{text}");
    }
}

/// `replhub ARGS` (the real binary), asserting success; returns stdout.
fn replhub_cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_replhub"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run replhub");
    assert!(out.status.success(), "replhub {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `replhub loadtest --target ideal --spawn-server` (the real binary): the ideal server runs as
/// its own process, every line arrives, and its CPU is measured through its pid.
#[test]
fn the_ideal_server_as_its_own_process() {
    let json = replhub_cli(&[
        "loadtest",
        "--target",
        "ideal",
        "--spawn-server",
        "--subscribers",
        "5",
        "--rate",
        "5000",
        "--seconds",
        "1",
        "--threads",
        "2",
        "--client-threads",
        "1",
        "--check",
        "count",
        "--json",
        "--quiet",
    ]);
    let r = Report::from_json(&json).expect("a JSON report");
    let text = r.to_text();
    assert!(r.is_clean(), "{text}");
    assert!(r.published > 0 && r.delivered == r.published * 5, "{text}");
    assert_eq!((r.target.as_str(), r.backend.as_str(), r.server.as_str()), ("ideal", "ideal", "process"));
    assert_eq!(r.rss_scope, "server process", "{text}");
    assert!(r.server_cpu_ns_per_delivery.is_some_and(|ns| ns > 0.0), "{text}");
    assert!(r.rss_end_bytes.is_some_and(|b| b > 0), "{text}");
}

/// The hidden `replhub loadtest ideal-server`: says where it listens, serves the `REPLICATE`
/// handshake there, and exits (successfully) when its stdin closes, which is how the load test
/// stops it; `loadtest --help` does not list it.
#[test]
fn the_ideal_server_process_stops_when_its_stdin_closes() {
    use std::io::{BufRead, BufReader, Read, Write};
    // A master that accepts the server's upstream connection and says nothing.
    let master = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut child = Command::new(env!("CARGO_BIN_EXE_replhub"))
        .args(["loadtest", "ideal-server", "--threads", "1", "--upstream"])
        .arg(master.local_addr().expect("addr").to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run replhub loadtest ideal-server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("a line");
    let addr: SocketAddr =
        line.trim_end().strip_prefix("listening on ").and_then(|a| a.parse().ok()).expect("an address");
    let (_upstream, _) = master.accept().expect("the server dials its upstream");
    let mut worker = TcpStream::connect(addr).expect("connect");
    worker.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    worker.write_all(b"REPLICATE events\n").expect("subscribe");
    let mut lines = BufReader::new(worker.try_clone().expect("clone"));
    let mut got = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        lines.read_line(&mut line).expect("a line");
        got.push(line);
    }
    assert_eq!(got, ["SERVER loadtest.ideal\n", "POSITION events 0\n"]);

    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "still running 10 s after its stdin closed");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    // Its sockets went with it.
    assert_eq!(lines.read(&mut [0u8; 64]).map_err(|e| e.kind()), Ok(0));
    assert!(!replhub_cli(&["loadtest", "--help"]).contains("ideal-server"));
}

/// The `<text>` of an SVG document, and the point counts of its polylines.
fn svg_texts_and_lines(svg: &str) -> (String, Vec<usize>) {
    let doc = roxmltree::Document::parse(svg).expect("well-formed SVG");
    assert!(doc.root_element().has_tag_name("svg"));
    let texts = doc.descendants().filter(|n| n.has_tag_name("text")).filter_map(|n| n.text());
    let lines = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .map(|n| n.attribute("points").unwrap_or("").split_whitespace().count());
    (texts.collect::<Vec<_>>().join("\n"), lines.collect())
}

/// A short real run with `--report x.svg` (and .json, .html): the plot is well-formed and holds
/// the run's series, one point per interval; `loadtest plot` draws two saved runs together.
#[test]
fn a_real_run_plotted_and_two_runs_compared() {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("loadtest-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let run = |io: &str, name: &str| {
        replhub_cli(&[
            "loadtest",
            "--subscribers",
            "5",
            "--rate",
            "5000",
            "--seconds",
            "1",
            "--threads",
            "1",
            "--client-threads",
            "1",
            "--io",
            io,
            "--quiet",
            "--report",
            &path(&format!("{name}.svg")),
            "--report",
            &path(&format!("{name}.json")),
            "--report",
            &path(&format!("{name}.html")),
        ])
    };
    let text = run("epoll", "epoll");
    assert!(text.contains("lost 0"), "{text}");
    let report = Report::from_json(&std::fs::read_to_string(path("epoll.json")).expect("JSON written"))
        .expect("a JSON report");
    assert!(report.is_clean(), "{}", report.to_text());
    // One count per 100 ms from the start of publishing to the last delivery, adding up.
    let n = report.deliveries_per_interval.len();
    assert_eq!(report.deliveries_interval_ms, 100);
    let expected = (report.elapsed_seconds * 10.0).ceil() as usize;
    assert!(n.abs_diff(expected) <= 1, "{n} intervals over {} s", report.elapsed_seconds);
    assert_eq!(report.deliveries_per_interval.iter().sum::<u64>(), report.delivered);
    assert_eq!(report.latency_cdf_ns.last().map(|p| p.1), Some(report.latency.samples));

    let (texts, lines) =
        svg_texts_and_lines(&std::fs::read_to_string(path("epoll.svg")).expect("SVG written"));
    assert!(texts.contains("replhub epoll: p50"), "{texts}");
    assert!(texts.contains("p99.9 "), "{texts}");
    // The CDF and the deliveries series (its last interval may be a sliver, left out).
    assert!(lines.contains(&report.latency_cdf_ns.len()), "{lines:?}");
    assert!(lines.contains(&n) || lines.contains(&(n - 1)), "{n} intervals, polylines {lines:?}");
    let html = std::fs::read_to_string(path("epoll.html")).expect("HTML written");
    assert!(html.starts_with("<!DOCTYPE html>") && html.contains("<svg") && html.contains("<table>"));

    // A second run on the other backend (the hub falls back to epoll where io_uring is
    // missing, and the label says which it got), then both on the same axes.
    run("auto", "auto");
    replhub_cli(&["loadtest", "plot", "--out", &path("both.svg"), &path("epoll.json"), &path("auto.json")]);
    let (texts, _) = svg_texts_and_lines(&std::fs::read_to_string(path("both.svg")).expect("plot written"));
    let auto = Report::from_json(&std::fs::read_to_string(path("auto.json")).expect("JSON")).expect("report");
    let second = if auto.backend == "epoll" {
        "replhub epoll (auto)".to_owned()
    } else {
        format!("replhub {}", auto.backend)
    };
    assert!(texts.contains("replhub epoll") && texts.contains(&format!("{second}: p50")), "{texts}");
    // A plot is .svg or .html; a bad name is refused before anything runs.
    let out = Command::new(env!("CARGO_BIN_EXE_replhub"))
        .args(["loadtest", "--seconds", "1", "--report", &path("x.png")])
        .output()
        .expect("run replhub");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(".svg"), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
