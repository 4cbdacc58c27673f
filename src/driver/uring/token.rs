//! `user_data` of every submission: which kind of op it is and, for connection ops, which
//! connection (slot index plus generation), so a completion finds its socket in the driver's
//! slot table and a late completion for a slot that was since reused is recognised and ignored.
//!
//! Layout: bits 60..64 the op kind, bits 28..60 the generation, bits 0..28 the slot index. A
//! core never holds 2^28 connections at once (each costs a file descriptor and kilobytes of
//! memory), and the driver refuses one whose index would not fit ([`fits`]).
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
    /// The READ of the mailbox eventfd.
    Wake = 4,
    /// The timer for the hub's and the driver's deadlines.
    Timeout = 5,
    /// An `AsyncCancel` (its completion is only counted).
    Cancel = 6,
    /// The multishot accept on the Redis-mode listener.
    AcceptResp = 7,
    /// The end of a write moderation window (`driver::moderation`).
    Hold = 8,
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
            7 => Self::AcceptResp,
            8 => Self::Hold,
            _ => return None,
        })
    }
}

const KIND_SHIFT: u32 = 60;
const GEN_SHIFT: u32 = 28;
const INDEX_MASK: u64 = (1 << GEN_SHIFT) - 1;

/// Whether `id` can be carried in `user_data` (its slot index fits in 28 bits).
pub(super) const fn fits(id: ConnId) -> bool {
    id.index as u64 <= INDEX_MASK
}

/// `user_data` for an op of `kind` on connection `id` (which [`fits`]).
pub(super) const fn encode(kind: Op, id: ConnId) -> u64 {
    ((kind as u64) << KIND_SHIFT) | ((id.gen as u64) << GEN_SHIFT) | (id.index as u64 & INDEX_MASK)
}

/// `user_data` for an op that belongs to the loop, not to a connection.
pub(super) const fn encode_loop(kind: Op) -> u64 {
    (kind as u64) << KIND_SHIFT
}

/// Splits `user_data` back into its op kind and connection; `None` for a value this driver
/// never submits.
pub(super) fn decode(user_data: u64) -> Option<(Op, ConnId)> {
    let kind = Op::from_bits(user_data >> KIND_SHIFT)?;
    let id = ConnId { index: (user_data & INDEX_MASK) as u32, gen: (user_data >> GEN_SHIFT) as u32 };
    Some((kind, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_kind_and_connection() {
        for kind in [Op::Accept, Op::Recv, Op::Send, Op::Wake, Op::Timeout, Op::Cancel, Op::AcceptResp] {
            for id in [
                ConnId { index: 0, gen: 0 },
                ConnId { index: 7, gen: 3 },
                ConnId { index: (1 << 28) - 1, gen: u32::MAX },
            ] {
                assert!(fits(id));
                assert_eq!(decode(encode(kind, id)), Some((kind, id)));
            }
        }
    }

    #[test]
    fn a_reused_slot_does_not_match_the_old_generation() {
        let old = ConnId { index: 5, gen: 1 };
        let new = ConnId { index: 5, gen: 2 };
        let (_, t) = decode(encode(Op::Recv, old)).unwrap();
        assert_eq!(t, old);
        assert_ne!(t, new);
    }

    #[test]
    fn an_index_beyond_28_bits_does_not_fit() {
        assert!(!fits(ConnId { index: 1 << 28, gen: 0 }));
        assert!(!fits(ConnId { index: u32::MAX, gen: 0 }));
    }

    #[test]
    fn unknown_kinds_are_rejected() {
        assert!(decode(0).is_none());
        assert!(decode(15 << KIND_SHIFT).is_none());
        assert_eq!(decode(encode_loop(Op::Wake)).map(|(k, _)| k), Some(Op::Wake));
    }
}
