//! The per-core fan-out hub (sans-IO): the log, cursors, subscriptions, private lines, the
//! slow-consumer policy and USER_SYNC merging. One `Hub` per core; no locks, no clock reads.
//!
//! Driving it (str0m style: after every input, drain the outputs):
//! - inputs: [`Hub::accept`], [`Hub::on_bytes`], [`Hub::on_peer_closed`], [`Hub::on_batch`],
//!   [`Hub::on_upstream`], [`Hub::handle_timeout`], [`Hub::shutdown`];
//! - writes: [`Hub::next_dirty`] takes the loop turn's connections with output and no write
//!   in flight, in their order;
//!   [`Hub::gather`] fills an iovec list for one of them; [`Hub::on_written`] reports progress;
//! - outputs: [`Hub::poll_output`] (closes, commands for the upstream), [`Hub::poll_timeout`].
//!
//! Memory rule for drivers: the bytes behind the slices returned by `gather` stay valid and
//! unchanged until the next `on_written` or `on_peer_closed` for that connection.
//!
//! Layout: this file holds the public types and the [`Hub`] itself (its fields, lookups and
//! read accessors); `impl Hub` continues along its seams in `inputs.rs` (accepting workers,
//! their commands), `subscribe.rs` (REPLICATE, POSITION, upstream (re)connects), `fanout.rs`
//! (batches and waking subscribers), `writes.rs` (the dirty list and the glue to each
//! connection's `Outbox`), `close.rs` (fail, detach, peer gone, shutdown), `timers.rs` (ticks
//! and the slow-consumer sweep) and `stats.rs` (counters and the scrape snapshot). Per
//! connection: `conn.rs` (`Conn`, `CloseState`, `Subscriptions`), `outbox.rs` (`Outbox`:
//! cursor, private lines, `WriteState`) and `flight.rs` (the write in flight and its
//! accounting). The slow-consumer rule is the pure function in `slow_consumer.rs`.

pub(crate) mod log;
pub(crate) mod slots;
pub mod stats;
pub(crate) mod user_sync;

mod close;
mod conn;
mod evict_log;
mod fanout;
mod flight;
mod history;
mod inputs;
mod outbox;
mod released;
mod resp;
mod slow_consumer;
mod subscribe;
mod timers;
mod writes;

#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod catch_up_tests;
#[doc(hidden)]
pub mod sim;
#[cfg(test)]
mod tests;

pub use self::log::{Batch, LineMeta};
pub(crate) use self::log::{Log, BROADCAST};
pub(crate) use self::slots::{SlotMap, Slots};
pub(crate) use self::user_sync::{Transition, UserSyncMerger};

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use self::conn::Conn;
use self::stats::CoreStats;
use crate::proto::{StreamId, StreamMask, SyncState};
use crate::session::SessionConfig;

/// A connection handle: slot index plus a generation, so a stale id never hits a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// Slot index.
    pub index: u32,
    /// Generation of the slot.
    pub gen: u32,
}

impl std::fmt::Display for ConnId {
    /// `index.generation`, as in the logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.index, self.gen)
    }
}

/// Hub settings, validated by the config layer.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Evict a connection whose backlog exceeds this many bytes (ARCHITECTURE.md invariant 4).
    pub max_pending_bytes: u64,
    /// Evict a backlogged connection with no write progress for this long.
    pub write_timeout_ms: u64,
    /// Ping/timeout/linger constants.
    pub session: SessionConfig,
    /// At most this many iovecs per gathered write.
    pub max_iov: usize,
    /// At most this many bytes per gathered write.
    pub max_write_bytes: usize,
    /// A fixed server name (`--server-name`); otherwise learned from the upstream.
    pub server_name: Option<String>,
    /// The upstream's protocol generation (`--protocol`): learnt, or pinned.
    pub protocol: crate::proto::ProtocolChoice,
    /// The upstream's Synapse release, when known (`--synapse-version`): the worker commands
    /// it lacks are answered as it would, never forwarded. In synthetic mode, the release the
    /// built-in master writes as.
    pub release: Option<crate::proto::SynapseRelease>,
    /// Bytes of recent batches kept to catch 1.10–1.12 workers up from their token
    /// (`--history-bytes`; `hub/history.rs`).
    pub history_bytes: u64,
    /// Whether rows older than the history may be fetched from a 1.10–1.12 master over a
    /// separate connection ([`UpstreamCmd::Fetch`]); otherwise such a worker gets `has fallen
    /// behind`. Set when the source is an upstream.
    pub fetch_catch_up: bool,
    /// At most this many distinct users one connection may hold syncing (USER_SYNC start
    /// without end); one more is `ERROR` and a close.
    pub max_user_syncs: usize,
    /// The upstream is a shared Redis (`--upstream-redis`), whose writers answer a published
    /// `REPLICATE` with their own POSITIONs: a worker's REPLICATE subscribes it to every stream
    /// and asks for them ([`UpstreamCmd::RedisReplicate`]) instead of being answered with the
    /// hub's; the writers' POSITIONs reach every worker as relayed (`subscribe.rs`).
    pub redis_bridge: bool,
}

/// Default `max_user_syncs`: far above what one Synapse sync worker has syncing at once, and
/// about 20 MB of merge state for a worker that reaches it.
pub(crate) const DEFAULT_MAX_USER_SYNCS: usize = 100_000;

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            max_pending_bytes: 64 << 20,
            write_timeout_ms: 10_000,
            session: SessionConfig::default(),
            max_iov: 256,
            max_write_bytes: 1 << 20,
            server_name: None,
            protocol: crate::proto::ProtocolChoice::Auto,
            release: None,
            history_bytes: history::DEFAULT_HISTORY_BYTES,
            fetch_catch_up: false,
            max_user_syncs: DEFAULT_MAX_USER_SYNCS,
            redis_bridge: false,
        }
    }
}

/// What the upstream link tells every core, through the same ordered mailbox as the batches.
// Rare (once per upstream connection), so the size of `Connected` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamEvent {
    /// Handshake with the upstream complete: its server name and the token of each stream it
    /// serves (`None` = not served). Every subscriber gets a fresh `POSITION` per stream.
    Connected {
        /// The master's server name.
        server_name: String,
        /// Current token per stream, map order.
        positions: [Option<i64>; StreamId::COUNT],
        /// The master's protocol generation (PROTOCOL.md §8): the form of the POSITIONs the
        /// hub writes to workers.
        generation: crate::proto::Generation,
        /// The master's instance name (`master`), for instance-named POSITIONs (1.13+).
        instance: String,
    },
    /// The upstream link dropped; workers stay connected and wait.
    Disconnected,
}

/// A command for the upstream, produced by a core after validating and merging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamCmd {
    /// The first (`Start`) or last (`End`) worker on this core syncing `user_id`.
    UserSync {
        /// User id.
        user_id: String,
        /// Start or end.
        state: SyncState,
        /// The worker's last sync time.
        last_sync_ms: i64,
    },
    /// A validated worker line to forward verbatim (with `\n`): FEDERATION_ACK, USER_IP,
    /// INVALIDATE_CACHE, REMOVE_PUSHER, REMOTE_SERVER_UP.
    Forward(Bytes),
    /// Fetch `stream`'s rows after `from` from a 1.10–1.12 master over a connection of its
    /// own, for a worker whose token is older than the history; the answer comes back to this
    /// core as [`Hub::on_fetched`] with the same `id`.
    Fetch {
        /// The core's request id.
        id: u64,
        /// Which stream.
        stream: StreamId,
        /// The worker's token.
        from: i64,
    },
    /// Redis-mode messages published on this core, framed once: for every core's log (the
    /// source thread hands the batch to every core, this one included).
    Publish(Published),
    /// `PUBLISH` commands (RESP, ready to write) for the real Redis behind `--upstream-redis`.
    RedisPublish(Bytes),
    /// A worker sent REPLICATE behind `--upstream-redis`: publish `REPLICATE ` there (paced,
    /// one for many workers), so that every writer publishes its POSITIONs, which reach the
    /// workers as relayed lines.
    RedisReplicate,
}

/// What a 1.10–1.12 master sent on a catch-up connection: its rows after the token asked for,
/// each line with its own token (with `\n`), and the token of its POSITION.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// `(token, RDATA line)`, in the master's order.
    pub rows: Vec<(i64, Bytes)>,
    /// The master's current token when it answered.
    pub position: i64,
}

/// A batch of Redis-mode messages on its way to every core (equal when it is the same batch).
#[derive(Clone, Debug)]
pub struct Published(pub Arc<Batch>);

impl PartialEq for Published {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Published {}

/// How to close a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseHow {
    /// Everything queued was written: shut down the write side, read until EOF, close.
    Graceful,
    /// Drop at once (RST), e.g. the close linger expired.
    Abort,
}

/// Outputs for the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HubOutput {
    /// Close this connection's socket; call [`Hub::on_peer_closed`] once it is gone.
    Close {
        /// Which.
        conn: ConnId,
        /// How.
        how: CloseHow,
    },
    /// Send this to the upstream link.
    Upstream(UpstreamCmd),
}

/// At most this many commands may wait unwritten for one connection (PROTOCOL.md §3.3: the
/// reference closes a connection whose paused transport has 10000 commands pending, on the
/// 10001st). replhub counts the connection's own private lines (POSITION, PING, SERVER, ERROR):
/// the log lines it has yet to receive are shared with every other connection and bounded in
/// bytes by `max_pending_bytes` instead.
pub(crate) const MAX_QUEUED_COMMANDS: usize = 10_000;

/// At most this many bytes of private lines may wait unwritten for one connection: the
/// [`MAX_QUEUED_COMMANDS`] rule in bytes (about 100 bytes a line; replhub's private lines are
/// shorter but for a long server name). Private bytes also count against `max_pending_bytes`;
/// this cap lets the batch-time sweep skip the connections while the log itself holds less
/// than `max_pending_bytes - MAX_QUEUED_BYTES`.
pub(crate) const MAX_QUEUED_BYTES: u64 = 1 << 20;

/// Where a 1.10–1.12 `REPLICATE <stream> <token|NOW>` starts.
#[derive(Clone, Debug, PartialEq, Eq)]
enum CatchUpFrom {
    /// Rows after this token, then POSITION.
    Token(i64),
    /// No rows: POSITION at the current token.
    Now,
    /// Rows after the token: those the master sent on a catch-up connection, then the
    /// history's.
    Fetched(i64, std::sync::Arc<Fetched>),
}

/// The per-core hub. See the `hub` module docs.
pub struct Hub {
    config: HubConfig,
    log: Log,
    /// Boxed so that the slot table stays small (its growth by doubling would otherwise cost
    /// more than the connections themselves).
    conns: Slots<Box<Conn>>,
    /// Connections whose outbox is `Dirty`, by rank, in the order they became so.
    dirty: writes::DirtyQueues,
    outputs: VecDeque<HubOutput>,
    server_name: Option<String>,
    /// Token of the last complete upstream batch per stream (what `POSITION` says).
    tokens: [Option<i64>; StreamId::COUNT],
    /// A `batch` run of the stream is open at the head of the log.
    open_run: [bool; StreamId::COUNT],
    /// Streams the upstream serves, once known.
    served: Option<StreamMask>,
    upstream_up: bool,
    /// The upstream's protocol generation (pinned, or from its handshake): the form of the
    /// POSITIONs written to workers (PROTOCOL.md §8).
    generation: Option<crate::proto::Generation>,
    /// The upstream's instance name, for instance-named POSITIONs.
    instance: String,
    /// Connections subscribed to each stream (to wake them when its lines arrive).
    stream_subs: [Vec<ConnId>; StreamId::COUNT],
    /// Connections whose REPLICATE for the stream waits for a batch boundary or for tokens.
    pending_subs: [Vec<ConnId>; StreamId::COUNT],
    /// Recent batches, for 1.10–1.12 workers' catch-up from a token.
    history: history::History,
    /// 1.10–1.12 subscriptions not granted yet: the token each catches up from.
    catch_ups: Vec<(ConnId, StreamId, CatchUpFrom)>,
    /// Catch-ups waiting for rows fetched from the master: (request id, connection, stream,
    /// token).
    fetches: Vec<(u64, ConnId, StreamId, i64)>,
    next_fetch: u64,
    user_sync: UserSyncMerger<ConnId>,
    stats: CoreStats,
    next_tick_ms: u64,
    shutting_down: bool,
    /// When the last WARN about a worker command withheld from the upstream was logged
    /// (monotonic ms): at most one a minute.
    withheld_warned_ms: Option<u64>,
    /// The first few evictions of a burst are logged in full, the rest counted.
    evict_log: evict_log::EvictLogLimit,
    /// By slot index, the generation plus one of a connection found waiting on its socket
    /// (a write in flight or blocked) when a batch woke it, until its socket reports progress
    /// or room ([`Hub::on_written`], [`Hub::on_writable`]); 0 for none. A wake is a no-op in
    /// that state, so a batch skips these without touching their connection: a crowd of
    /// workers whose sockets are full costs a batch one read of this array each.
    parked: Vec<u32>,
    /// Redis mode on this core (`--resp-listen`), see `resp.rs`.
    resp: Option<Box<resp::CoreResp>>,
}

impl Hub {
    /// A hub with no connections and an empty log.
    pub fn new(config: HubConfig) -> Self {
        let server_name = config.server_name.clone();
        let generation = config.protocol.pinned();
        let history = history::History::new(config.history_bytes);
        Self {
            config,
            log: Log::new(),
            conns: Slots::new(),
            dirty: Default::default(),
            outputs: VecDeque::new(),
            server_name,
            tokens: [None; StreamId::COUNT],
            open_run: [false; StreamId::COUNT],
            served: None,
            upstream_up: false,
            generation,
            instance: "master".to_owned(),
            stream_subs: Default::default(),
            pending_subs: Default::default(),
            history,
            catch_ups: Vec::new(),
            fetches: Vec::new(),
            next_fetch: 0,
            user_sync: UserSyncMerger::new(),
            stats: CoreStats::default(),
            next_tick_ms: 0,
            shutting_down: false,
            withheld_warned_ms: None,
            evict_log: evict_log::EvictLogLimit::default(),
            parked: Vec::new(),
            resp: None,
        }
    }

    fn conn(&self, id: ConnId) -> Option<&Conn> {
        self.conns.get(id).map(|c| &**c)
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(id).map(|c| &mut **c)
    }

    /// Number of live connections.
    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether there are no connections.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Whether `conn` is live.
    #[cfg(test)]
    pub(crate) fn contains(&self, conn: ConnId) -> bool {
        self.conn(conn).is_some()
    }

    /// The log (for tests and metrics).
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// This core's counters.
    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }

    /// Bytes a connection holds back (its backlog): the log from its cursor on, while it
    /// follows the log, plus its unwritten private lines. What `max_pending_bytes` bounds.
    pub(crate) fn backlog_bytes(&self, conn: ConnId) -> Option<u64> {
        Some(self.conn(conn)?.outbox.backlog_bytes(&self.log))
    }

    /// Unwritten bytes and count of a connection's private lines (POSITION, PING, ERROR...).
    #[cfg(test)]
    pub(crate) fn private_queue(&self, conn: ConnId) -> Option<(u64, usize)> {
        let c = self.conn(conn)?;
        Some((c.outbox.private_bytes(), c.outbox.private_lines()))
    }

    /// The next output for the driver. Once the queue is empty, the Redis-mode messages
    /// published on this core since the last call come as one `UpstreamCmd::Publish` batch
    /// (so a driver that polls its outputs once or twice a loop turn cuts one batch a turn).
    pub fn poll_output(&mut self) -> Option<HubOutput> {
        self.outputs.pop_front().or_else(|| self.take_published())
    }
}
