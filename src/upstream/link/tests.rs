//! The upstream link driven with a fake clock, fed bytes as Synapse's server sends them.
use super::*;

const T0: Now = Now::new(1_000, 1_583_254_800_000);

fn sample() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors/stream-sample.txt");
    std::fs::read(path).expect("shared/vectors/stream-sample.txt beside the repo")
}

/// The sample's lines with their `\n`.
fn sample_lines(data: &[u8]) -> Vec<&[u8]> {
    data.split_inclusive(|&b| b == b'\n').collect()
}

fn link() -> UpstreamLink {
    UpstreamLink::new(LinkConfig::default())
}

fn feed(link: &mut UpstreamLink, bytes: &[u8], now: Now) {
    link.read_buffer().extend_from_slice(bytes);
    link.on_read(now);
}

fn transmits(link: &mut UpstreamLink) -> Vec<String> {
    std::iter::from_fn(|| link.poll_transmit()).map(|b| String::from_utf8(b.to_vec()).unwrap()).collect()
}

fn events(link: &mut UpstreamLink) -> Vec<LinkEvent> {
    std::iter::from_fn(|| link.poll_event()).collect()
}

/// Every relayed line, in order, with its `\n`.
fn relayed(events: &[LinkEvent]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for e in events {
        if let LinkEvent::Batch(b) = e {
            out.extend((0..b.lines().len()).map(|i| b.line(i).to_vec()));
        }
    }
    out
}

const SAMPLE_POSITIONS: [Option<i64>; StreamId::COUNT] = [
    Some(100),
    Some(7),
    Some(33),
    Some(2),
    Some(45),
    Some(12),
    Some(3),
    Some(250),
    Some(4),
    Some(88),
    Some(61),
    Some(0),
    Some(19),
    Some(19),
    Some(1),
    Some(88),
    None,
];

fn connected_event() -> UpstreamEvent {
    UpstreamEvent::Connected {
        server_name: "example.com".into(),
        positions: SAMPLE_POSITIONS,
        generation: crate::proto::Generation::Seed,
        instance: "master".to_owned(),
    }
}

#[test]
fn opening_lines_then_up_with_sixteen_positions() {
    let mut l = link();
    assert!(l.poll_timeout().is_none());
    l.on_connected(T0);
    assert_eq!(transmits(&mut l), vec!["NAME replhub\n", "PING 1583254800000\n", "REPLICATE ALL\n"]);
    let data = sample();
    let lines = sample_lines(&data);
    let handshake: Vec<u8> = lines[..17].concat();
    feed(&mut l, &handshake, T0);
    assert!(events(&mut l).is_empty(), "no Up before user_signature's POSITION");
    assert!(!l.is_up());
    feed(&mut l, lines[17], T0);
    let ev = events(&mut l);
    assert_eq!(ev.len(), 1);
    assert!(matches!(&ev[0], LinkEvent::Up(up) if *up == connected_event()));
    assert!(l.is_up());
    assert_eq!(l.server_name(), Some("example.com"));
    assert_eq!(l.tokens(), SAMPLE_POSITIONS);
    assert!(l.wants_close().is_none());
}

#[test]
fn every_rdata_is_relayed_byte_identical_and_in_order() {
    let data = sample();
    let want: Vec<Vec<u8>> =
        sample_lines(&data).into_iter().filter(|l| l.starts_with(b"RDATA")).map(<[u8]>::to_vec).collect();
    let mut l = link();
    l.on_connected(T0);
    feed(&mut l, &data, T0);
    let ev = events(&mut l);
    assert!(matches!(&ev[0], LinkEvent::Up(up) if *up == connected_event()));
    assert_eq!(ev.len(), 2, "one read, one batch");
    assert_eq!(relayed(&ev), want);
    let snap = l.snapshot();
    assert_eq!(snap.mode, "upstream");
    assert!(snap.connected);
    assert_eq!(snap.stream_updates.iter().sum::<u64>(), 3460);
    assert_eq!(snap.inbound_rdata, snap.stream_updates);
    assert_eq!(snap.stream_updates[StreamId::Events.index()], 2000);
    // Tokens follow the last numbered RDATA per stream.
    let last_events = want
        .iter()
        .rev()
        .find_map(|l| {
            let s = std::str::from_utf8(l).ok()?;
            let mut f = s.split(' ');
            (f.nth(1)? == "events").then(|| f.next()?.parse::<i64>().ok()).flatten()
        })
        .unwrap();
    assert_eq!(l.tokens()[StreamId::Events.index()], Some(last_events));
}

/// A tiny deterministic PRNG for split points.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn any_chunking_gives_the_same_lines() {
    let data = sample();
    let mut whole = link();
    whole.on_connected(T0);
    feed(&mut whole, &data, T0);
    let want = relayed(&events(&mut whole));
    for seed in 1..=40u64 {
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut l = link();
        l.on_connected(T0);
        let mut got_events = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            let max = if seed % 4 == 0 { 3 } else { 9000 };
            let n = (xorshift(&mut rng) % max + 1) as usize;
            let end = (pos + n).min(data.len());
            feed(&mut l, &data[pos..end], T0);
            got_events.extend(events(&mut l));
            pos = end;
        }
        assert!(matches!(&got_events[0], LinkEvent::Up(up) if *up == connected_event()));
        assert_eq!(got_events.iter().filter(|e| matches!(e, LinkEvent::Up(_))).count(), 1);
        assert_eq!(relayed(&got_events), want, "seed {seed}");
    }
}

#[test]
fn first_rdata_after_server_completes_the_handshake() {
    let mut l = link();
    l.on_connected(T0);
    feed(&mut l, b"SERVER hs\nPING 1\nPOSITION events 10\nPOSITION caches 3\n", T0);
    assert!(events(&mut l).is_empty());
    feed(&mut l, b"RDATA events 11 [\"ev\", []]\nPOSITION typing 4\nRDATA typing 5 [\"!r\", []]\n", T0);
    let ev = events(&mut l);
    let mut positions = [None; StreamId::COUNT];
    positions[StreamId::Events.index()] = Some(10);
    positions[StreamId::Caches.index()] = Some(3);
    assert!(
        matches!(&ev[0], LinkEvent::Up(UpstreamEvent::Connected { server_name, positions: p, .. })
        if server_name == "hs" && *p == positions),
        "{ev:?}"
    );
    assert_eq!(
        relayed(&ev),
        vec![b"RDATA events 11 [\"ev\", []]\n".to_vec(), b"RDATA typing 5 [\"!r\", []]\n".to_vec()]
    );
    assert_eq!(l.tokens()[StreamId::Typing.index()], Some(5), "late POSITION is not a position");
}

#[test]
fn rdata_before_server_is_held_until_up() {
    let mut l = link();
    l.on_connected(T0);
    feed(&mut l, b"RDATA caches 1 [\"f\", null, 1]\nREMOTE_SERVER_UP a.org\n", T0);
    assert!(events(&mut l).is_empty());
    feed(&mut l, b"RDATA caches 2 [\"f\", null, 2]\n", T0);
    assert!(events(&mut l).is_empty(), "still no SERVER");
    feed(&mut l, b"SERVER hs\nPOSITION user_signature 9\nRDATA caches 3 [\"f\", null, 3]\n", T0);
    let ev = events(&mut l);
    assert!(matches!(&ev[0], LinkEvent::Up(_)));
    assert_eq!(
        relayed(&ev),
        vec![
            b"RDATA caches 1 [\"f\", null, 1]\n".to_vec(),
            b"REMOTE_SERVER_UP a.org\n".to_vec(),
            b"RDATA caches 2 [\"f\", null, 2]\n".to_vec(),
            b"RDATA caches 3 [\"f\", null, 3]\n".to_vec(),
        ]
    );
    assert_eq!(ev.len(), 4, "Up, two held batches, then the new one");
}

#[test]
fn wrong_server_name_is_refused() {
    let mut l = UpstreamLink::new(LinkConfig {
        expected_server_name: Some("example.org".into()),
        ..LinkConfig::default()
    });
    l.on_connected(T0);
    transmits(&mut l);
    let data = sample();
    feed(&mut l, &data, T0);
    assert!(events(&mut l).is_empty(), "no Up, no batch");
    assert_eq!(transmits(&mut l), vec!["ERROR Wrong remote\n"]);
    assert_eq!(l.wants_close(), Some(CloseHow::Graceful));
    feed(&mut l, b"RDATA caches 1 [\"f\", null, 1]\n", T0);
    assert!(events(&mut l).is_empty(), "nothing more is read");
    l.on_disconnected("closed", T0);
    let ev = events(&mut l);
    assert!(matches!(&ev[..], [LinkEvent::Down { reason }] if reason.contains("Wrong remote")));
    // The right name is accepted.
    let mut l = UpstreamLink::new(LinkConfig {
        expected_server_name: Some("example.com".into()),
        ..LinkConfig::default()
    });
    l.on_connected(T0);
    feed(&mut l, &data, T0);
    assert!(matches!(events(&mut l).first(), Some(LinkEvent::Up(_))));
}

#[test]
fn reconnect_resets_the_handshake_and_reannounces_user_syncs() {
    let mut l = link();
    l.on_connected(T0);
    transmits(&mut l);
    let data = sample();
    let lines = sample_lines(&data);
    feed(&mut l, &lines[..30].concat(), T0);
    assert!(l.is_up());
    l.on_command(
        0,
        UpstreamCmd::UserSync { user_id: "@b:hs".into(), state: SyncState::Start, last_sync_ms: 5 },
        T0,
    );
    l.on_command(
        1,
        UpstreamCmd::UserSync { user_id: "@a:hs".into(), state: SyncState::Start, last_sync_ms: 6 },
        T0,
    );
    assert_eq!(transmits(&mut l), vec!["USER_SYNC @b:hs start 5\n", "USER_SYNC @a:hs start 6\n"]);
    events(&mut l);

    let t1 = T0.plus_ms(10);
    l.on_disconnected("connection reset", t1);
    l.on_disconnected("connection reset", t1);
    let ev = events(&mut l);
    assert!(matches!(&ev[..], [LinkEvent::Down { reason }] if reason == "connection reset"), "{ev:?}");
    assert!(!l.is_connected() && l.poll_timeout().is_none());
    assert!(!l.snapshot().connected);
    // While down: user syncs change state only; forwards are queued.
    l.on_command(
        0,
        UpstreamCmd::UserSync { user_id: "@b:hs".into(), state: SyncState::End, last_sync_ms: 7 },
        t1,
    );
    l.on_command(
        2,
        UpstreamCmd::UserSync { user_id: "@c:hs".into(), state: SyncState::Start, last_sync_ms: 8 },
        t1,
    );
    l.on_command(2, UpstreamCmd::Forward(Bytes::from_static(b"FEDERATION_ACK 12\n")), t1);
    assert!(l.poll_transmit().is_none());

    let t2 = T0.plus_ms(500);
    l.on_connected(t2);
    assert_eq!(
        transmits(&mut l),
        vec![
            "NAME replhub\n",
            "PING 1583254800500\n",
            "REPLICATE ALL\n",
            "USER_SYNC @a:hs start 1583254800500\n",
            "USER_SYNC @c:hs start 1583254800500\n",
            "FEDERATION_ACK 12\n",
        ]
    );
    assert!(!l.is_up());
    // Half a handshake: nothing yet, and the old connection's state is gone.
    feed(&mut l, b"SERVER example.com\nPOSITION events 500\n", t2);
    assert!(events(&mut l).is_empty());
    feed(&mut l, b"POSITION user_signature 600\n", t2);
    let mut positions = [None; StreamId::COUNT];
    positions[StreamId::Events.index()] = Some(500);
    positions[StreamId::UserSignature.index()] = Some(600);
    let ev = events(&mut l);
    assert!(
        matches!(&ev[..], [LinkEvent::Up(UpstreamEvent::Connected { positions: p, .. })] if *p == positions)
    );
    assert_eq!(l.tokens(), positions, "tokens follow the new handshake (the master may have restarted)");
    let snap = l.snapshot();
    assert_eq!((snap.reconnects, snap.syncing_users, snap.forwarded), (1, 2, 5));
}

#[test]
fn user_sync_is_merged_across_cores() {
    let mut l = link();
    l.on_connected(T0);
    transmits(&mut l);
    let us = |l: &mut UpstreamLink, core, state| {
        l.on_command(core, UpstreamCmd::UserSync { user_id: "@u:hs".into(), state, last_sync_ms: 1 }, T0);
        transmits(l)
    };
    assert_eq!(us(&mut l, 0, SyncState::Start), vec!["USER_SYNC @u:hs start 1\n"]);
    assert!(us(&mut l, 1, SyncState::Start).is_empty());
    assert!(us(&mut l, 0, SyncState::Start).is_empty(), "repeat from the same core");
    assert!(us(&mut l, 0, SyncState::End).is_empty(), "core 1 still syncs the user");
    assert!(us(&mut l, 2, SyncState::End).is_empty(), "core 2 never started it");
    assert_eq!(us(&mut l, 1, SyncState::End), vec!["USER_SYNC @u:hs end 1\n"]);
    assert!(us(&mut l, 1, SyncState::End).is_empty());
    assert_eq!(l.snapshot().syncing_users, 0);
}

#[test]
fn forward_queue_is_bounded_while_down() {
    let mut l = UpstreamLink::new(LinkConfig { max_forward_queue: 3, ..LinkConfig::default() });
    for i in 0..5 {
        let line = Bytes::from(format!("FEDERATION_ACK {i}\n"));
        l.on_command(0, UpstreamCmd::Forward(line), T0);
    }
    assert_eq!(l.forward_dropped(), 2);
    l.on_connected(T0);
    let sent = transmits(&mut l);
    assert_eq!(&sent[3..], ["FEDERATION_ACK 2\n", "FEDERATION_ACK 3\n", "FEDERATION_ACK 4\n"]);
    l.on_command(0, UpstreamCmd::Forward(Bytes::from_static(b"REMOTE_SERVER_UP x\n")), T0);
    assert_eq!(transmits(&mut l), vec!["REMOTE_SERVER_UP x\n"]);
}

#[test]
fn keepalive_and_ping_timeout() {
    let mut l = link();
    l.on_connected(T0);
    transmits(&mut l);
    l.on_sent(T0);
    assert_eq!(l.poll_timeout(), Some(T0.mono_ms + 5_000));
    // A master that never PINGs is never timed out; we keep pinging it.
    let mut now = T0;
    for _ in 0..8 {
        now = now.plus_ms(5_000);
        assert_eq!(l.handle_timeout(now), TimerAction::None);
        assert_eq!(transmits(&mut l), vec![format!("PING {}\n", now.wall_ms)]);
        l.on_sent(now);
    }
    assert!(l.wants_close().is_none());
    // Once it has PINGed, 25 s of silence end the link.
    feed(&mut l, b"SERVER hs\nPING 5\n", now);
    let last = now;
    for _ in 0..5 {
        now = now.plus_ms(5_000);
        l.handle_timeout(now);
        l.on_sent(now);
        assert!(l.wants_close().is_none(), "{} ms", now.mono_ms - last.mono_ms);
        transmits(&mut l);
    }
    now = now.plus_ms(5_000);
    l.handle_timeout(now);
    // As in Synapse's tick: the idle PING first, then the timeout check.
    assert_eq!(transmits(&mut l), vec![format!("PING {}\n", now.wall_ms), "ERROR ping timeout\n".into()]);
    assert_eq!(l.wants_close(), Some(CloseHow::Graceful));
    // If the socket does not go away, the linger aborts it.
    for _ in 0..6 {
        now = now.plus_ms(5_000);
        l.handle_timeout(now);
    }
    assert_eq!(l.wants_close(), Some(CloseHow::Abort));
    l.on_disconnected("aborted", now);
    assert!(matches!(&events(&mut l)[..], [LinkEvent::Down { reason }] if reason.contains("ping timeout")));
}

#[test]
fn received_lines_defer_the_ping_timeout() {
    let mut l = link();
    l.on_connected(T0);
    feed(&mut l, b"SERVER hs\nPING 5\n", T0);
    let mut now = T0;
    for i in 0..20u64 {
        now = now.plus_ms(5_000);
        // RDATA only (no PING) still counts as received.
        feed(&mut l, format!("RDATA caches {i} [\"f\", null, 1]\n").as_bytes(), now);
        l.handle_timeout(now);
        l.on_sent(now);
        assert!(l.wants_close().is_none());
    }
}

#[test]
fn protocol_violations_from_the_master() {
    // A line a server may not send: ERROR, and the batch stops before it.
    let mut l = link();
    l.on_connected(T0);
    transmits(&mut l);
    feed(
        &mut l,
        b"SERVER hs\nRDATA caches 1 [\"f\", null, 1]\nNAME x\nRDATA caches 2 [\"f\", null, 2]\n",
        T0,
    );
    let ev = events(&mut l);
    assert_eq!(relayed(&ev), vec![b"RDATA caches 1 [\"f\", null, 1]\n".to_vec()]);
    assert_eq!(transmits(&mut l), vec!["ERROR invalid command: NAME\n"]);
    assert_eq!(l.wants_close(), Some(CloseHow::Graceful));

    // A malformed POSITION: parse ERROR.
    let mut l = link();
    l.on_connected(T0);
    transmits(&mut l);
    feed(&mut l, b"SERVER hs\nPOSITION events x\n", T0);
    let sent = transmits(&mut l);
    assert!(sent[0].starts_with("ERROR failed to parse line for  'POSITION': "), "{sent:?}");

    // An over-long line.
    let mut l = link();
    l.on_connected(T0);
    transmits(&mut l);
    let mut long = b"RDATA caches 1 ".to_vec();
    long.resize(20_000, b'x');
    feed(&mut l, &long, T0);
    assert_eq!(transmits(&mut l), vec!["ERROR Line length exceeded\n"]);
    assert_eq!(l.wants_close(), Some(CloseHow::Graceful));
}

#[test]
fn malformed_and_unknown_rdata_are_counted_not_relayed() {
    let mut l = link();
    l.on_connected(T0);
    feed(
        &mut l,
        b"SERVER hs\nPOSITION user_signature 1\nRDATA caches x []\nRDATA nosuch 1 []\nRDATA caches 2 [1]\nERROR server shutting down\n",
        T0,
    );
    let ev = events(&mut l);
    assert_eq!(relayed(&ev), vec![b"RDATA caches 2 [1]\n".to_vec()]);
    assert_eq!(l.dropped_rdata(), (1, 1));
    assert!(l.wants_close().is_none(), "the master's ERROR is only logged");
    l.on_disconnected("eof", T0);
    assert!(
        matches!(&events(&mut l)[..], [LinkEvent::Down { reason }] if reason.contains("server shutting down"))
    );
}

#[test]
fn batches_share_the_read_buffer() {
    let mut l = link();
    l.on_connected(T0);
    let rdata = b"RDATA caches 2 [1]\n";
    let data = [&b"SERVER hs\nPOSITION user_signature 1\n"[..], rdata].concat();
    l.read_buffer().extend_from_slice(&data);
    let base = l.read_buffer().as_ptr();
    l.on_read(T0);
    let ev = events(&mut l);
    let [LinkEvent::Up(_), LinkEvent::Batch(batch)] = &ev[..] else { panic!("{ev:?}") };
    assert_eq!(batch.line(0), rdata);
    assert_eq!(batch.line(0).as_ptr(), base.wrapping_add(data.len() - rdata.len()), "no copy of the line");
}

fn generation_sample(release: &str) -> Vec<u8> {
    let path =
        format!("{}/../shared/vectors/generations/stream-sample-{release}.txt", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(path).expect("shared/vectors/generations beside the repo")
}

#[test]
fn released_masters_are_recognised_and_relayed_as_sent() {
    for (release, generation) in
        [("1.13.0", Generation::V1_13), ("1.22.1", Generation::V1_22), ("1.66.0", Generation::V1_22)]
    {
        let data = generation_sample(release);
        let want: Vec<Vec<u8>> = sample_lines(&data)
            .into_iter()
            .filter(|l| {
                l.starts_with(b"RDATA")
                    && StreamId::from_name(l.split(|&b| b == b' ').nth(1).unwrap()).is_some()
            })
            .map(<[u8]>::to_vec)
            .collect();
        let mut l = link();
        l.on_connected(T0);
        assert_eq!(transmits(&mut l)[2], "REPLICATE ALL\n", "accepted by every master from 1.13 on");
        // Line by line, so the generation is learnt at the first POSITION.
        for line in sample_lines(&data) {
            feed(&mut l, line, T0);
        }
        assert!(l.wants_close().is_none(), "{release}: {:?}", transmits(&mut l));
        assert_eq!(l.generation(), Some(generation), "{release}");
        let ev = events(&mut l);
        let Some(LinkEvent::Up(UpstreamEvent::Connected { positions, generation: g, instance, .. })) =
            ev.first()
        else {
            panic!("{release}: Up first, got {ev:?}");
        };
        assert_eq!((*g, instance.as_str()), (generation, "master"));
        assert_eq!(positions[StreamId::Events.index()], Some(100));
        assert_eq!(positions[StreamId::UserSignature.index()], Some(88));
        assert_eq!(relayed(&ev), want, "{release}: every known stream's RDATA, byte for byte");
        assert_eq!(l.snapshot().generation, Some(generation.label()));
        // Tokens follow the last numbered RDATA, read past the instance name.
        let last_typing = want
            .iter()
            .rev()
            .find_map(|l| {
                let mut f = std::str::from_utf8(l).ok()?.split(' ');
                (f.nth(1)? == "typing").then(|| f.nth(1)?.parse::<i64>().ok()).flatten()
            })
            .unwrap();
        assert_eq!(l.tokens()[StreamId::Typing.index()], Some(last_typing), "{release}");
    }
}

#[test]
fn rdata_before_positions_wait_for_the_handshake_of_a_released_master() {
    // A 1.13+ master sends RDATA from connect, possibly before it answers REPLICATE: the
    // handshake must not complete without the POSITIONs (every stream would look unserved).
    let mut l = link();
    l.on_connected(T0);
    feed(&mut l, b"SERVER hs\nPING 1\nRDATA typing master 3 [\"!r:hs\", []]\n", T0);
    assert!(events(&mut l).is_empty() && !l.is_up());
    feed(&mut l, b"POSITION events master 9 10\nPOSITION user_signature master 5 5\n", T0);
    let ev = events(&mut l);
    assert!(matches!(&ev[0], LinkEvent::Up(UpstreamEvent::Connected { generation: Generation::V1_22, .. })));
    assert!(relayed(&ev).is_empty(), "the POSITIONs cover the rows sent before them");
    assert_eq!(l.tokens()[StreamId::Events.index()], Some(10), "the new token");
    // Broadcast POSITIONs (another connection's REPLICATE) after the handshake are harmless.
    feed(&mut l, b"POSITION events master 10 10\nRDATA events master 11 [1]\n", T0);
    assert_eq!(relayed(&events(&mut l)), vec![b"RDATA events master 11 [1]\n".to_vec()]);
    // A reconnect re-learns the generation: a seed master this time.
    l.on_disconnected("test", T0);
    l.on_connected(T0);
    assert_eq!(l.generation(), None);
    feed(&mut l, b"SERVER hs\nPOSITION user_signature 4\n", T0);
    assert_eq!(l.generation(), Some(Generation::Seed));
    assert!(l.is_up());
    // The same within one read.
    let mut l = link();
    l.on_connected(T0);
    feed(
        &mut l,
        b"SERVER hs\nRDATA typing master 3 [1]\nPOSITION typing master 3 3\nPOSITION user_signature master 5 5\n\
          RDATA typing master 4 [2]\n",
        T0,
    );
    let ev = events(&mut l);
    assert!(matches!(&ev[0], LinkEvent::Up(_)), "{ev:?}");
    assert_eq!(relayed(&ev), vec![b"RDATA typing master 4 [2]\n".to_vec()]);
    assert_eq!(l.tokens()[StreamId::Typing.index()], Some(4));
}

#[test]
fn a_pinned_generation_refuses_another_shape() {
    let config = LinkConfig { protocol: ProtocolChoice::Pinned(Generation::V1_13), ..LinkConfig::default() };
    let mut l = UpstreamLink::new(config);
    l.on_connected(T0);
    transmits(&mut l);
    assert_eq!(l.generation(), Some(Generation::V1_13));
    feed(&mut l, b"SERVER hs\nPOSITION events master 100 100\n", T0);
    assert_eq!(
        transmits(&mut l),
        vec!["ERROR failed to parse line for  'POSITION': ValueError(\"invalid literal for int() with base 10: '100 100'\") ('events master 100 100'):\n"]
    );
    assert!(l.wants_close().is_some());
}

/// A handshake, a numbered line, a `batch` run of events (with a line of another stream
/// inside it) and a numbered line after it; and the RDATA lines in order.
fn run_script() -> (Vec<u8>, Vec<&'static [u8]>) {
    let rdata: Vec<&'static [u8]> = vec![
        b"RDATA caches 2 [\"a\"]\n",
        b"RDATA events batch [\"e1\"]\n",
        b"RDATA events batch [\"e2\"]\n",
        b"RDATA events 5 [\"e3\"]\n",
        b"RDATA caches 3 [\"b\"]\n",
    ];
    let mut data = b"SERVER hs\nPOSITION events 4\nPOSITION caches 1\nPOSITION user_signature 1\n".to_vec();
    for l in &rdata {
        data.extend_from_slice(l);
    }
    (data, rdata)
}

/// No relayed batch ends inside a run.
fn assert_no_open_run(events: &[LinkEvent]) {
    for e in events {
        if let LinkEvent::Batch(b) = e {
            assert_eq!(super::runs::open_tail(b.lines()), None, "a batch ends inside a run");
        }
    }
}

#[test]
fn a_run_cut_by_the_upstream_dropping_is_never_relayed() {
    let (data, rdata) = run_script();
    let run_end = data.len() - rdata[4].len();
    for cut in 0..=data.len() {
        for split in [cut / 2, cut] {
            let mut l = link();
            l.on_connected(T0);
            feed(&mut l, &data[..split], T0);
            feed(&mut l, &data[split..cut], T0);
            l.on_disconnected("eof", T0);
            let ev = events(&mut l);
            assert!(matches!(ev.last(), Some(LinkEvent::Down { .. })));
            assert_no_open_run(&ev);
            let got = relayed(&ev);
            // What a worker connected to the master would keep: every line of a complete run.
            let head = data.len() - rdata.iter().map(|l| l.len()).sum::<usize>();
            let first_done = cut >= head + rdata[0].len();
            let run_done = cut >= run_end;
            let last_done = cut == data.len();
            let mut want: Vec<Vec<u8>> = Vec::new();
            if first_done {
                want.push(rdata[0].to_vec());
            }
            if run_done {
                want.extend(rdata[1..4].iter().map(|l| l.to_vec()));
            }
            if last_done {
                want.push(rdata[4].to_vec());
            }
            assert_eq!(got, want, "cut at byte {cut}, first read {split} bytes");
        }
    }
}

#[test]
fn a_run_split_across_reads_is_relayed_whole_once_complete() {
    let (data, rdata) = run_script();
    let want: Vec<Vec<u8>> = rdata.iter().map(|l| l.to_vec()).collect();
    for split in 0..=data.len() {
        for second in [split, (split + data.len()) / 2] {
            let mut l = link();
            l.on_connected(T0);
            let mut ev = Vec::new();
            for (a, b) in [(0, split), (split, second), (second, data.len())] {
                feed(&mut l, &data[a..b], T0);
                ev.extend(events(&mut l));
            }
            assert_no_open_run(&ev);
            assert_eq!(relayed(&ev), want, "reads split at {split} and {second}");
            assert_eq!(l.tokens()[StreamId::Events.index()], Some(5));
            let up = ev.iter().position(|e| matches!(e, LinkEvent::Up(_)));
            assert_eq!(up, Some(0), "Up before the first batch");
        }
    }
}

#[test]
fn a_line_that_closes_the_link_inside_a_run_drops_the_run() {
    let mut l = link();
    l.on_connected(T0);
    feed(
        &mut l,
        b"SERVER hs\nPOSITION user_signature 1\nRDATA caches 2 [1]\nRDATA events batch [2]\nNAME bad\nRDATA events 3 [3]\n",
        T0,
    );
    let ev = events(&mut l);
    assert_no_open_run(&ev);
    assert_eq!(relayed(&ev), vec![b"RDATA caches 2 [1]\n".to_vec()]);
}

#[test]
fn a_run_longer_than_the_limit_drops_the_connection() {
    let mut l = link();
    l.on_connected(T0);
    feed(&mut l, b"SERVER hs\nPOSITION user_signature 1\nRDATA caches 2 [1]\n", T0);
    assert_eq!(relayed(&events(&mut l)).len(), 1);
    let row = format!("RDATA events batch [\"{}\"]\n", "x".repeat(16_000));
    let chunk = row.repeat(64);
    let mut fed = 0;
    while fed <= MAX_HELD_RUN_BYTES {
        assert!(l.wants_close().is_none(), "held {fed} bytes");
        feed(&mut l, chunk.as_bytes(), T0);
        fed += chunk.len();
    }
    assert_eq!(l.wants_close(), Some(CloseHow::Abort));
    feed(&mut l, b"RDATA events 3 [2]\n", T0);
    l.on_disconnected("aborted", T0);
    let ev = events(&mut l);
    assert!(relayed(&ev).is_empty(), "none of the run");
    assert!(matches!(&ev[..], [LinkEvent::Down { .. }]));
}

#[test]
fn a_restarted_master_is_told_the_instance_keyed_user_syncs_again() {
    let mut l = link();
    l.on_connected(T0);
    transmits(&mut l);
    let fwd = |l: &mut UpstreamLink, line: &'static str, now: Now| {
        l.on_command(0, UpstreamCmd::Forward(Bytes::from_static(line.as_bytes())), now);
    };
    fwd(&mut l, "USER_SYNC AbCdE @a:hs start 5\n", T0);
    fwd(&mut l, "USER_SYNC AbCdE @b:hs start 6\n", T0);
    fwd(&mut l, "USER_SYNC FgHiJ @c:hs start 7\n", T0);
    fwd(&mut l, "USER_SYNC KlMnO @d:hs start 8\n", T0);
    fwd(&mut l, "USER_SYNC AbCdE @b:hs end 9\n", T0);
    fwd(&mut l, "CLEAR_USER_SYNC KlMnO\n", T0);
    // Passed on as received while connected.
    assert_eq!(transmits(&mut l).len(), 6);
    assert_eq!(l.snapshot().syncing_users, 2);

    let t1 = T0.plus_ms(60_000);
    l.on_disconnected("master restarting", t1);
    // While down: the state follows, the line is queued.
    fwd(&mut l, "USER_SYNC FgHiJ @e:hs start 10\n", t1);
    let t2 = t1.plus_ms(1_000);
    l.on_connected(t2);
    assert_eq!(
        transmits(&mut l),
        vec![
            "NAME replhub\n".to_owned(),
            format!("PING {}\n", t2.wall_ms),
            "REPLICATE ALL\n".to_owned(),
            "USER_SYNC FgHiJ @e:hs start 10\n".to_owned(),
            format!("USER_SYNC AbCdE @a:hs start {}\n", t2.wall_ms),
            format!("USER_SYNC FgHiJ @c:hs start {}\n", t2.wall_ms),
            format!("USER_SYNC FgHiJ @e:hs start {}\n", t2.wall_ms),
        ]
    );

    // An instance silent for longer than the master keeps it is not announced again.
    let t3 = t1.plus_ms(INSTANCE_SYNC_EXPIRY_MS + 1);
    fwd(&mut l, "USER_SYNC FgHiJ @c:hs start 11\n", t3);
    l.on_disconnected("master restarting", t3);
    l.on_connected(t3);
    let again: Vec<String> = transmits(&mut l).into_iter().filter(|t| t.starts_with("USER_SYNC")).collect();
    assert_eq!(
        again,
        vec![
            format!("USER_SYNC FgHiJ @c:hs start {}\n", t3.wall_ms),
            format!("USER_SYNC FgHiJ @e:hs start {}\n", t3.wall_ms)
        ]
    );
}

/// A 1.12 master's answer to `REPLICATE ALL NOW` (or to each `REPLICATE <s> <tok>`): one
/// two-field POSITION per stream it serves (every stream but federation), in map order.
fn positions_1_12(token: i64) -> String {
    StreamId::ALL
        .iter()
        .filter(|s| **s != StreamId::Federation && **s != StreamId::PresenceFederation)
        .map(|s| format!("POSITION {} {token}\n", s.name()))
        .collect()
}

const REFUSED_ALL: &[u8] = b"ERROR failed to parse line for  'REPLICATE': ValueError('not enough values to unpack (expected 2, got 1)') ('ALL'):\n";

#[test]
fn a_1_12_master_is_learnt_from_its_refusal_of_replicate_all() {
    let mut l = link();
    l.on_connected(T0);
    assert_eq!(transmits(&mut l)[2], "REPLICATE ALL\n");
    feed(&mut l, b"SERVER hs\nPING 1\n", T0);
    feed(&mut l, REFUSED_ALL, T0);
    l.on_disconnected("closed by the upstream", T0);
    assert!(matches!(events(&mut l)[..], [LinkEvent::Down { .. }]));
    // The next connection greets as a 1.12 worker does on its first connection.
    l.on_connected(T0);
    assert_eq!(transmits(&mut l)[2], "REPLICATE ALL NOW\n");
    feed(&mut l, format!("SERVER hs\nPING 1\n{}", positions_1_12(7)).as_bytes(), T0);
    assert_eq!(l.generation(), Some(Generation::V1_10), "two-field POSITIONs after the 1.10 greeting");
    let ev = events(&mut l);
    let Some(LinkEvent::Up(UpstreamEvent::Connected { positions, generation, .. })) = ev.first() else {
        panic!("Up first: {ev:?}");
    };
    assert_eq!(*generation, Generation::V1_10);
    assert_eq!(positions[StreamId::Events.index()], Some(7));
    assert_eq!(positions[StreamId::Federation.index()], None);
    assert_eq!(l.snapshot().generation, Some("1.10"));
}

#[test]
fn a_1_12_master_is_resumed_from_the_last_relayed_tokens() {
    let config = LinkConfig { protocol: ProtocolChoice::Pinned(Generation::V1_10), ..LinkConfig::default() };
    let mut l = UpstreamLink::new(config);
    l.on_connected(T0);
    assert_eq!(transmits(&mut l)[2], "REPLICATE ALL NOW\n", "pinned: no probe");
    feed(&mut l, format!("SERVER hs\n{}", positions_1_12(7)).as_bytes(), T0);
    feed(&mut l, b"RDATA events batch [1]\nRDATA events 8 [2]\nRDATA typing 9 [3]\n", T0);
    events(&mut l);
    // A run left open when the connection drops is not relayed; its rows come back resumed.
    feed(&mut l, b"RDATA events batch [4]\n", T0);
    l.on_disconnected("reset", T0);
    events(&mut l);
    l.on_connected(T0);
    let sent = transmits(&mut l);
    assert!(sent.contains(&"REPLICATE events 8\n".to_owned()), "{sent:?}");
    assert!(sent.contains(&"REPLICATE typing 9\n".to_owned()));
    assert!(sent.contains(&"REPLICATE caches 7\n".to_owned()));
    assert!(!sent.iter().any(|s| s.starts_with("REPLICATE federation")), "not served: not asked");
    // The master catches each stream up (rows with their own tokens, then POSITION), streams
    // in any order; the handshake completes once every stream asked for has its POSITION.
    let mut reply = String::from("SERVER hs\nRDATA typing 10 [5]\nPOSITION typing 10\n");
    reply.push_str("RDATA events 9 [4]\nRDATA events 9 [6]\n");
    for line in positions_1_12(7).lines().filter(|l| !l.contains(" typing ") && !l.contains(" events ")) {
        reply.push_str(line);
        reply.push('\n');
    }
    feed(&mut l, reply.as_bytes(), T0);
    assert!(!l.is_up(), "events has no POSITION yet");
    feed(&mut l, b"POSITION events 9\nRDATA events 10 [7]\n", T0);
    let ev = events(&mut l);
    let Some(LinkEvent::Up(UpstreamEvent::Connected { positions, generation, .. })) = ev.first() else {
        panic!("Up first: {ev:?}");
    };
    assert_eq!(*generation, Generation::V1_10);
    // The hub hears the tokens it already has, so its workers' rows continue without a gap.
    assert_eq!(positions[StreamId::Events.index()], Some(8));
    assert_eq!(positions[StreamId::Typing.index()], Some(9));
    assert_eq!(
        relayed(&ev),
        vec![
            b"RDATA typing 10 [5]\n".to_vec(),
            b"RDATA events 9 [4]\n".to_vec(),
            b"RDATA events 9 [6]\n".to_vec(),
            b"RDATA events 10 [7]\n".to_vec(),
        ]
    );
    assert_eq!(l.tokens()[StreamId::Events.index()], Some(10));
}

#[test]
fn a_refused_resume_or_1_10_greeting_falls_back() {
    let config = LinkConfig::default();
    let mut l = UpstreamLink::new(config);
    l.on_connected(T0);
    feed(&mut l, REFUSED_ALL, T0);
    l.on_disconnected("closed", T0);
    l.on_connected(T0);
    feed(&mut l, format!("SERVER hs\n{}", positions_1_12(7)).as_bytes(), T0);
    l.on_disconnected("reset", T0);
    l.on_connected(T0);
    assert_eq!(transmits(&mut l).iter().filter(|s| s.starts_with("REPLICATE")).count(), 15, "resume");
    // Away too long: the master refuses one stream's catch-up; the next greeting starts anew.
    feed(
        &mut l,
        b"SERVER hs\nERROR failed to handle replicate: Exception('stream events has fallen behind')\n",
        T0,
    );
    l.on_disconnected("closed", T0);
    l.on_connected(T0);
    assert_eq!(transmits(&mut l)[2], "REPLICATE ALL NOW\n");
    // A seed master (say the upstream was replaced) refuses that: back to REPLICATE ALL.
    feed(
        &mut l,
        b"SERVER hs\nERROR failed to handle replicate: Exception('unknown stream %s', 'ALL NOW')\n",
        T0,
    );
    l.on_disconnected("closed", T0);
    l.on_connected(T0);
    assert_eq!(transmits(&mut l)[2], "REPLICATE ALL\n");
    feed(&mut l, b"SERVER hs\nPOSITION user_signature 4\n", T0);
    assert_eq!(l.generation(), Some(Generation::Seed));
}

#[test]
fn a_1_10_master_without_user_signature_completes_at_its_first_row() {
    let config = LinkConfig { protocol: ProtocolChoice::Pinned(Generation::V1_10), ..LinkConfig::default() };
    let mut l = UpstreamLink::new(config);
    l.on_connected(T0);
    feed(&mut l, b"SERVER hs\nPOSITION events 7\nPOSITION typing 3\n", T0);
    assert!(!l.is_up(), "more POSITIONs may follow");
    feed(&mut l, b"RDATA events 8 [1]\n", T0);
    let ev = events(&mut l);
    assert!(matches!(&ev[0], LinkEvent::Up(UpstreamEvent::Connected { generation: Generation::V1_10, .. })));
    assert_eq!(relayed(&ev), vec![b"RDATA events 8 [1]\n".to_vec()]);
}

#[test]
fn a_restarted_1_10_master_s_lower_tokens_are_a_gap() {
    let config = LinkConfig { protocol: ProtocolChoice::Pinned(Generation::V1_10), ..LinkConfig::default() };
    let mut l = UpstreamLink::new(config);
    l.on_connected(T0);
    feed(&mut l, format!("SERVER hs\n{}", positions_1_12(7)).as_bytes(), T0);
    feed(&mut l, b"RDATA typing 9 [1]\n", T0);
    l.on_disconnected("restart", T0);
    events(&mut l);
    l.on_connected(T0);
    assert!(transmits(&mut l).contains(&"REPLICATE typing 9\n".to_owned()));
    // The restarted master's typing counts from 0 again: no rows after 9, POSITION 0.
    let reply = positions_1_12(7).replace("POSITION typing 7", "POSITION typing 0");
    feed(&mut l, format!("SERVER hs\n{reply}").as_bytes(), T0);
    let ev = events(&mut l);
    let Some(LinkEvent::Up(UpstreamEvent::Connected { positions, .. })) = ev.first() else {
        panic!("Up first: {ev:?}");
    };
    assert_eq!(positions[StreamId::Typing.index()], Some(0), "the master's, so the hub sees the gap");
    assert_eq!(positions[StreamId::Events.index()], Some(7), "resumed");
}
