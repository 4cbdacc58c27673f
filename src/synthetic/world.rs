//! The world the rows talk about: users, rooms, groups, recent events, and the random source
//! every choice is drawn from.
//!
//! A few rooms and users are much busier than the rest ([`Rng::skewed`]), as on a real
//! homeserver. Everything here is deterministic from the seed.

/// The server name of "our" homeserver.
pub(super) const LOCAL_SERVER: &str = "example.com";
/// Federated servers, for remote users, rooms and destinations.
pub(super) const REMOTE_SERVERS: &[&str] = &[
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
/// The base64url alphabet (event ids, pushkeys, device ids; its first 52 letters for room ids).
pub(super) const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// `$` + 43 base64url characters: the shape of a room-v4 event id.
pub(super) type EventId = [u8; 44];

/// How many recent event ids are kept for receipts, redactions and relations to point at.
const RECENT_EVENTS: usize = 256;

/// SplitMix64: tiny, fast, and good enough for test data.
#[derive(Clone, Debug)]
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub(super) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }

    /// True with probability `percent`/100.
    pub(super) fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub(super) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// An index in `0..n` skewed towards 0, so a few rooms and users are busy.
    pub(super) fn skewed(&mut self, n: usize) -> usize {
        let k = self.below(n) + 1;
        self.below(k)
    }
}

/// The pools rows draw their ids from, and the random source.
#[derive(Debug)]
pub(super) struct World {
    pub(super) rng: Rng,
    pub(super) users: Vec<String>,
    pub(super) rooms: Vec<String>,
    pub(super) groups: Vec<String>,
    recent_events: Vec<EventId>,
    recent_next: usize,
}

impl World {
    /// Populates the pools from `rng` (400 users, 150 rooms, 10 groups, 16 recent events).
    pub(super) fn new(mut rng: Rng) -> Self {
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
            rng,
            users,
            rooms,
            groups,
            recent_events: Vec::with_capacity(RECENT_EVENTS),
            recent_next: 0,
        };
        for _ in 0..16 {
            let id = me.new_event_id();
            me.remember_event(id);
        }
        me
    }

    /// A user, as an index into `users`.
    pub(super) fn user(&mut self) -> usize {
        self.rng.skewed(self.users.len())
    }

    /// A room, as an index into `rooms`.
    pub(super) fn room(&mut self) -> usize {
        self.rng.skewed(self.rooms.len())
    }

    pub(super) fn new_event_id(&mut self) -> EventId {
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

    pub(super) fn remember_event(&mut self, id: EventId) {
        if self.recent_events.len() < RECENT_EVENTS {
            self.recent_events.push(id);
        } else {
            self.recent_events[self.recent_next] = id;
            self.recent_next = (self.recent_next + 1) % RECENT_EVENTS;
        }
    }

    pub(super) fn recent_event(&mut self) -> EventId {
        let i = self.rng.below(self.recent_events.len());
        self.recent_events[i]
    }

    /// A server name, remote four times out of five.
    pub(super) fn server(&mut self) -> &'static str {
        if self.rng.chance(20) {
            LOCAL_SERVER
        } else {
            self.rng.pick(REMOTE_SERVERS)
        }
    }
}
