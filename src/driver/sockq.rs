//! Kernel socket queue depths (`SIOCOUTQ`, `SIOCINQ`), as Synapse samples them (PROTOCOL.md §7).
//!
//! Call these on the core that owns the fd, at scrape time: a scrape thread reading another
//! core's fds would race with close and fd-number reuse and could report some other socket.
//! One call costs roughly 300–400 ns, so sampling 10 k sockets every 15 s is cheap, but it is
//! never done per message.

use std::io;
use std::os::fd::RawFd;

/// `SIOCOUTQ`: bytes in the socket's send queue that the peer has not yet acknowledged.
///
/// Linux only; elsewhere it returns [`io::ErrorKind::Unsupported`].
pub fn send_queue(fd: RawFd) -> io::Result<u32> {
    #[cfg(target_os = "linux")]
    {
        // SIOCOUTQ has the same value as TIOCOUTQ (0x5411), which is what libc exports.
        ioctl_u32(fd, libc::TIOCOUTQ)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// `SIOCINQ`: bytes the kernel has received on the socket that the application has not read.
///
/// Linux only; elsewhere it returns [`io::ErrorKind::Unsupported`].
pub fn recv_queue(fd: RawFd) -> io::Result<u32> {
    #[cfg(target_os = "linux")]
    {
        // SIOCINQ has the same value as FIONREAD (0x541B).
        ioctl_u32(fd, libc::FIONREAD)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The peer address of a connected socket (`getpeername`).
pub fn peer_addr(fd: RawFd) -> io::Result<std::net::SocketAddr> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: the caller's socket is open for the duration of this call (it is read on the core
    // that owns it, which closes it only between turns), and the borrow does not outlive the call:
    // `SockRef` only issues `getpeername` on it.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd)
        .peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "not an IP socket"))
}

/// Sets `TCP_NOTSENT_LOWAT` on a socket; 0 restores the system default
/// (`net.ipv4.tcp_notsent_lowat`, unlimited unless an administrator set it).
pub fn set_notsent_lowat(fd: RawFd, bytes: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `value` is a live, aligned `int` for the whole call and the length passed is its
    // size; the kernel only reads it. An invalid or non-TCP fd yields -1 with errno, never UB.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Issues an ioctl whose argument is a pointer to one `int` the kernel fills in.
#[cfg(target_os = "linux")]
fn ioctl_u32(fd: RawFd, request: libc::Ioctl) -> io::Result<u32> {
    let mut n: libc::c_uint = 0;
    // SAFETY: `request` is SIOCINQ or SIOCOUTQ, both of which take a pointer to an `int` and
    // write exactly `sizeof(int)` bytes through it; `n` is a live, aligned, writable
    // `c_uint` (same size as `int`) for the whole call. The fd is only read by the kernel:
    // an invalid or non-socket fd yields -1 with errno (EBADF, ENOTTY, EINVAL), never UB.
    let rc = unsafe { libc::ioctl(fd, request, &mut n as *mut libc::c_uint) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    }

    #[test]
    fn peer_addr_is_the_other_end() {
        let (a, b) = pair();
        assert_eq!(peer_addr(b.as_raw_fd()).unwrap(), a.local_addr().unwrap());
        assert!(peer_addr(-1).is_err());
    }

    #[test]
    fn recv_queue_counts_unread_bytes() {
        let (mut a, b) = pair();
        assert_eq!(recv_queue(b.as_raw_fd()).unwrap(), 0);
        // One small write is one segment on loopback, so once a blocking peek sees any of it,
        // all of it is queued at the receiver.
        let payload = [b'x'; 1000];
        a.write_all(&payload).unwrap();
        let mut peeked = [0u8; 2000];
        let n = b.peek(&mut peeked).unwrap();
        assert_eq!(n, payload.len());
        assert_eq!(recv_queue(b.as_raw_fd()).unwrap(), 1000);
    }

    #[test]
    fn send_queue_is_zero_on_a_quiet_socket() {
        let (a, b) = pair();
        assert_eq!(send_queue(a.as_raw_fd()).unwrap(), 0);
        assert_eq!(send_queue(b.as_raw_fd()).unwrap(), 0);
    }

    #[test]
    fn bad_fd_is_an_error() {
        let e = recv_queue(-1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        let e = send_queue(-1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }
}
