//! One row of any stream but `events`: the dispatch, and the streams whose rows are a line or
//! two of code (typing, receipts, push rules, pushers, public rooms, device lists, to-device,
//! account data, tags, groups, user signatures).
use bytes::{BufMut, BytesMut};

use super::line::{put_id, PadSlot};
use super::world::B64URL;
use super::Synthetic;
use crate::proto::json::{
    write_bool, write_f64, write_i64, write_key, write_null, write_sep, write_str, write_str_contents,
};
use crate::proto::StreamId;

const GLOBAL_ACCOUNT_DATA: &[&str] = &[
    "m.direct",
    "m.ignored_user_list",
    "im.vector.setting.breadcrumbs",
    "m.identity_server",
    "io.element.recent_emoji",
];
const ROOM_ACCOUNT_DATA: &[&str] = &["m.fully_read", "org.matrix.room.preview_urls"];
const TAGS: &[&str] = &["m.favourite", "m.lowpriority", "u.work", "u.ünï"];

impl Synthetic {
    /// Writes one row of `stream` (not `events`); `nth` = index within its group.
    pub(super) fn row(
        &mut self,
        stream: StreamId,
        out: &mut BytesMut,
        ts: i64,
        nth: usize,
    ) -> Option<PadSlot> {
        match stream {
            StreamId::Events => None,
            StreamId::Backfill => Some(self.row_backfill(out)),
            StreamId::Presence => {
                out.put_u8(b'[');
                let slot = self.presence_fields(out, ts, false);
                out.put_u8(b']');
                Some(slot)
            }
            StreamId::Typing => {
                let room = self.world.room();
                out.put_u8(b'[');
                let slot = put_id(out, &self.world.rooms[room]);
                out.put_slice(b", [");
                for i in 0..self.world.rng.below(4) {
                    if i > 0 {
                        write_sep(out);
                    }
                    let u = self.world.user();
                    put_id(out, &self.world.users[u]);
                }
                out.put_slice(b"]]");
                Some(slot)
            }
            StreamId::Receipts => {
                let (room, user, ev) = (self.world.room(), self.world.user(), self.world.recent_event());
                out.put_u8(b'[');
                put_id(out, &self.world.rooms[room]);
                out.put_slice(b", \"m.read\", ");
                let slot = put_id(out, &self.world.users[user]);
                out.put_slice(b", \"");
                out.put_slice(&ev);
                out.put_slice(b"\", {\"ts\": ");
                write_i64(out, ts - self.world.rng.below(2000) as i64);
                out.put_slice(b"}]");
                Some(slot)
            }
            StreamId::PushRules | StreamId::UserSignature => Some(self.row_user_only(out)),
            StreamId::Pushers => {
                let user = self.world.user();
                let email = self.world.rng.chance(15);
                out.put_u8(b'[');
                put_id(out, &self.world.users[user]);
                write_sep(out);
                write_str(out, if email { "m.email" } else { "m.http" });
                out.put_slice(b", \"");
                if email {
                    let u = &self.world.users[user];
                    let local = u.get(1..).and_then(|r| r.split(':').next()).unwrap_or("user");
                    write_str_contents(out, local);
                } else {
                    for _ in 0..22 {
                        out.put_u8(B64URL[self.world.rng.below(64)]);
                    }
                }
                let slot = PadSlot { at: out.len(), wrap: false };
                if email {
                    out.put_slice(b"@mail.example.com");
                }
                out.put_slice(b"\", ");
                write_bool(out, self.world.rng.chance(10));
                out.put_u8(b']');
                Some(slot)
            }
            StreamId::Caches => self.row_cache(out, ts),
            StreamId::PublicRooms => {
                let room = self.world.room();
                out.put_u8(b'[');
                let slot = put_id(out, &self.world.rooms[room]);
                write_sep(out);
                write_bool(out, self.world.rng.chance(70));
                if self.world.rng.chance(10) {
                    out.put_slice(b", \"irc\", \"libera.chat\"]");
                } else {
                    out.put_slice(b", null, null]");
                }
                Some(slot)
            }
            StreamId::DeviceLists | StreamId::ToDevice => {
                out.put_u8(b'[');
                let slot = if stream == StreamId::DeviceLists && nth > 0 && self.world.rng.chance(60) {
                    let server = self.world.server();
                    put_id(out, server)
                } else {
                    let u = self.world.user();
                    put_id(out, &self.world.users[u])
                };
                out.put_u8(b']');
                Some(slot)
            }
            StreamId::Federation => Some(self.row_federation(out, ts)),
            // Never generated by default (weight 0); written as a 1.33+ master would.
            StreamId::PresenceFederation => {
                out.put_u8(b'[');
                let server = self.world.server();
                let slot = put_id(out, server);
                write_sep(out);
                let u = self.world.user();
                put_id(out, &self.world.users[u]);
                out.put_u8(b']');
                Some(slot)
            }
            StreamId::TagAccountData => Some(self.row_tags(out)),
            StreamId::AccountData => {
                let user = self.world.user();
                out.put_u8(b'[');
                let slot = put_id(out, &self.world.users[user]);
                write_sep(out);
                if self.world.rng.chance(40) {
                    let room = self.world.room();
                    put_id(out, &self.world.rooms[room]);
                    write_sep(out);
                    write_str(out, self.world.rng.pick(ROOM_ACCOUNT_DATA));
                } else {
                    write_null(out);
                    write_sep(out);
                    write_str(out, self.world.rng.pick(GLOBAL_ACCOUNT_DATA));
                }
                out.put_u8(b']');
                Some(slot)
            }
            StreamId::Groups => {
                let (g, user) = (self.world.rng.below(self.world.groups.len()), self.world.user());
                out.put_u8(b'[');
                put_id(out, &self.world.groups[g]);
                write_sep(out);
                let slot = put_id(out, &self.world.users[user]);
                out.put_slice(b", \"membership\", {\"membership\": ");
                write_str(out, self.world.rng.pick(&["join", "invite", "leave"]));
                out.put_slice(b", \"content\": {}}]");
                Some(slot)
            }
        }
    }

    /// A 1.10–1.12 `device_lists` row: `[user_id, destination]`, `null` for no destination.
    pub(super) fn row_device_list_poke(
        &mut self,
        out: &mut BytesMut,
        user: usize,
        dest: Option<&str>,
    ) -> PadSlot {
        out.put_u8(b'[');
        let slot = put_id(out, &self.world.users[user]);
        write_sep(out);
        match dest {
            Some(d) => write_str(out, d),
            None => write_null(out),
        }
        out.put_u8(b']');
        slot
    }

    fn row_user_only(&mut self, out: &mut BytesMut) -> PadSlot {
        let u = self.world.user();
        out.put_u8(b'[');
        let slot = put_id(out, &self.world.users[u]);
        out.put_u8(b']');
        slot
    }

    fn row_tags(&mut self, out: &mut BytesMut) -> PadSlot {
        let (user, room) = (self.world.user(), self.world.room());
        // The data is a string holding the room's tags as JSON (PROTOCOL.md §6).
        let mut inner = std::mem::take(&mut self.inner);
        inner.clear();
        inner.push(b'{');
        let first = self.world.rng.below(TAGS.len());
        for i in 0..self.world.rng.below(3) {
            if i > 0 {
                write_sep(&mut inner);
            }
            write_key(&mut inner, TAGS[(first + i) % TAGS.len()]);
            if self.world.rng.chance(70) {
                inner.extend_from_slice(b"{\"order\": ");
                write_f64(&mut inner, (1 + self.world.rng.below(7)) as f64 / 8.0);
                inner.push(b'}');
            } else {
                inner.extend_from_slice(b"{}");
            }
        }
        inner.push(b'}');
        out.put_u8(b'[');
        let slot = put_id(out, &self.world.users[user]);
        write_sep(out);
        put_id(out, &self.world.rooms[room]);
        write_sep(out);
        // `inner` is ASCII JSON, so it is also a valid str.
        write_str(out, std::str::from_utf8(&inner).unwrap_or("{}"));
        out.put_u8(b']');
        self.inner = inner;
        slot
    }
}
