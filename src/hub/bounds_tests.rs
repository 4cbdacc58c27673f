//! What one connection makes the hub hold is bounded by the configuration (PROTOCOL.md §3.3,
//! ARCHITECTURE.md invariant 4), whatever it sends and however little it reads.
use proptest::prelude::*;

use super::sim::{Capacity, Sim};
use super::{ConnId, HubConfig, UpstreamCmd, UpstreamEvent, MAX_QUEUED_COMMANDS};
use crate::proto::{StreamId, SyncState, Token};

/// The bound's slack beyond `max_pending_bytes`: what the hub may queue between two checks
/// of the rule (the POSITIONs of one upstream reconnect, a PING, the ERROR and the rest of a
/// half-written line), well under this.
const SLACK: u64 = 4096;

/// [`Sim::test_config`] with the 64 KiB backlog limit of the other hub tests.
fn config() -> HubConfig {
    Sim::test_config(64 * 1024)
}

fn small() -> HubConfig {
    HubConfig { max_pending_bytes: 8 * 1024, ..config() }
}

#[derive(Clone, Debug)]
enum Op {
    /// Worker input, in arbitrary pieces.
    Send(Vec<u8>),
    /// `REPLICATE ALL` this many times in one read.
    ReplicateAll(u16),
    /// This many times: a batch, then `REPLICATE ALL` (a new place in the log each time,
    /// so its POSITIONs are not coalesced).
    ReplicateBetweenBatches(u8),
    Batch(Vec<(u8, bool)>),
    Advance(u16),
    Reconnect,
    /// The worker reads `n` bytes once, then stops again.
    Read(u16),
}

fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"REPLICATE ALL\n".to_vec()),
        (0..16usize).prop_map(|s| format!("REPLICATE {}\n", StreamId::ALL[s].name()).into_bytes()),
        Just(b"PING 1\n".to_vec()),
        Just(b"NAME w\n".to_vec()),
        Just(b"USER_SYNC @u:hs start 1\n".to_vec()),
        Just(b"FEDERATION_ACK 3\n".to_vec()),
        prop::collection::vec(any::<u8>(), 0..40),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(line(), 1..20).prop_map(|ls| Op::Send(ls.concat())),
        3 => (1..2_000u16).prop_map(Op::ReplicateAll),
        3 => (1..40u8).prop_map(Op::ReplicateBetweenBatches),
        3 => prop::collection::vec((0..4u8, any::<bool>()), 1..40).prop_map(Op::Batch),
        1 => (0..6_000u16).prop_map(Op::Advance),
        1 => Just(Op::Reconnect),
        1 => (0..200u16).prop_map(Op::Read),
    ]
}

/// What the hub holds for `w`, counted from scratch: the log behind its cursor and its
/// unwritten private lines.
fn held(sim: &Sim, w: ConnId) -> u64 {
    sim.hub.conn(w).map_or(0, |c| c.outbox.log_behind(&sim.hub.log) + c.outbox.private_bytes_recounted())
}

fn check(sim: &Sim, w: ConnId) -> Result<(), TestCaseError> {
    let Some(c) = sim.hub.conn(w) else { return Ok(()) };
    let private = c.outbox.private_bytes();
    prop_assert_eq!(private, c.outbox.private_bytes_recounted(), "private byte count drifted");
    let held = held(sim, w);
    // A worker whose socket took bytes within the drain window may hold up to the hard
    // limit (twice `max_pending_bytes`, see `slow_consumer.rs`); never more.
    prop_assert!(held <= 2 * small().max_pending_bytes + SLACK, "holds {} bytes", held);
    prop_assert!(c.outbox.private_lines() <= MAX_QUEUED_COMMANDS + 64, "{} lines", c.outbox.private_lines());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn a_worker_that_does_not_read_holds_at_most_the_bound(ops in prop::collection::vec(op(), 1..40)) {
        let mut sim = Sim::new(small());
        sim.connect_upstream("example.com", Sim::positions());
        let w = sim.accept();
        sim.set_capacity(w, Capacity::Stalled);
        let mut tokens = [1_000i64; 4];
        for op in ops {
            match op {
                Op::Send(bytes) => {
                    for piece in bytes.chunks(7) {
                        sim.send_raw(w, piece);
                        check(&sim, w)?;
                    }
                }
                Op::ReplicateAll(n) => sim.send_raw(w, &b"REPLICATE ALL\n".repeat(usize::from(n))),
                Op::ReplicateBetweenBatches(n) => {
                    for _ in 0..n {
                        tokens[1] += 1;
                        sim.batch(&[(StreamId::ALL[1], Token::Value(tokens[1]))]);
                        sim.send(w, "REPLICATE ALL");
                        check(&sim, w)?;
                    }
                }
                Op::Batch(rows) => {
                    let rows: Vec<(StreamId, Token)> = rows.iter().map(|&(s, batch)| {
                        let s = usize::from(s);
                        if batch { (StreamId::ALL[s], Token::Batch) } else { tokens[s] += 1; (StreamId::ALL[s], Token::Value(tokens[s])) }
                    }).collect();
                    sim.batch(&rows);
                }
                Op::Advance(ms) => sim.advance(u64::from(ms)),
                Op::Reconnect => {
                    sim.hub.on_upstream(&UpstreamEvent::Disconnected, sim.now);
                    sim.connect_upstream("example.com", Sim::positions());
                }
                Op::Read(n) => {
                    sim.set_capacity(w, Capacity::ThenStall(usize::from(n)));
                }
            }
            check(&sim, w)?;
        }
    }
}

/// D1: 300 000 `REPLICATE ALL` from a worker that never reads. Identical POSITIONs are
/// coalesced, so the queue stays at one POSITION per stream and nothing is evicted.
#[test]
fn repeated_replicate_all_queues_one_position_per_stream() {
    let mut sim = Sim::new(config());
    sim.connect_upstream("example.com", Sim::positions());
    let w = sim.accept();
    sim.set_capacity(w, Capacity::Stalled);
    let burst = b"REPLICATE ALL\n".repeat(300_000);
    for piece in burst.chunks(65536) {
        sim.send_raw(w, piece);
    }
    let (bytes, lines) = sim.hub.private_queue(w).expect("still connected");
    // SERVER and PING went out before the stall; one POSITION per served stream remains.
    let served = Sim::positions().iter().filter(|p| p.is_some()).count();
    assert_eq!(lines, served, "{bytes} bytes");
    assert!(sim.closed(w).is_none());
    sim.set_capacity(w, Capacity::Unlimited);
    let got = sim.take_lines(w);
    assert_eq!(got.iter().filter(|l| l.starts_with("POSITION")).count(), served);
}

/// An upstream that keeps reconnecting at the same tokens while a worker does not read: each
/// reconnect's POSITIONs equal the ones still queued at the same place in the log, so the
/// queue stays at one POSITION per stream (the worker sees each once, as it would see the
/// second of two identical ones as a no-op). A reconnect at a new token does add its POSITION.
#[test]
fn a_flapping_upstream_queues_one_position_per_stream_for_a_stalled_worker() {
    let mut sim = Sim::new(config());
    sim.connect_upstream("example.com", Sim::positions());
    let w = sim.accept();
    sim.send(w, "REPLICATE ALL");
    sim.set_capacity(w, Capacity::Stalled);
    let served = Sim::positions().iter().filter(|p| p.is_some()).count();
    for _ in 0..10_000 {
        sim.hub.on_upstream(&UpstreamEvent::Disconnected, sim.now);
        sim.connect_upstream("example.com", Sim::positions());
    }
    let (bytes, lines) = sim.hub.private_queue(w).expect("still connected");
    assert!(lines <= served + 2, "{lines} lines ({bytes} bytes) queued; {served} streams served");
    let mut moved = Sim::positions();
    let events = StreamId::Events.index();
    moved[events] = moved[events].map(|t| t + 5);
    sim.connect_upstream("example.com", moved);
    sim.set_capacity(w, Capacity::Unlimited);
    let got = sim.take_lines(w);
    let events_positions: Vec<&String> = got.iter().filter(|l| l.starts_with("POSITION events ")).collect();
    let (first, second) = (Sim::positions()[events].unwrap_or_default(), moved[events].unwrap_or_default());
    // The REPLICATE's own POSITION went out before the stall; the flapping queued one more,
    // once; the move adds the new token, and only for the stream that moved.
    let (first, second) = (format!("POSITION events {first}"), format!("POSITION events {second}"));
    assert_eq!(events_positions, [&first, &first, &second], "{got:?}");
    assert_eq!(got.iter().filter(|l| l.starts_with("POSITION ")).count(), 2 * served + 1);
    assert!(sim.closed(w).is_none());
}

/// The 10001st queued command while the socket does not drain: `ERROR Failed to keep up`
/// and a close, even though the ERROR has to wait for the socket.
#[test]
fn the_ten_thousand_and_first_queued_command_evicts() {
    let mut sim = Sim::new(HubConfig { max_pending_bytes: 64 << 20, ..config() });
    sim.connect_upstream("example.com", Sim::positions());
    let w = sim.accept();
    sim.take_lines(w);
    sim.set_capacity(w, Capacity::Stalled);
    // Each REPLICATE after a batch is at a new place in the log: not coalesced.
    let mut token = 1_000;
    let mut rounds = 0;
    while sim.closed(w).is_none() && sim.hub.private_queue(w).is_some_and(|(_, n)| n < MAX_QUEUED_COMMANDS) {
        token += 1;
        sim.batch(&[(StreamId::Caches, Token::Value(token))]);
        sim.send(w, "REPLICATE events");
        rounds += 1;
    }
    assert_eq!(rounds, MAX_QUEUED_COMMANDS, "exactly 10000 POSITION queued");
    assert!(sim.hub.stats().evictions.iter().all(|&n| n == 0));
    token += 1;
    sim.batch(&[(StreamId::Caches, Token::Value(token))]);
    sim.send(w, "REPLICATE events");
    assert_eq!(sim.hub.stats().evictions.iter().sum::<u64>(), 1, "the 10001st evicts");
    assert_eq!(sim.hub.private_queue(w).map(|(_, n)| n), Some(1), "only the ERROR is left");
    sim.set_capacity(w, Capacity::Unlimited);
    assert_eq!(sim.take_lines(w), vec!["ERROR Failed to keep up"]);
    assert_eq!(sim.closed(w), Some(super::CloseHow::Graceful));
}

/// What a worker's USER_SYNC lines do to it, in the model: closed at the first start that
/// would make it hold more than `limit` distinct users.
fn user_sync_model(ops: &[(u8, bool)], limit: usize) -> (Option<usize>, std::collections::BTreeSet<u8>) {
    let mut held = std::collections::BTreeSet::new();
    for (k, &(user, start)) in ops.iter().enumerate() {
        if start {
            if held.len() >= limit && !held.contains(&user) {
                return (Some(k), held);
            }
            held.insert(user);
        } else {
            held.remove(&user);
        }
    }
    (None, held)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    /// Whatever a worker sends, the hub holds at most `max_user_syncs` users for it, closes
    /// it exactly when the model says, and the upstream sees exactly the model's users
    /// start (and, once the worker is closed, end).
    #[test]
    fn user_syncs_per_connection_stay_within_the_limit(
        ops in prop::collection::vec((0u8..12, any::<bool>()), 1..80),
        limit in 1usize..6,
    ) {
        let mut sim = Sim::new(HubConfig { max_user_syncs: limit, ..config() });
        sim.connect_upstream("example.com", Sim::positions());
        let w = sim.accept();
        sim.take_lines(w);
        let (closed_at, model) = user_sync_model(&ops, limit);
        let mut upstream: std::collections::BTreeSet<String> = Default::default();
        for (k, &(user, start)) in ops.iter().enumerate() {
            if sim.closed(w).is_some() {
                break;
            }
            let state = if start { "start" } else { "end" };
            sim.send(w, &format!("USER_SYNC @u{user}:hs {state} {k}"));
            for cmd in sim.take_upstream() {
                if let UpstreamCmd::UserSync { user_id, state, .. } = cmd {
                    match state {
                        SyncState::Start => prop_assert!(upstream.insert(user_id)),
                        SyncState::End => prop_assert!(upstream.remove(&user_id)),
                    }
                }
            }
            prop_assert!(upstream.len() <= limit, "{} users held, limit {limit}", upstream.len());
            prop_assert_eq!(sim.closed(w).is_some(), closed_at.is_some_and(|c| c <= k), "after op {}", k);
        }
        if closed_at.is_some() {
            prop_assert!(upstream.is_empty(), "a closed worker's users ended: {:?}", upstream);
            let lines = sim.take_lines(w);
            let want = format!("ERROR too many users syncing on this connection (at most {limit})");
            prop_assert_eq!(lines.last(), Some(&want));
        } else {
            let want: std::collections::BTreeSet<String> = model.iter().map(|u| format!("@u{u}:hs")).collect();
            prop_assert_eq!(upstream, want);
        }
    }
}

/// Private lines count against `max_pending_bytes` like the log.
#[test]
fn private_bytes_count_against_max_pending_bytes() {
    let mut sim = Sim::new(HubConfig { max_pending_bytes: 2_000, ..config() });
    sim.connect_upstream("example.com", Sim::positions());
    let w = sim.accept();
    sim.take_lines(w);
    sim.set_capacity(w, Capacity::Stalled);
    let mut token = 1_000;
    while sim.closed(w).is_none() && sim.hub.stats().evictions.iter().sum::<u64>() == 0 {
        token += 1;
        // A batch of a stream it does not receive, so only private bytes grow (and the log
        // behind the cursor, which also counts).
        sim.batch(&[(StreamId::Caches, Token::Value(token))]);
        sim.send(w, "REPLICATE typing");
        let held = held(&sim, w);
        // Within the drain window (the clock stands still here) only the hard limit,
        // twice `max_pending_bytes`, applies.
        assert!(held <= 2 * 2_000 + 64, "{held}");
    }
    sim.set_capacity(w, Capacity::Unlimited);
    assert_eq!(sim.take_lines(w), vec!["ERROR Failed to keep up"]);
}
