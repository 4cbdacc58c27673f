//! What `replhub top` shows, as a pure function of two successive polls, the sort and the
//! terminal size: no terminal, no clock, no network, so it is unit-tested as it is.
//!
//! ```text
//!  (previous Poll, current Poll, TopSort, size) ─► model::view ─► View ─► draw (ratatui)
//! ```
use std::collections::HashMap;

use crate::metrics::connections::{human_duration, ConnEntry, ConnectionsPage};

/// One `/connections` page and when it was read (monotonic ms of the poller's clock).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Poll {
    /// When the page was read.
    pub at_ms: u64,
    /// The page.
    pub page: ConnectionsPage,
}

/// How the worker table is ordered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TopSort {
    /// Largest backlog first.
    #[default]
    Backlog,
    /// Most lines per second first.
    Rate,
    /// By worker name.
    Name,
}

impl TopSort {
    /// The sort's name, as the header shows it.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Backlog => "backlog",
            Self::Rate => "rate",
            Self::Name => "name",
        }
    }

    /// The sort a key selects (`b`, `r`, `n`; `s` cycles).
    pub const fn for_key(self, key: char) -> Option<Self> {
        match key {
            'b' => Some(Self::Backlog),
            'r' => Some(Self::Rate),
            'n' => Some(Self::Name),
            's' => Some(match self {
                Self::Backlog => Self::Rate,
                Self::Rate => Self::Name,
                Self::Name => Self::Backlog,
            }),
            _ => None,
        }
    }
}

/// The table's columns: heading and width (the last one takes what is left).
pub const COLUMNS: [(&str, u16); 9] = [
    ("WORKER", 19),
    ("CORE", 4),
    ("LINES/S", 7),
    ("BYTES/S", 7),
    ("BACKLOG", 7),
    ("BEHIND", 6),
    ("SENDQ", 6),
    ("UP", 8),
    ("STREAMS", 7),
];

/// One table row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// One text per column.
    pub cells: Vec<String>,
    /// The slowest worker (largest backlog): drawn highlighted and marked with `>`.
    pub slowest: bool,
}

/// Everything on the screen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// Top lines: where, when, sort, keys; upstream; totals and rates.
    pub header: Vec<String>,
    /// The rows that fit, in order.
    pub rows: Vec<Row>,
    /// The last line: rows not shown, or the last poll's error.
    pub footer: String,
}

/// Lines above the table (header lines plus the column headings).
pub const HEADER_LINES: u16 = 4;

/// Builds the screen for `cur` (with rates against `prev`, when there is one), the sort and a
/// terminal of `width` x `height`. `error` is the last poll's failure, if it failed (`cur` is
/// then the last page that was read, if any).
pub fn view(
    target: &str,
    prev: Option<&Poll>,
    cur: Option<&Poll>,
    error: Option<&str>,
    sort: TopSort,
    (width, height): (u16, u16),
) -> View {
    let keys = format!("replhub top {target}  sort: {} [b/r/n]  q: quit", sort.label());
    let Some(cur) = cur else {
        return View {
            header: vec![fit(&keys, width), "waiting for the first poll…".to_owned(), String::new()],
            rows: Vec::new(),
            footer: error.map_or_else(String::new, |e| fit(&format!("error: {e}"), width)),
        };
    };
    let page = &cur.page;
    let prev = prev.filter(|p| p.at_ms < cur.at_ms);
    let secs = prev.map(|p| (cur.at_ms - p.at_ms) as f64 / 1000.0);
    let rate = |now: u64, before: u64| secs.map(|s| now.saturating_sub(before) as f64 / s);

    let up = &page.upstream;
    let upstream = match (up.mode.as_str(), up.connected) {
        ("synthetic", _) => "synthetic master".to_owned(),
        (_, true) => "connected".to_owned(),
        (_, false) => match up.down_for_ms {
            Some(ms) => format!("DOWN for {}", human_duration(ms)),
            None => "DOWN".to_owned(),
        },
    };
    let generation = up.generation.as_deref().unwrap_or("?");
    let t = &page.totals;
    let (lines_s, bytes_s) = match prev {
        Some(p) => (
            rate(t.lines_delivered, p.page.totals.lines_delivered),
            rate(t.bytes_delivered, p.page.totals.bytes_delivered),
        ),
        None => (None, None),
    };
    let header = vec![
        fit(&keys, width),
        fit(
            &format!(
                "upstream: {upstream}, generation {generation}, reconnects {}   cores {}/{}",
                up.reconnects, page.cores_answered, page.cores
            ),
            width,
        ),
        fit(
            &format!(
                "{} lines/s  {}/s  workers {}  accepted {}  evicted {}  log {}",
                opt(lines_s.map(count)),
                opt(bytes_s.map(bytes)),
                page.total,
                t.accepted,
                t.evicted,
                bytes(t.log_bytes as f64)
            ),
            width,
        ),
    ];

    let before: HashMap<(usize, &str), &ConnEntry> = prev
        .map(|p| p.page.connections.iter().map(|c| ((c.core, c.cid.as_str()), c)).collect())
        .unwrap_or_default();
    let mut rows: Vec<(&ConnEntry, Option<f64>, Option<f64>)> = page
        .connections
        .iter()
        .map(|c| match before.get(&(c.core, c.cid.as_str())) {
            Some(b) => {
                (c, rate(c.lines_delivered, b.lines_delivered), rate(c.bytes_delivered, b.bytes_delivered))
            }
            None => (c, None, None),
        })
        .collect();
    rows.sort_by(|a, b| {
        let by = match sort {
            TopSort::Backlog => b.0.backlog_bytes.cmp(&a.0.backlog_bytes),
            TopSort::Rate => b.1.unwrap_or(0.0).total_cmp(&a.1.unwrap_or(0.0)),
            TopSort::Name => a.0.name.cmp(&b.0.name),
        };
        by.then_with(|| (a.0.core, &a.0.cid).cmp(&(b.0.core, &b.0.cid)))
    });
    let slowest = page
        .connections
        .iter()
        .filter(|c| c.backlog_bytes > 0)
        .max_by(|a, b| {
            (a.backlog_bytes, a.backlogged_ms)
                .cmp(&(b.backlog_bytes, b.backlogged_ms))
                .then_with(|| (&b.core, &b.cid).cmp(&(&a.core, &a.cid)))
        })
        .map(|c| (c.core, c.cid.as_str()));

    let room = usize::from(height.saturating_sub(HEADER_LINES + 1));
    let hidden = rows.len().saturating_sub(room) + page.total.saturating_sub(page.connections.len());
    let rows = rows
        .into_iter()
        .take(room)
        .map(|(c, lines, bytes_rate)| {
            let is_slowest = slowest == Some((c.core, c.cid.as_str()));
            let marker = if is_slowest { '>' } else { ' ' };
            Row {
                cells: vec![
                    format!("{marker}{}", c.name),
                    c.core.to_string(),
                    opt(lines.map(count)),
                    opt(bytes_rate.map(bytes)),
                    bytes(c.backlog_bytes as f64),
                    c.backlogged_ms.map_or_else(|| "-".to_owned(), human_duration),
                    bytes(c.send_queue as f64),
                    human_duration(c.uptime_ms),
                    c.streams.len().to_string(),
                ],
                slowest: is_slowest,
            }
        })
        .collect();
    let footer = match error {
        Some(e) => format!("error: {e} (showing the last page read)"),
        None if hidden > 0 => format!("… {hidden} more workers not shown"),
        None => String::new(),
    };
    View { header, rows, footer: fit(&footer, width) }
}

/// `s` cut to `width` characters.
fn fit(s: &str, width: u16) -> String {
    s.chars().take(usize::from(width)).collect()
}

fn opt(s: Option<String>) -> String {
    s.unwrap_or_else(|| "-".to_owned())
}

/// A count for people: `950`, `12.3k`, `4.5M`.
fn count(n: f64) -> String {
    if n < 1000.0 {
        format!("{n:.0}")
    } else if n < 1_000_000.0 {
        format!("{:.1}k", n / 1000.0)
    } else {
        format!("{:.1}M", n / 1_000_000.0)
    }
}

/// Bytes for people, binary units: `512B`, `1.5K`, `3.2M`, `1.0G`.
fn bytes(n: f64) -> String {
    const K: f64 = 1024.0;
    if n < K {
        format!("{n:.0}B")
    } else if n < K * K {
        format!("{:.1}K", n / K)
    } else if n < K * K * K {
        format!("{:.1}M", n / (K * K))
    } else {
        format!("{:.1}G", n / (K * K * K))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::connections::{Totals, UpstreamView};

    fn entry(cid: &str, name: &str, lines: u64, backlog: u64) -> ConnEntry {
        ConnEntry {
            cid: cid.to_owned(),
            name: name.to_owned(),
            lines_delivered: lines,
            bytes_delivered: lines * 100,
            backlog_bytes: backlog,
            backlogged_ms: (backlog > 0).then_some(2000),
            uptime_ms: 65_000,
            streams: vec!["events".to_owned()],
            ..ConnEntry::default()
        }
    }

    fn poll(at_ms: u64, lines: u64, conns: Vec<ConnEntry>) -> Poll {
        Poll {
            at_ms,
            page: ConnectionsPage {
                cores: 1,
                cores_answered: 1,
                upstream: UpstreamView {
                    mode: "upstream".to_owned(),
                    connected: true,
                    generation: Some("1.22".to_owned()),
                    ..UpstreamView::default()
                },
                totals: Totals { lines_delivered: lines, bytes_delivered: lines * 100, ..Totals::default() },
                total: conns.len(),
                num_connections: conns.len(),
                connections: conns,
                ..ConnectionsPage::default()
            },
        }
    }

    fn names(v: &View) -> Vec<&str> {
        v.rows.iter().map(|r| r.cells[0].trim_start_matches(['>', ' '])).collect()
    }

    #[test]
    fn rates_come_from_successive_polls() {
        let a = poll(1000, 1000, vec![entry("1.1", "fast", 500, 0), entry("2.1", "slow", 500, 0)]);
        let b = poll(3000, 5000, vec![entry("1.1", "fast", 4100, 0), entry("2.1", "slow", 1000, 8192)]);
        let v = view("h:1", Some(&a), Some(&b), None, TopSort::Rate, (80, 24));
        assert!(v.header[2].starts_with("2.0k lines/s  195.3K/s  workers 2"), "{}", v.header[2]);
        assert!(v.header[1].contains("upstream: connected, generation 1.22"), "{}", v.header[1]);
        assert_eq!(names(&v), ["fast", "slow"]);
        assert_eq!(v.rows[0].cells[2], "1.8k");
        assert_eq!(v.rows[1].cells[2], "250");
        // The slowest is the one with a backlog, whatever the order.
        assert_eq!((v.rows[0].slowest, v.rows[1].slowest), (false, true));
        assert_eq!(v.rows[1].cells[0], ">slow");
        assert_eq!(v.rows[1].cells[4], "8.0K");
        // Without a previous poll there is no rate yet.
        let first = view("h:1", None, Some(&b), None, TopSort::Rate, (80, 24));
        assert!(first.header[2].starts_with("- lines/s  -/s"), "{}", first.header[2]);
        assert_eq!(first.rows[0].cells[2], "-");
    }

    #[test]
    fn sorts_by_backlog_or_name_and_keys_switch() {
        let p =
            poll(1000, 0, vec![entry("1.1", "b", 0, 10), entry("2.1", "a", 0, 0), entry("3.1", "c", 0, 99)]);
        assert_eq!(names(&view("h", None, Some(&p), None, TopSort::Backlog, (80, 24))), ["c", "b", "a"]);
        assert_eq!(names(&view("h", None, Some(&p), None, TopSort::Name, (80, 24))), ["a", "b", "c"]);
        assert_eq!(TopSort::Backlog.for_key('r'), Some(TopSort::Rate));
        assert_eq!(TopSort::Name.for_key('s'), Some(TopSort::Backlog));
        assert_eq!(TopSort::Name.for_key('x'), None);
    }

    #[test]
    fn fits_the_terminal() {
        let conns = (0..40).map(|i| entry(&format!("{i}.1"), &format!("w{i:02}"), 0, 0)).collect();
        let p = poll(1000, 0, conns);
        let v = view("h", None, Some(&p), None, TopSort::Name, (80, 24));
        assert_eq!(v.rows.len(), 24 - usize::from(HEADER_LINES) - 1);
        assert_eq!(v.footer, "… 21 more workers not shown");
        let narrow = view("127.0.0.1:9093", None, Some(&p), None, TopSort::Name, (20, 10));
        assert!(narrow.header.iter().all(|l| l.chars().count() <= 20));
        assert_eq!(narrow.rows.len(), 5);
    }

    #[test]
    fn shows_a_down_upstream_and_errors() {
        let mut p = poll(1000, 0, Vec::new());
        p.page.upstream.connected = false;
        p.page.upstream.down_for_ms = Some(75_000);
        let v = view("h", None, Some(&p), Some("connection refused"), TopSort::Backlog, (80, 24));
        assert!(v.header[1].contains("upstream: DOWN for 1m15s"), "{}", v.header[1]);
        assert_eq!(v.footer, "error: connection refused (showing the last page read)");
        let none = view("h", None, None, Some("connection refused"), TopSort::Backlog, (80, 24));
        assert!(none.rows.is_empty());
        assert_eq!(none.footer, "error: connection refused");
    }
}
