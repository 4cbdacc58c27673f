//! `--target ideal`: the fastest fan-out server this machine can run for the load test's
//! workload, so that every other figure can be read as a fraction of it.
//!
//! ```text
//!   lt-publisher ──TCP──► replhub-ideal-up: read, cut at the last '\n', one Arc'd buffer per
//!                         read (the batch) ──► every core's channel + waker
//!   replhub-ideal-N: mio poll; per batch round one gathered write (writev) per subscriber over
//!                    every batch it has not yet taken (the same write the hub does), nothing else
//! ```
//!
//! It keeps what a correct hub must do to put bytes on sockets (a shared log of batches per
//! core, a cursor per subscriber, a gathered write per subscriber, partial writes resumed when
//! the socket turns writable) and drops everything else: no protocol parsing beyond `REPLICATE`, no
//! per-stream filtering (every subscriber of the load test wants every line), no keep-alive, no
//! eviction (the load test's window bounds the backlog), no metrics. Its `POSITION` is always 0,
//! which is exact only because the load test publishes after every subscriber is ready.
//! Its threads are named `replhub-ideal-*`, so the load test measures their CPU like the
//! in-process hub's. With `--spawn-server` it runs as its own process instead
//! ([`run_process`], the hidden `replhub loadtest ideal-server`), measured like a child
//! `replhub serve`: every thread of the process. It is safe Rust on `mio` (epoll and an eventfd waker underneath), none of
//! replhub's drivers, so that it stays the floor they are compared with.
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::proto::StreamId;

/// The name the ideal server announces.
const SERVER_NAME: &str = "loadtest.ideal";
/// Most iovecs per writev (Linux's IOV_MAX).
const MAX_IOV: usize = 1024;
/// Poll tokens of a core's own sources; connection slot `i` is `Token(FIRST_CONN + i)`.
const LISTENER: Token = Token(0);
const WAKE: Token = Token(1);
const FIRST_CONN: usize = 2;
/// How often a core and the upstream reader look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

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

/// One core's mailbox: batches, and the waker of its poll.
struct CoreTx {
    tx: Sender<Arc<Vec<u8>>>,
    waker: Waker,
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
        let core = Core::new(listener, rx)?;
        cores.push(CoreTx { tx, waker: Waker::new(core.poll.registry(), WAKE)? });
        let stop = Arc::clone(&stop);
        server.threads.push(std::thread::Builder::new().name(format!("replhub-ideal-{i}")).spawn(
            move || {
                let mut core = core;
                if let Err(e) = core.run(&stop) {
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

/// The ideal server as its own process (`replhub loadtest ideal-server`, started by
/// `--target ideal --spawn-server`): prints `listening on ADDR` on stdout once it listens, then
/// serves until stdin reaches its end, which the load test causes by closing the pipe when the
/// run is over, and which also happens if the load test dies: the server never outlives it.
pub(super) fn run_process(master: SocketAddr, threads: usize) -> anyhow::Result<()> {
    if threads == 0 || threads > crate::config::MAX_THREADS {
        anyhow::bail!("--threads must be in 1..={}", crate::config::MAX_THREADS);
    }
    let server = start(master, threads)?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "listening on {}", server.addr())?;
        out.flush()?;
    }
    let mut stdin = io::stdin().lock();
    let mut sink = [0u8; 64];
    loop {
        match stdin.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Joins the threads: the process exits only once every socket is closed.
    drop(server);
    Ok(())
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
    stream.set_read_timeout(Some(STOP_POLL))?;
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
                    // A failure (the eventfd counter saturated) only means the core is already
                    // due to wake.
                    let _ = core.waker.wake();
                }
            }
        }
        buf.copy_within(end..filled, 0);
        filled -= end;
    }
    Ok(())
}

/// A subscriber socket.
struct Conn {
    stream: mio::net::TcpStream,
    /// Received bytes not yet a whole line (the handshake).
    inbuf: Vec<u8>,
    /// Sent `REPLICATE`: gets every batch.
    subscribed: bool,
    /// The next batch to send (log sequence number) and how much of it went out already.
    seq: u64,
    off: usize,
    /// The last write was short: wait for the socket to turn writable.
    blocked: bool,
}

/// One core: its listener, its subscribers and its log of batches.
struct Core {
    poll: Poll,
    listener: mio::net::TcpListener,
    rx: Receiver<Arc<Vec<u8>>>,
    conns: Vec<Option<Conn>>,
    /// Batches not yet written to every subscriber; `log[0]` has sequence number `base`.
    log: VecDeque<Arc<Vec<u8>>>,
    base: u64,
    /// The gathered write's slices, empty between rounds: kept only for its allocation (see
    /// [`recycle`]).
    iov: Vec<IoSlice<'static>>,
}

impl Core {
    fn new(listener: TcpListener, rx: Receiver<Arc<Vec<u8>>>) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut listener = mio::net::TcpListener::from_std(listener);
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Self {
            poll,
            listener,
            rx,
            conns: Vec::new(),
            log: VecDeque::new(),
            base: 0,
            iov: Vec::with_capacity(MAX_IOV),
        })
    }

    fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut events = Events::with_capacity(512);
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = self.poll.poll(&mut events, Some(STOP_POLL)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in &events {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKE => self.take_batches(),
                    Token(t) => {
                        // Hang-up is both directions closed (EPOLLHUP); a peer that only shut
                        // its side reads 0 in the handshake read.
                        let hung_up = ev.is_read_closed() && ev.is_write_closed();
                        let open = !(ev.is_error() || hung_up);
                        self.on_conn(t - FIRST_CONN, open, ev.is_readable(), ev.is_writable());
                    }
                }
            }
            self.flush_all();
        }
        Ok(())
    }

    fn accept(&mut self) {
        // mio's accepted sockets are non-blocking, and registered edge-triggered.
        while let Ok((mut stream, _)) = self.listener.accept() {
            if stream.set_nodelay(true).is_err() {
                continue;
            }
            let i = self.conns.iter().position(Option::is_none).unwrap_or(self.conns.len());
            let interest = Interest::READABLE | Interest::WRITABLE;
            if self.poll.registry().register(&mut stream, Token(FIRST_CONN + i), interest).is_err() {
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

    /// The waker fired: take every batch sent since. (mio's waker is edge-triggered and
    /// resets itself, so there is no counter to drain.)
    fn take_batches(&mut self) {
        while let Ok(batch) = self.rx.try_recv() {
            self.log.push_back(batch);
        }
    }

    fn on_conn(&mut self, i: usize, mut open: bool, readable: bool, writable: bool) {
        let end = self.base + self.log.len() as u64;
        let Some(Some(conn)) = self.conns.get_mut(i) else { return };
        if writable {
            conn.blocked = false;
        }
        if open && readable {
            open = conn.read_handshake(end);
        }
        if !open {
            // Dropping the stream closes it (and so removes it from the poll's epoll set).
            self.conns[i] = None;
        }
    }

    /// One gathered write per subscriber that has batches it has not taken and room (more
    /// only when it is over [`MAX_IOV`] batches behind).
    fn flush_all(&mut self) {
        let end = self.base + self.log.len() as u64;
        let mut min = end;
        let mut iov = recycle(std::mem::take(&mut self.iov));
        for slot in &mut self.conns {
            let Some(conn) = slot else { continue };
            if !conn.subscribed {
                continue;
            }
            // More than MAX_IOV batches behind takes more than one write.
            let mut ok = true;
            while ok && !conn.blocked && conn.seq < end {
                ok = write_conn(conn, &self.log, self.base, &mut iov);
            }
            if !ok {
                *slot = None;
                continue;
            }
            min = min.min(conn.seq);
        }
        self.iov = recycle(iov);
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

/// An empty vector of slices of another lifetime on the same allocation: the gathered write
/// borrows the log for one round, and the buffer outlives the round. Collecting a consumed
/// `Vec` into one of the same layout reuses its allocation, so a round allocates nothing.
fn recycle<'a>(mut iov: Vec<IoSlice<'_>>) -> Vec<IoSlice<'a>> {
    iov.clear();
    iov.into_iter().map(|_| IoSlice::new(&[])).collect()
}

/// One gathered write of everything `conn` has not taken yet (up to [`MAX_IOV`] batches). Returns
/// false if the socket failed.
fn write_conn<'a>(
    conn: &mut Conn,
    log: &'a VecDeque<Arc<Vec<u8>>>,
    base: u64,
    iov: &mut Vec<IoSlice<'a>>,
) -> bool {
    iov.clear();
    let mut total = 0usize;
    for (k, batch) in log.iter().skip((conn.seq - base) as usize).take(MAX_IOV).enumerate() {
        let skip = if k == 0 { conn.off } else { 0 };
        let bytes = &batch[skip..];
        total += bytes.len();
        iov.push(IoSlice::new(bytes));
    }
    // One writev(2) (std caps the count at IOV_MAX, which MAX_IOV does not exceed).
    let mut n = match conn.stream.write_vectored(iov) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            conn.blocked = true;
            return true;
        }
        Err(e) => return e.kind() == io::ErrorKind::Interrupted,
    };
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
