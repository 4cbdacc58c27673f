//! What both drivers do around a core's [`Hub`], written once: the mailbox, the hub's outputs,
//! the gathered writes of a loop turn, the shutdown grace and the kernel queue samples.
//!
//! ```text
//!   drain_inbox: Batch → on_batch, Upstream → on_upstream, Snapshot → snapshot (+ queues),
//!                Shutdown (or the mailbox gone) → shutdown, and the grace starts
//!   turn:        poll_output (Upstream → the source's inbox, Close → Sockets::close),
//!                then take_dirty → gather → Sockets::write, until neither is left
//!   written:     on_written, then Sockets::wait_writable after a short write,
//!                or Sockets::lost after an error
//! ```
//!
//! A driver keeps a [`CoreLoop`] next to its sockets and implements [`Sockets`] for the I/O
//! itself: epoll writes at once and reports the result, io_uring submits and reports from the
//! completion. Either way the slices `gather` returned are not kept past [`Sockets::write`]:
//! io_uring copies them into iovecs of its own, which stay valid because the hub keeps the
//! bytes behind them until `on_written`/`on_peer_closed` (ARCHITECTURE.md, "Rules for drivers").
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::sync::mpsc::{Receiver, TryRecvError};

use super::{sockq, CoreMsg, Inbox};
use crate::hub::{CloseHow, ConnId, Hub, HubConfig, HubOutput, UpstreamCmd};
use crate::time::{Clock, Now};

/// How long a core keeps flushing after `Shutdown` before it resets what is left.
pub(crate) const SHUTDOWN_GRACE_MS: u64 = 2_000;

/// The I/O a driver does for the shared loop.
pub(crate) trait Sockets {
    /// The fd of `id`'s socket while the driver holds it, for the kernel queue samples.
    fn fd(&self, id: ConnId) -> Option<RawFd>;

    /// Whether `id` can start a write now: open, its write side not shut, no write in flight.
    fn can_write(&self, id: ConnId) -> bool;

    /// Writes `iov` (`len` bytes in all) to `id`, or hands it to the kernel. The slices are
    /// only valid during this call; a driver that submits copies the pointers.
    fn write(&mut self, id: ConnId, iov: &[IoSlice<'_>], len: usize) -> Write;

    /// `id`'s socket took part of a write: call [`Hub::on_writable`] once it can take more.
    fn wait_writable(&mut self, hub: &mut Hub, id: ConnId);

    /// The hub's `Close`: `Graceful` shuts the write side (the hub times the wait for EOF and
    /// sends `Abort` if it does not come), `Abort` resets. The hub is told
    /// [`Hub::on_peer_closed`] once the socket is gone.
    fn close(&mut self, hub: &mut Hub, id: ConnId, how: CloseHow, now: Now);

    /// A write to `id` failed: drop the socket and tell the hub it was lost.
    fn lost(&mut self, hub: &mut Hub, id: ConnId, now: Now);
}

/// What became of a write.
pub(crate) enum Write {
    /// Handed to the kernel: its completion goes to [`CoreLoop::written`].
    Submitted,
    /// Done (or failed) already.
    Done(io::Result<usize>),
}

/// A core's hub and the state both drivers keep around it.
pub(crate) struct CoreLoop {
    /// The core's hub; the drivers feed it their reads, accepts and closes directly.
    pub hub: Hub,
    /// Core index, for logs and snapshots.
    pub index: usize,
    clock: Clock,
    upstream: Inbox<(usize, UpstreamCmd)>,
    /// Set by `Shutdown`: when to stop flushing (monotonic ms).
    stop_at_ms: Option<u64>,
    dirty: Vec<ConnId>,
    /// The iovec list, its allocation reused for every write.
    iov: Vec<IoSlice<'static>>,
}

/// Empties a vector of slices and hands back its allocation with a new (unrelated) lifetime,
/// so one iovec buffer serves writes that borrow different data (the closure never runs: the
/// vector is empty).
fn recycle<'b>(mut v: Vec<IoSlice<'_>>) -> Vec<IoSlice<'b>> {
    v.clear();
    v.into_iter().map(|_| -> IoSlice<'b> { unreachable!("the vector is empty") }).collect()
}

impl CoreLoop {
    /// A core's loop state around a new hub.
    pub(super) fn new(
        index: usize,
        hub: HubConfig,
        upstream: Inbox<(usize, UpstreamCmd)>,
        clock: Clock,
    ) -> Self {
        Self {
            hub: Hub::new(hub),
            index,
            clock,
            upstream,
            stop_at_ms: None,
            dirty: Vec::new(),
            iov: Vec::new(),
        }
    }

    /// The current time.
    pub(super) fn now(&self) -> Now {
        self.clock.now()
    }

    /// The process clock.
    pub(super) fn clock(&self) -> Clock {
        self.clock
    }

    /// When the shutdown grace ends, once shutting down.
    pub(super) fn stop_at_ms(&self) -> Option<u64> {
        self.stop_at_ms
    }

    /// Handles every queued message (batches coalesce into one flush). `Shutdown`, or the
    /// mailbox gone, starts the shutdown grace ([`CoreLoop::stop_at_ms`]).
    pub(super) fn drain_inbox(&mut self, inbox: &Receiver<CoreMsg>, sockets: &impl Sockets, now: Now) {
        loop {
            match inbox.try_recv() {
                Ok(CoreMsg::Batch(batch)) => self.hub.on_batch(batch, now),
                Ok(CoreMsg::Upstream(event)) => self.hub.on_upstream(&event, now),
                Ok(CoreMsg::Snapshot(reply)) => {
                    let snap =
                        self.hub.snapshot(self.index, |id| sockets.fd(id).map_or((0, 0), kernel_queues));
                    // The scraper may have given up waiting; that is fine.
                    let _ = reply.send(snap);
                }
                Ok(CoreMsg::Shutdown) => self.begin_shutdown(now),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    if self.stop_at_ms.is_none() {
                        tracing::info!(core = self.index, "mailbox closed; shutting down");
                    }
                    self.begin_shutdown(now);
                    return;
                }
            }
        }
    }

    /// `ERROR server shutting down` to everyone; the grace starts.
    pub(super) fn begin_shutdown(&mut self, now: Now) {
        if self.stop_at_ms.is_none() {
            tracing::debug!(core = self.index, "shutting down");
            self.stop_at_ms = Some(now.mono_ms + SHUTDOWN_GRACE_MS);
            self.hub.shutdown(now);
        }
    }

    /// One loop turn's work: hub outputs, then one gathered write for every dirty connection,
    /// until neither is left.
    pub(super) fn turn(&mut self, sockets: &mut impl Sockets, now: Now) {
        let mut dirty = std::mem::take(&mut self.dirty);
        loop {
            let mut any = false;
            while let Some(out) = self.hub.poll_output() {
                any = true;
                match out {
                    HubOutput::Upstream(cmd) => self.forward(cmd),
                    HubOutput::Close { conn, how } => sockets.close(&mut self.hub, conn, how, now),
                }
            }
            dirty.clear();
            self.hub.take_dirty(&mut dirty);
            if dirty.is_empty() && !any {
                break;
            }
            for &id in &dirty {
                self.write(sockets, id, now);
            }
        }
        self.dirty = dirty;
    }

    /// One gathered write for `id`.
    fn write(&mut self, sockets: &mut impl Sockets, id: ConnId, now: Now) {
        if !sockets.can_write(id) {
            return;
        }
        let mut iov = recycle(std::mem::take(&mut self.iov));
        let len = self.hub.gather(id, &mut iov);
        let res = (len > 0).then(|| sockets.write(id, &iov, len));
        self.iov = recycle(iov);
        if let Some(Write::Done(result)) = res {
            self.written(sockets, id, result, len, now);
        }
    }

    /// The outcome of a write of `len` bytes to `id`: progress for the hub, then a wait for
    /// room after a short write, or the end of the connection after an error.
    pub(super) fn written(
        &mut self,
        sockets: &mut impl Sockets,
        id: ConnId,
        result: io::Result<usize>,
        len: usize,
        now: Now,
    ) {
        match result {
            Ok(n) => {
                self.hub.on_written(id, n, now);
                if n < len {
                    sockets.wait_writable(&mut self.hub, id);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.hub.on_written(id, 0, now);
                sockets.wait_writable(&mut self.hub, id);
            }
            Err(e) => {
                tracing::debug!(core = self.index, conn = %id, error = %e, "write failed");
                self.hub.on_written(id, 0, now);
                sockets.lost(&mut self.hub, id, now);
            }
        }
    }

    /// After the last socket is gone: forwards what the hub still owes the upstream (the
    /// USER_SYNC ends of the connections just closed); closes are moot by now.
    pub(super) fn flush_upstream(&mut self) {
        while let Some(out) = self.hub.poll_output() {
            if let HubOutput::Upstream(cmd) = out {
                self.forward(cmd);
            }
        }
    }

    fn forward(&self, cmd: UpstreamCmd) {
        if !self.upstream.send((self.index, cmd)) {
            tracing::debug!(core = self.index, "source thread gone; command dropped");
        }
    }
}

/// SIOCOUTQ and SIOCINQ of a socket, read on the core that owns it (0 where unavailable).
fn kernel_queues(fd: RawFd) -> (u64, u64) {
    (sockq::send_queue(fd).map_or(0, u64::from), sockq::recv_queue(fd).map_or(0, u64::from))
}
