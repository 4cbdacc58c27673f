//! Synapse's own Redis replication code (a current release, `synapse.replication.tcp.redis`
//! over txredisapi) as one main process and two workers, through a real `redis-server` and,
//! once it exists, through `replhub serve --resp-listen` (see interop/README.md, "Redis
//! harness"). `interop/run_redis.py` drives the processes and reports what each one's
//! command handler received; this test re-checks the central claims from that raw record:
//! every live message reached every process subscribed to its channel exactly once (the
//! publisher too: pub/sub echoes), no other process, in its publisher's order, and each
//! PUBLISH was answered with that number of receivers.
//!
//! The virtualenv comes from `scripts/redis-interop-setup` (CI runs it before `cargo test`),
//! which also installs redis-server. Without either the tests fail saying so: they never pass
//! silently.
// Integration tests wait for real processes with real deadlines.
#![allow(clippy::disallowed_methods)]
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// One run at a time: each is three Python processes importing Synapse, and the machine may
/// have two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// run_redis's own deadline for the live phase, and ours for the whole run (its processes
/// take seconds each just to import Synapse on a loaded machine).
const RUN_TIMEOUT_S: u64 = 40;
const RUN_LIMIT: Duration = Duration::from_secs(90);
const SETUP: &str = "run `scripts/redis-interop-setup` first (needs PyPI once; .ci/run does it)";

fn venv_python() -> PathBuf {
    let dir = match std::env::var_os("REPLHUB_INTEROP_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(&std::env::var_os("HOME").expect("HOME is set")).join(".cache/replhub-interop"),
    };
    let python = dir.join("venv-redis/bin/python");
    assert!(python.exists(), "no Redis interop virtualenv at {}: {SETUP}", python.display());
    python
}

/// A child process killed (and reaped) when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    listener.local_addr().expect("local addr").port()
}

/// Waits until `port` accepts a TCP connection (the server is listening), or panics naming
/// `what`. A connection accepted is the readiness signal; the probe sends nothing.
fn wait_listening(child: &mut Killed, port: u16, what: &str) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(status) = child.0.try_wait().expect("poll child") {
            panic!("{what} exited with {status} before listening on {addr}");
        }
        assert!(Instant::now() < deadline, "{what} not listening on {addr} after 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_redis() -> (Killed, u16) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run redis-server ({e}): {SETUP}"));
    let mut child = Killed(child);
    wait_listening(&mut child, port, "redis-server");
    (child, port)
}

/// `replhub serve` speaking RESP pub/sub on a free port (PROTOCOL.md §8.4.1 is what it must
/// answer: SUBSCRIBE confirmations per channel, PUBLISH with the receiver count, `message`
/// deliveries to every subscriber including the publisher, PING on both kinds of connection).
fn start_replhub_resp(io: &str) -> (Killed, u16) {
    start_replhub_serve(&["--io", io], "replhub serve --resp-listen")
}

/// `replhub serve --resp-listen` on a free port with `extra` arguments, its worker listener on
/// an ephemeral port and no metrics; returns once the RESP port accepts (`what` names it in a
/// failure).
fn start_replhub_serve(extra: &[&str], what: &str) -> (Killed, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_replhub"))
        .args(["serve", "--resp-listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run replhub");
    let mut child = Killed(child);
    wait_listening(&mut child, port, what);
    (child, port)
}

/// Runs interop/run_redis.py (master + w1 + w2; w2 on txredisapi's pure-Python parser, the
/// others on hiredis) against `port` and returns its verdict, which must be a pass.
fn run(port: u16, label: &str) -> Value {
    run_split(port, port, label)
}

/// As [`run`], with the main process on `master_port` and the workers on `worker_port`.
fn run_split(master_port: u16, worker_port: u16, label: &str) -> Value {
    let python = venv_python();
    let root = env!("CARGO_MANIFEST_DIR");
    let venv_dir = python.ancestors().nth(3).expect("venv dir").to_path_buf();
    let log_dir = std::env::temp_dir().join(format!("replhub-redis-interop-{label}-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let mut child = Command::new("python3");
    child
        .arg(Path::new(root).join("interop/run_redis.py"))
        .args(["--redis", &format!("127.0.0.1:{master_port}"), "--timeout", &RUN_TIMEOUT_S.to_string()])
        .args(["--worker-redis", &format!("127.0.0.1:{worker_port}")])
        .args(["--workers", "2", "--python-parser", "w2"])
        .arg("--venv-dir")
        .arg(&venv_dir)
        .arg("--log-dir")
        .arg(&log_dir);
    let started = Instant::now();
    let verdict = run_to_verdict(child, label, &log_dir);
    check_delivery(&verdict, label, master_port != worker_port);
    eprintln!("{label}: pass in {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&log_dir);
    verdict
}

/// Runs an interop script (`interop/run_redis*.py`) to its end, within [`RUN_LIMIT`], and
/// returns its verdict (the last line it prints, JSON), which must be a pass.
fn run_to_verdict(mut script: Command, label: &str, log_dir: &Path) -> Value {
    let child = script.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("python3 runs the script");
    let mut child = Killed(child);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for the script") {
            break status;
        }
        // The scripts stop their nodes when they exit; the nodes also stop within a second.
        assert!(
            started.elapsed() < RUN_LIMIT,
            "{label}: still running after {RUN_LIMIT:?}; logs in {}",
            log_dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    child.0.stdout.take().expect("piped").read_to_string(&mut stdout).expect("the script's output");
    let last = stdout.lines().last().unwrap_or_default();
    let verdict: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{label}: no verdict ({e}) in {stdout:?}; logs in {}", log_dir.display()));
    assert_eq!(verdict["event"], "verdict", "{label}: {last}");
    assert_eq!(verdict["pass"], true, "{label}: {}; logs in {}", verdict["failures"], log_dir.display());
    assert!(status.success(), "{label}: the script exited with {status}");
    verdict
}

/// The exactly-once, per-publisher-order and receiver-count claims, recomputed here from what
/// each node published (`live`: channel, line, PUBLISH reply) and every command line its
/// handler received (`nodes.*.received`), independently of run_redis' own verdict.
/// `split`: the main process is on another server than the workers, and a PUBLISH reply counts
/// the receivers on the publisher's server only (replhub's with `--upstream-redis`).
fn check_delivery(verdict: &Value, label: &str, split: bool) {
    let nodes = verdict["nodes"].as_object().expect("nodes");
    let names: Vec<&str> = nodes.keys().map(String::as_str).collect();
    assert_eq!(names, ["master", "w1", "w2"], "{label}");
    // Both of txredisapi's reply parsers took part.
    let parsers: Vec<&str> = names.iter().map(|n| nodes[*n]["parser"].as_str().unwrap_or("?")).collect();
    assert!(
        parsers.contains(&"HiredisProtocol") && parsers.contains(&"BaseRedisProtocol"),
        "{label}: parsers {parsers:?}"
    );
    let received = |n: &str| -> Vec<&str> {
        nodes[n]["received"].as_array().expect("received").iter().map(|l| l.as_str().expect("line")).collect()
    };
    let live = verdict["live"].as_object().expect("live");
    let mut kinds = std::collections::BTreeSet::new();
    for publisher in &names {
        let msgs = live[*publisher].as_array().expect("live messages");
        assert!(!msgs.is_empty(), "{label}: {publisher} published nothing live");
        for receiver in &names {
            let mut sent = Vec::new();
            for m in msgs {
                let (channel, line) =
                    (m["channel"].as_str().expect("channel"), m["line"].as_str().expect("line"));
                kinds.insert(line.split(' ').next().unwrap_or_default().to_owned());
                // <server_name>/USER_IP is subscribed by the main process only.
                let subscribed = !channel.ends_with("/USER_IP") || *receiver == "master";
                let want = usize::from(subscribed);
                let got = received(receiver).iter().filter(|l| **l == line).count();
                assert_eq!(got, want, "{label}: {receiver} received {publisher}'s {line:?} {got} times");
                let same_server = |r: &str| !split || (r == "master") == (*publisher == "master");
                let receivers = names
                    .iter()
                    .filter(|r| same_server(r) && (!channel.ends_with("/USER_IP") || **r == "master"))
                    .count();
                assert_eq!(m["reply"], receivers, "{label}: PUBLISH reply for {publisher}'s {line:?}");
                if subscribed {
                    sent.push(line);
                }
            }
            let in_order: Vec<&str> = received(receiver).into_iter().filter(|l| sent.contains(l)).collect();
            assert_eq!(in_order, sent, "{label}: {receiver} got {publisher}'s messages out of order");
        }
    }
    for kind in ["RDATA", "USER_IP", "USER_SYNC", "REMOTE_SERVER_UP"] {
        assert!(kinds.contains(kind), "{label}: no live {kind} was published: {kinds:?}");
    }
    // The batch: two caches rows share a token, the first sent as `batch`.
    let master: Vec<&str> =
        live["master"].as_array().expect("master").iter().filter_map(|m| m["line"].as_str()).collect();
    assert!(
        master.iter().any(|l| l.starts_with("RDATA caches master batch ")),
        "{label}: no batch from master"
    );
}

#[test]
fn synapse_redis_replication_through_redis_server() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (_redis, port) = start_redis();
    run(port, "redis-server");
}

/// `replhub serve --resp-listen --upstream-redis` on a free port, bridged to the Redis on
/// `redis_port` for server name `sn`.
fn start_replhub_bridged(redis_port: u16, sn: &str, io: &str) -> (Killed, u16) {
    let upstream = format!("redis://127.0.0.1:{redis_port}");
    start_replhub_serve(
        &["--upstream-redis", &upstream, "--server-name", sn, "--io", io],
        "replhub serve --upstream-redis",
    )
}

/// One replhub per machine on a shared Redis: the main process on replhub A, the workers on
/// replhub B, both bridged to one real Redis. Everything run_redis checks holds across the
/// two (each PUBLISH reply counts the publisher's own replhub).
#[test]
fn synapse_redis_replication_across_two_replhubs_on_one_redis() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (_redis, redis_port) = start_redis();
    // run_redis's default server name; one replhub on each I/O backend.
    let (_a, a) = start_replhub_bridged(redis_port, "example.com", "uring");
    let (_b, b) = start_replhub_bridged(redis_port, "example.com", "epoll");
    // Both bridges subscribed on the real Redis before any Synapse process connects.
    let mut probe = TcpStream::connect(("127.0.0.1", redis_port)).expect("connect to redis");
    probe.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        use std::io::Write;
        probe.write_all(b"PUBSUB NUMSUB example.com\r\n").expect("ask redis");
        let mut buf = [0u8; 128];
        let n = probe.read(&mut buf).expect("redis answers");
        if buf[..n].ends_with(b":2\r\n") {
            break;
        }
        assert!(Instant::now() < deadline, "the two replhubs never both subscribed on redis");
        std::thread::sleep(Duration::from_millis(20));
    }
    run_split(a, b, "two-replhubs");
}

/// The same run through replhub's RESP listener, then through redis-server, and the two must
/// agree on everything that is not volatile. Volatile, and so not compared: the time of every
/// event; PUBLISH sequence numbers; how the messages of different publishers interleave at a
/// receiver (pub/sub orders per publisher only, so `comparable.live` is per (receiver,
/// publisher)); how many times each handshake line (REPLICATE, POSITION announcements with
/// prev = new) arrives, which depends on start order (`comparable.handshake` is a set); and
/// USER_SYNC's instance id, random per process start (run_redis writes `<id:NAME>` for it).
#[test]
fn synapse_redis_replication_through_replhub_matches_redis_server() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let through_redis = {
        let (_redis, port) = start_redis();
        run(port, "redis-server")
    };
    for io in ["uring", "epoll"] {
        let through_replhub = {
            let (_replhub, port) = start_replhub_resp(io);
            run(port, &format!("replhub-{io}"))
        };
        for part in ["live", "handshake", "replies"] {
            assert_eq!(
                through_replhub["comparable"][part], through_redis["comparable"][part],
                "replhub on {io} and redis-server differ in comparable.{part}"
            );
        }
    }
}

/// Synapse 1.66.0's own TCP replication worker behind `replhub serve --upstream-redis` (no
/// `--resp-listen`), fed by a current Synapse's main process on a real Redis
/// (`interop/run_redis_tcp.py`): replhub greets the worker, publishes its REPLICATE on the
/// Redis, relays the main process's POSITIONs and RDATA, and publishes the worker's
/// REMOTE_SERVER_UP, which the main process's notifier gets. Every row of the streams whose
/// shape both releases share reaches the worker's data handler exactly once; receipts rows,
/// which gained a field after 1.66, fail in the worker's own parser as they would from a
/// master of that release (the runner checks that too).
#[test]
fn synapse_1_66_tcp_worker_behind_replhub_on_redis() {
    tcp_worker_behind_replhub_on_redis("1.66.0");
}

/// The same with Synapse 1.22.1's worker, the oldest release of the POSITION form that a
/// current Synapse publishes.
#[test]
fn synapse_1_22_tcp_worker_behind_replhub_on_redis() {
    tcp_worker_behind_replhub_on_redis("1.22.1");
}

fn tcp_worker_behind_replhub_on_redis(release: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let python = venv_python();
    let venv_dir = python.ancestors().nth(3).expect("venv dir").to_path_buf();
    let worker_python = venv_dir.join(format!("venv-{release}/bin/python"));
    assert!(
        worker_python.exists(),
        "no virtualenv for Synapse {release} at {}: run `scripts/interop-setup {release}` first",
        worker_python.display()
    );
    let (_redis, redis_port) = start_redis();
    let listen = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_replhub"))
        .args(["serve", "--upstream-redis", &format!("redis://127.0.0.1:{redis_port}")])
        .args(["--server-name", "example.com", "--listen", &format!("127.0.0.1:{listen}")])
        .args(["--metrics-listen", "off"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run replhub");
    let mut replhub = Killed(child);
    wait_listening(&mut replhub, listen, "replhub serve --upstream-redis --listen");
    let log_dir =
        std::env::temp_dir().join(format!("replhub-redis-tcp-interop-{release}-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).expect("log dir");
    let mut child = Command::new("python3");
    child
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/run_redis_tcp.py"))
        .args(["--redis", &format!("127.0.0.1:{redis_port}"), "--hub", &format!("127.0.0.1:{listen}")])
        .args(["--release", release, "--timeout", &RUN_TIMEOUT_S.to_string()])
        .arg("--venv-dir")
        .arg(&venv_dir)
        .arg("--log-dir")
        .arg(&log_dir);
    let started = Instant::now();
    let verdict = run_to_verdict(child, &format!("{release} TCP worker"), &log_dir);
    // Rows came through, of several streams, and the worker's REPLICATE reached the Redis.
    assert!(verdict["rows_received"].as_u64().unwrap_or(0) >= 12, "{verdict}");
    assert!(verdict["replicates_from_hub"].as_u64().unwrap_or(0) >= 1, "{verdict}");
    for stream in ["typing", "caches", "to_device", "push_rules"] {
        assert!(
            verdict["streams_written"].as_array().is_some_and(|s| s.iter().any(|x| x == stream)),
            "{stream} not written: {verdict}"
        );
    }
    eprintln!("{release} TCP worker behind replhub on redis: pass in {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&log_dir);
}
