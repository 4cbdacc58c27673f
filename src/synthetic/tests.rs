//! The generator's promises, checked on its output.
use bytes::BytesMut;

use super::*;
use crate::proto::json::{self, Value};
use crate::proto::MAX_LINE_LEN;

/// One parsed line of generator output.
#[derive(Debug)]
struct Parsed {
    stream: StreamId,
    token: Token,
    row: Value,
}

/// Runs the generator and checks every structural promise; returns the parsed lines.
fn run(cfg: SyntheticConfig, calls: &[usize]) -> (Synthetic, Vec<Parsed>, BytesMut) {
    let mut g = Synthetic::new(cfg);
    let start_positions = g.positions();
    let mut out = BytesMut::new();
    let mut reported = Vec::new();
    let now = Now::new(0, 1_583_254_800_000);
    for &n in calls {
        let before = reported.len();
        let written = g.generate(now, n, &mut out, |s, t, a, b| reported.push((s, t, a, b)));
        assert_eq!(written, reported.len() - before);
        if !cfg.streams.is_empty() {
            assert!(written >= n);
        }
        // Each call ends on a complete batch run.
        if let Some(&(_, t, _, _)) = reported.last() {
            assert!(matches!(t, Token::Value(_)));
        }
    }
    // The reported ranges tile the buffer exactly, one line each.
    let mut pos = 0;
    let mut lines = Vec::new();
    for &(stream, token, a, b) in &reported {
        assert_eq!(a, pos);
        assert!(b > a && out[b - 1] == b'\n');
        assert!(!out[a..b - 1].contains(&b'\n'));
        assert!(b - a - 1 <= MAX_LINE_LEN);
        let p = parse_line(&out[a..b - 1]);
        assert_eq!(p.stream, stream);
        assert_eq!(p.token, token);
        check_row(stream, &p.row).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out[a..b])));
        assert!(cfg.streams.contains(stream), "{stream} not in mask");
        lines.push(p);
        pos = b;
    }
    assert_eq!(pos, out.len());
    check_runs_and_tokens(&lines, start_positions, &g);
    (g, lines, out)
}

fn parse_line(line: &[u8]) -> Parsed {
    let text = std::str::from_utf8(line).expect("UTF-8 (in fact ASCII)");
    assert!(text.is_ascii(), "{text}");
    let mut parts = text.splitn(4, ' ');
    assert_eq!(parts.next(), Some("RDATA"));
    let stream = StreamId::from_name(parts.next().expect("stream").as_bytes()).expect("known");
    let token = match parts.next().expect("token") {
        "batch" => Token::Batch,
        t => Token::Value(t.parse().expect("integer token")),
    };
    let json_text = parts.next().expect("row");
    let row = json::parse(json_text.as_bytes()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(json::to_vec(&row), json_text.as_bytes(), "re-encodes identically");
    Parsed { stream, token, row }
}

fn check_runs_and_tokens(lines: &[Parsed], start: [i64; StreamId::COUNT], g: &Synthetic) {
    let mut last = start;
    let mut open_run: Option<StreamId> = None;
    for p in lines {
        if let Some(s) = open_run {
            assert_eq!(p.stream, s, "a batch run is interrupted");
        }
        match p.token {
            Token::Batch => open_run = Some(p.stream),
            Token::Value(t) => {
                assert!(t > last[p.stream.index()], "{} token {t} not increasing", p.stream);
                last[p.stream.index()] = t;
                open_run = None;
            }
        }
    }
    assert_eq!(open_run, None, "output ends inside a batch run");
    assert_eq!(g.positions(), last);
}

/// The generator's own promises beyond the shapes of PROTOCOL.md §6 (which `shape::check`
/// verifies): a `cs_cache_fake` row names a room and at most 50 members, all strings (one more
/// key when padded), and a `pd` row has somewhere to go.
fn check_row(stream: StreamId, row: &Value) -> Result<(), String> {
    shape::check(stream, row).map_err(|e| e.to_string())?;
    let items = row.as_array().unwrap_or_default();
    let strings = |v: &Value| v.as_array().unwrap_or_default().iter().all(|k| k.as_str().is_some());
    let len = |v: Option<&Value>| v.and_then(Value::as_array).map_or(0, <[Value]>::len);
    match (stream, items) {
        (StreamId::Caches, [func, keys, _])
            if func.as_str() == Some("cs_cache_fake")
                && !((2..=52).contains(&len(Some(keys))) && strings(keys)) =>
        {
            Err(format!("cs_cache_fake keys {keys:?}"))
        }
        (StreamId::Federation, [kind, data])
            if kind.as_str() == Some("pd") && len(data.get("dests")) == 0 =>
        {
            Err("pd without dests".into())
        }
        _ => Ok(()),
    }
}

fn cfg(seed: u64) -> SyntheticConfig {
    SyntheticConfig { rate: 0, seed, streams: StreamMask::SEED, pad_to: None, release: None }
}

#[test]
fn every_line_is_well_formed_for_all_streams() {
    for seed in [1, 2, 0xdead_beef] {
        let (_, lines, out) = run(cfg(seed), &[1, 7, 1000, 20_000]);
        let mut seen = StreamMask::NONE;
        for p in &lines {
            seen.insert(p.stream);
        }
        assert_eq!(seen, StreamMask::SEED, "seed {seed}");
        let avg = out.len() / lines.len();
        assert!((100..=300).contains(&avg), "average line {avg} bytes");
    }
}

#[test]
fn stream_mix_is_dominated_by_events_and_has_batch_runs() {
    let (_, lines, _) = run(cfg(9), &[50_000]);
    let count = |s: StreamId| lines.iter().filter(|p| p.stream == s).count();
    let events = count(StreamId::Events) as f64 / lines.len() as f64;
    assert!((0.5..0.7).contains(&events), "events share {events}");
    let mut by_count: Vec<(usize, StreamId)> = StreamId::ALL.iter().map(|&s| (count(s), s)).collect();
    by_count.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(by_count[0].1, StreamId::Events);
    assert_eq!(by_count[1].1, StreamId::Caches);
    for s in [StreamId::Events, StreamId::DeviceLists, StreamId::Caches, StreamId::Federation] {
        assert!(lines.iter().any(|p| p.stream == s && p.token == Token::Batch), "{s} has no batch run");
    }
    // Events batch runs are an `ev` row followed by its `state` row.
    for w in lines.windows(2) {
        if w[0].stream == StreamId::Events && w[0].token == Token::Batch {
            let kind = |p: &Parsed| p.row.as_array().and_then(|a| a[0].as_str()).map(str::to_owned);
            assert_eq!(kind(&w[0]).as_deref(), Some("ev"));
            assert_eq!(kind(&w[1]).as_deref(), Some("state"));
            let ev_id = w[0].row.as_array().and_then(|a| a[1].as_array()).map(|f| f[0].clone());
            let st_id = w[1].row.as_array().and_then(|a| a[1].as_array()).map(|f| f[3].clone());
            assert_eq!(ev_id, st_id);
        }
    }
    let cs = lines.iter().filter(|p| p.row.as_array().and_then(|a| a[0].as_str()) == Some("cs_cache_fake"));
    assert!(cs.count() > 10);
}

#[test]
fn only_masked_streams_appear_and_others_keep_their_position() {
    let mut mask = StreamMask::NONE;
    mask.insert(StreamId::Typing);
    mask.insert(StreamId::UserSignature);
    mask.insert(StreamId::TagAccountData);
    let c = SyntheticConfig { streams: mask, ..cfg(4) };
    let start = Synthetic::new(c).positions();
    let (g, lines, _) = run(c, &[3000]);
    assert!(lines.iter().all(|p| mask.contains(p.stream)));
    for s in StreamId::ALL {
        if !mask.contains(s) {
            assert_eq!(g.positions()[s.index()], start[s.index()], "{s} moved");
        } else {
            assert!(g.positions()[s.index()] > start[s.index()], "{s} did not move");
        }
    }
    let c = SyntheticConfig { streams: StreamMask::NONE, ..cfg(4) };
    let mut g = Synthetic::new(c);
    let mut out = BytesMut::new();
    assert_eq!(g.generate(Now::default(), 10, &mut out, |_, _, _, _| {}), 0);
    assert!(out.is_empty());
}

#[test]
fn shared_token_spaces_interleave() {
    let (_, lines, _) = run(cfg(5), &[30_000]);
    let tokens = |s: StreamId| -> Vec<i64> {
        lines
            .iter()
            .filter_map(|p| match p.token {
                Token::Value(t) if p.stream == s => Some(t),
                _ => None,
            })
            .collect()
    };
    let mut dl = tokens(StreamId::DeviceLists);
    let us = tokens(StreamId::UserSignature);
    assert!(!dl.is_empty() && !us.is_empty());
    dl.extend(&us);
    let n = dl.len();
    dl.sort_unstable();
    dl.dedup();
    assert_eq!(dl.len(), n, "device_lists and user_signature reuse a token");
}

#[test]
fn deterministic_from_the_seed() {
    let (_, _, a) = run(cfg(77), &[500]);
    let (_, _, b) = run(cfg(77), &[500]);
    let (_, _, c) = run(cfg(78), &[500]);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(Synthetic::new(cfg(77)).positions(), Synthetic::new(cfg(77)).positions());
}

#[test]
fn timestamps_come_from_wall_clock() {
    let mut g = Synthetic::new(SyntheticConfig { streams: StreamMask(StreamId::Caches.bit()), ..cfg(3) });
    let mut out = BytesMut::new();
    let wall = 1_700_000_000_123;
    g.generate(Now::new(5, wall), 50, &mut out, |_, _, _, _| {});
    let text = std::str::from_utf8(&out).unwrap();
    for line in text.lines() {
        assert!(line.ends_with(&format!(", {wall}]")), "{line}");
    }
}

#[test]
fn padding_reaches_the_target_without_changing_shapes() {
    for target in [64, 256, 1000, 4096, 20_000] {
        let c = SyntheticConfig { pad_to: Some(target), ..cfg(6) };
        let (_, lines, out) = run(c, &[3000]);
        let cap = target.min(MAX_LINE_LEN + 1);
        let mut exact = 0;
        let mut start = 0;
        for line in out.split_inclusive(|&b| b == b'\n') {
            let len = line.len();
            start += len;
            if len == cap {
                exact += 1;
            }
            // Only lines that were naturally longer exceed the target.
            assert!(len <= cap.max(4000), "{len} > {cap}");
        }
        assert_eq!(start, out.len());
        if target >= 1000 {
            // Everything except the state rows that follow their `ev` row is exact.
            assert!(exact * 10 >= lines.len() * 8, "{exact} of {} exact", lines.len());
        }
    }
}

#[test]
fn due_paces_with_a_token_bucket() {
    let c = SyntheticConfig { rate: 1000, ..cfg(8) };
    let mut g = Synthetic::new(c);
    let t0 = Now::new(10_000, 1_583_254_800_000);
    assert_eq!(g.due(t0), 0, "the first call starts the clock");
    assert_eq!(g.due(t0.plus_ms(1)), 1);
    assert_eq!(g.due(t0.plus_ms(10)), 10, "not taken yet, so still due");
    let mut out = BytesMut::new();
    let n = g.generate(t0.plus_ms(10), 10, &mut out, |_, _, _, _| {});
    assert!(n >= 10);
    // Extra lines that completed a batch run are owed, and paid back over time.
    assert_eq!(g.due(t0.plus_ms(10)), 0);
    assert_eq!(g.due(t0.plus_ms(n as u64)), 0);
    assert_eq!(g.due(t0.plus_ms(n as u64 + 1)), 1);
    // A long pause gives at most one second's worth.
    assert_eq!(g.due(t0.plus_ms(60_000)), 1000);
    // A clock that steps back changes nothing.
    assert_eq!(g.due(t0), 1000);

    // Fractional rates accumulate exactly: 3 lines/s over 1 s in 10 ms steps.
    let mut g = Synthetic::new(SyntheticConfig { rate: 3, ..cfg(8) });
    g.due(t0);
    let mut total = 0;
    for step in 1..=100 {
        let due = g.due(t0.plus_ms(step * 10));
        if due > 0 {
            total += g.generate(t0, due, &mut out, |_, _, _, _| {});
        }
    }
    // At least the 3 due, at most one group (<= 5 lines) more.
    assert!((3..=7).contains(&total), "{total}");

    // Rate 0: unpaced.
    let mut g = Synthetic::new(cfg(8));
    assert_eq!(g.due(t0), UNPACED_BATCH);
}

#[test]
fn sustained_pacing_matches_the_rate() {
    let mut g = Synthetic::new(SyntheticConfig { rate: 5000, ..cfg(10) });
    let t0 = Now::new(0, 0);
    g.due(t0);
    let mut out = BytesMut::new();
    let mut total = 0;
    for ms in 1..=2000u64 {
        let due = g.due(t0.plus_ms(ms));
        if due > 0 {
            total += g.generate(t0.plus_ms(ms), due, &mut out, |_, _, _, _| {});
            out.clear();
        }
    }
    // 2 s at 5000/s, give or take one batch run.
    assert!((10_000..=10_005).contains(&total), "{total}");
}
