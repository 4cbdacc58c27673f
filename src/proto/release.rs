//! A released Synapse version (PROTOCOL.md §8.1, §8.2): the one place that says what a given
//! release's master sends and accepts. The synthetic master, the hub's forwarding rules and
//! `replhub tail` all ask a [`SynapseRelease`]; its wire [`Generation`] is derived from it.
//!
//! | from | change (master side)                                                          |
//! |------|-------------------------------------------------------------------------------|
//! | 1.13 | instance names in RDATA/POSITION, bare `REPLICATE`, `device_lists` `[entity]`  |
//! | 1.14 | no `INVALIDATE_CACHE`                                                          |
//! | 1.18 | `FEDERATION_ACK <instance> <token>`                                            |
//! | 1.19 | compact JSON separators (`","`, `":"`)                                         |
//! | 1.22 | `POSITION <s> <instance> <prev> <new>`                                         |
//! | 1.23 | `ev` rows of 8 fields (`membership`, `rejected`)                               |
//! | 1.29 | no `REMOVE_PUSHER`                                                             |
//! | 1.33 | `presence_federation` stream; no federation `p` rows                           |
//! | 1.41 | no `public_rooms` stream                                                       |
//! | 1.61 | no `groups` stream                                                             |
//! | 1.64 | `ev` rows of 9 fields (`outlier`)                                              |
//!
//! Only the 1.13–1.66 releases are known here (TCP replication ended with 1.66); the 1.10–1.12
//! generation is another wire format altogether.
use super::command::CommandWord;
use super::generation::Generation;
use super::stream::{StreamId, StreamMask};

/// A Synapse release `1.<minor>` whose master speaks TCP replication (1.13–1.66).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct SynapseRelease {
    minor: u16,
}

/// Every stream in the map order of the release that has it: the seed's order, with
/// `presence_federation` after `presence` (where 1.33+ masters list it).
const MAP_ORDER: [StreamId; StreamId::COUNT] = [
    StreamId::Events,
    StreamId::Backfill,
    StreamId::Presence,
    StreamId::PresenceFederation,
    StreamId::Typing,
    StreamId::Receipts,
    StreamId::PushRules,
    StreamId::Pushers,
    StreamId::Caches,
    StreamId::PublicRooms,
    StreamId::DeviceLists,
    StreamId::ToDevice,
    StreamId::Federation,
    StreamId::TagAccountData,
    StreamId::AccountData,
    StreamId::Groups,
    StreamId::UserSignature,
];

impl SynapseRelease {
    /// The oldest release known here (the first with instance names).
    pub const OLDEST: Self = Self { minor: 13 };
    /// The newest release with TCP replication.
    pub const NEWEST: Self = Self { minor: 66 };

    /// `1.<minor>`, if TCP replication of that release is known here.
    pub const fn new(minor: u16) -> Option<Self> {
        if minor >= Self::OLDEST.minor && minor <= Self::NEWEST.minor {
            Some(Self { minor })
        } else {
            None
        }
    }

    /// The `<minor>` of `1.<minor>`.
    pub const fn minor(self) -> u16 {
        self.minor
    }

    /// Every known release, oldest first.
    pub fn all() -> impl Iterator<Item = Self> {
        (Self::OLDEST.minor..=Self::NEWEST.minor).map(|minor| Self { minor })
    }

    /// The wire generation this release's master speaks.
    pub const fn generation(self) -> Generation {
        if self.minor >= 22 {
            Generation::V1_22
        } else {
            Generation::V1_13
        }
    }

    /// Whether RDATA and POSITION carry the writer's instance name.
    pub const fn has_instance_names(self) -> bool {
        self.minor >= 13
    }

    /// Whether POSITION carries `<prev> <new>` (1.22+).
    pub const fn position_has_prev(self) -> bool {
        self.minor >= 22
    }

    /// Whether rows are JSON with compact separators, `","` and `":"` (1.19+), rather than
    /// `", "` and `": "`.
    pub const fn compact_json(self) -> bool {
        self.minor >= 19
    }

    /// How many fields an `events` `ev` row's data has: 6, 8 (1.23+) or 9 (1.64+).
    pub const fn ev_fields(self) -> usize {
        if self.minor >= 64 {
            9
        } else if self.minor >= 23 {
            8
        } else {
            6
        }
    }

    /// Whether `federation` rows of kind `p` (presence) are sent (dropped in 1.33 for the
    /// `presence_federation` stream).
    pub const fn federation_presence_rows(self) -> bool {
        self.minor < 33
    }

    /// Whether `FEDERATION_ACK` names the sending instance (1.18+).
    pub const fn federation_ack_has_instance(self) -> bool {
        self.minor >= 18
    }

    /// Whether this release's master writes `stream`.
    pub const fn has_stream(self, stream: StreamId) -> bool {
        match stream {
            StreamId::PresenceFederation => self.minor >= 33,
            StreamId::PublicRooms => self.minor < 41,
            StreamId::Groups => self.minor < 61,
            _ => true,
        }
    }

    /// The streams this release's master writes, in its map order (the order of the
    /// POSITIONs answering `REPLICATE`).
    pub fn streams(self) -> impl Iterator<Item = StreamId> {
        MAP_ORDER.into_iter().filter(move |&s| self.has_stream(s))
    }

    /// [`Self::streams`] as a mask.
    pub fn stream_mask(self) -> StreamMask {
        let mut mask = StreamMask::NONE;
        for s in self.streams() {
            mask.insert(s);
        }
        mask
    }

    /// Whether this release's master knows the command `word` at all (in either direction).
    /// One it does not know makes it answer `ERROR failed to parse line: KeyError(...)` and
    /// close the connection.
    pub const fn knows_command(self, word: CommandWord) -> bool {
        match word {
            CommandWord::InvalidateCache => self.minor < 14,
            CommandWord::RemovePusher => self.minor < 29,
            CommandWord::Sync => self.minor < 13,
            _ => true,
        }
    }

    /// The releases whose master speaks `generation`, oldest first.
    pub fn of_generation(generation: Generation) -> impl Iterator<Item = Self> {
        Self::all().filter(move |r| r.generation() == generation)
    }
}

impl From<SynapseRelease> for Generation {
    fn from(r: SynapseRelease) -> Self {
        r.generation()
    }
}

/// Every stream in the map order of the newest release that has it (`presence_federation`
/// after `presence`): the order replies to `REPLICATE` list served streams in.
pub fn map_order() -> impl Iterator<Item = StreamId> {
    MAP_ORDER.into_iter()
}

impl std::fmt::Display for SynapseRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "1.{}", self.minor)
    }
}

impl std::str::FromStr for SynapseRelease {
    type Err = String;
    /// `1.66`, or a full version like `1.22.1` (the patch level changes nothing on the wire).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "unknown Synapse version {s:?} (expected 1.{}–1.{}, e.g. 1.66 or 1.22.1)",
                Self::OLDEST.minor,
                Self::NEWEST.minor
            )
        };
        let mut parts = s.split('.');
        let (Some("1"), Some(minor)) = (parts.next(), parts.next()) else {
            return Err(bad());
        };
        let patch_ok = match (parts.next(), parts.next()) {
            (None, _) => true,
            (Some(p), None) => !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()),
            _ => false,
        };
        let minor: u16 = minor.parse().map_err(|_| bad())?;
        match Self::new(minor) {
            Some(r) if patch_ok => Ok(r),
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for SynapseRelease {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(minor: u16) -> SynapseRelease {
        SynapseRelease::new(minor).unwrap()
    }

    #[test]
    fn versions_parse() {
        assert_eq!("1.66".parse(), Ok(r(66)));
        assert_eq!("1.22.1".parse(), Ok(r(22)));
        assert_eq!(r(13).to_string(), "1.13");
        for bad in ["1.12", "1.67", "2.0", "1", "1.x", "1.22.", "1.22.1.1", ""] {
            assert!(bad.parse::<SynapseRelease>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_changes_by_release() {
        assert_eq!(
            [13, 18, 19, 21, 22].map(|m| (r(m).generation(), r(m).compact_json())),
            [
                (Generation::V1_13, false),
                (Generation::V1_13, false),
                (Generation::V1_13, true),
                (Generation::V1_13, true),
                (Generation::V1_22, true),
            ]
        );
        assert_eq!([22, 23, 63, 64, 66].map(|m| r(m).ev_fields()), [6, 8, 8, 9, 9]);
        assert!(r(13).knows_command(CommandWord::InvalidateCache));
        assert!(!r(14).knows_command(CommandWord::InvalidateCache));
        assert!(r(28).knows_command(CommandWord::RemovePusher));
        assert!(!r(29).knows_command(CommandWord::RemovePusher));
        assert!(!r(13).knows_command(CommandWord::Sync));
        assert!(r(17).federation_ack_has_instance() == false && r(18).federation_ack_has_instance());
        assert!(r(32).federation_presence_rows() && !r(33).federation_presence_rows());
        assert_eq!(
            SynapseRelease::of_generation(Generation::V1_22).map(|r| r.minor()).collect::<Vec<_>>(),
            (22..=66).collect::<Vec<_>>()
        );
    }

    #[test]
    fn stream_sets_as_the_masters_list_them() {
        let names = |m: u16| r(m).streams().map(StreamId::name).collect::<Vec<_>>();
        assert_eq!(names(13).len(), 16);
        assert_eq!(names(13), StreamId::SEED.map(StreamId::name));
        assert_eq!(&names(33)[2..4], ["presence", "presence_federation"]);
        assert!(names(40).contains(&"public_rooms") && !names(41).contains(&"public_rooms"));
        assert!(names(60).contains(&"groups") && !names(61).contains(&"groups"));
        assert_eq!(names(66).len(), 15);
        assert_eq!(r(66).stream_mask().iter().count(), 15);
    }
}
