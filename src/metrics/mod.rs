//! Prometheus metrics: per-core plain counters gathered at scrape time. This layer only
//! observes: the counters and samples are the hub's ([`crate::hub::stats`]); the hub never
//! depends on it.
//!
//! ```text
//!  core 0 ─ CoreStats + ConnSample (SIOCINQ/SIOCOUTQ read on the core) ─┐
//!  core N ─ ...                                                          ├─► render() ─► text ─► http
//!  upstream ─ UpstreamSnapshot ──────────────────────────────────────────┘
//! ```
//!
//! - [`snapshot`]: the plain data the upstream link hands over (no atomics, no locks); the
//!   cores hand over [`CoreSnapshot`](crate::hub::stats::CoreSnapshot)s.
//! - [`sockq`]: the `SIOCINQ`/`SIOCOUTQ` ioctls, called by a core on its own sockets.
//! - [`render`](mod@render): folds the snapshots into Prometheus text, Synapse's names first.
//! - [`http`]: the `/metrics` endpoint, one std thread, independent of the I/O driver.
pub mod http;
pub mod render;
pub mod snapshot;
pub mod sockq;

pub use http::MetricsServer;
pub use render::{render, RenderInfo};
