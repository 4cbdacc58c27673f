//! Plain data the upstream link hands to the scraper: no atomics, no locks, no prometheus types.
//!
//! The cores' own counters and samples ([`CoreStats`](crate::hub::stats::CoreStats),
//! [`CoreSnapshot`](crate::hub::stats::CoreSnapshot)) belong to the hub, which produces them.

use crate::proto::StreamId;

/// The upstream (or synthetic source) at scrape time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamSnapshot {
    /// `"upstream"`, `"synthetic"` or `"redis"` (`--upstream-redis`).
    pub mode: &'static str,
    /// Whether the upstream link is up (always true for synthetic).
    pub connected: bool,
    /// While the upstream link is down, since when (monotonic ms of the server's clock: when
    /// the last connection that completed its handshake went away, or the start); `None` while
    /// up, and always in synthetic mode.
    pub down_since_ms: Option<u64>,
    /// Reconnects so far.
    pub reconnects: u64,
    /// Attempts to connect that failed (connect, TLS handshake, AUTH), so far.
    pub connect_failures: u64,
    /// The upstream's protocol generation label (`seed`, `1.13`, `1.22`), once known.
    pub generation: Option<&'static str>,
    /// Current token per stream (None until known).
    pub tokens: [Option<i64>; StreamId::COUNT],
    /// Rows received (or generated) per stream: `..._resource_stream_updates`.
    pub stream_updates: [u64; StreamId::COUNT],
    /// RDATA lines received from the upstream per stream: `..._protocol_inbound_rdata_count`.
    pub inbound_rdata: [u64; StreamId::COUNT],
    /// Users currently reported syncing to the upstream.
    pub syncing_users: u64,
    /// Commands forwarded to the upstream.
    pub forwarded: u64,
    /// RDATA lines from the upstream not relayed: an unknown stream, or malformed.
    pub rdata_dropped: u64,
    /// Worker commands dropped because the queue for a disconnected upstream was full.
    pub forwards_dropped: u64,
}
