//! `/healthz`: whether this hub is worth sending workers to.
//!
//! Healthy while serving, unless the upstream master has been gone for longer than the grace
//! (`--health-upstream-grace`): a short reconnect should not get the hub taken out of a load
//! balancer, a master that stays away should. The synthetic master never goes away.
use super::snapshot::UpstreamSnapshot;

/// `Ok` if healthy, else why not (the `503`'s body). `upstream` is `None` when the source
/// thread did not answer in time; `now_mono_ms` is on the same clock as its `down_since_ms`.
pub(crate) fn check(
    upstream: Option<&UpstreamSnapshot>,
    now_mono_ms: u64,
    grace_ms: u64,
) -> Result<(), String> {
    let Some(up) = upstream else {
        return Err("the source thread did not answer".to_owned());
    };
    match up.down_since_ms {
        Some(since) if up.mode != "synthetic" && !up.connected => {
            let down_ms = now_mono_ms.saturating_sub(since);
            if down_ms > grace_ms {
                Err(format!(
                    "upstream disconnected for {:.1}s (more than --health-upstream-grace {:.1}s)",
                    down_ms as f64 / 1000.0,
                    grace_ms as f64 / 1000.0
                ))
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(connected: bool, down_since_ms: Option<u64>) -> UpstreamSnapshot {
        UpstreamSnapshot { mode: "upstream", connected, down_since_ms, ..UpstreamSnapshot::default() }
    }

    #[test]
    fn unhealthy_only_after_the_grace() {
        assert_eq!(check(Some(&upstream(true, None)), 100_000, 30_000), Ok(()));
        // Down, but within the grace (a reconnect in progress).
        assert_eq!(check(Some(&upstream(false, Some(80_000))), 100_000, 30_000), Ok(()));
        assert_eq!(check(Some(&upstream(false, Some(70_000))), 100_000, 30_000), Ok(()));
        let err = check(Some(&upstream(false, Some(69_000))), 100_000, 30_000).unwrap_err();
        assert_eq!(err, "upstream disconnected for 31.0s (more than --health-upstream-grace 30.0s)");
        // Never connected since the start counts from the start.
        assert!(check(Some(&upstream(false, Some(0))), 30_001, 30_000).is_err());
    }

    #[test]
    fn synthetic_is_always_up_and_a_silent_source_is_not() {
        let synthetic = UpstreamSnapshot { mode: "synthetic", ..UpstreamSnapshot::default() };
        assert_eq!(check(Some(&synthetic), u64::MAX, 0), Ok(()));
        assert_eq!(check(None, 0, 30_000), Err("the source thread did not answer".to_owned()));
    }
}
