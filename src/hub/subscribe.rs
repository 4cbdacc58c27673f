//! Subscriptions: REPLICATE, the POSITION that starts each subscription (invariant 2), and the
//! fresh POSITIONs when the upstream (re)connects (invariant 3).
//!
//! A 1.10–1.12 worker's `REPLICATE <stream|ALL> <token|NOW>` (PROTOCOL.md §8.1) is served as
//! its master would: the rows after `token` from the history (`history.rs`), each as an RDATA
//! line with its own token, then `POSITION`, then live rows, all queued at the same log
//! position so that nothing is missed or repeated. For a token older than the history the
//! rows up to the history's floor are fetched from the master on a connection of its own
//! ([`UpstreamCmd::Fetch`], run by the source thread; [`Hub::on_fetched`]) and queued before
//! the history's; without a 1.10–1.12 master to ask, the worker gets the ERROR a 1.12 master
//! sends for a stream that has fallen behind. A 1.13+ upstream's RDATA cannot be relayed to
//! such a worker at all, so it gets a clear ERROR.
use super::history::Behind;
use super::log::Seq;
use super::stats::{CloseReason, ConnPhase};
use super::{CatchUpFrom, ConnId, Fetched, Hub, HubOutput, UpstreamCmd, UpstreamEvent};
use crate::proto::fields::not_enough_values;
use crate::proto::number::parse_i64;
use crate::proto::pyrepr::py_exc;
use crate::proto::release::map_order;
use crate::proto::{CommandWord, Generation, PeerError, ReplicateTarget, StreamId, StreamMask};
use crate::time::Now;

/// `REPLICATE <stream|ALL> <token|NOW>` as a 1.10–1.12 master parses it (`line.split(" ",
/// 1)`, then `NOW`/`now` or `int()` of the rest).
/// Why a catch-up cannot be queued now.
enum NoCatchUp {
    /// Close the worker with this.
    Fail(PeerError),
    /// Fetch the rows after this token from the master first.
    Fetch(i64),
}

/// What a 1.12 master sends when a stream is too far behind to catch up over TCP.
fn fallen_behind(s: StreamId) -> PeerError {
    PeerError::ReplicateFailed(py_exc("Exception", &format!("stream {} has fallen behind", s.name())))
}

/// Only called for arguments holding a space.
fn parse_token_replicate(args: &str) -> Result<(&str, CatchUpFrom), PeerError> {
    let (stream, token) = args.split_once(' ').unwrap_or((args, ""));
    let from = match token {
        "NOW" | "now" => CatchUpFrom::Now,
        t => CatchUpFrom::Token(
            parse_i64(t.as_bytes()).map_err(|e| PeerError::parse(b"REPLICATE", args.as_bytes(), e))?,
        ),
    };
    Ok((stream, from))
}

impl Hub {
    pub(super) fn replicate(&mut self, id: ConnId, target: ReplicateTarget<'_>, now: Now) {
        let stream = match target {
            ReplicateTarget::All => "ALL",
            ReplicateTarget::Stream(s) => s.name(),
            ReplicateTarget::Unknown(name) => name,
        };
        let name = self.conn(id).map(|c| c.display_name().to_owned()).unwrap_or_default();
        tracing::info!(conn = %id, name, stream, "subscribe (REPLICATE)");
        if self.config.redis_bridge {
            self.replicate_bridged(id);
            return;
        }
        match target {
            // A 1.10–1.12 master (known, or pinned) refuses a 1.13+ worker's `REPLICATE `
            // (`ReplicateCommand.from_line("")` cannot unpack a stream and a token), and so
            // does replhub in its place, with its text.
            ReplicateTarget::Unknown("")
                if self.generation.or(self.config.protocol.pinned()) == Some(Generation::V1_10) =>
            {
                let err = PeerError::parse(b"REPLICATE", b"", not_enough_values(2, 1));
                tracing::info!(conn = %id, name, error = %err, "1.13+ REPLICATE behind a 1.10-1.12 master, closing");
                self.fail(id, &err, CloseReason::ProtocolError, now);
            }
            // A bare `REPLICATE` (or `REPLICATE `) is Synapse 1.13+'s handshake, unless the
            // upstream is known to be the seed or 1.10, whose servers refuse it.
            ReplicateTarget::Unknown("") if !self.generation.is_some_and(Generation::subscribes) => {
                self.replicate_bare(id, now);
            }
            ReplicateTarget::Unknown(args) if args.contains(' ') => match parse_token_replicate(args) {
                Ok(_) if self.generation == Some(Generation::Seed) => {
                    // The seed's master takes the whole argument for a stream name.
                    tracing::info!(conn = %id, name, stream = args, "unknown stream, closing");
                    self.fail(
                        id,
                        &PeerError::UnknownStream(args.to_owned()),
                        CloseReason::ProtocolError,
                        now,
                    );
                }
                Ok((stream, from)) => self.replicate_from(id, stream, from, now),
                Err(err) => {
                    tracing::info!(conn = %id, name, error = %err, "bad command, closing");
                    self.fail(id, &err, CloseReason::ProtocolError, now);
                }
            },
            ReplicateTarget::All => self.subscribe_all(id, now),
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

    /// A 1.10–1.12 worker's `REPLICATE <stream|ALL> <token|NOW>`: each stream is subscribed
    /// as the seed's REPLICATE is (deferred while a run is open or the upstream unknown), and
    /// when it is granted ([`Hub::subscribe_from`]) its catch-up goes before the POSITION.
    fn replicate_from(&mut self, id: ConnId, stream: &str, from: CatchUpFrom, now: Now) {
        match self.generation {
            Some(Generation::V1_10) | None => {}
            Some(g) => {
                self.refuse_catch_up(id, stream, from, g, now);
                return;
            }
        }
        let streams: Vec<StreamId> = if stream == "ALL" {
            if let Some(c) = self.conn_mut(id) {
                c.subs.all = true;
            }
            match self.served {
                Some(served) => served.iter().collect(),
                None => StreamId::ALL.to_vec(),
            }
        } else {
            match StreamId::from_name(stream.as_bytes()) {
                Some(s) if self.served.is_none_or(|m| m.contains(s)) => vec![s],
                _ => {
                    tracing::info!(conn = %id, stream, "unknown stream, closing");
                    let err = PeerError::UnknownStream(stream.to_owned());
                    self.fail(id, &err, CloseReason::ProtocolError, now);
                    return;
                }
            }
        };
        for s in streams {
            self.catch_ups.retain(|(c, cs, _)| !(*c == id && *cs == s));
            self.catch_ups.push((id, s, from.clone()));
            self.request_subscription(id, s, now);
        }
    }

    /// A 1.10–1.12 worker behind an upstream of another generation. The seed's master calls
    /// `<stream> <token>` an unknown stream, and so does replhub, as it would. A 1.13+
    /// master's RDATA and POSITION carry an instance name the worker cannot parse, and it has
    /// no catch-up from a token over TCP: rather than answer as that master would (its
    /// POSITIONs, which the worker rejects with a parse ERROR), the worker is told why, once,
    /// and closed.
    fn refuse_catch_up(
        &mut self,
        id: ConnId,
        stream: &str,
        from: CatchUpFrom,
        upstream: Generation,
        now: Now,
    ) {
        self.catch_ups.retain(|&(c, _, _)| c != id);
        let err = if upstream == Generation::Seed {
            let token = match from {
                CatchUpFrom::Token(t) | CatchUpFrom::Fetched(t, _) => t.to_string(),
                CatchUpFrom::Now => "NOW".to_owned(),
            };
            PeerError::UnknownStream(format!("{stream} {token}"))
        } else {
            let text = format!(
                "replhub relays a Synapse {upstream} master, whose protocol a 1.10-1.12 worker \
                 (REPLICATE <stream> <token>) cannot read"
            );
            PeerError::ReplicateFailed(py_exc("Exception", &text))
        };
        tracing::info!(conn = %id, upstream = %upstream, error = %err, "1.10-1.12 REPLICATE behind another generation, closing");
        self.fail(id, &err, CloseReason::ProtocolError, now);
    }

    /// The catch-up lines queued for `id` before its POSITION for `s` at `token`, if its
    /// REPLICATE carried a token. `Err` if the history no longer reaches back to it.
    fn take_catch_up(&mut self, id: ConnId, s: StreamId, token: i64) -> Result<Vec<bytes::Bytes>, NoCatchUp> {
        let Some(i) = self.catch_ups.iter().position(|(c, cs, _)| *c == id && *cs == s) else {
            return Ok(Vec::new());
        };
        let (_, _, from) = self.catch_ups.swap_remove(i);
        let fetched = match from {
            CatchUpFrom::Now => return Ok(Vec::new()),
            CatchUpFrom::Token(from) => {
                return self.history.catch_up(s, from, token).map_err(|Behind::Floor(floor)| {
                    tracing::info!(conn = %id, stream = s.name(), from, ?floor, "catch-up older than the history");
                    if self.config.fetch_catch_up && self.generation == Some(Generation::V1_10) {
                        NoCatchUp::Fetch(from)
                    } else {
                        NoCatchUp::Fail(fallen_behind(s))
                    }
                });
            }
            CatchUpFrom::Fetched(from, fetched) => (from, fetched),
        };
        // The master's rows up to the history's floor, then the history's: the floor must not
        // have moved past what the master sent while the fetch was under way.
        let (from, fetched) = fetched;
        match self.history.floor(s) {
            Some(floor) if from >= floor => {
                self.history.catch_up(s, from, token).map_err(|_| NoCatchUp::Fail(fallen_behind(s)))
            }
            Some(floor) if fetched.position >= floor => {
                let upto = floor.min(token);
                let mut pieces = Vec::new();
                let mut buf = bytes::BytesMut::new();
                for (t, line) in &fetched.rows {
                    if *t > from && *t <= upto {
                        buf.extend_from_slice(line);
                        if buf.len() >= 64 << 10 {
                            pieces.push(buf.split().freeze());
                        }
                    }
                }
                if !buf.is_empty() {
                    pieces.push(buf.freeze());
                }
                let rest =
                    self.history.catch_up(s, floor, token).map_err(|_| NoCatchUp::Fail(fallen_behind(s)))?;
                pieces.extend(rest);
                Ok(pieces)
            }
            floor => {
                tracing::info!(conn = %id, stream = s.name(), from, ?floor, position = fetched.position, "the history moved past the fetched rows");
                Err(NoCatchUp::Fail(fallen_behind(s)))
            }
        }
    }

    /// Rows fetched from the master for a catch-up (or why not): the subscription is asked
    /// for again with them, and granted (or deferred) as any other.
    pub fn on_fetched(&mut self, id: u64, result: Result<Fetched, String>, now: Now) {
        let Some(i) = self.fetches.iter().position(|f| f.0 == id) else { return };
        let (_, conn, s, from) = self.fetches.swap_remove(i);
        match result {
            Ok(fetched) => {
                tracing::info!(conn = %conn, stream = s.name(), from, rows = fetched.rows.len(), position = fetched.position, "rows fetched from the master for a catch-up");
                self.catch_ups.push((conn, s, CatchUpFrom::Fetched(from, std::sync::Arc::new(fetched))));
                self.request_subscription(conn, s, now);
            }
            Err(text) => {
                tracing::info!(conn = %conn, stream = s.name(), from, error = text.as_str(), "catch-up fetch failed");
                // The master's own refusal is passed on as it said it; anything else (it was
                // unreachable, the connection broke) is the refusal it gives for a stream too
                // far behind, which a worker answers by reconnecting.
                let err = match text.strip_prefix("failed to handle replicate: ") {
                    Some(exc) => PeerError::ReplicateFailed(exc.to_owned()),
                    None => fallen_behind(s),
                };
                self.fail(conn, &err, CloseReason::ProtocolError, now);
            }
        }
    }

    /// Every stream the upstream serves (all of them while that is not known yet), in the
    /// order a master lists them (`presence_federation` after `presence`, as from 1.33).
    fn subscribe_all(&mut self, id: ConnId, now: Now) {
        if let Some(c) = self.conn_mut(id) {
            c.subs.all = true;
        }
        let served = self.served.unwrap_or(StreamMask::ALL);
        let streams: Vec<StreamId> = map_order().filter(|s| served.contains(*s)).collect();
        for s in streams {
            self.request_subscription(id, s, now);
        }
    }

    /// Synapse 1.13+'s REPLICATE (PROTOCOL.md §8.2): subscriptions are gone, every connection
    /// gets every stream, and the master answers with the POSITION of each stream it writes
    /// sent to *all* its connections (still so in 1.66). So the sender subscribes to all
    /// served streams, and every other connection that replicated gets the POSITIONs again,
    /// each after the lines already queued for it, so their tokens match what it holds.
    fn replicate_bare(&mut self, id: ConnId, now: Now) {
        if let Some(c) = self.conn_mut(id) {
            c.subs.bare = true;
        }
        self.subscribe_all(id, now);
        let others: Vec<ConnId> = self
            .conns
            .ids()
            .filter(|&o| o != id)
            .filter(|&o| self.conn(o).is_some_and(|c| c.subs.bare && !c.close.is_closing()))
            .collect();
        for o in others {
            self.subscribe_all(o, now);
        }
    }

    /// REPLICATE behind a shared Redis (`--upstream-redis`), answered as a Synapse process on
    /// that Redis gets it answered: the connection takes every relayed line from the log's
    /// head on (every stream, as from a 1.13+ master, whose REPLICATE ignores its arguments),
    /// and a `REPLICATE ` is published there, which every writer answers with the POSITIONs of
    /// the streams it writes. Those are relayed to every worker like any other line, so the
    /// POSITIONs a worker gets are the writers' own, never the hub's: with several writers of
    /// a stream one token per stream could not say where each of them is (PROTOCOL.md §8.4).
    /// The RDATA a worker gets before them it drops, as it drops a stream's RDATA before that
    /// stream's first POSITION on a connection (§8.2).
    fn replicate_bridged(&mut self, id: ConnId) {
        let head = self.log.head();
        let Some(c) = self.conn_mut(id) else { return };
        c.subs.bare = true;
        c.subs.all = true;
        let new = StreamMask(StreamMask::ALL.0 & !c.subs.mask.0);
        for s in new.iter() {
            c.subs.mask.insert(s);
            c.subs.from[s.index()] = head.0;
        }
        c.subs.refresh_full_from();
        c.phase = ConnPhase::Subscribed;
        for s in new.iter() {
            self.stream_subs[s.index()].push(id);
        }
        self.outputs.push_back(HubOutput::Upstream(UpstreamCmd::RedisReplicate));
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
                if !c.subs.pending.contains(s) {
                    c.subs.pending.insert(s);
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
    pub(super) fn subscribe_from(
        &mut self,
        id: ConnId,
        s: StreamId,
        at: Seq,
        batch_first: Seq,
        token: i64,
        now: Now,
    ) {
        // A stream name, an instance name and numbers: never a newline, never near the limit.
        let position =
            self.generation.unwrap_or(Generation::Seed).position_line(s.name(), &self.instance, token);
        let catch_up = match self.take_catch_up(id, s, token) {
            Ok(lines) => lines,
            Err(NoCatchUp::Fail(err)) => {
                self.fail(id, &err, CloseReason::ProtocolError, now);
                return;
            }
            Err(NoCatchUp::Fetch(from)) => {
                // The subscription waits for the rows; the source thread fetches them.
                let fid = self.next_fetch;
                self.next_fetch += 1;
                self.fetches.push((fid, id, s, from));
                tracing::info!(conn = %id, stream = s.name(), from, "fetching rows older than the history from the master");
                self.outputs.push_back(HubOutput::Upstream(UpstreamCmd::Fetch { id: fid, stream: s, from }));
                return;
            }
        };
        let Some(c) = self.conn_mut(id) else { return };
        if c.close.is_closing() {
            return;
        }
        for piece in catch_up {
            c.outbox.push_private(at, piece, CommandWord::Rdata);
        }
        let newly = !c.subs.mask.contains(s);
        if newly {
            c.subs.mask.insert(s);
            c.subs.from[s.index()] = at.0;
            c.subs.refresh_full_from();
        }
        c.phase = ConnPhase::Subscribed;
        // A repeated REPLICATE whose POSITION would be identical to one still queued at the
        // same place adds nothing (see `Outbox::push_private_coalesced`).
        c.outbox.push_private_coalesced(at, position, CommandWord::Position);
        tracing::debug!(conn = %id, stream = s.name(), token, "subscribed");
        if newly {
            self.stream_subs[s.index()].push(id);
        }
        self.wake(id, batch_first, now);
    }

    /// Drops every subscription of a closing connection, granted or waiting.
    pub(super) fn unsubscribe_all(&mut self, id: ConnId) {
        let Some(c) = self.conn_mut(id) else { return };
        let (mask, pending) = (c.subs.mask, c.subs.pending);
        c.subs.mask = StreamMask::NONE;
        c.subs.pending = StreamMask::NONE;
        c.subs.full_from = u64::MAX;
        self.forget_subscriptions(id, mask, pending);
        self.catch_ups.retain(|(c, _, _)| *c != id);
        self.fetches.retain(|f| f.1 != id);
    }

    /// Takes `id` off the per-stream lists for `mask` (granted) and `pending` (waiting).
    pub(super) fn forget_subscriptions(&mut self, id: ConnId, mask: StreamMask, pending: StreamMask) {
        for s in mask.iter() {
            self.stream_subs[s.index()].retain(|x| *x != id);
        }
        for s in pending.iter() {
            self.pending_subs[s.index()].retain(|x| *x != id);
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
            UpstreamEvent::Connected { server_name, positions, generation, instance } => {
                self.upstream_up = true;
                if self.generation != Some(*generation) {
                    tracing::info!(generation = %generation, instance = instance.as_str(), "upstream protocol generation {generation}: POSITIONs to workers in its form");
                }
                self.generation = Some(*generation);
                self.instance.clone_from(instance);
                if *generation == Generation::V1_10 {
                    for s in StreamId::ALL {
                        self.history.on_connected(s, self.tokens[s.index()], positions[s.index()]);
                    }
                } else {
                    self.history.clear();
                }
                if *generation != Generation::V1_10 {
                    let waiting: Vec<(ConnId, StreamId, CatchUpFrom)> = self.catch_ups.clone();
                    for (id, s, from) in waiting {
                        let all = self.conn(id).is_some_and(|c| c.subs.all);
                        let stream = if all { "ALL" } else { s.name() };
                        self.refuse_catch_up(id, stream, from, *generation, now);
                    }
                }
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
                let ids: Vec<ConnId> = self.conns.ids().collect();
                for id in ids {
                    self.greet(id, &name, now);
                    let mask = self.conn(id).map_or(StreamMask::NONE, |c| c.subs.mask);
                    for s in map_order().filter(|s| mask.contains(*s)) {
                        if let Some(token) = positions[s.index()] {
                            self.subscribe_at(id, s, head, token, now);
                        }
                    }
                }
                // In the order a master lists its streams, as the POSITIONs of a REPLICATE.
                for s in map_order() {
                    for id in std::mem::take(&mut self.pending_subs[s.index()]) {
                        let all = self.conn_mut(id).is_some_and(|c| {
                            c.subs.pending.remove(s);
                            c.subs.all
                        });
                        match positions[s.index()] {
                            Some(token) => self.subscribe_at(id, s, head, token, now),
                            // ALL (or a bare REPLICATE) asked for what is served, whatever that is.
                            None if all => {}
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
}
