//! The synthetic master: realistic `RDATA` lines for all 16 streams, with no Synapse at all.
//!
//! `replhub serve --synthetic RATE` runs the hub on it, and `replhub loadtest` feeds workers
//! from it. It is sans-IO like the protocol core: it never reads the clock (every call takes a
//! [`Now`]) and never touches a socket; it appends finished lines to a buffer and reports each
//! line's stream, token and byte range, so the caller can index them without re-parsing.
//!
//! What it writes follows the seed (PROTOCOL.md §5.2, §6):
//! * rows have the exact field shapes of §6, encoded with [`crate::proto::json`], so they are
//!   byte-identical to what Synapse's simplejson would write for the same values;
//! * rows that share a token form a *batch run*: consecutive lines of one stream, all with the
//!   token `batch` except the last, which carries the token. Runs come from an event and its
//!   current-state change, several `device_lists` entities poked at once, a `cs_cache_fake`
//!   invalidation split into rows of at most 50 members, and federation rows at one position;
//! * tokens strictly increase per stream. `device_lists`/`user_signature` and
//!   `tag_account_data`/`account_data` draw from one shared counter each, as in Synapse, so
//!   each of them sees gaps;
//! * the mix is roughly that of a busy homeserver: about 60% of lines are `events`, then
//!   `caches`, `presence`, `receipts`, `typing`, `device_lists` and the rest;
//! * everything is deterministic from the seed (a SplitMix64 generator), except the
//!   timestamps inside rows, which come from `now.wall_ms`.
//!
//! Lines are 150–300 bytes typically; [`SyntheticConfig::pad_to`] lengthens them for load tests
//! by growing an opaque string inside the row (an id's localpart, an event id, a pushkey) or, for
//! `caches`, by adding a key, so the shape never changes.
use bytes::{BufMut, BytesMut};

use crate::proto::json::{
    write_bool, write_f64, write_i64, write_key, write_null, write_sep, write_str, write_str_contents,
};
use crate::proto::{StreamId, StreamMask, Token, MAX_LINE_LEN};
use crate::time::Now;

/// How many lines [`Synthetic::due`] offers per call when the rate is 0 (unpaced).
pub const UNPACED_BATCH: usize = 4096;

/// Configuration of the synthetic master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticConfig {
    /// Lines per second; 0 = unpaced ("as fast as asked": [`Synthetic::due`] always offers
    /// [`UNPACED_BATCH`]).
    pub rate: u64,
    /// Seed of the row generator: the same seed gives the same rows and tokens.
    pub seed: u64,
    /// Which streams to generate. Other streams keep their starting position.
    pub streams: StreamMask,
    /// Pad rows so each line, `\n` included, is about this many bytes (capped at the protocol's
    /// line limit); `None` = natural sizes. Lines already longer are left alone.
    pub pad_to: Option<usize>,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self { rate: 1000, seed: 1, streams: StreamMask::ALL, pad_to: None }
    }
}

/// Relative frequency of each stream's *groups* (a group = the lines sharing one token), in
/// map order. With the average group sizes this gives roughly 60% `events` lines.
const GROUP_WEIGHTS: [u32; StreamId::COUNT] = [
    520, // events (1.25 lines per group: state events add a `state` row)
    10,  // backfill
    80,  // presence
    50,  // typing
    60,  // receipts
    8,   // push_rules
    3,   // pushers
    100, // caches (cs_cache_fake runs add a few lines)
    2,   // public_rooms
    20,  // device_lists (about 3 lines per group)
    25,  // to_device
    20,  // federation
    5,   // tag_account_data
    12,  // account_data
    1,   // groups
    5,   // user_signature
];

/// SplitMix64: tiny, fast, and good enough for test data.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// An index in `0..n` skewed towards 0, so a few rooms and users are busy.
    fn skewed(&mut self, n: usize) -> usize {
        let k = self.below(n) + 1;
        self.below(k)
    }
}

const LOCAL_SERVER: &str = "example.com";
const REMOTE_SERVERS: &[&str] = &[
    "matrix.org",
    "remote.example.org",
    "kde.org",
    "mozilla.org",
    "gnome.org",
    "chat.example.net",
    "hs.example.de",
    "tchncs.de",
];
const NAMES: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "niaj",
    "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "zoë", "jürgen", "søren", "renée",
    "łukasz",
];
const STATUS_MSGS: &[&str] = &[
    "In a meeting",
    "☕ back soon",
    "Working from home 🏠",
    "on holiday until Monday",
    "Focus time, ping if urgent",
];
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
const GLOBAL_ACCOUNT_DATA: &[&str] = &[
    "m.direct",
    "m.ignored_user_list",
    "im.vector.setting.breadcrumbs",
    "m.identity_server",
    "io.element.recent_emoji",
];
const ROOM_ACCOUNT_DATA: &[&str] = &["m.fully_read", "org.matrix.room.preview_urls"];
const TAGS: &[&str] = &["m.favourite", "m.lowpriority", "u.work", "u.ünï"];
const EMPTY_STATE_TYPES: &[&str] =
    &["m.room.name", "m.room.topic", "m.room.power_levels", "m.room.join_rules", "m.room.avatar"];
const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// Padding characters: valid in every id localpart we pad.
const FILLER: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// `$` + 43 base64url characters: the shape of a room-v4 event id.
type EventId = [u8; 44];

/// Where a line may grow: `at` is a byte offset inside a JSON string of the row; with `wrap`,
/// the filler goes in as an extra array element (`, "…"`) at `at` instead.
#[derive(Clone, Copy, Debug)]
struct PadSlot {
    at: usize,
    wrap: bool,
}

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

/// The built-in synthetic master (sans-IO). See the module docs.
#[derive(Debug)]
pub struct Synthetic {
    cfg: SyntheticConfig,
    rng: Rng,
    /// Last token emitted per stream (initially the starting position).
    tokens: [i64; StreamId::COUNT],
    /// Token counters, indexed by [`counter_slot`] (shared streams share a slot).
    counters: [i64; StreamId::COUNT],
    /// Cumulative group weights of the streams in the mask.
    table: Vec<(StreamId, u32)>,
    /// Token bucket, in thousandths of a line.
    credit_milli: i128,
    last_ms: Option<u64>,
    users: Vec<String>,
    rooms: Vec<String>,
    groups: Vec<String>,
    recent_events: Vec<EventId>,
    recent_next: usize,
    /// Tail of a line being padded.
    scratch: Vec<u8>,
    /// Small JSON built before being embedded as a string (tag_account_data).
    inner: Vec<u8>,
}

/// The counter a stream's tokens come from: `user_signature` shares `device_lists`', and
/// `tag_account_data` shares `account_data`'s (as Synapse's id generators do).
fn counter_slot(s: StreamId) -> usize {
    match s {
        StreamId::UserSignature => StreamId::DeviceLists.index(),
        StreamId::TagAccountData => StreamId::AccountData.index(),
        _ => s.index(),
    }
}

impl Synthetic {
    /// A generator at its starting positions (derived from the seed; `federation` and `typing`
    /// start near 0, as Synapse's in-memory streams do after a restart).
    pub fn new(cfg: SyntheticConfig) -> Self {
        let mut rng = Rng(cfg.seed ^ 0x5eed_f00d_5ba5);
        let mut counters = [0i64; StreamId::COUNT];
        for s in StreamId::ALL {
            let (base, spread) = match s {
                StreamId::Events => (1_000_000, 1_000_000),
                StreamId::Backfill => (1_000, 10_000),
                StreamId::Presence => (50_000, 50_000),
                StreamId::Typing => (0, 100),
                StreamId::Receipts => (20_000, 20_000),
                StreamId::PushRules => (1_000, 5_000),
                StreamId::Pushers => (100, 500),
                StreamId::Caches => (500_000, 500_000),
                StreamId::PublicRooms => (10, 100),
                StreamId::DeviceLists => (30_000, 30_000),
                StreamId::ToDevice => (80_000, 80_000),
                StreamId::Federation => (0, 1),
                StreamId::AccountData => (5_000, 5_000),
                StreamId::Groups => (10, 100),
                StreamId::UserSignature | StreamId::TagAccountData => (0, 1),
            };
            counters[s.index()] = base + rng.below(spread) as i64;
        }
        let mut tokens = [0i64; StreamId::COUNT];
        for s in StreamId::ALL {
            tokens[s.index()] = counters[counter_slot(s)];
        }
        let mut total = 0;
        let table = cfg
            .streams
            .iter()
            .map(|s| {
                total += GROUP_WEIGHTS[s.index()];
                (s, total)
            })
            .collect();

        let users = (0..400)
            .map(|i| {
                let name = rng.pick(NAMES);
                let server = if rng.chance(70) { LOCAL_SERVER } else { rng.pick(REMOTE_SERVERS) };
                format!("@{name}{i}:{server}")
            })
            .collect();
        let rooms = (0..150)
            .map(|_| {
                let local: String = (0..18).map(|_| char::from(B64URL[rng.below(52)])).collect();
                let server = if rng.chance(80) { LOCAL_SERVER } else { rng.pick(REMOTE_SERVERS) };
                format!("!{local}:{server}")
            })
            .collect();
        let groups = (0..10).map(|i| format!("+{}{i}:{LOCAL_SERVER}", rng.pick(NAMES))).collect();
        let mut me = Self {
            cfg,
            rng,
            tokens,
            counters,
            table,
            credit_milli: 0,
            last_ms: None,
            users,
            rooms,
            groups,
            recent_events: Vec::with_capacity(256),
            recent_next: 0,
            scratch: Vec::new(),
            inner: Vec::new(),
        };
        for _ in 0..16 {
            let id = me.new_event_id();
            me.remember_event(id);
        }
        me
    }

    /// The configuration.
    pub fn config(&self) -> &SyntheticConfig {
        &self.cfg
    }

    /// Current token of every stream, in map order (what a `POSITION` for it would say): the
    /// last token written, or the starting position.
    pub fn positions(&self) -> [i64; StreamId::COUNT] {
        self.tokens
    }

    /// How many lines are due at `now` under the configured rate: a token bucket on
    /// `now.mono_ms` that holds at most one second's worth. The first call starts the clock
    /// (and returns 0). [`Self::generate`] takes what it writes from the bucket, including the
    /// extra lines that complete a batch run. With rate 0, always [`UNPACED_BATCH`].
    pub fn due(&mut self, now: Now) -> usize {
        let rate = self.cfg.rate;
        if rate == 0 {
            return UNPACED_BATCH;
        }
        let cap = i128::from(rate) * 1000;
        if let Some(last) = self.last_ms {
            let dt = now.mono_ms.saturating_sub(last);
            self.credit_milli = (self.credit_milli + i128::from(dt) * i128::from(rate)).min(cap);
        }
        self.last_ms = Some(self.last_ms.map_or(now.mono_ms, |l| l.max(now.mono_ms)));
        usize::try_from((self.credit_milli / 1000).max(0)).unwrap_or(usize::MAX)
    }

    /// Appends at least `n` lines to `out` (more if the last group is a batch run), calling
    /// `on_line(stream, token, start, end)` for each with its byte range in `out` (`end`
    /// includes the `\n`). Row timestamps come from `now.wall_ms`. Returns the number of lines
    /// written (0 if the stream mask is empty).
    pub fn generate(
        &mut self,
        now: Now,
        n: usize,
        out: &mut BytesMut,
        mut on_line: impl FnMut(StreamId, Token, usize, usize),
    ) -> usize {
        let Some(&(_, total)) = self.table.last() else {
            return 0;
        };
        out.reserve(n.saturating_mul(self.cfg.pad_to.unwrap_or(0).max(220)).min(1 << 26));
        let mut written = 0;
        while written < n {
            let r = self.rng.below(total as usize) as u32;
            let stream = self.table.iter().find(|(_, c)| r < *c).map_or(StreamId::Events, |e| e.0);
            written += self.group(stream, now, out, &mut on_line);
        }
        if self.cfg.rate > 0 {
            self.credit_milli -= written as i128 * 1000;
        }
        written
    }

    /// Writes one group (all lines sharing one token) of `stream`; returns its line count.
    fn group(
        &mut self,
        stream: StreamId,
        now: Now,
        out: &mut BytesMut,
        on_line: &mut dyn FnMut(StreamId, Token, usize, usize),
    ) -> usize {
        let token = self.next_token(stream);
        let ts = now.wall_ms;
        let mut line = LineCtx { stream, token, rows: self.group_size(stream), written: 0 };
        match stream {
            StreamId::Events => return self.events_group(out, &mut line, on_line),
            StreamId::Caches if line.rows > 1 => {
                let room = self.rooms[self.rng.skewed(self.rooms.len())].clone();
                while line.more() {
                    let start = line.begin(out);
                    let slot = self.row_cs_cache_fake(out, &room, ts);
                    self.finish(out, start, &mut line, slot, on_line);
                }
            }
            _ => {
                while line.more() {
                    let start = line.begin(out);
                    let slot = self.row(stream, out, ts, line.written);
                    self.finish(out, start, &mut line, slot, on_line);
                }
            }
        }
        line.written
    }

    /// How many rows share the next token of `stream`.
    fn group_size(&mut self, stream: StreamId) -> usize {
        match stream {
            StreamId::DeviceLists => 1 + self.rng.below(5),
            StreamId::Caches if self.rng.chance(8) => 2 + self.rng.below(3),
            StreamId::Federation if self.rng.chance(30) => 2 + self.rng.below(2),
            _ => 1,
        }
    }

    fn next_token(&mut self, stream: StreamId) -> i64 {
        let slot = counter_slot(stream);
        self.counters[slot] += 1;
        let t = self.counters[slot];
        self.tokens[stream.index()] = t;
        t
    }

    /// Ends a line: pads it, adds `\n`, reports it. Returns the filler length used.
    fn finish(
        &mut self,
        out: &mut BytesMut,
        start: usize,
        line: &mut LineCtx,
        slot: Option<PadSlot>,
        on_line: &mut dyn FnMut(StreamId, Token, usize, usize),
    ) -> usize {
        let fill = match (slot, self.cfg.pad_to) {
            (Some(slot), Some(target)) => pad_line(&mut self.scratch, out, start, slot, target),
            _ => 0,
        };
        out.put_u8(b'\n');
        let token = line.token_for_current();
        on_line(line.stream, token, start, out.len());
        line.written += 1;
        fill
    }

    // -----------------------------------------------------------------------------------------
    // Pools
    // -----------------------------------------------------------------------------------------

    fn user(&mut self) -> usize {
        self.rng.skewed(self.users.len())
    }

    fn room(&mut self) -> usize {
        self.rng.skewed(self.rooms.len())
    }

    fn new_event_id(&mut self) -> EventId {
        let mut id = [b'$'; 44];
        let mut bits = 0u64;
        for (i, c) in id[1..].iter_mut().enumerate() {
            if i % 10 == 0 {
                bits = self.rng.next();
            }
            *c = B64URL[(bits & 63) as usize];
            bits >>= 6;
        }
        id
    }

    fn remember_event(&mut self, id: EventId) {
        if self.recent_events.len() < 256 {
            self.recent_events.push(id);
        } else {
            self.recent_events[self.recent_next] = id;
            self.recent_next = (self.recent_next + 1) % 256;
        }
    }

    fn recent_event(&mut self) -> EventId {
        let i = self.rng.below(self.recent_events.len());
        self.recent_events[i]
    }

    fn server(&mut self) -> &'static str {
        if self.rng.chance(20) {
            LOCAL_SERVER
        } else {
            self.rng.pick(REMOTE_SERVERS)
        }
    }

    // -----------------------------------------------------------------------------------------
    // events
    // -----------------------------------------------------------------------------------------

    fn event_kind(&mut self) -> EventKind {
        match self.rng.below(1000) {
            0..=449 => EventKind::Message,
            450..=599 => EventKind::Encrypted,
            600..=639 => EventKind::Edit,
            640..=719 => EventKind::Reaction,
            720..=749 => EventKind::Redaction,
            750..=939 => EventKind::Member,
            940..=994 => EventKind::EmptyKeyState(self.rng.pick(EMPTY_STATE_TYPES)),
            _ => EventKind::CustomState,
        }
    }

    /// An `ev` row, plus a `state` row at the same token for state events (`ev` first, with
    /// `batch`). Rarely, a lone `state` row with a null event id (state removed).
    fn events_group(
        &mut self,
        out: &mut BytesMut,
        line: &mut LineCtx,
        on_line: &mut dyn FnMut(StreamId, Token, usize, usize),
    ) -> usize {
        let room = self.room();
        if self.rng.chance(1) {
            line.rows = 1;
            let start = line.begin(out);
            let user = self.user();
            out.put_slice(b"[\"state\", [");
            let slot = put_id(out, &self.rooms[room]);
            out.put_slice(b", \"m.room.member\", ");
            put_id(out, &self.users[user]);
            out.put_slice(b", null]]");
            self.finish(out, start, line, Some(slot), on_line);
            return line.written;
        }
        let kind = self.event_kind();
        let id = self.new_event_id();
        let state_key: Option<String> = match kind {
            EventKind::Member => {
                let u = self.user();
                Some(self.users[u].clone())
            }
            EventKind::EmptyKeyState(_) => Some(String::new()),
            EventKind::CustomState => Some(format!("ünïcødé ☃ 😀 \"{}\" back\\slash", self.rng.below(100))),
            _ => None,
        };
        let related = self.recent_event();
        line.rows = if state_key.is_some() { 2 } else { 1 };

        let start = line.begin(out);
        out.put_slice(b"[\"ev\", [\"");
        out.put_slice(&id);
        let slot = PadSlot { at: out.len(), wrap: false };
        out.put_slice(b"\", ");
        put_id(out, &self.rooms[room]);
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
        out.put_slice(b"]]");
        let fill = self.finish(out, start, line, Some(slot), on_line);

        if let Some(k) = &state_key {
            let start = line.begin(out);
            out.put_slice(b"[\"state\", [");
            put_id(out, &self.rooms[room]);
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
        self.remember_event(id);
        line.written
    }

    // -----------------------------------------------------------------------------------------
    // The other streams: one row each
    // -----------------------------------------------------------------------------------------

    /// Writes one row of `stream` (not `events`); `nth` = index within its group.
    fn row(&mut self, stream: StreamId, out: &mut BytesMut, ts: i64, nth: usize) -> Option<PadSlot> {
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
                let room = self.room();
                out.put_u8(b'[');
                let slot = put_id(out, &self.rooms[room]);
                out.put_slice(b", [");
                for i in 0..self.rng.below(4) {
                    if i > 0 {
                        write_sep(out);
                    }
                    let u = self.user();
                    put_id(out, &self.users[u]);
                }
                out.put_slice(b"]]");
                Some(slot)
            }
            StreamId::Receipts => {
                let (room, user, ev) = (self.room(), self.user(), self.recent_event());
                out.put_u8(b'[');
                put_id(out, &self.rooms[room]);
                out.put_slice(b", \"m.read\", ");
                let slot = put_id(out, &self.users[user]);
                out.put_slice(b", \"");
                out.put_slice(&ev);
                out.put_slice(b"\", {\"ts\": ");
                write_i64(out, ts - self.rng.below(2000) as i64);
                out.put_slice(b"}]");
                Some(slot)
            }
            StreamId::PushRules | StreamId::UserSignature => Some(self.row_user_only(out)),
            StreamId::Pushers => {
                let user = self.user();
                let email = self.rng.chance(15);
                out.put_u8(b'[');
                put_id(out, &self.users[user]);
                write_sep(out);
                write_str(out, if email { "m.email" } else { "m.http" });
                out.put_slice(b", \"");
                if email {
                    let u = &self.users[user];
                    let local = u.get(1..).and_then(|r| r.split(':').next()).unwrap_or("user");
                    write_str_contents(out, local);
                } else {
                    for _ in 0..22 {
                        out.put_u8(B64URL[self.rng.below(64)]);
                    }
                }
                let slot = PadSlot { at: out.len(), wrap: false };
                if email {
                    out.put_slice(b"@mail.example.com");
                }
                out.put_slice(b"\", ");
                write_bool(out, self.rng.chance(10));
                out.put_u8(b']');
                Some(slot)
            }
            StreamId::Caches => self.row_cache(out, ts),
            StreamId::PublicRooms => {
                let room = self.room();
                out.put_u8(b'[');
                let slot = put_id(out, &self.rooms[room]);
                write_sep(out);
                write_bool(out, self.rng.chance(70));
                if self.rng.chance(10) {
                    out.put_slice(b", \"irc\", \"libera.chat\"]");
                } else {
                    out.put_slice(b", null, null]");
                }
                Some(slot)
            }
            StreamId::DeviceLists | StreamId::ToDevice => {
                out.put_u8(b'[');
                let slot = if stream == StreamId::DeviceLists && nth > 0 && self.rng.chance(60) {
                    let server = self.server();
                    put_id(out, server)
                } else {
                    let u = self.user();
                    put_id(out, &self.users[u])
                };
                out.put_u8(b']');
                Some(slot)
            }
            StreamId::Federation => Some(self.row_federation(out, ts)),
            StreamId::TagAccountData => Some(self.row_tags(out)),
            StreamId::AccountData => {
                let user = self.user();
                out.put_u8(b'[');
                let slot = put_id(out, &self.users[user]);
                write_sep(out);
                if self.rng.chance(40) {
                    let room = self.room();
                    put_id(out, &self.rooms[room]);
                    write_sep(out);
                    write_str(out, self.rng.pick(ROOM_ACCOUNT_DATA));
                } else {
                    write_null(out);
                    write_sep(out);
                    write_str(out, self.rng.pick(GLOBAL_ACCOUNT_DATA));
                }
                out.put_u8(b']');
                Some(slot)
            }
            StreamId::Groups => {
                let (g, user) = (self.rng.below(self.groups.len()), self.user());
                out.put_u8(b'[');
                put_id(out, &self.groups[g]);
                write_sep(out);
                let slot = put_id(out, &self.users[user]);
                out.put_slice(b", \"membership\", {\"membership\": ");
                write_str(out, self.rng.pick(&["join", "invite", "leave"]));
                out.put_slice(b", \"content\": {}}]");
                Some(slot)
            }
        }
    }

    fn row_user_only(&mut self, out: &mut BytesMut) -> PadSlot {
        let u = self.user();
        out.put_u8(b'[');
        let slot = put_id(out, &self.users[u]);
        out.put_u8(b']');
        slot
    }

    fn row_backfill(&mut self, out: &mut BytesMut) -> PadSlot {
        let (room, member) = (self.room(), self.rng.chance(20));
        let id = self.new_event_id();
        out.put_slice(b"[\"");
        out.put_slice(&id);
        let slot = PadSlot { at: out.len(), wrap: false };
        out.put_slice(b"\", ");
        put_id(out, &self.rooms[room]);
        if member {
            out.put_slice(b", \"m.room.member\", ");
            let u = self.user();
            put_id(out, &self.users[u]);
            out.put_slice(b", null, null]");
        } else {
            out.put_slice(b", \"m.room.message\", null, null, null]");
        }
        slot
    }

    /// The 7 presence fields, as an array body or (with `object`) as object members.
    fn presence_fields(&mut self, out: &mut BytesMut, ts: i64, object: bool) -> PadSlot {
        let user = self.user();
        let state = self.rng.pick(&["online", "online", "unavailable", "offline"]);
        let key = |out: &mut BytesMut, k: &str| {
            if object {
                write_key(out, k);
            }
        };
        key(out, "user_id");
        let slot = put_id(out, &self.users[user]);
        write_sep(out);
        key(out, "state");
        write_str(out, state);
        for k in ["last_active_ts", "last_federation_update_ts", "last_user_sync_ts"] {
            write_sep(out);
            key(out, k);
            write_i64(out, ts - self.rng.below(120_000) as i64);
        }
        write_sep(out);
        key(out, "status_msg");
        if self.rng.chance(30) {
            write_str(out, self.rng.pick(STATUS_MSGS));
        } else {
            write_null(out);
        }
        write_sep(out);
        key(out, "currently_active");
        write_bool(out, state == "online" && self.rng.chance(70));
        slot
    }

    fn row_cache(&mut self, out: &mut BytesMut, ts: i64) -> Option<PadSlot> {
        out.put_u8(b'[');
        let slot = match self.rng.below(100) {
            0..=2 => {
                write_str(out, self.rng.pick(CACHE_FUNCS_ALL));
                write_sep(out);
                write_null(out);
                None
            }
            3..=54 => {
                write_str(out, self.rng.pick(CACHE_FUNCS_USER));
                out.put_slice(b", [");
                let u = self.user();
                put_id(out, &self.users[u]);
                let slot = PadSlot { at: out.len(), wrap: true };
                out.put_u8(b']');
                Some(slot)
            }
            _ => {
                write_str(out, self.rng.pick(CACHE_FUNCS_ROOM));
                out.put_slice(b", [");
                let r = self.room();
                put_id(out, &self.rooms[r]);
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
    fn row_cs_cache_fake(&mut self, out: &mut BytesMut, room: &str, ts: i64) -> Option<PadSlot> {
        out.put_slice(b"[\"cs_cache_fake\", [");
        put_id(out, room);
        let members = if self.rng.chance(5) { 50 } else { 1 + self.rng.below(8) };
        for _ in 0..members {
            write_sep(out);
            let u = self.user();
            put_id(out, &self.users[u]);
        }
        let slot = PadSlot { at: out.len(), wrap: true };
        out.put_slice(b"], ");
        write_i64(out, ts);
        out.put_u8(b']');
        Some(slot)
    }

    fn row_tags(&mut self, out: &mut BytesMut) -> PadSlot {
        let (user, room) = (self.user(), self.room());
        // The data is a string holding the room's tags as JSON (PROTOCOL.md §6).
        let mut inner = std::mem::take(&mut self.inner);
        inner.clear();
        inner.push(b'{');
        let first = self.rng.below(TAGS.len());
        for i in 0..self.rng.below(3) {
            if i > 0 {
                write_sep(&mut inner);
            }
            write_key(&mut inner, TAGS[(first + i) % TAGS.len()]);
            if self.rng.chance(70) {
                inner.extend_from_slice(b"{\"order\": ");
                write_f64(&mut inner, (1 + self.rng.below(7)) as f64 / 8.0);
                inner.push(b'}');
            } else {
                inner.extend_from_slice(b"{}");
            }
        }
        inner.push(b'}');
        out.put_u8(b'[');
        let slot = put_id(out, &self.users[user]);
        write_sep(out);
        put_id(out, &self.rooms[room]);
        write_sep(out);
        // `inner` is ASCII JSON, so it is also a valid str.
        write_str(out, std::str::from_utf8(&inner).unwrap_or("{}"));
        out.put_u8(b']');
        self.inner = inner;
        slot
    }

    fn row_federation(&mut self, out: &mut BytesMut, ts: i64) -> PadSlot {
        let kind = self.rng.below(100);
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
                for i in 0..1 + self.rng.below(3) {
                    if i > 0 {
                        write_sep(out);
                    }
                    write_str(out, self.rng.pick(REMOTE_SERVERS));
                }
                out.put_slice(b"]}]");
                slot
            }
            40..=59 => {
                let (room, user, ev) = (self.room(), self.user(), self.recent_event());
                let dest = self.rng.pick(REMOTE_SERVERS);
                out.put_slice(b"[\"k\", {\"key\": [");
                put_id(out, &self.rooms[room]);
                out.put_slice(b", \"m.read\", ");
                put_id(out, &self.users[user]);
                out.put_slice(b"], \"edu\": ");
                edu_head(out, dest, "m.receipt");
                out.put_u8(b'{');
                put_id(out, &self.rooms[room]);
                out.put_slice(b": {\"m.read\": {");
                let slot = put_id(out, &self.users[user]);
                out.put_slice(b": {\"event_ids\": [\"");
                out.put_slice(&ev);
                out.put_slice(b"\"], \"data\": {\"ts\": ");
                write_i64(out, ts);
                out.put_slice(b"}}}}}}}]");
                slot
            }
            _ => {
                let dest = self.rng.pick(REMOTE_SERVERS);
                out.put_slice(b"[\"e\", ");
                let slot;
                match self.rng.below(3) {
                    0 => {
                        let (room, user) = (self.room(), self.user());
                        edu_head(out, dest, "m.typing");
                        out.put_slice(b"{\"room_id\": ");
                        slot = put_id(out, &self.rooms[room]);
                        out.put_slice(b", \"user_id\": ");
                        put_id(out, &self.users[user]);
                        out.put_slice(b", \"typing\": ");
                        write_bool(out, self.rng.chance(80));
                        out.put_u8(b'}');
                    }
                    1 => {
                        let (from, to) = (self.user(), self.user());
                        edu_head(out, dest, "m.direct_to_device");
                        out.put_slice(b"{\"sender\": ");
                        put_id(out, &self.users[from]);
                        out.put_slice(b", \"type\": \"m.room_key_request\", \"message_id\": \"");
                        for _ in 0..16 {
                            out.put_u8(self.rng.pick(FILLER));
                        }
                        slot = PadSlot { at: out.len(), wrap: false };
                        out.put_slice(b"\", \"messages\": {");
                        put_id(out, &self.users[to]);
                        out.put_slice(b": {\"*\": {\"action\": \"request_cancellation\"}}}}");
                    }
                    _ => {
                        let user = self.user();
                        let stream_id = self.counters[StreamId::DeviceLists.index()];
                        edu_head(out, dest, "m.device_list_update");
                        out.put_slice(b"{\"user_id\": ");
                        put_id(out, &self.users[user]);
                        out.put_slice(b", \"device_id\": \"");
                        for _ in 0..10 {
                            out.put_u8(B64URL[self.rng.below(26)]);
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

/// The position of one line within its group.
struct LineCtx {
    stream: StreamId,
    token: i64,
    rows: usize,
    written: usize,
}

impl LineCtx {
    fn more(&self) -> bool {
        self.written < self.rows
    }

    /// `batch` for all but the group's last row.
    fn token_for_current(&self) -> Token {
        if self.written + 1 < self.rows {
            Token::Batch
        } else {
            Token::Value(self.token)
        }
    }

    /// Writes `RDATA <stream> <token> ` and returns where the line starts.
    fn begin(&self, out: &mut BytesMut) -> usize {
        let start = out.len();
        out.put_slice(b"RDATA ");
        out.put_slice(self.stream.name().as_bytes());
        out.put_u8(b' ');
        match self.token_for_current() {
            Token::Batch => out.put_slice(b"batch"),
            Token::Value(t) => write_i64(out, t),
        }
        out.put_u8(b' ');
        start
    }
}

/// Writes an id as a JSON string and returns the offset just after its localpart (before the
/// first `:`, or the first `.` of a server name), where filler may go.
fn put_id(out: &mut BytesMut, id: &str) -> PadSlot {
    let cut = id.find(':').or_else(|| id.find('.')).unwrap_or(id.len());
    let (local, rest) = id.split_at(cut);
    out.put_u8(b'"');
    write_str_contents(out, local);
    let at = out.len();
    write_str_contents(out, rest);
    out.put_u8(b'"');
    PadSlot { at, wrap: false }
}

fn put_opt_event(out: &mut BytesMut, id: Option<&EventId>) {
    match id {
        Some(id) => {
            out.put_u8(b'"');
            out.put_slice(id);
            out.put_u8(b'"');
        }
        None => write_null(out),
    }
}

fn put_filler(out: &mut BytesMut, mut n: usize) {
    while n > 0 {
        let k = n.min(FILLER.len());
        out.put_slice(&FILLER[..k]);
        n -= k;
    }
}

/// Grows the line that started at `start` (not yet `\n`-terminated) to `target - 1` bytes by
/// inserting filler at `slot`. Returns the filler length (0 if the line is long enough).
fn pad_line(scratch: &mut Vec<u8>, out: &mut BytesMut, start: usize, slot: PadSlot, target: usize) -> usize {
    let target = target.saturating_sub(1).min(MAX_LINE_LEN);
    let overhead = if slot.wrap { 4 } else { 0 };
    let len = out.len() - start;
    if target <= len + overhead {
        return 0;
    }
    let fill = target - len - overhead;
    scratch.clear();
    scratch.extend_from_slice(&out[slot.at..]);
    out.truncate(slot.at);
    if slot.wrap {
        out.put_slice(b", \"");
    }
    put_filler(out, fill);
    if slot.wrap {
        out.put_u8(b'"');
    }
    out.put_slice(scratch);
    fill
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::json::{self, Value};

    /// One parsed line of generator output.
    #[derive(Debug)]
    struct Parsed {
        stream: StreamId,
        token: Token,
        row: Value,
    }

    /// Runs the generator and checks every structural promise; returns the parsed lines.
    fn run(cfg: SyntheticConfig, calls: &[usize]) -> (Synthetic, Vec<Parsed>, BytesMut) {
        let mut g = Synthetic::new(cfg);
        let start_positions = g.positions();
        let mut out = BytesMut::new();
        let mut reported = Vec::new();
        let now = Now::new(0, 1_583_254_800_000);
        for &n in calls {
            let before = reported.len();
            let written = g.generate(now, n, &mut out, |s, t, a, b| reported.push((s, t, a, b)));
            assert_eq!(written, reported.len() - before);
            if !cfg.streams.is_empty() {
                assert!(written >= n);
            }
            // Each call ends on a complete batch run.
            if let Some(&(_, t, _, _)) = reported.last() {
                assert!(matches!(t, Token::Value(_)));
            }
        }
        // The reported ranges tile the buffer exactly, one line each.
        let mut pos = 0;
        let mut lines = Vec::new();
        for &(stream, token, a, b) in &reported {
            assert_eq!(a, pos);
            assert!(b > a && out[b - 1] == b'\n');
            assert!(!out[a..b - 1].contains(&b'\n'));
            assert!(b - a - 1 <= MAX_LINE_LEN);
            let p = parse_line(&out[a..b - 1]);
            assert_eq!(p.stream, stream);
            assert_eq!(p.token, token);
            check_row(stream, &p.row)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out[a..b])));
            assert!(cfg.streams.contains(stream), "{stream} not in mask");
            lines.push(p);
            pos = b;
        }
        assert_eq!(pos, out.len());
        check_runs_and_tokens(&lines, start_positions, &g);
        (g, lines, out)
    }

    fn parse_line(line: &[u8]) -> Parsed {
        let text = std::str::from_utf8(line).expect("UTF-8 (in fact ASCII)");
        assert!(text.is_ascii(), "{text}");
        let mut parts = text.splitn(4, ' ');
        assert_eq!(parts.next(), Some("RDATA"));
        let stream = StreamId::from_name(parts.next().expect("stream").as_bytes()).expect("known");
        let token = match parts.next().expect("token") {
            "batch" => Token::Batch,
            t => Token::Value(t.parse().expect("integer token")),
        };
        let json_text = parts.next().expect("row");
        let row = json::parse(json_text.as_bytes()).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(json::to_vec(&row), json_text.as_bytes(), "re-encodes identically");
        Parsed { stream, token, row }
    }

    fn check_runs_and_tokens(lines: &[Parsed], start: [i64; 16], g: &Synthetic) {
        let mut last = start;
        let mut open_run: Option<StreamId> = None;
        for p in lines {
            if let Some(s) = open_run {
                assert_eq!(p.stream, s, "a batch run is interrupted");
            }
            match p.token {
                Token::Batch => open_run = Some(p.stream),
                Token::Value(t) => {
                    assert!(t > last[p.stream.index()], "{} token {t} not increasing", p.stream);
                    last[p.stream.index()] = t;
                    open_run = None;
                }
            }
        }
        assert_eq!(open_run, None, "output ends inside a batch run");
        assert_eq!(g.positions(), last);
    }

    fn is_str(v: &Value) -> bool {
        v.as_str().is_some()
    }

    fn is_opt_str(v: &Value) -> bool {
        v.is_null() || is_str(v)
    }

    fn is_int(v: &Value) -> bool {
        v.as_i64().is_some()
    }

    fn arr(v: &Value, n: usize, what: &str) -> Result<Vec<Value>, String> {
        match v.as_array() {
            Some(a) if a.len() == n => Ok(a.to_vec()),
            _ => Err(format!("{what}: expected an array of {n}")),
        }
    }

    fn ensure(ok: bool, what: &str) -> Result<(), String> {
        if ok {
            Ok(())
        } else {
            Err(what.to_owned())
        }
    }

    fn check_presence_object(o: &Value) -> Result<(), String> {
        let keys: Vec<&str> =
            o.as_object().ok_or("presence object")?.iter().map(|(k, _)| k.as_str()).collect();
        ensure(
            keys == [
                "user_id",
                "state",
                "last_active_ts",
                "last_federation_update_ts",
                "last_user_sync_ts",
                "status_msg",
                "currently_active",
            ],
            "presence keys",
        )?;
        let g = |k: &str| o.get(k).cloned().unwrap_or(Value::Null);
        ensure(is_str(&g("user_id")) && is_str(&g("state")), "presence strings")?;
        ensure(is_int(&g("last_active_ts")) && is_int(&g("last_user_sync_ts")), "presence ts")?;
        ensure(is_opt_str(&g("status_msg")) && g("currently_active").as_bool().is_some(), "presence")
    }

    fn check_edu(e: &Value) -> Result<(), String> {
        let keys: Vec<&str> = e.as_object().ok_or("edu")?.iter().map(|(k, _)| k.as_str()).collect();
        ensure(keys == ["origin", "destination", "edu_type", "content"], "edu keys")?;
        ensure(e.get("content").and_then(Value::as_object).is_some(), "edu content")
    }

    /// The row shapes of PROTOCOL.md §6.
    fn check_row(stream: StreamId, row: &Value) -> Result<(), String> {
        match stream {
            StreamId::Events => {
                let r = arr(row, 2, "events")?;
                match r[0].as_str() {
                    Some("ev") => {
                        let f = arr(&r[1], 6, "ev")?;
                        ensure(f[..3].iter().all(is_str) && f[3..].iter().all(is_opt_str), "ev fields")
                    }
                    Some("state") => {
                        let f = arr(&r[1], 4, "state")?;
                        ensure(f[..3].iter().all(is_str) && is_opt_str(&f[3]), "state fields")
                    }
                    _ => Err("events kind".into()),
                }
            }
            StreamId::Backfill => {
                let f = arr(row, 6, "backfill")?;
                ensure(f[..3].iter().all(is_str) && f[3..].iter().all(is_opt_str), "backfill")
            }
            StreamId::Presence => {
                let f = arr(row, 7, "presence")?;
                ensure(
                    is_str(&f[0])
                        && is_str(&f[1])
                        && f[2..5].iter().all(is_int)
                        && is_opt_str(&f[5])
                        && f[6].as_bool().is_some(),
                    "presence",
                )
            }
            StreamId::Typing => {
                let f = arr(row, 2, "typing")?;
                ensure(is_str(&f[0]) && f[1].as_array().is_some_and(|u| u.iter().all(is_str)), "typing")
            }
            StreamId::Receipts => {
                let f = arr(row, 5, "receipts")?;
                ensure(f[..4].iter().all(is_str) && f[4].as_object().is_some(), "receipts")
            }
            StreamId::PushRules | StreamId::DeviceLists | StreamId::ToDevice | StreamId::UserSignature => {
                ensure(is_str(&arr(row, 1, stream.name())?[0]), "one string")
            }
            StreamId::Pushers => {
                let f = arr(row, 4, "pushers")?;
                ensure(f[..3].iter().all(is_str) && f[3].as_bool().is_some(), "pushers")
            }
            StreamId::Caches => {
                let f = arr(row, 3, "caches")?;
                let keys_ok = f[1].is_null() || f[1].as_array().is_some();
                ensure(is_str(&f[0]) && keys_ok && is_int(&f[2]), "caches")?;
                if f[0].as_str() == Some("cs_cache_fake") {
                    let k = f[1].as_array().ok_or("cs_cache_fake keys")?;
                    // room id + at most 50 members (+ one padding key when padded)
                    ensure(k.len() >= 2 && k.len() <= 52 && k.iter().all(is_str), "cs_cache_fake")?;
                }
                Ok(())
            }
            StreamId::PublicRooms => {
                let f = arr(row, 4, "public_rooms")?;
                ensure(
                    is_str(&f[0]) && f[1].as_bool().is_some() && is_opt_str(&f[2]) && is_opt_str(&f[3]),
                    "public_rooms",
                )
            }
            StreamId::Federation => {
                let r = arr(row, 2, "federation")?;
                let d = &r[1];
                match r[0].as_str() {
                    Some("p") => check_presence_object(d),
                    Some("pd") => {
                        check_presence_object(d.get("state").ok_or("pd state")?)?;
                        let dests = d.get("dests").and_then(Value::as_array).ok_or("pd dests")?;
                        ensure(!dests.is_empty() && dests.iter().all(is_str), "pd dests")
                    }
                    Some("k") => {
                        let key = d.get("key").and_then(Value::as_array).ok_or("k key")?;
                        ensure(key.iter().all(is_str), "k key")?;
                        check_edu(d.get("edu").ok_or("k edu")?)
                    }
                    Some("e") => check_edu(d),
                    _ => Err("federation kind".into()),
                }
            }
            StreamId::TagAccountData => {
                let f = arr(row, 3, "tag_account_data")?;
                let data = f[2].as_str().ok_or("tag data must be a string")?;
                let tags = json::parse(data.as_bytes()).map_err(|e| e.message)?;
                ensure(is_str(&f[0]) && is_str(&f[1]) && tags.as_object().is_some(), "tags")
            }
            StreamId::AccountData => {
                let f = arr(row, 3, "account_data")?;
                ensure(is_str(&f[0]) && is_opt_str(&f[1]) && is_str(&f[2]), "account_data")
            }
            StreamId::Groups => {
                let f = arr(row, 4, "groups")?;
                ensure(f[..3].iter().all(is_str) && f[3].as_object().is_some(), "groups")
            }
        }
    }

    fn cfg(seed: u64) -> SyntheticConfig {
        SyntheticConfig { rate: 0, seed, streams: StreamMask::ALL, pad_to: None }
    }

    #[test]
    fn every_line_is_well_formed_for_all_streams() {
        for seed in [1, 2, 0xdead_beef] {
            let (_, lines, out) = run(cfg(seed), &[1, 7, 1000, 20_000]);
            let mut seen = StreamMask::NONE;
            for p in &lines {
                seen.insert(p.stream);
            }
            assert!(seen.is_all(), "seed {seed}: only {seen:?}");
            let avg = out.len() / lines.len();
            assert!((100..=300).contains(&avg), "average line {avg} bytes");
        }
    }

    #[test]
    fn stream_mix_is_dominated_by_events_and_has_batch_runs() {
        let (_, lines, _) = run(cfg(9), &[50_000]);
        let count = |s: StreamId| lines.iter().filter(|p| p.stream == s).count();
        let events = count(StreamId::Events) as f64 / lines.len() as f64;
        assert!((0.5..0.7).contains(&events), "events share {events}");
        let mut by_count: Vec<(usize, StreamId)> = StreamId::ALL.iter().map(|&s| (count(s), s)).collect();
        by_count.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(by_count[0].1, StreamId::Events);
        assert_eq!(by_count[1].1, StreamId::Caches);
        for s in [StreamId::Events, StreamId::DeviceLists, StreamId::Caches, StreamId::Federation] {
            assert!(lines.iter().any(|p| p.stream == s && p.token == Token::Batch), "{s} has no batch run");
        }
        // Events batch runs are an `ev` row followed by its `state` row.
        for w in lines.windows(2) {
            if w[0].stream == StreamId::Events && w[0].token == Token::Batch {
                let kind = |p: &Parsed| p.row.as_array().and_then(|a| a[0].as_str()).map(str::to_owned);
                assert_eq!(kind(&w[0]).as_deref(), Some("ev"));
                assert_eq!(kind(&w[1]).as_deref(), Some("state"));
                let ev_id = w[0].row.as_array().and_then(|a| a[1].as_array()).map(|f| f[0].clone());
                let st_id = w[1].row.as_array().and_then(|a| a[1].as_array()).map(|f| f[3].clone());
                assert_eq!(ev_id, st_id);
            }
        }
        let cs =
            lines.iter().filter(|p| p.row.as_array().and_then(|a| a[0].as_str()) == Some("cs_cache_fake"));
        assert!(cs.count() > 10);
    }

    #[test]
    fn only_masked_streams_appear_and_others_keep_their_position() {
        let mut mask = StreamMask::NONE;
        mask.insert(StreamId::Typing);
        mask.insert(StreamId::UserSignature);
        mask.insert(StreamId::TagAccountData);
        let c = SyntheticConfig { streams: mask, ..cfg(4) };
        let start = Synthetic::new(c).positions();
        let (g, lines, _) = run(c, &[3000]);
        assert!(lines.iter().all(|p| mask.contains(p.stream)));
        for s in StreamId::ALL {
            if !mask.contains(s) {
                assert_eq!(g.positions()[s.index()], start[s.index()], "{s} moved");
            } else {
                assert!(g.positions()[s.index()] > start[s.index()], "{s} did not move");
            }
        }
        let c = SyntheticConfig { streams: StreamMask::NONE, ..cfg(4) };
        let mut g = Synthetic::new(c);
        let mut out = BytesMut::new();
        assert_eq!(g.generate(Now::default(), 10, &mut out, |_, _, _, _| {}), 0);
        assert!(out.is_empty());
    }

    #[test]
    fn shared_token_spaces_interleave() {
        let (_, lines, _) = run(cfg(5), &[30_000]);
        let tokens = |s: StreamId| -> Vec<i64> {
            lines
                .iter()
                .filter_map(|p| match p.token {
                    Token::Value(t) if p.stream == s => Some(t),
                    _ => None,
                })
                .collect()
        };
        let mut dl = tokens(StreamId::DeviceLists);
        let us = tokens(StreamId::UserSignature);
        assert!(!dl.is_empty() && !us.is_empty());
        dl.extend(&us);
        let n = dl.len();
        dl.sort_unstable();
        dl.dedup();
        assert_eq!(dl.len(), n, "device_lists and user_signature reuse a token");
    }

    #[test]
    fn deterministic_from_the_seed() {
        let (_, _, a) = run(cfg(77), &[500]);
        let (_, _, b) = run(cfg(77), &[500]);
        let (_, _, c) = run(cfg(78), &[500]);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(Synthetic::new(cfg(77)).positions(), Synthetic::new(cfg(77)).positions());
    }

    #[test]
    fn timestamps_come_from_wall_clock() {
        let mut g = Synthetic::new(SyntheticConfig { streams: StreamMask(StreamId::Caches.bit()), ..cfg(3) });
        let mut out = BytesMut::new();
        let wall = 1_700_000_000_123;
        g.generate(Now::new(5, wall), 50, &mut out, |_, _, _, _| {});
        let text = std::str::from_utf8(&out).unwrap();
        for line in text.lines() {
            assert!(line.ends_with(&format!(", {wall}]")), "{line}");
        }
    }

    #[test]
    fn padding_reaches_the_target_without_changing_shapes() {
        for target in [64, 256, 1000, 4096, 20_000] {
            let c = SyntheticConfig { pad_to: Some(target), ..cfg(6) };
            let (_, lines, out) = run(c, &[3000]);
            let cap = target.min(MAX_LINE_LEN + 1);
            let mut exact = 0;
            let mut start = 0;
            for line in out.split_inclusive(|&b| b == b'\n') {
                let len = line.len();
                start += len;
                if len == cap {
                    exact += 1;
                }
                // Only lines that were naturally longer exceed the target.
                assert!(len <= cap.max(4000), "{len} > {cap}");
            }
            assert_eq!(start, out.len());
            if target >= 1000 {
                // Everything except the state rows that follow their `ev` row is exact.
                assert!(exact * 10 >= lines.len() * 8, "{exact} of {} exact", lines.len());
            }
        }
    }

    #[test]
    fn due_paces_with_a_token_bucket() {
        let c = SyntheticConfig { rate: 1000, ..cfg(8) };
        let mut g = Synthetic::new(c);
        let t0 = Now::new(10_000, 1_583_254_800_000);
        assert_eq!(g.due(t0), 0, "the first call starts the clock");
        assert_eq!(g.due(t0.plus_ms(1)), 1);
        assert_eq!(g.due(t0.plus_ms(10)), 10, "not taken yet, so still due");
        let mut out = BytesMut::new();
        let n = g.generate(t0.plus_ms(10), 10, &mut out, |_, _, _, _| {});
        assert!(n >= 10);
        // Extra lines that completed a batch run are owed, and paid back over time.
        assert_eq!(g.due(t0.plus_ms(10)), 0);
        assert_eq!(g.due(t0.plus_ms(n as u64)), 0);
        assert_eq!(g.due(t0.plus_ms(n as u64 + 1)), 1);
        // A long pause gives at most one second's worth.
        assert_eq!(g.due(t0.plus_ms(60_000)), 1000);
        // A clock that steps back changes nothing.
        assert_eq!(g.due(t0), 1000);

        // Fractional rates accumulate exactly: 3 lines/s over 1 s in 10 ms steps.
        let mut g = Synthetic::new(SyntheticConfig { rate: 3, ..cfg(8) });
        g.due(t0);
        let mut total = 0;
        for step in 1..=100 {
            let due = g.due(t0.plus_ms(step * 10));
            if due > 0 {
                total += g.generate(t0, due, &mut out, |_, _, _, _| {});
            }
        }
        // At least the 3 due, at most one group (<= 5 lines) more.
        assert!((3..=7).contains(&total), "{total}");

        // Rate 0: unpaced.
        let mut g = Synthetic::new(cfg(8));
        assert_eq!(g.due(t0), UNPACED_BATCH);
    }

    #[test]
    fn sustained_pacing_matches_the_rate() {
        let mut g = Synthetic::new(SyntheticConfig { rate: 5000, ..cfg(10) });
        let t0 = Now::new(0, 0);
        g.due(t0);
        let mut out = BytesMut::new();
        let mut total = 0;
        for ms in 1..=2000u64 {
            let due = g.due(t0.plus_ms(ms));
            if due > 0 {
                total += g.generate(t0.plus_ms(ms), due, &mut out, |_, _, _, _| {});
                out.clear();
            }
        }
        // 2 s at 5000/s, give or take one batch run.
        assert!((10_000..=10_005).contains(&total), "{total}");
    }
}
