//! Redis mode against a real `redis-server`: the same bytes sent to both must get the same
//! bytes back, for scripted sessions (every command replhub knows, errors included), framing
//! errors, and authentication; and `redis-cli` drives replhub as it drives Redis.
// Real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
mod resp_common;

use replhub::config::IoBackend;
use replhub::resp::RespConfig;
use resp_common::{exchange, on_both_backends, start, Client, RedisServer};

fn cmd(args: &[&str]) -> Vec<u8> {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    Client::encode(&args)
}

fn script(cmds: &[&[&str]]) -> Vec<u8> {
    cmds.iter().flat_map(|c| cmd(c)).collect()
}

/// Sends each script to both servers and asserts identical replies.
fn same_replies(redis: &RedisServer, replhub: std::net::SocketAddr, scripts: &[Vec<u8>]) {
    for s in scripts {
        let want = exchange(redis.addr, s);
        let got = exchange(replhub, s);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "script {:?}",
            String::from_utf8_lossy(s)
        );
    }
}

fn a_scripted_session_gets_the_replies_redis_gives(io: IoBackend) {
    let redis = RedisServer::start(&[]);
    let server = start(io, 2, RespConfig::default());
    let addr = server.resp_addr().expect("resp");
    let mut session = script(&[
        &["PING"],
        &["ping", "hi"],
        &["PING", "a", "b"],
        &["ECHO", "x"],
        &["FOO"],
        &["SET", "k", "v"],
        &["GET", "k"],
        &["GET", "missing"],
        &["SET", "k", "w", "PX", "100000"],
        &["GET", "k"],
        &["SET", "k", "v", "PX"],
        &["SET", "k", "v", "ZZ", "1"],
        &["SET", "k", "v", "PX", "x"],
        &["SET", "k", "v", "EX", "0"],
        &["set", "k", "v", "ex", "100", "px", "100"],
        &["GET", "a", "b"],
        &["SELECT", "x"],
        &["SELECT", "16"],
        &["SELECT", "3"],
        &["GET", "k"],
        &["CLIENT"],
        &["CLIENT", "GETNAME"],
        &["CLIENT", "SETNAME", "a b"],
        &["CLIENT", "SETNAME"],
        &["CLIENT", "SETNAME", "w1"],
        &["client", "getname"],
        &["CLIENT", "FOO"],
        &["AUTH"],
        &["AUTH", "p"],
        &["AUTH", "u", "p"],
        &["AUTH", "default", "p"],
        &["AUTH", "a", "b", "c"],
        &["PUBLISH", "nobody", "x"],
        &["PUBLISH", "nobody"],
        &["UNSUBSCRIBE"],
        &["SUBSCRIBE"],
        &["SUBSCRIBE", "a", "b", "a"],
        &["PING"],
        &["PING", "x"],
        &["GET", "k"],
        &["PUBLISH", "a", "x"],
        &["FOO", "bar"],
        &["UNSUBSCRIBE", "b"],
        &["UNSUBSCRIBE", "zz"],
        &["UNSUBSCRIBE"],
        &["PING"],
    ]);
    session.extend_from_slice(b"FOO a 'b c'\r\nPING \"a b\"\r\n\r\n*0\r\n*-1\r\n");
    session.extend(script(&[&["RESET"], &["QUIT"], &["PING"]]));
    let long = "a".repeat(300);
    let unknown = script(&[&["FOO", &long, "x"], &["FOO", "a\r\nb", "c"], &["QUIT"]]);
    same_replies(&redis, addr, &[session, unknown]);
    server.shutdown().expect("clean shutdown");
}

fn framing_errors_close_as_redis_does(io: IoBackend) {
    let redis = RedisServer::start(&[]);
    let server = start(io, 1, RespConfig::default());
    let addr = server.resp_addr().expect("resp");
    let scripts: Vec<Vec<u8>> = [
        &b"*x\r\n"[..],
        b"*1\r\n$x\r\n",
        b"*1\r\n$-1\r\n",
        b"*1\r\nfoo\r\n",
        b"PING\r\n*x\r\nPING\r\n",
        b"PING \"a\r\n",
        b"PING 'a'b\r\n",
        b"*2\r\n$4\r\nPING\r\n$2\r\nhiXX*1\r\n$4\r\nQUIT\r\n",
        b"*1\r\n$600000000\r\n",
        b"\x0bPING\r\nPING\t\x0c x\r\nQUIT\r\n",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect();
    // A NUL hides the newline from Redis's inline parser: nothing is answered until the line
    // passes 64 KiB.
    let mut nul = b"PING\r\nPING\0x\r\nPING\r\n".to_vec();
    nul.extend(std::iter::repeat_n(b'x', 70_000));
    let scripts: Vec<Vec<u8>> = scripts.into_iter().chain([nul]).collect();
    same_replies(&redis, addr, &scripts);
    server.shutdown().expect("clean shutdown");
}

fn authentication_as_redis_requirepass(io: IoBackend) {
    let redis = RedisServer::start(&["--requirepass", "sekret"]);
    let mut config = RespConfig::default();
    config.session.password = Some("sekret".to_owned());
    let server = start(io, 1, config);
    let addr = server.resp_addr().expect("resp");
    let session = script(&[
        &["PING"],
        &["FOO"],
        &["SUBSCRIBE", "a"],
        &["AUTH", "x"],
        &["AUTH", "u", "sekret"],
        &["AUTH", "default", "sekret"],
        &["PING"],
        &["RESET"],
        &["GET", "k"],
        &["AUTH", "sekret"],
        &["GET", "k"],
        &["QUIT"],
    ]);
    let too_many = b"*11\r\n".to_vec();
    let too_long = b"*1\r\n$20000\r\n".to_vec();
    same_replies(&redis, addr, &[session, too_many, too_long]);
    server.shutdown().expect("clean shutdown");
}

fn redis_cli_drives_it(io: IoBackend) {
    let server = start(io, 2, RespConfig::default());
    let addr = server.resp_addr().expect("resp");
    let run = |args: &[&str]| -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-cli ({e}); install it (apt-get install -y redis-tools)")
            });
        assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(run(&["PING"]), "PONG\n");
    assert_eq!(run(&["SET", "cache_v1:x:y", "{\"a\":1}", "PX", "60000"]), "OK\n");
    assert_eq!(run(&["GET", "cache_v1:x:y"]), "{\"a\":1}\n");
    assert_eq!(run(&["PUBLISH", "sn", "REPLICATE "]), "0\n");
    assert!(run(&["FOO"]).starts_with("ERR unknown command 'FOO', with args beginning with: \n"));
    server.shutdown().expect("clean shutdown");
}

on_both_backends!(
    a_scripted_session_gets_the_replies_redis_gives,
    framing_errors_close_as_redis_does,
    authentication_as_redis_requirepass,
    redis_cli_drives_it,
);
