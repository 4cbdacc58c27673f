//! A deterministic harness that drives a [`Hub`] the way a driver does, with a fake clock and
//! fake sockets whose write capacity the test controls. Used by the hub's unit and property
//! tests and by the fan-out benchmark's correctness check.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;

use super::{
    Batch, CloseHow, ConnId, Hub, HubConfig, HubOutput, LineMeta, UpstreamCmd, UpstreamEvent, BROADCAST,
};
use crate::proto::{StreamId, Token};
use crate::session::SessionConfig;
use crate::time::Now;

/// How much a fake socket accepts per write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    /// Everything.
    Unlimited,
    /// At most this many bytes per write (then the socket is "full" until the next flush).
    PerWrite(usize),
    /// Nothing: a stalled reader.
    Stalled,
    /// This many bytes on the next write, then stalled.
    ThenStall(usize),
}

/// One fake worker socket.
#[derive(Debug)]
pub struct FakeConn {
    /// Bytes the hub wrote to it.
    pub received: Vec<u8>,
    /// Write capacity.
    pub capacity: Capacity,
    /// How the hub closed it, if it did.
    pub closed: Option<CloseHow>,
    /// The hub asked for writability.
    pub blocked: bool,
}

/// The harness.
pub struct Sim {
    /// The hub under test.
    pub hub: Hub,
    /// The fake clock.
    pub now: Now,
    /// Fake sockets by connection.
    pub conns: BTreeMap<ConnId, FakeConn>,
    /// Commands the hub sent upstream.
    pub upstream: Vec<UpstreamCmd>,
    /// Line count per batch built by [`Sim::batch`].
    pub batches: usize,
    dirty: Vec<ConnId>,
    iov_budget: usize,
    /// Peers that never answer our FIN: a graceful close leaves their socket open.
    pub peers_ignore_fin: bool,
}

impl Sim {
    /// A harness around a fresh hub.
    pub fn new(config: HubConfig) -> Self {
        Self {
            hub: Hub::new(config),
            now: Now::new(1_000, 1_600_000_000_000),
            conns: BTreeMap::new(),
            upstream: Vec::new(),
            batches: 0,
            dirty: Vec::new(),
            iov_budget: 0,
            peers_ignore_fin: false,
        }
    }

    /// The hub configuration of the unit tests: `max_pending_bytes` as given, a 2 s write
    /// timeout and the session timings spelled out (5 s pings, 25 s ping and close timeouts,
    /// 16 KiB lines), so that a change to a default does not silently move the tests.
    pub fn test_config(max_pending_bytes: u64) -> HubConfig {
        HubConfig {
            max_pending_bytes,
            write_timeout_ms: 2_000,
            session: SessionConfig {
                ping_interval_ms: 5_000,
                ping_timeout_ms: 25_000,
                close_timeout_ms: 25_000,
                max_line_len: 16384,
            },
            ..HubConfig::default()
        }
    }

    /// The default upstream positions: stream `i` at token `100 + i`.
    pub fn positions() -> [Option<i64>; StreamId::COUNT] {
        std::array::from_fn(|i| Some(100 + i as i64))
    }

    /// The upstream (a seed master) connects with `positions`.
    pub fn connect_upstream(&mut self, name: &str, positions: [Option<i64>; StreamId::COUNT]) {
        self.connect_upstream_as(name, positions, crate::proto::Generation::Seed);
    }

    /// An upstream of `generation`, instance `master`, connects with `positions`.
    pub fn connect_upstream_as(
        &mut self,
        name: &str,
        positions: [Option<i64>; StreamId::COUNT],
        generation: crate::proto::Generation,
    ) {
        self.hub.on_upstream(&Self::connected(name, positions, generation), self.now);
        self.flush();
    }

    /// The event of an upstream of `generation`, instance `master`, connecting with
    /// `positions` (for a hub outside the harness).
    pub fn connected(
        name: &str,
        positions: [Option<i64>; StreamId::COUNT],
        generation: crate::proto::Generation,
    ) -> UpstreamEvent {
        UpstreamEvent::Connected {
            server_name: name.to_owned(),
            positions,
            generation,
            instance: "master".to_owned(),
        }
    }

    /// A worker connects.
    pub fn accept(&mut self) -> ConnId {
        let id = self.hub.accept(self.now);
        self.conns.insert(
            id,
            FakeConn { received: Vec::new(), capacity: Capacity::Unlimited, closed: None, blocked: false },
        );
        self.flush();
        id
    }

    /// A Redis-mode client connects (the hub must have Redis mode on, [`Hub::set_resp`]).
    pub fn accept_resp(&mut self, peer: &str) -> ConnId {
        let id = self.hub.accept_resp(peer.to_owned(), self.now);
        self.conns.insert(
            id,
            FakeConn { received: Vec::new(), capacity: Capacity::Unlimited, closed: None, blocked: false },
        );
        self.flush();
        id
    }

    /// A worker sends `text` (lines separated by `\n`, a final `\n` added).
    pub fn send(&mut self, id: ConnId, text: &str) {
        let mut data = text.as_bytes().to_vec();
        data.push(b'\n');
        self.hub.on_bytes(id, &data, self.now);
        self.flush();
    }

    /// Raw bytes from a worker.
    pub fn send_raw(&mut self, id: ConnId, data: &[u8]) {
        self.hub.on_bytes(id, data, self.now);
        self.flush();
    }

    /// The worker's socket closes (EOF).
    pub fn disconnect(&mut self, id: ConnId) {
        self.hub.on_peer_closed(id, false, self.now);
        self.conns.remove(&id);
        self.flush();
    }

    /// Sets a socket's capacity; unblocks it if it now accepts bytes.
    pub fn set_capacity(&mut self, id: ConnId, capacity: Capacity) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.capacity = capacity;
            if capacity != Capacity::Stalled && c.blocked {
                c.blocked = false;
                self.hub.on_writable(id);
            }
        }
        self.flush();
    }

    /// Moves the clock and runs the timers.
    pub fn advance(&mut self, ms: u64) {
        let target = self.now.mono_ms + ms;
        while self.now.mono_ms < target {
            let step = (self.hub.poll_timeout().max(self.now.mono_ms + 1)).min(target) - self.now.mono_ms;
            self.now = self.now.plus_ms(step);
            self.hub.handle_timeout(self.now);
            self.flush();
            // Blocked sockets that accept bytes again (capacity is per write) become writable.
            let ids: Vec<ConnId> = self
                .conns
                .iter()
                .filter(|(_, c)| c.blocked && c.capacity != Capacity::Stalled)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.blocked = false;
                }
                self.hub.on_writable(id);
            }
            self.flush();
        }
    }

    /// Appends RDATA lines (`(stream, token)` with a generated row) as one upstream batch.
    pub fn batch(&mut self, rows: &[(StreamId, Token)]) -> Vec<Bytes> {
        let lines = self.append(rows);
        self.flush();
        lines
    }

    /// [`Sim::batch`] without the write loop after it: the woken connections stay in the
    /// hub's dirty list.
    pub fn append(&mut self, rows: &[(StreamId, Token)]) -> Vec<Bytes> {
        let mut data = Vec::new();
        let mut metas = Vec::new();
        for (k, (stream, token)) in rows.iter().enumerate() {
            let start = data.len() as u32;
            let tok = match token {
                Token::Batch => "batch".to_owned(),
                Token::Value(t) => t.to_string(),
            };
            let line = format!("RDATA {} {} [\"row\", {}, {}]\n", stream.name(), tok, self.batches, k);
            data.extend_from_slice(line.as_bytes());
            metas.push(LineMeta {
                start,
                end: data.len() as u32,
                stream: *stream as u8,
                token: match token {
                    Token::Batch => None,
                    Token::Value(t) => Some(*t),
                },
            });
        }
        self.batches += 1;
        let batch = Arc::new(Batch::new(Bytes::from(data), metas));
        let lines = (0..batch.lines().len()).map(|i| Bytes::copy_from_slice(batch.line(i))).collect();
        self.hub.on_batch(batch, self.now);
        lines
    }

    /// Appends a broadcast line (REMOTE_SERVER_UP) as its own batch.
    pub fn broadcast(&mut self, line: &str) {
        let data = Bytes::from(format!("{line}\n"));
        let meta = LineMeta { start: 0, end: data.len() as u32, stream: BROADCAST, token: None };
        self.hub.on_batch(Arc::new(Batch::new(data, vec![meta])), self.now);
        self.flush();
    }

    /// Runs the driver's write loop until nothing is left to do.
    pub fn flush(&mut self) {
        loop {
            self.drain_outputs();
            self.dirty.clear();
            self.hub.take_dirty(&mut self.dirty);
            if self.dirty.is_empty() {
                break;
            }
            let ids = std::mem::take(&mut self.dirty);
            for &id in &ids {
                self.write_once(id);
            }
            self.dirty = ids;
        }
        self.drain_outputs();
    }

    fn write_once(&mut self, id: ConnId) {
        let capacity = match self.conns.get(&id) {
            Some(c) => c.capacity,
            None => Capacity::Unlimited,
        };
        let mut iov = Vec::new();
        let total = self.hub.gather(id, &mut iov);
        self.iov_budget = self.iov_budget.max(iov.len());
        if total == 0 {
            return;
        }
        let allowed = match capacity {
            Capacity::Unlimited => total,
            Capacity::PerWrite(n) => n.min(total),
            Capacity::Stalled => 0,
            Capacity::ThenStall(n) => n.min(total),
        };
        let mut written = Vec::with_capacity(allowed);
        for s in &iov {
            let room = allowed - written.len();
            written.extend_from_slice(&s[..s.len().min(room)]);
            if written.len() == allowed {
                break;
            }
        }
        drop(iov);
        let mut writable_again = false;
        if let Some(c) = self.conns.get_mut(&id) {
            if let Capacity::ThenStall(_) = capacity {
                c.capacity = Capacity::Stalled;
            }
            let capacity = c.capacity;
            c.received.extend_from_slice(&written);
            if allowed < total {
                // A per-write limit drains at once (like a kernel that took what fit); a
                // stalled socket stays full.
                c.blocked = capacity == Capacity::Stalled;
                writable_again = !c.blocked;
            }
        }
        self.hub.on_written(id, allowed, self.now);
        if writable_again {
            self.hub.on_writable(id);
        }
    }

    fn drain_outputs(&mut self) {
        while let Some(out) = self.hub.poll_output() {
            match out {
                HubOutput::Close { conn, how } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.closed = Some(how);
                    }
                    // The driver closes the socket and reports it gone (after the peer's EOF
                    // for a graceful close).
                    if how == CloseHow::Abort || !self.peers_ignore_fin {
                        self.hub.on_peer_closed(conn, false, self.now);
                    }
                }
                HubOutput::Upstream(cmd) => self.upstream.push(cmd),
            }
        }
    }

    /// The lines a worker received so far (without `\n`), and clears them.
    pub fn take_lines(&mut self, id: ConnId) -> Vec<String> {
        let Some(c) = self.conns.get_mut(&id) else { return Vec::new() };
        let text = String::from_utf8_lossy(&c.received).into_owned();
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        let lines = text[..complete].lines().map(str::to_owned).collect();
        c.received.drain(..complete);
        lines
    }

    /// Whether the hub closed the worker's socket, and how.
    pub fn closed(&self, id: ConnId) -> Option<CloseHow> {
        self.conns.get(&id).and_then(|c| c.closed)
    }

    /// Most iovecs seen in one gather since the last reset.
    pub fn max_iov_seen(&self) -> usize {
        self.iov_budget
    }

    /// Resets [`Sim::max_iov_seen`].
    pub fn reset_iov_seen(&mut self) {
        self.iov_budget = 0;
    }

    /// Drains the commands for the upstream.
    pub fn take_upstream(&mut self) -> Vec<UpstreamCmd> {
        std::mem::take(&mut self.upstream)
    }

    /// Per-connection byte counters (for tests that check balance).
    pub fn received_bytes(&self) -> HashMap<ConnId, usize> {
        self.conns.iter().map(|(id, c)| (*id, c.received.len())).collect()
    }
}
