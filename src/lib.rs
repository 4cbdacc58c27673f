//! replhub: a fan-out hub for Synapse's TCP replication protocol.
//!
//! ```text
//!   Synapse master ──(one TCP conn)──► upstream ──► Arc<Batch> ──► per-core hub log ──► N workers
//!        ▲                               │  (one copy of every line, shared by all cores)    │
//!        └──── merged USER_SYNC, FEDERATION_ACK, USER_IP, ... ◄─────────────────────────────┘
//! ```
//!
//! Layers (see `ARCHITECTURE.md` at the repository root for the code map):
//! - [`proto`]: sans-IO line splitting, command words, lazy field parsing, encoding, JSON.
//! - [`session`]: one connection's protocol state machine (both roles), time passed in.
//! - [`hub`]: per-core fan-out: the shared log, cursors, subscriptions, slow-consumer policy.
//! - [`upstream`]: the client-role link to the master (sans-IO) and its batch builder.
//! - [`driver`]: the I/O: `epoll` (tokio) and `uring` (io_uring), thread per core.
//! - [`client`]: the public client library (used by `tail`, `loadtest` and tests).
//! - [`metrics`], [`config`]: Prometheus exposition and typed configuration.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod client;
pub mod config;
pub mod driver;
pub mod hub;
pub mod loadtest;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod session;
pub mod synthetic;
pub mod tail;
pub mod time;
pub mod upstream;
