//! Redis-mode pub/sub over real loopback sockets, on both backends: fan-out across cores with
//! per-publisher order and exact receiver counts, a publisher hearing its own messages, slow
//! subscribers cut off as Redis's `client-output-buffer-limit pubsub` does, the SET/GET store,
//! and the `serve --resp-listen` command line alone.
// Real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
mod resp_common;

use std::io::Write;
use std::time::{Duration, Instant};

use replhub::config::IoBackend;
use replhub::resp::{OutputLimits, RespConfig};
use resp_common::{message, on_both_backends, parse, start, Client, Reply, WAIT};

const PER_PUBLISHER: usize = 300;

fn subscribe(c: &mut Client, channels: &[&str]) {
    let mut args = vec!["SUBSCRIBE"];
    args.extend_from_slice(channels);
    c.send(&args);
    for (i, ch) in channels.iter().enumerate() {
        assert_eq!(
            c.read(),
            Reply::Array(vec![Reply::bulk("subscribe"), Reply::bulk(ch), Reply::Int(i as i64 + 1)])
        );
    }
}

fn pubsub_across_cores_keeps_per_publisher_order_and_exact_counts(io: IoBackend) {
    let server = start(io, 4, RespConfig::default());
    let addr = server.resp_addr().expect("resp");
    // Subscribers until they sit on at least two cores (SO_REUSEPORT spreads them by hash);
    // the even ones also take the USER_IP channel, as Synapse's main process does.
    let mut subs: Vec<Client> = Vec::new();
    loop {
        let mut c = Client::connect(addr);
        if subs.len() % 2 == 0 {
            subscribe(&mut c, &["sn/USER_IP", "sn"]);
        } else {
            subscribe(&mut c, &["sn"]);
        }
        subs.push(c);
        let cores_used = server.core_snapshots(WAIT).iter().filter(|s| !s.conns.is_empty()).count();
        if subs.len() >= 6 && cores_used >= 2 {
            break;
        }
        assert!(subs.len() < 64, "every connection landed on one core");
    }
    let n = subs.len();
    let n_ip = n.div_ceil(2);
    // Three publishers at once, pipelining: two on `sn`, one on `sn/USER_IP`.
    let publishers: Vec<_> = (0..3)
        .map(|p| {
            std::thread::spawn(move || {
                let channel = if p == 2 { "sn/USER_IP" } else { "sn" };
                let mut c = Client::connect(addr);
                let mut out = Vec::new();
                for seq in 0..PER_PUBLISHER {
                    let payload = format!("POSITION events p{p} {seq} {}", seq + 1);
                    out.extend(Client::encode(&[b"PUBLISH", channel.as_bytes(), payload.as_bytes()]));
                }
                c.stream.write_all(&out).expect("publish");
                (0..PER_PUBLISHER).map(|_| c.read()).collect::<Vec<Reply>>()
            })
        })
        .collect();
    for (p, h) in publishers.into_iter().enumerate() {
        let replies = h.join().expect("publisher");
        let want = if p == 2 { n_ip } else { n } as i64;
        assert!(replies.iter().all(|r| *r == Reply::Int(want)), "publisher {p}: {replies:?}");
    }
    for (i, c) in subs.iter_mut().enumerate() {
        let expect_publishers = if i % 2 == 0 { 3 } else { 2 };
        let mut next = [0usize; 3];
        for _ in 0..expect_publishers * PER_PUBLISHER {
            let (channel, payload) = message(&c.read());
            let words: Vec<&str> = payload.split(' ').collect();
            let p: usize = words[2][1..].parse().expect("publisher");
            let seq: usize = words[3].parse().expect("seq");
            assert_eq!(channel, if p == 2 { "sn/USER_IP" } else { "sn" });
            assert_eq!(seq, next[p], "subscriber {i}: publisher {p} out of order");
            next[p] += 1;
        }
        assert_eq!(
            c.call(&["PING"]),
            Reply::Array(vec![Reply::bulk("pong"), Reply::bulk("")]),
            "nothing more"
        );
    }
    server.shutdown().expect("clean shutdown");
}

fn a_publisher_receives_its_own_messages(io: IoBackend) {
    let server = start(io, 2, RespConfig::default());
    let addr = server.resp_addr().expect("resp");
    // Synapse's two connections: one subscribed, one publishing.
    let mut sub = Client::connect(addr);
    subscribe(&mut sub, &["sn"]);
    let mut publ = Client::connect(addr);
    assert_eq!(publ.call(&["PUBLISH", "sn", "REPLICATE "]), Reply::Int(1));
    assert_eq!(message(&sub.read()), ("sn".to_owned(), "REPLICATE ".to_owned()));
    // Unsubscribed: no receivers, and nothing more arrives.
    sub.send(&["UNSUBSCRIBE", "sn"]);
    assert_eq!(sub.read(), Reply::Array(vec![Reply::bulk("unsubscribe"), Reply::bulk("sn"), Reply::Int(0)]));
    assert_eq!(publ.call(&["PUBLISH", "sn", "x"]), Reply::Int(0));
    assert_eq!(sub.call(&["PING"]), Reply::Simple("PONG".into()));
    server.shutdown().expect("clean shutdown");
}

/// With one core thread (the source on board: the io_uring loop sleeps in tokio, on an
/// eventfd the ring signals) a command is answered and a message delivered when it arrives,
/// not when some later wake-up happens to come. This is a wake-up check, not a speed one: the
/// failure it catches is a kernel signal that comes late (with DEFER_TASKRUN the ring's
/// eventfd fired 15–30 ms after a recv, so every round trip here took that long), and the
/// bound is the median of many round trips at 5 ms, some 50 times what they take on a loaded
/// 2-CPU machine.
fn one_core_thread_answers_without_waiting_for_another_wake_up(io: IoBackend) {
    const ROUND_TRIPS: usize = 41;
    const MEDIAN_BOUND: Duration = Duration::from_millis(5);
    let server = start(io, 1, RespConfig::default());
    let addr = server.resp_addr().expect("resp");
    let mut sub = Client::connect(addr);
    subscribe(&mut sub, &["sn"]);
    let mut publ = Client::connect(addr);
    let mut pings = Vec::with_capacity(ROUND_TRIPS);
    let mut deliveries = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS {
        let t = Instant::now();
        assert_eq!(publ.call(&["PING"]), Reply::Simple("PONG".into()));
        pings.push(t.elapsed());
        let payload = format!("POSITION events master {i} {}", i + 1);
        let t = Instant::now();
        publ.send(&["PUBLISH", "sn", &payload]);
        assert_eq!(message(&sub.read()), ("sn".to_owned(), payload));
        deliveries.push(t.elapsed());
        assert_eq!(publ.read(), Reply::Int(1));
    }
    for (what, mut times) in [("PING → PONG", pings), ("PUBLISH → message", deliveries)] {
        times.sort();
        let median = times[ROUND_TRIPS / 2];
        assert!(
            median < MEDIAN_BOUND,
            "{what}: median {median:?} over {ROUND_TRIPS} round trips; all: {times:?}"
        );
    }
    server.shutdown().expect("clean shutdown");
}

fn a_slow_subscriber_is_cut_off_and_the_others_get_everything(io: IoBackend) {
    let limits = OutputLimits { hard: 512 << 10, soft: 0, soft_ms: 0 };
    let server = start(io, 2, RespConfig { output: limits, ..RespConfig::default() });
    let addr = server.resp_addr().expect("resp");
    let mut stalled = Client::connect(addr);
    subscribe(&mut stalled, &["sn"]);
    let mut reader = Client::connect(addr);
    subscribe(&mut reader, &["sn"]);
    // The reader reports each message it took, so that the publisher never runs more than
    // `AHEAD` messages (128 KiB, a quarter of the hard limit) ahead of it: on a loaded machine
    // the reading thread may be starved for a while, and it must not be cut off for that.
    const AHEAD: usize = 8;
    let (took, progress) = std::sync::mpsc::channel::<usize>();
    let reader = std::thread::spawn(move || {
        let mut seq = 0usize;
        loop {
            let (_, payload) = message(&reader.read());
            if payload == "end" {
                return seq;
            }
            let n: usize = payload.split(' ').next().and_then(|w| w.parse().ok()).expect("seq");
            assert_eq!(n, seq, "the reading subscriber lost or reordered a message");
            seq += 1;
            let _ = took.send(seq);
        }
    });
    let mut publ = Client::connect(addr);
    let pad = "x".repeat(16 << 10);
    let deadline = Instant::now() + WAIT;
    let mut published = 0usize;
    let mut read = 0usize;
    // Publish until the stalled subscriber is gone (the receiver count drops to 1).
    loop {
        while published - read >= AHEAD {
            read = progress.recv_timeout(WAIT).expect("the reading subscriber stopped reading");
        }
        let r = publ.call(&["PUBLISH", "sn", &format!("{published} {pad}")]);
        published += 1;
        if r == Reply::Int(1) {
            break;
        }
        assert_eq!(r, Reply::Int(2));
        assert!(Instant::now() < deadline && published < 8192, "the stalled subscriber was never cut off");
    }
    assert_eq!(publ.call(&["PUBLISH", "sn", "end"]), Reply::Int(1));
    assert_eq!(reader.join().expect("reader"), published, "the reading subscriber got every message");
    // The stalled one reads what was sent before the cut, whole messages only, then EOF.
    let rest = stalled.read_to_eof();
    let mut at = 0;
    while let Some((r, used)) = parse(&rest[at..]) {
        message(&r);
        at += used;
    }
    assert_eq!(at, rest.len(), "the stream was cut inside a message");
    let evictions: u64 =
        server.core_snapshots(WAIT).iter().map(|s| s.stats.evictions.iter().sum::<u64>()).sum();
    assert_eq!(evictions, 1);
    server.shutdown().expect("clean shutdown");
}

fn set_and_get_expire_and_stay_bounded(io: IoBackend) {
    let server = start(io, 2, RespConfig { cache_max_bytes: 256 << 10, ..RespConfig::default() });
    let addr = server.resp_addr().expect("resp");
    let mut c = Client::connect(addr);
    assert_eq!(
        c.call(&["SET", "cache_v1:get_user:@a:x", "{\"v\":1}", "PX", "200"]),
        Reply::Simple("OK".into())
    );
    assert_eq!(c.call(&["GET", "cache_v1:get_user:@a:x"]), Reply::bulk("{\"v\":1}"));
    // Another connection (perhaps on another core) sees the same store.
    let mut other = Client::connect(addr);
    assert_eq!(other.call(&["GET", "cache_v1:get_user:@a:x"]), Reply::bulk("{\"v\":1}"));
    // Time must pass for the entry to expire; there is no event to wait for.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.call(&["GET", "cache_v1:get_user:@a:x"]), Reply::Bulk(None));
    // 2 MiB of values into a 256 KiB store: every SET succeeds, old keys make room.
    let value = "v".repeat(2048);
    for i in 0..1024 {
        assert_eq!(c.call(&["SET", &format!("k{i}"), &value]), Reply::Simple("OK".into()));
    }
    let kept = (0..1024).filter(|i| c.call(&["GET", &format!("k{i}")]) != Reply::Bulk(None)).count();
    assert!(kept > 0 && kept <= 128, "{kept} values of 2 KiB kept in 256 KiB");
    server.shutdown().expect("clean shutdown");
}

/// `replhub serve --resp-listen` as a child on a free port, and that port.
fn spawn_resp_serve(io: IoBackend) -> (std::process::Child, std::net::SocketAddr) {
    resp_common::on_a_free_port("replhub serve", |port| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_replhub"))
            .args(["serve", "--resp-listen", &format!("127.0.0.1:{port}"), "--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "off", "--io", if io == IoBackend::Uring { "uring" } else { "epoll" }])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("replhub starts");
        if resp_common::wait_own_listener(&mut child, port) {
            return Some((child, std::net::SocketAddr::from(([127, 0, 0, 1], port))));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    })
}

fn the_command_line_serves_redis_mode_alone(io: IoBackend) {
    let (mut child, addr) = spawn_resp_serve(io);
    let mut sub = Client::connect(addr);
    subscribe(&mut sub, &["sn"]);
    let mut publ = Client::connect(addr);
    assert_eq!(publ.call(&["PUBLISH", "sn", "REPLICATE "]), Reply::Int(1));
    assert_eq!(message(&sub.read()), ("sn".to_owned(), "REPLICATE ".to_owned()));
    let _ = child.kill();
    let _ = child.wait();
}

on_both_backends!(
    pubsub_across_cores_keeps_per_publisher_order_and_exact_counts,
    a_publisher_receives_its_own_messages,
    one_core_thread_answers_without_waiting_for_another_wake_up,
    a_slow_subscriber_is_cut_off_and_the_others_get_everything,
    set_and_get_expire_and_stay_bounded,
    the_command_line_serves_redis_mode_alone,
);

/// `replhub tail --resp` against `addr` (replhub or a real Redis): prints the replication
/// lines published on the channel, RDATA decoded.
fn tail_prints_the_channel(addr: std::net::SocketAddr) {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_replhub"))
        .args(["tail", "--resp", &addr.to_string(), "--channel", "sn", "--decode", "--count", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tail starts");
    let mut publ = Client::connect(addr);
    // Until tail's subscription is in place, its channel has no receivers.
    let deadline = Instant::now() + WAIT;
    while publ.call(&["PUBLISH", "sn", "POSITION events master 1 1"]) == Reply::Int(0) {
        assert!(Instant::now() < deadline, "tail never subscribed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rows = [
        r#"RDATA events master batch ["$a:x","!r:x","m.room.message",null,null,null]"#,
        r#"RDATA typing w1 7 ["!r:x",["@u:x"]]"#,
    ];
    for row in rows {
        assert_eq!(publ.call(&["PUBLISH", "sn", row]), Reply::Int(1));
    }
    let out = child.wait_with_output().expect("tail exits after --count");
    assert!(out.status.success(), "tail failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() >= 3 && lines[..lines.len() - 2].iter().all(|l| *l == "POSITION events master 1 1"),
        "{text}"
    );
    assert!(
        lines[lines.len() - 2]
            .starts_with(r#"{"stream":"events","instance":"master","token":"batch","row":"#),
        "{text}"
    );
    assert!(
        lines[lines.len() - 1].starts_with(r#"{"stream":"typing","instance":"w1","token":7,"row":"#),
        "{text}"
    );
}

#[test]
fn tail_resp_prints_replication_traffic_from_replhub() {
    let server = start(IoBackend::Epoll, 2, RespConfig::default());
    tail_prints_the_channel(server.resp_addr().expect("resp"));
    server.shutdown().expect("clean shutdown");
}

#[test]
fn tail_resp_prints_replication_traffic_from_a_real_redis() {
    let redis = resp_common::RedisServer::start(&[]);
    tail_prints_the_channel(redis.addr);
}

/// RESP clients appear in the per-connection metrics like workers, named by `CLIENT SETNAME`
/// (else their address), and RDATA published is counted by stream and writer instance.
#[test]
fn metrics_name_resp_clients_and_count_rdata_by_writer() {
    let mut config = replhub::config::ServeConfig::new(replhub::config::SourceConfig::None);
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.resp_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.threads = 2;
    config.io = IoBackend::Epoll;
    let server = replhub::server::Server::start(config).expect("server starts");
    let addr = server.resp_addr().expect("resp");
    let mut sub = Client::connect(addr);
    assert_eq!(sub.call(&["CLIENT", "SETNAME", "synapse-main-sub"]), Reply::Simple("OK".into()));
    subscribe(&mut sub, &["sn"]);
    let mut publ = Client::connect(addr);
    let anon = publ.stream.local_addr().expect("addr").to_string();
    for row in ["RDATA events master 5 [1]", "RDATA events persister1 6 [1]", "RDATA events master 7 [1]"] {
        assert_eq!(publ.call(&["PUBLISH", "sn", row]), Reply::Int(1));
    }
    for _ in 0..3 {
        message(&sub.read());
    }
    let scrape = || {
        let mut http =
            std::net::TcpStream::connect(server.metrics_addr().expect("metrics")).expect("connect");
        http.set_read_timeout(Some(WAIT)).expect("timeout");
        http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut http, &mut text).expect("response");
        text
    };
    let text = scrape();
    for line in [
        "synapse_replication_tcp_protocol_pending_commands{name=\"synapse-main-sub\"} 0".to_owned(),
        format!("synapse_replication_tcp_protocol_pending_commands{{name=\"{anon}\"}} 0"),
        "replhub_resp_published_total 3".to_owned(),
        "replhub_resp_rdata_published_total{instance=\"master\",stream=\"events\"} 2".to_owned(),
        "replhub_resp_rdata_published_total{instance=\"persister1\",stream=\"events\"} 1".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
    server.shutdown().expect("clean shutdown");
}
