//! The hub's words for what happens to connections (close and eviction reasons, life stages,
//! per-connection command counters) and the plain data a core hands to the scraper: no atomics,
//! no locks, no prometheus types.
//!
//! Each core owns one [`CoreStats`] and bumps its fields with ordinary additions on the hot
//! path; at scrape time [`Hub::snapshot`] copies it into a [`CoreSnapshot`] together with one
//! [`ConnSample`] per live connection (kernel queues read by the driver on that core). The
//! metrics layer only reads these.

use super::{ConnId, Hub};
use crate::proto::{CommandWord, StreamId};

/// Number of command words tracked per connection.
pub const WORDS: usize = CommandWord::ALL.len();

/// Why a connection ended (the `reason_type` label of `..._close_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CloseReason {
    /// The peer closed cleanly (EOF), or we closed after our ERROR.
    ConnectionDone = 0,
    /// A socket error.
    ConnectionLost,
    /// Aborted by us (close linger expired, shutdown).
    ConnectionAborted,
    /// Protocol violation by the peer (we sent ERROR).
    ProtocolError,
    /// Evicted as a slow consumer.
    SlowConsumer,
    /// Ping timeout.
    PingTimeout,
}

impl CloseReason {
    /// Every reason, in label order.
    pub const ALL: [Self; 6] = [
        Self::ConnectionDone,
        Self::ConnectionLost,
        Self::ConnectionAborted,
        Self::ProtocolError,
        Self::SlowConsumer,
        Self::PingTimeout,
    ];

    /// The label value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::ConnectionDone => "ConnectionDone",
            Self::ConnectionLost => "ConnectionLost",
            Self::ConnectionAborted => "ConnectionAborted",
            Self::ProtocolError => "ProtocolError",
            Self::SlowConsumer => "SlowConsumer",
            Self::PingTimeout => "PingTimeout",
        }
    }
}

/// Why a slow consumer was evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EvictReason {
    /// Backlog over `max_pending_bytes`.
    Backlog = 0,
    /// No write progress for `write_timeout` while backlogged.
    WriteTimeout,
}

impl EvictReason {
    /// Every reason.
    pub const ALL: [Self; 2] = [Self::Backlog, Self::WriteTimeout];

    /// The label value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Backlog => "backlog",
            Self::WriteTimeout => "write_timeout",
        }
    }
}

/// A connection's life stage, for the `connections by state` gauge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnPhase {
    /// Accepted, waiting for the upstream's server name before greeting.
    #[default]
    Waiting = 0,
    /// Greeted; no stream subscribed yet.
    Connected,
    /// Subscribed to at least one stream.
    Subscribed,
    /// Closing (ERROR sent or close requested), not yet gone.
    Closing,
}

impl ConnPhase {
    /// Every phase.
    pub const ALL: [Self; 4] = [Self::Waiting, Self::Connected, Self::Subscribed, Self::Closing];

    /// The label value.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Connected => "connected",
            Self::Subscribed => "subscribed",
            Self::Closing => "closing",
        }
    }
}

/// Per-core counters (monotonic unless noted). Plain integers: only the owning core writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Log lines (RDATA, relayed REMOTE_SERVER_UP) written to workers.
    pub lines_delivered: u64,
    /// Bytes written to workers (log lines and private lines).
    pub bytes_delivered: u64,
    /// Gathered writes issued.
    pub writes: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Closed connections by [`CloseReason`] (index = discriminant).
    pub close_reasons: [u64; CloseReason::ALL.len()],
    /// Slow-consumer evictions by [`EvictReason`].
    pub evictions: [u64; EvictReason::ALL.len()],
    /// `USER_SYNC` received from workers.
    pub user_sync: u64,
    /// `FEDERATION_ACK` received.
    pub federation_ack: u64,
    /// `REMOVE_PUSHER` received.
    pub remove_pusher: u64,
    /// `INVALIDATE_CACHE` received.
    pub invalidate_cache: u64,
    /// `USER_IP` received.
    pub user_ip: u64,
    /// Upstream batches appended to this core's log.
    pub batches: u64,
    /// Bytes currently held by this core's log (gauge).
    pub log_bytes: u64,
}

/// One live connection at scrape time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnSample {
    /// The worker's NAME, or `anon` before NAME.
    pub name: String,
    /// Life stage.
    pub phase: ConnPhase,
    /// Subscribed streams (bit i = `StreamId::ALL[i]`).
    pub subscribed: u32,
    /// Lines waiting for this connection (log lines behind its cursor plus private lines).
    pub pending_commands: u64,
    /// Bytes of log the connection holds back (its backlog).
    pub backlog_bytes: u64,
    /// `SIOCOUTQ`: bytes in the kernel send queue not yet acknowledged.
    pub kernel_send_queue: u64,
    /// `SIOCINQ`: bytes received by the kernel not yet read.
    pub kernel_read_queue: u64,
    /// Inbound commands past the direction check, by [`CommandWord`] discriminant.
    pub inbound: [u64; WORDS],
    /// Outbound private commands written, by [`CommandWord`] discriminant (RDATA counted per line).
    pub outbound: [u64; WORDS],
}

impl ConnSample {
    /// Whether the connection subscribes to `s`.
    pub const fn subscribes(&self, s: StreamId) -> bool {
        self.subscribed & s.bit() != 0
    }
}

/// What one core reports at scrape time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreSnapshot {
    /// Core index.
    pub core: usize,
    /// Its counters.
    pub stats: CoreStats,
    /// Its live connections.
    pub conns: Vec<ConnSample>,
    /// Redis mode: what this core's RESP clients published.
    pub resp: RespStats,
}

/// Redis mode: what a core's RESP clients published (each message is counted once, on the
/// publisher's core).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RespStats {
    /// Messages published (to at least one subscriber).
    pub published: u64,
    /// Replication `RDATA` messages by (stream, writer instance), read from the payload's
    /// first words.
    pub rdata: Vec<(String, String, u64)>,
}

impl Hub {
    /// A metrics snapshot. `kernel_queues` maps a connection to its (SIOCOUTQ, SIOCINQ) values,
    /// read by the driver on this core.
    pub fn snapshot(&self, core: usize, mut kernel_queues: impl FnMut(ConnId) -> (u64, u64)) -> CoreSnapshot {
        let mut stats = self.stats.clone();
        stats.log_bytes = self.log.held_bytes();
        let conns = self
            .conns
            .iter()
            .map(|(id, c)| {
                let (outq, inq) = kernel_queues(id);
                ConnSample {
                    name: c.display_name().to_owned(),
                    phase: c.phase,
                    subscribed: c.subs.mask.0,
                    pending_commands: c.outbox.pending_lines(&self.log),
                    backlog_bytes: c.outbox.backlog_bytes(&self.log),
                    kernel_send_queue: outq,
                    kernel_read_queue: inq,
                    inbound: c.inbound,
                    outbound: *c.outbox.outbound(),
                }
            })
            .collect();
        CoreSnapshot { core, stats, conns, resp: self.resp_stats() }
    }
}
