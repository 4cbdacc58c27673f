//! `user_data` of every submission: which kind of op it is and, for connection ops, which
//! connection (slot index plus generation), so a completion is routed without a lookup table
//! and a late completion for a slot that was since reused is recognised and ignored.
//!
//! Layout: bits 60..64 the op kind, bits 32..60 the low 28 bits of the generation, bits 0..32
//! the slot index.
use crate::hub::ConnId;

/// The kind of an op, in the top four bits of its `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    /// The multishot accept on the listener.
    Accept = 1,
    /// A connection's multishot recv.
    Recv = 2,
    /// A connection's gathered send (one in flight per socket).
    Send = 3,
    /// The poll on the mailbox eventfd.
    Wake = 4,
    /// The timer for the hub's and the driver's deadlines.
    Timeout = 5,
    /// An `AsyncCancel` (its completion is only counted).
    Cancel = 6,
}

impl Op {
    fn from_bits(v: u64) -> Option<Self> {
        Some(match v {
            1 => Self::Accept,
            2 => Self::Recv,
            3 => Self::Send,
            4 => Self::Wake,
            5 => Self::Timeout,
            6 => Self::Cancel,
            _ => return None,
        })
    }
}

const KIND_SHIFT: u32 = 60;
const GEN_BITS: u32 = 28;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;

/// The connection an op belongs to, as far as `user_data` can say: the slot index and the
/// low bits of the generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub index: u32,
    gen_low: u32,
}

impl Target {
    /// Whether this is (still) connection `id`.
    pub fn is(self, id: ConnId) -> bool {
        self.index == id.index && u64::from(self.gen_low) == u64::from(id.gen) & GEN_MASK
    }
}

/// `user_data` for an op of `kind` on connection `id`.
pub(super) const fn encode(kind: Op, id: ConnId) -> u64 {
    ((kind as u64) << KIND_SHIFT) | ((id.gen as u64 & GEN_MASK) << 32) | id.index as u64
}

/// `user_data` for an op that belongs to the loop, not to a connection.
pub(super) const fn encode_loop(kind: Op) -> u64 {
    (kind as u64) << KIND_SHIFT
}

/// Splits `user_data` back into its op kind and target; `None` for a value this driver never
/// submits.
pub(super) fn decode(user_data: u64) -> Option<(Op, Target)> {
    let kind = Op::from_bits(user_data >> KIND_SHIFT)?;
    let target = Target { index: user_data as u32, gen_low: ((user_data >> 32) & GEN_MASK) as u32 };
    Some((kind, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_kind_and_connection() {
        for kind in [Op::Accept, Op::Recv, Op::Send, Op::Wake, Op::Timeout, Op::Cancel] {
            for id in [
                ConnId { index: 0, gen: 0 },
                ConnId { index: 7, gen: 3 },
                ConnId { index: u32::MAX, gen: (1 << 28) - 1 },
            ] {
                let (k, t) = decode(encode(kind, id)).unwrap();
                assert_eq!(k, kind);
                assert!(t.is(id));
            }
        }
    }

    #[test]
    fn a_reused_slot_does_not_match_the_old_generation() {
        let old = ConnId { index: 5, gen: 1 };
        let new = ConnId { index: 5, gen: 2 };
        let (_, t) = decode(encode(Op::Recv, old)).unwrap();
        assert!(t.is(old));
        assert!(!t.is(new));
        assert!(!t.is(ConnId { index: 6, gen: 1 }));
    }

    #[test]
    fn unknown_kinds_are_rejected() {
        assert!(decode(0).is_none());
        assert!(decode(15 << KIND_SHIFT).is_none());
        assert_eq!(decode(encode_loop(Op::Wake)).map(|(k, _)| k), Some(Op::Wake));
    }
}
