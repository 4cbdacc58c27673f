//! 1.10–1.12 workers (`REPLICATE <stream|ALL> <token|NOW>`) served from the history, driven
//! through [`Sim`]: what a 1.12.4 master sends (`subscribe_to_stream` in its protocol.py): the
//! rows after the token, each RDATA with its own token, then `POSITION`, then live rows.
use super::sim::{Capacity, Sim};
use super::{CloseHow, HubConfig};
use crate::proto::{Generation, StreamId, Token};

use StreamId::{Caches, Events, Typing};
use Token::{Batch as B, Value as V};

/// [`Sim::test_config`] with a 64 MiB backlog limit, so that no catch-up here is cut short.
fn config() -> HubConfig {
    Sim::test_config(64 << 20)
}

/// A hub behind a 1.12 master whose streams stand at `100 + index` (events 100, caches 107).
fn sim_with(config: HubConfig) -> Sim {
    let mut sim = Sim::new(config);
    sim.connect_upstream_as("example.com", Sim::positions(), Generation::V1_10);
    sim
}

fn sim() -> Sim {
    sim_with(config())
}

fn worker(sim: &mut Sim) -> super::ConnId {
    let w = sim.accept();
    sim.take_lines(w);
    w
}

/// The line as a 1.12 master sends it in a catch-up: the same row with its own token.
fn with_token(line: &bytes::Bytes, token: i64) -> String {
    let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
    let mut parts = text.splitn(4, ' ').map(str::to_owned).collect::<Vec<_>>();
    parts[2] = token.to_string();
    parts.join(" ")
}

fn text(line: &bytes::Bytes) -> String {
    String::from_utf8_lossy(&line[..line.len() - 1]).into_owned()
}

#[test]
fn rows_after_the_token_then_position_then_live() {
    let mut sim = sim();
    let a = sim.batch(&[(Events, V(101)), (Caches, V(108))]);
    let b = sim.batch(&[(Events, B), (Events, V(102)), (Events, V(103))]);
    let w = worker(&mut sim);
    sim.send(w, "NAME w\nREPLICATE events 101");
    assert_eq!(
        sim.take_lines(w),
        vec![with_token(&b[0], 102), text(&b[1]), text(&b[2]), "POSITION events 103".to_owned()],
        "the run's first row carries its token, as a 1.12 master's catch-up rows do"
    );
    let live = sim.batch(&[(Caches, V(109)), (Events, V(104))]);
    assert_eq!(sim.take_lines(w), vec![text(&live[1])]);
    assert!(!a.is_empty());
}

#[test]
fn at_the_edges_of_the_history() {
    let mut sim = sim();
    let a = sim.batch(&[(Events, V(101))]);
    // From the token the history starts at (the upstream's POSITION): every row.
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 100");
    assert_eq!(sim.take_lines(w), vec![text(&a[0]), "POSITION events 101".to_owned()]);
    // From the current token: no rows.
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 101");
    assert_eq!(sim.take_lines(w), vec!["POSITION events 101"]);
    // Ahead of the hub (a master restarted with lower tokens): no rows either, as 1.12 does.
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 500");
    assert_eq!(sim.take_lines(w), vec!["POSITION events 101"]);
}

#[test]
fn a_token_older_than_the_history_gets_the_fallen_behind_error() {
    let mut sim = sim();
    sim.batch(&[(Events, V(101))]);
    let other = worker(&mut sim);
    sim.send(other, "REPLICATE events 100");
    sim.take_lines(other);
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 99");
    assert_eq!(
        sim.take_lines(w),
        vec!["ERROR failed to handle replicate: Exception('stream events has fallen behind')"]
    );
    assert_eq!(sim.closed(w), Some(CloseHow::Graceful));
    let live = sim.batch(&[(Events, V(102))]);
    assert_eq!(sim.take_lines(other), vec![text(&live[0])], "the others go on");
}

#[test]
fn an_evicted_history_raises_the_floor() {
    let row: u64 = 40; // bytes of one generated line, about
    let mut sim = sim_with(HubConfig { history_bytes: 10 * row, ..config() });
    let mut sent = Vec::new();
    for t in 101..=140 {
        sent.extend(sim.batch(&[(Events, V(t))]));
    }
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 100");
    assert!(sim.take_lines(w)[0].contains("has fallen behind"));
    // What the metrics show: how far back the history reaches, and what it holds.
    let stats = sim.hub.snapshot(0, sim.now, |_| Default::default()).stats;
    let floor = stats.history_floor[Events.index()].expect("known");
    assert!((101..135).contains(&floor), "{floor}");
    assert!(stats.history_bytes <= 10 * row && stats.history_bytes > 0);
    let w = worker(&mut sim);
    sim.send(w, &format!("REPLICATE events {}", floor - 1));
    assert!(sim.take_lines(w)[0].contains("has fallen behind"), "just below the floor");
    let w = worker(&mut sim);
    sim.send(w, &format!("REPLICATE events {floor}"));
    assert_eq!(sim.take_lines(w).len(), (140 - floor) as usize + 1, "from the floor: every row held");
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 135");
    let expected: Vec<String> =
        sent[35..].iter().map(text).chain(["POSITION events 140".to_owned()]).collect();
    assert_eq!(sim.take_lines(w), expected);
}

#[test]
fn now_is_the_current_position_without_rows() {
    let mut sim = sim();
    sim.batch(&[(Events, V(101))]);
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events NOW\nREPLICATE typing now");
    assert_eq!(sim.take_lines(w), vec!["POSITION events 101", "POSITION typing 103"]);
}

#[test]
fn all_catches_up_every_served_stream() {
    let mut sim = Sim::new(config());
    let mut positions = Sim::positions();
    positions[StreamId::Federation.index()] = None;
    sim.connect_upstream_as("example.com", positions, Generation::V1_10);
    sim.batch(&[(Events, V(101)), (Typing, V(104)), (Caches, V(108))]);
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE ALL 103");
    // receipts' history starts at 104: the worker is closed with the error (what was queued
    // for the streams before it goes with the connection).
    assert_eq!(
        sim.take_lines(w),
        vec!["ERROR failed to handle replicate: Exception('stream receipts has fallen behind')"]
    );

    let w = worker(&mut sim);
    sim.send(w, "REPLICATE ALL NOW");
    let lines = sim.take_lines(w);
    let expected: Vec<String> = StreamId::ALL
        .iter()
        .filter(|s| **s != StreamId::Federation)
        .map(|s| match s {
            Events => "POSITION events 101".to_owned(),
            Typing => "POSITION typing 104".to_owned(),
            Caches => "POSITION caches 108".to_owned(),
            s => format!("POSITION {} {}", s.name(), 100 + s.index()),
        })
        .collect();
    assert_eq!(lines, expected);
    let live = sim.batch(&[(StreamId::Receipts, V(200))]);
    assert_eq!(sim.take_lines(w), vec![text(&live[0])]);
}

#[test]
fn all_from_a_token_every_stream_holds() {
    let mut sim = Sim::new(config());
    let positions = [Some(5); StreamId::COUNT];
    sim.connect_upstream_as("example.com", positions, Generation::V1_10);
    let sent = sim.batch(&[(Events, V(6)), (Typing, V(6)), (Events, V(7))]);
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE ALL 5");
    let lines = sim.take_lines(w);
    let mut expected = Vec::new();
    for s in StreamId::ALL {
        match s {
            Events => expected.extend([text(&sent[0]), text(&sent[2]), "POSITION events 7".to_owned()]),
            Typing => expected.extend([text(&sent[1]), "POSITION typing 6".to_owned()]),
            s => expected.push(format!("POSITION {} 5", s.name())),
        }
    }
    assert_eq!(lines, expected);
}

#[test]
fn live_rows_arriving_during_the_catch_up_follow_the_position() {
    let mut sim = sim();
    let old = sim.batch(&[(Events, V(101)), (Events, V(102))]);
    let w = worker(&mut sim);
    let seed = worker(&mut sim);
    sim.send(seed, "REPLICATE events");
    sim.take_lines(seed);
    sim.set_capacity(w, Capacity::Stalled);
    sim.send(w, "REPLICATE events 100");
    let live = sim.batch(&[(Events, V(103)), (Events, B), (Events, V(104))]);
    assert_eq!(sim.take_lines(seed), live.iter().map(text).collect::<Vec<_>>(), "not blocked by w");
    sim.set_capacity(w, Capacity::PerWrite(17));
    sim.advance(500);
    let mut expected: Vec<String> = old.iter().map(text).collect();
    expected.push("POSITION events 102".to_owned());
    // Live rows go out as relayed, `batch` included: the worker groups them itself.
    expected.extend(live.iter().map(text));
    assert_eq!(sim.take_lines(w), expected);
}

#[test]
fn a_replicate_inside_an_open_run_waits_for_its_end() {
    let mut sim = sim();
    let first = sim.batch(&[(Events, V(101)), (Events, B)]);
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 100");
    assert!(sim.take_lines(w).is_empty(), "no POSITION in the middle of a run");
    let rest = sim.batch(&[(Events, B), (Events, V(102)), (Events, V(103))]);
    assert_eq!(
        sim.take_lines(w),
        vec![
            text(&first[0]),
            with_token(&first[1], 102),
            with_token(&rest[0], 102),
            text(&rest[1]),
            "POSITION events 102".to_owned(),
            text(&rest[2]),
        ]
    );
}

#[test]
fn a_catch_up_larger_than_the_queued_commands_limit_is_not_evicted() {
    let mut sim = sim();
    let mut rows = 0;
    // About 2.5 MiB of rows: over the 1 MiB of queued private lines a worker may have.
    for chunk in 0..64 {
        let batch: Vec<(StreamId, Token)> = (0..1000).map(|i| (Events, V(101 + chunk * 1000 + i))).collect();
        rows += sim.batch(&batch).len();
    }
    let w = worker(&mut sim);
    sim.set_capacity(w, Capacity::Stalled);
    sim.send(w, "REPLICATE events 100");
    assert_eq!(sim.closed(w), None, "the catch-up is bounded by the history, not by that rule");
    sim.set_capacity(w, Capacity::Unlimited);
    sim.advance(100);
    let lines = sim.take_lines(w);
    assert_eq!(lines.len(), rows + 1);
    assert_eq!(lines.last().unwrap(), &format!("POSITION events {}", 100 + rows));
}

#[test]
fn waits_for_the_upstream_then_catches_up() {
    let mut sim = Sim::new(config());
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 100");
    let late = worker(&mut sim);
    sim.send(late, "REPLICATE caches 99");
    assert!(sim.take_lines(w).is_empty());
    sim.connect_upstream_as("example.com", Sim::positions(), Generation::V1_10);
    let lines = sim.take_lines(w);
    assert_eq!(
        lines,
        [
            "SERVER example.com".to_owned(),
            format!("PING {}", sim.now.wall_ms),
            "POSITION events 100".to_owned()
        ]
    );
    assert_eq!(
        sim.take_lines(late),
        vec!["ERROR failed to handle replicate: Exception('stream caches has fallen behind')"]
    );
}

#[test]
fn a_newer_upstream_refuses_token_replicates_clearly() {
    let mut sim = Sim::new(config());
    sim.connect_upstream_as("example.com", Sim::positions(), Generation::V1_22);
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 100");
    let lines = sim.take_lines(w);
    assert_eq!(lines.len(), 1);
    assert!(lines[0]
        .starts_with("ERROR failed to handle replicate: Exception('replhub relays a Synapse 1.22 master"));
    assert_eq!(sim.closed(w), Some(CloseHow::Graceful));
    // The same when the upstream's generation is learnt after the REPLICATE.
    let mut sim = Sim::new(config());
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE ALL NOW");
    sim.connect_upstream_as("example.com", Sim::positions(), Generation::V1_13);
    assert!(sim.take_lines(w).last().unwrap().contains("Synapse 1.13 master"));
}

#[test]
fn malformed_token_replicates_get_the_1_12_errors() {
    let mut sim = sim();
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events x");
    assert_eq!(
        sim.take_lines(w),
        vec!["ERROR failed to parse line for  'REPLICATE': ValueError(\"invalid literal for int() with base 10: 'x'\") ('events x'):"]
    );
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE nope 5");
    assert_eq!(
        sim.take_lines(w),
        vec!["ERROR failed to handle replicate: Exception('unknown stream %s', 'nope')"]
    );
}

#[test]
fn a_seed_upstream_refuses_token_replicates_as_the_seed_does() {
    let mut sim = Sim::new(config());
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 100");
    sim.connect_upstream("example.com", Sim::positions());
    assert_eq!(
        sim.take_lines(w).last().unwrap(),
        "ERROR failed to handle replicate: Exception('unknown stream %s', 'events 100')"
    );
    assert_eq!(sim.closed(w), Some(CloseHow::Graceful));
}

#[test]
fn a_resumed_upstream_keeps_the_history() {
    let mut sim = sim();
    let before = sim.batch(&[(Events, V(101))]);
    sim.hub.on_upstream(&super::UpstreamEvent::Disconnected, sim.now);
    // The link resumed from the tokens it relayed: the same positions come back.
    let mut positions = Sim::positions();
    positions[Events.index()] = Some(101);
    sim.connect_upstream_as("example.com", positions, Generation::V1_10);
    let after = sim.batch(&[(Events, V(102))]);
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 100");
    assert_eq!(sim.take_lines(w), vec![text(&before[0]), text(&after[0]), "POSITION events 102".to_owned()]);
    // A reconnect at other tokens is a gap: the history starts again there.
    sim.hub.on_upstream(&super::UpstreamEvent::Disconnected, sim.now);
    let mut positions = Sim::positions();
    positions[Events.index()] = Some(300);
    sim.connect_upstream_as("example.com", positions, Generation::V1_10);
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 102");
    assert!(sim.take_lines(w)[0].contains("has fallen behind"));
}

/// A hub that may fetch rows older than its history from its 1.10–1.12 master.
fn fetching_sim() -> Sim {
    sim_with(HubConfig { fetch_catch_up: true, ..config() })
}

/// The fetch request the hub sent upstream.
fn fetch_request(sim: &mut Sim) -> (u64, StreamId, i64) {
    let cmds = sim.take_upstream();
    match cmds.as_slice() {
        [super::UpstreamCmd::Fetch { id, stream, from }] => (*id, *stream, *from),
        other => panic!("expected one fetch, got {other:?}"),
    }
}

/// What the master's catch-up connection returns: rows `from+1..=upto` of events.
fn master_rows(from: i64, upto: i64) -> super::Fetched {
    let rows = (from + 1..=upto)
        .map(|t| (t, bytes::Bytes::from(format!("RDATA events {t} [\"fetched\", {t}]\n"))))
        .collect();
    super::Fetched { rows, position: upto }
}

#[test]
fn older_than_the_history_is_fetched_from_the_master_and_spliced() {
    let mut sim = fetching_sim();
    let held = sim.batch(&[(Events, V(101)), (Events, V(102))]);
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 97");
    assert!(sim.take_lines(w).is_empty(), "nothing until the rows are fetched");
    assert_eq!(fetch_request(&mut sim), (0, Events, 97));
    // Live rows go on meanwhile; the worker is not subscribed yet.
    let during = sim.batch(&[(Events, V(103))]);
    assert!(sim.take_lines(w).is_empty());
    // The master answers from its current token, which is ahead of the history's floor (100):
    // its rows up to the floor, then the history's, then POSITION, then live.
    sim.hub.on_fetched(0, Ok(master_rows(97, 103)), sim.now);
    sim.flush();
    let mut expected: Vec<String> =
        (98..=100).map(|t| format!("RDATA events {t} [\"fetched\", {t}]")).collect();
    expected.extend(held.iter().map(text));
    expected.extend(during.iter().map(text));
    expected.push("POSITION events 103".to_owned());
    assert_eq!(sim.take_lines(w), expected, "no gap, no repeat");
    let live = sim.batch(&[(Events, V(104))]);
    assert_eq!(sim.take_lines(w), vec![text(&live[0])]);
}

#[test]
fn a_failed_fetch_closes_the_worker_with_the_master_s_reason() {
    let mut sim = fetching_sim();
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 1");
    let (id, _, _) = fetch_request(&mut sim);
    let text = "failed to handle replicate: Exception('stream events has fallen behind')";
    sim.hub.on_fetched(id, Err(text.to_owned()), sim.now);
    sim.flush();
    assert_eq!(sim.take_lines(w), vec![format!("ERROR {text}")]);
    // Anything else (the master unreachable) is that same refusal: the worker reconnects.
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE typing 1");
    let (id, _, _) = fetch_request(&mut sim);
    sim.hub.on_fetched(id, Err("connect: refused".to_owned()), sim.now);
    sim.flush();
    assert_eq!(
        sim.take_lines(w),
        vec!["ERROR failed to handle replicate: Exception('stream typing has fallen behind')"]
    );
}

#[test]
fn fetched_rows_that_stop_short_of_the_history_are_not_spliced() {
    let row: u64 = 40;
    let mut sim = sim_with(HubConfig { fetch_catch_up: true, history_bytes: 4 * row, ..config() });
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 99");
    let (id, _, _) = fetch_request(&mut sim);
    // Meanwhile the history moved on past what the master will send.
    for t in 101..=120 {
        sim.batch(&[(Events, V(t))]);
    }
    sim.hub.on_fetched(id, Ok(master_rows(99, 101)), sim.now);
    sim.flush();
    assert_eq!(
        sim.take_lines(w),
        vec!["ERROR failed to handle replicate: Exception('stream events has fallen behind')"]
    );
}

#[test]
fn a_worker_gone_while_fetching_is_forgotten() {
    let mut sim = fetching_sim();
    let w = worker(&mut sim);
    sim.send(w, "REPLICATE events 1");
    let (id, _, _) = fetch_request(&mut sim);
    sim.disconnect(w);
    sim.hub.on_fetched(id, Ok(master_rows(1, 100)), sim.now);
    sim.flush();
    assert!(sim.take_lines(w).is_empty());
    // Without a master to ask (fetching off): no fetch.
    let mut other = self::sim();
    let w = worker(&mut other);
    other.send(w, "REPLICATE events 1");
    assert!(other.take_upstream().is_empty());
    assert!(other.take_lines(w)[0].contains("has fallen behind"));
}

#[test]
fn a_1_13_workers_bare_replicate_gets_the_1_12_parse_error() {
    // 1.12.4's `ReplicateCommand.from_line("")`: `stream_name, token = "".split(" ", 1)`.
    let want = "ERROR failed to parse line for  'REPLICATE': ValueError('not enough values to unpack \
                (expected 2, got 1)') (''):";
    let mut sim = sim();
    for greeting in ["REPLICATE ", "REPLICATE"] {
        let w = worker(&mut sim);
        sim.send(w, &format!("NAME w13\n{greeting}"));
        assert_eq!(sim.take_lines(w), vec![want], "{greeting:?}");
        assert_eq!(sim.closed(w), Some(CloseHow::Graceful));
    }
    // Pinned (`--protocol 1.12`, or `--synapse-version 1.12`), before the master answered.
    let pinned = crate::proto::ProtocolChoice::Pinned(Generation::V1_10);
    let mut sim = Sim::new(HubConfig { protocol: pinned, ..config() });
    let w = sim.accept();
    sim.send(w, "REPLICATE ");
    assert_eq!(sim.take_lines(w), vec![want]);
}
