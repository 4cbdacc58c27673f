//! replhub: a fan-out hub for Synapse's TCP replication protocol.
//!
//! ```text
//!   Synapse master ──(one TCP conn)──► upstream ──► Arc<Batch> ──► per-core hub log ──► N workers
//!        ▲                               │  (one copy of every line, shared by all cores)    │
//!        └──── merged USER_SYNC, FEDERATION_ACK, USER_IP, ... ◄─────────────────────────────┘
//! ```
//!
//! Layers (see `ARCHITECTURE.md` at the repository root for the code map; the modules without
//! a link are crate-private):
//! - [`proto`]: sans-IO line splitting, command words, lazy field parsing, encoding, JSON.
//! - [`session`]: one connection's protocol state machine (both roles), time passed in.
//! - `hub`: per-core fan-out: the shared log, cursors, subscriptions, slow-consumer policy.
//! - `upstream`: the client-role link to the master (sans-IO) and its batch builder.
//! - `driver`: the I/O: `epoll` (tokio) and `uring` (io_uring), thread per core.
//! - [`client`]: the public client library (used by `tail`, `loadtest` and tests).
//! - `metrics`, [`config`]: Prometheus exposition and typed configuration.
//! - [`server`]: a running hub (threads, listeners, metrics endpoint); [`time`]: the clock.
#![forbid(unsafe_op_in_unsafe_fn)]

// The public API: the codec, the session state machine, the client library, configuration,
// the server and the clock. Everything else is crate-private; what the crate's own
// integration tests, benches and fuzz targets need of it is re-exported in `testing`.
pub mod client;
pub mod config;
pub mod proto;
pub mod server;
pub mod session;
pub mod time;

mod driver;
mod hub;
mod metrics;
#[doc(hidden)]
pub mod resp;
mod synthetic;
mod upstream;

// The `loadtest` and `tail` subcommands of the binary (src/cli.rs) live in the library so that
// tests can run them in-process; they are tools, not API. The load generator measures the
// wall-clock latency and throughput of real sockets, so it reads the time directly
// (clippy.toml disallows that elsewhere).
#[allow(clippy::disallowed_methods)]
#[doc(hidden)]
pub mod loadtest;
#[doc(hidden)]
pub mod tail;
#[doc(hidden)]
pub mod testing;
mod tls;
/// `replhub top`, the operator's live view (a subcommand of the binary, like `tail`).
#[doc(hidden)]
pub mod top;
