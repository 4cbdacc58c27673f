//! The process-wide channel table: each pub/sub channel name gets a stable id (carried by the
//! log lines of its messages, so a core filters deliveries with an integer compare) and a
//! subscriber count summed over every core (the reply to PUBLISH).
//!
//! Cost model: the table's mutex is taken when a core sees a channel name for the first time
//! (each core keeps its own map from name to [`Channel`]), never per message. The count is one
//! relaxed atomic per SUBSCRIBE/UNSUBSCRIBE and one load per PUBLISH, never per delivered line.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// One channel.
#[derive(Debug)]
pub struct Channel {
    id: u32,
    subscribers: AtomicU64,
}

impl Channel {
    /// The channel's id (stable for the life of the process).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Subscriptions to it on every core, now.
    pub fn subscribers(&self) -> u64 {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// One more subscription.
    pub fn add(&self) {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
    }

    /// One subscription fewer.
    pub fn remove(&self) {
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The table. Names are never forgotten (ids must stay valid while any core's log holds a
/// message of the channel), so it is bounded: at most `max_channels` names of at most
/// `max_name_bytes` bytes in all.
#[derive(Debug)]
pub struct Channels {
    inner: Mutex<Inner>,
    max_channels: usize,
    max_name_bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    by_name: HashMap<Bytes, Arc<Channel>>,
    name_bytes: usize,
}

impl Channels {
    /// An empty table with these bounds.
    pub fn new(max_channels: usize, max_name_bytes: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), max_channels, max_name_bytes }
    }

    /// The channel named `name`, created if `create` and the table has room.
    pub fn get(&self, name: &Bytes, create: bool) -> Option<Arc<Channel>> {
        // A poisoned lock means another core panicked while inserting; the map is still
        // consistent (insertion is one call), so keep using it.
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = inner.by_name.get(name) {
            return Some(Arc::clone(c));
        }
        if !create
            || inner.by_name.len() >= self.max_channels
            || inner.name_bytes + name.len() > self.max_name_bytes
        {
            return None;
        }
        let id = u32::try_from(inner.by_name.len()).ok()?;
        let c = Arc::new(Channel { id, subscribers: AtomicU64::new(0) });
        inner.name_bytes += name.len();
        inner.by_name.insert(name.clone(), Arc::clone(&c));
        Some(c)
    }

    /// Every channel's name and subscription count (for metrics).
    pub fn counts(&self) -> Vec<(Bytes, u64)> {
        let inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.by_name.iter().map(|(n, c)| (n.clone(), c.subscribers())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_counts_shared_and_the_table_bounded() {
        let t = Channels::new(2, 5);
        let a = t.get(&Bytes::from("ab"), true).expect("room");
        let a2 = t.get(&Bytes::from("ab"), false).expect("known");
        assert_eq!(a.id(), a2.id());
        a.add();
        a2.add();
        a.remove();
        assert_eq!(a2.subscribers(), 1);
        assert!(t.get(&Bytes::from("cd"), false).is_none());
        assert!(t.get(&Bytes::from("cdef"), true).is_none(), "name bytes bound");
        let c = t.get(&Bytes::from("cd"), true).expect("room");
        assert_ne!(c.id(), a.id());
        assert!(t.get(&Bytes::from("e"), true).is_none(), "count bound");
    }
}
