//! `presence` rows and `federation` rows (presence updates and EDUs).
use bytes::{BufMut, BytesMut};

use super::line::FILLER;
use super::line::{put_id, PadSlot};
use super::world::{B64URL, LOCAL_SERVER, REMOTE_SERVERS};
use super::Synthetic;
use crate::proto::json::{write_bool, write_i64, write_key, write_null, write_sep, write_str};
use crate::proto::{StreamId, SynapseRelease};

const STATUS_MSGS: &[&str] = &[
    "In a meeting",
    "☕ back soon",
    "Working from home 🏠",
    "on holiday until Monday",
    "Focus time, ping if urgent",
];

impl Synthetic {
    /// The 7 presence fields, as an array body or (with `object`) as object members.
    pub(super) fn presence_fields(&mut self, out: &mut BytesMut, ts: i64, object: bool) -> PadSlot {
        let user = self.world.user();
        let state = self.world.rng.pick(&["online", "online", "unavailable", "offline"]);
        let key = |out: &mut BytesMut, k: &str| {
            if object {
                write_key(out, k);
            }
        };
        key(out, "user_id");
        let slot = put_id(out, &self.world.users[user]);
        write_sep(out);
        key(out, "state");
        write_str(out, state);
        for k in ["last_active_ts", "last_federation_update_ts", "last_user_sync_ts"] {
            write_sep(out);
            key(out, k);
            write_i64(out, ts - self.world.rng.below(120_000) as i64);
        }
        write_sep(out);
        key(out, "status_msg");
        if self.world.rng.chance(30) {
            write_str(out, self.world.rng.pick(STATUS_MSGS));
        } else {
            write_null(out);
        }
        write_sep(out);
        key(out, "currently_active");
        write_bool(out, state == "online" && self.world.rng.chance(70));
        slot
    }

    pub(super) fn row_federation(&mut self, out: &mut BytesMut, ts: i64) -> PadSlot {
        // From Synapse 1.33 presence goes out by the `presence_federation` stream instead.
        let presence_rows = self.cfg.release.is_none_or(SynapseRelease::federation_presence_rows);
        let kind = if presence_rows { self.world.rng.below(100) } else { 30 + self.world.rng.below(70) };
        match kind {
            0..=29 => {
                out.put_slice(b"[\"p\", {");
                let slot = self.presence_fields(out, ts, true);
                out.put_slice(b"}]");
                slot
            }
            30..=39 => {
                out.put_slice(b"[\"pd\", {\"state\": {");
                let slot = self.presence_fields(out, ts, true);
                out.put_slice(b"}, \"dests\": [");
                for i in 0..1 + self.world.rng.below(3) {
                    if i > 0 {
                        write_sep(out);
                    }
                    write_str(out, self.world.rng.pick(REMOTE_SERVERS));
                }
                out.put_slice(b"]}]");
                slot
            }
            40..=59 => {
                let (room, user, ev) = (self.world.room(), self.world.user(), self.world.recent_event());
                let dest = self.world.rng.pick(REMOTE_SERVERS);
                out.put_slice(b"[\"k\", {\"key\": [");
                put_id(out, &self.world.rooms[room]);
                out.put_slice(b", \"m.read\", ");
                put_id(out, &self.world.users[user]);
                out.put_slice(b"], \"edu\": ");
                edu_head(out, dest, "m.receipt");
                out.put_u8(b'{');
                put_id(out, &self.world.rooms[room]);
                out.put_slice(b": {\"m.read\": {");
                let slot = put_id(out, &self.world.users[user]);
                out.put_slice(b": {\"event_ids\": [\"");
                out.put_slice(&ev);
                out.put_slice(b"\"], \"data\": {\"ts\": ");
                write_i64(out, ts);
                out.put_slice(b"}}}}}}}]");
                slot
            }
            _ => {
                let dest = self.world.rng.pick(REMOTE_SERVERS);
                out.put_slice(b"[\"e\", ");
                let slot;
                match self.world.rng.below(3) {
                    0 => {
                        let (room, user) = (self.world.room(), self.world.user());
                        edu_head(out, dest, "m.typing");
                        out.put_slice(b"{\"room_id\": ");
                        slot = put_id(out, &self.world.rooms[room]);
                        out.put_slice(b", \"user_id\": ");
                        put_id(out, &self.world.users[user]);
                        out.put_slice(b", \"typing\": ");
                        write_bool(out, self.world.rng.chance(80));
                        out.put_u8(b'}');
                    }
                    1 => {
                        let (from, to) = (self.world.user(), self.world.user());
                        edu_head(out, dest, "m.direct_to_device");
                        out.put_slice(b"{\"sender\": ");
                        put_id(out, &self.world.users[from]);
                        out.put_slice(b", \"type\": \"m.room_key_request\", \"message_id\": \"");
                        for _ in 0..16 {
                            out.put_u8(self.world.rng.pick(FILLER));
                        }
                        slot = PadSlot { at: out.len(), wrap: false };
                        out.put_slice(b"\", \"messages\": {");
                        put_id(out, &self.world.users[to]);
                        out.put_slice(b": {\"*\": {\"action\": \"request_cancellation\"}}}}");
                    }
                    _ => {
                        let user = self.world.user();
                        let stream_id = self.counters[StreamId::DeviceLists.index()];
                        edu_head(out, dest, "m.device_list_update");
                        out.put_slice(b"{\"user_id\": ");
                        put_id(out, &self.world.users[user]);
                        out.put_slice(b", \"device_id\": \"");
                        for _ in 0..10 {
                            out.put_u8(B64URL[self.world.rng.below(26)]);
                        }
                        slot = PadSlot { at: out.len(), wrap: false };
                        out.put_slice(b"\", \"stream_id\": ");
                        write_i64(out, stream_id);
                        out.put_slice(b", \"prev_id\": [");
                        write_i64(out, stream_id - 1);
                        out.put_slice(b"], \"deleted\": false}");
                    }
                }
                out.put_slice(b"}]");
                slot
            }
        }
    }
}

/// `{"origin": …, "destination": …, "edu_type": …, "content": ` (Synapse's `Edu` key order);
/// the caller writes the content and the closing `}`.
fn edu_head(out: &mut BytesMut, destination: &str, edu_type: &str) {
    out.put_slice(b"{\"origin\": ");
    write_str(out, LOCAL_SERVER);
    out.put_slice(b", \"destination\": ");
    write_str(out, destination);
    out.put_slice(b", \"edu_type\": ");
    write_str(out, edu_type);
    out.put_slice(b", \"content\": ");
}
