//! replhub in front of a master that speaks Synapse 1.10–1.12's protocol, on real loopback
//! sockets and both I/O backends: the generation is learnt from the master's refusal of
//! `REPLICATE ALL`, the hub subscribes with `REPLICATE ALL NOW`, resumes with `REPLICATE
//! <stream> <token>` after the connection drops (nothing lost, nothing repeated), and serves
//! 1.12 workers' `REPLICATE <stream> <token>` from its history.
//!
//! The master here answers as 1.12.4's `ServerReplicationStreamProtocol` does (checked against
//! the real one in tests/interop_synapse.rs): rows after the token each with its own token,
//! then `POSITION`, then live rows.
// Integration tests wait for real sockets with real deadlines.
#![allow(clippy::disallowed_methods)]
#[macro_use]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

use common::{eventually, start, stop, upstream_config, Worker};
use replhub::config::IoBackend;
use replhub::proto::StreamId;

const REFUSED_ALL: &str =
    "ERROR failed to parse line for  'REPLICATE': ValueError('not enough values to unpack (expected 2, got 1)') ('ALL'):\n";

/// What the fake 1.12 master holds.
#[derive(Default)]
struct State {
    /// Every row written: (stream, token, line).
    rows: Vec<(StreamId, i64, String)>,
    /// Connections subscribed to everything (live rows go to them), by writer.
    live: Vec<Arc<Mutex<TcpStream>>>,
    /// Every line received, per connection number.
    received: Vec<Vec<String>>,
}

struct Master1_12 {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

/// The streams a 1.12 master serves when it sends federation itself.
fn served() -> impl Iterator<Item = StreamId> {
    StreamId::ALL.into_iter().filter(|s| !matches!(s, StreamId::Federation | StreamId::PresenceFederation))
}

impl Master1_12 {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let st = Arc::clone(&state);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let st = Arc::clone(&st);
                thread::spawn(move || serve(stream, &st));
            }
        });
        Self { addr, state }
    }

    fn current(state: &State, s: StreamId) -> i64 {
        state.rows.iter().filter(|r| r.0 == s).map(|r| r.1).max().unwrap_or(1)
    }

    /// Writes a row to every subscribed connection (`batch` when the next row shares its
    /// token, as the master's update loop does).
    fn write(&self, rows: &[(StreamId, i64)]) {
        let mut st = self.state.lock().unwrap();
        let mut text = String::new();
        for (i, &(s, t)) in rows.iter().enumerate() {
            let line = format!("RDATA {} {t} [\"{}-{t}-{i}\"]\n", s.name(), s.name());
            let shown = if rows.get(i + 1).is_some_and(|n| *n == (s, t)) {
                line.replacen(&format!(" {t} "), " batch ", 1)
            } else {
                line.clone()
            };
            text.push_str(&shown);
            st.rows.push((s, t, line));
        }
        st.live.retain(|w| w.lock().unwrap().write_all(text.as_bytes()).is_ok());
    }

    fn received(&self, conn: usize) -> Vec<String> {
        self.state.lock().unwrap().received.get(conn).cloned().unwrap_or_default()
    }

    fn connections(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    /// Closes every live connection (the hub reconnects).
    fn drop_connections(&self) {
        for w in std::mem::take(&mut self.state.lock().unwrap().live) {
            let _ = w.lock().unwrap().shutdown(std::net::Shutdown::Both);
        }
    }
}

fn serve(stream: TcpStream, st: &Arc<Mutex<State>>) {
    let writer = Arc::new(Mutex::new(stream.try_clone().expect("clone")));
    let conn = {
        let mut s = st.lock().unwrap();
        s.received.push(Vec::new());
        s.received.len() - 1
    };
    let _ = writer.lock().unwrap().write_all(b"SERVER example.com\nPING 1\n");
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let mut s = st.lock().unwrap();
        s.received[conn].push(line.clone());
        let Some(args) = line.strip_prefix("REPLICATE ") else { continue };
        let Some((name, token)) = args.split_once(' ') else {
            let _ = writer.lock().unwrap().write_all(REFUSED_ALL.as_bytes());
            let _ = writer.lock().unwrap().shutdown(std::net::Shutdown::Both);
            return;
        };
        let streams: Vec<StreamId> = if name == "ALL" {
            served().collect()
        } else {
            StreamId::from_name(name.as_bytes()).into_iter().collect()
        };
        let mut out = String::new();
        for sid in streams {
            if let Ok(from) = token.parse::<i64>() {
                for (_, _, l) in s.rows.iter().filter(|r| r.0 == sid && r.1 > from) {
                    out.push_str(l);
                }
            }
            out.push_str(&format!("POSITION {} {}\n", sid.name(), Master1_12::current(&s, sid)));
        }
        let _ = writer.lock().unwrap().write_all(out.as_bytes());
        if !s.live.iter().any(|w| Arc::ptr_eq(w, &writer)) {
            s.live.push(Arc::clone(&writer));
        }
    }
}

/// A 1.12 worker: greeting, NAME, `REPLICATE <stream> <token>`; returns the lines up to and
/// including its POSITION.
fn subscribe_1_12(w: &mut Worker, stream: &str, token: &str) -> Vec<String> {
    w.greeting();
    w.send("NAME w1_12");
    w.send(&format!("REPLICATE {stream} {token}"));
    let mut lines = Vec::new();
    loop {
        let l = w.line_skip_ping();
        let done = l.starts_with("POSITION ");
        lines.push(l);
        if done {
            return lines;
        }
    }
}

fn learns_resumes_and_catches_up(io: IoBackend) {
    let master = Master1_12::start();
    let mut config = upstream_config(io, master.addr);
    config.threads = 1;
    let server = start(config);
    // The first connection is the probe; the second greets as a 1.12 worker.
    eventually("the 1.10 greeting", || master.received(1).iter().any(|l| l == "REPLICATE ALL NOW"));
    assert_eq!(master.received(0)[2], "REPLICATE ALL");

    let mut live = Worker::connect(server.local_addr());
    assert_eq!(subscribe_1_12(&mut live, "events", "NOW"), ["POSITION events 1"]);
    master.write(&[
        (StreamId::Events, 2),
        (StreamId::Events, 3),
        (StreamId::Events, 3),
        (StreamId::Typing, 2),
    ]);
    let first: Vec<String> = (0..3).map(|_| live.line_skip_ping()).collect();
    assert_eq!(first[0], "RDATA events 2 [\"events-2-0\"]");
    assert_eq!(first[1], "RDATA events batch [\"events-3-1\"]", "live rows as relayed");

    // The master drops the hub: it resumes from the tokens it relayed, so the rows written
    // meanwhile arrive once, by the master's catch-up.
    let conns = master.connections();
    master.drop_connections();
    master.write(&[(StreamId::Events, 4)]);
    eventually("the resume", || master.connections() > conns && master.received(conns).len() >= 3);
    eventually("every stream resumed", || {
        master.received(conns).iter().filter(|l| l.starts_with("REPLICATE ")).count() == served().count()
    });
    let resumed = master.received(conns);
    assert!(resumed.contains(&"REPLICATE events 3".to_owned()), "{resumed:?}");
    assert!(resumed.contains(&"REPLICATE typing 2".to_owned()), "{resumed:?}");
    assert!(resumed.contains(&"REPLICATE caches 1".to_owned()), "{resumed:?}");
    // After the reconnect the worker gets a POSITION at the token it already has, then row 4.
    let mut after = Vec::new();
    while !after.iter().any(|l: &String| l.starts_with("RDATA events 4")) {
        after.push(live.line_skip_ping());
    }
    assert_eq!(after, ["POSITION events 3", "RDATA events 4 [\"events-4-0\"]"]);

    // A late 1.12 worker from token 1 is caught up from the hub's history: each row with its
    // own token (no `batch`), then POSITION, then live rows.
    let mut late = Worker::connect(server.local_addr());
    let caught = subscribe_1_12(&mut late, "events", "1");
    assert_eq!(
        caught,
        [
            "RDATA events 2 [\"events-2-0\"]",
            "RDATA events 3 [\"events-3-1\"]",
            "RDATA events 3 [\"events-3-2\"]",
            "RDATA events 4 [\"events-4-0\"]",
            "POSITION events 4",
        ]
    );
    master.write(&[(StreamId::Events, 5)]);
    assert_eq!(late.line_skip_ping(), "RDATA events 5 [\"events-5-0\"]");
    assert_eq!(live.line_skip_ping(), "RDATA events 5 [\"events-5-0\"]");
    stop(server, vec![live, late]);
}

#[test]
fn v1_10_epoll() {
    learns_resumes_and_catches_up(IoBackend::Epoll);
}

#[test]
fn v1_10_auto() {
    learns_resumes_and_catches_up(IoBackend::Auto);
}

fn older_than_the_history_is_fetched_from_the_master(io: IoBackend) {
    let master = Master1_12::start();
    let mut config = upstream_config(io, master.addr);
    config.threads = 1;
    config.hub.protocol = "1.12".parse().expect("1.12 is a protocol");
    // A history of a few rows, so that the late worker's token is older than it.
    config.hub.history_bytes = 200;
    let server = start(config);
    eventually("the hub subscribed", || master.received(0).iter().any(|l| l == "REPLICATE ALL NOW"));
    let mut live = Worker::connect(server.local_addr());
    assert_eq!(subscribe_1_12(&mut live, "events", "NOW"), ["POSITION events 1"]);
    for t in 2..=20 {
        master.write(&[(StreamId::Events, t)]);
    }
    let mut got = Vec::new();
    while got.len() < 19 {
        got.push(live.line_skip_ping());
    }
    assert_eq!(got.last().map(String::as_str), Some("RDATA events 20 [\"events-20-0\"]"));

    // From token 1: the hub asks the master on a connection of its own, then splices.
    let before = master.connections();
    let mut late = Worker::connect(server.local_addr());
    let caught = subscribe_1_12(&mut late, "events", "1");
    let expected: Vec<String> = (2..=20)
        .map(|t| format!("RDATA events {t} [\"events-{t}-0\"]"))
        .chain(["POSITION events 20".to_owned()])
        .collect();
    assert_eq!(caught, expected, "every row once, in order");
    assert_eq!(master.connections(), before + 1, "one catch-up connection");
    assert_eq!(master.received(before), ["NAME replhub-catch-up", "REPLICATE events 1"]);
    master.write(&[(StreamId::Events, 21)]);
    assert_eq!(late.line_skip_ping(), "RDATA events 21 [\"events-21-0\"]");
    stop(server, vec![live, late]);
}

#[test]
fn v1_10_fetch_epoll() {
    older_than_the_history_is_fetched_from_the_master(IoBackend::Epoll);
}

#[test]
fn v1_10_fetch_auto() {
    older_than_the_history_is_fetched_from_the_master(IoBackend::Auto);
}
