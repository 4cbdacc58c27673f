//! `replhub serve --synthetic --synapse-version X.Y` over loopback, read by `replhub tail
//! --decode`: the hub serves what that release's master writes, and tail names every field.
use replhub::config::{IoBackend, ServeConfig, SourceConfig};
use replhub::proto::SynapseRelease;
use replhub::server::Server;
use replhub::tail::{run_to, TailOptions};

/// Starts the synthetic master playing `release` and returns what `tail --decode` printed for
/// `count` RDATA, one JSON value (or raw line) per line.
async fn tail_release(release: &str, count: u64) -> Vec<Result<serde_json::Value, String>> {
    let mut config = ServeConfig::new(SourceConfig::Synthetic { rate: 2000, line_size: None });
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.metrics_listen = None;
    config.threads = 1;
    config.io = IoBackend::Epoll;
    config.hub.release = Some(release.parse::<SynapseRelease>().expect("release"));
    let server = Server::start(config).expect("start");
    let opts = TailOptions {
        connect: server.local_addr().to_string(),
        decode: true,
        count: Some(count),
        ..TailOptions::default()
    };
    let mut out = Vec::new();
    run_to(&opts, &mut out).await.expect("tail");
    server.shutdown().expect("shutdown");
    String::from_utf8(out)
        .expect("UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|_| l.to_owned()))
        .collect()
}

fn positions(lines: &[Result<serde_json::Value, String>]) -> Vec<&serde_json::Value> {
    lines.iter().filter_map(|l| l.as_ref().ok()?.get("position")).collect()
}

fn rows(lines: &[Result<serde_json::Value, String>]) -> Vec<&serde_json::Value> {
    lines.iter().filter_map(|l| l.as_ref().ok()).filter(|v| v.get("row").is_some()).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn a_1_66_master_as_tail_sees_it() {
    let lines = tail_release("1.66.0", 3000).await;
    assert!(lines[0].as_ref().is_err_and(|l| l == "SERVER localhost"), "{:?}", lines[0]);
    let p = positions(&lines);
    let streams: Vec<&str> = p.iter().map(|p| p["stream"].as_str().unwrap()).collect();
    assert_eq!(
        streams,
        [
            "events",
            "backfill",
            "presence",
            "presence_federation",
            "typing",
            "receipts",
            "push_rules",
            "pushers",
            "caches",
            "device_lists",
            "to_device",
            "federation",
            "tag_account_data",
            "account_data",
            "user_signature"
        ]
    );
    assert!(p.iter().all(|p| p["instance"] == "master" && p["prev"] == p["token"]), "{p:?}");
    let rows = rows(&lines);
    assert_eq!(rows.len(), 3000);
    assert!(rows.iter().all(|r| r["instance"] == "master" && r["row"].is_object()), "every row named");
    let ev = rows.iter().find(|r| r["row"]["kind"] == "ev").expect("an ev row");
    assert_eq!(ev["row"].as_object().unwrap().len(), 1 + 9, "{ev}");
    assert!(rows.iter().any(|r| r["stream"] == "presence_federation"));
    assert!(
        !rows.iter().any(|r| r["stream"] == "federation" && r["row"]["kind"] == "p"),
        "no p rows from 1.33"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_1_13_master_as_tail_sees_it() {
    let lines = tail_release("1.13", 1000).await;
    let p = positions(&lines);
    assert_eq!(p.len(), 16);
    assert!(p.iter().all(|p| p["instance"] == "master" && p.get("prev").is_none()), "{p:?}");
    let rows = rows(&lines);
    let ev = rows.iter().find(|r| r["row"]["kind"] == "ev").expect("an ev row");
    assert_eq!(ev["row"].as_object().unwrap().len(), 1 + 6, "{ev}");
    assert!(!rows.iter().any(|r| r["stream"] == "presence_federation"));
}

#[tokio::test(flavor = "current_thread")]
async fn a_1_12_master_as_tail_sees_it() {
    let lines = tail_release("1.12", 3000).await;
    assert!(lines[0].as_ref().is_err_and(|l| l == "SERVER localhost"), "{:?}", lines[0]);
    let p = positions(&lines);
    let streams: Vec<&str> = p.iter().map(|p| p["stream"].as_str().unwrap()).collect();
    assert_eq!(streams.len(), 16, "1.12.4's STREAMS_MAP: {streams:?}");
    assert_eq!((streams[0], streams[15]), ("events", "user_signature"));
    assert!(p.iter().all(|p| p.get("instance").is_none() && p.get("prev").is_none()), "{p:?}");
    let rows = rows(&lines);
    assert_eq!(rows.len(), 3000);
    assert!(rows.iter().all(|r| r.get("instance").is_none() && r["row"].is_object()), "every row named");
    let ev = rows.iter().find(|r| r["row"]["kind"] == "ev").expect("an ev row");
    assert_eq!(ev["row"].as_object().unwrap().len(), 1 + 6, "{ev}");
    let devices: Vec<_> = rows.iter().filter(|r| r["stream"] == "device_lists").collect();
    assert!(!devices.is_empty());
    for d in devices {
        let row = d["row"].as_object().unwrap();
        assert_eq!(row.keys().collect::<Vec<_>>(), ["user_id", "destination"], "{d}");
    }
    assert!(
        rows.iter().any(|r| r["stream"] == "federation" && r["row"]["kind"] == "p"),
        "p rows before 1.33"
    );
}
