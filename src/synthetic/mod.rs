//! The synthetic master: realistic `RDATA` lines for all 16 streams, with no Synapse at all.
//!
//! `replhub serve --synthetic RATE` runs the hub on it, and `replhub loadtest` feeds workers
//! from it. It is sans-IO like the protocol core: it never reads the clock (every call takes a
//! [`Now`]) and never touches a socket; it appends finished lines to a buffer and reports each
//! line's stream, token and byte range, so the caller can index them without re-parsing.
//!
//! What it writes follows the seed (PROTOCOL.md §5.2, §6), or, with
//! [`SyntheticConfig::release`], what that Synapse release's master writes (PROTOCOL.md §8:
//! 1.10–1.12 the seed's lines but `device_lists` rows `[user_id, destination]`; from 1.13 the
//! instance name `master` in every RDATA and `[entity]` rows, compact JSON from 1.19, 8- or
//! 9-field `ev` rows, that release's streams, no federation `p` rows from 1.33), as
//! [`SynapseRelease`] says:
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
//!
//! Layout: `pacing` (how many lines are due), `world` (users, rooms, recent events, the
//! random source), `line` (the `RDATA` frame, ids, padding), one writer file per group of
//! streams (`events`, `presence` with `federation`, `caches`, `rows` for the rest), [`shape`]
//! (the row shapes of PROTOCOL.md §6, which `replhub tail --decode` and the tests here both
//! read), and [`source`] (the generator behind the upstream event interface).
use bytes::{BufMut, BytesMut};

use crate::proto::{StreamId, StreamMask, SynapseRelease, Token};
use crate::time::Now;

mod caches;
mod events;
#[cfg(test)]
pub(crate) mod generations;
mod line;
mod pacing;
mod presence;
mod rows;
pub(crate) mod shape;
pub(crate) mod source;
#[cfg(test)]
mod tests;
mod world;

use line::{compact_separators, pad_line, LineCtx, PadSlot};
use pacing::Pacer;
pub(crate) use pacing::UNPACED_BATCH;
pub(crate) use source::SyntheticSource;
use world::{Rng, World, REMOTE_SERVERS};

/// Configuration of the synthetic master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticConfig {
    /// Lines per second; 0 = unpaced ("as fast as asked": [`Synthetic::due`] always offers
    /// `UNPACED_BATCH`).
    pub rate: u64,
    /// Seed of the row generator: the same seed gives the same rows and tokens.
    pub seed: u64,
    /// Which streams to generate. Other streams keep their starting position.
    pub streams: StreamMask,
    /// Pad rows so each line, `\n` included, is about this many bytes (capped at the protocol's
    /// line limit); `None` = natural sizes. Lines already longer are left alone.
    pub pad_to: Option<usize>,
    /// The Synapse release whose master's lines to write; `None` = the seed's. Only that
    /// release's streams are generated (`streams` is narrowed to them).
    pub release: Option<SynapseRelease>,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self { rate: 1000, seed: 1, streams: StreamMask::SEED, pad_to: None, release: None }
    }
}

impl SyntheticConfig {
    /// The defaults for `release`'s master (every stream it writes), or the seed's.
    pub fn for_release(release: Option<SynapseRelease>) -> Self {
        let streams = release.map_or(StreamMask::SEED, SynapseRelease::stream_mask);
        Self { streams, release, ..Self::default() }
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
    40,  // presence_federation (Synapse 1.33+; not a seed stream)
];

/// The built-in synthetic master (sans-IO). See the module docs.
#[derive(Debug)]
pub struct Synthetic {
    cfg: SyntheticConfig,
    /// The pools of ids and the random source.
    world: World,
    /// Last token emitted per stream (initially the starting position).
    tokens: [i64; StreamId::COUNT],
    /// Token counters, indexed by [`counter_slot`] (shared streams share a slot).
    counters: [i64; StreamId::COUNT],
    /// Cumulative group weights of the streams in the mask.
    table: Vec<(StreamId, u32)>,
    pacer: Pacer,
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
    pub fn new(mut cfg: SyntheticConfig) -> Self {
        if let Some(release) = cfg.release {
            cfg.streams = StreamMask(cfg.streams.0 & release.stream_mask().0);
        }
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
                StreamId::UserSignature | StreamId::TagAccountData | StreamId::PresenceFederation => (0, 1),
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
        Self {
            cfg,
            world: World::new(rng),
            tokens,
            counters,
            table,
            pacer: Pacer::new(cfg.rate),
            scratch: Vec::new(),
            inner: Vec::new(),
        }
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
        self.pacer.due(now)
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
            let r = self.world.rng.below(total as usize) as u32;
            let stream = self.table.iter().find(|(_, c)| r < *c).map_or(StreamId::Events, |e| e.0);
            written += self.group(stream, now, out, &mut on_line);
        }
        self.pacer.spend(written);
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
        let instance = self.cfg.release.is_some_and(SynapseRelease::has_instance_names);
        let mut line =
            LineCtx { stream, token, rows: self.group_size(stream), written: 0, instance, json_at: 0 };
        match stream {
            StreamId::Events => return self.events_group(out, &mut line, on_line),
            StreamId::DeviceLists if !self.device_lists_entity() => {
                // Before 1.13 a row is `[user_id, destination]`: one user's device change, one
                // row per remote server poked (distinct, as the master's `GROUP BY user_id,
                // destination` makes them), or one row with `null` when none is.
                let user = self.world.user();
                let first = self.world.rng.below(REMOTE_SERVERS.len());
                let nobody = line.rows == 1 && self.world.rng.chance(25);
                while line.more() {
                    let start = line.begin(out);
                    let dest =
                        (!nobody).then(|| REMOTE_SERVERS[(first + line.written) % REMOTE_SERVERS.len()]);
                    let slot = self.row_device_list_poke(out, user, dest);
                    self.finish(out, start, &mut line, Some(slot), on_line);
                }
            }
            StreamId::Caches if line.rows > 1 => {
                let room = self.world.rooms[self.world.rng.skewed(self.world.rooms.len())].clone();
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
            StreamId::DeviceLists => 1 + self.world.rng.below(5),
            StreamId::Caches if self.world.rng.chance(8) => 2 + self.world.rng.below(3),
            StreamId::Federation if self.world.rng.chance(30) => 2 + self.world.rng.below(2),
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

    /// Whether `device_lists` rows are `[entity]` (the seed, Synapse 1.13+) rather than
    /// `[user_id, destination]` (1.10–1.12).
    fn device_lists_entity(&self) -> bool {
        self.cfg.release.is_none_or(SynapseRelease::device_lists_entity)
    }

    /// Whether rows use compact JSON separators (Synapse 1.19+).
    fn compact(&self) -> bool {
        self.cfg.release.is_some_and(SynapseRelease::compact_json)
    }

    /// Ends a line: compacts its JSON (1.19+), pads it, adds `\n`, reports it. Returns the
    /// filler length used.
    fn finish(
        &mut self,
        out: &mut BytesMut,
        start: usize,
        line: &mut LineCtx,
        slot: Option<PadSlot>,
        on_line: &mut dyn FnMut(StreamId, Token, usize, usize),
    ) -> usize {
        let compact = self.compact();
        let slot = if compact {
            // The writers write simplejson's `", "`/`": "`; a 1.19+ master writes `","`/`":"`.
            let removed_before = compact_separators(out, line.json_at, slot.map(|s| s.at));
            slot.map(|s| PadSlot { at: s.at - removed_before, ..s })
        } else {
            slot
        };
        let fill = match (slot, self.cfg.pad_to) {
            (Some(slot), Some(target)) => pad_line(&mut self.scratch, out, start, slot, target, compact),
            _ => 0,
        };
        out.put_u8(b'\n');
        let token = line.token_for_current();
        on_line(line.stream, token, start, out.len());
        line.written += 1;
        fill
    }
}
