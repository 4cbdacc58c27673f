//! The io_uring driver (ARCHITECTURE.md §5): one ring per core thread, running that core's
//! [`Hub`](crate::hub::Hub).
//!
//! ```text
//!   multishot ACCEPT on the core's SO_REUSEPORT listener ─► TCP_NODELAY, hub.accept,
//!       one multishot RECV per socket, buffers picked by the kernel from a registered ring
//!   RECV completion ─► hub.on_bytes (the hub copies) ─► buffer back into the ring at once
//!   READ of the mailbox eventfd (it resets the counter) ─► CoreLoop::drain_inbox ─► re-arm
//!   TIMEOUT at hub.poll_timeout (or the shutdown grace, an accept retry) ─► hub.handle_timeout
//!   end of every turn: CoreLoop::turn: hub outputs (closes, upstream commands), then one
//!       gathered send per dirty connection (Sockets::write copies the slices into iovecs in
//!       the connection's own storage, send.rs: SENDMSG, or a plain SEND for one slice, which
//!       spares the kernel copying and checking a msghdr), one in flight per socket; then one
//!       io_uring_enter that submits and, with GETEVENTS, has the kernel post the completions
//!       it deferred to this thread (DEFER_TASKRUN), asleep until one comes only if the loop
//!       may sleep
//!   with the source on board (--threads 1): the same turns as a task of a tokio
//!       current-thread runtime beside the source's task; the loop sleeps in tokio, on an
//!       eventfd registered with the ring (which then runs COOP_TASKRUN, not DEFER_TASKRUN,
//!       whose eventfd comes late: probe::Sleep; the kernel signals it as it posts
//!       completions) and on the mailbox's Notify, then one io_uring_enter with GETEVENTS
//!       posts what is pending
//! ```
//!
//! Design notes:
//! - **Op accounting.** Every op's `user_data` carries its kind and its connection (slot index
//!   and generation, `token`). A connection has at most one recv and one send in flight; it
//!   is torn down by cancelling them (`ASYNC_CANCEL`), and its fd is closed and the hub told
//!   ([`Hub::on_peer_closed`](crate::hub::Hub::on_peer_closed)) only after both final
//!   completions. So the hub never reuses a slot with an op in flight, fd numbers are never
//!   reused under a pending op, and the bytes a send points at (kept by the hub until
//!   `on_written`/`on_peer_closed`) outlive it.
//! - **Buffers.** 512 × 4 KiB recv buffers per core. Each is returned to the ring as soon as
//!   its completion is handled (the hub copies partial lines into the connection's splitter),
//!   so no subscriber can pin pool memory.
//! - **ENOBUFS cannot spin.** A multishot recv that finds the ring empty ends with `ENOBUFS`
//!   (even with no data, liburing#1275). It is never re-armed in the turn it ended in, but in a
//!   later one, after every completion was handled, i.e. with every buffer back in the ring;
//!   and at most one recv per buffer is re-armed per turn (the rest wait in a FIFO, and the
//!   loop then reaps without sleeping). A re-armed recv can only end in `ENOBUFS` again if, in
//!   that same turn, completions carrying data used up the whole ring, so every `ENOBUFS` is
//!   paid for by received data and the FIFO shrinks in any turn without input.
//! - **Graceful close.** The hub's `Close{Graceful}` comes once everything was written:
//!   `shutdown(SHUT_WR)`, and received bytes are dropped until EOF. The driver keeps no timer
//!   for a peer that never sends it: the session's close linger ends in the hub's
//!   `Close{Abort}`: `SO_LINGER {1, 0}`, then the same teardown (RST).
//! - **Shutdown.** `ERROR server shutting down` to everyone, flush, close; whatever is still
//!   open after 2 s is reset. Before the buffers are freed the loop waits (bounded) until the
//!   kernel has finished every op; if it has not, the ring and its memory are leaked rather
//!   than freed under the kernel.
//! - Submissions are batched: one `io_uring_enter` per loop turn submits everything and,
//!   when the loop may sleep, waits for at least one completion; submissions that do not fit
//!   the queue wait in a backlog. That call always passes GETEVENTS: under DEFER_TASKRUN the
//!   kernel posts accepts, recvs and timers only when asked, and a core under a steady load
//!   (writes left for the next turn, or a batch waiting, at the end of every turn) never
//!   sleeps, so without it the workers' input waited until the load stopped (100 lines/s to
//!   10 000 workers: their 10 000 PINGs of one round were reaped in a burst 300 ms late).
//!   A turn with many sends also hands them over every `YIELD_EVERY_WRITES` (64) and offers
//!   the CPU to whoever waits for it (`core_loop`), so that one call never holds a
//!   non-preemptible kernel's CPU for all of a turn's sends. The kernel keeps
//!   overflowing completions (NODROP). An idle core sleeps in the kernel until the mailbox, a
//!   socket or the hub's timer wakes it.
mod bufring;
mod event_loop;
mod probe;
mod send;
mod token;
mod wakeup;

use std::sync::Arc;

use super::{CoreContext, CoreWakeup};

/// Probes io_uring once at start: `kernel.io_uring_disabled`, ring setup (with
/// `SINGLE_ISSUER | DEFER_TASKRUN` where the kernel has them), the opcodes this driver uses, a
/// provided-buffer ring, and a functional self-test (one multishot recv from the buffer ring
/// and one `SENDMSG` over a socket pair, bounded by 1 s). `Err` carries a one-line reason for
/// the log (seccomp, sysctl, old kernel, ...).
pub fn probe() -> Result<(), String> {
    probe::probe()
}

/// A wake-up for a core running this driver (an eventfd), and the function that fires it.
pub fn new_wakeup() -> std::io::Result<(CoreWakeup, Arc<dyn Fn() + Send + Sync>)> {
    wakeup::new_wakeup()
}

/// Runs one core on the calling thread until it is told to shut down (or its mailbox is
/// dropped). The context's wake-up must come from [`new_wakeup`].
pub fn run_core(ctx: CoreContext) -> anyhow::Result<()> {
    event_loop::run_core(ctx)
}

#[cfg(test)]
mod tests;

/// The driver's send path without the hub, for `benches/send_path.rs` only: a ring built like
/// a core's ([`probe::build_ring`] with the core's queue sizes and flags) and one
/// [`send::SendBuf`] per socket, preparing exactly the submissions the core loop does.
#[doc(hidden)]
pub(crate) mod bench {
    use std::io::{self, IoSlice};
    use std::os::fd::RawFd;

    use io_uring::IoUring;

    use super::event_loop::{CQ_ENTRIES, SQ_ENTRIES};
    use super::probe::{build_ring, Sleep};
    use super::send::SendBuf;

    /// A core's ring and a send buffer per socket (the ring first: dropped before the buffers).
    pub struct SendRing {
        ring: IoUring,
        /// Never grown after `new`, so a buffer never moves while a send points at it.
        bufs: Vec<SendBuf>,
    }

    impl SendRing {
        /// A ring like a core's, with send buffers for `sockets` sockets.
        pub fn new(sockets: usize) -> io::Result<Self> {
            let (ring, _) = build_ring(SQ_ENTRIES, CQ_ENTRIES, Sleep::InRing)?;
            Ok(Self { ring, bufs: (0..sockets).map(|_| *SendBuf::new()).collect() })
        }

        /// One gathered send of `iov` to every socket of `fds` (at most the `sockets` given
        /// to [`SendRing::new`]), submitted together as a core's turn does, then every
        /// completion reaped. Returns the bytes sent; the first error fails the call.
        pub fn send_all(&mut self, fds: &[RawFd], iov: &[IoSlice<'_>]) -> io::Result<usize> {
            assert!(fds.len() <= self.bufs.len(), "more sockets than send buffers");
            let (mut queued, mut done, mut sent) = (0usize, 0usize, 0usize);
            let mut first_err = None;
            while done < fds.len() {
                while queued < fds.len() {
                    let entry = self.bufs[queued].prepare(fds[queued], iov, queued as u64);
                    // SAFETY: the send buffer is not touched again before its completion is
                    // reaped below (this call does not return before every completion is);
                    // `iov` borrows bytes that outlive the call, and the caller's fds stay
                    // open for it.
                    if unsafe { self.ring.submission().push(&entry) }.is_err() {
                        break;
                    }
                    queued += 1;
                }
                if let Err(e) = self.ring.submit_and_wait(1) {
                    if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) {
                        continue;
                    }
                    // Sends may still be in flight: never free the buffers they point at.
                    std::mem::forget(std::mem::take(&mut self.bufs));
                    return Err(e);
                }
                for cqe in self.ring.completion() {
                    done += 1;
                    match usize::try_from(cqe.result()) {
                        Ok(n) => sent += n,
                        Err(_) => {
                            first_err.get_or_insert(io::Error::from_raw_os_error(-cqe.result()));
                        }
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(sent),
            }
        }
    }
}
