//! Prometheus metrics: per-core plain counters gathered at scrape time. This layer only
//! observes: the counters and samples are the hub's ([`crate::hub::stats`]); the hub never
//! depends on it.
//!
//! ```text
//!  core 0 ─ CoreStats + ConnSample (SIOCINQ/SIOCOUTQ from the driver) ───┐
//!  core N ─ ...                                                          ├─► render() ─► text ─► http
//!  upstream ─ UpstreamSnapshot ──────────────────────────────────────────┘
//! ```
//!
//! - [`snapshot`]: the plain data the upstream link hands over (no atomics, no locks); the
//!   cores hand over [`CoreSnapshot`](crate::hub::stats::CoreSnapshot)s.
//! - [`render`](mod@render): folds the snapshots into Prometheus text, Synapse's names first.
//! - [`connections`]: `/connections`, every live connection as JSON (what `replhub top` reads).
//! - [`health`]: `/healthz`, whether the upstream has been gone for too long.
//! - [`http`]: the endpoint (`/metrics`, `/connections`, `/healthz`): its own thread and
//!   current-thread runtime, one task per connection (so no client waits for another),
//!   independent of the I/O driver.
pub(crate) mod connections;
pub(crate) mod health;
pub(crate) mod http;
pub mod render;
pub(crate) mod snapshot;

pub use http::MetricsServer;
pub(crate) use http::Pages;
pub use render::{render, RenderInfo};
