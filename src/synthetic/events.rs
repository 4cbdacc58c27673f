//! `events` (an `ev` row, plus its `state` row for state events) and `backfill` rows.
use bytes::{BufMut, BytesMut};

use super::line::{put_filler, put_id, put_opt_event, LineCtx, PadSlot};
use super::Synthetic;
use crate::proto::json::{write_bool, write_null, write_sep, write_str};
use crate::proto::{StreamId, SynapseRelease, Token};

const EMPTY_STATE_TYPES: &[&str] =
    &["m.room.name", "m.room.topic", "m.room.power_levels", "m.room.join_rules", "m.room.avatar"];

/// The kinds of `events` rows we produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventKind {
    Message,
    Encrypted,
    Edit,
    Reaction,
    Redaction,
    Member,
    EmptyKeyState(&'static str),
    CustomState,
}

impl Synthetic {
    fn event_kind(&mut self) -> EventKind {
        match self.world.rng.below(1000) {
            0..=449 => EventKind::Message,
            450..=599 => EventKind::Encrypted,
            600..=639 => EventKind::Edit,
            640..=719 => EventKind::Reaction,
            720..=749 => EventKind::Redaction,
            750..=939 => EventKind::Member,
            940..=994 => EventKind::EmptyKeyState(self.world.rng.pick(EMPTY_STATE_TYPES)),
            _ => EventKind::CustomState,
        }
    }

    /// An `ev` row, plus a `state` row at the same token for state events (`ev` first, with
    /// `batch`). Rarely, a lone `state` row with a null event id (state removed).
    pub(super) fn events_group(
        &mut self,
        out: &mut BytesMut,
        line: &mut LineCtx,
        on_line: &mut dyn FnMut(StreamId, Token, usize, usize),
    ) -> usize {
        let room = self.world.room();
        if self.world.rng.chance(1) {
            line.rows = 1;
            let start = line.begin(out);
            let user = self.world.user();
            out.put_slice(b"[\"state\", [");
            let slot = put_id(out, &self.world.rooms[room]);
            out.put_slice(b", \"m.room.member\", ");
            put_id(out, &self.world.users[user]);
            out.put_slice(b", null]]");
            self.finish(out, start, line, Some(slot), on_line);
            return line.written;
        }
        let kind = self.event_kind();
        let id = self.world.new_event_id();
        let state_key: Option<String> = match kind {
            EventKind::Member => {
                let u = self.world.user();
                Some(self.world.users[u].clone())
            }
            EventKind::EmptyKeyState(_) => Some(String::new()),
            EventKind::CustomState => {
                Some(format!("ünïcødé ☃ 😀 \"{}\" back\\slash", self.world.rng.below(100)))
            }
            _ => None,
        };
        let related = self.world.recent_event();
        line.rows = if state_key.is_some() { 2 } else { 1 };

        let start = line.begin(out);
        out.put_slice(b"[\"ev\", [\"");
        out.put_slice(&id);
        let slot = PadSlot { at: out.len(), wrap: false };
        out.put_slice(b"\", ");
        put_id(out, &self.world.rooms[room]);
        write_sep(out);
        let ty = match kind {
            EventKind::Message | EventKind::Edit => "m.room.message",
            EventKind::Encrypted => "m.room.encrypted",
            EventKind::Reaction => "m.reaction",
            EventKind::Redaction => "m.room.redaction",
            EventKind::Member => "m.room.member",
            EventKind::EmptyKeyState(t) => t,
            EventKind::CustomState => "org.example.custom_state",
        };
        write_str(out, ty);
        write_sep(out);
        match &state_key {
            Some(k) => write_str(out, k),
            None => write_null(out),
        }
        write_sep(out);
        put_opt_event(out, (kind == EventKind::Redaction).then_some(&related));
        write_sep(out);
        put_opt_event(out, matches!(kind, EventKind::Reaction | EventKind::Edit).then_some(&related));
        let ev_fields = self.cfg.release.map_or(6, SynapseRelease::ev_fields);
        if ev_fields >= 8 {
            // `membership` (of a member event), `rejected` (Synapse 1.23+).
            write_sep(out);
            match kind {
                EventKind::Member => {
                    write_str(out, self.world.rng.pick(&["join", "join", "leave", "invite"]))
                }
                _ => write_null(out),
            }
            write_sep(out);
            write_bool(out, false);
        }
        if ev_fields >= 9 {
            // `outlier` (Synapse 1.64+).
            write_sep(out);
            write_bool(out, false);
        }
        out.put_slice(b"]]");
        let fill = self.finish(out, start, line, Some(slot), on_line);

        if let Some(k) = &state_key {
            let start = line.begin(out);
            out.put_slice(b"[\"state\", [");
            put_id(out, &self.world.rooms[room]);
            write_sep(out);
            write_str(out, ty);
            write_sep(out);
            write_str(out, k);
            out.put_slice(b", \"");
            out.put_slice(&id);
            put_filler(out, fill);
            out.put_slice(b"\"]]");
            self.finish(out, start, line, None, on_line);
        }
        self.world.remember_event(id);
        line.written
    }

    pub(super) fn row_backfill(&mut self, out: &mut BytesMut) -> PadSlot {
        let (room, member) = (self.world.room(), self.world.rng.chance(20));
        let id = self.world.new_event_id();
        out.put_slice(b"[\"");
        out.put_slice(&id);
        let slot = PadSlot { at: out.len(), wrap: false };
        out.put_slice(b"\", ");
        put_id(out, &self.world.rooms[room]);
        if member {
            out.put_slice(b", \"m.room.member\", ");
            let u = self.world.user();
            put_id(out, &self.world.users[u]);
            out.put_slice(b", null, null]");
        } else {
            out.put_slice(b", \"m.room.message\", null, null, null]");
        }
        slot
    }
}
