//! `--upstream-redis` with TCP replication workers (`--listen`, no `--resp-listen`): replhub
//! subscribed once on a real `redis-server`, and Synapse 1.22+-generation workers over raw
//! TCP sockets. Each worker gets the commands on the server's channel that a master relays
//! (RDATA, POSITION, REMOTE_SERVER_UP) exactly once, in the Redis's order, byte for byte; its
//! REPLICATE makes replhub publish `REPLICATE ` there (one for many workers); its commands
//! reach the Redis as Synapse publishes them; a Redis restart keeps the workers connected.
// Real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
mod resp_common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use replhub::config::{BackoffConfig, IoBackend, RedisUpstream, ServeConfig, SourceConfig};
use replhub::server::Server;
use resp_common::{message, on_both_backends, wait_metric, wait_numsub, Client, RedisServer, Reply, WAIT};

/// replhub bridged to `redis` with TCP workers only.
fn bridged(io: IoBackend, redis: &RedisServer, metrics: bool, backoff: BackoffConfig) -> Server {
    let upstream = RedisUpstream::parse(&format!("redis://{}", redis.addr), "sn").expect("url");
    let mut config = ServeConfig::new(SourceConfig::Redis(upstream));
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.metrics_listen = metrics.then(|| "127.0.0.1:0".parse().expect("addr"));
    config.threads = 2;
    config.io = io;
    Server::start_with(config, backoff).expect("server starts")
}

fn quick_backoff() -> BackoffConfig {
    BackoffConfig { initial_ms: 20, max_ms: 200, jitter_percent: 20 }
}

/// A Synapse 1.22+ worker over a raw socket.
struct Worker {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Worker {
    /// Connects and reads the greeting (not yet NAME or REPLICATE).
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut w = Self { stream, reader };
        assert_eq!(w.line(), "SERVER sn", "replhub greets with --server-name");
        w
    }

    fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).expect("write");
    }

    /// The next line other than PING, without its `\n`.
    fn line(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read a line");
            assert!(n > 0, "replhub closed the worker's connection");
            assert!(line.ends_with('\n'));
            line.pop();
            if !line.starts_with("PING ") {
                return line;
            }
        }
    }

    /// Reads until `want`, returning what came before it.
    fn until(&mut self, want: &str) -> Vec<String> {
        let mut before = Vec::new();
        loop {
            let l = self.line();
            if l == want {
                return before;
            }
            assert!(!l.starts_with("ERROR"), "the worker got {l:?}");
            before.push(l);
        }
    }
}

/// A raw subscriber on the real Redis to both Synapse channels.
fn watch(redis: &RedisServer) -> Client {
    let mut c = Client::connect(redis.addr);
    c.send(&["SUBSCRIBE", "sn", "sn/USER_IP"]);
    for (ch, n) in [("sn", 1), ("sn/USER_IP", 2)] {
        assert_eq!(c.read(), Reply::Array(vec![Reply::bulk("subscribe"), Reply::bulk(ch), Reply::Int(n)]));
    }
    c
}

/// Publishes `payloads` on `sn`, pipelined; each must reach `receivers` subscribers.
fn publish(writer: &mut Client, payloads: &[String], receivers: i64) {
    for p in payloads {
        writer.send(&["PUBLISH", "sn", p]);
    }
    for p in payloads {
        assert_eq!(writer.read(), Reply::Int(receivers), "PUBLISH {p}");
    }
}

/// The messages `c` receives until `(channel, payload)` (excluded).
fn messages_until(c: &mut Client, channel: &str, payload: &str) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    loop {
        let m = message(&c.read());
        if m.0 == channel && m.1 == payload {
            return seen;
        }
        seen.push(m);
    }
}

/// The rows two writers publish (`master` writes events, `persister` typing and events),
/// with what no worker must get mixed in: commands for writers, an unparsable row, a word
/// 1.66 does not know.
fn traffic(rounds: usize) -> (Vec<String>, Vec<String>) {
    let mut published = Vec::new();
    let mut relayed = Vec::new();
    for p in
        ["POSITION events master 100 100", "POSITION events persister 50 50", "POSITION typing persister 7 7"]
    {
        published.push(p.to_owned());
        relayed.push(p.to_owned());
    }
    for i in 0..rounds {
        let t = 101 + 2 * i as i64;
        let rows = [
            format!(
                r#"RDATA events master batch ["$a{i}:sn","!r:sn","m.room.message",null,null,null,null,false,false]"#
            ),
            format!(
                r#"RDATA events master {t} ["$b{i}:sn","!r:sn","m.room.message",null,null,null,null,false,false]"#
            ),
            format!(r#"RDATA typing persister {} ["!r:sn",["@u{i}:sn"]]"#, 8 + i),
            format!(
                r#"RDATA events persister {} ["$c{i}:sn","!q:sn","m.room.member","@u:sn","join",null,"join",false,false]"#,
                51 + i
            ),
        ];
        for r in rows {
            published.push(r.clone());
            relayed.push(r);
        }
        if i % 10 == 0 {
            published.push(format!("USER_SYNC abcde @u{i}:sn start 1700000000000"));
            published.push("REPLICATE ".to_owned());
            published.push(format!("RDATA events master {} not json", t + 1));
            published.push(format!("LOCK_RELEASED lock{i} key {i}"));
            published.push(format!("POSITION events master {t}"));
        }
    }
    (published, relayed)
}

fn tcp_workers_get_what_a_master_relays(io: IoBackend) {
    const WORKERS: usize = 8;
    let redis = RedisServer::start(&[]);
    let server = bridged(io, &redis, false, quick_backoff());
    let mut watch = watch(&redis);
    wait_numsub(&mut Client::connect(redis.addr), "sn", 2);
    let mut workers: Vec<Worker> = (0..WORKERS).map(|_| Worker::connect(server.local_addr())).collect();
    // Every worker at once; the REMOTE_SERVER_UP after its REPLICATE shows (once it reaches the
    // Redis) that its subscription is in place, since a connection's lines are handled in order.
    for (i, w) in workers.iter_mut().enumerate() {
        w.send(&format!("NAME w{i}\nREPLICATE\nREMOTE_SERVER_UP ready{i}\n"));
    }
    let mut ready = 0;
    let mut replicates = 0;
    while ready < WORKERS {
        match message(&watch.read()) {
            (ch, p) if ch == "sn" && p == "REPLICATE " => replicates += 1,
            (ch, p) if ch == "sn" && p.starts_with("REMOTE_SERVER_UP ready") => ready += 1,
            other => panic!("unexpected on the Redis: {other:?}"),
        }
    }
    // A REPLICATE asked for after the last one waits for the pacing interval (500 ms): count
    // what comes within twice that.
    while let Some(r) = watch.read_within(Duration::from_secs(1)) {
        assert_eq!(message(&r), ("sn".to_owned(), "REPLICATE ".to_owned()));
        replicates += 1;
    }
    assert!((1..=2).contains(&replicates), "{WORKERS} workers at once cost {replicates} REPLICATEs");

    let mut writer = Client::connect(redis.addr);
    publish(&mut writer, &["REMOTE_SERVER_UP start.example".to_owned()], 2);
    let (published, relayed) = traffic(60);
    publish(&mut writer, &published, 2);
    publish(&mut writer, &["REMOTE_SERVER_UP done.example".to_owned()], 2);
    for (i, w) in workers.iter_mut().enumerate() {
        w.until("REMOTE_SERVER_UP start.example");
        assert_eq!(w.until("REMOTE_SERVER_UP done.example"), relayed, "worker {i}");
    }
    // The Redis saw them all (and nothing from replhub: its workers sent nothing).
    let seen = messages_until(&mut watch, "sn", "REMOTE_SERVER_UP done.example");
    assert_eq!(seen.len(), published.len() + 1);

    // A worker's commands, as Synapse 1.60+ publishes them: USER_IP on its own channel.
    let user_ip = r#"USER_IP @u:sn ["syt_token","10.0.0.1","Mozilla/5.0",null,1700000000000]"#;
    let commands = [
        "USER_SYNC abcde @u:sn start 1700000000000",
        "FEDERATION_ACK federation_sender 42",
        user_ip,
        "CLEAR_USER_SYNC abcde",
        "REMOTE_SERVER_UP other.example",
    ];
    workers[0].send(&commands.iter().map(|c| format!("{c}\n")).collect::<String>());
    let mut got = messages_until(&mut watch, "sn", "REMOTE_SERVER_UP other.example");
    got.push(("sn".to_owned(), "REMOTE_SERVER_UP other.example".to_owned()));
    let want: Vec<(String, String)> = commands
        .iter()
        .map(|c| (if c.starts_with("USER_IP") { "sn/USER_IP" } else { "sn" }.to_owned(), (*c).to_owned()))
        .collect();
    assert_eq!(got, want);
    // Their echoes come back from the Redis: only REMOTE_SERVER_UP is for workers, and every
    // one gets it once, its sender included (as a Synapse process on the Redis does).
    publish(&mut writer, &["REMOTE_SERVER_UP end.example".to_owned()], 2);
    for w in &mut workers {
        assert_eq!(w.until("REMOTE_SERVER_UP end.example"), vec!["REMOTE_SERVER_UP other.example"]);
    }
    server.shutdown().expect("clean shutdown");
}

/// Synapse processes on replhub's RESP listener and TCP workers on the same replhub: a stream
/// writer publishing through replhub reaches the TCP workers (through the Redis, once), and a
/// TCP worker's command reaches the RESP subscribers (the same way, once).
fn resp_clients_and_tcp_workers_share_the_bridge(io: IoBackend) {
    let redis = RedisServer::start(&[]);
    let upstream = RedisUpstream::parse(&format!("redis://{}", redis.addr), "sn").expect("url");
    let server =
        Server::start_with(resp_common::bridge_config(io, upstream), quick_backoff()).expect("server starts");
    let resp = server.resp_addr().expect("resp");
    let mut watch = watch(&redis);
    wait_numsub(&mut Client::connect(redis.addr), "sn", 2);
    let mut local_sub = Client::connect(resp);
    assert_eq!(
        local_sub.call(&["SUBSCRIBE", "sn"]),
        Reply::Array(vec![Reply::bulk("subscribe"), Reply::bulk("sn"), Reply::Int(1)])
    );
    let mut w = Worker::connect(server.local_addr());
    w.send("NAME w\nREPLICATE\n");
    let replicate = ("sn".to_owned(), "REPLICATE ".to_owned());
    assert_eq!(message(&watch.read()), replicate);
    assert_eq!(message(&local_sub.read()), replicate, "replhub's own subscribers see its REPLICATE too");

    // A writer on replhub's RESP listener: its PUBLISH counts replhub's one subscriber.
    let row = r#"RDATA caches w9 7 ["get_user_by_id",["@u:sn"],7000]"#;
    let mut local_pub = Client::connect(resp);
    assert_eq!(local_pub.call(&["PUBLISH", "sn", row]), Reply::Int(1));
    assert_eq!(w.line(), row);
    assert_eq!(message(&local_sub.read()), ("sn".to_owned(), row.to_owned()));
    let user_sync = "USER_SYNC abcde @u:sn start 1700000000000";
    w.send(&format!("{user_sync}\n"));
    for c in [&mut watch, &mut local_sub] {
        let m = message(&c.read());
        if m.1 == row {
            // The watcher on the Redis saw the writer's row first.
            assert_eq!(message(&c.read()), ("sn".to_owned(), user_sync.to_owned()));
        } else {
            assert_eq!(m, ("sn".to_owned(), user_sync.to_owned()));
        }
    }
    // Nothing twice: the next thing each side gets is what comes next.
    assert_eq!(local_sub.call(&["PING"]), Reply::Array(vec![Reply::bulk("pong"), Reply::bulk("")]));
    let mut writer = Client::connect(redis.addr);
    publish(&mut writer, &["REMOTE_SERVER_UP end.example".to_owned()], 2);
    assert_eq!(w.line(), "REMOTE_SERVER_UP end.example");
    server.shutdown().expect("clean shutdown");
}

/// The Redis goes away and comes back on the same port: the worker stays connected; what it
/// sent meanwhile is published once the link is back, after the `REPLICATE ` that makes the
/// writers re-announce their POSITIONs (which is how the worker sees the gap and catches up).
fn tcp_workers_survive_a_redis_restart(io: IoBackend) {
    let redis = RedisServer::start(&[]);
    let port = redis.addr.port();
    // Retries about a second apart, so that the test's own subscriber on the restarted Redis
    // is in place before replhub is (it must see replhub's first publishes there).
    let backoff = BackoffConfig { initial_ms: 1_000, max_ms: 2_000, jitter_percent: 20 };
    let server = bridged(io, &redis, true, backoff);
    let metrics = server.metrics_addr().expect("metrics");
    let mut watch = watch(&redis);
    wait_numsub(&mut Client::connect(redis.addr), "sn", 2);
    let mut w = Worker::connect(server.local_addr());
    w.send("NAME w\nREPLICATE\n");
    assert_eq!(message(&watch.read()), ("sn".to_owned(), "REPLICATE ".to_owned()));
    let mut writer = Client::connect(redis.addr);
    let row = r#"RDATA typing master 5 ["!r:sn",[]]"#.to_owned();
    publish(&mut writer, std::slice::from_ref(&row), 2);
    assert_eq!(w.line(), row);

    drop((watch, writer));
    drop(redis);
    wait_metric(metrics, "replhub_upstream_connected 0");
    w.send("USER_SYNC abcde @u:sn end 1700000000001\n");

    let redis = RedisServer::start_on(port, &[]);
    let mut watch = self::watch(&redis);
    wait_metric(metrics, "replhub_upstream_connected 1");
    wait_metric(metrics, "replhub_upstream_reconnects_total 1");
    assert_eq!(message(&watch.read()), ("sn".to_owned(), "REPLICATE ".to_owned()));
    assert_eq!(
        message(&watch.read()),
        ("sn".to_owned(), "USER_SYNC abcde @u:sn end 1700000000001".to_owned())
    );
    // A writer's answer to the REPLICATE, and its rows, reach the same connection as before.
    let mut writer = Client::connect(redis.addr);
    let answer = "POSITION typing master 9 9".to_owned();
    let row = r#"RDATA typing master 10 ["!r:sn",["@u:sn"]]"#.to_owned();
    publish(&mut writer, &[answer.clone(), row.clone()], 2);
    assert_eq!(w.line(), answer);
    assert_eq!(w.line(), row);
    server.shutdown().expect("clean shutdown");
}

on_both_backends!(
    tcp_workers_get_what_a_master_relays,
    tcp_workers_survive_a_redis_restart,
    resp_clients_and_tcp_workers_share_the_bridge,
);

/// The tests' own check (`RedisServer::try_start_on`): a port another process listens on is
/// not mistaken for the new redis-server's, which the tests here would then talk to instead.
#[test]
fn a_taken_port_is_not_taken_for_the_redis() {
    let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = other.local_addr().expect("addr").port();
    assert!(RedisServer::try_start_on(port, &[]).is_none(), "another listener was taken for the redis");
    drop(other);
}

/// The tests' check of who listens on a port (`listened_by`): this process on its own
/// listener, and not another process (a child, which does not inherit the socket).
#[test]
fn a_listener_is_found_by_its_process() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    assert!(resp_common::listened_by(std::process::id(), port), "this process's own listener");
    let mut other = std::process::Command::new("sleep").arg("30").spawn().expect("run sleep");
    let found = resp_common::listened_by(other.id(), port);
    let _ = other.kill();
    let _ = other.wait();
    assert!(!found, "another process was taken for the listener's");
}
