//! The synthetic master playing a released Synapse, through the hub, against what the real
//! releases' masters sent (`shared/vectors/generations/`): the same opening lines, POSITION
//! lines (but the tokens) and stream set in the same order, RDATA heads, JSON separators and
//! row layouts (field counts per stream and kind).
use std::collections::{BTreeMap, BTreeSet};

use bytes::BytesMut;

use super::line::compact_separators;
use super::shape;
use super::source::SyntheticSource;
use super::SyntheticConfig;
use crate::hub::sim::Sim;
use crate::hub::HubConfig;
use crate::proto::json::{self, Value};
use crate::proto::{StreamId, SynapseRelease};
use crate::time::Now;
use crate::upstream::LinkEvent;

/// The vector file of a release.
pub(crate) fn vector(release: &str) -> String {
    let path =
        format!("{}/../shared/vectors/generations/stream-sample-{release}.txt", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What must match between a vector and the synthetic master's output.
#[derive(Debug, Default)]
struct Shapes {
    /// The words of the lines before the first POSITION.
    opening: Vec<String>,
    /// POSITION lines with every token replaced by `N`, in order.
    positions: Vec<String>,
    /// Per RDATA stream: the set of (kind, field count) of its rows.
    rows: BTreeMap<String, BTreeSet<(String, usize)>>,
    /// RDATA heads with the token replaced by `T`: `RDATA <stream> master T`.
    heads: BTreeSet<String>,
    /// Whether every row is encoded with compact separators (`Some(true)`), every one with
    /// `", "` (`Some(false)`), or both occur (`None`).
    compact: Option<bool>,
}

fn shapes(lines: &[&str]) -> Shapes {
    let mut s = Shapes::default();
    let mut styles = BTreeSet::new();
    for line in lines {
        let mut parts = line.splitn(5, ' ');
        let word = parts.next().unwrap_or_default();
        match word {
            "POSITION" => {
                let fields: Vec<&str> = line.split(' ').collect();
                let masked: Vec<&str> =
                    fields.iter().enumerate().map(|(i, f)| if i >= 3 { "N" } else { f }).collect();
                s.positions.push(masked.join(" "));
            }
            "RDATA" => {
                let (stream, instance, _token, row) = (
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                );
                s.heads.insert(format!("RDATA {stream} {instance} T"));
                let value = json::parse(row.as_bytes()).unwrap_or_else(|e| panic!("{e}: {line}"));
                let spaced = json::to_vec(&value);
                let mut compact = BytesMut::from(&spaced[..]);
                compact_separators(&mut compact, 0, None);
                if spaced[..] != compact[..] {
                    // A row with separators at all: which style.
                    styles.insert(if row.as_bytes() == &spaced[..] {
                        false
                    } else {
                        assert_eq!(row.as_bytes(), &compact[..], "neither separator style: {line}");
                        true
                    });
                }
                let items = value.as_array().unwrap();
                let (kind, n) = match (stream, items) {
                    ("events" | "federation", [kind, data]) => {
                        (kind.as_str().unwrap().to_owned(), data.as_array().map_or(0, <[Value]>::len))
                    }
                    _ => (String::new(), items.len()),
                };
                s.rows.entry(stream.to_owned()).or_default().insert((kind, n));
                let id = StreamId::from_name(stream.as_bytes()).unwrap();
                if stream != "tag_account_data" {
                    // The vectors' tags are a stand-in object; Synapse writes a string.
                    shape::check(id, &value).unwrap_or_else(|e| panic!("{e}: {line}"));
                }
            }
            other if s.positions.is_empty() => s.opening.push(other.to_owned()),
            _ => {}
        }
    }
    s.compact = if styles.len() == 1 { styles.first().copied() } else { None };
    s
}

/// The hub fed by the synthetic master playing `release`, unpaced.
struct Played {
    source: SyntheticSource,
    sim: Sim,
    now: Now,
}

impl Played {
    fn new(release: SynapseRelease) -> Self {
        let now = Now::new(10_000, 1_583_254_800_000);
        let cfg = SyntheticConfig { rate: 0, ..SyntheticConfig::for_release(Some(release)) };
        let mut source = SyntheticSource::new(cfg, "example.com".to_owned());
        let mut sim = Sim::new(HubConfig { release: Some(release), ..HubConfig::default() });
        source.start(now);
        let Some(LinkEvent::Up(up)) = source.poll_event() else { panic!("Up first") };
        sim.hub.on_upstream(&up, sim.now);
        sim.flush();
        Self { source, sim, now }
    }

    /// One tick of the master (an unpaced batch), through the hub.
    fn tick(&mut self) {
        self.now = self.now.plus_ms(1);
        self.source.tick(self.now);
        while let Some(event) = self.source.poll_event() {
            let LinkEvent::Batch(batch) = event else { panic!("only batches after Up") };
            self.sim.hub.on_batch(batch, self.sim.now);
            self.sim.flush();
        }
    }
}

/// What a worker that sent `NAME sample-worker` and `greeting` gets from the hub fed by the
/// synthetic master playing `release` (about `lines` RDATA).
fn through_the_hub_as(release: SynapseRelease, greeting: &str, lines: usize) -> Vec<String> {
    let mut played = Played::new(release);
    let w = played.sim.accept();
    played.sim.send(w, &format!("NAME sample-worker\n{greeting}"));
    let mut out = played.sim.take_lines(w);
    while out.len() < lines {
        played.tick();
        out.extend(played.sim.take_lines(w));
    }
    out
}

/// [`through_the_hub_as`] for a 1.13+ worker (a bare `REPLICATE`).
fn through_the_hub(release: SynapseRelease, lines: usize) -> Vec<String> {
    through_the_hub_as(release, "REPLICATE ", lines)
}

fn compare(version: &str) {
    let release: SynapseRelease = version.parse().unwrap();
    let want_text = vector(version);
    let want_lines: Vec<&str> = want_text.lines().collect();
    let want = shapes(&want_lines);
    let got_lines = through_the_hub(release, 30_000);
    let got = shapes(&got_lines.iter().map(String::as_str).collect::<Vec<_>>());

    assert_eq!(got.opening, want.opening, "{version}: opening lines");
    assert_eq!(got.positions, want.positions, "{version}: POSITIONs (tokens aside), in order");
    assert_eq!(got.heads.iter().next(), want.heads.iter().next(), "{version}: RDATA head");
    assert!(got.heads.iter().all(|h| h.contains(" master T")), "{version}: {:?}", got.heads);
    assert_eq!(got.compact, Some(release.compact_json()), "{version}: separators");
    assert_eq!(got.compact, want.compact, "{version}: separators as the vector");
    // Every stream the release sent rows for, with the same layouts. The vectors hold no
    // `federation` rows; the synthetic master's are checked against the shape table.
    let got_streams: BTreeSet<&String> = got.rows.keys().collect();
    let want_streams: BTreeSet<&String> = want.rows.keys().collect();
    let extra: Vec<&&String> = got_streams.difference(&want_streams).collect();
    assert_eq!(extra, [&&"federation".to_owned()], "{version}: streams beyond the vector's");
    for (stream, layouts) in &want.rows {
        assert_eq!(&got.rows[stream], layouts, "{version} {stream}: the same row layouts");
    }
    let fed: BTreeSet<String> = got.rows["federation"].iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(fed.contains("p"), release.federation_presence_rows(), "{version}: federation p rows");
}

#[test]
fn release_1_13_0_as_its_master_sends_it() {
    compare("1.13.0");
}

#[test]
fn release_1_22_1_as_its_master_sends_it() {
    compare("1.22.1");
}

#[test]
fn release_1_66_0_as_its_master_sends_it() {
    compare("1.66.0");
}

#[test]
fn eight_field_ev_rows_between_1_23_and_1_63() {
    let lines = through_the_hub(SynapseRelease::new(50).unwrap(), 3_000);
    let got = shapes(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(got.rows["events"], BTreeSet::from([("ev".to_owned(), 8), ("state".to_owned(), 4)]));
    assert!(!got.rows.contains_key("public_rooms"), "gone from 1.41");
    assert!(got.positions.contains(&"POSITION groups master N N".to_owned()), "until 1.61");
    assert!(!got.positions.iter().any(|p| p.contains(" public_rooms ")));
}

#[test]
fn compacting_keeps_strings_and_moves_marks() {
    let text = br#"RDATA x 1 ["a, b: c", {"k": [1, 2]}, "\", "]"#;
    let mut out = BytesMut::from(&text[..]);
    let at = text.iter().position(|&b| b == b'{').unwrap();
    let removed = compact_separators(&mut out, 10, Some(at));
    assert_eq!(&out[..], br#"RDATA x 1 ["a, b: c",{"k":[1,2]},"\", "]"#);
    assert_eq!(removed, 1);
}

/// A 1.10–1.12 RDATA line: `RDATA <stream> <token|batch> <json>`, no instance name.
fn seed_form_rdata(line: &str) -> (StreamId, Option<i64>, &str) {
    let mut parts = line.splitn(4, ' ');
    let (word, stream, token, row) = (parts.next(), parts.next(), parts.next(), parts.next());
    assert_eq!(word, Some("RDATA"), "{line}");
    let stream =
        StreamId::from_name(stream.unwrap_or_default().as_bytes()).unwrap_or_else(|| panic!("{line}"));
    let token = match token {
        Some("batch") => None,
        Some(t) => Some(t.parse::<i64>().unwrap_or_else(|e| panic!("{e}: a token, not an instance: {line}"))),
        None => panic!("{line}"),
    };
    (stream, token, row.unwrap_or_else(|| panic!("{line}")))
}

/// The RDATA rows of `lines` per stream with their tokens resolved (a `batch` row takes the
/// token of the row that ends its run), as a 1.12 worker's `on_rdata` gets them.
fn resolved_rows(lines: &[String]) -> BTreeMap<StreamId, Vec<(i64, String)>> {
    let mut out: BTreeMap<StreamId, Vec<(i64, String)>> = BTreeMap::new();
    let mut open: BTreeMap<StreamId, Vec<String>> = BTreeMap::new();
    for line in lines.iter().filter(|l| l.starts_with("RDATA ")) {
        let (stream, token, row) = seed_form_rdata(line);
        open.entry(stream).or_default().push(row.to_owned());
        if let Some(t) = token {
            let rows = open.remove(&stream).unwrap_or_default();
            out.entry(stream).or_default().extend(rows.into_iter().map(|r| (t, r)));
        }
    }
    out
}

/// Synapse 1.10–1.12, checked against 1.12.4's own code (no master of those releases was
/// recorded; 1.10.0 and 1.11.0 have the same `streams/`, `commands.py` and `protocol.py` but
/// for the catch-up limit): a 1.12 worker's `REPLICATE ALL NOW` gets `POSITION <s> <tok>`
/// for every stream of `STREAMS_MAP` in its order, then `RDATA <s> <tok|batch> <json>` with
/// simplejson's `", "`/`": "` separators, `ev` rows of 6 fields (`EventsStreamEventRow`),
/// `device_lists` rows `[user_id, destination]` (`DeviceListsStreamRow`; `destination` is
/// `null` when no server was poked), federation `p` rows among the others.
#[test]
fn releases_1_10_to_1_12_as_their_master_sends_it() {
    for minor in [10, 11, 12] {
        let release = SynapseRelease::new(minor).unwrap();
        let lines = through_the_hub_as(release, "REPLICATE ALL NOW", 20_000);
        let first_position = lines.iter().position(|l| l.starts_with("POSITION")).unwrap();
        assert!(lines[0].starts_with("SERVER example.com"), "1.{minor}: {:?}", &lines[..first_position]);
        let positions: Vec<&str> =
            lines.iter().filter(|l| l.starts_with("POSITION")).map(String::as_str).collect();
        let streams: Vec<&str> = positions
            .iter()
            .map(|p| {
                let fields: Vec<&str> = p.split(' ').collect();
                assert_eq!(fields.len(), 3, "1.{minor}: two fields, no instance: {p}");
                assert!(fields[2].parse::<i64>().is_ok(), "1.{minor}: {p}");
                fields[1]
            })
            .collect();
        assert_eq!(streams, StreamId::SEED.map(StreamId::name), "1.{minor}: STREAMS_MAP's order");
        let mut layouts: BTreeMap<StreamId, BTreeSet<(String, usize)>> = BTreeMap::new();
        let mut null_destination = false;
        let mut device_runs: BTreeMap<i64, Vec<Value>> = BTreeMap::new();
        let mut pending_devices = Vec::new();
        for line in lines.iter().filter(|l| l.starts_with("RDATA ")) {
            let (stream, token, row) = seed_form_rdata(line);
            let value = json::parse(row.as_bytes()).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(
                row.as_bytes(),
                &json::to_vec(&value)[..],
                "1.{minor}: simplejson's separators: {line}"
            );
            shape::check(stream, &value).unwrap_or_else(|e| panic!("1.{minor}: {e}: {line}"));
            let items = value.as_array().unwrap();
            let layout = match (stream, items) {
                (StreamId::Events | StreamId::Federation, [kind, data]) => {
                    (kind.as_str().unwrap().to_owned(), data.as_array().map_or(0, <[Value]>::len))
                }
                _ => (String::new(), items.len()),
            };
            layouts.entry(stream).or_default().insert(layout);
            if stream == StreamId::DeviceLists {
                null_destination |= items[1] == Value::Null;
                pending_devices.push(value.clone());
                if let Some(t) = token {
                    device_runs.insert(t, std::mem::take(&mut pending_devices));
                }
            }
        }
        assert_eq!(layouts.len(), 16, "1.{minor}: rows of every stream: {:?}", layouts.keys());
        let set = |items: &[(&str, usize)]| {
            items.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect::<BTreeSet<_>>()
        };
        assert_eq!(layouts[&StreamId::Events], set(&[("ev", 6), ("state", 4)]), "1.{minor}");
        assert_eq!(layouts[&StreamId::DeviceLists], set(&[("", 2)]), "1.{minor}: [user_id, destination]");
        assert_eq!(
            layouts[&StreamId::Federation].iter().filter(|(k, _)| k == "p").count(),
            1,
            "1.{minor}: p rows"
        );
        assert!(null_destination, "1.{minor}: a device change that pokes no server");
        // One user's change per token, one row per destination, each destination once.
        for (t, rows) in &device_runs {
            let users: BTreeSet<String> =
                rows.iter().map(|r| r.as_array().unwrap()[0].as_str().unwrap().to_owned()).collect();
            let dests: BTreeSet<String> =
                rows.iter().map(|r| format!("{:?}", r.as_array().unwrap()[1])).collect();
            assert_eq!((users.len(), dests.len()), (1, rows.len()), "1.{minor} device_lists {t}: {rows:?}");
        }
    }
}

/// A 1.12 worker connecting to the synthetic 1.12 master with its own tokens is caught up from
/// the hub's history as a 1.12 master would: every row after its token, each RDATA with its own
/// token, then POSITION, then live rows, with nothing missed or repeated against a worker that
/// was there all along; a token older than the history gets 1.12's `has fallen behind`.
#[test]
fn a_1_12_worker_is_caught_up_from_the_history() {
    let release = SynapseRelease::new(12).unwrap();
    let mut played = Played::new(release);
    let early = played.sim.accept();
    played.sim.send(early, "NAME early\nREPLICATE ALL NOW");
    let mut seen = played.sim.take_lines(early);
    let start: BTreeMap<&str, i64> = seen
        .iter()
        .filter_map(|l| l.strip_prefix("POSITION "))
        .map(|p| {
            let (s, t) = p.split_once(' ').unwrap();
            (StreamId::from_name(s.as_bytes()).unwrap().name(), t.parse().unwrap())
        })
        .collect();
    assert_eq!(start.len(), 16);
    // About 5 MB of rows (4096 lines a tick): well within the default 16 MiB history.
    for _ in 0..5 {
        played.tick();
    }
    seen.extend(played.sim.take_lines(early));
    assert!(played.sim.hub.snapshot(0, played.sim.now, |_| Default::default()).stats.history_bytes > 0);

    // As a 1.12 worker connects: NAME, then `REPLICATE <stream> <token>` for each stream.
    let late = played.sim.accept();
    let mut greeting = "NAME late".to_owned();
    for s in StreamId::SEED {
        greeting.push_str(&format!("\nREPLICATE {} {}", s.name(), start[s.name()]));
    }
    played.sim.send(late, &greeting);
    let mut got = played.sim.take_lines(late);
    for _ in 0..10 {
        played.tick();
    }
    got.extend(played.sim.take_lines(late));
    seen.extend(played.sim.take_lines(early));
    assert!(played.sim.closed(late).is_none(), "{:?}", got.iter().find(|l| l.starts_with("ERROR")));

    // Per stream: the catch-up rows carry their own token (never `batch`), come before the
    // stream's POSITION, and are exactly the rows the early worker got after the token; then
    // live rows, as the early worker got them.
    let mut positions = 0;
    for s in StreamId::SEED {
        let position = format!("POSITION {} ", s.name());
        let at = got.iter().position(|l| l.starts_with(&position)).unwrap_or_else(|| panic!("{position}"));
        positions += 1;
        let catch_up: Vec<&String> =
            got[..at].iter().filter(|l| l.starts_with(&format!("RDATA {} ", s.name()))).collect();
        assert!(
            catch_up.iter().all(|l| seed_form_rdata(l).1.is_some()),
            "{}: no batch in a catch-up",
            s.name()
        );
        let pos: i64 = got[at][position.len()..].parse().unwrap();
        let caught: Vec<(i64, String)> =
            catch_up.iter().map(|l| seed_form_rdata(l)).map(|(_, t, r)| (t.unwrap(), r.to_owned())).collect();
        let want: Vec<(i64, String)> = resolved_rows(&seen).remove(&s).unwrap_or_default();
        let (before, after): (Vec<_>, Vec<_>) = want.into_iter().partition(|(t, _)| *t <= pos);
        assert_eq!(caught, before, "{}: rows after {} up to {pos}", s.name(), start[s.name()]);
        let live = resolved_rows(&got[at..]).remove(&s).unwrap_or_default();
        let n = live.len().min(after.len());
        assert_eq!(live[..n], after[..n], "{}: the same live rows", s.name());
    }
    assert_eq!(positions, 16);
    let events_caught = got
        .iter()
        .take_while(|l| !l.starts_with("POSITION events "))
        .filter(|l| l.starts_with("RDATA events "))
        .count();
    assert!(events_caught > 100, "a real catch-up: {events_caught} events rows");

    // No master to fetch older rows from: a token below the history's floor.
    let behind = played.sim.accept();
    played.sim.send(behind, &format!("NAME behind\nREPLICATE events {}", start["events"] - 1));
    assert_eq!(
        played.sim.take_lines(behind).last().map(String::as_str),
        Some("ERROR failed to handle replicate: Exception('stream events has fallen behind')")
    );
    assert!(played.sim.closed(behind).is_some());
}

/// The same master's REMOTE_SERVER_UP handling: echoed to every connection, the sender too.
#[test]
fn a_1_12_master_echoes_remote_server_up_to_its_sender() {
    let mut played = Played::new(SynapseRelease::new(12).unwrap());
    let (a, b) = (played.sim.accept(), played.sim.accept());
    played.sim.send(a, "NAME a\nREPLICATE ALL NOW");
    played.sim.send(b, "NAME b\nREPLICATE ALL NOW");
    played.sim.send(a, "REMOTE_SERVER_UP other.example");
    for cmd in played.sim.take_upstream() {
        played.source.on_command(0, cmd, played.now);
    }
    played.tick();
    for w in [a, b] {
        assert!(played.sim.take_lines(w).contains(&"REMOTE_SERVER_UP other.example".to_owned()));
    }
}
