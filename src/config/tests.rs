//! Tests of the typed configuration: flags, files, and what validation refuses.
use super::*;

fn opts() -> ServeOptions {
    ServeOptions { synthetic: Some(10), ..ServeOptions::default() }
}

#[test]
fn sizes_and_durations() {
    assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
    assert_eq!(parse_bytes("256kib"), Ok(256 << 10));
    assert_eq!(parse_bytes("1000"), Ok(1000));
    assert_eq!(parse_bytes("2 GB"), Ok(2_000_000_000));
    assert!(parse_bytes("MiB").is_err());
    assert!(parse_bytes("5 parsecs").is_err());
    assert!(parse_bytes("99999999999999999999").is_err());
    assert_eq!(parse_duration_ms("10"), Ok(10_000));
    assert_eq!(parse_duration_ms("1.5"), Ok(1_500));
    assert_eq!(parse_duration_ms("500ms"), Ok(500));
    assert!(parse_duration_ms("soon").is_err());
    assert!(parse_duration_ms("1e400").is_err());
    assert!(parse_duration_ms("100us").is_err(), "milliseconds are the finest unit there");
    assert_eq!(parse_duration_us("100us"), Ok(100));
    assert_eq!(parse_duration_us("100µs"), Ok(100));
    assert_eq!(parse_duration_us("0.5ms"), Ok(500));
    assert_eq!(parse_duration_us("2"), Ok(2_000_000));
    assert!(parse_duration_us("100ns").is_err());
}

#[test]
fn exactly_one_source() {
    let none = ServeOptions::default();
    assert!(ServeConfig::from_options(&none).is_err());
    let both = ServeOptions { upstream: Some("h:1".into()), ..opts() };
    assert!(ServeConfig::from_options(&both).is_err());
    let bad = ServeOptions { upstream: Some("nohost".into()), ..ServeOptions::default() };
    assert!(ServeConfig::from_options(&bad).is_err());
}

#[test]
fn synthetic_defaults_to_localhost() {
    let c = ServeConfig::from_options(&opts()).expect("valid");
    assert_eq!(c.hub.server_name.as_deref(), Some("localhost"));
    let named = ServeOptions { server_name: Some("example.com".into()), ..opts() };
    let c = ServeConfig::from_options(&named).expect("valid");
    assert_eq!(c.hub.server_name.as_deref(), Some("example.com"));
    let up = ServeOptions { upstream: Some("master:9092".into()), ..ServeOptions::default() };
    let c = ServeConfig::from_options(&up).expect("valid");
    assert_eq!(c.hub.server_name, None);
}

#[test]
fn flags_win_over_the_file() {
    let file: ServeOptions = toml::from_str(
        "listen = \"127.0.0.1:1\"\nsynthetic = 5\nmax-pending-bytes = \"1MiB\"\nwrite_timeout = 2.5\nmetrics-listen = \"off\"\n",
    )
    .expect("toml");
    let flags = ServeOptions { listen: Some("127.0.0.1:2".into()), ..ServeOptions::default() };
    let c = ServeConfig::from_options(&flags.merge(file)).expect("valid");
    assert_eq!(c.listen, "127.0.0.1:2".parse().expect("addr"));
    assert_eq!(c.hub.max_pending_bytes, 1 << 20);
    assert_eq!(c.hub.write_timeout_ms, 2_500);
    assert_eq!(c.metrics_listen, None);
    assert!(matches!(c.source, SourceConfig::Synthetic { rate: 5, .. }));
}

#[test]
fn health_upstream_grace_flag_and_key() {
    assert_eq!(ServeConfig::from_options(&opts()).expect("valid").health_upstream_grace_ms, 30_000);
    let file: ServeOptions = toml::from_str("synthetic = 5\nhealth-upstream-grace = \"1m\"\n").expect("toml");
    assert_eq!(ServeConfig::from_options(&file).expect("valid").health_upstream_grace_ms, 60_000);
    let flag = ServeOptions { health_upstream_grace: Some(Quantity::Int(5)), ..opts() };
    assert_eq!(ServeConfig::from_options(&flag).expect("valid").health_upstream_grace_ms, 5_000);
    let bad = ServeOptions { health_upstream_grace: Some(Quantity::Text("soon".into())), ..opts() };
    let err = ServeConfig::from_options(&bad).unwrap_err().to_string();
    assert!(err.starts_with("--health-upstream-grace \"soon\""), "{err}");
}

#[test]
fn redis_mode_alone_is_a_source_and_reads_redis_units() {
    let opts = ServeOptions {
        resp_listen: Some("127.0.0.1:0".into()),
        listen: Some("127.0.0.1:0".into()),
        resp_output_limit: Some("1mb 2k 3".into()),
        ..ServeOptions::default()
    };
    let c = ServeConfig::from_options(&opts).expect("valid");
    assert_eq!(c.source, SourceConfig::None);
    assert_eq!(c.resp.output, crate::resp::OutputLimits { hard: 1 << 20, soft: 2_000, soft_ms: 3_000 });
    let bad = ServeOptions { resp_output_limit: Some("1mb".into()), ..opts };
    assert!(ServeConfig::from_options(&bad).is_err());
    let orphan =
        ServeOptions { resp_password: Some("x".into()), synthetic: Some(1), ..ServeOptions::default() };
    assert!(ServeConfig::from_options(&orphan).is_err());
}

#[test]
fn upstream_redis_serves_tcp_workers_with_or_without_redis_mode() {
    use crate::proto::{Generation, ProtocolChoice};
    let tcp_only = ServeOptions {
        upstream_redis: Some("redis://127.0.0.1:6379".into()),
        server_name: Some("sn".into()),
        ..ServeOptions::default()
    };
    let c = ServeConfig::from_options(&tcp_only).expect("no --resp-listen needed");
    assert!(c.hub.redis_bridge && c.resp_listen.is_none());
    assert_eq!(c.hub.protocol.pinned(), Some(Generation::V1_22));
    let older =
        ServeOptions { protocol: Some(ProtocolChoice::Pinned(Generation::V1_13)), ..tcp_only.clone() };
    assert_eq!(
        ServeConfig::from_options(&older).expect("valid").hub.protocol.pinned(),
        Some(Generation::V1_13)
    );
    let seed = ServeOptions { protocol: Some(ProtocolChoice::Pinned(Generation::Seed)), ..tcp_only.clone() };
    assert!(ServeConfig::from_options(&seed).is_err(), "no Redis before 1.13");
    let unnamed = ServeOptions { server_name: None, ..tcp_only };
    assert!(ServeConfig::from_options(&unnamed).unwrap_err().to_string().contains("--server-name"));
}

#[test]
fn rediss_urls_and_the_tls_files() {
    use std::path::PathBuf;
    let u = RedisUpstream::parse("rediss://user:pw@redis.internal:6380/0", "sn").expect("valid");
    assert_eq!(
        (u.addr.as_str(), u.user.as_deref(), u.password.as_deref()),
        ("redis.internal:6380", Some("user"), Some("pw"))
    );
    let tls = u.tls.expect("rediss:// is TLS");
    assert_eq!((tls.server_name.as_str(), tls.ca_file, tls.client_cert), ("redis.internal", None, None));
    assert_eq!(RedisUpstream::parse("redis://redis.internal:6379", "sn").expect("valid").tls, None);
    let v6 = RedisUpstream::parse("rediss://[::1]:6380", "sn").expect("valid");
    assert_eq!((v6.addr.as_str(), v6.tls.expect("tls").server_name.as_str()), ("[::1]:6380", "::1"));
    assert!(RedisUpstream::parse("http://redis.internal:6379", "sn")
        .unwrap_err()
        .to_string()
        .contains("rediss://"));

    let base = ServeOptions {
        upstream_redis: Some("rediss://redis.internal:6380".into()),
        server_name: Some("sn".into()),
        upstream_redis_ca: Some("/etc/redis/ca.pem".into()),
        upstream_redis_cert: Some("/etc/replhub/client.pem".into()),
        upstream_redis_key: Some("/etc/replhub/client.key".into()),
        ..ServeOptions::default()
    };
    let SourceConfig::Redis(r) = ServeConfig::from_options(&base).expect("valid").source else {
        panic!("a Redis source")
    };
    let tls = r.tls.expect("tls");
    assert_eq!(tls.ca_file, Some(PathBuf::from("/etc/redis/ca.pem")));
    assert_eq!(
        tls.client_cert,
        Some((PathBuf::from("/etc/replhub/client.pem"), PathBuf::from("/etc/replhub/client.key")))
    );
    let plain = ServeOptions { upstream_redis: Some("redis://redis.internal:6379".into()), ..base.clone() };
    assert!(ServeConfig::from_options(&plain).unwrap_err().to_string().contains("need a rediss:// URL"));
    let half = ServeOptions { upstream_redis_key: None, ..base };
    assert!(ServeConfig::from_options(&half).unwrap_err().to_string().contains("go together"));
    let file: ServeOptions = toml::from_str(
        "upstream-redis = \"rediss://r:6380\"\nupstream_redis_ca = \"/ca.pem\"\nupstream-redis-cert = \"/c.pem\"\nupstream-redis-key = \"/c.key\"",
    )
    .expect("file keys");
    assert_eq!(file.upstream_redis_ca, Some(PathBuf::from("/ca.pem")));
    assert_eq!(file.upstream_redis_key, Some(PathBuf::from("/c.key")));
}

#[test]
fn unknown_file_keys_are_errors() {
    assert!(toml::from_str::<ServeOptions>("listn = \"x\"").is_err());
    assert!(toml::from_str::<ServeOptions>("io = \"kqueue\"").is_err());
    assert_eq!(toml::from_str::<ServeOptions>("io = \"io_uring\"").map(|o| o.io), Ok(Some(IoBackend::Uring)));
}

#[test]
fn protocol_generation_flag_and_key() {
    use crate::proto::{Generation, ProtocolChoice};
    let up = ServeOptions { upstream: Some("127.0.0.1:9092".into()), ..ServeOptions::default() };
    assert_eq!(ServeConfig::from_options(&up).unwrap().hub.protocol, ProtocolChoice::Auto);
    let pinned = ServeOptions { protocol: Some(ProtocolChoice::Pinned(Generation::V1_13)), ..up };
    assert_eq!(ServeConfig::from_options(&pinned).unwrap().hub.protocol.pinned(), Some(Generation::V1_13));
    let synthetic = ServeOptions { protocol: Some(ProtocolChoice::Auto), ..opts() };
    assert!(ServeConfig::from_options(&synthetic).is_err());
    assert_eq!(
        toml::from_str::<ServeOptions>("protocol = \"1.22\"").map(|o| o.protocol),
        Ok(Some(ProtocolChoice::Pinned(Generation::V1_22)))
    );
    assert!(toml::from_str::<ServeOptions>("protocol = \"1.66\"").is_err());
    assert_eq!(
        toml::from_str::<ServeOptions>("protocol = \"1.12\"").map(|o| o.protocol),
        Ok(Some(ProtocolChoice::Pinned(Generation::V1_10)))
    );
    let history = ServeOptions {
        upstream: Some("127.0.0.1:9092".into()),
        history_bytes: Some(Quantity::Text("1MiB".into())),
        ..ServeOptions::default()
    };
    assert_eq!(ServeConfig::from_options(&history).unwrap().hub.history_bytes, 1 << 20);
}

#[test]
fn synapse_version_pins_the_protocol_or_picks_the_synthetic_release() {
    use crate::proto::{Generation, ProtocolChoice, SynapseRelease};
    let r66 = "1.66.0".parse::<SynapseRelease>().unwrap();
    let up = ServeOptions {
        upstream: Some("127.0.0.1:9092".into()),
        synapse_version: Some(r66),
        ..ServeOptions::default()
    };
    let c = ServeConfig::from_options(&up).unwrap();
    assert_eq!((c.hub.protocol.pinned(), c.hub.release), (Some(Generation::V1_22), Some(r66)));
    let clash = ServeOptions { protocol: Some(ProtocolChoice::Pinned(Generation::V1_13)), ..up.clone() };
    assert!(ServeConfig::from_options(&clash).is_err());
    let synthetic = ServeOptions { synapse_version: Some(r66), ..opts() };
    let c = ServeConfig::from_options(&synthetic).unwrap();
    assert_eq!((c.hub.protocol, c.hub.release), (ProtocolChoice::Auto, Some(r66)));
    assert_eq!(
        toml::from_str::<ServeOptions>("synapse-version = \"1.22.1\"").map(|o| o.synapse_version),
        Ok(SynapseRelease::new(22))
    );
    assert!(toml::from_str::<ServeOptions>("synapse-version = \"1.67\"").is_err());
    // 1.10–1.12: the 1.10 generation, with --protocol 1.10 (or 1.12) and not with another.
    let r12 = "1.12.4".parse::<SynapseRelease>().unwrap();
    let pinned = |p: &str| ServeOptions {
        synapse_version: Some(r12),
        protocol: Some(p.parse().unwrap()),
        ..up.clone()
    };
    let c = ServeConfig::from_options(&pinned("1.12")).unwrap();
    assert_eq!((c.hub.protocol.pinned(), c.hub.release), (Some(Generation::V1_10), Some(r12)));
    assert!(ServeConfig::from_options(&pinned("1.10")).is_ok());
    assert!(ServeConfig::from_options(&pinned("1.13")).is_err());
    assert!(ServeConfig::from_options(&pinned("seed")).is_err());
    let synthetic = ServeOptions { synapse_version: Some(r12), ..opts() };
    let c = ServeConfig::from_options(&synthetic).unwrap();
    assert_eq!(
        (c.hub.protocol, c.hub.release, c.hub.fetch_catch_up),
        (ProtocolChoice::Auto, Some(r12), false)
    );
}

#[test]
fn ranges() {
    let z = ServeOptions { threads: Some(0), ..opts() };
    assert!(ServeConfig::from_options(&z).is_err());
    let small = ServeOptions { max_pending_bytes: Some(Quantity::Int(10)), ..opts() };
    assert!(ServeConfig::from_options(&small).is_err());
    let zero = ServeOptions { write_timeout: Some(Quantity::Text("0".into())), ..opts() };
    assert!(ServeConfig::from_options(&zero).is_err());
}

#[test]
fn worker_sndbuf_defaults_to_256kib_and_0_means_the_kernels() {
    assert_eq!(ServeConfig::from_options(&opts()).expect("valid").worker_sndbuf, 256 << 10);
    let sndbuf = |q: &str| {
        let o = ServeOptions { worker_sndbuf: Some(Quantity::Text(q.into())), ..opts() };
        ServeConfig::from_options(&o).map(|c| c.worker_sndbuf)
    };
    assert_eq!(sndbuf("64KiB").ok(), Some(64 << 10));
    assert_eq!(sndbuf("0").ok(), Some(0));
    assert!(sndbuf("100").is_err(), "below 4KiB");
    assert!(sndbuf("2GiB").is_err(), "above 1GiB");
    let file: ServeOptions = toml::from_str("synthetic = 5\nworker-sndbuf = \"128KiB\"\n").expect("toml");
    assert_eq!(ServeConfig::from_options(&file).expect("valid").worker_sndbuf, 128 << 10);
}

#[test]
fn max_user_syncs_defaults_to_100000_and_must_be_positive() {
    assert_eq!(ServeConfig::from_options(&opts()).expect("valid").hub.max_user_syncs, 100_000);
    let zero = ServeOptions { max_user_syncs: Some(0), ..opts() };
    assert!(ServeConfig::from_options(&zero).is_err());
    let file: ServeOptions = toml::from_str("synthetic = 5\nmax-user-syncs = 50\n").expect("toml");
    assert_eq!(ServeConfig::from_options(&file).expect("valid").hub.max_user_syncs, 50);
}

#[test]
fn worker_notsent_lowat_defaults_to_unset() {
    assert_eq!(ServeConfig::from_options(&opts()).expect("valid").worker_notsent_lowat, 0);
    let lowat = |q: &str| {
        let o = ServeOptions { worker_notsent_lowat: Some(Quantity::Text(q.into())), ..opts() };
        ServeConfig::from_options(&o).map(|c| c.worker_notsent_lowat)
    };
    assert_eq!(lowat("16KiB").ok(), Some(16 << 10));
    assert_eq!(lowat("0").ok(), Some(0));
    assert!(lowat("100").is_err(), "below 1KiB");
    let file: ServeOptions =
        toml::from_str("synthetic = 5\nworker-notsent-lowat = \"64KiB\"\n").expect("toml");
    assert_eq!(ServeConfig::from_options(&file).expect("valid").worker_notsent_lowat, 64 << 10);
}

#[test]
fn write_moderation_defaults_and_bounds() {
    let config = ServeConfig::from_options(&opts()).expect("valid");
    assert_eq!(config.moderation, ModerationConfig { above: 200_000, window: Duration::from_micros(200) });
    let moderation = |above: Option<u64>, window: Option<&str>| {
        let o = ServeOptions {
            coalesce_above: above,
            coalesce_window: window.map(|w| Quantity::Text(w.into())),
            ..opts()
        };
        ServeConfig::from_options(&o).map(|c| c.moderation)
    };
    assert_eq!(
        moderation(Some(0), Some("250us")).ok(),
        Some(ModerationConfig { above: 0, window: Duration::from_micros(250) })
    );
    assert_eq!(moderation(None, Some("10ms")).ok().map(|m| m.window), Some(Duration::from_millis(10)));
    let err = moderation(None, Some("11ms")).expect_err("over 10ms");
    assert!(err.to_string().contains("--coalesce-window"), "{err}");
    assert!(moderation(None, Some("soon")).is_err());
    let file: ServeOptions =
        toml::from_str("synthetic = 5\ncoalesce-above = 50000\ncoalesce-window = \"0.2ms\"\n").expect("toml");
    assert_eq!(
        ServeConfig::from_options(&file).expect("valid").moderation,
        ModerationConfig { above: 50_000, window: Duration::from_micros(200) }
    );
}
