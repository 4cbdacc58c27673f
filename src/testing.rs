//! Crate internals reachable for replhub's own integration tests, benches and fuzz targets.
//!
//! Not API: nothing here is documented or stable. Each re-export names what a test drives
//! directly (the hub without sockets, one io_uring core, the metrics endpoint, the kernel
//! queue ioctls) because going through [`crate::server::Server`] would hide what it checks.

/// The per-core hub, driven without sockets (benches, `tests/metrics_e2e.rs`, fuzz targets).
pub mod hub {
    pub use crate::hub::sim;
    pub use crate::hub::stats;
    pub use crate::hub::{Batch, ConnId, Hub, HubOutput, LineMeta, UpstreamCmd, UpstreamEvent};
}

/// One core of a driver, run on a thread of the test (`tests/uring_loopback.rs`), and the
/// socket queue ioctls the fan-out bench samples.
pub mod driver {
    pub use crate::driver::sockq;
    pub use crate::driver::uring::bench::SendRing;
    pub use crate::driver::uring::{new_wakeup, probe, run_core};
    pub use crate::driver::{Balance, CoreContext, CoreMsg, IdleCore, Inbox, StartGate};
}

/// The exposition and its HTTP endpoint, tested without a hub behind them.
pub mod metrics {
    pub use crate::metrics::connections::{
        ConnEntry, ConnQuery, ConnectionsPage, QueryError, SortKey, Totals, UpstreamView,
    };
    pub use crate::metrics::http::{Limits, Pages};
    pub use crate::metrics::snapshot::UpstreamSnapshot;
    pub use crate::metrics::{render, MetricsServer, RenderInfo};
}

/// The upstream batch builder, feeding a core batches as the source thread would.
pub mod upstream {
    pub use crate::upstream::index_chunk;
}

/// The synthetic master's generator (the JSON bench parses its lines).
pub mod synthetic {
    pub use crate::synthetic::{Synthetic, SyntheticConfig};
}
