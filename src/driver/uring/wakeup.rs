//! The mailbox wake-up of a core running this driver: an eventfd. Senders add 1 to its counter;
//! the core keeps a READ of it in its ring (which resets the counter when it completes) and then
//! drains its inbox.
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use crate::driver::CoreWakeup;

/// A new non-blocking eventfd, for the core, and the function that fires it. The function owns
/// its own descriptor of the same eventfd, so it stays safe to call after the core is gone.
pub(super) fn new_wakeup() -> io::Result<(CoreWakeup, Arc<dyn Fn() + Send + Sync>)> {
    let fd = eventfd()?;
    let writer = File::from(fd.try_clone()?);
    let wake = move || {
        // A full counter (EAGAIN) already means "wake up"; nothing else can fail here.
        let _ = (&writer).write(&1u64.to_ne_bytes());
    };
    Ok((CoreWakeup::EventFd(fd), Arc::new(wake)))
}

/// A new non-blocking eventfd.
pub(super) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointers; the flags are valid.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Resets the eventfd's counter (a non-blocking read; zero means it was already reset).
pub(super) fn reset(eventfd: &File) {
    let mut buf = [0u8; 8];
    let _ = (&*eventfd).read(&mut buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_sets_the_counter_and_reset_clears_it() {
        let (wakeup, wake) = new_wakeup().unwrap();
        let CoreWakeup::EventFd(fd) = wakeup else { panic!("an eventfd wake-up") };
        let file = File::from(fd);
        let mut buf = [0u8; 8];
        assert_eq!((&file).read(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        wake();
        wake();
        assert_eq!((&file).read(&mut buf).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(buf), 2);
        wake();
        reset(&file);
        assert_eq!((&file).read(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        drop(file);
        // The sender's own descriptor keeps working after the core's is closed.
        wake();
    }
}
