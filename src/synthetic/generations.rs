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

/// What a worker that sent `NAME sample-worker` and a bare `REPLICATE` gets from the hub fed
/// by the synthetic master playing `release` (about `lines` RDATA).
fn through_the_hub(release: SynapseRelease, lines: usize) -> Vec<String> {
    let t0 = Now::new(10_000, 1_583_254_800_000);
    let cfg = SyntheticConfig { rate: 0, ..SyntheticConfig::for_release(Some(release)) };
    let mut source = SyntheticSource::new(cfg, "example.com".to_owned());
    let mut sim = Sim::new(HubConfig { release: Some(release), ..HubConfig::default() });
    source.start(t0);
    let Some(LinkEvent::Up(up)) = source.poll_event() else { panic!("Up first") };
    sim.hub.on_upstream(&up, sim.now);
    sim.flush();
    let w = sim.accept();
    sim.send(w, "NAME sample-worker\nREPLICATE ");
    let mut out = sim.take_lines(w);
    let mut now = t0;
    while out.len() < lines {
        now = now.plus_ms(1);
        source.tick(now);
        while let Some(event) = source.poll_event() {
            let LinkEvent::Batch(batch) = event else { panic!("only batches after Up") };
            sim.hub.on_batch(batch, sim.now);
            sim.flush();
        }
        out.extend(sim.take_lines(w));
    }
    out
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
