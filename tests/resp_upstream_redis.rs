//! `--upstream-redis`: replhub bridged to a real `redis-server`. Clients of both see every
//! message on the Synapse channels exactly once, in each publisher's order; channels that are
//! not bridged stay local.
// Real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
mod resp_common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use replhub::config::{BackoffConfig, IoBackend, RedisUpstream};
use replhub::server::Server;
use resp_common::{
    bridge_config, message, publish_both_ways, read_ordered, subscribe_one as subscribe, wait_metric,
    wait_numsub, Client, RedisServer, Reply, BACKENDS, WAIT,
};

const N: usize = 100;

fn bridged(io: IoBackend, redis: &RedisServer) -> Server {
    bridged_with(io, redis, None)
}

fn bridged_with(io: IoBackend, redis: &RedisServer, metrics: Option<SocketAddr>) -> Server {
    let upstream = RedisUpstream::parse(&format!("redis://{}", redis.addr), "sn").expect("url");
    let mut config = bridge_config(io, upstream);
    config.metrics_listen = metrics;
    // Quick retries: the restart test waits for one.
    let backoff = BackoffConfig { initial_ms: 20, max_ms: 200, jitter_percent: 20 };
    Server::start_with(config, backoff).expect("server starts")
}

/// Reads `n` messages on channel `sn` published as `<who> <seq>`; checks that each publisher
/// in `who` is seen in its own order, and returns how many came from each.
fn read_from(c: &mut Client, who: &[&str], n: usize) -> Vec<usize> {
    let mut next = vec![0usize; who.len()];
    for _ in 0..n {
        let (channel, payload) = message(&c.read());
        assert_eq!(channel, "sn");
        let (name, seq) = payload.split_once(' ').expect("who seq");
        let i = who.iter().position(|w| *w == name).unwrap_or_else(|| panic!("unknown publisher {name}"));
        assert_eq!(seq.parse::<usize>().expect("seq"), next[i], "publisher {name} out of order");
        next[i] += 1;
    }
    next
}

/// Nothing twice: the next thing a subscriber gets is the answer to its PING.
fn nothing_more(c: &mut Client) {
    assert_eq!(c.call(&["PING"]), Reply::Array(vec![Reply::bulk("pong"), Reply::bulk("")]));
}

/// One replhub per machine on a shared Redis: two replhubs on one real Redis, subscribers on
/// each (several, so that both cores of each have some) and on Redis itself, a publisher on
/// each of the three. Every subscriber gets every message once, in each publisher's order.
fn two_replhubs_share_one_redis(io: IoBackend) {
    const SUBS: usize = 4;
    let redis = RedisServer::start(&[]);
    let hubs = [bridged(io, &redis), bridged(io, &redis)];
    let addrs: Vec<SocketAddr> = hubs.iter().map(|h| h.resp_addr().expect("resp")).collect();
    let mut probe = Client::connect(redis.addr);
    wait_numsub(&mut probe, "sn", 2);
    let mut subs = Vec::new();
    for addr in [addrs[0], addrs[1], redis.addr] {
        for _ in 0..SUBS {
            let mut c = Client::connect(addr);
            subscribe(&mut c, "sn");
            subs.push(c);
        }
    }
    // Each replhub counts as one subscriber on the real Redis, however many it serves.
    wait_numsub(&mut probe, "sn", 2 + SUBS as i64);
    let who = ["a", "b", "redis"];
    let mut pubs: Vec<Client> = [addrs[0], addrs[1], redis.addr].into_iter().map(Client::connect).collect();
    // Pipelined, so that messages from the three meet in flight rather than take turns.
    for i in 0..N {
        for (p, name) in pubs.iter_mut().zip(who) {
            p.send(&["PUBLISH", "sn", &format!("{name} {i}")]);
        }
    }
    for (p, name) in pubs.iter_mut().zip(who) {
        for _ in 0..N {
            let Reply::Int(n) = p.read() else { panic!("{name}: PUBLISH did not answer an integer") };
            // replhub counts its own subscribers; Redis counts its own and the two replhubs.
            let expected = if name == "redis" { 2 + SUBS } else { SUBS };
            assert_eq!(n, expected as i64, "{name}: receivers");
        }
    }
    for c in &mut subs {
        assert_eq!(read_from(c, &who, 3 * N), vec![N; 3]);
        nothing_more(c);
    }
    for h in hubs {
        h.shutdown().expect("clean shutdown");
    }
}

#[test]
fn two_replhubs_share_one_redis_epoll() {
    two_replhubs_share_one_redis(BACKENDS[0]);
}

#[test]
fn two_replhubs_share_one_redis_uring() {
    two_replhubs_share_one_redis(BACKENDS[1]);
}

/// The real Redis goes away and comes back on the same port: replhub shows the gap in
/// /metrics, keeps its clients, resubscribes, publishes REPLICATE on the server's channel (so
/// that Synapse's processes answer with POSITION and catch up what the gap cost), and
/// messages flow both ways again.
fn the_bridge_survives_a_redis_restart(io: IoBackend) {
    let redis = RedisServer::start(&[]);
    let port = redis.addr.port();
    let server = bridged_with(io, &redis, Some("127.0.0.1:0".parse().expect("addr")));
    let metrics = server.metrics_addr().expect("metrics");
    let addr = server.resp_addr().expect("resp");
    let mut probe = Client::connect(redis.addr);
    wait_numsub(&mut probe, "sn", 1);
    wait_metric(metrics, "replhub_upstream_connected 1");
    let mut local_sub = Client::connect(addr);
    subscribe(&mut local_sub, "sn");
    let mut local_pub = Client::connect(addr);

    drop(probe);
    drop(redis);
    wait_metric(metrics, "replhub_upstream_connected 0");
    // Published while the link is down: nobody beyond replhub can get it, and it is counted.
    assert_eq!(local_pub.call(&["PUBLISH", "sn", "lost"]), Reply::Int(1));
    wait_metric(metrics, "replhub_upstream_forwards_dropped_total 1");

    let redis = RedisServer::start_on(port, &[]);
    let mut remote_sub = Client::connect(redis.addr);
    subscribe(&mut remote_sub, "sn");
    let mut probe = Client::connect(redis.addr);
    wait_numsub(&mut probe, "sn", 2);
    wait_metric(metrics, "replhub_upstream_connected 1");
    wait_metric(metrics, "replhub_upstream_reconnects_total 1");
    // The REPLICATE goes out once the subscription is in place, so replhub's own clients see
    // it too; the remote subscriber may have subscribed just after it was published.
    assert_eq!(message(&local_sub.read()), ("sn".to_owned(), "REPLICATE ".to_owned()));
    let mut remote_pub = Client::connect(redis.addr);
    assert_eq!(local_pub.call(&["PUBLISH", "sn", "local 0"]), Reply::Int(1));
    assert_eq!(remote_pub.call(&["PUBLISH", "sn", "remote 0"]), Reply::Int(2));
    assert_eq!(read_ordered(&mut local_sub, 2), [1, 1]);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (_, payload) = message(&remote_sub.read());
        if payload != "REPLICATE " {
            seen.push(payload);
        }
    }
    seen.sort();
    assert_eq!(seen, ["local 0", "remote 0"]);
    nothing_more(&mut local_sub);
    server.shutdown().expect("clean shutdown");
}

#[test]
fn the_bridge_survives_a_redis_restart_epoll() {
    the_bridge_survives_a_redis_restart(BACKENDS[0]);
}

#[test]
fn the_bridge_survives_a_redis_restart_uring() {
    the_bridge_survives_a_redis_restart(BACKENDS[1]);
}

fn messages_cross_the_bridge_once_each_way(io: IoBackend) {
    let redis = RedisServer::start(&[]);
    let server = bridged(io, &redis);
    let addr = server.resp_addr().expect("resp");
    let mut remote_sub = Client::connect(redis.addr);
    subscribe(&mut remote_sub, "sn");
    let mut local_sub = Client::connect(addr);
    subscribe(&mut local_sub, "sn");
    // Until replhub's subscription is in place on the real Redis, it has one subscriber.
    let mut probe = Client::connect(redis.addr);
    wait_numsub(&mut probe, "sn", 2);
    let mut local_pub = Client::connect(addr);
    let mut remote_pub = Client::connect(redis.addr);
    publish_both_ways(&mut local_pub, &mut remote_pub, [&mut local_sub, &mut remote_sub], N);
    // A channel that is not bridged stays local.
    let mut other = Client::connect(addr);
    subscribe(&mut other, "elsewhere");
    assert_eq!(local_pub.call(&["PUBLISH", "elsewhere", "x"]), Reply::Int(1));
    assert_eq!(message(&other.read()), ("elsewhere".to_owned(), "x".to_owned()));
    assert_eq!(
        probe.call(&["PUBSUB", "NUMSUB", "elsewhere"]),
        Reply::Array(vec![Reply::bulk("elsewhere"), Reply::Int(0)])
    );
    server.shutdown().expect("clean shutdown");
}

#[test]
fn messages_cross_the_bridge_once_each_way_epoll() {
    messages_cross_the_bridge_once_each_way(BACKENDS[0]);
}

#[test]
fn messages_cross_the_bridge_once_each_way_uring() {
    messages_cross_the_bridge_once_each_way(BACKENDS[1]);
}

/// A Redis that wants a password replhub was not given answers SUBSCRIBE with `-NOAUTH`: no
/// subscription, so the bridge is not up; it retries with backoff and counts the failures.
#[test]
fn a_refused_subscribe_is_a_failed_connect() {
    let redis = RedisServer::start(&["--requirepass", "secret"]);
    let server = bridged(BACKENDS[0], &redis);
    let deadline = Instant::now() + WAIT;
    loop {
        let up = server.upstream_snapshot(WAIT).expect("snapshot");
        assert!(!up.connected, "a refused SUBSCRIBE taken for a subscription");
        if up.connect_failures >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "only {} failed connects", up.connect_failures);
        std::thread::sleep(Duration::from_millis(20));
    }
    server.shutdown().expect("clean shutdown");
}
