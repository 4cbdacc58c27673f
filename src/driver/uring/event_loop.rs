//! One core's io_uring loop around its [`Hub`]. See the [module docs](super) for the picture.
//!
//! [`Io`] holds the ring, the recv buffers and the sockets and implements the shared loop's
//! [`Sockets`]; [`Driver`] adds the [`CoreLoop`] (the hub, the mailbox, the turn) and routes
//! completions between the two. `submit` (a child module) holds `Io`'s side of the ring:
//! queueing and arming ops, and `io_uring_enter`.
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::net::{Shutdown, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use io_uring::{cqueue, squeue, types, IoUring};
use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use super::bufring::BufRing;
use super::probe::{build_ring, setup_error, Sleep};
use super::send::SendBuf;
use super::token::{self, Op};
use super::wakeup;
use crate::driver::core_loop::{
    peer_name, tune_worker_socket, CoreLoop, FailureLog, Sockets, Write, ACCEPT_LOG_INTERVAL_MS,
};
use crate::driver::{Adopted, CoreContext, CoreMsg, CoreWakeup, HostedSource};
use crate::hub::{CloseHow, ConnId, Hub, SlotMap};
use crate::time::Now;

mod submit;

/// Recv buffers per core (a power of two) and their size: 2 MiB per core. Every buffer goes
/// back to the ring as soon as its completion is handled, so this only has to cover the
/// completions of one loop turn.
const BUF_COUNT: u16 = 512;
const BUF_SIZE: u32 = 4096;
const BGID: u16 = 0;
/// Submission and completion queue sizes. Submissions that do not fit wait in a backlog; the
/// kernel keeps completions that overflow (IORING_FEAT_NODROP).
pub(super) const SQ_ENTRIES: u32 = 1024;
pub(super) const CQ_ENTRIES: u32 = 16384;
/// How long, after the shutdown grace, the core waits for the kernel to finish its ops before
/// it gives up.
const EXIT_WAIT_MS: u64 = 1_000;
/// Pause before re-arming an accept that failed (e.g. out of file descriptors), as epoll.
const ACCEPT_BACKOFF_MS: u64 = 50;
/// Longest sleep: the hub ticks more often than this anyway.
const MAX_SLEEP_MS: u64 = 1_000;
/// The id loop ops (accept, wake-up, timer) are cancelled under; it names no connection.
const LOOP_ID: ConnId = ConnId { index: 0, gen: 0 };

/// What [`Io::submit`]'s `io_uring_enter` does besides submitting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Enter {
    /// Sleeps until at least one completion is ready.
    Sleep,
    /// Runs the task work the kernel holds for this thread's completions (all of it with
    /// DEFER_TASKRUN; with COOP_TASKRUN what is pending), without sleeping, so that they are
    /// in the completion queue when it returns.
    Flush,
}

/// The source to run on board, and the mailbox's wake-up ([`Driver::new`]).
struct Hosted {
    source: HostedSource,
    notify: Arc<Notify>,
}

/// What [`Driver::run_hosted`] runs on: taken before the start-up gate, as descriptors.
struct HostedLoop {
    rt: tokio::runtime::Runtime,
    /// Registered with the ring (`IORING_REGISTER_EVENTFD`): signalled when it posts
    /// completions (a ring built for [`Sleep::OnEventfd`]).
    completions: File,
    hosted: Hosted,
}

impl HostedLoop {
    fn new(ring: &IoUring, hosted: Hosted) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let completions = File::from(wakeup::eventfd().context("an eventfd for the ring's completions")?);
        ring.submitter()
            .register_eventfd(completions.as_raw_fd())
            .context("registering the completions eventfd with the ring")?;
        Ok(Self { rt, completions, hosted })
    }
}

/// Where a connection is in its life, as the driver sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading and writing.
    Open,
    /// The hub asked for a graceful close: the write side is shut and received bytes are
    /// dropped until EOF (or until the hub's `Abort`, once its close linger expired).
    Draining,
    /// Being torn down: its ops are cancelled; once none is left the fd is closed and the hub
    /// told (`lost` is what it is told).
    Closing { lost: bool },
}

/// One worker socket.
struct Conn {
    fd: OwnedFd,
    state: State,
    /// The multishot recv is in flight (its final completion has not been reaped).
    recv_armed: bool,
    /// Bytes of the send in flight; `None` when no send is in flight.
    sending: Option<usize>,
    send: Box<SendBuf>,
}

impl Conn {
    fn new(fd: OwnedFd) -> Self {
        Self { fd, state: State::Open, recv_armed: false, sending: None, send: SendBuf::new() }
    }
}

/// See [`super::run_core`].
pub(super) fn run_core(ctx: CoreContext) -> anyhow::Result<()> {
    run_core_with(ctx, BUF_COUNT).map(drop)
}

/// Counters of a core's loop, for tests and the exit log (`enters / turns` says
/// how often a turn needed more than one `io_uring_enter`, `sends / turns` how many sockets a
/// turn wrote to).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct LoopStats {
    /// Recv completions that carried data.
    pub data: u64,
    /// Recv completions that found the buffer ring empty.
    pub enobufs: u64,
    /// Loop turns.
    pub turns: u64,
    /// `io_uring_enter` calls.
    pub enters: u64,
    /// Turns that ended asleep in `io_uring_enter`, waiting for a completion.
    pub sleeps: u64,
    /// Sends submitted.
    pub sends: u64,
    /// Sends that wrote less than asked (the socket was full).
    pub short_sends: u64,
}

/// [`run_core`] with `buf_count` recv buffers; returns the loop's counters.
pub(super) fn run_core_with(ctx: CoreContext, buf_count: u16) -> anyhow::Result<LoopStats> {
    let start = ctx.start.clone();
    let (mut driver, hosted) = Driver::new(ctx, buf_count)?;
    let hosted = hosted.map(|h| HostedLoop::new(&driver.io.ring, h)).transpose()?;
    if !start.ready() {
        // Nothing was submitted yet: the driver drops like any idle one.
        return Ok(driver.io.stats);
    }
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| match hosted {
        None => driver.run(),
        Some(hosted) => driver.run_hosted(hosted),
    }));
    let stats = driver.release();
    match result {
        Ok(r) => r.map(|()| stats),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A core: its I/O and the shared loop. Field order matters for the normal drop (no op in
/// flight): the ring (first in `io`) goes first, then the memory registered with it, then the
/// hub that owns the bytes the last sends pointed at.
pub(super) struct Driver {
    io: Io,
    core: CoreLoop,
    inbox: Receiver<CoreMsg>,
}

/// The ring, the recv buffers and the sockets. Field order: the ring first (see [`Driver`]).
struct Io {
    ring: IoUring,
    bufs: BufRing,
    /// The sockets, under the hub's ids.
    conns: SlotMap<Conn>,
    listener: TcpListener,
    /// The Redis-mode listener, when `--resp-listen` is on.
    resp_listener: Option<TcpListener>,
    resp_accept_armed: bool,
    /// The mailbox's eventfd; `None` with the source on board, whose mailbox wakes the loop
    /// through tokio instead ([`Driver::run_hosted`]).
    eventfd: Option<File>,
    /// Set while the loop may sleep: only then do senders write the eventfd (`wakeup`).
    asleep: Option<Arc<AtomicBool>>,
    index: usize,
    /// Ops submitted (or queued to be) whose final completion has not been reaped.
    in_flight: usize,
    /// Submissions that did not fit in the submission queue, in order.
    backlog: VecDeque<squeue::Entry>,
    /// The timer's duration; the kernel copies it at submission, and it is only rewritten
    /// when no timer is in flight.
    timespec: Box<types::Timespec>,
    accept_armed: bool,
    accepting: bool,
    accept_retry_ms: u64,
    /// Accept failures, logged at a bounded rate.
    accept_errors: FailureLog,
    /// SO_SNDBUF for accepted sockets (0: the kernel's).
    worker_sndbuf: usize,
    /// TCP_NOTSENT_LOWAT for accepted sockets (0: unset).
    worker_notsent_lowat: usize,
    wake_armed: bool,
    /// Where the mailbox READ puts the eventfd's counter; the kernel writes it while the op is
    /// in flight, so it lives on the heap, rewritten only by that op.
    wake_counter: Box<u64>,
    timer_armed: bool,
    /// The write moderation window's end, as a timer's duration: rewritten only while no
    /// hold timer is in flight (`hold_armed`).
    hold_timespec: Box<types::Timespec>,
    hold_armed: bool,
    /// Recvs that ended (out of buffers, or the kernel stopped the multishot), re-armed in
    /// later turns (at most one per buffer per turn), after every buffer of the turn they
    /// ended in went back to the ring.
    rearm: VecDeque<ConnId>,
    reset_all_done: bool,
    exiting: bool,
    /// Reused buffer.
    cqes: Vec<(u64, i32, u32)>,
    stats: LoopStats,
}

impl Driver {
    /// The driver, and what it needs to run the source on board when it does.
    fn new(ctx: CoreContext, buf_count: u16) -> anyhow::Result<(Self, Option<Hosted>)> {
        let CoreContext {
            index,
            listener,
            hub,
            inbox,
            wakeup,
            idle,
            upstream,
            clock,
            worker_sndbuf,
            worker_notsent_lowat,
            moderation,
            resp,
            start: _,
            peers,
            balance,
            hosted_source,
        } = ctx;
        let (resp_listener, resp_state) = resp.unzip();
        let (eventfd, asleep, hosted) = match (wakeup, hosted_source) {
            (CoreWakeup::EventFd { fd, asleep }, None) => (Some(File::from(fd)), Some(asleep), None),
            (CoreWakeup::Notify(notify), Some(source)) => (None, None, Some(Hosted { source, notify })),
            _ => anyhow::bail!(
                "core {index}: the io_uring driver needs an eventfd wake-up (uring::new_wakeup), or a \
                 tokio Notify with the source on board"
            ),
        };
        let bufs = BufRing::new(buf_count, BUF_SIZE, BGID).context("allocating the recv buffer ring")?;
        // With the source on board the thread sleeps in tokio, on an eventfd (`Sleep`).
        let sleep = if hosted.is_some() { Sleep::OnEventfd } else { Sleep::InRing };
        let (ring, flags) =
            build_ring(SQ_ENTRIES, CQ_ENTRIES, sleep).map_err(|e| anyhow::anyhow!(setup_error(&e)))?;
        // SAFETY: `bufs` becomes a field of the driver's `Io` next to `ring`. It is freed either
        // after `ring` (field order) with no op in flight, or never (`run_core` leaks the driver
        // while ops are in flight), so the kernel never sees it freed.
        unsafe { bufs.register(&ring.submitter()) }.context("registering the recv buffer ring")?;
        tracing::debug!(core = index, ?sleep, taskrun_flags = flags, "io_uring core started");
        let io = Io {
            ring,
            bufs,
            conns: SlotMap::new(),
            listener,
            resp_listener,
            resp_accept_armed: false,
            eventfd,
            asleep,
            index,
            in_flight: 0,
            backlog: VecDeque::new(),
            timespec: Box::new(types::Timespec::new()),
            accept_armed: false,
            accepting: true,
            accept_retry_ms: 0,
            accept_errors: FailureLog::new(ACCEPT_LOG_INTERVAL_MS),
            worker_sndbuf,
            worker_notsent_lowat,
            wake_armed: false,
            wake_counter: Box::new(0),
            timer_armed: false,
            hold_timespec: Box::new(types::Timespec::new()),
            hold_armed: false,
            rearm: VecDeque::new(),
            reset_all_done: false,
            exiting: false,
            cqes: Vec::new(),
            stats: LoopStats::default(),
        };
        let mut core = CoreLoop::new(index, hub, upstream, clock, worker_notsent_lowat, peers, idle)
            .with_moderation(moderation)
            .with_balance(balance);
        if let Some(state) = resp_state {
            core.hub.set_resp(state);
        }
        Ok((Self { io, core, inbox }, hosted))
    }

    /// A core to drive turn by turn ([`Driver::turn`], [`Driver::end_turn`]), for tests: the
    /// source is not on board.
    #[cfg(test)]
    pub(super) fn stepped(ctx: CoreContext, buf_count: u16) -> anyhow::Result<Self> {
        let (driver, hosted) = Self::new(ctx, buf_count)?;
        anyhow::ensure!(hosted.is_none(), "a core with the source on board runs in tokio");
        Ok(driver)
    }

    /// Ends a [`Driver::stepped`] core as [`run_core_with`] does ([`Driver::exit`], then
    /// [`Driver::release`]).
    #[cfg(test)]
    pub(super) fn finish(mut self) -> anyhow::Result<LoopStats> {
        let result = self.exit();
        let stats = self.release();
        result.map(|()| stats)
    }

    /// Drops the driver once its loop has ended, and returns its counters. With ops still in
    /// flight it is leaked instead: the kernel may still write into the recv buffers or read
    /// the iovecs and the batches they point at, so they are never freed. This only happens
    /// on an error path.
    fn release(self) -> LoopStats {
        let stats = self.io.stats;
        if self.io.in_flight > 0 {
            tracing::error!(
                core = self.io.index,
                ops = self.io.in_flight,
                "io_uring ops still in flight at exit; leaking the ring"
            );
            std::mem::forget(self);
        }
        stats
    }

    fn run(&mut self) -> anyhow::Result<()> {
        while let Some(may_sleep) = self.turn() {
            self.end_turn(may_sleep)?;
        }
        self.exit()
    }

    /// Ends a turn: one `io_uring_enter` hands the turn's submissions over and has the kernel
    /// post the completions it deferred to this thread (DEFER_TASKRUN: accepts, recvs, timers),
    /// asleep until one comes if the loop may sleep and nothing waits in the mailbox; then
    /// reaps. A loop that never sleeps (writes left for its next turn, or news in its mailbox,
    /// whenever a turn ends, as under a steady load) must still ask for them every turn, or its
    /// workers' input and new workers wait until the load stops.
    pub(super) fn end_turn(&mut self, may_sleep: bool) -> anyhow::Result<()> {
        // While the mailbox is held the loop sleeps without telling the senders: the hold
        // timer wakes it, and only then is the mailbox taken.
        let sleep = may_sleep && (self.arm_hold() || self.ready_to_sleep());
        self.io.submit(if sleep { Enter::Sleep } else { Enter::Flush })?;
        if sleep {
            self.io.stats.sleeps += 1;
            // Awake again: senders can leave the eventfd alone until the next sleep.
            if let Some(asleep) = &self.io.asleep {
                wakeup::announce_awake(asleep);
            }
        }
        let now = self.core.now();
        self.reap(now);
        Ok(())
    }

    /// While write moderation holds the mailbox back, makes sure a timer ends the wait in time:
    /// true if it does.
    fn arm_hold(&mut self) -> bool {
        let Some(hold) = self.core.held() else { return false };
        if !self.io.hold_armed {
            self.io.arm_hold(hold.left.max(Duration::from_micros(1)));
        }
        true
    }

    /// Tells the mailbox's senders that the loop may sleep, then looks at the mailbox once
    /// more (the protocol in `wakeup`): false if it held anything, which the next turn
    /// handles before the loop may sleep again.
    fn ready_to_sleep(&mut self) -> bool {
        let Some(asleep) = &self.io.asleep else { return true };
        wakeup::announce_sleep(asleep);
        let now = self.core.now();
        if self.core.drain_inbox(&self.inbox, &self.io, now) {
            wakeup::announce_awake(asleep);
            return false;
        }
        true
    }

    /// One turn of the loop, up to its submission: `None` once the core has finished, else
    /// whether the loop may sleep until the next completion.
    pub(super) fn turn(&mut self) -> Option<bool> {
        let now = self.core.now();
        // Runs every turn (an empty channel costs a couple of loads), so a dropped mailbox
        // is noticed at the next tick even though dropping fires no wake-up. The eventfd is
        // reset when its READ completes, before this runs, so a message sent after the
        // drain fires it again.
        self.core.drain_inbox(&self.inbox, &self.io, now);
        for socket in self.core.take_adopted() {
            // Once the core stops accepting, a socket handed over is closed as it drops.
            if self.io.accepting {
                self.admit(socket.fd, socket.resp, now);
            }
        }
        self.core.hub.handle_timeout(now);
        self.housekeeping(now);
        self.core.turn(&mut self.io, now);
        self.io.stats.turns += 1;
        if self.finished(now) {
            return None;
        }
        let due = self.core.hub.poll_timeout().min(self.driver_deadline()).min(self.core.mail_retry_ms());
        self.io.arm_timer(now, due);
        // Recvs still waiting to be re-armed, or writes left for the next turn: do not
        // sleep, reap and go on.
        Some(self.io.rearm.is_empty() && !self.core.has_writes())
    }

    /// [`Driver::run`] with the source on board (`--threads 1`, [`HostedSource`]): the same
    /// turns, as a task of a tokio current-thread runtime that also runs the source. The loop
    /// sleeps in tokio instead of in `io_uring_enter`: on an eventfd registered with the ring,
    /// which the kernel signals when it posts completions (the ring runs COOP_TASKRUN, not
    /// DEFER_TASKRUN: see [`Sleep::OnEventfd`]), and on the mailbox's `Notify`. A turn that
    /// may not sleep yields to the source before the next.
    fn run_hosted(&mut self, hosted: HostedLoop) -> anyhow::Result<()> {
        let HostedLoop { rt, completions, hosted: Hosted { source, notify } } = hosted;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            // SAFETY: the `File` owns the eventfd, which stays open, the same descriptor, for as
            // long as the `AsyncFd` that owns the `File`.
            let completions = unsafe { AsyncFd::register_with_interest(completions, Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering the completions eventfd with tokio: {e}"))?;
            let mut source = source.spawn_local();
            let mut source_done = false;
            let mut failure = None;
            while let Some(may_sleep) = self.turn() {
                // Its completion signals `completions`, so a held mailbox is taken in time.
                self.arm_hold();
                if may_sleep {
                    // Hand the submissions over and post what the kernel deferred to us.
                    self.io.submit(Enter::Flush)?;
                    if self.io.ring.completion().is_empty() {
                        tokio::select! {
                            () = notify.notified() => {}
                            ready = completions.readable() => {
                                let mut guard = ready?;
                                guard.clear_ready();
                                wakeup::reset(guard.get_inner());
                            }
                        }
                        self.io.submit(Enter::Flush)?;
                    }
                } else {
                    self.io.submit(Enter::Flush)?;
                    tokio::task::yield_now().await;
                }
                if !source_done && source.is_finished() {
                    source_done = true;
                    failure = source.ended().await;
                    if failure.is_some() {
                        break;
                    }
                }
                let now = self.core.now();
                self.reap(now);
            }
            self.exit()?;
            failure.map_or(Ok(()), Err)
        })
    }

    // ----------------------------------------------------------------------------------------
    // Completions

    fn reap(&mut self, now: Now) {
        let mut cqes = std::mem::take(&mut self.io.cqes);
        cqes.clear();
        cqes.extend(self.io.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
        for &(user_data, res, flags) in &cqes {
            self.on_cqe(user_data, res, flags, now);
        }
        self.io.cqes = cqes;
    }

    fn on_cqe(&mut self, user_data: u64, res: i32, flags: u32, now: Now) {
        let Some((op, id)) = token::decode(user_data) else {
            tracing::error!(
                core = self.io.index,
                user_data,
                "completion for an op this driver never submitted"
            );
            return;
        };
        let more = cqueue::more(flags);
        if !more {
            self.io.in_flight -= 1;
        }
        match op {
            Op::Accept => self.on_accept(res, more, false, now),
            Op::AcceptResp => self.on_accept(res, more, true, now),
            Op::Recv => self.on_recv(id, res, flags, now),
            Op::Send => self.on_send(id, res, now),
            Op::Wake => {
                // The READ took the counter (and so reset it) in the kernel, as part of the
                // wake-up; messages sent from here on fire the next READ, armed this turn.
                self.io.wake_armed = false;
                if res < 0 && res != -libc::ECANCELED {
                    tracing::debug!(core = self.io.index, error = %io::Error::from_raw_os_error(-res), "mailbox read failed");
                    if let Some(fd) = &self.io.eventfd {
                        wakeup::reset(fd);
                    }
                }
            }
            Op::Timeout => self.io.timer_armed = false,
            Op::Hold => self.io.hold_armed = false,
            Op::Cancel => {}
        }
    }

    /// A connection accepted on the worker listener, or on the Redis-mode one (`resp`).
    fn on_accept(&mut self, res: i32, more: bool, resp: bool, now: Now) {
        let io = &mut self.io;
        if !more {
            if resp {
                io.resp_accept_armed = false;
            } else {
                io.accept_armed = false;
            }
            if res < 0 {
                io.accept_retry_ms = now.mono_ms + ACCEPT_BACKOFF_MS;
            }
        }
        if res < 0 {
            if res != -libc::ECANCELED {
                let error = std::io::Error::from_raw_os_error(-res);
                io.accept_errors.log_accept_failure(io.index, now.mono_ms, &error);
            }
            return;
        }
        io.accept_errors.log_accept_success(io.index, now.mono_ms);
        // SAFETY: the kernel just installed this descriptor for the accepted connection;
        // nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(res) };
        if !io.accepting {
            return;
        }
        let to = self.core.placement();
        if to == io.index {
            self.admit(fd, resp, now);
        } else if let Err(refused) = self.core.hand_off(to, Adopted { fd, resp }) {
            self.admit(refused.fd, resp, now);
        }
    }

    /// A socket this core holds from now on: accepted here, or handed over by another core
    /// (`balance`).
    fn admit(&mut self, fd: OwnedFd, resp: bool, now: Now) {
        let io = &mut self.io;
        if let Err(e) = SockRef::from(&fd).set_tcp_nodelay(true) {
            tracing::debug!(core = io.index, error = %e, "TCP_NODELAY failed");
        }
        tune_worker_socket(io.index, SockRef::from(&fd), io.worker_sndbuf, io.worker_notsent_lowat);
        let id = if resp {
            self.core.hub.accept_resp(peer_name(SockRef::from(&fd)), now)
        } else {
            self.core.hub.accept(now)
        };
        if !token::fits(id) {
            // Its ops could not be told apart from another slot's: refuse it (the fd closes).
            tracing::error!(core = io.index, conn = %id, "too many connections on one core; refusing");
            self.core.hub.on_peer_closed(id, false, now);
            return;
        }
        if let Some((old, conn)) = io.conns.insert(id, Conn::new(fd)) {
            // A slot is freed (and the hub told) only once no op of its connection is in
            // flight, so the hub can never hand out a slot the driver still uses. If it did,
            // the old socket's ops may still be in flight: never free what they point at.
            std::mem::forget(conn);
            panic!("hub reused slot {} ({old}) while its socket was open", id.index);
        }
        io.arm_recv(id);
    }

    fn on_recv(&mut self, id: ConnId, res: i32, flags: u32, now: Now) {
        let io = &mut self.io;
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let Some(conn) = io.conns.get_mut(id) else {
            // Not expected: a connection is freed only after its recv's final completion.
            if let Some(bid) = bid {
                io.bufs.recycle(bid);
            }
            return;
        };
        if !more {
            conn.recv_armed = false;
        }
        let state = conn.state;
        if let Some(bid) = bid {
            io.stats.data += 1;
            if res > 0 && state == State::Open {
                if let Some(data) = io.bufs.data(bid, res as usize) {
                    self.core.hub.on_bytes(id, data, now);
                }
            }
            // The hub copied what it needs: the buffer goes back at once.
            io.bufs.recycle(bid);
        }
        let hub = &mut self.core.hub;
        let closing = matches!(state, State::Closing { .. });
        match res {
            1.. if !more && !closing => io.rearm.push_back(id),
            1.. => {}
            0 if !closing => io.teardown(hub, id, false, false, now),
            e if e == -libc::ENOBUFS && !closing => {
                // Re-armed in a later turn, when every buffer of this turn is back in the ring.
                io.stats.enobufs += 1;
                io.rearm.push_back(id);
            }
            e if e < 0 && e != -libc::ECANCELED && !closing => {
                let error = std::io::Error::from_raw_os_error(-e);
                tracing::debug!(core = io.index, conn = %id, %error, "recv failed");
                io.teardown(hub, id, true, false, now);
            }
            _ => {}
        }
        io.maybe_free(hub, id, now);
    }

    fn on_send(&mut self, id: ConnId, res: i32, now: Now) {
        let Some(conn) = self.io.conns.get_mut(id) else { return };
        let requested = conn.sending.take().unwrap_or(0);
        if usize::try_from(res).is_ok_and(|n| n < requested) {
            self.io.stats.short_sends += 1;
        }
        if matches!(conn.state, State::Closing { .. }) {
            // Cancelled, or done while the teardown was under way: only progress to report.
            self.core.hub.on_written(id, usize::try_from(res).unwrap_or(0), now);
        } else {
            let result = match res {
                1.. => Ok(res as usize),
                0 => Err(io::ErrorKind::WriteZero.into()),
                e => Err(io::Error::from_raw_os_error(-e)),
            };
            self.core.written(&mut self.io, id, result, requested, now);
        }
        self.io.maybe_free(&mut self.core.hub, id, now);
    }

    // ----------------------------------------------------------------------------------------
    // Each turn

    /// Re-arms what ended in the last turn and enforces the shutdown grace.
    fn housekeeping(&mut self, now: Now) {
        let io = &mut self.io;
        // Every buffer is back in the ring now. Re-arm at most one recv per buffer: each of
        // them had data waiting, so more could only run the ring dry again at once.
        for _ in 0..io.bufs.count() {
            let Some(id) = io.rearm.pop_front() else { break };
            io.arm_recv(id);
        }
        if io.accepting && !io.accept_armed && now.mono_ms >= io.accept_retry_ms {
            io.arm_accept();
        }
        if io.accepting
            && io.resp_listener.is_some()
            && !io.resp_accept_armed
            && now.mono_ms >= io.accept_retry_ms
        {
            io.arm_resp_accept();
        }
        if !io.wake_armed && !io.exiting {
            io.arm_wake();
        }
        if self.core.stop_at_ms().is_some_and(|t| now.mono_ms >= t) && !io.reset_all_done {
            io.reset_all_done = true;
            if !io.conns.is_empty() {
                tracing::warn!(
                    core = io.index,
                    left = io.conns.len(),
                    "shutdown grace expired; dropping the remaining connections"
                );
            }
            io.reset_all(&mut self.core.hub, now);
        }
    }

    /// The earliest of the driver's own deadlines (shutdown grace, accept retry).
    fn driver_deadline(&self) -> u64 {
        let mut due = u64::MAX;
        if let Some(t) = self.core.stop_at_ms() {
            due = due.min(if self.io.reset_all_done { t + EXIT_WAIT_MS } else { t });
        }
        let resp_unarmed = self.io.resp_listener.is_some() && !self.io.resp_accept_armed;
        if (!self.io.accept_armed || resp_unarmed) && self.io.accepting {
            due = due.min(self.io.accept_retry_ms);
        }
        due
    }

    fn finished(&self, now: Now) -> bool {
        match self.core.stop_at_ms() {
            None => false,
            Some(t) => self.io.conns.is_empty() || now.mono_ms >= t + EXIT_WAIT_MS,
        }
    }

    // ----------------------------------------------------------------------------------------
    // Exit

    /// Stops accepting, resets what is left, and waits (bounded) until the kernel finished
    /// every op, so that the buffers can be freed.
    fn exit(&mut self) -> anyhow::Result<()> {
        self.io.exiting = true;
        self.io.accepting = false;
        let now = self.core.now();
        self.io.reset_all(&mut self.core.hub, now);
        if self.io.accept_armed {
            self.io.cancel(token::encode_loop(Op::Accept), LOOP_ID);
        }
        if self.io.resp_accept_armed {
            self.io.cancel(token::encode_loop(Op::AcceptResp), LOOP_ID);
        }
        if self.io.wake_armed {
            self.io.cancel(token::encode_loop(Op::Wake), LOOP_ID);
        }
        let deadline = now.mono_ms + EXIT_WAIT_MS;
        let mut timer_cancelled = false;
        loop {
            let now = self.core.now();
            // Connections closed now may still owe the upstream a USER_SYNC end.
            self.core.flush_upstream();
            if self.io.in_flight == 0 || now.mono_ms >= deadline {
                break;
            }
            if self.io.in_flight == 1 && self.io.timer_armed {
                if !timer_cancelled {
                    timer_cancelled = true;
                    self.io.cancel(token::encode_loop(Op::Timeout), LOOP_ID);
                }
            } else {
                self.io.arm_timer(now, deadline);
            }
            self.io.submit(Enter::Sleep)?;
            let now = self.core.now();
            self.reap(now);
        }
        if self.io.in_flight == 0 {
            let _ = self.io.ring.submitter().unregister_buf_ring(BGID);
        }
        tracing::debug!(
            core = self.io.index,
            recvs = self.io.stats.data,
            enobufs = self.io.stats.enobufs,
            turns = self.io.stats.turns,
            sleeps = self.io.stats.sleeps,
            enters = self.io.stats.enters,
            sends = self.io.stats.sends,
            short_sends = self.io.stats.short_sends,
            "io_uring core stopped"
        );
        Ok(())
    }
}

impl Io {
    // ----------------------------------------------------------------------------------------
    // Connection teardown

    /// Starts closing `id`: cancels its ops (the fd is closed and the hub told once none is
    /// left). `abort` resets the connection (SO_LINGER 0) instead of closing it gracefully.
    fn teardown(&mut self, hub: &mut Hub, id: ConnId, lost: bool, abort: bool, now: Now) {
        let Some(conn) = self.conns.get_mut(id) else { return };
        if matches!(conn.state, State::Closing { .. }) {
            return;
        }
        conn.state = State::Closing { lost };
        if abort {
            if let Err(e) = SockRef::from(&conn.fd).set_linger(Some(Duration::ZERO)) {
                tracing::debug!(core = self.index, conn = %id, error = %e, "SO_LINGER failed");
            }
        }
        let (recv, send) = (conn.recv_armed, conn.sending.is_some());
        if recv {
            self.cancel(token::encode(Op::Recv, id), id);
        }
        if send {
            self.cancel(token::encode(Op::Send, id), id);
        }
        self.maybe_free(hub, id, now);
    }

    /// Closes the fd of a connection being torn down once none of its ops is in flight, and
    /// tells the hub (which releases what the last send pointed at).
    fn maybe_free(&mut self, hub: &mut Hub, id: ConnId, now: Now) {
        let Some(conn) = self.conns.get(id) else { return };
        let State::Closing { lost } = conn.state else { return };
        if conn.recv_armed || conn.sending.is_some() {
            return;
        }
        // Dropping the connection closes its fd (a reset if SO_LINGER 0 was set).
        self.conns.remove(id);
        hub.on_peer_closed(id, lost, now);
    }

    fn reset_all(&mut self, hub: &mut Hub, now: Now) {
        let ids: Vec<ConnId> = self.conns.ids().collect();
        for id in ids {
            self.teardown(hub, id, false, true, now);
        }
    }
}

impl Sockets for Io {
    fn fd(&self, id: ConnId) -> Option<RawFd> {
        self.conns.get(id).map(|c| c.fd.as_raw_fd())
    }

    fn can_write(&self, id: ConnId) -> bool {
        self.conns.get(id).is_some_and(|c| c.state == State::Open && c.sending.is_none())
    }

    /// One gathered send (`SendBuf::prepare`): the slices' pointers go into the connection's
    /// own iovec array.
    fn write(&mut self, id: ConnId, iov: &[IoSlice<'_>], len: usize) -> Write {
        let Some(conn) = self.conns.get_mut(id) else { return Write::Done(Ok(0)) };
        conn.sending = Some(len);
        self.stats.sends += 1;
        let entry = conn.send.prepare(conn.fd.as_raw_fd(), iov, token::encode(Op::Send, id));
        // SAFETY: the iovecs point at bytes the hub keeps alive and unchanged until
        // `on_written`/`on_peer_closed` for `id` (its memory rule), which this driver calls
        // only after this send's completion. The iovec array and the msghdr live in the
        // connection's boxed `SendBuf`, which is not touched while `sending` is set and is
        // freed only with the connection, once no op of it is in flight. The fd is closed
        // only then too.
        unsafe { self.queue(entry) };
        Write::Submitted
    }

    /// The turn's sends so far, issued by the kernel in one `io_uring_enter` (so one call never
    /// holds a non-preemptible kernel's CPU for all of a long turn's sends). Leaves a backlog to
    /// the turn's own submit, which drains it in order.
    fn hand_over(&mut self) {
        if self.backlog.is_empty() && !self.ring.submission().is_empty() {
            self.stats.enters += 1;
            // Only hands the queue over: an error here shows again in the turn's own submit,
            // which reports it.
            let _ = self.ring.submit();
        }
    }

    fn wait_writable(&mut self, hub: &mut Hub, id: ConnId) {
        if self.conns.get(id).is_some_and(|c| c.state == State::Open) {
            // The socket took what fit; the next send waits in the kernel for room.
            hub.on_writable(id);
        }
    }

    fn close(&mut self, hub: &mut Hub, id: ConnId, how: CloseHow, now: Now) {
        match how {
            CloseHow::Abort => self.teardown(hub, id, false, true, now),
            CloseHow::Graceful => {
                if self.exiting {
                    return;
                }
                let Some(conn) = self.conns.get_mut(id) else { return };
                if conn.state != State::Open {
                    return;
                }
                match SockRef::from(&conn.fd).shutdown(Shutdown::Write) {
                    Ok(()) => conn.state = State::Draining,
                    Err(e) => {
                        tracing::debug!(core = self.index, conn = %id, error = %e, "shutdown failed");
                        self.teardown(hub, id, true, false, now);
                    }
                }
            }
        }
    }

    fn lost(&mut self, hub: &mut Hub, id: ConnId, now: Now) {
        self.teardown(hub, id, true, false, now);
    }
}
