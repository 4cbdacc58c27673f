//! What both drivers do around a core's [`Hub`], written once: the mailbox, the hub's outputs,
//! the gathered writes of a loop turn, the shutdown grace and the kernel queue samples.
//!
//! ```text
//!   drain_inbox: Batch → on_batch, Upstream → on_upstream, Snapshot → snapshot (+ queues),
//!                Shutdown (or the mailbox gone) → shutdown, and the grace starts
//!   turn:        poll_output (Upstream → the source's inbox, Close → Sockets::close),
//!                then next_dirty → gather → Sockets::write, one write per connection,
//!                proven readers first, then TURN_WRITE_BUDGET bytes at most for the others,
//!                the congested last (the rest waits for the next turn: has_writes), then
//!                poll_output again
//!   written:     on_written (and, until the connection is proven and while its send queue
//!                could hold more than the congestion mark, that queue for on_send_queue),
//!                then Sockets::wait_writable after a short write,
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
use std::sync::Arc;
use std::time::Duration;

use super::balance::Balance;
use super::moderation::{Moderation, ModerationConfig};
use super::outgoing::Outgoing;
use super::trim::{self, Trimmer};
use super::{sockq, Adopted, CoreMsg, IdleCore, Inbox};
use crate::hub::stats::SocketSample;
use crate::hub::{Batch, CloseHow, ConnId, Hub, HubConfig, HubOutput, UpstreamCmd};
use crate::time::{Clock, Now};

/// How long a core keeps flushing after `Shutdown` before it resets what is left.
pub(crate) const SHUTDOWN_GRACE_MS: u64 = 2_000;

/// Bytes a core gathers for writing in one loop turn for the connections that are not proven
/// readers (the write that crosses it still goes out whole; proven readers are not counted).
/// About a quarter of a millisecond of loopback TCP, so a turn stays short whatever the number
/// of connections with room in their socket: while a crowd of stalled workers has its send
/// buffers filled, the readers (written first in every turn) wait at most that long. 1 MiB
/// left the readers' p99 beside 1000 stalled workers at 1.3–2.1 ms; 256 KiB gives 0.8–1.2 ms
/// in the same run, with max-rate deliveries at 1000 subscribers unchanged (README, "Stalled
/// workers and memory").
pub(crate) const TURN_WRITE_BUDGET: usize = 256 << 10;

/// Writes a loop turn makes before the core hands them to the kernel ([`Sockets::hand_over`])
/// and offers its CPU to a task that waits for it (`sched_yield(2)`, which returns at once when
/// none does). On a kernel without preemption (`PREEMPT_NONE`, common on servers and VMs) a
/// worker this core's writes woke on the same CPU runs only when the core returns to user space
/// and the scheduler has already decided to switch, or when one io_uring call has issued all
/// its sends; beside co-located readers that fall behind, the core then goes round its workers
/// faster than they read, each read finds several small sends, and every one cost a TCP
/// segment, an ACK and a wake-up (README, "Giving the CPU back during a long turn": at 100
/// lines/s to 10 000 workers the median fell from 77 to 33 ms on io_uring, 69 to 39 ms on
/// epoll). Turns to 100 subscribers (about 50 writes a core) never get here. Much shorter
/// stretches cost CPU: 8 sends per io_uring call took 17% more per delivery at max rate to 1000
/// workers (docs/performance-history.md, fourteenth session).
pub(crate) const YIELD_EVERY_WRITES: u64 = 64;

/// TCP_NOTSENT_LOWAT of a worker socket until it has proven it reads (its socket took more
/// than `hub::PROVEN_READER_BYTES`), unless `--worker-notsent-lowat` sets one for good: a
/// worker that never reads then takes its receive window plus this much before its socket
/// blocks, instead of its whole send buffer as well, so a crowd of them is filled about three
/// times faster and costs the readers beside it that much less. A reader's socket sends what
/// it is given at once (its window is open), so the limit holds it back only when it falls
/// behind: then it is what the socket can take per loop turn beyond the reader's window, and
/// 32 KiB measured too little for a new reader beside a crowd on a starved core (it fell 8 MiB
/// behind before it was proven, in `tests/stalled_readers.rs` under load). Once proven the
/// limit is lifted, so a fast reader is not woken for every few KiB it drains.
pub(crate) const UNPROVEN_NOTSENT_LOWAT: usize = 64 << 10;

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

    /// Gives the kernel the writes queued so far in this turn (a driver that submits them);
    /// one that writes at once has nothing to do.
    fn hand_over(&mut self) {}
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
    /// The iovec list, its allocation reused for every write.
    iov: Vec<IoSlice<'static>>,
    /// When to give the heap back after a large backlog went.
    trimmer: Trimmer,
    /// Worker sockets start with [`UNPROVEN_NOTSENT_LOWAT`] ([`tune_worker_socket`]), lifted
    /// here once the connection is a proven reader.
    unproven_lowat: bool,
    /// The other cores' mailboxes, for this core's Redis-mode publishes ([`CoreLoop::publish`]).
    peers: Vec<Inbox<CoreMsg>>,
    /// What waits for a peer whose mailbox is full.
    to_peers: Outgoing,
    /// Tells the mailbox's senders whether this core has connections.
    idle: Arc<IdleCore>,
    /// Whether the mailbox waits for the write moderation window to end.
    moderation: Moderation,
    /// Batches taken from the mailbox since the last turn's writes.
    batches_taken: u64,
    /// Every core's connection counts, if connections are balanced over several cores.
    balance: Option<Arc<Balance>>,
    /// The connection count this core last published to `balance`.
    published_live: usize,
    /// Connections placed on this core (kept from its own accepts, or adopted) since then.
    unpublished: usize,
    /// Sockets other cores handed over, taken from the mailbox, for the driver to register.
    adopted: Vec<Adopted>,
    /// Connections this core accepted and handed to another.
    handed_off: u64,
}

/// A write moderation window in force: when it ends (the clock's `mono_us`, which names the
/// window) and how long that is from now.
#[derive(Clone, Copy, Debug)]
pub(super) struct Hold {
    pub until_us: u64,
    pub left: Duration,
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
        worker_notsent_lowat: usize,
        peers: Vec<Inbox<CoreMsg>>,
        idle: Arc<IdleCore>,
    ) -> Self {
        let limit = usize::try_from(hub.max_pending_bytes).unwrap_or(usize::MAX);
        Self {
            to_peers: Outgoing::new(peers.len(), limit),
            peers,
            hub: Hub::new(hub),
            index,
            clock,
            upstream,
            stop_at_ms: None,
            iov: Vec::new(),
            trimmer: Trimmer::default(),
            unproven_lowat: worker_notsent_lowat == 0,
            idle,
            moderation: Moderation::new(ModerationConfig::OFF),
            batches_taken: 0,
            balance: None,
            published_live: 0,
            unpublished: 0,
            adopted: Vec::new(),
            handed_off: 0,
        }
    }

    /// The loop with new connections balanced over the cores that share `balance` (it starts
    /// keeping every connection it accepts).
    #[must_use]
    pub(super) fn with_balance(mut self, balance: Arc<Balance>) -> Self {
        self.balance = (balance.cores() > 1).then_some(balance);
        self
    }

    /// Which core takes a connection this core just accepted: this one, unless another has
    /// fewer connections (`balance`). Then the driver hands the socket over with
    /// [`CoreLoop::hand_off`] before it reads or writes anything.
    pub(super) fn placement(&mut self) -> usize {
        let Some(balance) = &self.balance else { return self.index };
        let to = balance.place(self.index);
        if to == self.index {
            self.unpublished += 1;
        }
        to
    }

    /// Hands a socket accepted here to core `to` (from [`CoreLoop::placement`]). Gives it back
    /// if that core's mailbox is full or gone: then it stays here.
    pub(super) fn hand_off(&mut self, to: usize, socket: Adopted) -> Result<(), Adopted> {
        use std::sync::mpsc::TrySendError;
        let peer = if to < self.index { to } else { to - 1 };
        let Some(mailbox) = self.peers.get(peer) else {
            self.keep_placed(to);
            return Err(socket);
        };
        match mailbox.try_send(CoreMsg::Adopt(socket)) {
            Ok(()) => {
                self.handed_off += 1;
                Ok(())
            }
            Err(TrySendError::Full(msg) | TrySendError::Disconnected(msg)) => {
                self.keep_placed(to);
                match msg {
                    CoreMsg::Adopt(socket) => Err(socket),
                    _ => unreachable!("a channel gives back the message it refused"),
                }
            }
        }
    }

    /// A connection placed on core `to` stays here after all (it could not be handed over).
    pub(super) fn keep_placed(&mut self, to: usize) {
        if let Some(balance) = &self.balance {
            balance.moved(to, self.index);
        }
        self.unpublished += 1;
    }

    /// The sockets other cores handed to this one since the last call, for the driver to
    /// register as if it had accepted them. Call after every [`CoreLoop::drain_inbox`].
    pub(super) fn take_adopted(&mut self) -> Vec<Adopted> {
        std::mem::take(&mut self.adopted)
    }

    /// Tells the other cores how many connections this one holds, if that changed.
    fn publish_load(&mut self) {
        let Some(balance) = &self.balance else { return };
        let live = self.hub.len();
        if live != self.published_live || self.unpublished > 0 {
            balance.publish(self.index, live, self.unpublished);
            self.published_live = live;
            self.unpublished = 0;
        }
    }

    /// The loop with write moderation as configured (it starts with none).
    #[must_use]
    pub(super) fn with_moderation(mut self, config: ModerationConfig) -> Self {
        self.moderation = Moderation::new(config);
        self
    }

    /// The current time.
    pub(super) fn now(&self) -> Now {
        self.clock.now()
    }

    /// While write moderation holds the mailbox back: when the window ends. The driver then
    /// takes no mail ([`CoreLoop::drain_inbox`] does nothing) and must wake up by then without
    /// a sender's wake-up: it may sleep without telling the senders. Reads the clock only while
    /// moderation is engaged.
    pub(super) fn held(&self) -> Option<Hold> {
        if !self.moderation.engaged() {
            return None;
        }
        let now_us = self.clock.mono_us();
        let until_us = self.moderation.held(now_us)?;
        Some(Hold { until_us, left: Duration::from_micros(until_us - now_us) })
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
    /// mailbox gone, starts the shutdown grace ([`CoreLoop::stop_at_ms`]). True if there was
    /// a message, or the mailbox is found gone before the grace started: then a turn has work
    /// to do. (A mailbox already gone is not news: reported every time, it would keep the
    /// io_uring loop from ever sleeping through the grace.)
    ///
    /// First tells the senders whether the core has connections ([`IdleCore`]): one accepted
    /// since the last drain makes the next batch wake it, and what was sent before is taken
    /// here, before the new connection's first read is handled.
    pub(super) fn drain_inbox(
        &mut self,
        inbox: &Receiver<CoreMsg>,
        sockets: &impl Sockets,
        now: Now,
    ) -> bool {
        if self.held().is_some() {
            return false;
        }
        // Closes since the last turn count before anything here answers (a snapshot).
        self.publish_load();
        self.idle.observe(self.hub.is_empty());
        let mut any = false;
        loop {
            let msg = inbox.try_recv();
            any |= msg.is_ok();
            match msg {
                Ok(CoreMsg::Batch(batch)) => {
                    self.batches_taken += 1;
                    self.hub.on_batch(batch, now);
                }
                Ok(CoreMsg::Upstream(event)) => self.hub.on_upstream(&event, now),
                Ok(CoreMsg::Fetched { id, result }) => self.hub.on_fetched(id, result, now),
                Ok(CoreMsg::Snapshot(reply)) => {
                    let mut snap = self.hub.snapshot(self.index, now, |id| {
                        sockets.fd(id).map_or_else(SocketSample::default, socket_sample)
                    });
                    snap.stats.coalesce_windows = self.moderation.windows();
                    snap.stats.coalescing = u64::from(self.moderation.engaged());
                    snap.stats.handed_off = self.handed_off;
                    // The scraper may have given up waiting; that is fine.
                    let _ = reply.send(snap);
                }
                Ok(CoreMsg::Shutdown) => self.begin_shutdown(now),
                Ok(CoreMsg::PublishLost { channels, batches }) => {
                    self.hub.on_publish_lost(&channels, batches, now);
                }
                Ok(CoreMsg::Adopt(socket)) => {
                    // The driver registers it before this turn ends: from here on the core
                    // has a connection, so the senders must wake it (`IdleCore`), and what
                    // they sent before is taken in this drain.
                    self.idle.observe(false);
                    self.unpublished += 1;
                    self.adopted.push(socket);
                }
                Err(TryRecvError::Empty) => return any,
                Err(TryRecvError::Disconnected) => {
                    let news = self.stop_at_ms.is_none();
                    if news {
                        tracing::info!(core = self.index, "mailbox closed; shutting down");
                    }
                    self.begin_shutdown(now);
                    return any || news;
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

    /// One loop turn's work: hub outputs, then at most one gathered write for every dirty
    /// connection, then the outputs that caused. Proven readers (workers whose sockets took
    /// more than a worker that never reads could absorb) are written first, all of them; the
    /// others get [`TURN_WRITE_BUDGET`] bytes (at least one write).
    ///
    /// A connection with more to write after its write, and the connections the budget left
    /// out (first in line next turn), wait for the next turn: the driver polls its sockets,
    /// timers and mailbox in between, and must not sleep while [`CoreLoop::has_writes`]
    /// holds. So one turn cannot spend seconds filling the send buffers of many workers
    /// (stalled ones take up to their whole buffer) before the others get their share.
    pub(super) fn turn(&mut self, sockets: &mut impl Sockets, now: Now) {
        self.to_peers.flush(&self.peers);
        self.outputs(sockets, now);
        // Only a turn that took batches can open a window (and only then is it timed).
        let began_us = (self.batches_taken > 0 && self.moderation.is_on()).then(|| self.clock.mono_us());
        let mut order = self.hub.dirty_turn();
        let mut spent = 0usize;
        let mut writes = 0u64;
        while let Some(next) = self.hub.next_dirty(&mut order, spent < TURN_WRITE_BUDGET) {
            let len = self.write(sockets, next.id, now);
            if len > 0 {
                writes += 1;
                if writes % YIELD_EVERY_WRITES == 0 {
                    sockets.hand_over();
                    std::thread::yield_now();
                }
            }
            if !next.proven {
                spent += len;
            }
        }
        let batches = std::mem::take(&mut self.batches_taken);
        if let Some(began_us) = began_us {
            self.moderation.fanned_out(began_us, batches, writes);
        }
        self.outputs(sockets, now);
        self.publish_load();
        if self.trimmer.observe(self.hub.log().held_bytes(), now.mono_ms) {
            let released = trim::release_free_heap();
            tracing::debug!(core = self.index, released, "a large backlog went; heap trimmed");
        }
    }

    /// Whether writes wait for the next turn: the driver must run it without sleeping.
    pub(super) fn has_writes(&self) -> bool {
        self.hub.has_dirty()
    }

    /// The hub's outputs, until none is left: commands for the upstream, closes.
    fn outputs(&mut self, sockets: &mut impl Sockets, now: Now) {
        while let Some(out) = self.hub.poll_output() {
            match out {
                HubOutput::Upstream(UpstreamCmd::Publish(batch)) => self.publish(batch.0, now),
                HubOutput::Upstream(cmd) => self.forward(cmd),
                HubOutput::Close { conn, how } => sockets.close(&mut self.hub, conn, how, now),
            }
        }
    }

    /// One gathered write for `id`; returns its length (0 if there was none).
    fn write(&mut self, sockets: &mut impl Sockets, id: ConnId, now: Now) -> usize {
        if !sockets.can_write(id) {
            return 0;
        }
        let mut iov = recycle(std::mem::take(&mut self.iov));
        let len = self.hub.gather(id, &mut iov);
        let res = (len > 0).then(|| sockets.write(id, &iov, len));
        self.iov = recycle(iov);
        if let Some(Write::Done(result)) = res {
            self.written(sockets, id, result, len, now);
        }
        len
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
                let unproven = !self.hub.is_proven_reader(id);
                self.hub.on_written(id, n, now);
                if self.hub.wants_send_queue(id) {
                    if let Some(queued) = sockets.fd(id).and_then(|fd| sockq::send_queue(fd).ok()) {
                        self.hub.on_send_queue(id, u64::from(queued));
                    }
                } else if unproven && self.unproven_lowat && self.hub.is_proven_reader(id) {
                    // Proven a reader with this write: its socket may queue as much as the
                    // kernel lets it from now on.
                    if let Some(fd) = sockets.fd(id) {
                        if let Err(e) = sockq::set_notsent_lowat(fd, 0) {
                            tracing::debug!(core = self.index, conn = %id, error = %e, "TCP_NOTSENT_LOWAT failed");
                        }
                    }
                }
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

    /// A batch of Redis-mode messages published on this core: into this core's log at once
    /// (its subscribers are written this turn), and into every other core's mailbox, by this
    /// thread, without the source in between; a peer whose mailbox is full gets it queued here
    /// and moved on at each turn of this core ([`CoreLoop::mail_retry_ms`]), and past `max_pending_bytes`
    /// dropped for that peer alone, which then cuts off its subscribers of those channels
    /// (`Outgoing::hand_out_published`). A publisher's messages keep their order on every core;
    /// two publishers on different cores may interleave differently on different cores, as
    /// they may in Redis between two publishers' sends.
    fn publish(&mut self, batch: std::sync::Arc<Batch>, now: Now) {
        self.to_peers.hand_out_published(&self.peers, &batch);
        self.hub.on_batch(batch, now);
    }

    /// When the loop should run again to move publishes waiting for a full peer mailbox (a
    /// mailbox has no "taken" signal), if any wait: in 1 ms (the epoll driver; the io_uring
    /// driver keeps a timer already in flight, so there it is at most the hub's 100 ms tick,
    /// and any completion before that runs a turn too).
    pub(super) fn mail_retry_ms(&self) -> u64 {
        if self.to_peers.queued() {
            self.now().mono_ms + 1
        } else {
            u64::MAX
        }
    }

    fn forward(&self, cmd: UpstreamCmd) {
        if !self.upstream.send((self.index, cmd)) {
            tracing::debug!(core = self.index, "source thread gone; command dropped");
        }
    }
}

/// A Redis-mode client's address as `/connections` shows it (`unknown` if the socket no longer
/// has one).
pub(crate) fn peer_name(socket: socket2::SockRef<'_>) -> String {
    socket
        .peer_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string())
}

/// Caps an accepted worker socket's kernel send buffer at `sndbuf` (0 leaves the kernel's
/// default and auto-tuning), so a worker that stops reading holds at most that much kernel
/// memory (Linux reserves twice the value for bookkeeping); and the bytes it holds unsent at
/// `notsent_lowat` (TCP_NOTSENT_LOWAT) for good, or, with 0, at [`UNPROVEN_NOTSENT_LOWAT`]
/// until it proves it reads ([`CoreLoop::written`] lifts it then), so that a worker that never
/// reads takes only its receive window plus that much before its socket blocks. Filling a
/// stalled worker's socket is the one cost a crowd of them puts on a core (the write path of
/// loopback TCP runs the receiver's side too): the smaller the fill, the sooner they cost
/// nothing.
pub(crate) fn tune_worker_socket(
    core: usize,
    socket: socket2::SockRef<'_>,
    sndbuf: usize,
    notsent_lowat: usize,
) {
    if sndbuf != 0 {
        if let Err(e) = socket.set_send_buffer_size(sndbuf) {
            tracing::debug!(core, error = %e, "SO_SNDBUF failed");
        }
    }
    let lowat = if notsent_lowat == 0 { UNPROVEN_NOTSENT_LOWAT } else { notsent_lowat };
    if let Err(e) = socket.set_tcp_notsent_lowat(u32::try_from(lowat).unwrap_or(u32::MAX)) {
        tracing::debug!(core, error = %e, "TCP_NOTSENT_LOWAT failed");
    }
}

/// SIOCOUTQ and SIOCINQ of a socket, read on the core that owns it (0 where unavailable).
fn socket_sample(fd: RawFd) -> SocketSample {
    SocketSample {
        send_queue: sockq::send_queue(fd).map_or(0, u64::from),
        read_queue: sockq::recv_queue(fd).map_or(0, u64::from),
        peer: sockq::peer_addr(fd).map_or_else(|_| String::new(), |a| a.to_string()),
    }
}

/// How often a failing `accept` is reported after its first failure.
pub(crate) const ACCEPT_LOG_INTERVAL_MS: u64 = 10_000;

/// What [`FailureLog`] says to log.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Report {
    /// The first failure (after a quiet interval): log it as it is.
    First,
    /// `count` more failures since the last report, `over_ms` ago, the latest being `last`.
    Repeated { count: u64, over_ms: u64, last: String },
}

/// Rate limit for a failure that repeats as long as its cause lasts (`accept` out of file
/// descriptors, retried every few tens of milliseconds): the first failure is logged, then at
/// most one count per interval. Time is passed in, so it is tested without a clock.
#[derive(Debug)]
pub(crate) struct FailureLog {
    interval_ms: u64,
    /// Start of the current interval: the last report.
    since_ms: Option<u64>,
    /// Failures since then, not yet reported, and the latest one.
    count: u64,
    last: String,
}

impl FailureLog {
    /// A limiter reporting at most once per `interval_ms` after the first failure.
    pub(super) fn new(interval_ms: u64) -> Self {
        Self { interval_ms, since_ms: None, count: 0, last: String::new() }
    }

    /// A failure `error` at `now_ms`: what to log, if anything.
    pub(super) fn failed(&mut self, now_ms: u64, error: &dyn std::fmt::Display) -> Option<Report> {
        let Some(since) = self.since_ms else {
            self.since_ms = Some(now_ms);
            return Some(Report::First);
        };
        let over_ms = now_ms.saturating_sub(since);
        if over_ms >= self.interval_ms && self.count == 0 {
            // Quiet for a whole interval: this is a new episode.
            self.since_ms = Some(now_ms);
            return Some(Report::First);
        }
        self.count += 1;
        self.last = error.to_string();
        self.due(now_ms)
    }

    /// A success at `now_ms`: reports the failures not yet reported once their interval is
    /// over (so a cause that went away is still accounted for).
    pub(super) fn succeeded(&mut self, now_ms: u64) -> Option<Report> {
        self.due(now_ms)
    }

    fn due(&mut self, now_ms: u64) -> Option<Report> {
        let since = self.since_ms?;
        let over_ms = now_ms.saturating_sub(since);
        if self.count == 0 || over_ms < self.interval_ms {
            return None;
        }
        let report = Report::Repeated { count: self.count, over_ms, last: std::mem::take(&mut self.last) };
        self.since_ms = Some(now_ms);
        self.count = 0;
        Some(report)
    }

    /// Logs what [`FailureLog::failed`] said for core `core`.
    pub(super) fn log_accept_failure(&mut self, core: usize, now_ms: u64, error: &std::io::Error) {
        match self.failed(now_ms, error) {
            Some(Report::First) => tracing::warn!(core, %error, "accept failed"),
            Some(report) => log_repeated(core, report),
            None => {}
        }
    }

    /// Logs what [`FailureLog::succeeded`] said for core `core`.
    pub(super) fn log_accept_success(&mut self, core: usize, now_ms: u64) {
        if let Some(report) = self.succeeded(now_ms) {
            log_repeated(core, report);
        }
    }
}

fn log_repeated(core: usize, report: Report) {
    if let Report::Repeated { count, over_ms, last } = report {
        tracing::warn!(core, "accept failed {count} times in the last {} s: {last}", over_ms.div_ceil(1000));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::sim::Sim;
    use crate::hub::LineMeta;
    use crate::proto::{Generation, StreamId};

    const E: &str = "Too many open files (os error 24)";

    /// Sockets that take every write whole and log what the loop asked of them.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<char>,
    }

    impl Sockets for Recorder {
        fn fd(&self, _id: ConnId) -> Option<RawFd> {
            None
        }
        fn can_write(&self, _id: ConnId) -> bool {
            true
        }
        fn write(&mut self, _id: ConnId, _iov: &[IoSlice<'_>], len: usize) -> Write {
            self.calls.push('w');
            Write::Done(Ok(len))
        }
        fn wait_writable(&mut self, _hub: &mut Hub, _id: ConnId) {}
        fn close(&mut self, _hub: &mut Hub, _id: ConnId, _how: CloseHow, _now: Now) {}
        fn lost(&mut self, _hub: &mut Hub, _id: ConnId, _now: Now) {}
        fn hand_over(&mut self) {
            self.calls.push('h');
        }
    }

    /// A turn that writes more than `YIELD_EVERY_WRITES` connections hands its writes over
    /// (and offers the CPU) after every that many, so that neither one io_uring call nor one
    /// stretch of the turn keeps the CPU from the workers it woke; a short turn is never cut.
    #[test]
    fn a_long_turn_hands_its_writes_over_every_few_and_a_short_one_never() {
        let workers = 2 * YIELD_EVERY_WRITES as usize + 10;
        let (upstream, _upstream_rx) = Inbox::new(Arc::new(|| {}));
        let clock = Clock::new();
        let mut core =
            CoreLoop::new(0, Sim::test_config(1 << 20), upstream, clock, 0, Vec::new(), IdleCore::new(64));
        let now = core.now();
        core.hub.on_upstream(&Sim::connected("master", Sim::positions(), Generation::Seed), now);
        for _ in 0..workers {
            let id = core.hub.accept(now);
            core.hub.on_bytes(id, b"NAME w\nREPLICATE ALL\n", now);
        }
        // The greetings and positions: one write each, in as many turns as they take.
        let mut sockets = Recorder::default();
        while core.has_writes() {
            core.turn(&mut sockets, now);
        }
        sockets.calls.clear();

        let line = bytes::Bytes::from_static(b"RDATA events 200 [\"row\"]\n");
        let meta =
            LineMeta { start: 0, end: line.len() as u32, stream: StreamId::Events as u8, token: Some(200) };
        core.hub.on_batch(Arc::new(Batch::new(line, vec![meta])), now);
        core.turn(&mut sockets, now);
        let every = YIELD_EVERY_WRITES as usize;
        let mut expected = Vec::new();
        for k in 1..=workers {
            expected.push('w');
            if k % every == 0 {
                expected.push('h');
            }
        }
        assert_eq!(String::from_iter(&sockets.calls), String::from_iter(&expected));

        // A turn of fewer writes than that is not cut.
        sockets.calls.clear();
        for _ in 0..every - 1 {
            let id = core.hub.accept(now);
            core.hub.on_bytes(id, b"PING 1\n", now);
        }
        core.turn(&mut sockets, now);
        assert_eq!(String::from_iter(&sockets.calls), "w".repeat(every - 1));
    }

    #[test]
    fn a_lasting_failure_is_logged_once_then_counted_per_interval() {
        let mut log = FailureLog::new(10_000);
        assert_eq!(log.failed(1_000, &E), Some(Report::First));
        // Retried every 50 ms: silent for the rest of the interval.
        for k in 1..200 {
            assert_eq!(log.failed(1_000 + 50 * k, &E), None, "retry {k}");
        }
        assert_eq!(
            log.failed(11_000, &E),
            Some(Report::Repeated { count: 200, over_ms: 10_000, last: E.to_owned() })
        );
        assert_eq!(log.failed(11_050, &E), None, "a new interval started");
    }

    #[test]
    fn failures_left_over_are_reported_by_a_later_success() {
        let mut log = FailureLog::new(10_000);
        assert_eq!(log.failed(0, &E), Some(Report::First));
        assert_eq!(log.failed(100, &"EMFILE"), None);
        assert_eq!(log.succeeded(200), None, "the interval is not over");
        assert_eq!(
            log.succeeded(10_000),
            Some(Report::Repeated { count: 1, over_ms: 10_000, last: "EMFILE".to_owned() })
        );
        assert_eq!(log.succeeded(30_000), None, "nothing left to report");
    }

    #[test]
    fn a_failure_after_a_quiet_interval_is_logged_as_new() {
        let mut log = FailureLog::new(10_000);
        assert_eq!(log.failed(0, &E), Some(Report::First));
        assert_eq!(log.failed(5_000, &E), None, "within the interval, after a failure");
        assert_eq!(log.succeeded(6_000), None);
        // Counted failure pending: reported (as a count) once the interval is over.
        assert!(matches!(log.failed(10_000, &E), Some(Report::Repeated { count: 2, .. })));
        assert_eq!(log.failed(25_000, &E), Some(Report::First), "quiet for an interval");
    }
}
