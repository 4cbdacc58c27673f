//! The hub proper: see the module docs of [`super`].
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use smallvec::SmallVec;

use super::conn::{Conn, Piece, Private};
use super::log::{Batch, Log, Seq, BROADCAST};
use super::user_sync::{Transition, UserSyncMerger};
use super::{CloseHow, ConnId, HubConfig, HubOutput, UpstreamCmd, UpstreamEvent};
use crate::metrics::snapshot::{CloseReason, ConnPhase, ConnSample, CoreSnapshot, CoreStats, EvictReason};
use crate::proto::inbound::parse_args;
use crate::proto::{
    Command, CommandWord, Line, PeerError, Position, ReplicateTarget, Role, StreamId, StreamMask, SyncState,
};
use crate::session::{Session, TimerAction};
use crate::time::Now;

/// How often [`Hub::handle_timeout`] wants to run: session ticks and the slow-consumer sweep.
pub const TICK_MS: u64 = 100;

struct Slot {
    gen: u32,
    /// Boxed so that the slot table stays small (its growth by doubling would otherwise cost
    /// more than the connections themselves).
    conn: Option<Box<Conn>>,
}

/// A live connection by id, borrowing only the slot table (so other fields stay usable).
fn slot_conn(slots: &mut [Slot], id: ConnId) -> Option<&mut Conn> {
    let slot = slots.get_mut(id.index as usize)?;
    if slot.gen != id.gen {
        return None;
    }
    slot.conn.as_deref_mut()
}

/// The per-core hub. See the [module docs](super).
pub struct Hub {
    config: HubConfig,
    log: Log,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    dirty: Vec<ConnId>,
    outputs: VecDeque<HubOutput>,
    server_name: Option<String>,
    /// Token of the last complete upstream batch per stream (what `POSITION` says).
    tokens: [Option<i64>; StreamId::COUNT],
    /// A `batch` run of the stream is open at the head of the log.
    open_run: [bool; StreamId::COUNT],
    /// Streams the upstream serves, once known.
    served: Option<StreamMask>,
    upstream_up: bool,
    /// Connections subscribed to each stream (to wake them when its lines arrive).
    stream_subs: [Vec<ConnId>; StreamId::COUNT],
    /// Connections whose REPLICATE for the stream waits for a batch boundary or for tokens.
    pending_subs: [Vec<ConnId>; StreamId::COUNT],
    user_sync: UserSyncMerger<ConnId>,
    stats: CoreStats,
    next_tick_ms: u64,
    shutting_down: bool,
}

impl Hub {
    /// A hub with no connections and an empty log.
    pub fn new(config: HubConfig) -> Self {
        let server_name = config.server_name.clone();
        Self {
            config,
            log: Log::new(),
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            dirty: Vec::new(),
            outputs: VecDeque::new(),
            server_name,
            tokens: [None; StreamId::COUNT],
            open_run: [false; StreamId::COUNT],
            served: None,
            upstream_up: false,
            stream_subs: Default::default(),
            pending_subs: Default::default(),
            user_sync: UserSyncMerger::new(),
            stats: CoreStats::default(),
            next_tick_ms: 0,
            shutting_down: false,
        }
    }

    // ----------------------------------------------------------------------------------------
    // Lookup

    fn conn(&self, id: ConnId) -> Option<&Conn> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.gen != id.gen {
            return None;
        }
        slot.conn.as_deref()
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.gen != id.gen {
            return None;
        }
        slot.conn.as_deref_mut()
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether there are no connections.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Whether `conn` is live.
    pub fn contains(&self, conn: ConnId) -> bool {
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

    /// The server name workers are greeted with, once known.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The token `POSITION` would report for a stream now.
    pub fn token(&self, s: StreamId) -> Option<i64> {
        self.tokens[s.index()]
    }

    /// Streams a connection receives, and whether it is closing (for tests and logs).
    pub fn subscriptions(&self, conn: ConnId) -> Option<StreamMask> {
        self.conn(conn).map(|c| c.mask)
    }

    /// The worker's NAME.
    pub fn conn_name(&self, conn: ConnId) -> Option<&str> {
        self.conn(conn).and_then(|c| c.name.as_deref())
    }

    /// Bytes of log a connection holds back (its backlog).
    pub fn backlog_bytes(&self, conn: ConnId) -> Option<u64> {
        let c = self.conn(conn)?;
        Some(if c.pins() { self.log.head_byte() - self.log.byte_of(c.cursor) } else { 0 })
    }

    // ----------------------------------------------------------------------------------------
    // Inputs

    /// A worker connected. Greets it at once if the server name is known, otherwise as soon as
    /// the upstream tells it.
    pub fn accept(&mut self, now: Now) -> ConnId {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot { gen: 0, conn: None });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        let id = ConnId { index, gen: slot.gen };
        let session = Session::new(Role::Server, self.config.session.clone(), now);
        slot.conn = Some(Box::new(Conn::new(id, session, ConnPhase::Waiting, self.log.head(), now.mono_ms)));
        self.live += 1;
        self.stats.accepted += 1;
        tracing::info!(conn = %id, name = "anon", "connection accepted");
        if self.shutting_down {
            self.fail(id, &PeerError::ShuttingDown, CloseReason::ConnectionAborted, now);
        } else if let Some(name) = self.server_name.clone() {
            self.greet(id, &name, now);
        }
        id
    }

    fn greet(&mut self, id: ConnId, server_name: &str, now: Now) {
        let Some(c) = self.conn_mut(id) else { return };
        if c.session.is_started() || c.closing.is_some() {
            return;
        }
        c.session.start(server_name, &[], now);
        c.phase = ConnPhase::Connected;
        self.drain_session(id, now);
    }

    /// Bytes received from a worker.
    pub fn on_bytes(&mut self, id: ConnId, data: &[u8], now: Now) {
        let Some(c) = self.conn_mut(id) else { return };
        c.session.on_bytes(data);
        self.process_input(id, now);
    }

    fn process_input(&mut self, id: ConnId, now: Now) {
        loop {
            let Some(c) = self.conn_mut(id) else { return };
            let Some(next) = c.session.poll_line(now) else { break };
            match next {
                Ok((word, line)) => {
                    c.inbound[word as usize] += 1;
                    self.handle_command(id, word, &line, now);
                }
                Err(err) => {
                    let name = c.display_name().to_owned();
                    tracing::info!(conn = %id, name, error = %err, "protocol error, closing");
                    c.closing.get_or_insert(CloseReason::ProtocolError);
                    break;
                }
            }
        }
        self.drain_session(id, now);
    }

    fn handle_command(&mut self, id: ConnId, word: CommandWord, line: &Line, now: Now) {
        let parsed = match parse_args(word, line) {
            Ok(p) => p,
            Err(err) => {
                let name = self.conn(id).map(|c| c.display_name().to_owned()).unwrap_or_default();
                tracing::info!(conn = %id, name, error = %err, "bad command, closing");
                self.fail(id, &err, CloseReason::ProtocolError, now);
                return;
            }
        };
        match parsed {
            Command::Name(name) => {
                if let Some(c) = self.conn_mut(id) {
                    tracing::info!(conn = %id, name, "worker named itself");
                    c.name = Some(name.to_owned());
                }
            }
            Command::Replicate(target) => self.replicate(id, target, now),
            Command::UserSync(us) => {
                self.stats.user_sync += 1;
                let t = match us.state {
                    SyncState::Start => self.user_sync.start(id, us.user_id),
                    SyncState::End => self.user_sync.end(id, us.user_id),
                };
                let state = match t {
                    Transition::Started => SyncState::Start,
                    Transition::Ended => SyncState::End,
                    Transition::Unchanged => return,
                };
                self.outputs.push_back(HubOutput::Upstream(UpstreamCmd::UserSync {
                    user_id: us.user_id.to_owned(),
                    state,
                    last_sync_ms: us.last_sync_ms,
                }));
            }
            Command::FederationAck(_) => {
                self.stats.federation_ack += 1;
                self.forward(line);
            }
            Command::RemovePusher(_) => {
                self.stats.remove_pusher += 1;
                self.forward(line);
            }
            Command::InvalidateCache(_) => {
                self.stats.invalidate_cache += 1;
                self.forward(line);
            }
            Command::UserIp(_) => {
                self.stats.user_ip += 1;
                self.forward(line);
            }
            Command::RemoteServerUp(_) => self.forward(line),
            Command::Error(text) => {
                let name = self.conn(id).map(|c| c.display_name().to_owned()).unwrap_or_default();
                tracing::warn!(conn = %id, name, text, "worker reported an error");
            }
            // PING is handled by the session; the rest never pass the server's direction check.
            _ => {}
        }
    }

    fn forward(&mut self, line: &Line) {
        let mut buf = BytesMut::with_capacity(line.as_bytes().len() + 1);
        buf.put_slice(line.as_bytes());
        buf.put_u8(b'\n');
        self.outputs.push_back(HubOutput::Upstream(UpstreamCmd::Forward(buf.freeze())));
    }

    fn replicate(&mut self, id: ConnId, target: ReplicateTarget<'_>, now: Now) {
        let stream = match target {
            ReplicateTarget::All => "ALL",
            ReplicateTarget::Stream(s) => s.name(),
            ReplicateTarget::Unknown(name) => name,
        };
        let name = self.conn(id).map(|c| c.display_name().to_owned()).unwrap_or_default();
        tracing::info!(conn = %id, name, stream, "subscribe (REPLICATE)");
        match target {
            ReplicateTarget::All => {
                let streams: Vec<StreamId> = match self.served {
                    Some(served) => served.iter().collect(),
                    None => StreamId::ALL.to_vec(),
                };
                for s in streams {
                    self.request_subscription(id, s, now);
                }
            }
            ReplicateTarget::Stream(s) => {
                if self.served.is_some_and(|m| !m.contains(s)) {
                    tracing::info!(conn = %id, name, stream, "unknown stream, closing");
                    self.fail(
                        id,
                        &PeerError::UnknownStream(s.name().to_owned()),
                        CloseReason::ProtocolError,
                        now,
                    );
                } else {
                    self.request_subscription(id, s, now);
                }
            }
            ReplicateTarget::Unknown(stream) => {
                tracing::info!(conn = %id, name, stream, "unknown stream, closing");
                self.fail(id, &PeerError::UnknownStream(stream.to_owned()), CloseReason::ProtocolError, now);
            }
        }
    }

    /// Subscribes now if the stream is at a batch boundary and its token is known; otherwise
    /// the subscription waits (invariant 2).
    fn request_subscription(&mut self, id: ConnId, s: StreamId, now: Now) {
        let i = s.index();
        let ready = self.served.is_some() && !self.open_run[i];
        match (ready, self.tokens[i]) {
            (true, Some(token)) => {
                let head = self.log.head();
                self.subscribe_at(id, s, head, token, now);
            }
            _ => {
                let Some(c) = self.conn_mut(id) else { return };
                if !c.pending.contains(s) {
                    c.pending.insert(s);
                    self.pending_subs[i].push(id);
                }
            }
        }
    }

    /// Subscribes `id` to `s` from log line `at` on and queues `POSITION s token` before it.
    fn subscribe_at(&mut self, id: ConnId, s: StreamId, at: Seq, token: i64, now: Now) {
        self.subscribe_from(id, s, at, at, token, now);
    }

    /// [`Hub::subscribe_at`] for a position inside a batch being appended: the connection is
    /// woken from `batch_first`, since it may want earlier lines of that batch too.
    fn subscribe_from(&mut self, id: ConnId, s: StreamId, at: Seq, batch_first: Seq, token: i64, now: Now) {
        let Some(c) = self.conn_mut(id) else { return };
        if c.closing.is_some() {
            return;
        }
        let newly = !c.mask.contains(s);
        if newly {
            c.mask.insert(s);
            c.sub_from[s.index()] = at.0;
            c.refresh_full_from();
        }
        c.phase = ConnPhase::Subscribed;
        let position = Command::Position(Position { stream: s.name(), token });
        // A stream name and a number: never a newline, never near the length limit.
        let Ok(bytes) = position.to_bytes() else {
            unreachable!("POSITION {} {token} does not encode", s.name())
        };
        c.private.push_back(Private { at, bytes, word: position.word(), partial: false });
        tracing::debug!(conn = %id, stream = s.name(), token, "subscribed");
        if newly {
            self.stream_subs[s.index()].push(id);
        }
        self.wake(id, batch_first, now);
    }

    /// Appends a batch shared by all cores to this core's log and wakes its subscribers.
    pub fn on_batch(&mut self, batch: Arc<Batch>, now: Now) {
        let first = self.log.append(Arc::clone(&batch));
        self.stats.batches += 1;
        let mut streams = 0u16;
        let mut broadcast = false;
        for (i, meta) in batch.lines().iter().enumerate() {
            if meta.stream == BROADCAST {
                broadcast = true;
                continue;
            }
            let Some(s) = meta.stream_id() else { continue };
            streams |= s.bit();
            match meta.token {
                None => self.open_run[s.index()] = true,
                Some(token) => {
                    self.open_run[s.index()] = false;
                    self.tokens[s.index()] = Some(token);
                    if !self.pending_subs[s.index()].is_empty() && self.served.is_some() {
                        let at = Seq(first.0 + i as u64 + 1);
                        for id in std::mem::take(&mut self.pending_subs[s.index()]) {
                            if let Some(c) = self.conn_mut(id) {
                                c.pending.remove(s);
                            }
                            self.subscribe_from(id, s, at, first, token, now);
                        }
                    }
                }
            }
        }
        for s in StreamMask(streams).iter() {
            for k in 0..self.stream_subs[s.index()].len() {
                let id = self.stream_subs[s.index()][k];
                self.wake(id, first, now);
            }
        }
        if broadcast {
            for k in 0..self.slots.len() {
                let Some(c) = &self.slots[k].conn else { continue };
                if c.phase != ConnPhase::Waiting {
                    let id = c.id;
                    self.wake(id, first, now);
                }
            }
        }
        // Nobody parked in (or before) this batch: drop it now.
        self.log.trim();
        self.stats.log_bytes = self.log.held_bytes();
        if self.log.held_bytes() > self.config.max_pending_bytes {
            self.sweep(now, true);
        }
    }

    /// The upstream connected (fresh POSITIONs for every subscription, greeting of waiting
    /// workers) or dropped.
    pub fn on_upstream(&mut self, event: &UpstreamEvent, now: Now) {
        match event {
            UpstreamEvent::Disconnected => {
                self.upstream_up = false;
                tracing::info!("upstream disconnected; workers stay connected");
            }
            UpstreamEvent::Connected { server_name, positions } => {
                self.upstream_up = true;
                match &self.server_name {
                    Some(known) if known != server_name && self.config.server_name.is_none() => {
                        tracing::warn!(
                            old = known.as_str(),
                            new = server_name.as_str(),
                            "upstream server name changed"
                        );
                        self.server_name = Some(server_name.clone());
                    }
                    Some(_) => {}
                    None => self.server_name = Some(server_name.clone()),
                }
                let mut served = StreamMask::NONE;
                for s in StreamId::ALL {
                    self.tokens[s.index()] = positions[s.index()];
                    self.open_run[s.index()] = false;
                    if positions[s.index()].is_some() {
                        served.insert(s);
                    }
                }
                self.served = Some(served);
                let name = self.server_name.clone().unwrap_or_default();
                let head = self.log.head();
                let ids: Vec<ConnId> =
                    self.slots.iter().filter_map(|s| s.conn.as_ref().map(|c| c.id)).collect();
                for id in ids {
                    self.greet(id, &name, now);
                    let mask = self.conn(id).map_or(StreamMask::NONE, |c| c.mask);
                    for s in mask.iter() {
                        if let Some(token) = positions[s.index()] {
                            self.subscribe_at(id, s, head, token, now);
                        }
                    }
                }
                for s in StreamId::ALL {
                    for id in std::mem::take(&mut self.pending_subs[s.index()]) {
                        if let Some(c) = self.conn_mut(id) {
                            c.pending.remove(s);
                        }
                        match positions[s.index()] {
                            Some(token) => self.subscribe_at(id, s, head, token, now),
                            None => self.fail(
                                id,
                                &PeerError::UnknownStream(s.name().to_owned()),
                                CloseReason::ProtocolError,
                                now,
                            ),
                        }
                    }
                }
            }
        }
    }

    /// The socket is gone (EOF, error, or after our `Close`): forget the connection.
    pub fn on_peer_closed(&mut self, id: ConnId, lost: bool, now: Now) {
        let Some(slot) = self.slots.get_mut(id.index as usize) else { return };
        if slot.gen != id.gen {
            return;
        }
        let Some(c) = slot.conn.take() else { return };
        slot.gen = slot.gen.wrapping_add(1);
        self.free.push(id.index);
        self.live -= 1;
        let reason =
            c.closing.unwrap_or(if lost { CloseReason::ConnectionLost } else { CloseReason::ConnectionDone });
        self.stats.close_reasons[reason as usize] += 1;
        tracing::info!(
            conn = %id,
            name = c.display_name(),
            reason = reason.label(),
            "connection closed"
        );
        for s in c.mask.iter() {
            self.stream_subs[s.index()].retain(|x| *x != id);
        }
        for s in c.pending.iter() {
            self.pending_subs[s.index()].retain(|x| *x != id);
        }
        if c.pins() {
            self.log.unpin(c.cursor);
        }
        for user_id in self.user_sync.remove_reporter(id) {
            self.outputs.push_back(HubOutput::Upstream(UpstreamCmd::UserSync {
                user_id,
                state: SyncState::End,
                last_sync_ms: now.wall_ms,
            }));
        }
    }

    /// Timers: session ticks (PING, ping timeout, close linger) and the slow-consumer sweep.
    pub fn handle_timeout(&mut self, now: Now) {
        if now.mono_ms < self.next_tick_ms {
            return;
        }
        self.next_tick_ms = now.mono_ms + TICK_MS;
        for k in 0..self.slots.len() {
            let Some(c) = self.slots[k].conn.as_mut() else { continue };
            let id = c.id;
            match c.session.handle_timeout(now) {
                TimerAction::Abort => {
                    // Also after a graceful close: a peer that never sends EOF is dropped.
                    if !c.abort_emitted {
                        c.abort_emitted = true;
                        c.close_emitted = true;
                        c.closing.get_or_insert(CloseReason::ConnectionAborted);
                        tracing::info!(
                            conn = %id,
                            name = c.display_name(),
                            "close linger expired, aborting"
                        );
                        self.outputs.push_back(HubOutput::Close { conn: id, how: CloseHow::Abort });
                    }
                }
                TimerAction::None => {
                    if c.session.is_closing() && c.closing.is_none() {
                        // The session failed on its own: ping timeout.
                        c.closing = Some(CloseReason::PingTimeout);
                        tracing::info!(conn = %id, name = c.display_name(), "ping timeout");
                    }
                    if c.session.has_transmit() {
                        self.drain_session(id, now);
                    }
                }
            }
        }
        self.sweep(now, false);
    }

    /// When [`Hub::handle_timeout`] next wants to run (monotonic ms).
    pub fn poll_timeout(&self) -> u64 {
        self.next_tick_ms
    }

    /// Shutting down: `ERROR server shutting down` to every worker; each is closed once it is
    /// written. New connections get the same.
    pub fn shutdown(&mut self, now: Now) {
        self.shutting_down = true;
        let ids: Vec<ConnId> = self.slots.iter().filter_map(|s| s.conn.as_ref().map(|c| c.id)).collect();
        for id in ids {
            self.fail(id, &PeerError::ShuttingDown, CloseReason::ConnectionDone, now);
        }
    }

    // ----------------------------------------------------------------------------------------
    // Slow consumers

    fn sweep(&mut self, now: Now, backlog_only: bool) {
        let head_byte = self.log.head_byte();
        let mut evict = Vec::new();
        for slot in &self.slots {
            let Some(c) = &slot.conn else { continue };
            if !c.pins() || c.closing.is_some() {
                continue;
            }
            if head_byte - self.log.byte_of(c.cursor) > self.config.max_pending_bytes {
                evict.push((c.id, EvictReason::Backlog));
            } else if !backlog_only
                && (c.blocked || c.in_flight.is_some())
                && now.mono_ms.saturating_sub(c.progress_ms) >= self.config.write_timeout_ms
            {
                evict.push((c.id, EvictReason::WriteTimeout));
            }
        }
        for (id, reason) in evict {
            self.evict(id, reason, now);
        }
    }

    /// Drops a slow consumer's backlog, tells it `ERROR Failed to keep up` and closes it.
    fn evict(&mut self, id: ConnId, reason: EvictReason, now: Now) {
        let backlog = self.backlog_bytes(id).unwrap_or(0);
        let Some(c) = self.conn(id) else { return };
        tracing::warn!(
            conn = %id,
            name = c.display_name(),
            reason = reason.label(),
            backlog,
            "slow consumer evicted"
        );
        self.stats.evictions[reason as usize] += 1;
        self.fail(id, &PeerError::FailedToKeepUp, CloseReason::SlowConsumer, now);
    }

    /// A closing connection wants no more log lines: drop its backlog (keeping the rest of a
    /// half-written line, so the stream stays well-formed) and release its pin, so a peer that
    /// stopped reading cannot hold the log.
    fn detach(&mut self, id: ConnId) {
        let head = self.log.head();
        let Some(c) = slot_conn(&mut self.slots, id) else { return };
        if c.detached {
            return;
        }
        let mut keep: Option<Private> = None;
        if c.in_flight.is_some() {
            // The write in flight accounts for itself and requeues any half-written line.
            c.replanned = true;
        } else if c.offset > 0 {
            if let Some((batch, i)) = self.log.locate(c.cursor) {
                let meta = batch.lines()[i];
                let rest = batch.data().slice(meta.start as usize + c.offset..meta.end as usize);
                keep = Some(Private { at: head, bytes: rest, word: CommandWord::Rdata, partial: true });
            }
        }
        if keep.is_none() && c.private.front().is_some_and(|p| p.partial) {
            keep = c.private.pop_front();
        }
        c.private.clear();
        if let Some(mut k) = keep {
            k.at = head;
            c.private.push_back(k);
        }
        let (old, pinned) = (c.cursor, c.pins());
        c.cursor = head;
        c.offset = 0;
        c.detached = true;
        if pinned {
            self.log.unpin(old);
        }
    }

    fn unsubscribe_all(&mut self, id: ConnId) {
        let Some(c) = self.conn_mut(id) else { return };
        let (mask, pending) = (c.mask, c.pending);
        c.mask = StreamMask::NONE;
        c.pending = StreamMask::NONE;
        c.full_from = u64::MAX;
        for s in mask.iter() {
            self.stream_subs[s.index()].retain(|x| *x != id);
        }
        for s in pending.iter() {
            self.pending_subs[s.index()].retain(|x| *x != id);
        }
    }

    /// Sends `ERROR <err>` and closes once it is written.
    fn fail(&mut self, id: ConnId, err: &PeerError, reason: CloseReason, now: Now) {
        let Some(c) = self.conn_mut(id) else { return };
        if c.closing.is_some() {
            return;
        }
        c.closing = Some(reason);
        c.session.fail(err, now);
        self.drain_session(id, now);
    }

    // ----------------------------------------------------------------------------------------
    // Writes

    /// Moves the session's queued lines into the connection's private queue at the head. A
    /// session that decided to close (an ERROR, a ping timeout) detaches the connection first.
    fn drain_session(&mut self, id: ConnId, now: Now) {
        let Some(c) = slot_conn(&mut self.slots, id) else { return };
        if c.session.is_closing() && !c.detached {
            c.closing.get_or_insert(CloseReason::ProtocolError);
            c.phase = ConnPhase::Closing;
            self.unsubscribe_all(id);
            self.detach(id);
        }
        let head = self.log.head();
        let Some(c) = slot_conn(&mut self.slots, id) else { return };
        let mut any = false;
        while let Some(bytes) = c.session.poll_transmit() {
            let word_end = memchr::memchr(b' ', &bytes).unwrap_or(bytes.len());
            let word = CommandWord::parse(&bytes[..word_end]).unwrap_or(CommandWord::Error);
            c.private.push_back(Private { at: head, bytes, word, partial: false });
            any = true;
        }
        if any || c.closing.is_some() {
            self.wake(id, head, now);
        }
    }

    /// Marks a connection as having output from log line `from` on (or private lines).
    fn wake(&mut self, id: ConnId, from: Seq, now: Now) {
        let Some(slot) = self.slots.get_mut(id.index as usize) else { return };
        if slot.gen != id.gen {
            return;
        }
        let Some(c) = slot.conn.as_mut() else { return };
        if !c.active {
            // Idle means nothing was pending: every line before `from` is one it does not want.
            if c.cursor < from {
                c.cursor = from;
            }
            c.offset = 0;
            c.active = true;
            c.progress_ms = now.mono_ms;
            if !c.detached {
                self.log.pin(c.cursor);
            }
        }
        if !c.dirty && !c.blocked && c.in_flight.is_none() && !c.close_emitted {
            c.dirty = true;
            self.dirty.push(id);
        }
    }

    /// Connections that have output and no write in flight, to be written this loop turn.
    pub fn take_dirty(&mut self, out: &mut Vec<ConnId>) {
        for id in self.dirty.drain(..) {
            let Some(slot) = self.slots.get_mut(id.index as usize) else { continue };
            if slot.gen != id.gen {
                continue;
            }
            if let Some(c) = slot.conn.as_mut() {
                if c.dirty {
                    c.dirty = false;
                    out.push(id);
                }
            }
        }
    }

    /// The socket of a blocked connection is writable again.
    pub fn on_writable(&mut self, id: ConnId) {
        let Some(c) = self.conn_mut(id) else { return };
        c.blocked = false;
        if c.active && !c.dirty && c.in_flight.is_none() && !c.close_emitted {
            c.dirty = true;
            self.dirty.push(id);
        }
    }

    /// Fills `iov` with the next gathered write for `id` (at most `max_iov` slices) and marks
    /// it in flight; returns its length. Zero means nothing to write (the connection went
    /// idle, and may have asked to be closed through [`Hub::poll_output`]).
    ///
    /// The slices stay valid until [`Hub::on_written`] or [`Hub::on_peer_closed`] for `id`.
    pub fn gather<'a>(&'a mut self, id: ConnId, iov: &mut Vec<IoSlice<'a>>) -> usize {
        let max_iov = self.config.max_iov.max(1);
        let max_bytes = self.config.max_write_bytes.max(1);
        let head = self.log.head().0;
        let Some(slot) = self.slots.get_mut(id.index as usize) else { return 0 };
        if slot.gen != id.gen {
            return 0;
        }
        let Some(c) = slot.conn.as_mut() else { return 0 };
        if c.in_flight.is_some() || c.close_emitted || !c.active {
            return 0;
        }
        let mut pieces: SmallVec<[Piece; 4]> = SmallVec::new();
        let mut total = 0usize;
        let mut seq = c.cursor.0;
        let mut off = c.offset;
        let mut reached_head = false;
        while pieces.len() < max_iov && total < max_bytes {
            if off == 0 {
                if let Some(p) = c.private.front() {
                    if p.at.0 <= seq {
                        let line = c.private.pop_front().expect("front exists");
                        total += line.bytes.len();
                        pieces.push(Piece::Private { line, skip: 0 });
                        continue;
                    }
                }
            }
            if seq >= head || c.detached {
                seq = seq.max(head);
                reached_head = true;
                break;
            }
            let Some((batch, idx)) = self.log.locate(Seq(seq)) else {
                debug_assert!(false, "an active cursor points outside the log");
                reached_head = true;
                seq = head;
                break;
            };
            let lines = batch.lines();
            let limit = c.private.front().map_or(u64::MAX, |p| p.at.0);
            let mut i = idx;
            let mut s = seq;
            if off == 0 {
                if s >= c.full_from {
                    // Subscribed to everything: nothing to skip.
                } else {
                    while i < lines.len() && s < limit && !c.wants(lines[i].stream, s) {
                        i += 1;
                        s += 1;
                    }
                }
                if i == lines.len() || s >= limit {
                    seq = s;
                    continue;
                }
            }
            let first = i;
            let first_seq = s;
            if s >= c.full_from {
                let room = usize::try_from(limit - s).unwrap_or(usize::MAX);
                let end = batch.run_end(i).min(i.saturating_add(room));
                s += (end - i) as u64;
                i = end;
            } else {
                i += 1;
                s += 1;
                while i < lines.len()
                    && s < limit
                    && lines[i].start == lines[i - 1].end
                    && c.wants(lines[i].stream, s)
                {
                    i += 1;
                    s += 1;
                }
            }
            let piece = Piece::Log { batch: Arc::clone(batch), first, end: i, skip: off, first_seq };
            total += piece.len();
            pieces.push(piece);
            off = 0;
            seq = s;
        }
        if pieces.is_empty() {
            // Only skipped lines: the cursor jumps, and the connection goes idle.
            let old = c.cursor;
            c.cursor = Seq(seq);
            c.offset = 0;
            let closing = c.closing.is_some();
            if c.pins() {
                self.log.repin(old, Seq(seq));
            }
            if reached_head {
                self.go_idle(id, closing);
            } else if let Some(c) = self.conn_mut(id) {
                c.dirty = true;
                self.dirty.push(id);
            }
            return 0;
        }
        c.flight_len = total;
        c.flight_end = reached_head.then_some(seq);
        c.replanned = false;
        c.in_flight = Some(pieces);
        // Borrow again, shared and for 'a, to hand out the slices.
        let Some(pieces) = self.slots[id.index as usize].conn.as_ref().and_then(|c| c.in_flight.as_ref())
        else {
            return 0;
        };
        for p in pieces {
            let bytes: &'a [u8] = match p {
                Piece::Private { line, skip } => &line.bytes[*skip..],
                Piece::Log { batch, first, end, skip, .. } => {
                    let lines = batch.lines();
                    &batch.data()[lines[*first].start as usize + skip..lines[*end - 1].end as usize]
                }
            };
            iov.push(IoSlice::new(bytes));
        }
        total
    }

    fn go_idle(&mut self, id: ConnId, closing: bool) {
        let Some(c) = self.conn_mut(id) else { return };
        if c.active && c.private.is_empty() && c.offset == 0 {
            let (cursor, pinned) = (c.cursor, c.pins());
            c.active = false;
            if c.private.capacity() > 8 {
                // A burst of private lines (REPLICATE ALL) is over: don't keep its queue.
                c.private = VecDeque::new();
            }
            if pinned {
                self.log.unpin(cursor);
            }
            if closing {
                let Some(c) = self.conn_mut(id) else { return };
                if !c.close_emitted {
                    c.close_emitted = true;
                    self.outputs.push_back(HubOutput::Close { conn: id, how: CloseHow::Graceful });
                }
            }
        }
    }

    /// `n` bytes of the write in flight for `id` were written (`n` may be short or zero). A
    /// short write means the socket is full: the connection waits for [`Hub::on_writable`].
    pub fn on_written(&mut self, id: ConnId, n: usize, now: Now) {
        let Some(c) = slot_conn(&mut self.slots, id) else { return };
        let Some(pieces) = c.in_flight.take() else { return };
        let requested = c.flight_len;
        let replanned = std::mem::take(&mut c.replanned);
        if n > 0 {
            c.session.on_sent(now);
            c.progress_ms = now.mono_ms;
        }
        let mut left = n;
        let mut lines_done = 0u64;
        let mut requeue: SmallVec<[Private; 4]> = SmallVec::new();
        let mut new_cursor: Option<(u64, usize)> = None;
        let mut complete = true;
        for piece in pieces {
            let len = piece.len();
            if left >= len && complete {
                left -= len;
                match piece {
                    Piece::Private { line, .. } => {
                        if !line.partial {
                            c.outbound[line.word as usize] += 1;
                        }
                    }
                    Piece::Log { first, end, first_seq, .. } => {
                        lines_done += (end - first) as u64;
                        new_cursor = Some((first_seq + (end - first) as u64, 0));
                    }
                }
            } else if complete && left > 0 {
                complete = false;
                match piece {
                    Piece::Private { line, skip } => {
                        let rest = line.bytes.slice(skip + left..);
                        requeue.push(Private { at: line.at, bytes: rest, word: line.word, partial: true });
                    }
                    Piece::Log { batch, first, end, skip, first_seq } => {
                        let lines = batch.lines();
                        let base = lines[first].start as usize;
                        let pos = base + skip + left;
                        // The line holding byte `pos`: the last one starting at or before it.
                        let k = first + lines[first..end].partition_point(|m| (m.start as usize) <= pos) - 1;
                        lines_done += (k - first) as u64;
                        let within = pos - lines[k].start as usize;
                        if replanned {
                            let rest = batch.data().slice(pos..lines[k].end as usize);
                            requeue.push(Private {
                                at: c.cursor,
                                bytes: rest,
                                word: CommandWord::Rdata,
                                partial: true,
                            });
                        } else {
                            new_cursor = Some((first_seq + (k - first) as u64, within));
                        }
                    }
                }
                left = 0;
            } else {
                complete = false;
                if let Piece::Private { line, skip } = piece {
                    if replanned && skip == 0 && !line.partial {
                        continue;
                    }
                    let bytes = if skip > 0 { line.bytes.slice(skip..) } else { line.bytes };
                    requeue.push(Private {
                        at: line.at,
                        bytes,
                        word: line.word,
                        partial: line.partial || skip > 0,
                    });
                }
            }
        }
        for p in requeue.into_iter().rev() {
            c.private.push_front(p);
        }
        self.stats.lines_delivered += lines_done;
        self.stats.bytes_delivered += n as u64;
        self.stats.writes += 1;
        c.outbound[CommandWord::Rdata as usize] += lines_done;
        let old = c.cursor;
        if !replanned && !c.detached {
            if complete && n == requested {
                if let Some(end) = c.flight_end {
                    new_cursor = Some((end, 0));
                }
            }
            if let Some((seq, off)) = new_cursor {
                c.cursor = Seq(seq);
                c.offset = off;
            }
        }
        let new = c.cursor;
        let blocked = n < requested;
        c.blocked = blocked;
        let closing = c.closing.is_some();
        let nothing_left = c.private.is_empty() && c.offset == 0 && c.cursor.0 >= self.log.head().0;
        if old != new && c.pins() {
            self.log.repin(old, new);
        }
        if nothing_left {
            self.go_idle(id, closing);
        } else if !blocked {
            let Some(c) = self.conn_mut(id) else { return };
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Outputs and metrics

    /// The next output for the driver.
    pub fn poll_output(&mut self) -> Option<HubOutput> {
        self.outputs.pop_front()
    }

    /// A metrics snapshot. `kernel_queues` maps a connection to its (SIOCOUTQ, SIOCINQ) values,
    /// read by the driver on this core.
    pub fn snapshot(&self, core: usize, mut kernel_queues: impl FnMut(ConnId) -> (u64, u64)) -> CoreSnapshot {
        let mut stats = self.stats.clone();
        stats.log_bytes = self.log.held_bytes();
        let head = self.log.head();
        let conns = self
            .slots
            .iter()
            .filter_map(|s| s.conn.as_ref())
            .map(|c| {
                let (outq, inq) = kernel_queues(c.id);
                let behind = if c.pins() { head.0 - c.cursor.0 } else { 0 };
                ConnSample {
                    name: c.display_name().to_owned(),
                    phase: c.phase,
                    subscribed: c.mask.0,
                    pending_commands: behind + c.private.len() as u64,
                    backlog_bytes: if c.pins() {
                        self.log.head_byte() - self.log.byte_of(c.cursor)
                    } else {
                        0
                    },
                    kernel_send_queue: outq,
                    kernel_read_queue: inq,
                    inbound: c.inbound,
                    outbound: c.outbound,
                }
            })
            .collect();
        CoreSnapshot { core, stats, conns }
    }

    /// Whether the upstream link is up, as far as this core knows.
    pub fn upstream_up(&self) -> bool {
        self.upstream_up
    }

    /// Encodes a private command for tests and tools.
    pub fn encode(cmd: &Command<'_>) -> Option<Bytes> {
        let mut b = BytesMut::new();
        cmd.encode_into(&mut b).ok()?;
        Some(b.freeze())
    }
}
