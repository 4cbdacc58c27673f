//! Where a new connection lives: on the core with the fewest.
//!
//! Every core accepts on a `SO_REUSEPORT` listener of its own, and the kernel picks the
//! listener by a hash of the connection's addresses. That spreads thousands of connections
//! evenly, but not ten or a hundred: measured on two cores, 10 workers split 8/2 and 6/4, 100
//! split 56/44 (README, "Connections on the core with the fewest"). The core with more
//! workers then does more of every line's fan-out, and it sets the pace: the other core's CPU
//! idles while the busy one's subscribers wait.
//!
//! So a core that accepts a connection while another core has fewer hands the socket over,
//! before anything was read from it or written to it: a [`CoreMsg::Adopt`](super::CoreMsg)
//! in that core's mailbox, which registers it as if it had accepted it itself. Connections
//! never move after that (a session's state lives on its core), so the split stays even as
//! long as connections come and go one at a time; a core that lost many connections gets the
//! next ones.
//!
//! [`Balance`] keeps the counts the cores decide by, without locks: per core, the connections
//! its hub holds (published by that core after each turn, when it changed) plus those placed
//! on it that its hub does not count yet (accepted or handed over, not yet registered). A
//! placement reads every core's count and adds one where the connection goes, so connections
//! that arrive in a burst on one listener spread at once, and two cores placing at the same
//! moment can at worst both miss the other's newest connection (one connection of
//! imbalance per core placing concurrently). Nothing here is on the per-line path.
use std::sync::atomic::{AtomicUsize, Ordering};

/// The connection counts of every core (module doc).
#[derive(Debug)]
pub struct Balance {
    cores: Box<[Counts]>,
}

#[derive(Debug, Default)]
struct Counts {
    /// The connections this core's hub holds, as the core last published.
    live: AtomicUsize,
    /// Connections placed on this core that `live` does not count yet.
    placed: AtomicUsize,
}

impl Balance {
    /// Counts for `cores` cores, all without connections.
    pub fn new(cores: usize) -> Self {
        Self { cores: (0..cores.max(1)).map(|_| Counts::default()).collect() }
    }

    /// How many connections `core` has or is about to have.
    pub fn load(&self, core: usize) -> usize {
        let c = &self.cores[core];
        c.live.load(Ordering::Relaxed) + c.placed.load(Ordering::Relaxed)
    }

    /// A connection was accepted on `core`: the core that takes it, counted there. That is
    /// another core only if it has fewer connections than `core` (the first such in core
    /// order, among those with the fewest); on a tie the connection stays where it arrived.
    pub fn place(&self, core: usize) -> usize {
        let mut to = core;
        let mut least = self.load(core);
        for other in (0..self.cores.len()).filter(|&i| i != core) {
            let load = self.load(other);
            if load < least {
                (to, least) = (other, load);
            }
        }
        self.cores[to].placed.fetch_add(1, Ordering::Relaxed);
        to
    }

    /// A connection placed on `from` stays on `to` after all (`from`'s mailbox refused it).
    pub fn moved(&self, from: usize, to: usize) {
        self.cores[from].placed.fetch_sub(1, Ordering::Relaxed);
        self.cores[to].placed.fetch_add(1, Ordering::Relaxed);
    }

    /// `core`'s hub now holds `live` connections, and `registered` of those placed on it are
    /// among them (or were refused): they no longer count as placed.
    pub fn publish(&self, core: usize, live: usize, registered: usize) {
        let c = &self.cores[core];
        // Live first: a placement in between sees one connection too many, never too few.
        c.live.store(live, Ordering::Relaxed);
        if registered > 0 {
            c.placed.fetch_sub(registered, Ordering::Relaxed);
        }
    }

    /// How many cores share these counts.
    pub fn cores(&self) -> usize {
        self.cores.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registers what was placed, as each core's turn would.
    fn settle(b: &Balance) {
        for core in 0..b.cores() {
            let placed = b.cores[core].placed.load(Ordering::Relaxed);
            let live = b.cores[core].live.load(Ordering::Relaxed) + placed;
            b.publish(core, live, placed);
        }
    }

    fn loads(b: &Balance) -> Vec<usize> {
        (0..b.cores()).map(|c| b.load(c)).collect()
    }

    #[test]
    fn connections_arriving_on_one_core_spread_over_all() {
        let b = Balance::new(3);
        let placed: Vec<usize> = (0..7).map(|_| b.place(0)).collect();
        // Ties stay; otherwise the emptiest core, the first in core order.
        assert_eq!(placed, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(loads(&b), [3, 2, 2]);
        settle(&b);
        assert_eq!(loads(&b), [3, 2, 2]);
    }

    #[test]
    fn any_arrival_order_keeps_the_cores_within_one() {
        // Arrival cores from a fixed pseudo-random sequence, as the kernel's hash would pick.
        let b = Balance::new(2);
        let mut x = 0x2545_f491_u32;
        for n in 1..=200 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            b.place((x % 2) as usize);
            if n % 7 == 0 {
                settle(&b);
            }
            let l = loads(&b);
            assert!(l[0].abs_diff(l[1]) <= 1, "after {n}: {l:?}");
        }
    }

    #[test]
    fn a_core_that_lost_connections_gets_the_next_ones() {
        let b = Balance::new(2);
        for _ in 0..10 {
            b.place(0);
        }
        settle(&b);
        assert_eq!(loads(&b), [5, 5]);
        // Four of core 1's connections close.
        b.publish(1, 1, 0);
        let placed: Vec<usize> = (0..5).map(|i| b.place(i % 2)).collect();
        assert_eq!(placed, [1, 1, 1, 1, 0]);
        assert_eq!(loads(&b), [6, 5]);
    }

    #[test]
    fn a_refused_hand_over_counts_where_the_connection_stayed() {
        let b = Balance::new(2);
        b.place(0);
        assert_eq!(b.place(0), 1);
        b.moved(1, 0);
        assert_eq!(loads(&b), [2, 0]);
        assert_eq!(b.place(0), 1);
        assert_eq!(b.place(1), 1);
        assert_eq!(loads(&b), [2, 2]);
    }

    #[test]
    fn publishing_before_the_placements_are_registered_never_undercounts() {
        let b = Balance::new(2);
        b.place(1);
        b.place(1);
        // Core 0's turn runs before it has registered either: nothing of its own yet.
        b.publish(0, 0, 0);
        assert_eq!(loads(&b), [1, 1]);
        // Then it registers its one; the count stays.
        b.publish(0, 1, 1);
        assert_eq!(loads(&b), [1, 1]);
    }

    #[test]
    fn one_core_keeps_everything() {
        let b = Balance::new(1);
        assert!((0..5).all(|_| b.place(0) == 0));
        assert_eq!(b.load(0), 5);
    }
}
