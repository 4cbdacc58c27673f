//! The portable driver: one tokio current-thread runtime (epoll) per core thread, running that
//! core's [`Hub`] (ARCHITECTURE.md §5).
//!
//! ```text
//!   accept ─► hub.accept ─► one reader task per socket: readable → try_read → hub.on_bytes
//!   mailbox (Notify) ─► CoreLoop::drain_inbox
//!   timer (sleep_until hub.poll_timeout) ─► hub.handle_timeout
//!   after every wake-up, one CoreLoop::turn: hub outputs, then one gathered write per dirty
//!   connection (Sockets::write = try_write_vectored); a short write parks the socket until
//!   it is writable.
//! ```
//!
//! The driver holds only the sockets: what to write, when to close and what to forward all
//! come from the hub, through the loop shared with io_uring (`driver::core_loop`). Everything
//! runs on one thread, so the loop lives in a `RefCell` that is only ever borrowed between two
//! awaits; there is no lock or atomic per line.
use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::core_loop::{
    peer_name, tune_worker_socket, CoreLoop, FailureLog, Sockets, Write, ACCEPT_LOG_INTERVAL_MS,
};
use super::hold_timer::HoldTimer;
use super::{Adopted, CoreContext, CoreMsg, CoreWakeup};
use crate::config::ModerationConfig;
use crate::hub::{CloseHow, ConnId, Hub, SlotMap};
use crate::time::Now;

/// Bytes read from a worker socket at a time (one buffer per core, reused for every read).
const READ_BUF: usize = 64 << 10;
/// Pause after a failed `accept` (e.g. out of file descriptors) so it is not retried hot.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A wake-up for a core running this driver (a tokio `Notify`), and the function that fires it.
pub(crate) fn new_wakeup() -> (CoreWakeup, Arc<dyn Fn() + Send + Sync>) {
    let notify = Arc::new(Notify::new());
    let fire = Arc::clone(&notify);
    (CoreWakeup::Notify(notify), Arc::new(move || fire.notify_one()))
}

/// Runs one core on the calling thread until it is told to shut down (or its mailbox is
/// dropped): a current-thread runtime and a `LocalSet` around this core's [`Hub`].
pub(crate) fn run_core(ctx: CoreContext) -> anyhow::Result<()> {
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
        start,
        peers,
        balance,
        hosted_source,
    } = ctx;
    let CoreWakeup::Notify(notify) = wakeup else {
        anyhow::bail!("core {index}: the epoll driver needs a Notify wake-up, not an eventfd");
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    if !start.ready() {
        return Ok(());
    }
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::from_std(listener)?;
        // The end of each write moderation window; without one, no moderation.
        let hold_timer = match HoldTimer::new() {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(core = index, error = %e, "no timerfd: write moderation is off on this core");
                None
            }
        };
        let moderation = if hold_timer.is_some() { moderation } else { ModerationConfig::OFF };
        let mut core_loop = CoreLoop::new(index, hub, upstream, clock, worker_notsent_lowat, peers, idle)
            .with_moderation(moderation)
            .with_balance(balance);
        let resp_listener = match resp {
            Some((l, state)) => {
                core_loop.hub.set_resp(state);
                Some(TcpListener::from_std(l)?)
            }
            None => None,
        };
        let core = Rc::new(Core {
            index,
            core: RefCell::new(core_loop),
            conns: RefCell::new(SlotMap::new()),
            kick: Notify::new(),
            read_buf: RefCell::new(vec![0u8; READ_BUF].into_boxed_slice()),
            worker_sndbuf,
            worker_notsent_lowat,
        });
        let run = core.run(&listener, resp_listener.as_ref(), &inbox, &notify, hold_timer);
        match hosted_source {
            None => run.await,
            Some(hosted) => {
                // The source ends first when the server stops (it is told before the cores);
                // this core then serves until its own Shutdown, as beside a source thread.
                let mut source = hosted.spawn_local();
                tokio::pin!(run);
                tokio::select! {
                    () = &mut run => {}
                    failed = source.ended() => {
                        if let Some(e) = failed {
                            core.abort_all();
                            return Err(e);
                        }
                        run.await;
                    }
                }
            }
        }
        core.abort_all();
        anyhow::Ok(())
    })
}

/// One worker socket as the driver holds it.
struct ConnIo {
    stream: Rc<TcpStream>,
    reader: JoinHandle<()>,
    /// Waiting for the socket to become writable after a short write.
    writer: Option<JoinHandle<()>>,
    /// The write side was shut down (graceful close): only reading until EOF remains.
    shut: bool,
}

impl ConnIo {
    /// Stops the socket's tasks (dropping the `ConnIo` then closes the socket).
    fn stop(&self) {
        self.reader.abort();
        if let Some(w) = &self.writer {
            w.abort();
        }
    }
}

struct Core {
    index: usize,
    core: RefCell<CoreLoop>,
    /// The sockets, under the hub's ids.
    conns: RefCell<SlotMap<ConnIo>>,
    /// Something changed (bytes read, a socket writable, a connection gone): run a turn.
    kick: Notify,
    read_buf: RefCell<Box<[u8]>>,
    /// SO_SNDBUF for accepted sockets (0: the kernel's).
    worker_sndbuf: usize,
    /// TCP_NOTSENT_LOWAT for accepted sockets (0: unset).
    worker_notsent_lowat: usize,
}

/// The sockets as the shared loop sees them during one turn.
struct Io<'a> {
    core: &'a Rc<Core>,
    conns: &'a mut SlotMap<ConnIo>,
}

impl Sockets for Io<'_> {
    fn fd(&self, id: ConnId) -> Option<RawFd> {
        self.conns.get(id).map(|io| io.stream.as_raw_fd())
    }

    fn can_write(&self, id: ConnId) -> bool {
        self.conns.get(id).is_some_and(|io| !io.shut)
    }

    fn write(&mut self, id: ConnId, iov: &[IoSlice<'_>], _len: usize) -> Write {
        match self.conns.get(id) {
            Some(io) => Write::Done(io.stream.try_write_vectored(iov)),
            None => Write::Done(Ok(0)),
        }
    }

    /// Parks a full socket until it is writable, then hands it back to the hub.
    fn wait_writable(&mut self, _hub: &mut Hub, id: ConnId) {
        let Some(io) = self.conns.get_mut(id) else { return };
        let stream = Rc::clone(&io.stream);
        let core = Rc::clone(self.core);
        let task = tokio::task::spawn_local(async move {
            // An error shows up again on the next write, which then closes the connection.
            let _ = stream.writable().await;
            core.core.borrow_mut().hub.on_writable(id);
            core.kick.notify_one();
        });
        if let Some(old) = io.writer.replace(task) {
            old.abort();
        }
    }

    fn close(&mut self, hub: &mut Hub, id: ConnId, how: CloseHow, now: Now) {
        match how {
            CloseHow::Abort => abort(self.conns, hub, id, now),
            CloseHow::Graceful => {
                // Already gone (EOF raced with the close): nothing to do.
                let Some(io) = self.conns.get_mut(id) else { return };
                io.shut = true;
                if let Err(e) = socket2::SockRef::from(&*io.stream).shutdown(Shutdown::Write) {
                    tracing::debug!(core = self.core.index, conn = %id, error = %e, "shutdown failed");
                    self.lost(hub, id, now);
                }
            }
        }
    }

    fn lost(&mut self, hub: &mut Hub, id: ConnId, now: Now) {
        if let Some(io) = self.conns.remove(id) {
            io.stop();
        }
        hub.on_peer_closed(id, true, now);
    }
}

/// Resets the connection (RST) and tells the hub it is gone.
fn abort(conns: &mut SlotMap<ConnIo>, hub: &mut Hub, id: ConnId, now: Now) {
    if let Some(io) = conns.remove(id) {
        let _ = socket2::SockRef::from(&*io.stream).set_linger(Some(Duration::ZERO));
        io.stop();
    }
    hub.on_peer_closed(id, false, now);
}

impl Core {
    async fn run(
        self: &Rc<Self>,
        listener: &TcpListener,
        resp: Option<&TcpListener>,
        inbox: &Receiver<CoreMsg>,
        notify: &Notify,
        mut hold_timer: Option<HoldTimer>,
    ) {
        let mut accept_pause: Option<tokio::time::Instant> = None;
        let mut accept_errors = FailureLog::new(ACCEPT_LOG_INTERVAL_MS);
        loop {
            let deadline = self.next_deadline();
            // While write moderation holds the mailbox back, its wake-ups wait: the timer
            // ends the window and the turn after it takes the mailbox.
            let held = self.core.borrow().held();
            if let (Some(hold), Some(t)) = (held, hold_timer.as_mut()) {
                t.set(hold.until_us, hold.left);
            }
            let accepting = accept_pause.is_none_or(|t| tokio::time::Instant::now() >= t);
            tokio::select! {
                biased;
                res = listener.accept(), if accepting => match res {
                    Ok((stream, _peer)) => {
                        accept_pause = None;
                        accept_errors.log_accept_success(self.index, self.core.borrow().now().mono_ms);
                        self.accepted(stream, None);
                    }
                    Err(e) => {
                        accept_errors.log_accept_failure(self.index, self.core.borrow().now().mono_ms, &e);
                        accept_pause = Some(tokio::time::Instant::now() + ACCEPT_BACKOFF);
                    }
                },
                res = async {
                    match resp {
                        Some(l) => l.accept().await,
                        None => std::future::pending().await,
                    }
                }, if accepting && resp.is_some() => match res {
                    Ok((stream, peer)) => {
                        accept_pause = None;
                        self.accepted(stream, Some(peer.to_string()));
                    }
                    Err(e) => {
                        accept_errors.log_accept_failure(self.index, self.core.borrow().now().mono_ms, &e);
                        accept_pause = Some(tokio::time::Instant::now() + ACCEPT_BACKOFF);
                    }
                },
                () = notify.notified(), if held.is_none() => {}
                () = async {
                    match hold_timer.as_mut() {
                        Some(t) => t.fired().await,
                        None => std::future::pending().await,
                    }
                }, if held.is_some() => {}
                () = self.kick.notified() => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
            let Some(more) = self.turn(inbox) else { break };
            if more {
                // Writes wait for the next turn: let the reader and writer tasks and the
                // reactor run first (the turn was cut short for them), then come straight back.
                self.kick.notify_one();
                tokio::task::yield_now().await;
            }
        }
    }

    /// One loop turn: the mailbox, the timers, the writes. Returns whether writes wait for the
    /// next turn, or `None` once the core is done (shut down, and empty or out of grace).
    fn turn(self: &Rc<Self>, inbox: &Receiver<CoreMsg>) -> Option<bool> {
        let (now, adopted) = {
            let mut core = self.core.borrow_mut();
            let mut conns = self.conns.borrow_mut();
            let io = Io { core: self, conns: &mut conns };
            let now = core.now();
            core.drain_inbox(inbox, &io, now);
            (now, core.take_adopted())
        };
        for socket in adopted {
            self.adopt(socket);
        }
        let mut core = self.core.borrow_mut();
        let mut conns = self.conns.borrow_mut();
        let mut io = Io { core: self, conns: &mut conns };
        core.hub.handle_timeout(now);
        core.turn(&mut io, now);
        if let Some(stop_at) = core.stop_at_ms() {
            if core.hub.is_empty() {
                return None;
            }
            if core.now().mono_ms >= stop_at {
                tracing::warn!(
                    core = self.index,
                    left = core.hub.len(),
                    "shutdown grace expired; dropping the remaining connections"
                );
                return None;
            }
        }
        Some(core.has_writes())
    }

    /// When the loop must wake up at the latest: the hub's tick, the end of the shutdown grace.
    fn next_deadline(&self) -> tokio::time::Instant {
        let core = self.core.borrow();
        let ms = core.hub.poll_timeout().min(core.stop_at_ms().unwrap_or(u64::MAX)).min(core.mail_retry_ms());
        tokio::time::Instant::from_std(core.clock().instant_at(ms))
    }

    /// A connection accepted on this core's worker listener, or on its Redis-mode one (with
    /// the client's address): registered here, or handed to a core with fewer connections
    /// (`balance`) before anything is read from it.
    fn accepted(self: &Rc<Self>, stream: TcpStream, resp_peer: Option<String>) {
        let to = self.core.borrow_mut().placement();
        if to == self.index {
            return self.register(stream, resp_peer);
        }
        let resp = resp_peer.is_some();
        let socket = match stream.into_std() {
            Ok(s) => Adopted { fd: s.into(), resp },
            Err(e) => {
                // Not expected: taking a socket out of the reactor cannot fail once it is in.
                tracing::warn!(core = self.index, error = %e, "cannot hand a connection over; closing it");
                self.core.borrow_mut().keep_placed(to);
                return;
            }
        };
        let refused = self.core.borrow_mut().hand_off(to, socket);
        if let Err(socket) = refused {
            self.adopt(socket);
        }
    }

    /// A socket handed over by another core, or one this core could not hand over.
    fn adopt(self: &Rc<Self>, socket: Adopted) {
        let std = std::net::TcpStream::from(socket.fd);
        let stream = std.set_nonblocking(true).and_then(|()| TcpStream::from_std(std));
        match stream {
            Ok(stream) => {
                let peer = socket.resp.then(|| peer_name(socket2::SockRef::from(&stream)));
                self.register(stream, peer);
            }
            Err(e) => {
                tracing::warn!(core = self.index, error = %e, "cannot register a connection handed over")
            }
        }
    }

    /// A new worker socket, or a Redis-mode client's (with its peer address).
    fn register(self: &Rc<Self>, stream: TcpStream, resp_peer: Option<String>) {
        let mut core = self.core.borrow_mut();
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(core = self.index, error = %e, "TCP_NODELAY failed");
        }
        tune_worker_socket(
            self.index,
            socket2::SockRef::from(&stream),
            self.worker_sndbuf,
            self.worker_notsent_lowat,
        );
        let now = core.now();
        let id = match resp_peer {
            Some(peer) => core.hub.accept_resp(peer, now),
            None => core.hub.accept(now),
        };
        let stream = Rc::new(stream);
        let reader = tokio::task::spawn_local(Rc::clone(self).read_loop(id, Rc::clone(&stream)));
        let io = ConnIo { stream, reader, writer: None, shut: false };
        if let Some((old, io)) = self.conns.borrow_mut().insert(id, io) {
            // The hub reused a slot whose socket we still hold: it forgot that connection.
            tracing::error!(core = self.index, conn = %old, "slot reused while its socket was open");
            io.stop();
        }
    }

    /// Reads a worker socket until EOF or an error, feeding the hub; then forgets the socket.
    async fn read_loop(self: Rc<Self>, id: ConnId, stream: Rc<TcpStream>) {
        let lost = loop {
            if let Err(e) = stream.readable().await {
                tracing::debug!(core = self.index, conn = %id, error = %e, "readable failed");
                break true;
            }
            let mut buf = self.read_buf.borrow_mut();
            match stream.try_read(&mut buf) {
                Ok(0) => break false,
                Ok(n) => {
                    // After a graceful close the hub reads nothing more; it discards the bytes.
                    let mut core = self.core.borrow_mut();
                    let now = core.now();
                    core.hub.on_bytes(id, &buf[..n], now);
                    drop(buf);
                    self.kick.notify_one();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::debug!(core = self.index, conn = %id, error = %e, "read failed");
                    break true;
                }
            }
        };
        if let Some(io) = self.conns.borrow_mut().remove(id) {
            // This task is ending anyway; only the writer is left to stop.
            if let Some(w) = io.writer {
                w.abort();
            }
        }
        let mut core = self.core.borrow_mut();
        let now = core.now();
        core.hub.on_peer_closed(id, lost, now);
        self.kick.notify_one();
    }

    /// Drops every socket left (end of shutdown) with a reset.
    fn abort_all(&self) {
        let mut core = self.core.borrow_mut();
        let mut conns = self.conns.borrow_mut();
        let now = core.now();
        let ids: Vec<ConnId> = conns.ids().collect();
        for id in ids {
            abort(&mut conns, &mut core.hub, id, now);
        }
        core.flush_upstream();
    }
}
