//! The mailbox wake-up of a core running this driver: an eventfd, written only while the core
//! may be asleep.
//!
//! The core keeps a READ of the eventfd in its ring (which resets the counter when it
//! completes) and drains its inbox at the start of every turn. A sender writes the eventfd
//! only when the core has said it may sleep ([`announce_sleep`]) and nobody has written it
//! since: a busy core (the one a worker reads from at full rate takes a batch every few
//! microseconds) costs its senders no system call, and its ring no READ completion, per
//! message.
//!
//! No message can be left asleep in the mailbox. Each side stores, fences and then loads:
//! the sender puts the message in the channel and fences (the `Inbox` does both, then calls
//! the wake-up function, which looks at the flag); the core sets the flag, fences, and looks at
//! the channel once more before it sleeps ([`announce_sleep`]'s contract). With sequentially consistent fences at least one of them sees the other's
//! store: the sender writes the eventfd, or the core finds the message and does not sleep.
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

use crate::driver::CoreWakeup;

/// A new non-blocking eventfd and its "may be asleep" flag, for the core, and the function
/// that wakes it. The function owns its own descriptor of the same eventfd, so it stays safe
/// to call after the core is gone.
pub(super) fn new_wakeup() -> io::Result<(CoreWakeup, Arc<dyn Fn() + Send + Sync>)> {
    let fd = eventfd()?;
    let writer = File::from(fd.try_clone()?);
    let asleep = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&asleep);
    // Called by an `Inbox` after its send and fence (module doc), so no fence here.
    let wake = move || {
        // The load first: while the core is awake, senders only read the flag's cache line.
        if flag.load(Ordering::Relaxed) && flag.swap(false, Ordering::AcqRel) {
            // A full counter (EAGAIN) already means "wake up"; nothing else can fail here.
            let _ = (&writer).write(&1u64.to_ne_bytes());
        }
    };
    Ok((CoreWakeup::EventFd { fd, asleep }, Arc::new(wake)))
}

/// Tells senders that the core may sleep: from here on the next send writes the eventfd. The
/// caller must then look at its inbox once more and must not sleep if it finds anything there
/// (a message sent before this call did not write the eventfd).
pub(super) fn announce_sleep(asleep: &AtomicBool) {
    asleep.store(true, Ordering::Relaxed);
    // Orders the store before the caller's look at the inbox (module doc).
    fence(Ordering::SeqCst);
}

/// Tells senders that the core is awake (it drains its inbox before it sleeps again), so that
/// they need not write the eventfd.
pub(super) fn announce_awake(asleep: &AtomicBool) {
    asleep.store(false, Ordering::Relaxed);
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
    use std::sync::mpsc;

    use super::*;

    fn parts() -> (File, Arc<AtomicBool>, Arc<dyn Fn() + Send + Sync>) {
        let (wakeup, wake) = new_wakeup().unwrap();
        let CoreWakeup::EventFd { fd, asleep } = wakeup else { panic!("an eventfd wake-up") };
        (File::from(fd), asleep, wake)
    }

    fn counter(file: &File) -> Option<u64> {
        let mut buf = [0u8; 8];
        match (&*file).read(&mut buf) {
            Ok(8) => Some(u64::from_ne_bytes(buf)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            other => panic!("eventfd read: {other:?}"),
        }
    }

    #[test]
    fn a_core_that_is_awake_costs_its_senders_no_write() {
        let (file, _asleep, wake) = parts();
        wake();
        wake();
        assert_eq!(counter(&file), None, "the core never said it may sleep");
    }

    #[test]
    fn a_core_that_may_sleep_is_woken_once_however_many_send() {
        let (file, asleep, wake) = parts();
        announce_sleep(&asleep);
        wake();
        wake();
        assert_eq!(counter(&file), Some(1), "one write for the first send, none for the second");
        announce_sleep(&asleep);
        announce_awake(&asleep);
        wake();
        assert_eq!(counter(&file), None, "awake again before the send");
        announce_sleep(&asleep);
        wake();
        reset(&file);
        assert_eq!(counter(&file), None, "reset clears the counter");
        drop(file);
        // The sender's own descriptor keeps working after the core's is closed.
        announce_sleep(&asleep);
        wake();
    }

    /// The protocol of the module doc, run as a core runs it, against a sender that sends each
    /// message as soon as the core took the one before, so that every send races the core's
    /// way to sleep: every message is taken, in order, and the core never sleeps (here: blocks
    /// in poll(2) on the eventfd) with a message waiting, which would show as a poll that
    /// times out. Without the second look at the inbox after `announce_sleep` it does (a
    /// message sent between the drain and the announcement writes no eventfd).
    #[test]
    fn no_message_waits_for_a_core_that_went_to_sleep() {
        use std::sync::atomic::AtomicU64;

        const MESSAGES: u64 = 20_000;
        /// Every this many messages the sender waits for the core to go to sleep before it
        /// sends the next: on a busy machine the sender can otherwise win every race, and a
        /// core that never sleeps tests nothing.
        const SLEEP_EVERY: u64 = 1_000;
        let (file, asleep, wake) = parts();
        let (tx, rx) = mpsc::channel::<u64>();
        let taken = Arc::new(AtomicU64::new(0));
        let slept = Arc::new(AtomicU64::new(0));
        let sender = std::thread::spawn({
            let (taken, slept) = (Arc::clone(&taken), Arc::clone(&slept));
            move || {
                for i in 0..MESSAGES {
                    let sleeps_before = slept.load(Ordering::Acquire);
                    tx.send(i).unwrap();
                    wake();
                    while taken.load(Ordering::Acquire) <= i {
                        std::thread::yield_now();
                    }
                    if i % SLEEP_EVERY == SLEEP_EVERY - 1 && i + 1 < MESSAGES {
                        while slept.load(Ordering::Acquire) == sleeps_before {
                            std::thread::yield_now();
                        }
                    }
                }
            }
        });
        let take = || -> bool {
            let mut any = false;
            while let Ok(i) = rx.try_recv() {
                assert_eq!(i, taken.load(Ordering::Relaxed), "in order");
                taken.store(i + 1, Ordering::Release);
                any = true;
            }
            any
        };
        while taken.load(Ordering::Relaxed) < MESSAGES {
            take();
            // A turn's work between its drain and its sleep, which gives the sender the time to
            // send into that gap (a few nanoseconds wide without this).
            std::thread::yield_now();
            announce_sleep(&asleep);
            if take() {
                announce_awake(&asleep);
                continue;
            }
            if taken.load(Ordering::Relaxed) == MESSAGES {
                break;
            }
            slept.fetch_add(1, Ordering::Release);
            let mut pfd =
                libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&file), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 2_000) };
            let got = taken.load(Ordering::Relaxed);
            assert_eq!(n, 1, "slept 2 s with {got} of {MESSAGES} taken: a wake-up was lost");
            reset(&file);
            announce_awake(&asleep);
        }
        sender.join().unwrap();
        assert!(slept.load(Ordering::Relaxed) > 0, "the core never slept: the test does not test anything");
    }
}
