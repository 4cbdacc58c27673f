//! A connection's gathered send: the memory a `SENDMSG` points the kernel at, and the
//! submission that points at it. Used by the core loop and by the send-path bench
//! ([`super::bench`]), so the bench measures the driver's own submissions.
use std::io::IoSlice;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

/// A `msghdr` and its iovec array. Boxed by its owner, so moving the owner (the slot table
/// grows) never moves it; only rewritten when no send from it is in flight.
pub(crate) struct SendBuf {
    msg: libc::msghdr,
    iov: Vec<libc::iovec>,
}

impl SendBuf {
    /// An empty buffer, boxed.
    pub(crate) fn new() -> Box<Self> {
        // SAFETY: all-zero bytes are a valid `msghdr` (null pointers, zero lengths).
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        Box::new(Self { msg, iov: Vec::new() })
    }

    /// Copies the slices' pointers into this buffer and returns the `SENDMSG` of them to `fd`;
    /// a single slice goes as a plain `SEND` (no `msghdr` for the kernel to copy and check).
    ///
    /// Building the entry is safe; pushing it is not: whoever queues it must keep this buffer
    /// unmoved and unchanged, the bytes behind `slices` alive and unchanged, and `fd` open,
    /// until the op's completion is reaped.
    pub(crate) fn prepare(&mut self, fd: RawFd, slices: &[IoSlice<'_>], user_data: u64) -> squeue::Entry {
        if let [one] = slices {
            if let Ok(len) = u32::try_from(one.len()) {
                return opcode::Send::new(types::Fd(fd), one.as_ptr(), len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(user_data);
            }
        }
        self.iov.clear();
        self.iov.extend(
            slices
                .iter()
                .map(|s| libc::iovec { iov_base: s.as_ptr() as *mut libc::c_void, iov_len: s.len() }),
        );
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len() as _;
        opcode::SendMsg::new(types::Fd(fd), &self.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data)
    }
}
