//! The ring's submissions for [`Io`]: queueing an op (with the backlog for a full submission
//! queue), handing them to the kernel (`io_uring_enter`), and arming each kind of op the loop
//! keeps in flight: accepts, the mailbox READ, the timers, recvs, cancels.
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use anyhow::Context as _;
use io_uring::{opcode, squeue, types};

use super::{token, Enter, Io, Op, State, BGID, MAX_SLEEP_MS};
use crate::hub::ConnId;
use crate::time::Now;

impl Io {
    /// Queues one submission (it goes to the kernel at the next `submit`).
    ///
    /// # Safety
    ///
    /// Every buffer, iovec array, `msghdr` and timespec `entry` points to must stay valid and
    /// unmoved until the op's final completion is reaped, and its fd must stay open until then
    /// (so that the number is not reused before the op was issued).
    pub(super) unsafe fn queue(&mut self, entry: squeue::Entry) {
        self.in_flight += 1;
        if self.backlog.is_empty() {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
        }
        self.backlog.push_back(entry);
    }

    /// Hands every queued submission to the kernel and, with [`Enter::Sleep`], sleeps until at
    /// least one completion is ready. Never spins: then it blocks in the kernel, and there is
    /// always a timer, the mailbox READ or a connection op to wake it.
    pub(super) fn submit(&mut self, enter: Enter) -> anyhow::Result<()> {
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
            self.stats.enters += 1;
            let res = match enter {
                Enter::Flush => {
                    let to_submit = u32::try_from(self.ring.submission().len()).unwrap_or(u32::MAX);
                    // SAFETY: no argument is passed (no pointer for the kernel to follow); the
                    // submissions it takes were queued under `queue`'s contract.
                    unsafe {
                        self.ring.submitter().enter::<libc::sigset_t>(
                            to_submit,
                            0,
                            io_uring::EnterFlags::GETEVENTS.bits(),
                            None,
                        )
                    }
                }
                Enter::Sleep if !more => self.ring.submit_and_wait(1),
                _ => self.ring.submit_and_wait(0),
            };
            match res {
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

    pub(super) fn arm_accept(&mut self) {
        self.accept_armed = true;
        self.queue_accept(self.listener.as_raw_fd(), Op::Accept);
    }

    pub(super) fn arm_resp_accept(&mut self) {
        let Some(fd) = self.resp_listener.as_ref().map(AsRawFd::as_raw_fd) else { return };
        self.resp_accept_armed = true;
        self.queue_accept(fd, Op::AcceptResp);
    }

    /// A multishot ACCEPT on `listener`, one of the core's listeners, completing as `op`.
    fn queue_accept(&mut self, listener: RawFd, op: Op) {
        let entry = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(token::encode_loop(op));
        // SAFETY: accept writes no peer address (none was given); the listeners are fields of
        // the driver, open until the driver is dropped, which happens only with no op in
        // flight (or never).
        unsafe { self.queue(entry) };
    }

    /// A READ of the mailbox eventfd: the kernel waits for a sender's write (the eventfd can be
    /// polled, so io_uring arms a poll rather than failing with EAGAIN) and then takes the
    /// counter, which resets it. A POLL would leave that reset to a `read(2)` of the core's,
    /// one system call per wake-up before the core gets to its mailbox.
    pub(super) fn arm_wake(&mut self) {
        let Some(eventfd) = &self.eventfd else { return };
        let counter: *mut u64 = &mut *self.wake_counter;
        let entry = opcode::Read::new(types::Fd(eventfd.as_raw_fd()), counter.cast(), 8)
            .build()
            .user_data(token::encode_loop(Op::Wake));
        self.wake_armed = true;
        // SAFETY: the 8 bytes the read writes are `wake_counter`'s heap allocation, which is
        // neither moved nor freed while the driver exists and is only written by this op (one
        // in flight at a time: `wake_armed`); the driver is dropped only with no op in flight
        // (or leaked). The eventfd is a field of the driver, open as long.
        unsafe { self.queue(entry) };
    }

    /// Arms the timer for `due_ms` (monotonic) unless one is in flight. The hub's deadline only
    /// moves forward and is never more than a tick away, so a timer in flight is never late by
    /// more than that.
    pub(super) fn arm_timer(&mut self, now: Now, due_ms: u64) {
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

    /// Arms the end of a write moderation window, `delay` from now (none is in flight).
    pub(super) fn arm_hold(&mut self, delay: Duration) {
        *self.hold_timespec = types::Timespec::from(delay);
        let entry =
            opcode::Timeout::new(&*self.hold_timespec).build().user_data(token::encode_loop(Op::Hold));
        self.hold_armed = true;
        // SAFETY: the timespec is boxed in the driver and not rewritten while this timer is in
        // flight (`hold_armed`); the kernel copies it at submission anyway.
        unsafe { self.queue(entry) };
    }

    pub(super) fn arm_recv(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(id) else { return };
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

    pub(super) fn cancel(&mut self, target: u64, id: ConnId) {
        let entry = opcode::AsyncCancel::new(target).build().user_data(token::encode(Op::Cancel, id));
        // SAFETY: a cancel refers to no memory and no fd, only to another op's user_data.
        unsafe { self.queue(entry) };
    }
}
