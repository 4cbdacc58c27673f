//! The replication streams: the seed's 16 (PROTOCOL.md §6), in map order, then the streams
//! later releases added (PROTOCOL.md §8.2: `presence_federation`, Synapse 1.33+).

/// One of the streams replhub relays. The discriminant is the stream's index in map order and its
/// bit in a [`StreamMask`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum StreamId {
    /// `events`
    Events = 0,
    /// `backfill`
    Backfill,
    /// `presence`
    Presence,
    /// `typing`
    Typing,
    /// `receipts`
    Receipts,
    /// `push_rules`
    PushRules,
    /// `pushers`
    Pushers,
    /// `caches`
    Caches,
    /// `public_rooms`
    PublicRooms,
    /// `device_lists`
    DeviceLists,
    /// `to_device`
    ToDevice,
    /// `federation`
    Federation,
    /// `tag_account_data`
    TagAccountData,
    /// `account_data`
    AccountData,
    /// `groups`
    Groups,
    /// `user_signature`
    UserSignature,
    /// `presence_federation` (Synapse 1.33+, not in the seed; a 1.33+ master lists it after
    /// `presence`, but it takes the next free index here so the seed's indexes stay put).
    PresenceFederation,
}

impl StreamId {
    /// Number of streams.
    pub const COUNT: usize = 17;

    /// The seed's 16 streams, in map order (what the synthetic master and the load test serve).
    pub const SEED: [Self; 16] = [
        Self::Events,
        Self::Backfill,
        Self::Presence,
        Self::Typing,
        Self::Receipts,
        Self::PushRules,
        Self::Pushers,
        Self::Caches,
        Self::PublicRooms,
        Self::DeviceLists,
        Self::ToDevice,
        Self::Federation,
        Self::TagAccountData,
        Self::AccountData,
        Self::Groups,
        Self::UserSignature,
    ];

    /// Every stream in map order (the order of `REPLICATE ALL` replies): the seed's, then
    /// `presence_federation` (Synapse 1.33 on).
    pub const ALL: [Self; Self::COUNT] = {
        let mut all = [Self::PresenceFederation; Self::COUNT];
        let mut i = 0;
        while i < Self::SEED.len() {
            all[i] = Self::SEED[i];
            i += 1;
        }
        all
    };

    /// The wire name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Backfill => "backfill",
            Self::Presence => "presence",
            Self::Typing => "typing",
            Self::Receipts => "receipts",
            Self::PushRules => "push_rules",
            Self::Pushers => "pushers",
            Self::Caches => "caches",
            Self::PublicRooms => "public_rooms",
            Self::DeviceLists => "device_lists",
            Self::ToDevice => "to_device",
            Self::Federation => "federation",
            Self::TagAccountData => "tag_account_data",
            Self::AccountData => "account_data",
            Self::Groups => "groups",
            Self::UserSignature => "user_signature",
            Self::PresenceFederation => "presence_federation",
        }
    }

    /// Looks a wire name up, exactly and case-sensitively.
    pub fn from_name(name: &[u8]) -> Option<Self> {
        Some(match name {
            b"events" => Self::Events,
            b"backfill" => Self::Backfill,
            b"presence" => Self::Presence,
            b"typing" => Self::Typing,
            b"receipts" => Self::Receipts,
            b"push_rules" => Self::PushRules,
            b"pushers" => Self::Pushers,
            b"caches" => Self::Caches,
            b"public_rooms" => Self::PublicRooms,
            b"device_lists" => Self::DeviceLists,
            b"to_device" => Self::ToDevice,
            b"federation" => Self::Federation,
            b"tag_account_data" => Self::TagAccountData,
            b"account_data" => Self::AccountData,
            b"groups" => Self::Groups,
            b"user_signature" => Self::UserSignature,
            b"presence_federation" => Self::PresenceFederation,
            _ => return None,
        })
    }

    /// The stream with index `i`, if `i < COUNT`.
    pub fn from_index(i: usize) -> Option<Self> {
        Self::ALL.get(i).copied()
    }

    /// Index in map order.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// This stream's bit in a [`StreamMask`].
    pub const fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of streams as a bit mask (bit i = [`StreamId::ALL`]`[i]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StreamMask(pub u32);

impl StreamMask {
    /// No stream.
    pub const NONE: Self = Self(0);
    /// Every stream.
    pub const ALL: Self = Self((1 << StreamId::COUNT) - 1);
    /// The seed's 16 streams.
    pub const SEED: Self = Self(0xffff);

    /// Whether `s` is in the set.
    pub const fn contains(self, s: StreamId) -> bool {
        self.0 & s.bit() != 0
    }

    /// Adds `s`.
    pub fn insert(&mut self, s: StreamId) {
        self.0 |= s.bit();
    }

    /// Removes `s`.
    pub fn remove(&mut self, s: StreamId) {
        self.0 &= !s.bit();
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every stream is in the set.
    pub const fn is_all(self) -> bool {
        self.0 == Self::ALL.0
    }

    /// The streams in the set, in map order.
    pub fn iter(self) -> impl Iterator<Item = StreamId> {
        StreamId::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_in_map_order() {
        for (i, s) in StreamId::ALL.iter().enumerate() {
            assert_eq!(s.index(), i);
            assert_eq!(StreamId::from_name(s.name().as_bytes()), Some(*s));
            assert_eq!(StreamId::from_index(i), Some(*s));
        }
        assert_eq!(StreamId::from_name(b"Events"), None);
        assert_eq!(StreamId::from_name(b"ALL"), None);
        assert_eq!(StreamId::from_index(16), Some(StreamId::PresenceFederation));
        assert_eq!(StreamId::from_index(17), None);
        assert!(StreamId::SEED.iter().all(|s| StreamMask::SEED.contains(*s)));
        assert!(!StreamMask::SEED.contains(StreamId::PresenceFederation));
    }

    #[test]
    fn mask_operations() {
        let mut m = StreamMask::NONE;
        assert!(m.is_empty());
        m.insert(StreamId::Caches);
        m.insert(StreamId::Events);
        assert!(m.contains(StreamId::Caches) && !m.contains(StreamId::Typing));
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![StreamId::Events, StreamId::Caches]);
        m.remove(StreamId::Caches);
        assert_eq!(m, StreamMask(1));
        assert!(StreamMask::ALL.is_all());
    }
}
