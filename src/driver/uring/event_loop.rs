//! One core's io_uring loop around its [`Hub`]. See the [module docs](super) for the picture.
use std::collections::VecDeque;
use std::fs::File;
use std::io::IoSlice;
use std::net::{Shutdown, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Duration;

use anyhow::Context as _;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::SockRef;

use super::bufring::BufRing;
use super::probe::{build_ring, setup_error};
use super::token::{self, Op, Target};
use super::wakeup;
use crate::driver::{Clock, CoreContext, CoreMsg, CoreWakeup, Inbox};
use crate::hub::{CloseHow, ConnId, Hub, HubOutput, UpstreamCmd};
use crate::metrics::sockq;
use crate::time::Now;

/// Recv buffers per core (a power of two) and their size: 2 MiB per core. Every buffer goes
/// back to the ring as soon as its completion is handled, so this only has to cover the
/// completions of one loop turn.
const BUF_COUNT: u16 = 512;
const BUF_SIZE: u32 = 4096;
const BGID: u16 = 0;
/// Submission and completion queue sizes. Submissions that do not fit wait in a backlog; the
/// kernel keeps completions that overflow (IORING_FEAT_NODROP).
const SQ_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 16384;
/// How long a core keeps flushing after `Shutdown` before it resets what is left (as epoll).
const SHUTDOWN_GRACE_MS: u64 = 2_000;
/// How long, after that, the core waits for the kernel to finish its ops before it gives up.
const EXIT_WAIT_MS: u64 = 1_000;
/// Pause before re-arming an accept that failed (e.g. out of file descriptors), as epoll.
const ACCEPT_BACKOFF_MS: u64 = 50;
/// Longest sleep: the hub ticks more often than this anyway.
const MAX_SLEEP_MS: u64 = 1_000;

/// Where a connection is in its life, as the driver sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading and writing.
    Open,
    /// The hub asked for a graceful close: the write side is shut, received bytes are dropped
    /// until EOF, or until `until_ms`, when the socket is reset.
    Draining { until_ms: u64 },
    /// Being torn down: its ops are cancelled; once none is left the fd is closed and the hub
    /// told (`lost` is what it is told).
    Closing { lost: bool },
}

/// The memory a connection's send points the kernel at: a `msghdr` and its iovec array.
/// Boxed, so moving the connection (the slot table grows) never moves it, and only rewritten
/// when no send is in flight.
struct SendBuf {
    msg: libc::msghdr,
    iov: Vec<libc::iovec>,
}

/// One worker socket.
struct Conn {
    id: ConnId,
    fd: OwnedFd,
    state: State,
    /// The multishot recv is in flight (its final completion has not been reaped).
    recv_armed: bool,
    /// Bytes of the send in flight; `None` when no send is in flight.
    sending: Option<usize>,
    send: Box<SendBuf>,
}

impl Conn {
    fn new(id: ConnId, fd: OwnedFd) -> Self {
        // SAFETY: all-zero bytes are a valid `msghdr` (null pointers, zero lengths).
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        Self {
            id,
            fd,
            state: State::Open,
            recv_armed: false,
            sending: None,
            send: Box::new(SendBuf { msg, iov: Vec::new() }),
        }
    }
}

/// The live connection `id`, if the slot still holds it.
fn conn_mut(conns: &mut [Option<Conn>], id: ConnId) -> Option<&mut Conn> {
    conns.get_mut(id.index as usize)?.as_mut().filter(|c| c.id == id)
}

/// The connection an op's `user_data` names, if the slot still holds that one.
fn target_mut(conns: &mut [Option<Conn>], t: Target) -> Option<&mut Conn> {
    conns.get_mut(t.index as usize)?.as_mut().filter(|c| t.is(c.id))
}

/// Empties a vector of slices and hands back its allocation with a new lifetime, so one
/// buffer serves every `gather` (the closure never runs: the vector is empty).
fn recycle<'b>(mut v: Vec<IoSlice<'_>>) -> Vec<IoSlice<'b>> {
    v.clear();
    v.into_iter().map(|_| -> IoSlice<'b> { unreachable!("the vector is empty") }).collect()
}

/// See [`super::run_core`].
pub(super) fn run_core(ctx: CoreContext) -> anyhow::Result<()> {
    run_core_with(ctx, BUF_COUNT).map(drop)
}

/// Counters of a core's recv path, for tests and the exit log.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RecvStats {
    /// Recv completions that carried data.
    pub data: u64,
    /// Recv completions that found the buffer ring empty.
    pub enobufs: u64,
}

/// [`run_core`] with `buf_count` recv buffers; returns the recv counters.
pub(super) fn run_core_with(ctx: CoreContext, buf_count: u16) -> anyhow::Result<RecvStats> {
    let mut driver = Driver::new(ctx, buf_count)?;
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| driver.run()));
    let stats = driver.stats;
    if driver.in_flight > 0 {
        // The kernel may still write into the recv buffers or read the iovecs and the batches
        // they point at: never free them. This only happens on an error path.
        tracing::error!(
            core = driver.index,
            ops = driver.in_flight,
            "io_uring ops still in flight at exit; leaking the ring"
        );
        std::mem::forget(driver);
    }
    match result {
        Ok(r) => r.map(|()| stats),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A core's loop state. Field order matters for the normal drop (no op in flight): the ring
/// goes first, then the memory registered with it.
struct Driver {
    ring: IoUring,
    bufs: BufRing,
    hub: Hub,
    /// By `ConnId::index`.
    conns: Vec<Option<Conn>>,
    /// Connections in `conns`.
    live: usize,
    listener: TcpListener,
    eventfd: File,
    inbox: Receiver<CoreMsg>,
    upstream: Inbox<(usize, UpstreamCmd)>,
    clock: Clock,
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
    wake_armed: bool,
    timer_armed: bool,
    /// Recvs that ended (out of buffers, or the kernel stopped the multishot), re-armed in
    /// later turns (at most one per buffer per turn), after every buffer of the turn they
    /// ended in went back to the ring.
    rearm: VecDeque<ConnId>,
    /// Gracefully closing connections and when to give up waiting for their EOF.
    draining: VecDeque<(u64, ConnId)>,
    close_timeout_ms: u64,
    /// Set by `Shutdown`: when to reset whatever is still open.
    stop_at_ms: Option<u64>,
    reset_all_done: bool,
    exiting: bool,
    /// Reused buffers.
    cqes: Vec<(u64, i32, u32)>,
    dirty: Vec<ConnId>,
    scratch: Vec<IoSlice<'static>>,
    stats: RecvStats,
}

impl Driver {
    fn new(ctx: CoreContext, buf_count: u16) -> anyhow::Result<Self> {
        let CoreContext { index, listener, hub, inbox, wakeup, upstream, clock } = ctx;
        let CoreWakeup::EventFd(eventfd) = wakeup else {
            anyhow::bail!("core {index}: the io_uring driver needs an eventfd wake-up (uring::new_wakeup)");
        };
        let bufs = BufRing::new(buf_count, BUF_SIZE, BGID).context("allocating the recv buffer ring")?;
        let (ring, flags) =
            build_ring(SQ_ENTRIES, CQ_ENTRIES).map_err(|e| anyhow::anyhow!(setup_error(&e)))?;
        // SAFETY: `bufs` becomes a field of the driver next to `ring`. It is freed either after
        // `ring` (field order) with no op in flight, or never (`run_core` leaks the driver
        // while ops are in flight), so the kernel never sees it freed.
        unsafe { bufs.register(&ring.submitter()) }.context("registering the recv buffer ring")?;
        tracing::debug!(core = index, single_issuer_defer_taskrun = flags, "io_uring core started");
        let close_timeout_ms = hub.session.close_timeout_ms;
        Ok(Self {
            ring,
            bufs,
            hub: Hub::new(hub),
            conns: Vec::new(),
            live: 0,
            listener,
            eventfd: File::from(eventfd),
            inbox,
            upstream,
            clock,
            index,
            in_flight: 0,
            backlog: VecDeque::new(),
            timespec: Box::new(types::Timespec::new()),
            accept_armed: false,
            accepting: true,
            accept_retry_ms: 0,
            wake_armed: false,
            timer_armed: false,
            rearm: VecDeque::new(),
            draining: VecDeque::new(),
            close_timeout_ms,
            stop_at_ms: None,
            reset_all_done: false,
            exiting: false,
            cqes: Vec::new(),
            dirty: Vec::new(),
            scratch: Vec::new(),
            stats: RecvStats::default(),
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        loop {
            let now = self.clock.now();
            self.drain_inbox(now);
            self.hub.handle_timeout(now);
            self.housekeeping(now);
            self.settle(now);
            if self.finished(now) {
                break;
            }
            let due = self.hub.poll_timeout().min(self.driver_deadline());
            self.arm_timer(now, due);
            // Recvs still waiting to be re-armed: do not sleep, reap and re-arm the next ones.
            self.submit(self.rearm.is_empty())?;
            let now = self.clock.now();
            self.reap(now);
        }
        self.exit()
    }

    // ----------------------------------------------------------------------------------------
    // Submissions

    /// Queues one submission (it goes to the kernel at the next `submit`).
    ///
    /// # Safety
    ///
    /// Every buffer, iovec array, `msghdr` and timespec `entry` points to must stay valid and
    /// unmoved until the op's final completion is reaped, and its fd must stay open until then
    /// (so that the number is not reused before the op was issued).
    unsafe fn queue(&mut self, entry: squeue::Entry) {
        self.in_flight += 1;
        if self.backlog.is_empty() {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
        }
        self.backlog.push_back(entry);
    }

    /// Hands every queued submission to the kernel and, with `wait`, sleeps until at least one
    /// completion is ready. Never spins: with `wait` it blocks in the kernel, and there is
    /// always a timer, the mailbox poll or a connection op to wake it.
    fn submit(&mut self, wait: bool) -> anyhow::Result<()> {
        loop {
            {
                let mut sq = self.ring.submission();
                while let Some(entry) = self.backlog.front() {
                    // SAFETY: backlog entries were queued under `queue`'s contract.
                    if unsafe { sq.push(entry) }.is_err() {
                        break;
                    }
                    self.backlog.pop_front();
                }
            }
            let more = !self.backlog.is_empty();
            let want = usize::from(wait && !more);
            match self.ring.submit_and_wait(want) {
                Ok(0) if more => return Ok(()),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => return Ok(()),
                // The completion queue must be reaped first.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => return Ok(()),
                Err(e) => return Err(e).context("io_uring_enter"),
            }
            if !more {
                return Ok(());
            }
        }
    }

    fn arm_accept(&mut self) {
        let entry = opcode::AcceptMulti::new(types::Fd(self.listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(token::encode_loop(Op::Accept));
        self.accept_armed = true;
        // SAFETY: accept writes no peer address (none was given); the listener is a field of
        // the driver, open until the driver is dropped, which happens only with no op in
        // flight (or never).
        unsafe { self.queue(entry) };
    }

    fn arm_wake(&mut self) {
        let entry = opcode::PollAdd::new(types::Fd(self.eventfd.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(token::encode_loop(Op::Wake));
        self.wake_armed = true;
        // SAFETY: a poll refers to no memory; the eventfd is a field of the driver, open until
        // the driver is dropped with no op in flight (or never).
        unsafe { self.queue(entry) };
    }

    /// Arms the timer for `due_ms` (monotonic) unless one is in flight. The hub's deadline only
    /// moves forward and is never more than a tick away, so a timer in flight is never late by
    /// more than that.
    fn arm_timer(&mut self, now: Now, due_ms: u64) {
        if self.timer_armed {
            return;
        }
        let delay = due_ms.saturating_sub(now.mono_ms).clamp(1, MAX_SLEEP_MS);
        *self.timespec = types::Timespec::from(Duration::from_millis(delay));
        let entry = opcode::Timeout::new(&*self.timespec).build().user_data(token::encode_loop(Op::Timeout));
        self.timer_armed = true;
        // SAFETY: the timespec is boxed in the driver and not rewritten while this timer is in
        // flight (`timer_armed`); the kernel copies it at submission anyway.
        unsafe { self.queue(entry) };
    }

    fn arm_recv(&mut self, id: ConnId) {
        let Some(conn) = conn_mut(&mut self.conns, id) else { return };
        if conn.recv_armed || matches!(conn.state, State::Closing { .. }) {
            return;
        }
        conn.recv_armed = true;
        let entry = opcode::RecvMulti::new(types::Fd(conn.fd.as_raw_fd()), BGID)
            .build()
            .user_data(token::encode(Op::Recv, id));
        // SAFETY: the recv writes only into buffers of `self.bufs`, registered with this ring
        // and freed only after it with no op in flight (or never). The fd is closed only once
        // `recv_armed` is false again, i.e. after this op's final completion.
        unsafe { self.queue(entry) };
    }

    fn cancel(&mut self, target: u64, id: ConnId) {
        let entry = opcode::AsyncCancel::new(target).build().user_data(token::encode(Op::Cancel, id));
        // SAFETY: a cancel refers to no memory and no fd, only to another op's user_data.
        unsafe { self.queue(entry) };
    }

    // ----------------------------------------------------------------------------------------
    // Completions

    fn reap(&mut self, now: Now) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
        for &(user_data, res, flags) in &cqes {
            self.on_cqe(user_data, res, flags, now);
        }
        self.cqes = cqes;
    }

    fn on_cqe(&mut self, user_data: u64, res: i32, flags: u32, now: Now) {
        let Some((op, target)) = token::decode(user_data) else {
            tracing::error!(core = self.index, user_data, "completion for an op this driver never submitted");
            return;
        };
        let more = cqueue::more(flags);
        if !more {
            self.in_flight -= 1;
        }
        match op {
            Op::Accept => self.on_accept(res, more, now),
            Op::Recv => self.on_recv(target, res, flags, now),
            Op::Send => self.on_send(target, res, now),
            Op::Wake => {
                self.wake_armed = false;
                wakeup::reset(&self.eventfd);
            }
            Op::Timeout => self.timer_armed = false,
            Op::Cancel => {}
        }
    }

    fn on_accept(&mut self, res: i32, more: bool, now: Now) {
        if !more {
            self.accept_armed = false;
            if res < 0 {
                self.accept_retry_ms = now.mono_ms + ACCEPT_BACKOFF_MS;
            }
        }
        if res < 0 {
            if res != -libc::ECANCELED {
                let error = std::io::Error::from_raw_os_error(-res);
                tracing::warn!(core = self.index, %error, "accept failed");
            }
            return;
        }
        // SAFETY: the kernel just installed this descriptor for the accepted connection;
        // nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(res) };
        if !self.accepting {
            return;
        }
        if let Err(e) = SockRef::from(&fd).set_tcp_nodelay(true) {
            tracing::debug!(core = self.index, error = %e, "TCP_NODELAY failed");
        }
        let id = self.hub.accept(now);
        let i = id.index as usize;
        if self.conns.len() <= i {
            self.conns.resize_with(i + 1, || None);
        }
        // A slot is freed (and the hub told) only once no op of its connection is in flight,
        // so the hub can never hand out a slot the driver still uses.
        assert!(self.conns[i].is_none(), "hub reused slot {i} while its socket was open");
        self.conns[i] = Some(Conn::new(id, fd));
        self.live += 1;
        self.arm_recv(id);
    }

    fn on_recv(&mut self, target: Target, res: i32, flags: u32, now: Now) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let Some(conn) = target_mut(&mut self.conns, target) else {
            // Not expected: a connection is freed only after its recv's final completion.
            if let Some(bid) = bid {
                self.bufs.recycle(bid);
            }
            return;
        };
        let id = conn.id;
        if !more {
            conn.recv_armed = false;
        }
        let state = conn.state;
        if let Some(bid) = bid {
            self.stats.data += 1;
            if res > 0 && state == State::Open {
                if let Some(data) = self.bufs.data(bid, res as usize) {
                    self.hub.on_bytes(id, data, now);
                }
            }
            // The hub copied what it needs: the buffer goes back at once.
            self.bufs.recycle(bid);
        }
        let closing = matches!(state, State::Closing { .. });
        match res {
            1.. if !more && !closing => self.rearm.push_back(id),
            1.. => {}
            0 if !closing => self.teardown(id, false, false, now),
            e if e == -libc::ENOBUFS && !closing => {
                // Re-armed in a later turn, when every buffer of this turn is back in the ring.
                self.stats.enobufs += 1;
                self.rearm.push_back(id);
            }
            e if e < 0 && e != -libc::ECANCELED && !closing => {
                let error = std::io::Error::from_raw_os_error(-e);
                tracing::debug!(core = self.index, conn = %id, %error, "recv failed");
                self.teardown(id, true, false, now);
            }
            _ => {}
        }
        self.maybe_free(id, now);
    }

    fn on_send(&mut self, target: Target, res: i32, now: Now) {
        let Some(conn) = target_mut(&mut self.conns, target) else { return };
        let id = conn.id;
        let requested = conn.sending.take().unwrap_or(0);
        let state = conn.state;
        if res > 0 {
            let n = res as usize;
            self.hub.on_written(id, n, now);
            if n < requested && state == State::Open {
                // The socket took what fit; the next send waits in the kernel for room.
                self.hub.on_writable(id);
            }
        } else {
            self.hub.on_written(id, 0, now);
            if !matches!(state, State::Closing { .. }) {
                let error = std::io::Error::from_raw_os_error(-res);
                tracing::debug!(core = self.index, conn = %id, %error, "send failed");
                self.teardown(id, true, false, now);
            }
        }
        self.maybe_free(id, now);
    }

    /// Handles every queued message. Runs every turn (an empty channel costs a couple of
    /// loads), so a dropped mailbox is noticed at the next tick even though dropping fires no
    /// wake-up. The eventfd is reset when its poll completes, before this runs, so a message
    /// sent after the drain fires it again.
    fn drain_inbox(&mut self, now: Now) {
        loop {
            match self.inbox.try_recv() {
                Ok(CoreMsg::Batch(batch)) => self.hub.on_batch(batch, now),
                Ok(CoreMsg::Upstream(event)) => self.hub.on_upstream(&event, now),
                Ok(CoreMsg::Snapshot(reply)) => {
                    let conns = &self.conns;
                    let snap = self.hub.snapshot(self.index, |id| kernel_queues(conns, id));
                    // The scraper may have given up waiting; that is fine.
                    let _ = reply.send(snap);
                }
                Ok(CoreMsg::Shutdown) => self.begin_shutdown(now),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if self.stop_at_ms.is_none() {
                        tracing::info!(core = self.index, "mailbox closed; shutting down");
                    }
                    self.begin_shutdown(now);
                    break;
                }
            }
        }
    }

    fn begin_shutdown(&mut self, now: Now) {
        if self.stop_at_ms.is_none() {
            tracing::debug!(core = self.index, "shutting down");
            self.stop_at_ms = Some(now.mono_ms + SHUTDOWN_GRACE_MS);
            self.hub.shutdown(now);
        }
    }

    // ----------------------------------------------------------------------------------------
    // Connection teardown

    /// Starts closing `id`: cancels its ops (the fd is closed and the hub told once none is
    /// left). `abort` resets the connection (SO_LINGER 0) instead of closing it gracefully.
    fn teardown(&mut self, id: ConnId, lost: bool, abort: bool, now: Now) {
        let Some(conn) = conn_mut(&mut self.conns, id) else { return };
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
        self.maybe_free(id, now);
    }

    /// Closes the fd of a connection being torn down once none of its ops is in flight, and
    /// tells the hub (which releases what the last send pointed at).
    fn maybe_free(&mut self, id: ConnId, now: Now) {
        let Some(conn) = conn_mut(&mut self.conns, id) else { return };
        let State::Closing { lost } = conn.state else { return };
        if conn.recv_armed || conn.sending.is_some() {
            return;
        }
        // Dropping the connection closes its fd (a reset if SO_LINGER 0 was set).
        self.conns[id.index as usize] = None;
        self.live -= 1;
        self.hub.on_peer_closed(id, lost, now);
    }

    // ----------------------------------------------------------------------------------------
    // Each turn

    /// Re-arms what ended in the last turn and enforces the driver's own deadlines.
    fn housekeeping(&mut self, now: Now) {
        // Every buffer is back in the ring now. Re-arm at most one recv per buffer: each of
        // them had data waiting, so more could only run the ring dry again at once.
        for _ in 0..self.bufs.count() {
            let Some(id) = self.rearm.pop_front() else { break };
            self.arm_recv(id);
        }
        if self.accepting && !self.accept_armed && now.mono_ms >= self.accept_retry_ms {
            self.arm_accept();
        }
        if !self.wake_armed && !self.exiting {
            self.arm_wake();
        }
        while let Some(&(until, id)) = self.draining.front() {
            if until > now.mono_ms {
                break;
            }
            self.draining.pop_front();
            if conn_mut(&mut self.conns, id).is_some_and(|c| matches!(c.state, State::Draining { .. })) {
                tracing::info!(core = self.index, conn = %id, "no EOF after close; aborting");
                self.teardown(id, false, true, now);
            }
        }
        if self.stop_at_ms.is_some_and(|t| now.mono_ms >= t) && !self.reset_all_done {
            self.reset_all_done = true;
            if self.live > 0 {
                tracing::warn!(
                    core = self.index,
                    left = self.live,
                    "shutdown grace expired; dropping the remaining connections"
                );
            }
            self.reset_all(now);
        }
    }

    fn reset_all(&mut self, now: Now) {
        let ids: Vec<ConnId> = self.conns.iter().flatten().map(|c| c.id).collect();
        for id in ids {
            self.teardown(id, false, true, now);
        }
    }

    /// The earliest of the driver's own deadlines (close lingers, shutdown grace).
    fn driver_deadline(&self) -> u64 {
        let mut due = u64::MAX;
        if let Some(&(until, _)) = self.draining.front() {
            due = due.min(until);
        }
        if let Some(t) = self.stop_at_ms {
            due = due.min(if self.reset_all_done { t + EXIT_WAIT_MS } else { t });
        }
        if !self.accept_armed && self.accepting {
            due = due.min(self.accept_retry_ms);
        }
        due
    }

    fn finished(&self, now: Now) -> bool {
        match self.stop_at_ms {
            None => false,
            Some(t) => self.live == 0 || now.mono_ms >= t + EXIT_WAIT_MS,
        }
    }

    /// Hub outputs, then one gathered send per dirty connection, until neither is left.
    fn settle(&mut self, now: Now) {
        let mut dirty = std::mem::take(&mut self.dirty);
        loop {
            let mut any = false;
            while let Some(out) = self.hub.poll_output() {
                any = true;
                self.on_output(out, now);
            }
            dirty.clear();
            self.hub.take_dirty(&mut dirty);
            if dirty.is_empty() && !any {
                break;
            }
            for &id in &dirty {
                self.start_send(id);
            }
        }
        self.dirty = dirty;
    }

    fn on_output(&mut self, out: HubOutput, now: Now) {
        match out {
            HubOutput::Upstream(cmd) => {
                if !self.upstream.send((self.index, cmd)) {
                    tracing::debug!(core = self.index, "source thread gone; command dropped");
                }
            }
            HubOutput::Close { conn: id, how: CloseHow::Abort } => self.teardown(id, false, true, now),
            HubOutput::Close { conn: id, how: CloseHow::Graceful } => {
                if self.exiting {
                    return;
                }
                let Some(conn) = conn_mut(&mut self.conns, id) else { return };
                if conn.state != State::Open {
                    return;
                }
                match SockRef::from(&conn.fd).shutdown(Shutdown::Write) {
                    Ok(()) => {
                        let until_ms = now.mono_ms + self.close_timeout_ms;
                        conn.state = State::Draining { until_ms };
                        self.draining.push_back((until_ms, id));
                    }
                    Err(e) => {
                        tracing::debug!(core = self.index, conn = %id, error = %e, "shutdown failed");
                        self.teardown(id, true, false, now);
                    }
                }
            }
        }
    }

    /// One gathered `SENDMSG` for `id`, unless it has one in flight or is closing.
    fn start_send(&mut self, id: ConnId) {
        let Some(conn) = conn_mut(&mut self.conns, id) else { return };
        if conn.state != State::Open || conn.sending.is_some() {
            return;
        }
        let mut iov = recycle(std::mem::take(&mut self.scratch));
        let len = self.hub.gather(id, &mut iov);
        if len == 0 {
            self.scratch = recycle(iov);
            return;
        }
        let buf = &mut *conn.send;
        buf.iov.clear();
        buf.iov.extend(
            iov.iter().map(|s| libc::iovec { iov_base: s.as_ptr() as *mut libc::c_void, iov_len: s.len() }),
        );
        self.scratch = recycle(iov);
        buf.msg.msg_iov = buf.iov.as_mut_ptr();
        buf.msg.msg_iovlen = buf.iov.len() as _;
        conn.sending = Some(len);
        let entry = opcode::SendMsg::new(types::Fd(conn.fd.as_raw_fd()), &buf.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(token::encode(Op::Send, id));
        // SAFETY: the iovecs point at bytes the hub keeps alive and unchanged until
        // `on_written`/`on_peer_closed` for `id` (its memory rule), which this driver calls
        // only after this send's completion. The iovec array and the msghdr live in the
        // connection's boxed `SendBuf`, which is not touched while `sending` is set and is
        // freed only with the connection, once no op of it is in flight. The fd is closed
        // only then too.
        unsafe { self.queue(entry) };
    }

    // ----------------------------------------------------------------------------------------
    // Exit

    /// Stops accepting, resets what is left, and waits (bounded) until the kernel finished
    /// every op, so that the buffers can be freed.
    fn exit(&mut self) -> anyhow::Result<()> {
        self.exiting = true;
        self.accepting = false;
        let now = self.clock.now();
        self.reset_all(now);
        if self.accept_armed {
            self.cancel(token::encode_loop(Op::Accept), ConnId { index: 0, gen: 0 });
        }
        if self.wake_armed {
            self.cancel(token::encode_loop(Op::Wake), ConnId { index: 0, gen: 0 });
        }
        let deadline = now.mono_ms + EXIT_WAIT_MS;
        let mut timer_cancelled = false;
        loop {
            let now = self.clock.now();
            // Connections closed now may still owe the upstream a USER_SYNC end.
            while let Some(out) = self.hub.poll_output() {
                if let HubOutput::Upstream(cmd) = out {
                    let _ = self.upstream.send((self.index, cmd));
                }
            }
            if self.in_flight == 0 || now.mono_ms >= deadline {
                break;
            }
            if self.in_flight == 1 && self.timer_armed {
                if !timer_cancelled {
                    timer_cancelled = true;
                    self.cancel(token::encode_loop(Op::Timeout), ConnId { index: 0, gen: 0 });
                }
            } else {
                self.arm_timer(now, deadline);
            }
            self.submit(true)?;
            let now = self.clock.now();
            self.reap(now);
        }
        if self.in_flight == 0 {
            let _ = self.ring.submitter().unregister_buf_ring(BGID);
        }
        tracing::debug!(
            core = self.index,
            recvs = self.stats.data,
            enobufs = self.stats.enobufs,
            "io_uring core stopped"
        );
        Ok(())
    }
}

/// SIOCOUTQ and SIOCINQ of a connection's socket, read on the owning core.
fn kernel_queues(conns: &[Option<Conn>], id: ConnId) -> (u64, u64) {
    let Some(conn) = conns.get(id.index as usize).and_then(Option::as_ref).filter(|c| c.id == id) else {
        return (0, 0);
    };
    let fd = conn.fd.as_raw_fd();
    (sockq::send_queue(fd).map_or(0, u64::from), sockq::recv_queue(fd).map_or(0, u64::from))
}
