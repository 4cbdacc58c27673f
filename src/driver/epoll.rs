//! The portable driver: one tokio current-thread runtime (epoll) per core thread, running that
//! core's [`Hub`] (ARCHITECTURE.md §5).
//!
//! ```text
//!   accept ─► hub.accept ─► one reader task per socket: readable → try_read → hub.on_bytes
//!   mailbox (Notify) ─► drain every CoreMsg: on_batch / on_upstream / snapshot / shutdown
//!   timer (sleep_until hub.poll_timeout) ─► hub.handle_timeout
//!   after every wake-up, one "turn": hub outputs (closes, upstream commands), then one gathered
//!   write per dirty connection (take_dirty → gather → try_write_vectored → on_written),
//!   repeated until nothing is dirty; a short write parks the socket until it is writable.
//! ```
//!
//! The driver holds no protocol logic: what to write, when to close and what to forward all
//! come from the hub. Everything runs on one thread, so the hub lives in a `RefCell` that is
//! only ever borrowed between two awaits; there is no lock or atomic per line.
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{Clock, CoreContext, CoreMsg, CoreWakeup, Inbox};
use crate::hub::{CloseHow, ConnId, Hub, HubOutput, UpstreamCmd};
use crate::metrics::sockq;

/// Bytes read from a worker socket at a time (one buffer per core, reused for every read).
const READ_BUF: usize = 64 << 10;
/// How long a core keeps flushing after `Shutdown` before it drops whatever is left.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed `accept` (e.g. out of file descriptors) so it is not retried hot.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A wake-up for a core running this driver (a tokio `Notify`), and the function that fires it.
pub fn new_wakeup() -> (CoreWakeup, Arc<dyn Fn() + Send + Sync>) {
    let notify = Arc::new(Notify::new());
    let fire = Arc::clone(&notify);
    (CoreWakeup::Notify(notify), Arc::new(move || fire.notify_one()))
}

/// Runs one core on the calling thread until it is told to shut down (or its mailbox is
/// dropped): a current-thread runtime and a `LocalSet` around this core's [`Hub`].
pub fn run_core(ctx: CoreContext) -> anyhow::Result<()> {
    let CoreContext { index, listener, hub, inbox, wakeup, upstream, clock } = ctx;
    let CoreWakeup::Notify(notify) = wakeup else {
        anyhow::bail!("core {index}: the epoll driver needs a Notify wake-up, not an eventfd");
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::from_std(listener)?;
        let core = Rc::new(Core {
            index,
            hub: RefCell::new(Hub::new(hub.clone())),
            conns: RefCell::new(Vec::new()),
            kick: Notify::new(),
            clock,
            read_buf: RefCell::new(vec![0u8; READ_BUF].into_boxed_slice()),
            iov: RefCell::new(Vec::new()),
            dirty: RefCell::new(Vec::new()),
            lingering: RefCell::new(VecDeque::new()),
            close_timeout_ms: hub.session.close_timeout_ms,
            upstream,
            stopping: Cell::new(false),
        });
        core.run(&listener, &inbox, &notify).await;
        core.abort_all();
        anyhow::Ok(())
    })
}

/// One worker socket as the driver holds it.
struct ConnIo {
    id: ConnId,
    stream: Rc<TcpStream>,
    reader: JoinHandle<()>,
    /// Waiting for the socket to become writable after a short write.
    writer: Option<JoinHandle<()>>,
    /// The write side was shut down (graceful close): only reading until EOF remains.
    shut: bool,
}

struct Core {
    index: usize,
    hub: RefCell<Hub>,
    /// By `ConnId::index`.
    conns: RefCell<Vec<Option<ConnIo>>>,
    /// Something changed (bytes read, a socket writable, a connection gone): run a turn.
    kick: Notify,
    clock: Clock,
    read_buf: RefCell<Box<[u8]>>,
    /// The iovec list, its allocation reused for every write.
    iov: RefCell<Vec<IoSlice<'static>>>,
    dirty: RefCell<Vec<ConnId>>,
    /// Gracefully closed sockets and when to give up waiting for their EOF (monotonic ms).
    lingering: RefCell<VecDeque<(u64, ConnId)>>,
    close_timeout_ms: u64,
    upstream: Inbox<(usize, UpstreamCmd)>,
    stopping: Cell<bool>,
}

/// Empties a vector of slices and hands back its allocation with a new (unrelated) lifetime,
/// so one iovec buffer serves writes that borrow different data.
fn recycle<'b>(mut v: Vec<IoSlice<'_>>) -> Vec<IoSlice<'b>> {
    v.clear();
    v.into_iter().map(|_| -> IoSlice<'b> { unreachable!("the vector is empty") }).collect()
}

impl Core {
    async fn run(self: &Rc<Self>, listener: &TcpListener, inbox: &Receiver<CoreMsg>, notify: &Notify) {
        let mut stop_at: Option<tokio::time::Instant> = None;
        let mut accept_pause: Option<tokio::time::Instant> = None;
        loop {
            let deadline = self.next_deadline(stop_at);
            let accepting = accept_pause.is_none_or(|t| tokio::time::Instant::now() >= t);
            tokio::select! {
                biased;
                res = listener.accept(), if accepting => match res {
                    Ok((stream, _peer)) => {
                        accept_pause = None;
                        self.register(stream);
                    }
                    Err(e) => {
                        tracing::warn!(core = self.index, error = %e, "accept failed");
                        accept_pause = Some(tokio::time::Instant::now() + ACCEPT_BACKOFF);
                    }
                },
                () = notify.notified() => {}
                () = self.kick.notified() => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
            if !self.drain_inbox(inbox) && stop_at.is_none() {
                stop_at = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
            }
            self.on_timers();
            self.turn();
            if let Some(t) = stop_at {
                if self.hub.borrow().is_empty() {
                    break;
                }
                if tokio::time::Instant::now() >= t {
                    tracing::warn!(
                        core = self.index,
                        left = self.hub.borrow().len(),
                        "shutdown grace expired; dropping the remaining connections"
                    );
                    break;
                }
            }
        }
    }

    /// When the loop must wake up at the latest: the hub's tick, the oldest close linger, the
    /// end of the shutdown grace.
    fn next_deadline(&self, stop_at: Option<tokio::time::Instant>) -> tokio::time::Instant {
        let mut ms = self.hub.borrow().poll_timeout();
        if let Some((at, _)) = self.lingering.borrow().front() {
            ms = ms.min(*at);
        }
        let mut t = tokio::time::Instant::from_std(self.clock.instant_at(ms));
        if let Some(stop) = stop_at {
            t = t.min(stop);
        }
        t
    }

    /// Handles every queued message (batches coalesce into one flush). Returns false once the
    /// core should stop: `Shutdown` received or the mailbox gone.
    fn drain_inbox(&self, inbox: &Receiver<CoreMsg>) -> bool {
        loop {
            let msg = match inbox.try_recv() {
                Ok(msg) => msg,
                Err(TryRecvError::Empty) => return !self.stopping.get(),
                Err(TryRecvError::Disconnected) => {
                    if !self.stopping.get() {
                        tracing::info!(core = self.index, "mailbox closed; shutting down");
                        self.begin_shutdown();
                    }
                    return false;
                }
            };
            let now = self.clock.now();
            match msg {
                CoreMsg::Batch(batch) => self.hub.borrow_mut().on_batch(batch, now),
                CoreMsg::Upstream(event) => self.hub.borrow_mut().on_upstream(&event, now),
                CoreMsg::Snapshot(reply) => {
                    let conns = self.conns.borrow();
                    let snap = self.hub.borrow().snapshot(self.index, |id| {
                        let Some(io) = conns.get(id.index as usize).and_then(Option::as_ref) else {
                            return (0, 0);
                        };
                        if io.id != id {
                            return (0, 0);
                        }
                        let fd = io.stream.as_raw_fd();
                        let outq = sockq::send_queue(fd).map_or(0, u64::from);
                        let inq = sockq::recv_queue(fd).map_or(0, u64::from);
                        (outq, inq)
                    });
                    // The scraper may have given up waiting; that is fine.
                    let _ = reply.send(snap);
                }
                CoreMsg::Shutdown => self.begin_shutdown(),
            }
        }
    }

    fn begin_shutdown(&self) {
        if !self.stopping.replace(true) {
            tracing::debug!(core = self.index, "shutting down");
            self.hub.borrow_mut().shutdown(self.clock.now());
        }
    }

    fn on_timers(&self) {
        let now = self.clock.now();
        self.hub.borrow_mut().handle_timeout(now);
        loop {
            let front = self.lingering.borrow().front().copied();
            let Some((at, id)) = front else { break };
            if at > now.mono_ms {
                break;
            }
            self.lingering.borrow_mut().pop_front();
            if self.is_live(id) {
                tracing::info!(core = self.index, conn = %id, "no EOF after close; aborting");
                self.abort(id);
            }
        }
    }

    fn is_live(&self, id: ConnId) -> bool {
        self.conns.borrow().get(id.index as usize).and_then(Option::as_ref).is_some_and(|io| io.id == id)
    }

    /// A new worker socket.
    fn register(self: &Rc<Self>, stream: TcpStream) {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(core = self.index, error = %e, "TCP_NODELAY failed");
        }
        let id = self.hub.borrow_mut().accept(self.clock.now());
        let stream = Rc::new(stream);
        let reader = tokio::task::spawn_local(Rc::clone(self).read_loop(id, Rc::clone(&stream)));
        let io = ConnIo { id, stream, reader, writer: None, shut: false };
        let mut conns = self.conns.borrow_mut();
        let i = id.index as usize;
        if conns.len() <= i {
            conns.resize_with(i + 1, || None);
        }
        if let Some(old) = conns[i].replace(io) {
            // The hub reused a slot whose socket we still hold: it forgot that connection.
            tracing::error!(
                core = self.index,
                conn = %old.id,
                "slot reused while its socket was open"
            );
            old.reader.abort();
            if let Some(w) = old.writer {
                w.abort();
            }
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
                    self.hub.borrow_mut().on_bytes(id, &buf[..n], self.clock.now());
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
        self.forget(id);
        self.hub.borrow_mut().on_peer_closed(id, lost, self.clock.now());
        self.kick.notify_one();
    }

    /// Drops the driver's hold on a socket (the hub is told separately).
    fn forget(&self, id: ConnId) -> Option<ConnIo> {
        let mut conns = self.conns.borrow_mut();
        let slot = conns.get_mut(id.index as usize)?;
        if slot.as_ref().is_some_and(|io| io.id == id) {
            let io = slot.take()?;
            if let Some(w) = &io.writer {
                w.abort();
            }
            Some(io)
        } else {
            None
        }
    }

    /// Resets the connection (RST) and tells the hub it is gone.
    fn abort(&self, id: ConnId) {
        if let Some(io) = self.forget(id) {
            let _ = socket2::SockRef::from(&*io.stream).set_linger(Some(Duration::ZERO));
            io.reader.abort();
        }
        self.hub.borrow_mut().on_peer_closed(id, false, self.clock.now());
    }

    /// Drops every socket left (end of shutdown) with a reset.
    fn abort_all(&self) {
        let ids: Vec<ConnId> = self.conns.borrow().iter().flatten().map(|io| io.id).collect();
        for id in ids {
            self.abort(id);
        }
        while self.hub.borrow_mut().poll_output().is_some() {}
    }

    /// One loop turn's work: hub outputs, then gathered writes for every dirty connection,
    /// until neither is left.
    fn turn(self: &Rc<Self>) {
        let mut dirty = std::mem::take(&mut *self.dirty.borrow_mut());
        loop {
            let mut any = false;
            loop {
                let out = self.hub.borrow_mut().poll_output();
                let Some(out) = out else { break };
                any = true;
                self.on_output(out);
            }
            self.hub.borrow_mut().take_dirty(&mut dirty);
            if dirty.is_empty() && !any {
                break;
            }
            for id in dirty.drain(..) {
                self.write(id);
            }
        }
        *self.dirty.borrow_mut() = dirty;
    }

    fn on_output(&self, out: HubOutput) {
        match out {
            HubOutput::Upstream(cmd) => {
                if !self.upstream.send((self.index, cmd)) {
                    tracing::debug!(core = self.index, "source thread gone; command dropped");
                }
            }
            HubOutput::Close { conn, how: CloseHow::Abort } => self.abort(conn),
            HubOutput::Close { conn, how: CloseHow::Graceful } => {
                let now = self.clock.now();
                let shut = {
                    let mut conns = self.conns.borrow_mut();
                    match conns.get_mut(conn.index as usize).and_then(Option::as_mut) {
                        Some(io) if io.id == conn => {
                            io.shut = true;
                            socket2::SockRef::from(&*io.stream).shutdown(Shutdown::Write)
                        }
                        // Already gone (EOF raced with the close): nothing to do.
                        _ => return,
                    }
                };
                match shut {
                    Ok(()) => {
                        let at = now.mono_ms + self.close_timeout_ms;
                        self.lingering.borrow_mut().push_back((at, conn));
                    }
                    Err(e) => {
                        tracing::debug!(core = self.index, conn = %conn, error = %e, "shutdown failed");
                        if let Some(io) = self.forget(conn) {
                            io.reader.abort();
                        }
                        self.hub.borrow_mut().on_peer_closed(conn, true, now);
                    }
                }
            }
        }
    }

    /// One gathered write for `id`.
    fn write(self: &Rc<Self>, id: ConnId) {
        let stream = {
            let conns = self.conns.borrow();
            match conns.get(id.index as usize).and_then(Option::as_ref) {
                Some(io) if io.id == id && !io.shut => Rc::clone(&io.stream),
                _ => return,
            }
        };
        let now = self.clock.now();
        let mut hub = self.hub.borrow_mut();
        let mut iov = recycle(std::mem::take(&mut *self.iov.borrow_mut()));
        let len = hub.gather(id, &mut iov);
        if len == 0 {
            *self.iov.borrow_mut() = recycle(iov);
            return;
        }
        let res = stream.try_write_vectored(&iov);
        *self.iov.borrow_mut() = recycle(iov);
        match res {
            Ok(n) => {
                hub.on_written(id, n, now);
                drop(hub);
                if n < len {
                    self.wait_writable(id, stream);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                hub.on_written(id, 0, now);
                drop(hub);
                self.wait_writable(id, stream);
            }
            Err(e) => {
                tracing::debug!(core = self.index, conn = %id, error = %e, "write failed");
                hub.on_written(id, 0, now);
                drop(hub);
                if let Some(io) = self.forget(id) {
                    io.reader.abort();
                }
                self.hub.borrow_mut().on_peer_closed(id, true, now);
            }
        }
    }

    /// Parks a full socket until it is writable, then hands it back to the hub.
    fn wait_writable(self: &Rc<Self>, id: ConnId, stream: Rc<TcpStream>) {
        let core = Rc::clone(self);
        let task = tokio::task::spawn_local(async move {
            // An error shows up again on the next write, which then closes the connection.
            let _ = stream.writable().await;
            core.hub.borrow_mut().on_writable(id);
            core.kick.notify_one();
        });
        let mut conns = self.conns.borrow_mut();
        match conns.get_mut(id.index as usize).and_then(Option::as_mut) {
            Some(io) if io.id == id => {
                if let Some(old) = io.writer.replace(task) {
                    old.abort();
                }
            }
            _ => task.abort(),
        }
    }
}
