//! No source: Redis mode alone, replhub as a pub/sub broker.

use super::{Source, Upstream};
use crate::hub::UpstreamCmd;
use crate::metrics::snapshot::UpstreamSnapshot;
use crate::time::Now;

impl Source {
    pub(super) async fn run_broker(&mut self) {
        let mut none = NoUpstream;
        while self.idle_until(&mut none, None).await {}
    }
}

/// The source of a pure pub/sub broker: no master, so commands for one are dropped.
struct NoUpstream;

impl Upstream for NoUpstream {
    fn command(&mut self, _core: usize, _cmd: UpstreamCmd, _now: Now) {}
    fn snapshot(&self) -> UpstreamSnapshot {
        UpstreamSnapshot::default()
    }
}
