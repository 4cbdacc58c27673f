//! The per-core fan-out hub (sans-IO): the log, cursors, subscriptions, private lines, the
//! slow-consumer policy and USER_SYNC merging. One `Hub` per core; no locks, no clock reads.
//!
//! Driving it (str0m style: after every input, drain the outputs):
//! - inputs: [`Hub::accept`], [`Hub::on_bytes`], [`Hub::on_peer_closed`], [`Hub::on_batch`],
//!   [`Hub::on_upstream`], [`Hub::handle_timeout`], [`Hub::shutdown`];
//! - writes: [`Hub::take_dirty`] lists connections with output and no write in flight;
//!   [`Hub::gather`] fills an iovec list for one of them; [`Hub::on_written`] reports progress;
//! - outputs: [`Hub::poll_output`] (closes, commands for the upstream), [`Hub::poll_timeout`].
//!
//! Memory rule for drivers: the bytes behind the slices returned by `gather` stay valid and
//! unchanged until the next `on_written` or `on_peer_closed` for that connection.

pub mod log;
pub mod slots;
pub mod user_sync;

mod conn;
mod core;
#[doc(hidden)]
pub mod sim;
#[cfg(test)]
mod tests;

pub use self::core::Hub;
pub use self::log::{Batch, LineMeta, Log, Seq, BROADCAST};
pub use self::slots::{SlotMap, Slots};
pub use self::user_sync::{Transition, UserSyncMerger};

use bytes::Bytes;

use crate::proto::{StreamId, StreamMask, SyncState};
use crate::session::SessionConfig;

/// A connection handle: slot index plus a generation, so a stale id never hits a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// Slot index.
    pub index: u32,
    /// Generation of the slot.
    pub gen: u32,
}

impl std::fmt::Display for ConnId {
    /// `index.generation`, as in the logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.index, self.gen)
    }
}

impl ConnId {
    /// Packs into a u64 (e.g. as completion user data).
    pub const fn to_u64(self) -> u64 {
        ((self.gen as u64) << 32) | self.index as u64
    }

    /// Unpacks [`ConnId::to_u64`].
    pub const fn from_u64(v: u64) -> Self {
        Self { index: v as u32, gen: (v >> 32) as u32 }
    }
}

/// Hub settings, validated by the config layer.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Evict a connection whose backlog exceeds this many bytes (ARCHITECTURE.md invariant 4).
    pub max_pending_bytes: u64,
    /// Evict a backlogged connection with no write progress for this long.
    pub write_timeout_ms: u64,
    /// Ping/timeout/linger constants.
    pub session: SessionConfig,
    /// At most this many iovecs per gathered write.
    pub max_iov: usize,
    /// At most this many bytes per gathered write.
    pub max_write_bytes: usize,
    /// A fixed server name (`--server-name`); otherwise learned from the upstream.
    pub server_name: Option<String>,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            max_pending_bytes: 64 << 20,
            write_timeout_ms: 10_000,
            session: SessionConfig::default(),
            max_iov: 256,
            max_write_bytes: 1 << 20,
            server_name: None,
        }
    }
}

/// What the upstream link tells every core, through the same ordered mailbox as the batches.
// Rare (once per upstream connection), so the size of `Connected` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamEvent {
    /// Handshake with the upstream complete: its server name and the token of each stream it
    /// serves (`None` = not served). Every subscriber gets a fresh `POSITION` per stream.
    Connected {
        /// The master's server name.
        server_name: String,
        /// Current token per stream, map order.
        positions: [Option<i64>; StreamId::COUNT],
    },
    /// The upstream link dropped; workers stay connected and wait.
    Disconnected,
}

/// A command for the upstream, produced by a core after validating and merging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamCmd {
    /// The first (`Start`) or last (`End`) worker on this core syncing `user_id`.
    UserSync {
        /// User id.
        user_id: String,
        /// Start or end.
        state: SyncState,
        /// The worker's last sync time.
        last_sync_ms: i64,
    },
    /// A validated worker line to forward verbatim (with `\n`): FEDERATION_ACK, USER_IP,
    /// INVALIDATE_CACHE, REMOVE_PUSHER, REMOTE_SERVER_UP.
    Forward(Bytes),
}

/// How to close a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseHow {
    /// Everything queued was written: shut down the write side, read until EOF, close.
    Graceful,
    /// Drop at once (RST), e.g. the close linger expired.
    Abort,
}

/// Outputs for the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HubOutput {
    /// Close this connection's socket; call [`Hub::on_peer_closed`] once it is gone.
    Close {
        /// Which.
        conn: ConnId,
        /// How.
        how: CloseHow,
    },
    /// Send this to the upstream link.
    Upstream(UpstreamCmd),
}

/// Streams a hub serves by default: all 16.
pub const SERVED_DEFAULT: StreamMask = StreamMask::ALL;
