//! What a released Synapse master (1.13–1.66) does for its workers that the seed did not
//! (PROTOCOL.md §8.2, §8.3.1), for workers of that generation:
//!
//! * `USER_SYNC <instance_id> <user> start|end <ms>` and `CLEAR_USER_SYNC <instance_id>`: the
//!   master keys presence syncs by the worker's instance id (not by connection), so they go
//!   upstream as received; a lost worker connection clears nothing there, as with Synapse.
//! * `FEDERATION_ACK <instance> <token>` (1.18+) besides `FEDERATION_ACK <token>`, forwarded
//!   as received.
//! * `REMOTE_SERVER_UP` from a worker: the master relays it to every other connection but
//!   never back to its sender, and replhub is one connection: so besides going upstream it is
//!   delivered here to every other greeted worker, never to its sender.
//!
//! A worker is of a released generation when the upstream is (learnt or pinned), or, while
//! that is not known, when it greeted with a bare `REPLICATE`.
use bytes::{BufMut, BytesMut};

use super::stats::CloseReason;
use super::{ConnId, Hub};
use crate::proto::generation::{parse_any_federation_ack, parse_instance_user_sync};
use crate::proto::{CommandWord, Line, PeerError};
use crate::time::Now;

impl Hub {
    /// Whether `id` speaks a released generation (1.13+) rather than the seed.
    pub(super) fn is_released(&self, id: ConnId) -> bool {
        match self.generation {
            Some(g) => g.has_instance(),
            None => self.conn(id).is_some_and(|c| c.subs.bare),
        }
    }

    /// Handles the worker commands whose released form the seed parser refuses. Returns
    /// whether the line was handled here; otherwise the seed's handling applies.
    pub(super) fn handle_released_command(
        &mut self,
        id: ConnId,
        word: CommandWord,
        line: &Line,
        now: Now,
    ) -> bool {
        let args = line.args();
        let result = match word {
            // Four fields with `start|end` third; three fields are the seed form.
            CommandWord::UserSync if self.is_released(id) && is_four_field_user_sync(args) => {
                parse_instance_user_sync(args).map(|_| self.stats.user_sync += 1)
            }
            CommandWord::FederationAck if self.is_released(id) => {
                parse_any_federation_ack(args).map(|_| self.stats.federation_ack += 1)
            }
            CommandWord::ClearUserSync if self.is_released(id) => {
                crate::proto::fields::utf8_field(args).map(|_| ())
            }
            // A seed server does not know it (PROTOCOL.md §2.1).
            CommandWord::ClearUserSync => {
                let err = PeerError::InvalidCommand(word.as_str().to_owned());
                self.fail(id, &err, CloseReason::ProtocolError, now);
                return true;
            }
            CommandWord::RemoteServerUp if self.is_released(id) => {
                if std::str::from_utf8(args).is_ok() {
                    self.deliver_to_others(id, line, now);
                }
                return false;
            }
            _ => return false,
        };
        match result {
            Ok(()) => self.forward(line),
            Err(e) => {
                let err = PeerError::parse(word.as_str().as_bytes(), args, e);
                let name = self.conn(id).map(|c| c.display_name().to_owned()).unwrap_or_default();
                tracing::info!(conn = %id, name, error = %err, "bad command, closing");
                self.fail(id, &err, CloseReason::ProtocolError, now);
            }
        }
        true
    }

    /// Queues `line` to every greeted, open connection but `from`, after what each has queued.
    fn deliver_to_others(&mut self, from: ConnId, line: &Line, now: Now) {
        let mut buf = BytesMut::with_capacity(line.as_bytes().len() + 1);
        buf.put_slice(line.as_bytes());
        buf.put_u8(b'\n');
        let bytes = buf.freeze();
        let head = self.log.head();
        let others: Vec<ConnId> = self
            .conns
            .ids()
            .filter(|&o| o != from)
            .filter(|&o| self.conn(o).is_some_and(|c| c.session.is_started() && !c.close.is_closing()))
            .collect();
        for o in others {
            if let Some(c) = self.conn_mut(o) {
                c.outbox.push_private(head, bytes.clone(), CommandWord::RemoteServerUp);
            }
            self.wake(o, head, now);
        }
    }
}

/// `<a> <b> <start|end> <c>`: four fields, the third a state (user ids hold no spaces, so
/// this tells the 1.13 form from the seed's `<user> <state> <ms>`, PROTOCOL.md §8.3).
fn is_four_field_user_sync(args: &[u8]) -> bool {
    let mut fields = args.split(|&b| b == b' ');
    let third = fields.nth(2);
    matches!(third, Some(b"start" | b"end")) && fields.count() == 1
}
