//! The client-role connection to the master, sans-IO (PROTOCOL.md §3.1, ARCHITECTURE.md
//! invariants 3 and 6).
//!
//! A driver owns the socket and the clock and feeds the link:
//!
//! ```text
//!   connected     ─► on_connected(now)            (queues NAME, PING, REPLICATE ALL, USER_SYNC…)
//!   readable      ─► read_buffer() ← recv, then on_read(now)
//!   wrote a line  ─► on_sent(now)
//!   timer         ─► handle_timeout(now)          (keep-alive PING, ping timeout, linger)
//!   socket gone   ─► on_disconnected(reason, now)
//!   a core's cmd  ─► on_command(core, cmd, now)
//! ```
//!
//! and after every input drains `poll_event` (to the cores, in order), `poll_transmit` (to the
//! socket), `wants_close` and `poll_timeout`.
//!
//! The protocol side is a client-role [`Session`]: it splits the received bytes, runs the
//! direction check, the PING schedule, the ping timeout and the close linger. Reads go into the
//! session's buffer; each read's complete lines come back as one chunk
//! ([`Session::poll_chunk`]) and become one [`Batch`] sharing that buffer (no copy, no JSON
//! parsing). What stays here is upstream-specific: the handshake, batches, the USER_SYNC merge
//! across cores, and re-announcing it all after a reconnect.
//!
//! Handshake: the link reports [`LinkEvent::Up`] with the master's server name and the
//! POSITION of every stream once the POSITION for `user_signature` (the last stream in map
//! order) arrived, or at the first RDATA after SERVER (then streams without a POSITION are not
//! served). RDATA received before that are held and delivered right after `Up`, in order.
//!
//! Generation (PROTOCOL.md §8): the greeting `REPLICATE ALL` is accepted by the seed and by
//! every master from Synapse 1.13 on, which ignore its argument. A 1.10–1.12 master greets
//! exactly as the seed does (`SERVER`, `PING`), so nothing it sends unasked tells them apart;
//! it rejects `REPLICATE ALL` (`ERROR failed to parse line for  'REPLICATE': ValueError('not
//! enough values to unpack (expected 2, got 1)') ('ALL'):`, its `REPLICATE` needs a token),
//! and the seed rejects the 1.10 form (`unknown stream 'ALL NOW'`): one of the two is
//! refused once. The seed is unreleased, so `REPLICATE ALL` is tried first; that ERROR marks
//! the master as 1.10 ([`Greeting`]) and the next connection greets as a 1.12 worker does:
//! `REPLICATE ALL NOW` on the first connection (or after a gap), and after a 1.10 connection
//! that was up, `REPLICATE <stream> <token>` for each stream it served with the last token
//! replhub relayed, so the master's catch-up rows (each with its own token, then POSITION)
//! continue the relay with nothing lost or repeated. Each connection still learns the
//! generation from what the master sends back (a master upgraded to 1.13+ accepts either
//! form and answers with its POSITIONs); `--protocol 1.10` starts with the 1.10 greeting.
//! What the master sends back
//! tells its generation ([`LinkConfig::protocol`] `Auto`, re-learnt on every connection): the
//! field count of its POSITIONs (seed 2, 1.13 3, 1.22 4), or, before any POSITION, whether its
//! RDATA carry an instance name. RDATA are then indexed in that layout. A master of 1.13 or
//! later sends RDATA to a connection before it answers REPLICATE, so with instance-named RDATA
//! the handshake waits for the POSITION of `user_signature` instead of the first RDATA, and
//! the RDATA before it are not relayed: the POSITIONs cover them.
//!
//! `batch` runs: only complete runs are relayed (ARCHITECTURE.md §3 item 4). A read that ends
//! inside a run becomes a batch that ends before the run; the run's lines (and any line after
//! them) are held in the connection's carry, and relayed with the read that completes the run,
//! joined to the lines up to its numbered RDATA in one batch (the one copy: only runs that span
//! reads are copied). If the upstream goes first, the carry goes with the connection, so no
//! worker ever sees a run that a worker connected to the master would have dropped with its
//! connection.
//!
//! Keep-alive: the session sends PING every 5 s of write silence; any received line, relayed
//! or not, counts as received, and once the master has PINGed, 25 s of silence end the link
//! with `ERROR ping timeout`.
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::batch::{index_chunk_as, Indexed};
use super::runs;
use crate::hub::{Batch, CloseHow, Transition, UpstreamCmd, UpstreamEvent, UserSyncMerger};
use crate::metrics::snapshot::UpstreamSnapshot;
use crate::proto::generation::{parse_any_position, parse_instance_user_sync, RdataForm};
use crate::proto::inbound::parse_args;
use crate::proto::{
    Command, CommandWord, Generation, Line, PeerError, ProtocolChoice, Role, StreamId, StreamMask, SyncState,
    UserSync,
};
use crate::session::{Session, SessionConfig, TimerAction};
use crate::time::Now;

/// At most this many bytes of an open `batch` run are held (the hub's default
/// `max_pending_bytes`). A master that keeps a run open past it is dropped like a connection
/// that failed: the run is discarded and the link reconnects, so the carry stays bounded.
pub(crate) const MAX_HELD_RUN_BYTES: usize = 64 << 20;

/// How long a 1.13+ master keeps the presence syncs of a worker instance it has not heard
/// from (Synapse's `EXTERNAL_PROCESS_EXPIRY`); older ones are not re-announced.
pub(crate) const INSTANCE_SYNC_EXPIRY_MS: u64 = 5 * 60 * 1000;

/// The users one worker instance (Synapse 1.13+) reported syncing, as the master keeps them.
#[derive(Clone, Debug, Default)]
struct InstanceSyncs {
    /// Monotonic ms of the instance's last USER_SYNC.
    last_update_ms: u64,
    /// Syncing users and the `last_sync_ms` each was announced with.
    users: std::collections::BTreeMap<String, i64>,
}

/// Settings of the upstream link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LinkConfig {
    /// The `NAME` replhub announces.
    pub client_name: String,
    /// If set, a master announcing another `SERVER` name gets `ERROR Wrong remote` and the
    /// link closes.
    pub expected_server_name: Option<String>,
    /// Ping/timeout/linger constants and the line limit.
    pub session: SessionConfig,
    /// Commands forwarded while disconnected are queued up to this many; beyond it the oldest
    /// is dropped (logged and counted).
    pub max_forward_queue: usize,
    /// The master's protocol generation: learnt per connection, or pinned.
    pub protocol: ProtocolChoice,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            client_name: "replhub".to_owned(),
            expected_server_name: None,
            session: SessionConfig::default(),
            max_forward_queue: 10_000,
            protocol: ProtocolChoice::Auto,
        }
    }
}

/// What the link reports to the driver, in order.
// `Up` is large (16 positions) but there is one per connection; boxing it would only cost an
// allocation and an API wrinkle.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub(crate) enum LinkEvent {
    /// Handshake complete ([`UpstreamEvent::Connected`]); always before the connection's first
    /// batch. The driver resets its reconnect backoff and tells every core.
    Up(UpstreamEvent),
    /// Relayable lines from one read, for every core.
    Batch(Arc<Batch>),
    /// The connection is gone (once per connection); tell every core
    /// [`UpstreamEvent::Disconnected`] and reconnect with backoff.
    Down {
        /// Why, for logs.
        reason: String,
    },
}

/// Counters for [`UpstreamLink::snapshot`].
#[derive(Clone, Debug, Default)]
struct Stats {
    connects: u64,
    stream_updates: [u64; StreamId::COUNT],
    inbound_rdata: [u64; StreamId::COUNT],
    forwarded: u64,
    forward_dropped: u64,
    malformed_rdata: u64,
    unknown_stream_rdata: u64,
    /// When the last connection whose handshake completed went away (monotonic ms; 0, the
    /// start, until one did): how long the link has been down, for `/healthz`.
    down_since_ms: u64,
}

/// Which `REPLICATE` lines a connection greeted the master with (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Greeting {
    /// `REPLICATE ALL`: the seed and 1.13+.
    All,
    /// `REPLICATE ALL NOW`: a 1.10–1.12 master, from its current tokens.
    Now,
    /// `REPLICATE <stream> <token>` for these streams: a 1.10–1.12 master, resuming from the
    /// tokens replhub relayed last.
    Resume(StreamMask),
}

/// The start of the ERROR a 1.10–1.12 master answers `REPLICATE ALL` with.
const REJECTS_REPLICATE_ALL: &str =
    "failed to parse line for  'REPLICATE': ValueError('not enough values to unpack (expected 2, got 1)')";

/// The start of the ERROR a master sends when it cannot handle a `REPLICATE`: an unknown
/// stream (a seed master given the 1.10 form, or a stream no longer served) or, on 1.10–1.12,
/// a stream that has fallen behind.
const REPLICATE_FAILED: &str = "failed to handle replicate: ";

/// Per-connection state, dropped on disconnect.
struct Conn {
    session: Session,
    server_name: Option<String>,
    positions: [Option<i64>; StreamId::COUNT],
    up: bool,
    /// Batches received before the handshake completed.
    pending: Vec<Arc<Batch>>,
    abort: bool,
    /// The last `ERROR` the master sent.
    peer_error: Option<String>,
    /// The master's generation, once known (or pinned).
    generation: Option<Generation>,
    /// Whether RDATA carried an instance name before any POSITION told the generation.
    instance_rdata: bool,
    /// The master's instance name, from its first instance-named POSITION.
    instance: Option<String>,
    /// Received lines held back from the first line of a `batch` run still open (see the
    /// module docs), and the streams whose run is open at their end.
    carry: BytesMut,
    carry_open: StreamMask,
    /// What this connection sent as its `REPLICATE` lines.
    greeting: Greeting,
    /// Streams with a POSITION on this connection (for a [`Greeting::Resume`] handshake).
    positioned: StreamMask,
}

/// The client-role link to the master. See the module docs for how a driver runs it.
pub(crate) struct UpstreamLink {
    config: LinkConfig,
    conn: Option<Conn>,
    /// Where a driver's read goes while there is no connection; dropped by [`Self::on_read`].
    unconnected_buf: BytesMut,
    events: VecDeque<LinkEvent>,
    user_sync: UserSyncMerger<usize>,
    /// 1.13+ presence syncs by worker instance id (forwarded as received), re-announced
    /// after a reconnect.
    instance_syncs: std::collections::BTreeMap<String, InstanceSyncs>,
    forward_queue: VecDeque<Bytes>,
    tokens: [Option<i64>; StreamId::COUNT],
    stats: Stats,
    /// What the last connections showed of the master's generation, for the next greeting:
    /// only `V1_10` changes it.
    hint: Option<Generation>,
    /// After a 1.10 connection that was up: the streams it served, to resume from `tokens`.
    resume: Option<StreamMask>,
}

impl UpstreamLink {
    /// A disconnected link.
    pub(crate) fn new(config: LinkConfig) -> Self {
        let hint = config.protocol.pinned();
        Self {
            config,
            conn: None,
            unconnected_buf: BytesMut::new(),
            events: VecDeque::new(),
            user_sync: UserSyncMerger::new(),
            instance_syncs: std::collections::BTreeMap::new(),
            forward_queue: VecDeque::new(),
            tokens: [None; StreamId::COUNT],
            stats: Stats::default(),
            hint,
            resume: None,
        }
    }

    /// Whether a TCP connection is in use (handshake done or not).
    #[cfg(test)]
    pub(crate) fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Whether the handshake of the current connection completed.
    pub(crate) fn is_up(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.up)
    }

    /// The master's server name on the current connection, once it sent `SERVER`.
    #[cfg(test)]
    pub(crate) fn server_name(&self) -> Option<&str> {
        self.conn.as_ref().and_then(|c| c.server_name.as_deref())
    }

    /// The current connection's generation, once known (pinned or learnt).
    pub(crate) fn generation(&self) -> Option<Generation> {
        self.conn.as_ref().and_then(|c| c.generation)
    }

    /// The latest token seen per stream (POSITION at the handshake, then each RDATA).
    #[cfg(test)]
    pub(crate) fn tokens(&self) -> [Option<i64>; StreamId::COUNT] {
        self.tokens
    }

    /// A fresh TCP connection to the master at `now`: queues `NAME`, `PING`, the `REPLICATE`
    /// greeting (`REPLICATE ALL`, or for a 1.10–1.12 master `REPLICATE ALL NOW` or one
    /// `REPLICATE <stream> <token>` per stream, see the module docs), then `USER_SYNC <user>
    /// start <now>` for every user a core reports syncing, then the commands forwarded while
    /// disconnected, then `USER_SYNC <instance_id> <user> start <now>` for every user a 1.13+
    /// worker instance reported syncing (and has not let expire) (PROTOCOL.md §3.1). A
    /// restarted master knows nobody is syncing, and the workers, still connected to replhub,
    /// will not tell it again.
    pub(crate) fn on_connected(&mut self, now: Now) {
        if self.conn.is_some() {
            self.on_disconnected("replaced by a new connection", now);
        }
        let greeting = match (self.hint, self.resume) {
            (Some(Generation::V1_10), Some(served)) if !served.is_empty() => Greeting::Resume(served),
            (Some(Generation::V1_10), _) => Greeting::Now,
            _ => Greeting::All,
        };
        let replicate: Vec<String> = match greeting {
            Greeting::All => vec!["ALL".to_owned()],
            Greeting::Now => vec!["ALL NOW".to_owned()],
            Greeting::Resume(served) => served
                .iter()
                .filter_map(|s| self.tokens[s.index()].map(|t| format!("{} {t}", s.name())))
                .collect(),
        };
        let replicate: Vec<&str> = replicate.iter().map(String::as_str).collect();
        let mut session = Session::new(Role::Client, self.config.session.clone(), now);
        session.start(&self.config.client_name, &replicate, now);
        for user_id in self.user_sync.users() {
            let cmd =
                Command::UserSync(UserSync { user_id, state: SyncState::Start, last_sync_ms: now.wall_ms });
            if session.send(&cmd) {
                self.stats.forwarded += 1;
            }
        }
        for line in self.forward_queue.drain(..) {
            session.send_encoded(line);
            self.stats.forwarded += 1;
        }
        // After the queue: instance-keyed lines queued while down are in the state already,
        // and the master keeps the `last_sync_ms` it heard last, which should be now.
        self.instance_syncs
            .retain(|_, i| now.mono_ms.saturating_sub(i.last_update_ms) <= INSTANCE_SYNC_EXPIRY_MS);
        for (instance_id, syncs) in &self.instance_syncs {
            for user_id in syncs.users.keys() {
                let line = format!("USER_SYNC {instance_id} {user_id} start {}\n", now.wall_ms);
                session.send_encoded(Bytes::from(line));
                self.stats.forwarded += 1;
            }
        }
        self.stats.connects += 1;
        tracing::info!(connects = self.stats.connects, greeting = ?greeting, "upstream connected; handshake started");
        self.conn = Some(Conn {
            session,
            server_name: None,
            positions: [None; StreamId::COUNT],
            up: false,
            pending: Vec::new(),
            abort: false,
            peer_error: None,
            generation: self.config.protocol.pinned(),
            instance_rdata: false,
            instance: None,
            carry: BytesMut::new(),
            carry_open: StreamMask::NONE,
            greeting,
            positioned: StreamMask::NONE,
        });
    }

    /// The connection is gone (EOF, socket error, or closed after [`Self::wants_close`]).
    /// Reports [`LinkEvent::Down`] once per connection and resets the per-connection state;
    /// the users syncing and the forward queue are kept for the next connection.
    pub(crate) fn on_disconnected(&mut self, reason: &str, now: Now) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if conn.up {
            self.stats.down_since_ms = now.mono_ms;
        }
        let mut why = reason.to_owned();
        if let Some(err) = conn.session.error() {
            why = format!("we sent ERROR {err}; {why}");
        } else if let Some(text) = &conn.peer_error {
            why = format!("upstream sent ERROR {text}; {why}");
        }
        if !conn.carry.is_empty() {
            tracing::warn!(
                bytes = conn.carry.len(),
                "upstream closed in the middle of a batch run; the run is not relayed"
            );
        }
        if !conn.pending.is_empty() {
            tracing::warn!(
                batches = conn.pending.len(),
                "upstream closed before its handshake completed; its early RDATA are dropped"
            );
        }
        tracing::warn!(reason = %why, was_up = conn.up, "upstream disconnected");
        self.learn_from_close(&conn);
        self.events.push_back(LinkEvent::Down { reason: why });
    }

    /// What a closed connection tells the next greeting (see the module docs): a master that
    /// refused `REPLICATE ALL` as 1.10–1.12 does is greeted as such; one that refused the
    /// 1.10 form is greeted with `REPLICATE ALL` again (or, if only the resume failed, with
    /// `REPLICATE ALL NOW`: a gap, which the fresh POSITIONs make visible).
    fn learn_from_close(&mut self, conn: &Conn) {
        let error = conn.peer_error.as_deref().unwrap_or("");
        let pinned = self.config.protocol.pinned();
        match conn.greeting {
            Greeting::All if pinned.is_none() && error.starts_with(REJECTS_REPLICATE_ALL) => {
                tracing::info!(
                    "upstream refused REPLICATE ALL as Synapse 1.10–1.12 does: protocol generation 1.10 from the next connection"
                );
                self.hint = Some(Generation::V1_10);
                self.resume = None;
            }
            Greeting::Resume(_) if error.starts_with(REPLICATE_FAILED) => {
                tracing::warn!(
                    error,
                    "upstream could not resume from replhub's tokens; starting again from its current ones"
                );
                self.resume = None;
            }
            Greeting::Now if pinned.is_none() && error.starts_with(REPLICATE_FAILED) => {
                tracing::info!(error, "upstream refused REPLICATE ALL NOW: not a 1.10–1.12 master");
                self.hint = None;
                self.resume = None;
            }
            _ if conn.up => {
                // Re-learnt on every connection: only a 1.10 master is greeted differently,
                // and only after a connection that relayed rows can it be resumed.
                let mut served = StreamMask::NONE;
                for s in StreamId::ALL.into_iter().filter(|s| self.tokens[s.index()].is_some()) {
                    served.insert(s);
                }
                match conn.generation {
                    Some(Generation::V1_10) => {
                        self.hint = Some(Generation::V1_10);
                        self.resume = Some(served);
                    }
                    other => {
                        self.hint = pinned.or(other);
                        self.resume = None;
                    }
                }
            }
            _ => {}
        }
    }

    /// The buffer to read into (reserve, then read into its spare capacity; only append): the
    /// session's receive buffer while connected.
    pub(crate) fn read_buffer(&mut self) -> &mut BytesMut {
        match self.conn.as_mut() {
            Some(conn) => conn.session.read_buffer(),
            None => &mut self.unconnected_buf,
        }
    }

    /// Bytes were appended to [`Self::read_buffer`] at `now`: take the complete lines from the
    /// session, handle control lines, queue batches. Once closing after an ERROR, nothing more
    /// is read.
    pub(crate) fn on_read(&mut self, now: Now) {
        self.unconnected_buf.clear();
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            match conn.session.poll_chunk(now) {
                Some(Ok(chunk)) => self.on_received(chunk, now),
                Some(Err(err)) => tracing::warn!(error = %err, "upstream sent a line over the length limit"),
                None => return,
            }
        }
    }

    /// A chunk of complete lines from the session: completes the run held in the carry, if
    /// any, then handles the rest.
    fn on_received(&mut self, mut chunk: Bytes, now: Now) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if conn.abort {
            return;
        }
        if !conn.carry.is_empty() {
            let lines = index_chunk_as(&chunk, RdataForm::of(conn.generation)).lines;
            let Some(end) = runs::completion(&lines, conn.carry_open) else {
                // Still open: hold this chunk too.
                conn.carry_open = runs::open_after(&lines, conn.carry_open);
                conn.carry.extend_from_slice(&chunk);
                conn.check_carry();
                return;
            };
            let end = end as usize;
            let mut joined = std::mem::take(&mut conn.carry);
            conn.carry_open = StreamMask::NONE;
            joined.extend_from_slice(&chunk[..end]);
            self.on_chunk(&joined.freeze(), now);
            chunk = chunk.slice(end..);
            let closing = self.conn.as_ref().is_none_or(|c| c.session.is_closing());
            if chunk.is_empty() || closing {
                return;
            }
        }
        self.on_chunk(&chunk, now);
    }

    fn on_chunk(&mut self, chunk: &Bytes, now: Now) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let form = RdataForm::of(conn.generation);
        let mut idx: Indexed = index_chunk_as(chunk, form);
        if conn.generation.is_none() && idx.instance_rdata == Some(true) {
            conn.instance_rdata = true;
        }
        if let Some((cut, open)) = runs::open_tail(&idx.lines) {
            // Hold the open run (and whatever follows it) until a later read completes it.
            let cut = cut as usize;
            conn.carry.extend_from_slice(&chunk[cut..]);
            conn.carry_open = open;
            conn.check_carry();
            idx = index_chunk_as(&chunk.slice(..cut), form);
        }
        for (total, n) in self.stats.inbound_rdata.iter_mut().zip(idx.rdata) {
            *total += n;
        }
        self.stats.malformed_rdata += idx.malformed;
        self.stats.unknown_stream_rdata += idx.unknown_stream;

        let mut cut = None;
        let mut prev = 0;
        // Relayable lines before the POSITIONs of a 1.13+ master, which cover them (see
        // `complete_handshake`).
        let mut covered = 0;
        for c in &idx.control {
            if conn.completes_on_rdata() && idx.has_rdata_in(prev..c.after) {
                conn.complete_handshake(&mut self.events, &mut self.tokens, &mut self.stats);
            }
            prev = c.after;
            conn.on_control(&c.line, &self.config, now);
            if conn.session.is_closing() {
                cut = Some(c.after);
                break;
            }
            if !conn.up && conn.server_name.is_some() && conn.positions_complete() {
                conn.complete_handshake(&mut self.events, &mut self.tokens, &mut self.stats);
                if conn.generation.is_some_and(Generation::has_instance) {
                    covered = c.after;
                }
            }
        }
        if covered > 0 {
            idx.lines.drain(..covered);
            tracing::debug!(lines = covered, "RDATA before the POSITIONs: covered by them, not relayed");
        }
        if let Some(n) = cut {
            idx.truncate(n.saturating_sub(covered));
            // Closing: nothing more is read, so a run open before the cut never completes.
            if let Some((start, _)) = runs::open_tail(&idx.lines) {
                let keep = idx.lines.partition_point(|m| m.start < start);
                idx.truncate(keep);
            }
        } else if conn.completes_on_rdata() && idx.has_rdata_in(prev..idx.lines.len()) {
            conn.complete_handshake(&mut self.events, &mut self.tokens, &mut self.stats);
        }
        if idx.lines.is_empty() {
            return;
        }
        let batch = Arc::new(idx.into_batch());
        if conn.up {
            emit_batch(batch, &mut self.events, &mut self.tokens, &mut self.stats);
        } else {
            conn.pending.push(batch);
        }
    }

    /// A command from core `core` (already merged across that core's connections).
    ///
    /// `USER_SYNC` is merged across cores: `start` goes upstream when the first core starts a
    /// user, `end` when the last one ends it. While disconnected only the state changes (it is
    /// re-announced on connect). Forwarded lines go upstream verbatim; while disconnected they
    /// are queued (bounded by `max_forward_queue`, oldest dropped).
    pub(crate) fn on_command(&mut self, core: usize, cmd: UpstreamCmd, now: Now) {
        match cmd {
            // Redis-mode messages go to the cores, not to the master (the source thread routes
            // them before commands reach the link).
            UpstreamCmd::Publish(_) | UpstreamCmd::RedisPublish(_) | UpstreamCmd::RedisReplicate => {}
            UpstreamCmd::UserSync { user_id, state, last_sync_ms } => {
                let transition = match state {
                    SyncState::Start => self.user_sync.start(core, &user_id),
                    SyncState::End => self.user_sync.end(core, &user_id),
                };
                if transition == Transition::Unchanged {
                    return;
                }
                if let Some(session) = self.open_session() {
                    if session.send(&Command::UserSync(UserSync { user_id: &user_id, state, last_sync_ms })) {
                        self.stats.forwarded += 1;
                    }
                }
            }
            // The source thread runs fetches on connections of their own.
            UpstreamCmd::Fetch { .. } => tracing::debug!("a catch-up fetch reached the link; ignored"),
            UpstreamCmd::Forward(line) => {
                self.note_instance_sync(&line, now);
                if let Some(session) = self.open_session() {
                    session.send_encoded(line);
                    self.stats.forwarded += 1;
                    return;
                }
                if self.forward_queue.len() >= self.config.max_forward_queue {
                    self.forward_queue.pop_front();
                    self.stats.forward_dropped += 1;
                    tracing::error!(
                        limit = self.config.max_forward_queue,
                        dropped = self.stats.forward_dropped,
                        "upstream is down and the forward queue is full: dropping the oldest command"
                    );
                }
                if self.config.max_forward_queue > 0 {
                    self.forward_queue.push_back(line);
                }
            }
        }
    }

    /// Keeps the 1.13+ presence-sync state a forwarded `USER_SYNC <instance_id> <user>
    /// start|end <ms>` or `CLEAR_USER_SYNC <instance_id>` changes (the hub checked its form).
    fn note_instance_sync(&mut self, line: &[u8], now: Now) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if let Some(args) = line.strip_prefix(b"USER_SYNC ") {
            let Ok(us) = parse_instance_user_sync(args) else { return };
            let entry = self.instance_syncs.entry(us.instance_id.to_owned()).or_default();
            entry.last_update_ms = now.mono_ms;
            match us.state {
                SyncState::Start => {
                    entry.users.insert(us.user_id.to_owned(), us.last_sync_ms);
                }
                SyncState::End => {
                    entry.users.remove(us.user_id);
                }
            }
        } else if let Some(instance_id) = line.strip_prefix(b"CLEAR_USER_SYNC ") {
            if let Ok(instance_id) = std::str::from_utf8(instance_id) {
                self.instance_syncs.remove(instance_id);
            }
        }
    }

    fn open_session(&mut self) -> Option<&mut Session> {
        self.conn.as_mut().map(|c| &mut c.session).filter(|s| !s.is_closing())
    }

    /// The next event for the driver.
    pub(crate) fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// The next line to write to the master.
    pub(crate) fn poll_transmit(&mut self) -> Option<Bytes> {
        self.conn.as_mut().and_then(|c| c.session.poll_transmit())
    }

    /// The driver wrote to the socket at `now`.
    pub(crate) fn on_sent(&mut self, now: Now) {
        if let Some(c) = self.conn.as_mut() {
            c.session.on_sent(now);
        }
    }

    /// When [`Self::handle_timeout`] next wants to run (monotonic ms), while connected.
    pub(crate) fn poll_timeout(&self) -> Option<u64> {
        self.conn.as_ref().map(|c| c.session.poll_timeout())
    }

    /// Runs the session tick: keep-alive PING, ping timeout, close linger. `Abort` means drop
    /// the socket now ([`Self::wants_close`] says so too).
    pub(crate) fn handle_timeout(&mut self, now: Now) -> TimerAction {
        let Some(conn) = self.conn.as_mut() else {
            return TimerAction::None;
        };
        let was_open = !conn.session.is_closing();
        let action = conn.session.handle_timeout(now);
        if was_open && conn.session.error() == Some(&PeerError::PingTimeout) {
            tracing::warn!("upstream ping timeout");
        }
        if action == TimerAction::Abort {
            conn.abort = true;
        }
        action
    }

    /// Whether the driver should close the socket: `Abort` at once, `Graceful` once every line
    /// from [`Self::poll_transmit`] was written (after our ERROR, e.g. `Wrong remote`, `ping
    /// timeout`, `Line length exceeded`). Then call [`Self::on_disconnected`].
    pub(crate) fn wants_close(&self) -> Option<CloseHow> {
        let conn = self.conn.as_ref()?;
        if conn.abort {
            Some(CloseHow::Abort)
        } else if conn.session.is_closing() && !conn.session.has_transmit() {
            Some(CloseHow::Graceful)
        } else {
            None
        }
    }

    /// Metrics.
    pub(crate) fn snapshot(&self) -> UpstreamSnapshot {
        UpstreamSnapshot {
            mode: "upstream",
            connected: self.is_up(),
            down_since_ms: (!self.is_up()).then_some(self.stats.down_since_ms),
            reconnects: self.stats.connects.saturating_sub(1),
            // Dials are the driver's; the source thread fills this in.
            connect_failures: 0,
            generation: self.generation().map(Generation::label),
            tokens: self.tokens,
            stream_updates: self.stats.stream_updates,
            inbound_rdata: self.stats.inbound_rdata,
            syncing_users: (self.user_sync.len()
                + self.instance_syncs.values().map(|i| i.users.len()).sum::<usize>())
                as u64,
            forwarded: self.stats.forwarded,
            rdata_dropped: self.stats.unknown_stream_rdata + self.stats.malformed_rdata,
            forwards_dropped: self.stats.forward_dropped,
        }
    }

    /// Forwarded commands dropped because the queue was full while disconnected.
    #[cfg(test)]
    pub(crate) fn forward_dropped(&self) -> u64 {
        self.stats.forward_dropped
    }

    /// RDATA lines from the master that were not relayed: (unknown stream, malformed).
    #[cfg(test)]
    pub(crate) fn dropped_rdata(&self) -> (u64, u64) {
        (self.stats.unknown_stream_rdata, self.stats.malformed_rdata)
    }
}

impl Conn {
    /// Drops the connection (abort, then reconnect) if the held run outgrew
    /// [`MAX_HELD_RUN_BYTES`].
    fn check_carry(&mut self) {
        if self.carry.len() > MAX_HELD_RUN_BYTES {
            tracing::error!(
                bytes = self.carry.len(),
                limit = MAX_HELD_RUN_BYTES,
                "upstream batch run too long to hold; dropping the connection"
            );
            self.carry = BytesMut::new();
            self.carry_open = StreamMask::NONE;
            self.abort = true;
        }
    }

    /// Whether RDATA now completes the handshake: seed masters send RDATA only after their
    /// POSITIONs; 1.13+ masters send them from connect, so there only POSITION does.
    fn completes_on_rdata(&self) -> bool {
        match self.greeting {
            Greeting::All => {}
            // A 1.10–1.12 master answers `REPLICATE ALL NOW` with every POSITION at once (no
            // catch-up to wait for), so an RDATA after them means they are all in, even from a
            // master without `user_signature`, the stream that normally completes it.
            Greeting::Now => return !self.up && self.server_name.is_some() && !self.positioned.is_empty(),
            // It catches up each resumed stream with RDATA before that stream's POSITION.
            Greeting::Resume(_) => return false,
        }
        let seed = match self.generation {
            Some(g) => g == Generation::Seed,
            None => !self.instance_rdata,
        };
        !self.up && self.server_name.is_some() && seed
    }

    /// Whether the POSITIONs that complete the handshake arrived: one per stream replhub
    /// resumed (a 1.10–1.12 master answers them in any order, each after its catch-up rows),
    /// otherwise the one for `user_signature`, the last stream in map order.
    fn positions_complete(&self) -> bool {
        match self.greeting {
            Greeting::Resume(asked) => asked.iter().all(|s| self.positioned.contains(s)),
            Greeting::All | Greeting::Now => self.positioned.contains(StreamId::UserSignature),
        }
    }

    /// A POSITION of any generation: learns the generation (unless pinned, where another shape
    /// is a parse error) and, before the handshake completes, the stream's token.
    fn on_position(&mut self, line: &Line, now: Now) {
        let p = match parse_any_position(line.args(), self.generation) {
            Ok(p) => p,
            Err(e) => {
                let err = PeerError::parse(b"POSITION", line.args(), e);
                tracing::warn!(error = %err, "upstream sent a malformed POSITION");
                self.session.fail(&err, now);
                return;
            }
        };
        if self.generation.is_none() {
            // Two fields are the seed's shape; only a 1.10–1.12 master accepts the 1.10 greeting.
            let generation = match (p.generation, self.greeting) {
                (Generation::Seed, Greeting::Now | Greeting::Resume(_)) => Generation::V1_10,
                (g, _) => g,
            };
            tracing::info!(generation = %generation, "upstream protocol generation learnt from its POSITION");
            self.generation = Some(generation);
        }
        if let (None, Some(instance)) = (&self.instance, p.instance) {
            self.instance = Some(instance.to_owned());
        }
        match StreamId::from_name(p.stream.as_bytes()) {
            Some(s) if !self.up => {
                self.positions[s.index()] = Some(p.token);
                self.positioned.insert(s);
            }
            // From 1.13 the master answers every connection's REPLICATE with POSITIONs to all.
            Some(s) => {
                tracing::debug!(stream = s.name(), token = p.token, "POSITION after the handshake; ignored")
            }
            None => tracing::warn!(stream = p.stream, "POSITION for a stream replhub does not know"),
        }
    }

    /// Handles one non-relayed line: the session's checks, then SERVER / POSITION / PING /
    /// ERROR / SYNC. A violation queues `ERROR ...` and closes the session.
    fn on_control(&mut self, line: &Line, config: &LinkConfig, now: Now) {
        let word = match self.session.check_line(line, now) {
            Ok(word) => word,
            Err(err) => {
                tracing::warn!(error = %err, "upstream sent a line a server may not send");
                return;
            }
        };
        if word == CommandWord::Position {
            self.on_position(line, now);
            return;
        }
        let parsed = match parse_args(word, line) {
            Ok(p) => p,
            Err(err) => {
                tracing::warn!(error = %err, "upstream sent a malformed line");
                self.session.fail(&err, now);
                return;
            }
        };
        match parsed {
            Command::Server(name) => {
                if let Some(expected) = &config.expected_server_name {
                    if expected != name {
                        tracing::error!(expected = %expected, got = %name, "upstream has the wrong server name");
                        self.session.fail(&PeerError::WrongRemote, now);
                        return;
                    }
                }
                if self.up && self.server_name.as_deref() != Some(name) {
                    tracing::warn!(name, "upstream changed its SERVER name mid-connection; ignored");
                    return;
                }
                self.server_name = Some(name.to_owned());
            }
            Command::Error(text) => {
                tracing::warn!(error = text, "upstream sent ERROR");
                self.peer_error = Some(text.to_owned());
            }
            Command::Ping(_) | Command::Sync(_) => {}
            other => {
                tracing::debug!(word = %other.word(), "upstream line not relayed");
            }
        }
    }

    fn complete_handshake(
        &mut self,
        events: &mut VecDeque<LinkEvent>,
        tokens: &mut [Option<i64>; StreamId::COUNT],
        stats: &mut Stats,
    ) {
        let Some(server_name) = self.server_name.clone() else {
            return;
        };
        self.up = true;
        if let (Greeting::Resume(_), Some(Generation::V1_10)) = (self.greeting, self.generation) {
            // The catch-up rows held in `pending` continue from the tokens relayed last: the
            // hub is told those, and the master's POSITIONs (at or past the last of those
            // rows) are not passed on, so no row is skipped or repeated. A POSITION below the
            // token resumed from means the master restarted with a stream counting from the
            // start again (typing, in memory): that one is a gap, reported at the master's token.
            for (p, t) in self.positions.iter_mut().zip(tokens.iter()) {
                if let (Some(pos), Some(tok)) = (*p, *t) {
                    if pos >= tok {
                        *p = Some(tok);
                    }
                }
            }
        }
        *tokens = self.positions;
        let served = self.positions.iter().filter(|p| p.is_some()).count();
        // RDATA before any POSITION and without instance names: a seed master.
        let generation = *self.generation.get_or_insert(if self.instance_rdata {
            Generation::V1_13
        } else {
            Generation::Seed
        });
        let instance = self.instance.clone().unwrap_or_else(|| "master".to_owned());
        tracing::info!(server = %server_name, streams = served, generation = %generation, instance, "upstream handshake complete; protocol generation {generation}");
        events.push_back(LinkEvent::Up(UpstreamEvent::Connected {
            server_name,
            positions: self.positions,
            generation,
            instance,
        }));
        if generation.has_instance() && !self.pending.is_empty() {
            // A 1.13+ master sends RDATA from connect and answers REPLICATE with its current
            // tokens, so every row it sent before those POSITIONs is at or below them: workers
            // get it by their own catch-up from the POSITION. Relayed, it would be a duplicate
            // and pull the hub's tokens back.
            tracing::debug!(
                batches = self.pending.len(),
                "RDATA before the POSITIONs: covered by them, not relayed"
            );
            self.pending.clear();
        }
        for batch in self.pending.drain(..) {
            emit_batch(batch, events, tokens, stats);
        }
    }
}

fn emit_batch(
    batch: Arc<Batch>,
    events: &mut VecDeque<LinkEvent>,
    tokens: &mut [Option<i64>; StreamId::COUNT],
    stats: &mut Stats,
) {
    for m in batch.lines() {
        if let Some(s) = m.stream_id() {
            stats.stream_updates[s.index()] += 1;
            if let Some(t) = m.token {
                tokens[s.index()] = Some(t);
            }
        }
    }
    events.push_back(LinkEvent::Batch(batch));
}

#[cfg(test)]
mod tests;
