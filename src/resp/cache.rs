//! The key-value store behind SET/GET: Synapse's external cache (`cache_v1:*` keys written
//! with `PX`), not the replication hot path. Sixteen shards, each behind its own mutex (a lock
//! per SET/GET, shared by the cores; contention is spread over the shards). Memory-bounded:
//! each shard holds at most a sixteenth of `max_bytes` (keys plus values); a SET that does not
//! fit evicts expired entries, then arbitrary ones (Redis's `allkeys-random`), and a value
//! larger than a shard is refused with Redis's OOM error. Expiry is checked on read (time is
//! passed in, monotonic milliseconds).
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use bytes::Bytes;

const SHARDS: usize = 16;

/// Per-entry overhead counted against the bound (the map's slot, the two `Bytes`).
const ENTRY_OVERHEAD: usize = 96;

/// The store. See the [module docs](self).
#[derive(Debug)]
pub struct Cache {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    shard_bytes: usize,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<(u8, Bytes), Entry>,
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    value: Bytes,
    expires_ms: Option<u64>,
}

fn cost(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

/// A SET that cannot fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("OOM command not allowed when used memory > 'maxmemory'.")]
pub struct OutOfMemory;

impl Cache {
    /// A store holding at most about `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            shard_bytes: max_bytes / SHARDS,
        }
    }

    fn shard(&self, db: u8, key: &[u8]) -> std::sync::MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one((db, key)) as usize) % SHARDS;
        // A poisoned shard is still a consistent map (every update is one call).
        self.shards[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The value of `key` in `db`, unless absent or expired at `now_ms`.
    pub fn get(&self, db: u8, key: &Bytes, now_ms: u64) -> Option<Bytes> {
        let mut s = self.shard(db, key);
        let k = (db, key.clone());
        let e = s.map.get(&k)?;
        if e.expires_ms.is_some_and(|t| t <= now_ms) {
            if let Some(old) = s.map.remove(&k) {
                s.bytes -= cost(key, &old.value);
            }
            return None;
        }
        Some(e.value.clone())
    }

    /// Stores `value` under `key` in `db`, expiring `ttl_ms` after `now_ms` if given.
    pub fn set(
        &self,
        db: u8,
        key: Bytes,
        value: Bytes,
        ttl_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<(), OutOfMemory> {
        let need = cost(&key, &value);
        if need > self.shard_bytes {
            return Err(OutOfMemory);
        }
        let mut s = self.shard(db, &key);
        let k = (db, key);
        if let Some(old) = s.map.remove(&k) {
            s.bytes -= cost(&k.1, &old.value);
        }
        if s.bytes + need > self.shard_bytes {
            let expired: Vec<(u8, Bytes)> = s
                .map
                .iter()
                .filter(|(_, e)| e.expires_ms.is_some_and(|t| t <= now_ms))
                .map(|(k, _)| k.clone())
                .collect();
            for k in expired {
                if let Some(old) = s.map.remove(&k) {
                    s.bytes -= cost(&k.1, &old.value);
                }
            }
        }
        while s.bytes + need > self.shard_bytes {
            let Some(victim) = s.map.keys().next().cloned() else { break };
            if let Some(old) = s.map.remove(&victim) {
                s.bytes -= cost(&victim.1, &old.value);
            }
        }
        s.bytes += need;
        let expires_ms = ttl_ms.map(|t| now_ms.saturating_add(t));
        s.map.insert(k, Entry { value, expires_ms });
        Ok(())
    }

    /// Bytes held (keys, values and the per-entry overhead).
    pub fn held_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_expire_and_databases_are_apart() {
        let c = Cache::new(1 << 20);
        c.set(0, "k".into(), "v".into(), Some(100), 1_000).expect("fits");
        c.set(1, "k".into(), "w".into(), None, 1_000).expect("fits");
        assert_eq!(c.get(0, &"k".into(), 1_099), Some(Bytes::from("v")));
        assert_eq!(c.get(0, &"k".into(), 1_100), None);
        assert_eq!(c.get(1, &"k".into(), 9_999_999), Some(Bytes::from("w")));
        c.set(1, "k".into(), "x".into(), None, 0).expect("fits");
        assert_eq!(c.get(1, &"k".into(), 0), Some(Bytes::from("x")));
    }

    #[test]
    fn memory_stays_bounded() {
        let max = 64 << 10;
        let c = Cache::new(max);
        for i in 0..10_000u32 {
            c.set(0, Bytes::from(i.to_string()), Bytes::from(vec![b'x'; 100]), None, 0).expect("fits");
            assert!(c.held_bytes() <= max);
        }
        assert_eq!(c.set(0, "big".into(), Bytes::from(vec![0; max]), None, 0), Err(OutOfMemory));
    }
}
