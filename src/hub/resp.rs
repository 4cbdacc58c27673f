//! Redis-mode connections in the hub: RESP clients share the log, the cursors, the outboxes,
//! the dirty list and the slow-consumer sweep with the workers. What differs is here: their
//! input goes through a [`resp::Session`](crate::resp::Session) instead of the replication
//! session, their replies are private lines, their subscriptions are channels (log lines
//! tagged [`PUBSUB`](super::log::PUBSUB) with a channel id), and what they publish leaves as
//! one [`UpstreamCmd::Publish`] batch per loop turn (`Hub::take_published`; see the `resp`
//! module docs for the path to every core).
use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::conn::Conn;
use super::log::{Batch, LineMeta, Seq};
use super::outbox::Outbox;
use super::stats::{CloseReason, ConnPhase, EvictReason};
use super::{ConnId, Hub, HubOutput, Published, UpstreamCmd, MAX_QUEUED_BYTES, MAX_QUEUED_COMMANDS};
use crate::proto::{CommandWord, PeerError, Role};
use crate::resp::{codec, Channel, Effect, RespState};
use crate::session::Session;
use crate::time::Now;

/// A core's Redis-mode state.
pub(super) struct CoreResp {
    pub state: Arc<RespState>,
    /// Channels this core has seen, by name (so the shared table is locked once per name).
    names: HashMap<Bytes, Arc<Channel>>,
    /// Connections subscribed to each channel id on this core.
    pub subs: HashMap<u32, Vec<ConnId>>,
    /// Scratch for one read's effects.
    effects: Vec<Effect>,
    /// Messages published on this core since the last batch was cut ([`Hub::poll_output`]
    /// cuts it, so once per loop turn, whatever the number of reads in between) and their
    /// places in `pending_frames`.
    pending_frames: BytesMut,
    pending_metas: Vec<LineMeta>,
    /// Messages published from this core (to at least one subscriber).
    published: u64,
    /// `RDATA` messages published from this core by stream, then instance: two lookups by
    /// `&str`, so counting a message allocates nothing (only a pair not seen before does).
    rdata: HashMap<Box<str>, HashMap<Box<str>, u64>>,
    /// (stream, instance) pairs in `rdata`.
    rdata_keys: usize,
    /// Live RESP connections on this core.
    conns: usize,
    /// Batches of messages dropped for this core in the source (`on_publish_lost`).
    batches_dropped: u64,
}

/// A core cuts its batch of published messages once it holds this much, even before the end
/// of the loop turn.
const PUBLISH_BATCH_BYTES: usize = 256 << 10;

impl Hub {
    /// The messages published on this core since the last cut, as one batch for every core
    /// (`UpstreamCmd::Publish`), if there are any. However the driver reads (one backend takes
    /// 4 KiB a completion, the other 64 KiB a read), one loop turn's publishes on a core make one
    /// batch, so the cores' fan-out does not depend on the read size.
    pub(super) fn take_published(&mut self) -> Option<HubOutput> {
        let core = self.resp.as_mut()?;
        if core.pending_metas.is_empty() {
            return None;
        }
        Some(cut_published(&mut core.pending_frames, &mut core.pending_metas))
    }
}

/// The pending published messages as one `Publish` output, leaving both buffers empty.
fn cut_published(frames: &mut BytesMut, metas: &mut Vec<LineMeta>) -> HubOutput {
    let batch = Arc::new(Batch::new(frames.split().freeze(), std::mem::take(metas)));
    HubOutput::Upstream(UpstreamCmd::Publish(Published(batch)))
}

/// At most this many (stream, instance) pairs are counted apart; the rest count under
/// `other`, so a client publishing made-up names cannot grow the table without bound.
const MAX_RDATA_KEYS: usize = 1024;

/// The stream and writer instance of a replication `RDATA` payload, from its first words
/// only: `RDATA <stream> <instance> <token> <row>` as Synapse sends over Redis (1.13+), or the
/// instance-less seed form `RDATA <stream> <token> <row>` (instance empty).
fn rdata_key(payload: &[u8]) -> Option<(&str, &str)> {
    let rest = payload.strip_prefix(b"RDATA ")?;
    let head = &rest[..rest.len().min(256)];
    let mut words = head.splitn(4, |&b| b == b' ');
    let stream = std::str::from_utf8(words.next()?).ok()?;
    let second = words.next()?;
    let is_token = |w: &[u8]| w == b"batch" || crate::resp::codec::parse_i64(w).is_some();
    if is_token(second) {
        return Some((stream, ""));
    }
    is_token(words.next()?).then_some(())?;
    Some((stream, std::str::from_utf8(second).ok()?))
}

/// One RESP connection's own state.
pub(super) struct RespConn {
    pub session: crate::resp::Session,
    /// The peer's address: the connection's name until `CLIENT SETNAME`.
    pub peer: String,
    /// Since when the backlog is over the soft output limit.
    pub soft_since: Option<u64>,
    /// Channels subscribed on this core, by id, with their shared counters.
    pub channels: HashMap<u32, Arc<Channel>>,
}

/// The word private lines of RESP connections are counted under (the outbound counters are
/// per replication command; replies are neither RDATA nor POSITION).
const REPLY_WORD: CommandWord = CommandWord::Ping;

impl Hub {
    /// Turns Redis mode on for this core: RESP connections can then be accepted.
    pub fn set_resp(&mut self, state: Arc<RespState>) {
        self.resp = Some(Box::new(CoreResp {
            state,
            names: HashMap::new(),
            subs: HashMap::new(),
            effects: Vec::new(),
            pending_frames: BytesMut::new(),
            pending_metas: Vec::new(),
            published: 0,
            rdata: HashMap::new(),
            rdata_keys: 0,
            conns: 0,
            batches_dropped: 0,
        }));
    }

    /// A RESP client connected from `peer` (its name in metrics and logs until it sends
    /// `CLIENT SETNAME`). Nothing is sent until it asks.
    pub fn accept_resp(&mut self, peer: String, now: Now) -> ConnId {
        let Some(state) = self.resp.as_ref().map(|r| Arc::clone(&r.state)) else {
            // No Redis mode on this core: the connection is accepted and closed at once.
            let id = self.accept(now);
            self.fail(id, &PeerError::ShuttingDown, CloseReason::ConnectionAborted, now);
            return id;
        };
        // The replication session is kept unstarted: it sends nothing, pings nobody, and only
        // times the close linger.
        let session = Session::new(Role::Server, self.config.session.clone(), now);
        let outbox = Outbox::new(self.log.head(), now.mono_ms);
        let resp = RespConn {
            session: crate::resp::Session::new(Arc::clone(&state.session)),
            peer: peer.clone(),
            soft_since: None,
            channels: HashMap::new(),
        };
        let id = self.conns.insert_with(|_| {
            let mut c = Conn::new(session, outbox, now);
            c.phase = ConnPhase::Connected;
            c.name = Some(peer.clone());
            c.resp = Some(Box::new(resp));
            Box::new(c)
        });
        self.stats.accepted += 1;
        if let Some(core) = self.resp.as_mut() {
            core.conns += 1;
        }
        tracing::info!(conn = %id, peer, "redis connection accepted");
        if self.shutting_down {
            self.close_resp(id, CloseReason::ConnectionAborted, now);
        }
        id
    }

    /// Bytes from a RESP client: every complete command is carried out; the messages it
    /// published join the core's pending batch ([`Hub::take_published`]).
    pub(super) fn resp_input(&mut self, id: ConnId, data: &[u8], now: Now) {
        let (Some(c), Some(core)) = (self.conns.get_mut(id), self.resp.as_mut()) else { return };
        let Some(r) = c.resp.as_mut() else { return };
        if c.close.is_closing() {
            return;
        }
        let mut effects = std::mem::take(&mut core.effects);
        r.session.on_bytes(data, &mut effects);
        let head = self.log.head();
        // Published messages join the batch this core has been filling since its last cut.
        let mut frames = std::mem::take(&mut core.pending_frames);
        let mut metas = std::mem::take(&mut core.pending_metas);
        let mut relay = BytesMut::new();
        // Every reply of one read, in order, as one private line: they all go out at the same
        // place in the log (`head`), so one piece of a write carries them, not one each (a
        // pipelining publisher's read holds hundreds of PUBLISH).
        let mut replies = BytesMut::new();
        let mut close = false;
        for e in effects.drain(..) {
            let reply = match e {
                Effect::Reply(b) => Some(b),
                Effect::Subscribe(name) => self.resp_subscribe(id, &name, head),
                Effect::Unsubscribe(name) => {
                    self.resp_unsubscribe(id, &name);
                    None
                }
                Effect::Publish { channel, payload } => {
                    let receivers =
                        self.resp_publish(&channel, &payload, &mut frames, &mut metas, &mut relay);
                    codec::put_integer(&mut replies, receivers);
                    None
                }
                Effect::Get { db, key } => {
                    self.resp.as_ref().map(|core| match core.state.cache.get(db, &key, now.mono_ms) {
                        Some(v) => codec::bulk(&v),
                        None => Bytes::from_static(codec::NIL),
                    })
                }
                Effect::Set { db, key, value, ttl_ms } => self.resp.as_ref().map(|core| {
                    match core.state.cache.set(db, key, value, ttl_ms, now.mono_ms) {
                        Ok(()) => codec::simple("OK"),
                        Err(e) => codec::error(&e.to_string()),
                    }
                }),
                Effect::Channels { pattern } => self.resp.as_ref().map(|core| {
                    let mut names: Vec<Bytes> = core
                        .state
                        .channels
                        .counts()
                        .into_iter()
                        .filter(|(n, count)| {
                            *count > 0
                                && pattern.as_ref().is_none_or(|p| crate::resp::session::glob_match(p, n))
                        })
                        .map(|(n, _)| n)
                        .collect();
                    names.sort();
                    let mut b = BytesMut::new();
                    b.extend_from_slice(format!("*{}\r\n", names.len()).as_bytes());
                    for n in &names {
                        codec::put_bulk(&mut b, n);
                    }
                    b.freeze()
                }),
                Effect::Name(name) => {
                    if let Some(c) = self.conns.get_mut(id) {
                        let peer = c.resp.as_ref().map(|r| r.peer.clone());
                        c.name = name.map(|n| String::from_utf8_lossy(&n).into_owned()).or(peer);
                    }
                    None
                }
                Effect::Close => {
                    close = true;
                    None
                }
            };
            if let Some(bytes) = reply {
                replies.extend_from_slice(&bytes);
            }
        }
        let mut any = false;
        if !replies.is_empty() {
            if let Some(c) = self.conns.get_mut(id) {
                c.outbox.push_private(head, replies.freeze(), REPLY_WORD);
                any = true;
            }
        }
        if !relay.is_empty() {
            self.outputs.push_back(HubOutput::Upstream(UpstreamCmd::RedisPublish(relay.freeze())));
        }
        if frames.len() >= PUBLISH_BATCH_BYTES {
            // A turn that reads this much cuts a batch now (in order: the outputs queue goes
            // out before what is still pending), so batches stay bounded.
            self.outputs.push_back(cut_published(&mut frames, &mut metas));
        }
        if let Some(core) = self.resp.as_mut() {
            core.effects = effects;
            core.pending_frames = frames;
            core.pending_metas = metas;
        }
        if close {
            self.close_resp(id, CloseReason::ConnectionDone, now);
        } else if any {
            self.wake(id, head, now);
            self.resp_enforce_bounds(id, now);
        }
    }

    /// Registers a subscription from log line `head` on; `None`, or the error reply if the
    /// channel table is full.
    fn resp_subscribe(&mut self, id: ConnId, name: &Bytes, head: Seq) -> Option<Bytes> {
        let core = self.resp.as_mut()?;
        let channel = match core.names.get(name) {
            Some(c) => Arc::clone(c),
            None => {
                let Some(c) = core.state.channels.get(name, true) else {
                    return Some(codec::error("ERR replhub: too many channels"));
                };
                core.names.insert(name.clone(), Arc::clone(&c));
                c
            }
        };
        let c = self.conns.get_mut(id)?;
        let r = c.resp.as_mut()?;
        channel.add();
        let at = c.subs.channels.partition_point(|&(ch, _)| ch < channel.id());
        c.subs.channels.insert(at, (channel.id(), head.0));
        core.subs.entry(channel.id()).or_default().push(id);
        r.channels.insert(channel.id(), channel);
        c.phase = ConnPhase::Subscribed;
        None
    }

    fn resp_unsubscribe(&mut self, id: ConnId, name: &Bytes) {
        let Some(core) = self.resp.as_mut() else { return };
        let Some(channel) = core.names.get(name) else { return };
        let cid = channel.id();
        let Some(c) = self.conns.get_mut(id) else { return };
        let Some(r) = c.resp.as_mut() else { return };
        let Some(channel) = r.channels.remove(&cid) else { return };
        channel.remove();
        if let Ok(i) = c.subs.channels.binary_search_by_key(&cid, |&(ch, _)| ch) {
            c.subs.channels.remove(i);
        }
        if c.subs.channels.is_empty() {
            c.phase = ConnPhase::Connected;
        }
        if let Some(list) = core.subs.get_mut(&cid) {
            list.retain(|&x| x != id);
        }
    }

    /// A RESP connection is gone: its subscriptions go, and the core's count of RESP
    /// connections.
    pub(super) fn resp_gone(&mut self, id: ConnId) {
        if self.conns.get(id).is_some_and(|c| c.resp.is_some()) {
            self.resp_forget(id);
            if let Some(core) = self.resp.as_mut() {
                core.conns -= 1;
            }
        }
    }

    /// Drops every channel subscription of `id` (closing, or gone).
    pub(super) fn resp_forget(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else { return };
        let Some(r) = c.resp.as_mut() else { return };
        c.subs.channels.clear();
        let channels = std::mem::take(&mut r.channels);
        for ch in channels.into_values() {
            ch.remove();
            if let Some(list) = self.resp.as_mut().and_then(|core| core.subs.get_mut(&ch.id())) {
                list.retain(|&x| x != id);
            }
        }
    }

    /// Frames one message into this read's batch, or, on a channel bridged to a real Redis,
    /// into the PUBLISH commands for it; returns the receiver count for the reply (local
    /// subscribers only, for a bridged channel). A channel with no subscriber anywhere takes no frame
    /// (Redis drops such a message too).
    fn resp_publish(
        &mut self,
        name: &Bytes,
        payload: &[u8],
        frames: &mut BytesMut,
        metas: &mut Vec<LineMeta>,
        relay: &mut BytesMut,
    ) -> i64 {
        let Some(core) = self.resp.as_mut() else { return 0 };
        let channel = match core.names.get(name) {
            Some(c) => Some(Arc::clone(c)),
            None => {
                let c = core.state.channels.get(name, false);
                if let Some(c) = &c {
                    core.names.insert(name.clone(), Arc::clone(c));
                }
                c
            }
        };
        if core.state.upstream_channels.contains(name) {
            codec::put_command(relay, &[b"PUBLISH", name, payload]);
            core.published += 1;
            let receivers = channel.as_ref().map_or(0, |c| c.subscribers());
            return i64::try_from(receivers).unwrap_or(i64::MAX);
        }
        let Some(channel) = channel else { return 0 };
        let receivers = channel.subscribers();
        if receivers == 0 {
            return 0;
        }
        let start = frames.len();
        codec::put_message(frames, name, payload);
        if let (Ok(start), Ok(end)) = (u32::try_from(start), u32::try_from(frames.len())) {
            metas.push(LineMeta::pubsub(start, end, channel.id()));
        }
        core.published += 1;
        if let Some((stream, instance)) = rdata_key(payload) {
            // One lookup per map for a pair seen before (every message but the first).
            let counted = core.rdata.get_mut(stream).and_then(|by| by.get_mut(instance)).map(|n| *n += 1);
            if counted.is_none() {
                let (stream, instance) =
                    if core.rdata_keys < MAX_RDATA_KEYS { (stream, instance) } else { ("other", "other") };
                let n = core.rdata.entry(stream.into()).or_default().entry(instance.into()).or_insert_with(
                    || {
                        core.rdata_keys += 1;
                        0
                    },
                );
                *n += 1;
            }
        }
        i64::try_from(receivers).unwrap_or(i64::MAX)
    }

    /// Closes a RESP connection once what is queued is written: no more channels, no
    /// message (Redis just closes). The replication session times the close linger.
    pub(super) fn close_resp(&mut self, id: ConnId, reason: CloseReason, now: Now) {
        self.resp_forget(id);
        let head = self.log.head();
        let Some(c) = self.conns.get_mut(id) else { return };
        c.close.decide(reason);
        c.phase = ConnPhase::Closing;
        c.session.close(now);
        self.wake(id, head, now);
    }

    /// A RESP connection over its output limits, or past the queued-replies bound, is cut off
    /// as Redis's `client-output-buffer-limit` does: backlog dropped, socket closed.
    pub(super) fn resp_evict(&mut self, id: ConnId, reason: EvictReason, now: Now) {
        let backlog = self.backlog_bytes(id).unwrap_or(0);
        let Some(c) = self.conns.get_mut(id) else { return };
        if c.close.is_closing() {
            return;
        }
        tracing::warn!(conn = %id, name = c.display_name(), backlog, "redis client over its output limit, disconnected");
        self.stats.evictions[reason as usize] += 1;
        c.close.decide(CloseReason::SlowConsumer);
        c.outbox.detach(&mut self.log);
        self.close_resp(id, CloseReason::SlowConsumer, now);
    }

    /// The output limits and the queued-replies bound, after a client's input.
    fn resp_enforce_bounds(&mut self, id: ConnId, now: Now) {
        if self.resp_over_limits(id, now) {
            self.resp_evict(id, EvictReason::Backlog, now);
        }
    }

    /// Whether `id` breaks its output limits now (updating its soft-limit clock).
    pub(super) fn resp_over_limits(&mut self, id: ConnId, now: Now) -> bool {
        let Some(limits) = self.resp.as_ref().map(|r| r.state.output) else { return false };
        let Some(c) = self.conns.get_mut(id) else { return false };
        if c.close.is_closing() {
            return false;
        }
        let backlog = c.outbox.backlog_bytes(&self.log);
        let over_count = c.outbox.private_lines() > MAX_QUEUED_COMMANDS * 10
            || c.outbox.private_bytes() > MAX_QUEUED_BYTES.max(limits.hard);
        let Some(r) = c.resp.as_mut() else { return false };
        over_count || limits.exceeded(backlog, &mut r.soft_since, now.mono_ms)
    }

    /// Wakes this core's subscribers of `channel` for log lines from `first` on.
    pub(super) fn resp_wake_channel(&mut self, channel: u32, first: Seq, now: Now) {
        let Some(core) = self.resp.as_ref() else { return };
        let Some(list) = core.subs.get(&channel) else { return };
        for &id in list {
            let Some(c) = self.conns.get_mut(id) else { continue };
            if c.outbox.wake(&mut self.log, first, now.mono_ms, c.close.emitted()) {
                self.dirty.push(id, c);
            }
        }
    }

    /// `batches` batches of messages on `channels` never reached this core (the source's
    /// queue for it was at its bound while it took no messages). Every subscriber of those
    /// channels here missed some: each is cut off as one over its output limit, silently as
    /// Redis does, so that a client never goes on as if it had them all.
    pub fn on_publish_lost(&mut self, channels: &[u32], batches: u64, now: Now) {
        let Some(core) = self.resp.as_mut() else { return };
        core.batches_dropped += batches;
        let mut ids: Vec<ConnId> =
            channels.iter().filter_map(|ch| core.subs.get(ch)).flatten().copied().collect();
        ids.sort_unstable_by_key(|id| (id.index, id.gen));
        ids.dedup();
        tracing::warn!(
            batches,
            channels = channels.len(),
            subscribers = ids.len(),
            "redis messages were dropped for this core: cutting off their subscribers"
        );
        for id in ids {
            self.resp_evict(id, EvictReason::Backlog, now);
        }
    }

    /// What this core's RESP clients published, for the scrape.
    pub(super) fn resp_stats(&self) -> super::stats::RespStats {
        let Some(core) = self.resp.as_ref() else { return super::stats::RespStats::default() };
        let mut rdata: Vec<(String, String, u64)> = core
            .rdata
            .iter()
            .flat_map(|(s, by)| by.iter().map(move |(i, n)| (s.to_string(), i.to_string(), *n)))
            .collect();
        rdata.sort();
        super::stats::RespStats { published: core.published, rdata, batches_dropped: core.batches_dropped }
    }

    /// The hard output limit, while this core has RESP connections: the log size at which a
    /// batch triggers the sweep (without them, the workers' own threshold stands).
    pub(super) fn resp_hard_limit(&self) -> Option<u64> {
        self.resp.as_ref().filter(|r| r.conns > 0).map(|r| r.state.output.hard).filter(|&h| h > 0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::sim::{Capacity, Sim};
    use super::super::{HubConfig, UpstreamCmd};
    use crate::proto::{StreamId, Token};
    use crate::resp::{OutputLimits, RespConfig, RespState};

    fn cmd(args: &[&str]) -> Vec<u8> {
        let mut b = bytes::BytesMut::new();
        crate::resp::codec::put_command(&mut b, &args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>());
        b.to_vec()
    }

    fn sim_with(config: RespConfig) -> Sim {
        let mut sim = Sim::new(HubConfig { server_name: Some("sn".into()), ..HubConfig::default() });
        sim.hub.set_resp(Arc::new(RespState::new(&config)));
        sim
    }

    fn received(sim: &mut Sim, id: super::ConnId) -> String {
        let c = sim.conns.get_mut(&id).expect("conn");
        String::from_utf8_lossy(&std::mem::take(&mut c.received)).into_owned()
    }

    /// The Publish batches among commands for the upstream, in order.
    fn publishes(cmds: &[UpstreamCmd]) -> Vec<Arc<super::Batch>> {
        cmds.iter()
            .filter_map(|c| match c {
                UpstreamCmd::Publish(b) => Some(Arc::clone(&b.0)),
                _ => None,
            })
            .collect()
    }

    /// What the driver does with a core's Publish: hand the batch to the cores (this one).
    fn deliver_published(sim: &mut Sim) -> usize {
        let published = publishes(&std::mem::take(&mut sim.upstream));
        for b in &published {
            sim.hub.on_batch(Arc::clone(b), sim.now);
        }
        sim.flush();
        published.len()
    }

    #[test]
    fn one_read_of_publishes_is_one_batch_and_every_subscriber_gets_the_same_bytes() {
        let mut sim = sim_with(RespConfig::default());
        let a = sim.accept_resp("127.0.0.1:1");
        let b = sim.accept_resp("127.0.0.1:2");
        let other = sim.accept_resp("127.0.0.1:3");
        let p = sim.accept_resp("127.0.0.1:4");
        for id in [a, b] {
            sim.send_raw(id, &cmd(&["SUBSCRIBE", "sn"]));
            assert_eq!(received(&mut sim, id), "*3\r\n$9\r\nsubscribe\r\n$2\r\nsn\r\n:1\r\n");
        }
        sim.send_raw(other, &cmd(&["SUBSCRIBE", "elsewhere"]));
        received(&mut sim, other);
        let mut pipelined = cmd(&["PUBLISH", "sn", "REPLICATE "]);
        pipelined.extend(cmd(&["PUBLISH", "nobody", "x"]));
        pipelined.extend(cmd(&["PUBLISH", "sn", "POSITION events master 1 2"]));
        sim.send_raw(p, &pipelined);
        assert_eq!(received(&mut sim, p), ":2\r\n:0\r\n:2\r\n");
        let batch = match &sim.upstream[..] {
            [UpstreamCmd::Publish(batch)] => Arc::clone(&batch.0),
            other => panic!("one batch expected, got {other:?}"),
        };
        assert_eq!(batch.lines().len(), 2, "a message nobody subscribes to takes no frame");
        // The subscribers' writes point into the batch itself: framed once, never copied.
        sim.upstream.clear();
        sim.hub.on_batch(Arc::clone(&batch), sim.now);
        let mut ids = Vec::new();
        sim.hub.take_dirty(&mut ids);
        assert_eq!(ids.len(), 2, "only the subscribers of `sn` are woken");
        let range = batch.data().as_ptr_range();
        for &id in &ids {
            let mut iov = Vec::new();
            let n = sim.hub.gather(id, &mut iov);
            assert_eq!(n, batch.data().len());
            assert!(iov.iter().all(|s| range.contains(&s.as_ptr())));
            drop(iov);
            sim.hub.on_written(id, n, sim.now);
        }
        let want = "*3\r\n$7\r\nmessage\r\n$2\r\nsn\r\n$10\r\nREPLICATE \r\n\
                    *3\r\n$7\r\nmessage\r\n$2\r\nsn\r\n$26\r\nPOSITION events master 1 2\r\n";
        assert_eq!(batch.data(), want.as_bytes());
    }

    #[test]
    fn a_turn_of_reads_from_several_publishers_is_one_batch_in_read_order() {
        let mut sim = sim_with(RespConfig::default());
        let s = sim.accept_resp("s");
        let [p, q] = ["p", "q"].map(|peer| sim.accept_resp(peer));
        sim.send_raw(s, &cmd(&["SUBSCRIBE", "sn"]));
        received(&mut sim, s);
        // Three reads (a driver may hand a fast publisher's bytes over 4 KiB at a time), one of
        // them ending mid-command, before the driver polls the outputs: one batch.
        let mut second = cmd(&["PUBLISH", "sn", "p2"]);
        let tail = second.split_off(7);
        for (id, bytes) in
            [(p, cmd(&["PUBLISH", "sn", "p1"])), (q, cmd(&["PUBLISH", "sn", "q1"])), (p, second)]
        {
            sim.hub.on_bytes(id, &bytes, sim.now);
        }
        sim.hub.on_bytes(p, &tail, sim.now);
        sim.flush();
        let batches = publishes(&sim.upstream);
        assert_eq!(batches.len(), 1, "one batch per poll of the outputs");
        let text = String::from_utf8_lossy(batches[0].data()).into_owned();
        let order: Vec<_> = ["p1", "q1", "p2"].iter().map(|m| text.find(m).expect("every message")).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "read order kept: {text:?}");
        // Nothing published since: no empty batch.
        sim.upstream.clear();
        sim.flush();
        assert!(sim.upstream.is_empty());
        // A read past the cut size is cut at once, and what follows it comes after it.
        let big = "x".repeat(super::PUBLISH_BATCH_BYTES);
        sim.hub.on_bytes(p, &cmd(&["PUBLISH", "sn", &big]), sim.now);
        sim.hub.on_bytes(q, &cmd(&["PUBLISH", "sn", "after"]), sim.now);
        sim.flush();
        let sizes: Vec<_> = publishes(&sim.upstream).iter().map(|b| b.data().len()).collect();
        assert_eq!(sizes.len(), 2);
        assert!(sizes[0] > super::PUBLISH_BATCH_BYTES && sizes[1] < 100, "{sizes:?}");
        assert_eq!(deliver_published(&mut sim), 2);
        let got = received(&mut sim, s);
        assert!(got.find(&big).expect("the big one") < got.find("after").expect("the small one"));
    }

    #[test]
    fn replies_and_messages_keep_their_order_and_unsubscribed_lines_are_skipped() {
        let mut sim = sim_with(RespConfig::default());
        let s = sim.accept_resp("s");
        let p = sim.accept_resp("p");
        sim.send_raw(s, &cmd(&["SUBSCRIBE", "a", "b"]));
        received(&mut sim, s);
        sim.send_raw(p, &cmd(&["PUBLISH", "a", "1"]));
        sim.send_raw(p, &cmd(&["PUBLISH", "b", "2"]));
        // The subscriber's PING is answered before the messages reach its core.
        sim.send_raw(s, &cmd(&["PING"]));
        sim.send_raw(s, &cmd(&["UNSUBSCRIBE", "b"]));
        assert_eq!(deliver_published(&mut sim), 2);
        assert_eq!(
            received(&mut sim, s),
            "*2\r\n$4\r\npong\r\n$0\r\n\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:1\r\n\
             *3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\n1\r\n"
        );
    }

    #[test]
    fn workers_never_see_redis_messages_and_redis_clients_never_see_rdata() {
        let mut sim = sim_with(RespConfig::default());
        sim.connect_upstream("sn", Sim::positions());
        let w = sim.accept();
        sim.send(w, "NAME w\nREPLICATE ALL");
        sim.take_lines(w);
        let s = sim.accept_resp("s");
        sim.send_raw(s, &cmd(&["SUBSCRIBE", "sn"]));
        received(&mut sim, s);
        let p = sim.accept_resp("p");
        sim.send_raw(p, &cmd(&["PUBLISH", "sn", "hello"]));
        deliver_published(&mut sim);
        sim.batch(&[(StreamId::Events, Token::Value(500))]);
        let lines = sim.take_lines(w);
        assert!(lines.iter().all(|l| !l.contains("hello")), "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("RDATA events 500")), "{lines:?}");
        assert_eq!(received(&mut sim, s), "*3\r\n$7\r\nmessage\r\n$2\r\nsn\r\n$5\r\nhello\r\n");
    }

    fn evictions(sim: &Sim) -> u64 {
        sim.hub.stats().evictions.iter().sum()
    }

    #[test]
    fn a_stalled_subscriber_is_cut_off_silently_at_the_hard_limit() {
        let output = OutputLimits { hard: 4096, soft: 0, soft_ms: 0 };
        let mut sim = sim_with(RespConfig { output, ..RespConfig::default() });
        let stalled = sim.accept_resp("stalled");
        let reader = sim.accept_resp("reader");
        let p = sim.accept_resp("p");
        for id in [stalled, reader] {
            sim.send_raw(id, &cmd(&["SUBSCRIBE", "sn"]));
            received(&mut sim, id);
        }
        sim.set_capacity(stalled, Capacity::Stalled);
        let payload = "x".repeat(1000);
        for _ in 0..3 {
            sim.send_raw(p, &cmd(&["PUBLISH", "sn", &payload]));
            deliver_published(&mut sim);
        }
        assert_eq!(evictions(&sim), 0, "under the hard limit");
        for _ in 0..3 {
            sim.send_raw(p, &cmd(&["PUBLISH", "sn", &payload]));
            deliver_published(&mut sim);
        }
        assert_eq!(evictions(&sim), 1, "over the hard limit");
        assert_eq!(received(&mut sim, reader).matches("message").count(), 6, "the reader got everything");
        sim.send_raw(p, &cmd(&["PUBLISH", "sn", "after"]));
        assert!(received(&mut sim, p).ends_with(":1\r\n"), "the stalled one is unsubscribed at once");
        // Nothing more is queued for it (no error either, as Redis); its socket never drains,
        // so the close linger ends it.
        sim.advance(30_000);
        assert!(sim.closed(stalled).is_some());
        assert_eq!(received(&mut sim, stalled), "");
        assert!(sim.closed(reader).is_none());
    }

    #[test]
    fn messages_lost_for_the_core_cut_off_their_channels_subscribers_only() {
        let mut sim = sim_with(RespConfig::default());
        let lost = sim.accept_resp("lost");
        let other = sim.accept_resp("other");
        sim.send_raw(lost, &cmd(&["SUBSCRIBE", "a", "b"]));
        sim.send_raw(other, &cmd(&["SUBSCRIBE", "b"]));
        received(&mut sim, lost);
        received(&mut sim, other);
        let a =
            sim.hub.resp.as_ref().and_then(|r| r.names.get(&bytes::Bytes::from_static(b"a"))).unwrap().id();
        sim.hub.on_publish_lost(&[a], 3, sim.now);
        sim.flush();
        assert_eq!(evictions(&sim), 1);
        assert_eq!(sim.hub.resp_stats().batches_dropped, 3);
        // The subscriber of `a` goes without a word, as Redis cuts off a client over its limit;
        // the other one stays subscribed to `b`.
        sim.advance(30_000);
        assert!(sim.closed(lost).is_some());
        assert_eq!(received(&mut sim, lost), "");
        assert!(sim.closed(other).is_none());
        let p = sim.accept_resp("p");
        sim.send_raw(p, &cmd(&["PUBLISH", "b", "x"]));
        assert_eq!(received(&mut sim, p), ":1\r\n");
    }

    /// A publisher wants none of the messages its core's log holds between its replies: a
    /// write of replies that ends before the head moves its cursor past them all the same,
    /// so it neither walks them again nor holds them as its backlog.
    #[test]
    fn a_publishers_cursor_follows_its_replies() {
        let mut sim =
            Sim::new(HubConfig { server_name: Some("sn".into()), max_iov: 2, ..HubConfig::default() });
        sim.hub.set_resp(Arc::new(RespState::new(&RespConfig::default())));
        let s = sim.accept_resp("s");
        let p = sim.accept_resp("p");
        sim.send_raw(s, &cmd(&["SUBSCRIBE", "c"]));
        received(&mut sim, s);
        // Four reads of one PUBLISH each, every batch on the log before the next read, and no
        // write in between: replies at log lines 0, 1, 2 and 3.
        for i in 0..4 {
            sim.hub.on_bytes(p, &cmd(&["PUBLISH", "c", &format!("m{i}")]), sim.now);
            while let Some(out) = sim.hub.poll_output() {
                if let super::super::HubOutput::Upstream(UpstreamCmd::Publish(b)) = out {
                    sim.hub.on_batch(b.0, sim.now);
                }
            }
        }
        let mut ids = Vec::new();
        sim.hub.take_dirty(&mut ids);
        assert!(ids.contains(&p));
        let mut iov = Vec::new();
        let n = sim.hub.gather(p, &mut iov);
        assert_eq!(iov.len(), 2, "two replies, the most one write takes here");
        drop(iov);
        sim.hub.on_written(p, n, sim.now);
        let c = sim.hub.conns.get(p).expect("publisher");
        let line = sim.hub.log.head_byte() / 4;
        assert_eq!(
            c.outbox.log_behind(&sim.hub.log),
            3 * line,
            "the cursor stands at the second reply's place (line 1), not at line 0"
        );
    }

    #[test]
    fn the_soft_limit_holds_for_its_duration() {
        let output = OutputLimits { hard: 0, soft: 1024, soft_ms: 1_000 };
        let mut sim = sim_with(RespConfig { output, ..RespConfig::default() });
        let s = sim.accept_resp("s");
        let p = sim.accept_resp("p");
        sim.send_raw(s, &cmd(&["SUBSCRIBE", "sn"]));
        received(&mut sim, s);
        sim.set_capacity(s, Capacity::Stalled);
        sim.send_raw(p, &cmd(&["PUBLISH", "sn", &"x".repeat(2000)]));
        deliver_published(&mut sim);
        sim.advance(900);
        assert_eq!(evictions(&sim), 0, "over the soft limit for less than its duration");
        sim.advance(300);
        assert_eq!(evictions(&sim), 1, "over the soft limit for longer");
    }

    #[test]
    fn rdata_is_keyed_by_stream_and_instance_in_both_forms() {
        assert_eq!(super::rdata_key(b"RDATA events master 12 [1]"), Some(("events", "master")));
        assert_eq!(super::rdata_key(b"RDATA events w1 batch [1]"), Some(("events", "w1")));
        assert_eq!(super::rdata_key(b"RDATA events 12 [\"x y\"]"), Some(("events", "")));
        assert_eq!(super::rdata_key(b"RDATA events batch [1]"), Some(("events", "")));
        assert_eq!(super::rdata_key(b"RDATA events w1 [1]"), None);
        assert_eq!(super::rdata_key(b"POSITION events master 1 2"), None);
    }

    #[test]
    fn quit_writes_its_reply_then_closes() {
        let mut sim = sim_with(RespConfig::default());
        let c = sim.accept_resp("c");
        sim.send_raw(c, b"PING\r\n*1\r\n$4\r\nQUIT\r\nPING\r\n");
        assert_eq!(received(&mut sim, c), "+PONG\r\n+OK\r\n");
        assert!(sim.closed(c).is_some());
    }
}
