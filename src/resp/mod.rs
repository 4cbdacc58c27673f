//! Redis mode: enough RESP2 for Synapse's replication over Redis pub/sub (PROTOCOL.md §8.4),
//! its external cache (SET/GET), and `redis-cli`. Sans-IO like `proto` and `session`.
//!
//! - `codec.rs`: the request decoder (bounded, incremental) and the reply encoders;
//! - `session.rs`: one connection's command state machine (auth, the pub/sub context rule,
//!   Redis's error texts), producing [`Effect`]s the hub carries out;
//! - `channels.rs`: the process-wide channel table (ids, subscriber counts);
//! - `cache.rs`: the bounded, expiring, sharded key-value store.
//!
//! # How a PUBLISH reaches every subscriber
//!
//! The hub of the publisher's core frames each message once
//! (`*3 $7 message $<n> <channel> $<m> <payload>`) and gathers the messages published on it in
//! one loop turn into one shared [`Batch`](crate::hub::Batch), each line tagged with its
//! channel's id (cut when the driver polls the hub's outputs, so whatever the driver's read
//! size). The core appends the batch to its own log and puts an `Arc` clone in every other
//! core's mailbox itself (`driver::outgoing`: a per-core queue for a core whose mailbox is
//! full, bounded, the excess dropped for that core with a `PublishLost` in its place). Each
//! core wakes the subscribers of those channels; their outboxes send the very same bytes with
//! gathered writes, cursors and pins as for RDATA lines. One FIFO from the publisher's core to
//! each core keeps per-publisher order, and a publisher receives its own messages on its
//! subscribing connection whatever core that is on; a subscriber on another core gets a
//! message one thread hop after one on the publisher's core.
//!
//! The receiver count of PUBLISH is read, without a lock, from the channel's subscriber count
//! in [`Channels`] (one relaxed atomic load per PUBLISH; SUBSCRIBE and UNSUBSCRIBE add and
//! subtract). A subscription registers on its core before its confirmation is queued, and
//! takes every message appended to that core's log after it, so a counted subscriber receives
//! the message unless it unsubscribes before the message reaches its core, as with Redis.
use std::sync::Arc;

pub mod cache;
pub mod channels;
pub mod codec;
pub mod reply;
pub mod session;

pub use self::cache::Cache;
pub use self::channels::{Channel, Channels};
pub use self::codec::RespLimits;
pub use self::session::{Effect, Session, SessionConfig};

/// Redis's `client-output-buffer-limit pubsub <hard> <soft> <soft_secs>` for RESP connections:
/// a connection whose backlog reaches `hard` bytes, or stays at `soft` bytes or more for
/// `soft_ms`, is disconnected (as Redis does: no error, the socket closes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputLimits {
    /// Hard limit in bytes (0: none).
    pub hard: u64,
    /// Soft limit in bytes (0: none).
    pub soft: u64,
    /// How long the soft limit may be exceeded.
    pub soft_ms: u64,
}

impl Default for OutputLimits {
    /// Redis's default for pub/sub clients: `32mb 8mb 60`.
    fn default() -> Self {
        Self { hard: 32 << 20, soft: 8 << 20, soft_ms: 60_000 }
    }
}

impl OutputLimits {
    /// Whether a backlog of `bytes` at `now_ms` breaks the limits; `soft_since` is the
    /// connection's memory of when it first went over the soft limit.
    pub fn exceeded(&self, bytes: u64, soft_since: &mut Option<u64>, now_ms: u64) -> bool {
        if self.hard > 0 && bytes >= self.hard {
            return true;
        }
        if self.soft > 0 && bytes >= self.soft {
            let since = *soft_since.get_or_insert(now_ms);
            return now_ms.saturating_sub(since) >= self.soft_ms;
        }
        *soft_since = None;
        false
    }
}

/// Everything Redis mode needs, as the user configures it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RespConfig {
    /// Auth and framing limits of each connection.
    pub session: SessionConfig,
    /// Output buffer limits of each connection.
    pub output: OutputLimits,
    /// Bytes the SET/GET store may hold.
    pub cache_max_bytes: usize,
    /// Most distinct channel names over the life of the process.
    pub max_channels: usize,
    /// With `--upstream-redis`: the channels bridged to the real Redis (a PUBLISH on them goes
    /// there, and comes back to local subscribers through replhub's subscription).
    pub upstream_channels: Vec<String>,
}

impl Default for RespConfig {
    fn default() -> Self {
        Self {
            session: SessionConfig::default(),
            output: OutputLimits::default(),
            cache_max_bytes: 64 << 20,
            max_channels: 65_536,
            upstream_channels: Vec::new(),
        }
    }
}

/// The state every core shares in Redis mode: built once at start.
#[derive(Debug)]
pub struct RespState {
    /// Per-connection settings, shared.
    pub session: Arc<SessionConfig>,
    /// Output limits.
    pub output: OutputLimits,
    /// The channel table.
    pub channels: Channels,
    /// The SET/GET store.
    pub cache: Cache,
    /// Channels bridged to a real Redis (`--upstream-redis`).
    pub upstream_channels: Vec<bytes::Bytes>,
}

impl RespState {
    /// The shared state for `config`.
    pub fn new(config: &RespConfig) -> Self {
        Self {
            session: Arc::new(config.session.clone()),
            output: config.output,
            channels: Channels::new(config.max_channels, config.max_channels.saturating_mul(1024)),
            cache: Cache::new(config.cache_max_bytes),
            upstream_channels: config
                .upstream_channels
                .iter()
                .map(|c| bytes::Bytes::from(c.clone()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_limits_as_redis_pubsub_class() {
        let l = OutputLimits { hard: 100, soft: 10, soft_ms: 1_000 };
        let mut since = None;
        assert!(!l.exceeded(9, &mut since, 0));
        assert!(!l.exceeded(10, &mut since, 0));
        assert!(!l.exceeded(50, &mut since, 999));
        assert!(l.exceeded(50, &mut since, 1_000));
        assert!(!l.exceeded(5, &mut since, 1_001));
        assert!(!l.exceeded(50, &mut since, 1_002), "the soft clock restarted");
        assert!(l.exceeded(100, &mut None, 0));
    }
}
