//! `caches` rows: single invalidations and `cs_cache_fake` runs.
use bytes::{BufMut, BytesMut};

use super::line::{put_id, PadSlot};
use super::Synthetic;
use crate::proto::json::{write_i64, write_null, write_sep, write_str};

const CACHE_FUNCS_USER: &[&str] = &[
    "get_user_by_id",
    "get_rooms_for_user_with_stream_ordering",
    "get_user_by_access_token",
    "get_devices_by_user",
    "get_users_who_share_room_with_user",
];
const CACHE_FUNCS_ROOM: &[&str] = &[
    "get_users_in_room",
    "get_room_summary",
    "get_aliases_for_room",
    "get_current_state_ids",
    "get_forward_extremeties_for_room",
];
const CACHE_FUNCS_ALL: &[&str] = &["get_rooms_for_user", "get_user_filter", "get_server_version"];

impl Synthetic {
    pub(super) fn row_cache(&mut self, out: &mut BytesMut, ts: i64) -> Option<PadSlot> {
        out.put_u8(b'[');
        let slot = match self.world.rng.below(100) {
            0..=2 => {
                write_str(out, self.world.rng.pick(CACHE_FUNCS_ALL));
                write_sep(out);
                write_null(out);
                None
            }
            3..=54 => {
                write_str(out, self.world.rng.pick(CACHE_FUNCS_USER));
                out.put_slice(b", [");
                let u = self.world.user();
                put_id(out, &self.world.users[u]);
                let slot = PadSlot { at: out.len(), wrap: true };
                out.put_u8(b']');
                Some(slot)
            }
            _ => {
                write_str(out, self.world.rng.pick(CACHE_FUNCS_ROOM));
                out.put_slice(b", [");
                let r = self.world.room();
                put_id(out, &self.world.rooms[r]);
                let slot = PadSlot { at: out.len(), wrap: true };
                out.put_u8(b']');
                Some(slot)
            }
        };
        write_sep(out);
        write_i64(out, ts);
        out.put_u8(b']');
        slot
    }

    /// `cs_cache_fake`: keys `[room_id, member…]`, at most 50 members per row.
    pub(super) fn row_cs_cache_fake(&mut self, out: &mut BytesMut, room: &str, ts: i64) -> Option<PadSlot> {
        out.put_slice(b"[\"cs_cache_fake\", [");
        put_id(out, room);
        let members = if self.world.rng.chance(5) { 50 } else { 1 + self.world.rng.below(8) };
        for _ in 0..members {
            write_sep(out);
            let u = self.world.user();
            put_id(out, &self.world.users[u]);
        }
        let slot = PadSlot { at: out.len(), wrap: true };
        out.put_slice(b"], ");
        write_i64(out, ts);
        out.put_u8(b']');
        Some(slot)
    }
}
