//! `--upstream-redis rediss://…` (and `tail --resp rediss://…`): the bridge over TLS to a real
//! `redis-server` that checks clients' certificates (`tls-auth-clients yes`, Redis's default)
//! and asks for a password.
//! The certificates are made here (a CA, the server's for 127.0.0.1, a client's); the real
//! Redis also listens in plain TCP on another port, which the test's own clients use.
// Real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
mod resp_common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use replhub::config::{BackoffConfig, IoBackend, RedisUpstream};
use replhub::server::Server;
use resp_common::{
    bridge_config, free_port, numsub, on_a_free_port, on_both_backends, publish_both_ways,
    subscribe_one as subscribe, wait_numsub, Client, RedisServer, Reply, WAIT,
};

const N: usize = 50;
const PASSWORD: &str = "tls-test-password";

/// A CA, and certificates it signed, as PEM files in a directory removed on drop.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA named `ca_name`, a server certificate for 127.0.0.1 and localhost, and a client
    /// certificate, all under a fresh directory.
    fn new(ca_name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("replhub-redis-tls-{}-{ca_name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, ca_name);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let pki = Self { dir };
        pki.write("ca.pem", &ca_cert.pem());
        for (name, sans) in
            [("server", vec!["127.0.0.1".to_owned(), "localhost".to_owned()]), ("client", vec![])]
        {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.signed_by(&key, &issuer).expect("signed");
            pki.write(&format!("{name}.pem"), &cert.pem());
            pki.write(&format!("{name}.key"), &key.serialize_pem());
        }
        pki
    }

    fn write(&self, name: &str, body: &str) {
        std::fs::write(self.path(name), body).expect("write PEM");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().expect("utf-8 path").to_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real Redis with a plain port (for the test's clients) and a TLS port (for replhub).
struct TlsRedis {
    redis: RedisServer,
    tls_port: u16,
    password: bool,
}

impl TlsRedis {
    /// With `password`, Redis also asks for [`PASSWORD`]. Both ports are drawn again when either
    /// was taken (`on_a_free_port`).
    fn start(pki: &Pki, password: bool) -> Self {
        let files = [pki.arg("server.pem"), pki.arg("server.key"), pki.arg("ca.pem")];
        on_a_free_port("redis-server with TLS", |port| {
            let tls_port = free_port().to_string();
            let mut args =
                vec!["--tls-port", &tls_port, "--tls-cert-file", &files[0], "--tls-key-file", &files[1]];
            args.extend(["--tls-ca-cert-file", &files[2], "--tls-auth-clients", "yes"]);
            if password {
                args.extend(["--requirepass", PASSWORD]);
            }
            let redis = RedisServer::try_start_on(port, &args)?;
            Some(Self { redis, tls_port: tls_port.parse().expect("port"), password })
        })
    }

    /// A client on the plain port, authenticated.
    fn client(&self) -> Client {
        let mut c = Client::connect(self.redis.addr);
        if self.password {
            assert_eq!(c.call(&["AUTH", PASSWORD]), Reply::Simple("OK".into()));
        }
        c
    }
}

/// replhub bridged to `redis` over TLS, trusting the CA of `pki` and, with `client_cert`,
/// presenting its client certificate.
fn bridged(io: IoBackend, redis: &TlsRedis, pki: &Pki, client_cert: bool) -> Server {
    let auth = if redis.password { format!(":{PASSWORD}@") } else { String::new() };
    let url = format!("rediss://{auth}127.0.0.1:{}", redis.tls_port);
    let mut upstream = RedisUpstream::parse(&url, "sn").expect("url");
    let tls = upstream.tls.as_mut().expect("rediss:// means TLS");
    assert_eq!(tls.server_name, "127.0.0.1");
    tls.ca_file = Some(pki.path("ca.pem"));
    if client_cert {
        tls.client_cert = Some((pki.path("client.pem"), pki.path("client.key")));
    }
    let config = bridge_config(io, upstream);
    let backoff = BackoffConfig { initial_ms: 20, max_ms: 100, jitter_percent: 20 };
    Server::start_with(config, backoff).expect("server starts")
}

fn messages_cross_a_tls_bridge_once_each_way(io: IoBackend) {
    let pki = Pki::new(&format!("ca-{io:?}"));
    let redis = TlsRedis::start(&pki, true);
    let server = bridged(io, &redis, &pki, true);
    let addr = server.resp_addr().expect("resp");
    let mut remote_sub = redis.client();
    subscribe(&mut remote_sub, "sn");
    let mut local_sub = Client::connect(addr);
    subscribe(&mut local_sub, "sn");
    // replhub's subscription, over TLS, makes the second subscriber.
    let mut probe = redis.client();
    wait_numsub(&mut probe, "sn", 2);
    let mut local_pub = Client::connect(addr);
    let mut remote_pub = redis.client();
    publish_both_ways(&mut local_pub, &mut remote_pub, [&mut local_sub, &mut remote_sub], N);
    let up = server.upstream_snapshot(WAIT).expect("snapshot");
    assert!(up.connected);
    assert_eq!(up.connect_failures, 0);
    server.shutdown().expect("clean shutdown");
}

on_both_backends!(messages_cross_a_tls_bridge_once_each_way);

/// `server`, bridged to `redis`, fails to connect at least three times (never connected), and
/// `redis` never sees its subscription.
fn assert_refused(server: Server, redis: &TlsRedis) {
    wait_failures(&server, 3);
    assert_eq!(numsub(&mut redis.client()), Reply::Array(vec![Reply::bulk("sn"), Reply::Int(0)]));
    server.shutdown().expect("clean shutdown");
}

/// Waits until `server` has failed to connect at least `n` times; asserts it never connected.
fn wait_failures(server: &Server, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let up = server.upstream_snapshot(WAIT).expect("snapshot");
        assert!(!up.connected, "connected to a Redis it must refuse");
        if up.connect_failures >= n {
            return;
        }
        assert!(Instant::now() < deadline, "only {} failed connects", up.connect_failures);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server certificate from another CA is refused, and retried with backoff; the real Redis
/// never sees replhub subscribe.
#[test]
fn a_redis_certificate_from_another_ca_is_refused() {
    let pki = Pki::new("ca-real");
    let other = Pki::new("ca-other");
    let redis = TlsRedis::start(&pki, true);
    assert_refused(bridged(IoBackend::Epoll, &redis, &other, true), &redis);
}

/// A Redis that checks clients' certificates refuses replhub without one. The refusal comes
/// after the handshake, with the first reply: to AUTH, or without a password to SUBSCRIBE.
#[test]
fn a_redis_that_wants_a_client_certificate_refuses_one_without() {
    let pki = Pki::new("ca-no-client");
    for password in [true, false] {
        let redis = TlsRedis::start(&pki, password);
        assert_refused(bridged(IoBackend::Epoll, &redis, &pki, false), &redis);
    }
}

/// `replhub tail --resp rediss://…` with a client certificate prints what is published on a
/// real Redis that only lets such clients in over TLS.
#[test]
fn tail_follows_a_tls_redis() {
    let pki = Pki::new("ca-tail");
    let redis = TlsRedis::start(&pki, true);
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{}", redis.tls_port);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_replhub"))
        .args(["tail", "--resp", &url, "--channel", "sn", "--decode", "--count", "1"])
        .args(["--ca", &pki.arg("ca.pem"), "--cert", &pki.arg("client.pem"), "--key", &pki.arg("client.key")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tail starts");
    let mut publ = redis.client();
    // Until tail's subscription is in place, its channel has no receivers.
    let deadline = Instant::now() + WAIT;
    while publ.call(&["PUBLISH", "sn", "POSITION events master 1 1"]) == Reply::Int(0) {
        assert!(Instant::now() < deadline, "tail never subscribed over TLS");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(publ.call(&["PUBLISH", "sn", r#"RDATA typing w1 7 ["!r:x",["@u:x"]]"#]), Reply::Int(1));
    let out = child.wait_with_output().expect("tail exits after --count");
    assert!(out.status.success(), "tail failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let last = text.lines().last().unwrap_or_default();
    assert!(last.starts_with(r#"{"stream":"typing","instance":"w1","token":7,"row":"#), "{text}");
}

/// tail refuses TLS files without a rediss:// URL, and names a CA file it cannot read.
#[test]
fn tail_names_what_is_wrong_with_its_tls_options() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_replhub"))
            .arg("tail")
            .args(args)
            .output()
            .expect("runs");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(&["--resp", "127.0.0.1:1", "--ca", "/x.pem"]).contains("need a rediss:// URL"));
    assert!(run(&["--resp", "rediss://127.0.0.1:1", "--ca", "/nonexistent/ca.pem"])
        .contains("CA file /nonexistent/ca.pem"));
}
