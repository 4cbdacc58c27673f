//! A one-shot timer with microsecond resolution for a tokio loop: a timerfd the reactor
//! watches. tokio's own timers tick in whole milliseconds, and a write moderation window
//! (`driver::moderation`) is about 100 µs.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The end of a write moderation window (`driver::moderation`): a timerfd the reactor
/// watches, as tokio's own timers tick in whole milliseconds and a window is about 100 µs.
pub(crate) struct HoldTimer {
    fd: AsyncFd<OwnedFd>,
    /// The window end (the clock's `mono_us`) it is set for, until it fires.
    set_for: Option<u64>,
}

impl HoldTimer {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the flags are valid.
        let raw =
            unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor just created here, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the `OwnedFd` is the descriptor's only owner and lives inside the `AsyncFd`,
        // so it stays open, the same descriptor, for as long as the registration.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        Ok(Self { fd, set_for: None })
    }

    /// Sets the timer to fire `left` from now, for the window that ends at `until_us` (a later
    /// window moves it; the same one leaves it).
    pub(crate) fn set(&mut self, until_us: u64, left: Duration) {
        if self.set_for == Some(until_us) {
            return;
        }
        // At least 1 ns: an all-zero it_value would disarm the timer instead.
        let left = left.max(Duration::from_nanos(1));
        let value = libc::timespec {
            tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(left.subsec_nanos()),
        };
        let spec =
            libc::itimerspec { it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 }, it_value: value };
        // SAFETY: `spec` is a valid itimerspec that lives across the call; no old value is
        // asked for (null).
        let rc = unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc == 0 {
            self.set_for = Some(until_us);
        } else {
            // Cannot happen with a valid descriptor and value; the next turn tries again.
            tracing::warn!(error = %io::Error::last_os_error(), "timerfd_settime failed");
        }
    }

    /// Waits until the timer fires (at once if it fired already) and takes the expiry.
    pub(crate) async fn fired(&mut self) {
        loop {
            let Ok(mut guard) = self.fd.readable().await else { return };
            let mut ticks = [0u8; 8];
            // SAFETY: reads at most 8 bytes into the 8-byte local buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), ticks.as_mut_ptr().cast(), ticks.len()) };
            if n == 8 {
                self.set_for = None;
                return;
            }
            guard.clear_ready();
        }
    }
}
