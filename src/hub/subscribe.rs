//! Subscriptions: REPLICATE, the POSITION that starts each subscription (invariant 2), and the
//! fresh POSITIONs when the upstream (re)connects (invariant 3).
use super::log::Seq;
use super::stats::{CloseReason, ConnPhase};
use super::{ConnId, Hub, UpstreamEvent};
use crate::proto::release::map_order;
use crate::proto::{CommandWord, Generation, PeerError, ReplicateTarget, StreamId, StreamMask};
use crate::time::Now;

impl Hub {
    pub(super) fn replicate(&mut self, id: ConnId, target: ReplicateTarget<'_>, now: Now) {
        let stream = match target {
            ReplicateTarget::All => "ALL",
            ReplicateTarget::Stream(s) => s.name(),
            ReplicateTarget::Unknown(name) => name,
        };
        let name = self.conn(id).map(|c| c.display_name().to_owned()).unwrap_or_default();
        tracing::info!(conn = %id, name, stream, "subscribe (REPLICATE)");
        match target {
            // A bare `REPLICATE` (or `REPLICATE `) is Synapse 1.13+'s handshake, unless the
            // upstream is known to be the seed, whose server calls it an unknown stream.
            ReplicateTarget::Unknown("") if self.generation != Some(Generation::Seed) => {
                self.replicate_bare(id, now);
            }
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
        let Some(c) = self.conn_mut(id) else { return };
        if c.close.is_closing() {
            return;
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
