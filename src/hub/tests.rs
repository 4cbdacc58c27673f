//! Hub tests without sockets: every rule of ARCHITECTURE.md §3–4 driven through [`Sim`].
use super::sim::{Capacity, Sim};
use super::{CloseHow, ConnId, HubConfig, UpstreamCmd};
use crate::proto::{StreamId, SyncState, Token};

use StreamId::{Caches, Events, Typing};
use Token::{Batch as B, Value as V};

/// [`Sim::test_config`] with a 64 KiB backlog limit, small enough for the slow-consumer tests.
fn config() -> HubConfig {
    Sim::test_config(64 * 1024)
}

fn sim() -> Sim {
    let mut sim = Sim::new(config());
    sim.connect_upstream("example.com", Sim::positions());
    sim
}

fn rdata(lines: &[String]) -> Vec<&str> {
    lines.iter().filter(|l| l.starts_with("RDATA")).map(String::as_str).collect()
}

fn text(lines: &[bytes::Bytes]) -> Vec<String> {
    lines.iter().map(|b| String::from_utf8_lossy(&b[..b.len() - 1]).into_owned()).collect()
}

#[test]
fn greets_with_server_name_and_ping() {
    let mut sim = sim();
    let w = sim.accept();
    let lines = sim.take_lines(w);
    assert_eq!(lines[0], "SERVER example.com");
    assert_eq!(lines[1], format!("PING {}", sim.now.wall_ms));
    assert_eq!(lines.len(), 2);
}

#[test]
fn waits_for_the_upstream_name_before_greeting() {
    let mut sim = Sim::new(config());
    let w = sim.accept();
    sim.send(w, "NAME early\nREPLICATE events");
    assert!(sim.take_lines(w).is_empty(), "nothing before the server name is known");
    sim.connect_upstream("late.example", Sim::positions());
    assert_eq!(
        sim.take_lines(w),
        vec![
            "SERVER late.example".to_owned(),
            format!("PING {}", sim.now.wall_ms),
            "POSITION events 100".to_owned()
        ]
    );
}

#[test]
fn configured_server_name_greets_at_once() {
    let mut sim = Sim::new(HubConfig { server_name: Some("fixed.example".into()), ..config() });
    let w = sim.accept();
    assert_eq!(sim.take_lines(w)[0], "SERVER fixed.example");
}

#[test]
fn replicate_one_stream_filters_the_others() {
    let mut sim = sim();
    let w = sim.accept();
    sim.take_lines(w);
    sim.send(w, "REPLICATE caches");
    assert_eq!(sim.take_lines(w), vec!["POSITION caches 107"]);
    let sent = sim.batch(&[(Events, V(201)), (Caches, V(108)), (Typing, V(3)), (Caches, V(109))]);
    let got = sim.take_lines(w);
    assert_eq!(got, vec![text(&sent)[1].clone(), text(&sent)[3].clone()]);
}

#[test]
fn replicate_all_answers_every_served_stream_in_map_order() {
    let mut sim = Sim::new(config());
    let mut positions = Sim::positions();
    positions[StreamId::Federation.index()] = None;
    sim.connect_upstream("example.com", positions);
    let w = sim.accept();
    sim.take_lines(w);
    sim.send(w, "REPLICATE ALL");
    let lines = sim.take_lines(w);
    // Map order: the seed's, with `presence_federation` where 1.33+ masters list it.
    let expected: Vec<String> = crate::proto::release::map_order()
        .filter(|s| *s != StreamId::Federation)
        .map(|s| format!("POSITION {} {}", s.name(), 100 + s.index()))
        .collect();
    assert_eq!(lines, expected);
    // An unserved stream named explicitly is an error, like the master's.
    let v = sim.accept();
    sim.send(v, "REPLICATE federation");
    assert_eq!(
        sim.take_lines(v).last().map(String::as_str),
        Some("ERROR failed to handle replicate: Exception('unknown stream %s', 'federation')")
    );
    assert_eq!(sim.closed(v), Some(CloseHow::Graceful));
}

#[test]
fn repeated_replicate_resends_position_and_keeps_the_subscription() {
    let mut sim = sim();
    let w = sim.accept();
    sim.take_lines(w);
    sim.send(w, "REPLICATE events");
    sim.batch(&[(Events, V(201))]);
    sim.send(w, "REPLICATE events");
    let sent = sim.batch(&[(Events, V(202))]);
    let lines = sim.take_lines(w);
    assert_eq!(lines[0], "POSITION events 100");
    assert!(lines[1].starts_with("RDATA events 201 "));
    assert_eq!(lines[2], "POSITION events 201");
    assert_eq!(lines[3], text(&sent)[0]);
}

#[test]
fn unknown_stream_gets_the_reference_error_and_a_close() {
    let mut sim = sim();
    let w = sim.accept();
    let other = sim.accept();
    sim.send(other, "REPLICATE events");
    sim.take_lines(w);
    sim.send(w, "REPLICATE events 5\nREPLICATE caches");
    let lines = sim.take_lines(w);
    assert_eq!(lines, vec!["ERROR failed to handle replicate: Exception('unknown stream %s', 'events 5')"]);
    assert_eq!(sim.closed(w), Some(CloseHow::Graceful));
    // The other worker is unaffected.
    sim.take_lines(other);
    let sent = sim.batch(&[(Events, V(201))]);
    assert_eq!(sim.take_lines(other), text(&sent));
}

#[test]
fn subscription_waits_for_the_batch_boundary() {
    let mut sim = sim();
    let w = sim.accept();
    sim.take_lines(w);
    sim.batch(&[(Events, B), (Events, B)]);
    sim.send(w, "REPLICATE events");
    assert!(sim.take_lines(w).is_empty(), "no POSITION in the middle of a batch run");
    let sent = sim.batch(&[(Events, V(205)), (Events, B), (Events, V(206))]);
    let lines = sim.take_lines(w);
    // The run that was open ends at 205: POSITION 205, then only what follows.
    assert_eq!(lines[0], "POSITION events 205");
    assert_eq!(&lines[1..], &text(&sent)[1..]);
}

#[test]
fn positions_are_ordered_with_the_log() {
    let mut sim = sim();
    let w = sim.accept();
    sim.take_lines(w);
    sim.send(w, "REPLICATE events");
    sim.set_capacity(w, Capacity::Stalled);
    let first = sim.batch(&[(Events, V(201))]);
    sim.send(w, "REPLICATE caches");
    let second = sim.batch(&[(Caches, V(108)), (Events, V(202))]);
    sim.set_capacity(w, Capacity::PerWrite(7));
    sim.advance(200);
    let lines = sim.take_lines(w);
    assert_eq!(
        lines,
        vec![
            "POSITION events 100".to_owned(),
            text(&first)[0].clone(),
            "POSITION caches 107".to_owned(),
            text(&second)[0].clone(),
            text(&second)[1].clone(),
        ]
    );
}

#[test]
fn upstream_reconnect_sends_fresh_positions_before_newer_rdata() {
    let mut sim = sim();
    let w = sim.accept();
    sim.take_lines(w);
    sim.send(w, "REPLICATE events\nREPLICATE typing");
    sim.batch(&[(Events, V(201))]);
    sim.take_lines(w);
    sim.hub.on_upstream(&super::UpstreamEvent::Disconnected, sim.now);
    let mut positions = Sim::positions();
    positions[Events.index()] = Some(250);
    positions[Typing.index()] = Some(0);
    sim.connect_upstream("example.com", positions);
    let sent = sim.batch(&[(Events, V(251))]);
    assert_eq!(
        sim.take_lines(w),
        vec!["POSITION events 250".to_owned(), "POSITION typing 0".to_owned(), text(&sent)[0].clone()]
    );
}

#[test]
fn broadcast_lines_reach_every_greeted_worker() {
    let mut sim = sim();
    let a = sim.accept();
    let b = sim.accept();
    sim.send(a, "REPLICATE caches");
    sim.take_lines(a);
    sim.take_lines(b);
    sim.broadcast("REMOTE_SERVER_UP remote.example");
    assert_eq!(sim.take_lines(a), vec!["REMOTE_SERVER_UP remote.example"]);
    assert_eq!(sim.take_lines(b), vec!["REMOTE_SERVER_UP remote.example"]);
}

#[test]
fn partial_writes_deliver_the_same_bytes() {
    let mut fast = sim();
    let mut slow = sim();
    let f = fast.accept();
    let s = slow.accept();
    fast.send(f, "REPLICATE ALL");
    slow.send(s, "REPLICATE ALL");
    slow.set_capacity(s, Capacity::PerWrite(13));
    for k in 0..20 {
        let rows = [(Events, B), (Events, V(300 + k)), (Caches, V(200 + k)), (Typing, V(k))];
        fast.batch(&rows);
        slow.batch(&rows);
    }
    slow.advance(100);
    assert_eq!(fast.take_lines(f), slow.take_lines(s));
}

#[test]
fn a_stalled_worker_is_evicted_by_backlog_and_the_others_get_everything() {
    let mut sim = sim();
    let fast = sim.accept();
    let stalled = sim.accept();
    sim.send(fast, "REPLICATE ALL");
    sim.send(stalled, "REPLICATE ALL");
    sim.take_lines(fast);
    sim.take_lines(stalled);
    sim.set_capacity(stalled, Capacity::Stalled);
    let mut sent = Vec::new();
    for k in 0..2_000 {
        sent.extend(text(&sim.batch(&[(Events, V(1_000 + k))])));
        // Time passes, so the stalled socket stops counting as draining.
        sim.advance(1);
    }
    assert_eq!(rdata(&sim.take_lines(fast)), sent.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(sim.hub.stats().evictions[0], 1, "evicted for its backlog");
    // Memory is bounded by the policy, not by how much was sent.
    assert!(
        sim.hub.log().held_bytes() <= 2 * config().max_pending_bytes,
        "log holds {}",
        sim.hub.log().held_bytes()
    );
    // Once it reads again it gets the error and is closed.
    sim.set_capacity(stalled, Capacity::Unlimited);
    assert_eq!(sim.take_lines(stalled).last().map(String::as_str), Some("ERROR Failed to keep up"));
    assert_eq!(sim.closed(stalled), Some(CloseHow::Graceful));
}

/// A hub with one worker whose socket took more than a worker that never reads could ever
/// absorb: a proven reader.
fn sim_with_a_proven_reader() -> (Sim, ConnId) {
    let mut sim = sim();
    let reader = sim.accept();
    sim.send(reader, "REPLICATE ALL");
    let rows = (0..1_000).map(|k| (Events, V(1_000 + k))).collect::<Vec<_>>();
    while sim.received_bytes()[&reader] <= super::writes::PROVEN_READER_BYTES as usize {
        sim.batch(&rows);
    }
    (sim, reader)
}

#[test]
fn each_turn_serves_proven_readers_then_clear_sockets_then_congested_ones() {
    let (mut sim, reader) = sim_with_a_proven_reader();
    let [congested, clear, new] = [(); 3].map(|()| sim.accept());
    for id in [congested, clear, new] {
        sim.send(id, "REPLICATE ALL");
    }
    sim.hub.on_send_queue(congested, super::writes::CONGESTED_SEND_QUEUE + 1);
    sim.hub.on_send_queue(clear, 0);
    assert!(!sim.hub.wants_send_queue(reader), "a proven reader costs no extra system call");
    sim.append(&[(Events, V(9_000_000))]);
    let mut order = Vec::new();
    let proven = sim.hub.take_dirty(&mut order);
    assert_eq!(proven, 1);
    assert_eq!(order, vec![reader, clear, new, congested]);
}

/// Takes the turn's connections as the core loop does with its write budget spent after
/// `unproven` of the others: every proven reader, then that many more.
fn turn_with_budget_for(sim: &mut Sim, unproven: usize) -> Vec<(ConnId, bool)> {
    let mut turn = sim.hub.dirty_turn();
    let mut taken = Vec::new();
    let mut left = unproven;
    while let Some(next) = sim.hub.next_dirty(&mut turn, left > 0) {
        taken.push((next.id, next.proven));
        if !next.proven {
            left -= 1;
        }
    }
    taken
}

#[test]
fn a_turn_cut_short_leaves_the_rest_first_in_line_in_their_rank_as_it_is_then() {
    let (mut sim, reader) = sim_with_a_proven_reader();
    let [a, b, c, d] = [(); 4].map(|()| sim.accept());
    for id in [a, b, c, d] {
        sim.send(id, "REPLICATE ALL");
    }
    sim.hub.on_send_queue(d, super::writes::CONGESTED_SEND_QUEUE + 1);
    sim.append(&[(Events, V(9_000_000))]);
    // The budget runs out after one of the others: the proven reader still goes first.
    assert_eq!(turn_with_budget_for(&mut sim, 1), vec![(reader, true), (a, false)]);
    // While they wait, a clear socket's send queue fills up and the congested one's empties:
    // each moves to its new group's end, and each is taken once.
    sim.hub.on_send_queue(b, super::writes::CONGESTED_SEND_QUEUE + 1);
    sim.hub.on_send_queue(d, 0);
    let rest: Vec<ConnId> =
        turn_with_budget_for(&mut sim, usize::MAX).into_iter().map(|(id, _)| id).collect();
    assert_eq!(rest, vec![c, d, b]);
    let mut none = Vec::new();
    assert_eq!(sim.hub.take_dirty(&mut none), 0);
    assert!(none.is_empty(), "every connection taken once: {none:?}");
    assert!(!sim.hub.has_dirty(), "the stale entries went with that turn");
}

#[test]
fn a_send_queue_is_measured_only_once_it_could_hold_more_than_the_congestion_mark() {
    let mut sim = sim();
    let w = sim.accept();
    sim.send(w, "REPLICATE ALL");
    let mark = super::writes::CONGESTED_SEND_QUEUE as usize;
    let mut token = 1_000;
    let mut one_line = |sim: &mut Sim| {
        token += 1;
        sim.batch(&[(Events, V(token))]);
    };
    // Nothing measured yet: the queue holds at most what the socket took.
    while sim.received_bytes()[&w] <= mark {
        assert!(!sim.hub.wants_send_queue(w), "{} bytes taken", sim.received_bytes()[&w]);
        one_line(&mut sim);
    }
    assert!(sim.hub.wants_send_queue(w), "it could hold more than the mark now");
    // A measure that finds the queue empty: at most what it took since.
    sim.hub.on_send_queue(w, 0);
    let measured_at = sim.received_bytes()[&w];
    while sim.received_bytes()[&w] - measured_at <= mark {
        assert!(!sim.hub.wants_send_queue(w));
        one_line(&mut sim);
    }
    assert!(sim.hub.wants_send_queue(w));
    // Found over the mark: measured after every write until it empties.
    sim.hub.on_send_queue(w, mark as u64 + 1);
    one_line(&mut sim);
    assert!(sim.hub.wants_send_queue(w), "a congested queue is measured again");
    sim.hub.on_send_queue(w, 0);
    assert!(!sim.hub.wants_send_queue(w));
}

#[test]
fn an_evicted_worker_that_never_reads_holds_no_log() {
    let mut sim = sim();
    let w = sim.accept();
    sim.send(w, "REPLICATE ALL");
    sim.take_lines(w);
    sim.set_capacity(w, Capacity::Stalled);
    for k in 0..5_000 {
        sim.batch(&[(Events, V(1_000 + k))]);
        // Eviction happens once the backlog is over the hard limit (twice the limit: the
        // socket took bytes just now, so it counts as draining): at most one batch over it.
        assert!(
            sim.hub.log().held_bytes() <= 2 * config().max_pending_bytes + 64,
            "batch {k}: log holds {}",
            sim.hub.log().held_bytes()
        );
    }
    assert_eq!(sim.hub.stats().evictions[0], 1);
    assert!(sim.hub.contains(w), "still waiting to write its ERROR");
    assert_eq!(sim.hub.log().held_bytes(), 0, "nobody needs the log");
}

#[test]
fn a_peer_that_never_answers_our_close_is_aborted_after_the_linger() {
    let mut sim = sim();
    sim.peers_ignore_fin = true;
    let w = sim.accept();
    sim.send(w, "FOO");
    assert_eq!(sim.closed(w), Some(CloseHow::Graceful));
    assert!(sim.hub.contains(w));
    sim.advance(30_100);
    assert_eq!(sim.closed(w), Some(CloseHow::Abort));
    assert!(!sim.hub.contains(w), "the driver reported it gone after the abort");
}

#[test]
fn a_worker_without_write_progress_is_evicted_after_the_write_timeout() {
    let mut sim = sim();
    let w = sim.accept();
    sim.send(w, "REPLICATE events");
    sim.take_lines(w);
    sim.set_capacity(w, Capacity::Stalled);
    sim.batch(&[(Events, V(201))]);
    sim.advance(1_900);
    assert_eq!(sim.hub.stats().evictions, [0, 0]);
    sim.advance(200);
    assert_eq!(sim.hub.stats().evictions[1], 1);
    // Still stalled: the close linger aborts it on the 5 s tick after 25 s (25–30 s).
    sim.advance(30_100);
    assert_eq!(sim.closed(w), Some(CloseHow::Abort));
}

#[test]
fn eviction_mid_line_finishes_the_line_before_the_error() {
    let mut sim = sim();
    let w = sim.accept();
    sim.send(w, "REPLICATE events");
    sim.take_lines(w);
    sim.set_capacity(w, Capacity::ThenStall(10));
    let sent = sim.batch(&[(Events, V(201))]);
    // One 10-byte write went out, then the socket stalled: let the write timeout fire.
    sim.advance(2_100);
    sim.set_capacity(w, Capacity::Unlimited);
    let lines = sim.take_lines(w);
    assert_eq!(lines, vec![text(&sent)[0].clone(), "ERROR Failed to keep up".to_owned()]);
}

#[test]
fn user_sync_is_merged_per_core() {
    let mut sim = sim();
    let a = sim.accept();
    let b = sim.accept();
    sim.send(a, "USER_SYNC @u:hs start 10");
    sim.send(b, "USER_SYNC @u:hs start 11");
    sim.send(a, "USER_SYNC @u:hs end 12");
    let up = sim.take_upstream();
    assert_eq!(
        up,
        vec![UpstreamCmd::UserSync { user_id: "@u:hs".into(), state: SyncState::Start, last_sync_ms: 10 }]
    );
    sim.disconnect(b);
    let up = sim.take_upstream();
    assert!(
        matches!(&up[..], [UpstreamCmd::UserSync { user_id, state: SyncState::End, .. }] if user_id == "@u:hs")
    );
    assert_eq!(sim.hub.stats().user_sync, 3);
}

#[test]
fn client_commands_are_validated_and_forwarded_verbatim() {
    let mut sim = sim();
    let w = sim.accept();
    let lines = [
        "FEDERATION_ACK 12",
        "USER_IP @a:hs [\"tok\",\"1.2.3.4\",null,null,1583254800000]",
        "INVALIDATE_CACHE get_user_by_id [\"@a:hs\"]",
        "REMOVE_PUSHER m.http key @a:hs",
        "REMOTE_SERVER_UP remote.example",
    ];
    sim.send(w, &lines.join("\n"));
    let up = sim.take_upstream();
    let expected: Vec<UpstreamCmd> =
        lines.iter().map(|l| UpstreamCmd::Forward(bytes::Bytes::from(format!("{l}\n")))).collect();
    assert_eq!(up, expected);
    // A bad one is not forwarded: the worker gets a parse error and is closed.
    sim.take_lines(w);
    sim.send(w, "USER_IP @a:hs [\"tok\"]");
    assert!(sim.take_upstream().is_empty());
    assert!(sim.take_lines(w)[0].starts_with("ERROR failed to parse line for  'USER_IP': "));
    assert_eq!(sim.closed(w), Some(CloseHow::Graceful));
}

#[test]
fn bad_input_closes_only_the_offender() {
    for bad in ["FOO bar", "RDATA events 1 []", "name x", "\u{0}\u{1}", "USER_SYNC @a:hs stop 1"] {
        let mut sim = sim();
        let good = sim.accept();
        sim.send(good, "REPLICATE events");
        sim.take_lines(good);
        let w = sim.accept();
        sim.take_lines(w);
        sim.send(w, bad);
        let lines = sim.take_lines(w);
        assert_eq!(lines.len(), 1, "{bad:?}: {lines:?}");
        assert!(lines[0].starts_with("ERROR "), "{bad:?}: {lines:?}");
        assert_eq!(sim.closed(w), Some(CloseHow::Graceful));
        let sent = sim.batch(&[(Events, V(201))]);
        assert_eq!(sim.take_lines(good), text(&sent));
    }
    let mut sim = sim();
    let w = sim.accept();
    sim.take_lines(w);
    sim.send_raw(w, &vec![b'x'; 20_000]);
    assert_eq!(sim.take_lines(w), vec!["ERROR Line length exceeded"]);
}

#[test]
fn lines_after_an_error_in_the_same_read_are_ignored() {
    let mut sim = sim();
    let w = sim.accept();
    sim.take_lines(w);
    sim.send(w, "FOO\nUSER_SYNC @a:hs start 1");
    assert_eq!(sim.take_lines(w), vec!["ERROR invalid command: FOO"]);
    assert!(sim.take_upstream().is_empty());
}

#[test]
fn pings_when_idle_and_times_out_a_silent_pinger() {
    let mut sim = sim();
    let w = sim.accept();
    sim.take_lines(w);
    // Timers run on the hub's 100 ms tick.
    sim.advance(5_100);
    let lines = sim.take_lines(w);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("PING "));
    // A peer that never pings is never timed out.
    sim.advance(60_000);
    assert!(sim.closed(w).is_none());
    sim.send(w, "PING 1");
    sim.take_lines(w);
    sim.advance(25_000);
    assert!(sim.closed(w).is_none());
    sim.advance(5_100);
    assert_eq!(sim.take_lines(w).last().map(String::as_str), Some("ERROR ping timeout"));
    assert_eq!(sim.closed(w), Some(CloseHow::Graceful));
}

#[test]
fn shutdown_tells_every_worker() {
    let mut sim = sim();
    let a = sim.accept();
    let b = sim.accept();
    sim.take_lines(a);
    sim.take_lines(b);
    sim.hub.shutdown(sim.now);
    sim.flush();
    for w in [a, b] {
        assert_eq!(sim.take_lines(w), vec!["ERROR server shutting down"]);
        assert_eq!(sim.closed(w), Some(CloseHow::Graceful));
    }
    assert!(sim.hub.is_empty());
}

#[test]
fn a_worker_syncing_more_users_than_the_limit_gets_an_error_and_is_closed() {
    let mut sim = Sim::new(HubConfig { max_user_syncs: 3, ..config() });
    sim.connect_upstream("example.com", Sim::positions());
    let w = sim.accept();
    let other = sim.accept();
    sim.take_lines(w);
    sim.send(other, "USER_SYNC @a:hs start 1");
    for u in ["a", "b", "c"] {
        sim.send(w, &format!("USER_SYNC @{u}:hs start 1"));
    }
    // Repeating a user it holds, and ending one then starting another, stay within the limit.
    sim.send(w, "USER_SYNC @a:hs start 2");
    sim.send(w, "USER_SYNC @c:hs end 3");
    sim.send(w, "USER_SYNC @d:hs start 4");
    assert_eq!(sim.closed(w), None);
    sim.take_upstream();
    sim.send(w, "USER_SYNC @e:hs start 5");
    assert_eq!(sim.take_lines(w), vec!["ERROR too many users syncing on this connection (at most 3)"]);
    assert_eq!(sim.closed(w), Some(CloseHow::Graceful));
    // Its users end upstream, but for the one another worker still holds; `@e` never started.
    let mut ended: Vec<String> = sim
        .take_upstream()
        .into_iter()
        .map(|cmd| match cmd {
            UpstreamCmd::UserSync { user_id, state: SyncState::End, .. } => user_id,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    ended.sort();
    assert_eq!(ended, vec!["@b:hs", "@d:hs"]);
    assert_eq!(sim.closed(other), None, "the other worker is untouched");
}

#[test]
fn a_full_subscriber_gathers_one_slice_per_contiguous_batch() {
    let mut sim = sim();
    let w = sim.accept();
    sim.send(w, "REPLICATE ALL");
    sim.take_lines(w);
    let rows: Vec<(StreamId, Token)> =
        (0..1_000).map(|k| (StreamId::ALL[k % 16], V(1_000 + k as i64))).collect();
    sim.set_capacity(w, Capacity::Stalled);
    sim.batch(&rows);
    sim.reset_iov_seen();
    sim.set_capacity(w, Capacity::Unlimited);
    assert_eq!(sim.max_iov_seen(), 1, "1000 lines, one iovec");
    assert_eq!(rdata(&sim.take_lines(w)).len(), 1_000);
}

mod props {
    use proptest::prelude::*;

    use super::super::sim::{Capacity, Sim};
    use super::super::{ConnId, UpstreamCmd, UpstreamEvent};
    use super::config;
    use crate::proto::{StreamId, SyncState, Token};

    #[derive(Clone, Debug)]
    enum Op {
        Accept,
        Subscribe(usize, u8),
        SubscribeAll(usize),
        Batch(Vec<(u8, bool)>),
        Capacity(usize, u8),
        Disconnect(usize),
        Advance(u16),
        Reconnect,
        UserSync(usize, u8, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => Just(Op::Accept),
            2 => (0..8usize, 0..16u8).prop_map(|(c, s)| Op::Subscribe(c, s)),
            1 => (0..8usize).prop_map(Op::SubscribeAll),
            6 => prop::collection::vec((0..4u8, any::<bool>()), 1..30).prop_map(Op::Batch),
            2 => (0..8usize, 0..4u8).prop_map(|(c, k)| Op::Capacity(c, k)),
            1 => (0..8usize).prop_map(Op::Disconnect),
            1 => (0..3_000u16).prop_map(Op::Advance),
            1 => Just(Op::Reconnect),
            1 => (0..8usize, 0..3u8, any::<bool>()).prop_map(|(c, u, s)| Op::UserSync(c, u, s)),
        ]
    }

    /// Invariants 1 and 2 for one worker, from the lines it received and the lines sent.
    fn check_worker(
        lines: &[String],
        sent: &[(u64, StreamId, String)],
        errored: bool,
    ) -> Result<(), TestCaseError> {
        for s in StreamId::ALL {
            let ours: Vec<&String> = sent.iter().filter(|x| x.1 == s).map(|x| &x.2).collect();
            let epochs: Vec<u64> = sent.iter().filter(|x| x.1 == s).map(|x| x.0).collect();
            let index: std::collections::HashMap<&String, usize> =
                ours.iter().enumerate().map(|(i, l)| (*l, i)).collect();
            let mut first_position: Option<i64> = None;
            let mut delivered: Vec<usize> = Vec::new();
            for l in lines {
                let mut parts = l.splitn(3, ' ');
                let word = parts.next().unwrap_or("");
                if parts.next() != Some(s.name()) {
                    continue;
                }
                match word {
                    "POSITION" if first_position.is_none() => {
                        first_position = parts.next().and_then(|t| t.parse().ok());
                    }
                    "RDATA" => {
                        prop_assert!(first_position.is_some(), "RDATA before POSITION: {}", l);
                        let i =
                            *index.get(l).ok_or_else(|| TestCaseError::fail(format!("never sent: {l}")))?;
                        delivered.push(i);
                    }
                    _ => {}
                }
            }
            // Invariant 1: in order, no gap, no duplicate; to the end unless closed with an error.
            for w in delivered.windows(2) {
                prop_assert_eq!(w[1], w[0] + 1, "gap or reorder on {}", s.name());
            }
            if let (Some(&f), Some(t)) = (delivered.first(), first_position) {
                // Invariant 2: the first line follows the batch boundary POSITION named (within
                // one upstream connection: after a reconnect the master's POSITION rules).
                if f > 0 && epochs[f - 1] == epochs[f] {
                    let prev = ours[f - 1];
                    let prev_token = prev.split(' ').nth(2).unwrap_or("");
                    prop_assert_eq!(
                        prev_token,
                        t.to_string(),
                        "POSITION {} then {} after {}",
                        t,
                        ours[f],
                        prev
                    );
                }
                if !errored {
                    prop_assert_eq!(
                        *delivered.last().unwrap_or(&0),
                        ours.len() - 1,
                        "{} lost its tail",
                        s.name()
                    );
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn invariants_hold_under_random_interleavings(ops in prop::collection::vec(op(), 1..60)) {
            let mut sim = Sim::new(config());
            sim.connect_upstream("example.com", Sim::positions());
            let mut workers: Vec<ConnId> = Vec::new();
            let mut all_lines: std::collections::HashMap<ConnId, Vec<String>> = Default::default();
            let mut sent: Vec<(u64, StreamId, String)> = Vec::new();
            let mut tokens = [1_000i64; 4];
            let mut syncing: std::collections::HashMap<(usize, u8), bool> = Default::default();
            let mut upstream_syncing: std::collections::HashSet<String> = Default::default();
            let mut gone: std::collections::HashSet<ConnId> = Default::default();
            let mut epoch = 0u64;
            for op in ops {
                match op {
                    Op::Accept => { let w = sim.accept(); workers.push(w); }
                    Op::Subscribe(c, s) => if let Some(w) = workers.get(c % workers.len().max(1)).copied() {
                        if !workers.is_empty() { sim.send(w, &format!("REPLICATE {}", StreamId::ALL[(s % 4) as usize].name())); }
                    },
                    Op::SubscribeAll(c) => if !workers.is_empty() { let w = workers[c % workers.len()]; sim.send(w, "REPLICATE ALL"); },
                    Op::Batch(rows) => {
                        let rows: Vec<(StreamId, Token)> = rows.iter().map(|(s, batch)| {
                            let s = *s as usize;
                            if *batch { (StreamId::ALL[s], Token::Batch) } else { tokens[s] += 1; (StreamId::ALL[s], Token::Value(tokens[s])) }
                        }).collect();
                        let lines = sim.batch(&rows);
                        for (l, (s, _)) in lines.iter().zip(&rows) {
                            sent.push((epoch, *s, String::from_utf8_lossy(&l[..l.len() - 1]).into_owned()));
                        }
                    }
                    Op::Capacity(c, k) => if !workers.is_empty() {
                        let w = workers[c % workers.len()];
                        let cap = match k { 0 => Capacity::Unlimited, 1 => Capacity::PerWrite(50), 2 => Capacity::PerWrite(3), _ => Capacity::Stalled };
                        sim.set_capacity(w, cap);
                    },
                    Op::Disconnect(c) => if !workers.is_empty() {
                        let w = workers.remove(c % workers.len());
                        all_lines.entry(w).or_default().extend(sim.take_lines(w));
                        gone.insert(w);
                        sim.disconnect(w);
                        syncing.retain(|(cc, _), _| *cc != c);
                    },
                    Op::Advance(ms) => sim.advance(u64::from(ms)),
                    Op::Reconnect => {
                        epoch += 1;
                        sim.hub.on_upstream(&UpstreamEvent::Disconnected, sim.now);
                        let mut pos = Sim::positions();
                        for (i, t) in tokens.iter().enumerate() { pos[i] = Some(*t); }
                        sim.connect_upstream("example.com", pos);
                    }
                    Op::UserSync(c, u, start) => if !workers.is_empty() {
                        let w = workers[c % workers.len()];
                        let state = if start { "start" } else { "end" };
                        sim.send(w, &format!("USER_SYNC @u{u}:hs {state} 1"));
                    },
                }
                // Invariant 4: memory bounded by the policy (the hard limit, twice the limit,
                // plus one batch in flight).
                prop_assert!(sim.hub.log().held_bytes() <= 2 * config().max_pending_bytes + 64 * 1024);
                // Invariant 6: the upstream's view is consistent (no double start, no end without start).
                for cmd in sim.take_upstream() {
                    if let UpstreamCmd::UserSync { user_id, state, .. } = cmd {
                        match state {
                            SyncState::Start => prop_assert!(upstream_syncing.insert(user_id), "double start"),
                            SyncState::End => prop_assert!(upstream_syncing.remove(&user_id), "end without start"),
                        }
                    }
                }
            }
            // Let everything drain, then check invariants 1 and 2 for every worker.
            for w in workers.clone() { sim.set_capacity(w, Capacity::Unlimited); }
            sim.advance(10);
            for w in workers.clone() { all_lines.entry(w).or_default().extend(sim.take_lines(w)); }
            for (w, lines) in all_lines {
                // A worker that left, or was closed with an error, need not have the tail.
                let errored = gone.contains(&w) || lines.iter().any(|l| l.starts_with("ERROR"));
                check_worker(&lines, &sent, errored)?;
            }
            let _ = &syncing;
        }
    }
}

#[test]
fn a_batch_skips_workers_parked_on_a_full_socket_and_they_resume_where_they_were() {
    let mut sim = Sim::new(Sim::test_config(64 << 20));
    sim.connect_upstream("example.com", Sim::positions());
    let reader = sim.accept();
    sim.send(reader, "REPLICATE ALL");
    sim.take_lines(reader);
    let stalled: Vec<_> = (0..50)
        .map(|_| {
            let w = sim.accept();
            sim.send(w, "REPLICATE ALL");
            sim.take_lines(w);
            // Takes the next write in part, then its socket is full.
            sim.set_capacity(w, Capacity::ThenStall(100));
            w
        })
        .collect();
    let parked = |sim: &Sim| sim.hub.parked.iter().filter(|&&p| p != 0).count();
    let mut sent = Vec::new();
    for k in 0..20 {
        sent.extend(text(&sim.batch(&[(Events, V(1_000 + k))])));
    }
    // The first batch blocked them; the second found them waiting on their sockets.
    assert_eq!(parked(&sim), stalled.len(), "every blocked worker is parked, the reader is not");
    assert_eq!(rdata(&sim.take_lines(reader)), sent.iter().map(String::as_str).collect::<Vec<_>>());
    for &w in &stalled {
        sim.set_capacity(w, Capacity::Unlimited);
    }
    assert_eq!(parked(&sim), 0, "room on the socket unparks");
    for &w in &stalled {
        assert_eq!(rdata(&sim.take_lines(w)), sent.iter().map(String::as_str).collect::<Vec<_>>());
    }
    // Woken by batches again.
    let more = text(&sim.batch(&[(Events, V(2_000))]));
    for &w in &stalled {
        assert_eq!(rdata(&sim.take_lines(w)), more.iter().map(String::as_str).collect::<Vec<_>>());
    }
}
