//! A released Synapse version (PROTOCOL.md §8.1, §8.2): the one place that says what a given
//! release's master sends and accepts. The synthetic master, the hub's forwarding rules and
//! `replhub tail` all ask a [`SynapseRelease`]; its wire [`Generation`] is derived from it.
//!
//! | from | change (master side)                                                          |
//! |------|-------------------------------------------------------------------------------|
//! | 1.10 | `REPLICATE <s> <token>` catch-up, `device_lists` `[user_id, destination]`,     |
//! |      | `SYNC`, no `CLEAR_USER_SYNC` (1.10–1.12 write and accept the same lines)       |
//! | 1.13 | instance names in RDATA/POSITION, bare `REPLICATE`, `device_lists` `[entity]`, |
//! |      | `CLEAR_USER_SYNC`, no `SYNC`                                                   |
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
//! Every release from 1.10 to 1.66 is known here (TCP replication ended with 1.66; 1.10, 1.11
//! and 1.12 differ only in how far back a master catches a worker up, which replhub's
//! history decides for itself). The unreleased seed is no release: `None` where a release is
//! optional.
use super::command::{CommandWord, Role};
use super::error::{FieldError, PeerError};
use super::fields::Rdata;
use super::generation::{
    parse_any_federation_ack, parse_any_position, parse_any_rdata, parse_instance_user_sync, Generation,
    RdataForm,
};
use super::inbound::{check_command, parse_args};
use super::line::Line;
use super::stream::{StreamId, StreamMask};

/// A Synapse release `1.<minor>` whose master speaks TCP replication (1.10–1.66).
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
    /// The oldest release known here.
    pub const OLDEST: Self = Self { minor: 10 };
    /// The first release with instance names, a bare `REPLICATE` and 1.13's parse order.
    pub const V1_13: Self = Self { minor: 13 };
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
        } else if self.minor >= 13 {
            Generation::V1_13
        } else {
            Generation::V1_10
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

    /// Whether `device_lists` rows are `[entity]` (1.13+: a user id or a remote server name)
    /// rather than `[user_id, destination]` (destination `null` when no server is poked).
    pub const fn device_lists_entity(self) -> bool {
        self.minor >= 13
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
            CommandWord::ClearUserSync => self.minor >= 13,
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

/// How a master of Synapse 1.13+ checks a received line (PROTOCOL.md §8.2), for a connection
/// replhub knows to be of that generation: the master's protocol generation (for the shape of
/// POSITION) and, if pinned, its release (for the commands it knows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReleasedParse {
    /// The protocol generation of the master replhub plays (1.13 or 1.22).
    pub generation: Generation,
    /// The master's release, when pinned.
    pub release: Option<SynapseRelease>,
}

impl ReleasedParse {
    /// Whether the master knows `word` at all: the pinned release's commands, else 1.13's.
    fn knows(self, word: CommandWord) -> bool {
        self.release.unwrap_or(SynapseRelease::V1_13).knows_command(word)
    }
}

/// The receive checks of a Synapse 1.13+ master for one line from a peer in `role`'s other
/// side, in its order: the command word is looked up (`failed to parse line:
/// KeyError('<word>') ('<line>'):` if unknown), then its arguments parsed in that release's
/// forms (`failed to parse line: <exception> ('<line>'):`), and only then the direction
/// checked (`invalid command: <word>`). Invalid UTF-8 fails as in the seed's check.
pub fn check_released_line(role: Role, line: &Line, rules: ReleasedParse) -> Result<CommandWord, PeerError> {
    if std::str::from_utf8(line.as_bytes()).is_err() {
        return check_command(role, line);
    }
    let word = match line.command() {
        Some(word) if rules.knows(word) => word,
        _ => return Err(PeerError::unknown_command(line.as_bytes())),
    };
    let args = line.args();
    let parsed: Result<(), FieldError> = match word {
        // `_SimpleCommand`s and 1.13's REPLICATE, whose arguments are ignored: never fail.
        CommandWord::Server
        | CommandWord::Name
        | CommandWord::Error
        | CommandWord::Ping
        | CommandWord::RemoteServerUp
        | CommandWord::ClearUserSync
        | CommandWord::Replicate => Ok(()),
        CommandWord::UserSync => parse_instance_user_sync(args).map(drop),
        CommandWord::FederationAck => parse_any_federation_ack(args).map(drop),
        CommandWord::Position => parse_any_position(args, Some(rules.generation)).map(drop),
        CommandWord::Rdata => parse_any_rdata(args, RdataForm::Instance).and_then(|r| {
            super::fields::validate_rdata(&Rdata { stream: r.stream, token: r.token, row: r.row })
        }),
        // Unchanged since the seed: its parsers say what Synapse says.
        _ => match parse_args(word, line) {
            Ok(_) => Ok(()),
            Err(PeerError::Parse { detail, .. }) => Err(FieldError(detail)),
            Err(other) => return Err(other),
        },
    };
    if let Err(e) = parsed {
        let line = String::from_utf8_lossy(line.as_bytes()).into_owned();
        return Err(PeerError::LineParse { detail: e.0, line });
    }
    if !word.accepted_by(role) {
        return Err(PeerError::InvalidCommand(word.as_str().to_owned()));
    }
    Ok(word)
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
        assert_eq!("1.12.4".parse(), Ok(r(12)));
        assert_eq!("1.10".parse(), Ok(SynapseRelease::OLDEST));
        for bad in ["1.9", "1.67", "2.0", "1", "1.x", "1.22.", "1.22.1.1", ""] {
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
        assert!(!r(17).federation_ack_has_instance() && r(18).federation_ack_has_instance());
        assert!(r(32).federation_presence_rows() && !r(33).federation_presence_rows());
        assert_eq!(
            SynapseRelease::of_generation(Generation::V1_22).map(|r| r.minor()).collect::<Vec<_>>(),
            (22..=66).collect::<Vec<_>>()
        );
    }

    #[test]
    fn releases_1_10_to_1_12_are_the_1_10_generation() {
        for m in 10..=12 {
            let v = r(m);
            assert_eq!(v.generation(), Generation::V1_10, "1.{m}");
            assert!(!v.has_instance_names() && !v.position_has_prev() && !v.compact_json(), "1.{m}");
            assert!(!v.device_lists_entity() && !v.federation_ack_has_instance(), "1.{m}");
            assert!(v.federation_presence_rows(), "1.{m}");
            assert_eq!(v.ev_fields(), 6, "1.{m}");
            // 1.12.4's COMMAND_MAP: every seed word, and not CLEAR_USER_SYNC.
            for word in CommandWord::ALL {
                assert_eq!(v.knows_command(word), word != CommandWord::ClearUserSync, "1.{m} {word:?}");
            }
            // 1.12.4's STREAMS_MAP is the seed's 16, in the seed's order.
            assert_eq!(v.streams().collect::<Vec<_>>(), StreamId::SEED, "1.{m}");
        }
        assert!(r(13).device_lists_entity() && r(13).knows_command(CommandWord::ClearUserSync));
        assert_eq!(
            SynapseRelease::of_generation(Generation::V1_10).map(|r| r.minor()).collect::<Vec<_>>(),
            [10, 11, 12]
        );
        assert_eq!(SynapseRelease::all().count(), 57);
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

    fn released_check(role: Role, text: &str, rules: ReleasedParse) -> Result<CommandWord, String> {
        let line = Line::new(bytes::Bytes::copy_from_slice(text.as_bytes()));
        check_released_line(role, &line, rules)
            .map_err(|e| String::from_utf8_lossy(&e.to_line()).into_owned())
    }

    #[test]
    fn the_parse_order_and_errors_of_a_released_master() {
        let v22 = ReleasedParse { generation: Generation::V1_22, release: None };
        let check = |text| released_check(Role::Server, text, v22);
        assert_eq!(check("USER_SYNC AbCdE @a:hs start 16"), Ok(CommandWord::UserSync));
        assert_eq!(check("REPLICATE"), Ok(CommandWord::Replicate));
        assert_eq!(check("REPLICATE events 5"), Ok(CommandWord::Replicate), "arguments ignored");
        // Unknown words, the empty one included: a KeyError with the whole line.
        assert_eq!(check("SYNC 5"), Err("ERROR failed to parse line: KeyError('SYNC') ('SYNC 5'):\n".into()));
        assert_eq!(check(" NAME x"), Err("ERROR failed to parse line: KeyError('') (' NAME x'):\n".into()));
        // A blank line too: 1.13–1.66 compare the bytes received with `""`, which never
        // matches, so `parse_command_from_line("")` looks up the empty word.
        assert_eq!(check(""), Err("ERROR failed to parse line: KeyError('') (''):\n".into()));
        assert_eq!(check("  "), Err("ERROR failed to parse line: KeyError('') ('  '):\n".into()));
        // Arguments before direction: a bad one is a parse error even from the wrong side.
        assert_eq!(
            check("USER_SYNC @a:hs start 16"),
            Err("ERROR failed to parse line: ValueError('not enough values to unpack (expected 4, got 3)') \
                 ('USER_SYNC @a:hs start 16'):\n"
                .into())
        );
        assert_eq!(
            check("POSITION events master x 5"),
            Err("ERROR failed to parse line: ValueError(\"invalid literal for int() with base 10: 'x'\") \
                 ('POSITION events master x 5'):\n"
                .into())
        );
        assert_eq!(check("POSITION events master 4 5"), Err("ERROR invalid command: POSITION\n".into()));
        assert_eq!(check("RDATA events master 5 [\"ev\", []]"), Err("ERROR invalid command: RDATA\n".into()));
        // A pinned release knows fewer words.
        let r66 = ReleasedParse { generation: Generation::V1_22, release: SynapseRelease::new(66) };
        assert_eq!(
            released_check(Role::Server, "REMOVE_PUSHER m.http k @a:hs", r66),
            Err("ERROR failed to parse line: KeyError('REMOVE_PUSHER') ('REMOVE_PUSHER m.http k @a:hs'):\n"
                .into())
        );
        assert_eq!(
            released_check(Role::Server, "REMOVE_PUSHER m.http k @a:hs", v22),
            Ok(CommandWord::RemovePusher)
        );
    }

    #[test]
    fn a_1_13_worker_refuses_a_1_22_position_as_recorded() {
        // PROTOCOL.md §8.3.1: what a 1.13 worker answered to a 1.22 master's POSITION.
        let v13 = ReleasedParse { generation: Generation::V1_13, release: None };
        assert_eq!(
            released_check(Role::Client, "POSITION events master 100 100", v13),
            Err("ERROR failed to parse line: ValueError(\"invalid literal for int() with base 10: '100 100'\") \
                 ('POSITION events master 100 100'):\n"
                .into())
        );
        assert_eq!(
            released_check(Role::Client, "POSITION events master 100", v13),
            Ok(CommandWord::Position)
        );
    }
}
