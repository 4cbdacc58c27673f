//! `--target ideal`: the fastest fan-out server this machine can run for the load test's
//! workload, so that every other figure can be read as a fraction of it.
//!
//! ```text
//!   lt-publisher ──TCP──► replhub-ideal-up: read, cut at the last '\n', one Arc'd buffer per
//!                         read (the batch) ──► every core's channel + eventfd
//!   replhub-ideal-N: epoll; per batch round one writev per subscriber over every batch it has
//!                    not yet taken (the same gathered write the hub does), nothing else
//! ```
//!
//! It keeps what a correct hub must do to put bytes on sockets (a shared log of batches per
//! core, a cursor per subscriber, a gathered write per subscriber, partial writes resumed on
//! EPOLLOUT) and drops everything else: no protocol parsing beyond `REPLICATE`, no
//! per-stream filtering (every subscriber of the load test wants every line), no keep-alive, no
//! eviction (the load test's window bounds the backlog), no metrics. Its `POSITION` is always 0,
//! which is exact only because the load test publishes after every subscriber is ready.
//! Its threads are named `replhub-ideal-*`, so the load test measures their CPU like the
//! in-process hub's.
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};

use crate::proto::StreamId;

/// The name the ideal server announces.
const SERVER_NAME: &str = "loadtest.ideal";
/// Most iovecs per writev (Linux's IOV_MAX).
const MAX_IOV: usize = 1024;
/// epoll tokens of a core's own fds (connections use their slot index).
const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;
/// How often a core and the upstream reader look at the stop flag.
const STOP_POLL_MS: i32 = 50;

/// A running ideal server; stopped (threads joined) when dropped.
pub(super) struct IdealServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl IdealServer {
    /// Where subscribers connect.
    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for IdealServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One core's mailbox: batches, and the eventfd that wakes its epoll.
struct CoreTx {
    tx: Sender<Arc<Vec<u8>>>,
    wake: Arc<OwnedFd>,
}

/// Starts `threads` core threads on SO_REUSEPORT listeners of one loopback port, and the
/// upstream reader dialing `master`.
pub(super) fn start(master: SocketAddr, threads: usize) -> anyhow::Result<IdealServer> {
    let stop = Arc::new(AtomicBool::new(false));
    let first = reuseport_listener(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads.max(1) {
        listeners.push(reuseport_listener(addr)?);
    }
    let mut server = IdealServer { addr, stop: Arc::clone(&stop), threads: Vec::new() };
    let mut cores = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        // SAFETY: eventfd takes no pointers; a negative result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error()).context("eventfd");
        }
        // SAFETY: `efd` is a fresh fd owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        cores.push(CoreTx { tx, wake: Arc::clone(&wake) });
        let stop = Arc::clone(&stop);
        server.threads.push(std::thread::Builder::new().name(format!("replhub-ideal-{i}")).spawn(
            move || {
                if let Err(e) = Core::new(listener, rx, wake).and_then(|mut c| c.run(&stop)) {
                    tracing::warn!(core = i, error = %e, "ideal server core stopped");
                }
            },
        )?);
    }
    let stop_up = Arc::clone(&stop);
    server.threads.push(std::thread::Builder::new().name("replhub-ideal-up".to_owned()).spawn(
        move || {
            if let Err(e) = upstream(master, &cores, &stop_up) {
                tracing::warn!(error = %e, "ideal server upstream stopped");
            }
        },
    )?);
    Ok(server)
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Reads the master; each read's complete lines become one batch for every core. The
/// master's handshake (`SERVER`, `POSITION`s) is dropped: lines go out from the first RDATA.
fn upstream(master: SocketAddr, cores: &[CoreTx], stop: &AtomicBool) -> io::Result<()> {
    let mut stream = TcpStream::connect(master)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(STOP_POLL_MS as u64)))?;
    stream.write_all(b"NAME ideal\n")?;
    let mut buf = vec![0u8; 256 << 10];
    let (mut filled, mut started) = (0usize, false);
    while !stop.load(Ordering::Relaxed) {
        if filled == buf.len() {
            return Err(io::Error::other("a line longer than the read buffer"));
        }
        let n = match stream.read(&mut buf[filled..]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e),
        };
        filled += n;
        let Some(end) = memchr::memrchr(b'\n', &buf[..filled]).map(|i| i + 1) else { continue };
        let mut from = 0;
        if !started {
            // Skip whole lines until the first RDATA.
            while from < end && !buf[from..end].starts_with(b"RDATA ") {
                from += memchr::memchr(b'\n', &buf[from..end]).map_or(end - from, |i| i + 1);
            }
            started = from < end;
        }
        if from < end {
            let batch = Arc::new(buf[from..end].to_vec());
            for core in cores {
                if core.tx.send(Arc::clone(&batch)).is_ok() {
                    wake(&core.wake);
                }
            }
        }
        buf.copy_within(end..filled, 0);
        filled -= end;
    }
    Ok(())
}

fn wake(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to an eventfd we own; a failure (the
    // counter saturated) only means the core is already due to wake.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// A subscriber socket.
struct Conn {
    stream: TcpStream,
    /// Received bytes not yet a whole line (the handshake).
    inbuf: Vec<u8>,
    /// Sent `REPLICATE`: gets every batch.
    subscribed: bool,
    /// The next batch to send (log sequence number) and how much of it went out already.
    seq: u64,
    off: usize,
    /// The last write was short: wait for EPOLLOUT.
    blocked: bool,
}

/// One core: its listener, its subscribers and its log of batches.
struct Core {
    epoll: OwnedFd,
    listener: TcpListener,
    rx: Receiver<Arc<Vec<u8>>>,
    wake: Arc<OwnedFd>,
    conns: Vec<Option<Conn>>,
    /// Batches not yet written to every subscriber; `log[0]` has sequence number `base`.
    log: VecDeque<Arc<Vec<u8>>>,
    base: u64,
    iov: Vec<libc::iovec>,
}

impl Core {
    fn new(listener: TcpListener, rx: Receiver<Arc<Vec<u8>>>, wake: Arc<OwnedFd>) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; a negative result is checked below.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `ep` is a fresh fd owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(ep) };
        let core = Self {
            epoll,
            listener,
            rx,
            wake,
            conns: Vec::new(),
            log: VecDeque::new(),
            base: 0,
            iov: Vec::with_capacity(MAX_IOV),
        };
        core.add(core.listener.as_raw_fd(), LISTENER, libc::EPOLLIN as u32)?;
        core.add(core.wake.as_raw_fd(), WAKE, libc::EPOLLIN as u32)?;
        Ok(core)
    }

    fn add(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a live epoll_event for the duration of the call; the kernel copies it.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `events` is a live, writable array of `events.len()` epoll_events.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    STOP_POLL_MS,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in &events[..n as usize] {
                let (token, flags) = (ev.u64, ev.events);
                match token {
                    LISTENER => self.accept(),
                    WAKE => self.take_batches(),
                    i => self.on_conn(i as usize, flags),
                }
            }
            self.flush_all();
        }
        Ok(())
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() || stream.set_nodelay(true).is_err() {
                continue;
            }
            let i = self.conns.iter().position(Option::is_none).unwrap_or(self.conns.len());
            let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32;
            if self.add(stream.as_raw_fd(), i as u64, events).is_err() {
                continue;
            }
            let mut conn =
                Conn { stream, inbuf: Vec::new(), subscribed: false, seq: 0, off: 0, blocked: false };
            // A fresh socket takes this much at once.
            let _ = conn.stream.write_all(format!("SERVER {SERVER_NAME}\n").as_bytes());
            if i == self.conns.len() {
                self.conns.push(Some(conn));
            } else {
                self.conns[i] = Some(conn);
            }
        }
    }

    fn take_batches(&mut self) {
        let mut counter = [0u8; 8];
        // SAFETY: reads 8 bytes into a live local buffer from an eventfd we own.
        let _ = unsafe { libc::read(self.wake.as_raw_fd(), counter.as_mut_ptr().cast(), counter.len()) };
        while let Ok(batch) = self.rx.try_recv() {
            self.log.push_back(batch);
        }
    }

    fn on_conn(&mut self, i: usize, flags: u32) {
        let end = self.base + self.log.len() as u64;
        let Some(Some(conn)) = self.conns.get_mut(i) else { return };
        if flags & libc::EPOLLOUT as u32 != 0 {
            conn.blocked = false;
        }
        let mut open = flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 == 0;
        if open && flags & libc::EPOLLIN as u32 != 0 {
            open = conn.read_handshake(end);
        }
        if !open {
            // Dropping the stream closes it (and removes it from the epoll set).
            self.conns[i] = None;
        }
    }

    /// One gathered write per subscriber that has batches it has not taken and room (more
    /// only when it is over [`MAX_IOV`] batches behind).
    fn flush_all(&mut self) {
        let end = self.base + self.log.len() as u64;
        let mut min = end;
        for slot in &mut self.conns {
            let Some(conn) = slot else { continue };
            if !conn.subscribed {
                continue;
            }
            // More than MAX_IOV batches behind takes more than one write.
            let mut ok = true;
            while ok && !conn.blocked && conn.seq < end {
                ok = write_conn(conn, &self.log, self.base, &mut self.iov);
            }
            if !ok {
                *slot = None;
                continue;
            }
            min = min.min(conn.seq);
        }
        while self.base < min {
            self.log.pop_front();
            self.base += 1;
        }
    }
}

impl Conn {
    /// Reads what the subscriber sent; `REPLICATE` subscribes it from `end` (the next batch)
    /// and is answered with `POSITION … 0`. Returns false once the peer is gone.
    fn read_handshake(&mut self, end: u64) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) if self.subscribed => {
                    // Keep-alives after the handshake: nothing to answer.
                    let _ = n;
                }
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        let mut reply = String::new();
        let mut from = 0;
        while let Some(nl) = memchr::memchr(b'\n', &self.inbuf[from..]) {
            let line = &self.inbuf[from..from + nl];
            from += nl + 1;
            let Some(target) = line.strip_prefix(b"REPLICATE ") else { continue };
            let target = String::from_utf8_lossy(target);
            if target == "ALL" {
                for s in StreamId::ALL {
                    reply.push_str(&format!("POSITION {} 0\n", s.name()));
                }
            } else {
                reply.push_str(&format!("POSITION {target} 0\n"));
            }
            if !self.subscribed {
                self.subscribed = true;
                self.seq = end;
            }
        }
        self.inbuf.drain(..from);
        // The handshake is small and the socket fresh: it takes it at once.
        reply.is_empty() || self.stream.write_all(reply.as_bytes()).is_ok()
    }
}

/// One writev of everything `conn` has not taken yet (up to [`MAX_IOV`] batches). Returns
/// false if the socket failed.
fn write_conn(conn: &mut Conn, log: &VecDeque<Arc<Vec<u8>>>, base: u64, iov: &mut Vec<libc::iovec>) -> bool {
    iov.clear();
    let mut total = 0usize;
    for (k, batch) in log.iter().skip((conn.seq - base) as usize).take(MAX_IOV).enumerate() {
        let skip = if k == 0 { conn.off } else { 0 };
        let bytes = &batch[skip..];
        total += bytes.len();
        iov.push(libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() });
    }
    // SAFETY: every iovec points into a batch the log holds (alive and unchanged during the
    // call); `iov` is a live array of `iov.len()` (≤ IOV_MAX) entries.
    let n = unsafe { libc::writev(conn.stream.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            conn.blocked = true;
            return true;
        }
        return e.kind() == io::ErrorKind::Interrupted;
    }
    let mut n = n as usize;
    if n < total {
        conn.blocked = true;
    }
    // Advance the cursor over what was written.
    for batch in log.iter().skip((conn.seq - base) as usize) {
        let left = batch.len() - conn.off;
        if n < left {
            conn.off += n;
            break;
        }
        n -= left;
        conn.seq += 1;
        conn.off = 0;
        if n == 0 {
            break;
        }
    }
    true
}
