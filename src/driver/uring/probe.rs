//! Start-up probe (ARCHITECTURE.md §5, runtime.md §3): is io_uring usable here, with every
//! feature this driver relies on? Also the ring constructor the core loop uses.
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use super::bufring::BufRing;

/// Where the thread that owns a ring sleeps, which decides how the kernel runs its
/// completions' task work ([`build_ring`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sleep {
    /// In `io_uring_enter` (a core thread of its own): `DEFER_TASKRUN`, the completions wait
    /// for the thread's next enter, which the kernel wakes at once when it is waiting there.
    InRing,
    /// Elsewhere (in tokio's epoll, with the source on board), woken by an eventfd registered
    /// with the ring: `COOP_TASKRUN` instead. With `DEFER_TASKRUN` the kernel signals that
    /// eventfd late for the work it defers: on this machine's 6.18 kernel a recv on loopback
    /// made it readable 8–30 ms after the peer's write, against 0.2–0.4 ms without the flag,
    /// and the ring's own descriptor polls as late. Without it the kernel runs the task work
    /// as it wakes the thread, posts the completion and signals the eventfd then.
    OnEventfd,
}

/// A ring with `SINGLE_ISSUER | SUBMIT_ALL` and `DEFER_TASKRUN` or `COOP_TASKRUN` as `sleep`
/// wants (kernel 6.1+), or without those flags on kernels that refuse them with `EINVAL`.
/// Returns the ring and whether the flags were taken. It must only be used from the thread
/// that built it.
pub(super) fn build_ring(entries: u32, cq_entries: u32, sleep: Sleep) -> io::Result<(IoUring, bool)> {
    let mut builder = IoUring::builder();
    builder.setup_single_issuer().setup_submit_all();
    match sleep {
        Sleep::InRing => builder.setup_defer_taskrun(),
        Sleep::OnEventfd => builder.setup_coop_taskrun(),
    };
    if cq_entries > 0 {
        builder.setup_cqsize(cq_entries);
    }
    match builder.build(entries) {
        Ok(ring) => Ok((ring, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let mut plain = IoUring::builder();
            if cq_entries > 0 {
                plain.setup_cqsize(cq_entries);
            }
            plain.build(entries).map(|ring| (ring, false))
        }
        Err(e) => Err(e),
    }
}

/// A one-line reason for a failed `io_uring_setup`.
pub(super) fn setup_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "io_uring_setup: permission denied (seccomp or kernel.io_uring_disabled)".to_owned()
        }
        Some(libc::ENOSYS) => "io_uring not supported (seccomp profile or old kernel)".to_owned(),
        Some(libc::ENOMEM) => "io_uring_setup: out of memory (RLIMIT_MEMLOCK too low?)".to_owned(),
        _ => format!("io_uring_setup failed: {e}"),
    }
}

/// The opcodes the core loop submits, with the names the reason line uses.
const OPCODES: [(u8, &str); 7] = [
    (opcode::AcceptMulti::CODE, "ACCEPT"),
    (opcode::RecvMulti::CODE, "RECV"),
    (opcode::SendMsg::CODE, "SENDMSG"),
    (opcode::Send::CODE, "SEND"),
    (opcode::Read::CODE, "READ"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
];

/// See [`super::probe`].
pub(super) fn probe() -> Result<(), String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if v.trim() == "2" {
            return Err("kernel.io_uring_disabled=2".to_owned());
        }
    }
    let (mut ring, _) = build_ring(8, 0, Sleep::InRing).map_err(|e| setup_error(&e))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring register_probe failed: {e}"))?;
    let missing: Vec<&str> =
        OPCODES.iter().filter(|(code, _)| !probe.is_supported(*code)).map(|(_, name)| *name).collect();
    if !missing.is_empty() {
        return Err(format!("kernel lacks io_uring ops: {}", missing.join(", ")));
    }
    let bufs = BufRing::new(4, 256, 0).map_err(|e| format!("buffer ring allocation failed: {e}"))?;
    // SAFETY: no op is in flight until `self_test` runs; after it, `bufs` is dropped after
    // `ring`, or leaked (below) if the self-test reports an op that could still use it.
    unsafe { bufs.register(&ring.submitter()) }
        .map_err(|e| format!("kernel lacks provided buffer rings (5.19+): {e}"))?;
    match self_test(&mut ring, &bufs) {
        Ok(()) => {
            drop(ring);
            drop(bufs);
            Ok(())
        }
        Err((reason, quiet)) => {
            drop(ring);
            if quiet {
                drop(bufs);
            } else {
                // An op that may select from the ring never completed: never free its memory.
                std::mem::forget(bufs);
            }
            Err(reason)
        }
    }
}

const UD_RECV: u64 = 1;
const UD_SEND: u64 = 2;
const UD_TIMER: u64 = 3;
const UD_CANCEL: u64 = 4;

/// The memory the self-test's send refers to, boxed so it can be leaked if the send never
/// completes.
struct SendState {
    msg: libc::msghdr,
    iov: [libc::iovec; 1],
}

/// Which of the self-test's ops have completed for good.
#[derive(Default)]
struct Done {
    recv: bool,
    send: bool,
    timer: bool,
}

/// One multishot recv from the buffer ring and one `SENDMSG` over a socket pair, bounded by a
/// one-second timer: catches kernels (and sandboxes such as gVisor) that set up a ring but
/// fail the ops. `Err((reason, quiet))`: `quiet` says no op is left that could use `bufs`.
fn self_test(ring: &mut IoUring, bufs: &BufRing) -> Result<(), (String, bool)> {
    const PAYLOAD: &[u8] = b"PING 1\n";
    let (rx, tx) = UnixStream::pair().map_err(|e| (format!("socketpair failed: {e}"), true))?;
    // SAFETY: all-zero bytes are a valid `msghdr` (null pointers, zero lengths).
    let msg: libc::msghdr = unsafe { std::mem::zeroed() };
    let mut send_state = Box::new(SendState {
        msg,
        iov: [libc::iovec { iov_base: PAYLOAD.as_ptr() as *mut libc::c_void, iov_len: PAYLOAD.len() }],
    });
    send_state.msg.msg_iov = send_state.iov.as_mut_ptr();
    send_state.msg.msg_iovlen = 1;
    let timer = Box::new(types::Timespec::new().sec(1));
    let recv = opcode::RecvMulti::new(types::Fd(rx.as_raw_fd()), bufs.bgid()).build().user_data(UD_RECV);
    let send = opcode::SendMsg::new(types::Fd(tx.as_raw_fd()), &send_state.msg)
        .flags(libc::MSG_NOSIGNAL as u32)
        .build()
        .user_data(UD_SEND);
    let guard = opcode::Timeout::new(&*timer).build().user_data(UD_TIMER);
    // SAFETY: the send reads `send_state` (boxed, leaked below if the send never completes)
    // and the static `PAYLOAD`; the timer's timespec is copied by the kernel when the op is
    // issued and is boxed and kept (or leaked) likewise; the recv writes only into `bufs`,
    // which the caller leaks if the recv did not complete. The sockets are open while the
    // ops are issued, and an op still in flight holds its own reference to its file.
    unsafe { push_all(ring, &[recv, send, guard]) }.map_err(|e| (e, true))?;

    let mut done = Done::default();
    let (mut got_recv, mut failure) = (false, None::<String>);
    let finished = |got_recv: bool, done: &Done| done.timer || (got_recv && done.send);
    while !finished(got_recv, &done) && failure.is_none() {
        if let Err(e) = wait(ring) {
            failure = Some(e);
            break;
        }
        for cqe in ring.completion() {
            let (res, flags) = (cqe.result(), cqe.flags());
            match cqe.user_data() {
                UD_RECV => {
                    done.recv |= !cqueue::more(flags);
                    if res == PAYLOAD.len() as i32 && cqueue::more(flags) {
                        let data = cqueue::buffer_select(flags).and_then(|bid| bufs.data(bid, res as usize));
                        if data == Some(PAYLOAD) {
                            got_recv = true;
                        } else {
                            failure = Some("multishot recv returned the wrong bytes".to_owned());
                        }
                    } else if res < 0 {
                        failure = Some(format!("multishot recv failed: {}", os_error(res)));
                    } else {
                        failure = Some("multishot recv is not supported (kernel 6.0+)".to_owned());
                    }
                }
                UD_SEND => {
                    done.send = true;
                    if res != PAYLOAD.len() as i32 {
                        failure = Some(format!("SENDMSG failed: {}", os_error(res)));
                    }
                }
                UD_TIMER => done.timer = true,
                _ => {}
            }
        }
    }
    if failure.is_none() && !(got_recv && done.send) {
        failure = Some("self-test timed out after 1 s".to_owned());
    }
    // Wind down: closing the peer ends the recv (EOF); the timer bounds the wait.
    drop(tx);
    let mut entered = true;
    while !finished(done.recv, &done) && entered {
        entered = wait(ring).is_ok();
        collect(ring, &mut done);
    }
    if !done.timer && entered {
        let cancel = opcode::AsyncCancel::new(UD_TIMER).build().user_data(UD_CANCEL);
        // SAFETY: an AsyncCancel refers to no memory.
        entered = unsafe { push_all(ring, &[cancel]) }.is_ok();
        while !done.timer && entered {
            entered = wait(ring).is_ok();
            collect(ring, &mut done);
        }
    }
    if !done.send {
        // The kernel may still read the msghdr: never free it.
        std::mem::forget(send_state);
    }
    if !done.timer {
        std::mem::forget(timer);
    }
    drop(rx);
    let quiet = done.recv;
    match failure {
        None if quiet => Ok(()),
        None => Err(("multishot recv did not end at EOF".to_owned(), quiet)),
        Some(reason) => Err((reason, quiet)),
    }
}

/// Records final completions of the self-test's ops.
fn collect(ring: &mut IoUring, done: &mut Done) {
    for cqe in ring.completion() {
        match cqe.user_data() {
            UD_RECV => done.recv |= !cqueue::more(cqe.flags()),
            UD_SEND => done.send = true,
            UD_TIMER => done.timer = true,
            _ => {}
        }
    }
}

/// Pushes entries into an empty submission queue.
///
/// # Safety
///
/// Every buffer an entry refers to must stay valid until its op completes.
unsafe fn push_all(ring: &mut IoUring, entries: &[squeue::Entry]) -> Result<(), String> {
    // SAFETY: forwarded to the caller.
    unsafe { ring.submission().push_multiple(entries) }.map_err(|_| "submission queue too small".to_owned())
}

fn wait(ring: &IoUring) -> Result<(), String> {
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(format!("io_uring_enter failed: {e}")),
        }
    }
}

fn os_error(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_errors_name_the_likely_cause() {
        let eperm = setup_error(&io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(eperm, "io_uring_setup: permission denied (seccomp or kernel.io_uring_disabled)");
        let enosys = setup_error(&io::Error::from_raw_os_error(libc::ENOSYS));
        assert_eq!(enosys, "io_uring not supported (seccomp profile or old kernel)");
        assert!(
            setup_error(&io::Error::from_raw_os_error(libc::EMFILE)).starts_with("io_uring_setup failed: ")
        );
    }
}
