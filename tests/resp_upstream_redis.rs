//! `--upstream-redis`: replhub bridged to a real `redis-server`. Clients of both see every
//! message on the Synapse channels exactly once, in each publisher's order; channels that are
//! not bridged stay local.
// Real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
mod resp_common;

use std::time::{Duration, Instant};

use replhub::config::{IoBackend, RedisUpstream, ServeConfig, SourceConfig};
use replhub::server::Server;
use resp_common::{message, Client, RedisServer, Reply, BACKENDS, WAIT};

const N: usize = 100;

fn bridged(io: IoBackend, redis: &RedisServer) -> Server {
    let upstream = RedisUpstream::parse(&format!("redis://{}", redis.addr), "sn").expect("url");
    let mut config = ServeConfig::new(SourceConfig::Redis(upstream.clone()));
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.resp_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.resp.upstream_channels = upstream.channels;
    config.metrics_listen = None;
    config.threads = 2;
    config.io = io;
    Server::start(config).expect("server starts")
}

fn subscribe(c: &mut Client, ch: &str) {
    assert_eq!(
        c.call(&["SUBSCRIBE", ch]),
        Reply::Array(vec![Reply::bulk("subscribe"), Reply::bulk(ch), Reply::Int(1)])
    );
}

/// Reads `n` messages; checks each publisher's order; returns how many came from each.
fn read_ordered(c: &mut Client, n: usize) -> [usize; 2] {
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
    let deadline = Instant::now() + WAIT;
    loop {
        let r = probe.call(&["PUBSUB", "NUMSUB", "sn"]);
        if r == Reply::Array(vec![Reply::bulk("sn"), Reply::Int(2)]) {
            break;
        }
        assert!(Instant::now() < deadline, "replhub never subscribed on the real Redis: {r:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut local_pub = Client::connect(addr);
    let mut remote_pub = Client::connect(redis.addr);
    for i in 0..N {
        assert_eq!(local_pub.call(&["PUBLISH", "sn", &format!("local {i}")]), Reply::Int(1));
        // The real Redis counts replhub as one subscriber, and its own.
        assert_eq!(remote_pub.call(&["PUBLISH", "sn", &format!("remote {i}")]), Reply::Int(2));
    }
    assert_eq!(read_ordered(&mut local_sub, 2 * N), [N, N]);
    assert_eq!(read_ordered(&mut remote_sub, 2 * N), [N, N]);
    // Nothing twice: the next thing each sees is the answer to its PING.
    for c in [&mut local_sub, &mut remote_sub] {
        assert_eq!(c.call(&["PING"]), Reply::Array(vec![Reply::bulk("pong"), Reply::bulk("")]));
    }
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
