//! `/connections`: every live worker connection as JSON, in the manner of NATS's `/connz`.
//!
//! ```text
//!  GET /connections?sort=backlog&limit=50&offset=0
//!    └─ ConnQuery::parse (bad parameters: 400, nobody asked)
//!         └─ render thread: CoreSnapshots + UpstreamSnapshot ─► ConnectionsPage::build ─► JSON
//! ```
//!
//! The page is the serde form of [`ConnectionsPage`]; `replhub top` reads it back with the
//! same types, so the two cannot drift apart. Everything here is a pure function of the
//! snapshots and the time, so it is tested without a server.
use std::cmp::Ordering;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::snapshot::UpstreamSnapshot;
use crate::hub::stats::{CloseReason, ConnSample, CoreSnapshot};
use crate::proto::StreamId;

/// Connections listed when the query gives no `limit`.
pub(crate) const DEFAULT_LIMIT: usize = 1024;
/// Most connections listed in one page; a larger `limit` is lowered to this.
pub(crate) const MAX_LIMIT: usize = 10_000;

/// What the list is ordered by. Numbers sort largest first, names and addresses A to Z; ties
/// go by core and connection id, so a page boundary is stable between two requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// Backlog bytes.
    Backlog,
    /// How long it has been backlogged.
    Backlogged,
    /// Bytes delivered.
    Bytes,
    /// Log lines delivered.
    Lines,
    /// Lines waiting to be written.
    Pending,
    /// Kernel send queue.
    SendQueue,
    /// Kernel receive queue.
    RecvQueue,
    /// Time connected.
    Uptime,
    /// Time since its last PING (since connecting, if it never sent one).
    Idle,
    /// Worker name.
    Name,
    /// Peer address.
    Peer,
    /// Core, then connection id.
    Cid,
}

impl SortKey {
    /// Every key, as the query spells it.
    const ALL: [(&'static str, Self); 12] = [
        ("backlog", Self::Backlog),
        ("backlogged", Self::Backlogged),
        ("bytes", Self::Bytes),
        ("lines", Self::Lines),
        ("pending", Self::Pending),
        ("sendq", Self::SendQueue),
        ("recvq", Self::RecvQueue),
        ("uptime", Self::Uptime),
        ("idle", Self::Idle),
        ("name", Self::Name),
        ("peer", Self::Peer),
        ("cid", Self::Cid),
    ];

    /// The key's name in the query.
    pub(crate) fn label(self) -> &'static str {
        Self::ALL.iter().find(|(_, k)| *k == self).map_or("cid", |(n, _)| n)
    }

    fn from_label(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, k)| *k)
    }

    fn names() -> String {
        Self::ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    }

    /// `a` before `b` in this order (without the tie-break).
    fn cmp(self, a: &ConnEntry, b: &ConnEntry) -> Ordering {
        let desc = |x: u64, y: u64| y.cmp(&x);
        match self {
            Self::Backlog => desc(a.backlog_bytes, b.backlog_bytes),
            Self::Backlogged => desc(a.backlogged_ms.unwrap_or(0), b.backlogged_ms.unwrap_or(0)),
            Self::Bytes => desc(a.bytes_delivered, b.bytes_delivered),
            Self::Lines => desc(a.lines_delivered, b.lines_delivered),
            Self::Pending => desc(a.pending_lines, b.pending_lines),
            Self::SendQueue => desc(a.send_queue, b.send_queue),
            Self::RecvQueue => desc(a.recv_queue, b.recv_queue),
            Self::Uptime => desc(a.uptime_ms, b.uptime_ms),
            Self::Idle => desc(a.idle_ms(), b.idle_ms()),
            Self::Name => a.name.cmp(&b.name),
            Self::Peer => a.peer.cmp(&b.peer),
            Self::Cid => Ordering::Equal,
        }
    }
}

/// A bad `/connections` query, worded for the `400` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// A parameter this page does not take.
    #[error("unknown parameter {0:?}: /connections takes sort, limit and offset")]
    Unknown(String),
    /// `sort` names no key.
    #[error("sort={0:?} is not a sort key; use one of: {keys}", keys = SortKey::names())]
    Sort(String),
    /// `limit` or `offset` is not a number.
    #[error("{name}={value:?} is not a non-negative integer")]
    Number {
        /// The parameter.
        name: &'static str,
        /// What it said.
        value: String,
    },
    /// A parameter given twice.
    #[error("parameter {0} given more than once")]
    Repeated(&'static str),
}

/// A parsed `/connections` query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnQuery {
    /// The order.
    pub sort: SortKey,
    /// Connections listed at most (at most 10 000).
    pub limit: usize,
    /// Connections skipped, in sort order, before the first listed.
    pub offset: usize,
}

impl Default for ConnQuery {
    fn default() -> Self {
        Self { sort: SortKey::Cid, limit: DEFAULT_LIMIT, offset: 0 }
    }
}

impl ConnQuery {
    /// Parses a query string (`sort=backlog&limit=10`; no percent-escapes are needed by any
    /// valid value, so none are decoded). Empty pieces (`a=1&&b=2`, a trailing `&`) are ignored.
    pub fn parse(query: &[u8]) -> Result<Self, QueryError> {
        let mut q = Self::default();
        let mut seen = [false; 3];
        for piece in query.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
            let piece = String::from_utf8_lossy(piece);
            let (name, value) = piece.split_once('=').unwrap_or((&piece, ""));
            let (slot, name) = match name {
                "sort" => (0, "sort"),
                "limit" => (1, "limit"),
                "offset" => (2, "offset"),
                other => return Err(QueryError::Unknown(other.to_owned())),
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(QueryError::Repeated(name));
            }
            let number =
                || value.parse::<usize>().map_err(|_| QueryError::Number { name, value: value.to_owned() });
            match slot {
                0 => q.sort = SortKey::from_label(value).ok_or_else(|| QueryError::Sort(value.to_owned()))?,
                1 => q.limit = number()?.min(MAX_LIMIT),
                _ => q.offset = number()?,
            }
        }
        Ok(q)
    }
}

/// The upstream as `/connections` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamView {
    /// `upstream` or `synthetic`; `unknown` if the source did not answer.
    pub mode: String,
    /// Whether the link is up (synthetic: always).
    pub connected: bool,
    /// Its protocol generation, once known.
    pub generation: Option<String>,
    /// Reconnects so far.
    pub reconnects: u64,
    /// While down, for how long (ms).
    pub down_for_ms: Option<u64>,
}

/// Server-wide counters (monotonic, summed over the cores that answered): `replhub top` turns
/// two of them into rates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Log lines written to workers.
    pub lines_delivered: u64,
    /// Bytes written to workers.
    pub bytes_delivered: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Slow consumers evicted.
    pub evicted: u64,
    /// Bytes the cores' logs hold now.
    pub log_bytes: u64,
}

/// One live connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnEntry {
    /// Core that serves it.
    pub core: usize,
    /// Its id on that core (`index.generation`, as in the logs).
    pub cid: String,
    /// The worker's NAME (`anon` before NAME).
    pub name: String,
    /// The peer's address.
    pub peer: String,
    /// How it is connected (`tcp`: the replication protocol).
    pub transport: String,
    /// The protocol generation it is served in, once known.
    pub generation: Option<String>,
    /// When it connected (RFC 3339, UTC).
    pub connected_since: String,
    /// Time connected, in ms.
    pub uptime_ms: u64,
    /// Time connected, for people (`1h2m3s`).
    pub uptime: String,
    /// Life stage: waiting, connected, subscribed, closing.
    pub state: String,
    /// Why it closes, once decided (`SlowConsumer`, `PingTimeout`, …).
    pub close_reason: Option<String>,
    /// Subscribed streams.
    pub streams: Vec<String>,
    /// Log lines written to it.
    pub lines_delivered: u64,
    /// Bytes written to it.
    pub bytes_delivered: u64,
    /// Lines waiting for it (log lines behind its cursor plus private lines).
    pub pending_lines: u64,
    /// Bytes of log it holds back.
    pub backlog_bytes: u64,
    /// How long it has been behind without catching up (ms); null when it has no backlog.
    pub backlogged_ms: Option<u64>,
    /// Kernel send queue (`SIOCOUTQ`).
    pub send_queue: u64,
    /// Kernel receive queue (`SIOCINQ`).
    pub recv_queue: u64,
    /// Ms since its last PING; null if it never sent one.
    pub last_ping_ago_ms: Option<u64>,
}

impl ConnEntry {
    /// Ms since it last showed life by PING (since connecting, if it never pinged).
    fn idle_ms(&self) -> u64 {
        self.last_ping_ago_ms.unwrap_or(self.uptime_ms)
    }

    fn from_sample(core: usize, c: &ConnSample) -> Self {
        Self {
            core,
            cid: c.id.clone(),
            name: c.name.clone(),
            peer: c.peer.clone(),
            transport: c.transport.to_owned(),
            generation: c.generation.map(str::to_owned),
            connected_since: rfc3339(c.connected_wall_ms),
            uptime_ms: c.uptime_ms,
            uptime: human_duration(c.uptime_ms),
            state: c.phase.label().to_owned(),
            close_reason: c.closing.map(|r: CloseReason| r.label().to_owned()),
            streams: StreamId::ALL
                .iter()
                .filter(|s| c.subscribes(**s))
                .map(|s| s.name().to_owned())
                .collect(),
            lines_delivered: c.lines_delivered,
            bytes_delivered: c.bytes_delivered,
            pending_lines: c.pending_commands,
            backlog_bytes: c.backlog_bytes,
            backlogged_ms: c.backlogged_ms,
            send_queue: c.kernel_send_queue,
            recv_queue: c.kernel_read_queue,
            last_ping_ago_ms: c.last_ping_ago_ms,
        }
    }
}

/// The whole `/connections` page.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionsPage {
    /// When the page was made (RFC 3339, UTC).
    pub now: String,
    /// The server's version.
    pub version: String,
    /// Core threads.
    pub cores: usize,
    /// Cores that answered in time (the rest are missing from the list and the totals).
    pub cores_answered: usize,
    /// The upstream.
    pub upstream: UpstreamView,
    /// Server-wide counters.
    pub totals: Totals,
    /// Connections in this page.
    pub num_connections: usize,
    /// Live connections in all.
    pub total: usize,
    /// Connections skipped before this page.
    pub offset: usize,
    /// Most connections a page holds (as asked, capped).
    pub limit: usize,
    /// The order.
    pub sort: String,
    /// This page's connections.
    pub connections: Vec<ConnEntry>,
}

/// What the page needs besides the snapshots.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PageContext<'a> {
    /// The server's version.
    pub version: &'a str,
    /// Core threads.
    pub cores: usize,
    /// Monotonic ms of the server's clock (for the upstream's downtime).
    pub now_mono_ms: u64,
    /// Wall-clock Unix ms.
    pub now_wall_ms: i64,
}

impl ConnectionsPage {
    /// Builds the page for `query` from the cores' snapshots and the upstream's (`None` if the
    /// source did not answer).
    pub(crate) fn build(
        snaps: &[CoreSnapshot],
        upstream: Option<&UpstreamSnapshot>,
        ctx: PageContext<'_>,
        query: &ConnQuery,
    ) -> Self {
        let mut totals = Totals::default();
        for s in snaps {
            totals.lines_delivered += s.stats.lines_delivered;
            totals.bytes_delivered += s.stats.bytes_delivered;
            totals.accepted += s.stats.accepted;
            totals.evicted += s.stats.evictions.iter().sum::<u64>();
            totals.log_bytes += s.stats.log_bytes;
        }
        let mut all: Vec<ConnEntry> =
            snaps.iter().flat_map(|s| s.conns.iter().map(|c| ConnEntry::from_sample(s.core, c))).collect();
        sort_entries(&mut all, query.sort);
        let total = all.len();
        let connections: Vec<ConnEntry> = all.into_iter().skip(query.offset).take(query.limit).collect();
        let upstream = upstream.map_or_else(
            || UpstreamView { mode: "unknown".to_owned(), ..UpstreamView::default() },
            |u| UpstreamView {
                mode: u.mode.to_owned(),
                connected: u.connected,
                generation: u.generation.map(str::to_owned),
                reconnects: u.reconnects,
                down_for_ms: u.down_since_ms.map(|t| ctx.now_mono_ms.saturating_sub(t)),
            },
        );
        Self {
            now: rfc3339(ctx.now_wall_ms),
            version: ctx.version.to_owned(),
            cores: ctx.cores,
            cores_answered: snaps.len(),
            upstream,
            totals,
            num_connections: connections.len(),
            total,
            offset: query.offset,
            limit: query.limit,
            sort: query.sort.label().to_owned(),
            connections,
        }
    }

    /// The page as JSON.
    pub(crate) fn to_json(&self) -> String {
        // Serialising plain structs of strings and integers cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Sorts by `key`, ties by core and connection id.
pub(crate) fn sort_entries(entries: &mut [ConnEntry], key: SortKey) {
    entries.sort_by(|a, b| key.cmp(a, b).then_with(|| (a.core, &a.cid).cmp(&(b.core, &b.cid))));
}

/// `ms` for people: `0.4s`, `45s`, `3m5s`, `2h0m7s`, `3d4h5m`.
pub(crate) fn human_duration(ms: u64) -> String {
    if ms < 10_000 {
        return format!("{:.1}s", ms as f64 / 1000.0);
    }
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    let mut out = String::new();
    let _ = if d > 0 {
        write!(out, "{d}d{h}h{m}m")
    } else if h > 0 {
        write!(out, "{h}h{m}m{s}s")
    } else if m > 0 {
        write!(out, "{m}m{s}s")
    } else {
        write!(out, "{s}s")
    };
    out
}

/// Unix ms as RFC 3339 in UTC with milliseconds (`2026-12-06T03:04:05.678Z`).
pub(crate) fn rfc3339(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, mo, d) = civil_from_days(days);
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::stats::{ConnPhase, CoreStats};

    #[test]
    fn parses_queries() {
        assert_eq!(ConnQuery::parse(b"").unwrap(), ConnQuery::default());
        let q = ConnQuery::parse(b"sort=backlog&limit=5&offset=10&").unwrap();
        assert_eq!(q, ConnQuery { sort: SortKey::Backlog, limit: 5, offset: 10 });
        assert_eq!(ConnQuery::parse(b"limit=999999").unwrap().limit, MAX_LIMIT);
        assert_eq!(ConnQuery::parse(b"limit=0").unwrap().limit, 0);
        for (label, key) in SortKey::ALL {
            assert_eq!(ConnQuery::parse(format!("sort={label}").as_bytes()).unwrap().sort, key);
            assert_eq!(key.label(), label);
        }
    }

    #[test]
    fn rejects_bad_queries_with_a_reason() {
        let err = |q: &[u8]| ConnQuery::parse(q).unwrap_err();
        assert_eq!(err(b"sort=colour"), QueryError::Sort("colour".to_owned()));
        assert!(err(b"sort=colour").to_string().contains("backlog, backlogged, bytes"));
        assert_eq!(err(b"limit=-1"), QueryError::Number { name: "limit", value: "-1".to_owned() });
        assert_eq!(err(b"offset="), QueryError::Number { name: "offset", value: String::new() });
        assert_eq!(err(b"limit=1&limit=2"), QueryError::Repeated("limit"));
        assert_eq!(err(b"subs=1"), QueryError::Unknown("subs".to_owned()));
        assert_eq!(err(b"sort"), QueryError::Sort(String::new()));
    }

    fn sample(id: &str, name: &str, backlog: u64, bytes: u64, uptime_ms: u64) -> ConnSample {
        ConnSample {
            id: id.to_owned(),
            name: name.to_owned(),
            transport: "tcp",
            backlog_bytes: backlog,
            bytes_delivered: bytes,
            uptime_ms,
            ..ConnSample::default()
        }
    }

    fn snaps() -> Vec<CoreSnapshot> {
        vec![
            CoreSnapshot {
                core: 0,
                stats: CoreStats { lines_delivered: 10, bytes_delivered: 1000, ..CoreStats::default() },
                conns: vec![sample("0.1", "zeta", 5, 100, 3000), sample("1.1", "alpha", 0, 900, 1000)],
                resp: Default::default(),
            },
            CoreSnapshot {
                core: 1,
                stats: CoreStats { lines_delivered: 5, bytes_delivered: 500, ..CoreStats::default() },
                conns: vec![sample("0.1", "mid", 5, 300, 2000)],
                resp: Default::default(),
            },
        ]
    }

    fn ctx() -> PageContext<'static> {
        PageContext { version: "0.1.0", cores: 2, now_mono_ms: 50_000, now_wall_ms: 1_780_000_000_000 }
    }

    fn names(p: &ConnectionsPage) -> Vec<&str> {
        p.connections.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn sorts_numbers_descending_names_ascending_ties_by_core_and_id() {
        let page =
            |sort| ConnectionsPage::build(&snaps(), None, ctx(), &ConnQuery { sort, ..ConnQuery::default() });
        // zeta and mid tie on backlog: core 0 first.
        assert_eq!(names(&page(SortKey::Backlog)), ["zeta", "mid", "alpha"]);
        assert_eq!(names(&page(SortKey::Bytes)), ["alpha", "mid", "zeta"]);
        assert_eq!(names(&page(SortKey::Name)), ["alpha", "mid", "zeta"]);
        assert_eq!(names(&page(SortKey::Uptime)), ["zeta", "mid", "alpha"]);
        assert_eq!(names(&page(SortKey::Cid)), ["zeta", "alpha", "mid"]);
    }

    #[test]
    fn paginates_and_counts() {
        let q = ConnQuery { sort: SortKey::Name, limit: 1, offset: 1 };
        let p = ConnectionsPage::build(&snaps(), None, ctx(), &q);
        assert_eq!(names(&p), ["mid"]);
        assert_eq!((p.num_connections, p.total, p.offset, p.limit), (1, 3, 1, 1));
        assert_eq!((p.totals.lines_delivered, p.totals.bytes_delivered), (15, 1500));
        assert_eq!((p.cores, p.cores_answered), (2, 2));
        assert_eq!(p.upstream.mode, "unknown");
        let past = ConnectionsPage::build(&snaps(), None, ctx(), &ConnQuery { offset: 9, ..q });
        assert_eq!((past.num_connections, past.total), (0, 3));
    }

    #[test]
    fn entries_carry_what_the_sample_says() {
        let mut c = sample("2.7", "synchrotron1", 4096, 77, 61_000);
        c.peer = "127.0.0.1:4000".to_owned();
        c.generation = Some("1.22");
        c.phase = ConnPhase::Subscribed;
        c.subscribed = StreamId::Events.bit() | StreamId::Typing.bit();
        c.connected_wall_ms = 0;
        c.backlogged_ms = Some(1500);
        c.closing = Some(CloseReason::SlowConsumer);
        let up = UpstreamSnapshot {
            mode: "upstream",
            down_since_ms: Some(20_000),
            generation: Some("1.22"),
            ..UpstreamSnapshot::default()
        };
        let snap = CoreSnapshot { core: 3, conns: vec![c], ..CoreSnapshot::default() };
        let p = ConnectionsPage::build(&[snap], Some(&up), ctx(), &ConnQuery::default());
        let e = &p.connections[0];
        assert_eq!((e.core, e.cid.as_str(), e.peer.as_str()), (3, "2.7", "127.0.0.1:4000"));
        assert_eq!((e.transport.as_str(), e.generation.as_deref()), ("tcp", Some("1.22")));
        assert_eq!(e.connected_since, "1970-01-01T00:00:00.000Z");
        assert_eq!(e.uptime, "1m1s");
        assert_eq!(e.streams, ["events", "typing"]);
        assert_eq!((e.state.as_str(), e.close_reason.as_deref()), ("subscribed", Some("SlowConsumer")));
        assert_eq!((e.backlog_bytes, e.backlogged_ms), (4096, Some(1500)));
        assert_eq!(p.upstream.down_for_ms, Some(30_000));
        // The JSON reads back into the same page (what `replhub top` does).
        let back: ConnectionsPage = serde_json::from_str(&p.to_json()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn formats_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_526_245_678), "2026-12-06T03:04:05.678Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(human_duration(420), "0.4s");
        assert_eq!(human_duration(9_900), "9.9s");
        assert_eq!(human_duration(45_000), "45s");
        assert_eq!(human_duration(185_000), "3m5s");
        assert_eq!(human_duration(7_207_000), "2h0m7s");
        assert_eq!(human_duration(273_900_000), "3d4h5m");
    }
}
