//! Giving the heap back after a large backlog goes (README, "Memory").
//!
//! A worker evicted with a large backlog frees the batches only it held, tens of megabytes at
//! once, but glibc keeps freed memory in its arenas (the batches were allocated by the source
//! thread, in chunks below the mmap threshold), so the process's RSS stays at its high-water
//! mark. [`Trimmer`] watches how much log a core holds and, once that fell by
//! [`TRIM_AFTER_BYTES`] from its peak, asks glibc to return its free pages (`malloc_trim(0)`),
//! at most once per [`TRIM_INTERVAL_MS`] per core: a few milliseconds each time, only after a
//! large backlog went, never on the batch path.

/// How far the log a core holds must fall from its peak before the heap is trimmed.
pub(crate) const TRIM_AFTER_BYTES: u64 = 16 << 20;

/// Least time between two trims by the same core.
pub(crate) const TRIM_INTERVAL_MS: u64 = 1_000;

/// When to trim, from the log bytes a core holds (time and bytes are passed in).
#[derive(Debug, Default)]
pub(crate) struct Trimmer {
    /// Most log bytes held since the last trim.
    peak: u64,
    /// When the last trim ran (monotonic ms).
    last_ms: Option<u64>,
}

impl Trimmer {
    /// The core holds `held` bytes of log at `now_ms`: whether to trim now. A yes is taken as
    /// done (the peak starts over from `held`).
    pub(crate) fn observe(&mut self, held: u64, now_ms: u64) -> bool {
        self.peak = self.peak.max(held);
        let due = self.last_ms.is_none_or(|t| now_ms.saturating_sub(t) >= TRIM_INTERVAL_MS);
        if self.peak - held >= TRIM_AFTER_BYTES && due {
            self.peak = held;
            self.last_ms = Some(now_ms);
            true
        } else {
            false
        }
    }
}

/// Returns the free memory of every malloc arena to the kernel, where glibc allows it (on
/// other C libraries it does nothing). Returns whether some memory was released.
pub(crate) fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes no pointer and touches only glibc's own arenas, each
        // under its lock, so it is sound from any thread at any time.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_the_log_fell_far_enough_from_its_peak_at_most_once_per_interval() {
        let mut t = Trimmer::default();
        assert!(!t.observe(60 << 20, 0), "growing");
        assert!(!t.observe(45 << 20, 10), "15 MiB below the peak");
        assert!(t.observe(44 << 20, 20), "16 MiB below the peak");
        assert!(!t.observe(44 << 20, 30), "the peak starts over");
        // Another large drop within the interval waits for the interval's end.
        assert!(!t.observe(80 << 20, 40));
        assert!(!t.observe(0, 500));
        assert!(t.observe(0, 1_020));
        assert!(!t.observe(0, 5_000), "nothing fell since");
    }

    #[test]
    fn releasing_the_free_heap_is_safe_to_call_anywhere() {
        let big: Vec<u8> = vec![1; 32 << 20];
        drop(big);
        // Whether anything was released depends on the allocator; it must not crash.
        let _ = release_free_heap();
        let _ = std::thread::spawn(release_free_heap).join();
    }
}
