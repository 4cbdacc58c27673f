//! The other half of observability: the hub's log, one line per connection event, each with
//! the worker's name and conn id (ARCHITECTURE.md §6). The scrape side runs against a real
//! server on both backends in `tests/common/serve.rs` (`metrics_*`).
//!
//! These lines come from the sans-IO hub, which both I/O drivers run unchanged and which logs
//! on the thread that drives it. So the test drives a hub directly under a capturing
//! subscriber: deterministic, no sockets, no global subscriber shared with other tests.
use std::io::{self, IoSlice, Write};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use replhub::config::HubConfig;
use replhub::proto::StreamId;
use replhub::testing::hub::{Batch, Hub, HubOutput, LineMeta, UpstreamEvent};
use replhub::time::Now;

/// Everything the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("utf-8").lines().map(str::to_owned).collect()
    }
}

/// The driver's loop with sockets that take everything: writes until nothing is dirty, then
/// closes what the hub asks to close (as a peer that closes at once would).
fn settle(hub: &mut Hub, now: Now) {
    loop {
        let mut dirty = Vec::new();
        hub.take_dirty(&mut dirty);
        if dirty.is_empty() {
            break;
        }
        for id in dirty {
            let mut iov: Vec<IoSlice<'_>> = Vec::new();
            let n = hub.gather(id, &mut iov);
            drop(iov);
            hub.on_written(id, n, now);
        }
    }
    while let Some(out) = hub.poll_output() {
        if let HubOutput::Close { conn, .. } = out {
            hub.on_peer_closed(conn, false, now);
        }
    }
}

/// A batch of `n` RDATA lines of `events`, each about 100 bytes.
fn events_batch(first_token: i64, n: usize) -> Arc<Batch> {
    let mut data = BytesMut::new();
    let mut metas = Vec::new();
    for i in 0..n {
        let start = data.len() as u32;
        let token = first_token + i as i64;
        data.extend_from_slice(format!("RDATA events {token} [\"ev\", \"{:>70}\"]\n", i).as_bytes());
        metas.push(LineMeta {
            start,
            end: data.len() as u32,
            stream: StreamId::Events as u8,
            token: Some(token),
        });
    }
    Arc::new(Batch::new(data.freeze(), metas))
}

/// The `conn=` field of a log line, whatever its format.
fn conn_of(line: &str) -> Option<&str> {
    line.split_whitespace().find_map(|w| w.strip_prefix("conn="))
}

/// The lines of each connection, in the order the connections first appear, each as
/// `LEVEL message` plus the given fields' values.
fn per_connection(lines: &[String], fields: &[&str]) -> Vec<Vec<String>> {
    let mut conns: Vec<&str> = Vec::new();
    for l in lines {
        if let Some(c) = conn_of(l) {
            if !conns.contains(&c) {
                conns.push(c);
            }
        }
    }
    conns
        .iter()
        .map(|conn| {
            lines
                .iter()
                .map(|l| l.trim_start())
                .filter(|l| conn_of(l) == Some(conn))
                .map(|l| {
                    let level = l.split_whitespace().next().unwrap_or_default();
                    // The message sits between the level and the first field.
                    let rest = l[level.len()..].trim_start();
                    let msg_end = rest.find(" conn=").unwrap_or(rest.len());
                    let mut out = format!("{level} {}", &rest[..msg_end]);
                    for f in fields {
                        let key = format!("{f}=");
                        if let Some(v) = l.split_whitespace().find_map(|w| w.strip_prefix(&key)) {
                            out.push_str(&format!(" {f}={}", v.trim_matches('"')));
                        }
                    }
                    out
                })
                .collect()
        })
        .collect()
}

#[test]
fn one_log_line_per_connection_event_with_name_and_conn_id() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let c = captured.clone();
            move || c.clone()
        })
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .finish();

    let config = HubConfig { max_pending_bytes: 4_096, ..HubConfig::default() };
    let now = Now::new(1_000, 1_700_000_000_000);
    tracing::subscriber::with_default(subscriber, || {
        let mut hub = Hub::new(config);
        hub.on_upstream(
            &UpstreamEvent::Connected {
                server_name: "hs".to_owned(),
                positions: [Some(1); StreamId::COUNT],
                generation: replhub::proto::Generation::Seed,
                instance: "master".to_owned(),
            },
            now,
        );

        // A well-behaved worker that leaves.
        let good = hub.accept(now);
        hub.on_bytes(good, b"NAME w1\nREPLICATE events\nREPLICATE ALL\n", now);
        settle(&mut hub, now);
        hub.on_peer_closed(good, false, now);

        // Asks for a stream that does not exist.
        let unknown = hub.accept(now);
        hub.on_bytes(unknown, b"NAME w2\nREPLICATE nope\n", now);
        settle(&mut hub, now);

        // Sends a command that does not exist.
        let rude = hub.accept(now);
        hub.on_bytes(rude, b"NAME w3\nFOO bar\n", now);
        settle(&mut hub, now);

        // Falls more than max_pending_bytes behind.
        let slow = hub.accept(now);
        hub.on_bytes(slow, b"NAME w4\nREPLICATE events\n", now);
        settle(&mut hub, now);
        hub.on_batch(events_batch(10, 100), now);
        settle(&mut hub, now);

        // Pings once, then goes silent past the ping timeout.
        let quiet = hub.accept(now);
        hub.on_bytes(quiet, b"NAME w5\nPING 1\n", now);
        settle(&mut hub, now);
        let later = now.plus_ms(60_000);
        hub.handle_timeout(later);
        settle(&mut hub, later);
        assert!(hub.is_empty(), "every connection ended");
    });

    let lines = captured.lines();
    let conns = per_connection(&lines, &["name", "stream", "reason"]);
    let expected: [&[&str]; 5] = [
        &[
            "INFO connection accepted name=anon",
            "INFO worker named itself name=w1",
            "INFO subscribe (REPLICATE) name=w1 stream=events",
            "INFO subscribe (REPLICATE) name=w1 stream=ALL",
            "INFO connection closed name=w1 reason=ConnectionDone",
        ],
        &[
            "INFO connection accepted name=anon",
            "INFO worker named itself name=w2",
            "INFO subscribe (REPLICATE) name=w2 stream=nope",
            "INFO unknown stream, closing name=w2 stream=nope",
            "INFO connection closed name=w2 reason=ProtocolError",
        ],
        &[
            "INFO connection accepted name=anon",
            "INFO worker named itself name=w3",
            "INFO protocol error, closing name=w3",
            "INFO connection closed name=w3 reason=ProtocolError",
        ],
        &[
            "INFO connection accepted name=anon",
            "INFO worker named itself name=w4",
            "INFO subscribe (REPLICATE) name=w4 stream=events",
            "WARN slow consumer evicted name=w4 reason=backlog",
            "INFO connection closed name=w4 reason=SlowConsumer",
        ],
        &[
            "INFO connection accepted name=anon",
            "INFO worker named itself name=w5",
            "INFO ping timeout name=w5",
            "INFO connection closed name=w5 reason=PingTimeout",
        ],
    ];
    assert_eq!(conns.len(), expected.len(), "one conn id per connection: {lines:#?}");
    for (got, want) in conns.iter().zip(expected) {
        assert_eq!(got, want, "{lines:#?}");
    }
    // The protocol error says what was wrong.
    assert!(
        lines.iter().any(|l| l.contains("protocol error, closing") && l.contains("invalid command: FOO")),
        "{lines:#?}"
    );
    // Nothing at info or above without a conn id, apart from the upstream's own line.
    for l in &lines {
        assert!(l.contains(" conn=") || l.contains("upstream"), "{l}");
    }
}
