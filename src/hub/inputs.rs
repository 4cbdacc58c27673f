//! Inputs from workers: accepting a connection, greeting it, and the commands it sends.
use bytes::{BufMut, BytesMut};

use super::conn::Conn;
use super::outbox::Outbox;
use super::slow_consumer::{slow_consumer_verdict, Progress, Rules, Verdict};
use super::stats::{CloseReason, ConnPhase, EvictReason};
use super::user_sync::Transition;
use super::{ConnId, Hub, HubOutput, UpstreamCmd, MAX_QUEUED_BYTES, MAX_QUEUED_COMMANDS};
use crate::proto::inbound::parse_args;
use crate::proto::{Command, CommandWord, Line, PeerError, Role, SyncState};
use crate::session::Session;
use crate::time::Now;

impl Hub {
    /// A worker connected. Greets it at once if the server name is known, otherwise as soon as
    /// the upstream tells it.
    pub fn accept(&mut self, now: Now) -> ConnId {
        let session = Session::new(Role::Server, self.config.session.clone(), now);
        let outbox = Outbox::new(self.log.head(), now.mono_ms);
        let id = self.conns.insert_with(|_| Box::new(Conn::new(session, outbox, now)));
        self.stats.accepted += 1;
        tracing::info!(conn = %id, name = "anon", "connection accepted");
        if self.shutting_down {
            self.fail(id, &PeerError::ShuttingDown, CloseReason::ConnectionAborted, now);
        } else if let Some(name) = self.server_name.clone() {
            self.greet(id, &name, now);
        }
        id
    }

    pub(super) fn greet(&mut self, id: ConnId, server_name: &str, now: Now) {
        let Some(c) = self.conn_mut(id) else { return };
        if c.session.is_started() || c.close.is_closing() || c.resp.is_some() {
            return;
        }
        c.session.start(server_name, &[], now);
        c.phase = ConnPhase::Connected;
        self.drain_session(id, now);
    }

    /// Bytes received from a worker.
    pub fn on_bytes(&mut self, id: ConnId, data: &[u8], now: Now) {
        let Some(c) = self.conn_mut(id) else { return };
        if c.resp.is_some() {
            self.resp_input(id, data, now);
            return;
        }
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
                    if word == CommandWord::Ping {
                        c.last_ping_ms = Some(now.mono_ms);
                    }
                    self.handle_command(id, word, &line, now);
                    self.enforce_bounds(id, now);
                }
                Err(err) => {
                    let name = c.display_name().to_owned();
                    tracing::info!(conn = %id, name, error = %err, "protocol error, closing");
                    c.close.decide(CloseReason::ProtocolError);
                    break;
                }
            }
        }
        self.drain_session(id, now);
    }

    /// The limits on what one connection may make the hub hold, checked after every command
    /// it sends (a worker that writes without reading must not get further than one command
    /// past them; the periodic sweep covers lines the hub queues on its own, like PING):
    /// more than [`MAX_QUEUED_COMMANDS`] private lines (or [`MAX_QUEUED_BYTES`]) unwritten, or a backlog (log held back
    /// plus private lines) over `max_pending_bytes`, evicts it with `ERROR Failed to keep up`.
    /// The eviction drops the queue, so the ERROR is the only line left to write.
    fn enforce_bounds(&mut self, id: ConnId, now: Now) {
        let Some(c) = self.conn(id) else { return };
        if c.close.is_closing() {
            return;
        }
        // A 1.10–1.12 worker's catch-up is bounded by the history instead (and by the backlog).
        let over_count = c.outbox.private_lines() > MAX_QUEUED_COMMANDS
            || c.outbox.private_bytes() - c.outbox.catch_up_bytes() > MAX_QUEUED_BYTES;
        // The backlog part is the sweep's rule: a worker whose socket is draining is not evicted
        // for the hub's own lag, up to the hard limit.
        let progress = Progress {
            backlog_bytes: c.outbox.backlog_bytes(&self.log),
            progress_ms: c.outbox.progress_ms(),
            waits_on_socket: c.outbox.waits_on_socket(),
        };
        let verdict = slow_consumer_verdict(progress, now.mono_ms, Rules::BacklogOnly, &self.config);
        if over_count || matches!(verdict, Verdict::Evict(_)) {
            if over_count {
                tracing::info!(conn = %id, name = c.display_name(), "too many commands queued");
            }
            self.evict(id, EvictReason::Backlog, now);
        }
    }

    fn handle_command(&mut self, id: ConnId, word: CommandWord, line: &Line, now: Now) {
        if self.handle_released_command(id, word, line, now) {
            return;
        }
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
            Command::Replicate(target) => {
                self.replicate(id, target, now);
                self.adopt_released_parse(id);
            }
            Command::UserSync(us) => {
                self.stats.user_sync += 1;
                let t = match us.state {
                    SyncState::Start if self.over_user_sync_limit(id, us.user_id) => {
                        let limit = self.config.max_user_syncs;
                        let name = self.conn(id).map(|c| c.display_name().to_owned()).unwrap_or_default();
                        tracing::info!(conn = %id, name, limit, "too many users syncing, closing");
                        self.fail(id, &PeerError::TooManyUserSyncs(limit), CloseReason::ProtocolError, now);
                        return;
                    }
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
                self.forward_if_known_upstream(id, word, line, now);
            }
            Command::InvalidateCache(_) => {
                self.stats.invalidate_cache += 1;
                self.forward_if_known_upstream(id, word, line, now);
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

    /// Whether starting `user` would make `id` hold more users syncing than
    /// `max_user_syncs` (a user it already holds costs nothing more).
    fn over_user_sync_limit(&self, id: ConnId, user: &str) -> bool {
        self.user_sync.count(id) >= self.config.max_user_syncs && !self.user_sync.holds(id, user)
    }

    pub(super) fn forward(&mut self, line: &Line) {
        let mut buf = BytesMut::with_capacity(line.as_bytes().len() + 1);
        buf.put_slice(line.as_bytes());
        buf.put_u8(b'\n');
        self.outputs.push_back(HubOutput::Upstream(UpstreamCmd::Forward(buf.freeze())));
    }
}
