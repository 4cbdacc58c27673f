//! The source thread: the one place replication data enters the process (the first box of
//! the diagram in ARCHITECTURE.md).
//!
//! It runs either the [`UpstreamLink`] to a master (dial with `TCP_NODELAY`, read straight into
//! the link's buffer, write its lines, reconnect forever with [`Backoff`]) or the
//! [`SyntheticSource`], on a tokio current-thread runtime of its own. Every event becomes one
//! message per core, in order: `Batch` → [`CoreMsg::Batch`] (an `Arc` clone, never a copy),
//! `Up` / `Down` → [`CoreMsg::Upstream`]. Commands from the cores arrive on the source's own
//! [`Inbox`] and go to the link (or the generator).
//!
//! # Batching
//!
//! Batches are cut naturally: whatever one upstream read returns becomes one batch at once, so
//! at light load a line reaches the cores one read after it left the master, with no timer in
//! between. Lines coalesce only while a core is busy: while some core's mailbox is full (it has
//! not taken the last [`CORE_MAILBOX`](crate::server::CORE_MAILBOX) message yet) and a message
//! waits behind it in the source's queue for that core, further reads stay uncut in the link's
//! buffer. They are cut into one batch as soon as every such core has taken its message (checked
//! on every read, and every [`HOLD_RETRY`] otherwise), or once [`COALESCE_BYTES`] are held, or
//! once the oldest held read is [`HOLD_MAX`] old, whichever comes first; so a core that stopped
//! taking messages costs the other cores at most [`HOLD_MAX`] of latency, never a stall. A read
//! buffer becomes a batch without a copy either way. The synthetic master cuts its own batches
//! (one per tick, see [`SyntheticSource::tick`]) and then takes the same path.
//!
//! # Back-pressure
//!
//! A core that falls behind never stalls the other cores: a message that does not fit in a
//! core's mailbox waits in a queue the source keeps for that core alone (an `Arc` clone of the
//! batch, not a copy), and the source goes on reading and delivering to everyone else. The
//! source is slowed by exactly one rule: **it stops reading upstream (or generating) while some
//! core's queue in the source holds more than `max_pending_bytes` (the hub's eviction limit,
//! default 64 MiB) of batch data behind a full mailbox**, and resumes as soon as that core has
//! taken enough for the queue to be at or under the limit again. A core that far behind is not
//! being served by its own event loop at all (a running core would have evicted every worker
//! that far behind), so waiting for it bounds memory at cores × `max_pending_bytes` plus the
//! mailboxes, the same bound as the hub's. While stopped the source reads nothing from the
//! master (so the master's socket buffer fills and TCP slows the master) but still takes the
//! cores' commands and answers control requests, a stop included.
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::{Clock, CoreMsg, Inbox};
use crate::config::SourceConfig;
use crate::hub::{CloseHow, HubConfig, UpstreamCmd, UpstreamEvent};
use crate::metrics::snapshot::UpstreamSnapshot;
use crate::proto::StreamId;
use crate::synthetic::SyntheticConfig;
use crate::time::Now;
use crate::upstream::backoff::{Backoff, BackoffConfig};
use crate::upstream::fetch::{Fetch, FetchResult};
use crate::upstream::link::{LinkConfig, LinkEvent, UpstreamLink};
use crate::upstream::SyntheticSource;

mod redis_bridge;

/// How much spare room the upstream read buffer gets when it runs low (below
/// [`READ_MIN_ROOM`]).
const READ_RESERVE: usize = 256 << 10;
/// The upstream read buffer gets new room only once it has less than this left. Each read's
/// batch keeps the buffer it was read into alive: reserving a whole [`READ_RESERVE`] before
/// every read gave every small read (a paced master sends a few KiB at a time) a buffer of its
/// own, and the log held three times the bytes of its lines.
const READ_MIN_ROOM: usize = 16 << 10;
/// Read data held back for a busy core (see the module doc) is cut into a batch once this much
/// is buffered, whether or not the core has caught up.
pub(crate) const COALESCE_BYTES: usize = 64 << 10;
/// How often the source retries a full mailbox while it holds read data or queued messages for
/// a core (a mailbox has no "taken" signal). The timer wheel's 1 ms is the finest tokio offers;
/// every read retries too, so under load the retry is much sooner.
pub(crate) const HOLD_RETRY: Duration = Duration::from_millis(1);
/// Held read data is cut into a batch once the oldest of it is this old, busy core or not.
pub(crate) const HOLD_MAX: Duration = Duration::from_millis(5);
/// Give up dialing after this long (then back off and retry).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default forward-queue bound while the upstream is down.
const MAX_FORWARD_QUEUE: usize = 10_000;
/// At most this many catch-up fetches from a 1.10–1.12 master at once.
const MAX_FETCHES: usize = 4;
/// A catch-up fetch that has not ended after this long fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// One catch-up fetch from a 1.10–1.12 master (see `upstream::fetch`): connect, ask, read the
/// rows until the stream's POSITION, close.
async fn fetch(addr: &str, stream: StreamId, from: i64) -> FetchResult {
    use tokio::io::AsyncBufReadExt;
    let run = async {
        let mut sock = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let _ = sock.set_nodelay(true);
        let (mut state, lines) = Fetch::new(stream, from);
        for line in lines {
            sock.write_all(&line).await.map_err(|e| format!("write: {e}"))?;
        }
        let mut reader = tokio::io::BufReader::new(sock);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 || line.last() != Some(&b'\n') {
                return Err("the master closed the catch-up connection before its POSITION".to_owned());
            }
            line.pop();
            if let Some(done) = state.on_line(&line) {
                return done;
            }
        }
    };
    tokio::time::timeout(FETCH_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| Err("catch-up fetch timed out".to_owned()))
}

/// Control requests for the source thread.
#[derive(Debug)]
pub(crate) enum SourceCtl {
    /// Reply with the upstream's metrics.
    Snapshot(mpsc::Sender<UpstreamSnapshot>),
    /// Reply with what waits in the source for each core (tests).
    #[cfg(test)]
    Queues(mpsc::Sender<QueueReport>),
    /// Stop: close the upstream connection and return.
    Stop,
}

/// What waits in the source for the cores, from `SourceHandle::queues`.
#[cfg(test)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct QueueReport {
    /// Per core: messages queued in the source behind a full mailbox.
    pub messages: Vec<usize>,
    /// Per core: batch bytes among those messages.
    pub bytes: Vec<usize>,
    /// Whether the source has stopped reading because one of those queues is over the limit.
    pub blocked: bool,
    /// Batches handed out so far (each to every core).
    pub batches: u64,
}

/// Everything the source thread starts with.
pub(crate) struct SourceContext {
    /// Where the data comes from.
    pub source: SourceConfig,
    /// The hub settings (timing constants, the configured server name).
    pub hub: HubConfig,
    /// Upstream reconnect delays.
    pub backoff: BackoffConfig,
    /// Every core's mailbox, by core index.
    pub cores: Vec<Inbox<CoreMsg>>,
    /// Commands from the cores (the receiving side of [`SourceHandle::commands`]).
    pub commands: Receiver<(usize, UpstreamCmd)>,
    /// Control requests.
    pub control: Receiver<SourceCtl>,
    /// Wakes the source when `commands` or `control` gets a message.
    pub wakeup: Arc<Notify>,
    /// Set when the source must stop (also checked while waiting on a full mailbox).
    pub stop: Arc<AtomicBool>,
    /// The process clock.
    pub clock: Clock,
    /// Redis mode's shared state (the channel table), when `--resp-listen` is on.
    pub resp: Option<Arc<crate::resp::RespState>>,
    /// Passed once the thread holds its runtime's descriptors (see `start_gate.rs`).
    pub start: super::StartGate,
}

/// The sending side of the source thread's mailboxes. Cloneable and shareable.
#[derive(Clone)]
pub(crate) struct SourceHandle {
    commands: Inbox<(usize, UpstreamCmd)>,
    control: Inbox<SourceCtl>,
    stop: Arc<AtomicBool>,
}

impl SourceHandle {
    /// Mailboxes for a source thread: the handle, and the receiving halves for the context
    /// (`commands`, `control`, `wakeup`, `stop`).
    #[allow(clippy::type_complexity)]
    pub(crate) fn new(
    ) -> (Self, Receiver<(usize, UpstreamCmd)>, Receiver<SourceCtl>, Arc<Notify>, Arc<AtomicBool>) {
        let notify = Arc::new(Notify::new());
        let wake: Arc<dyn Fn() + Send + Sync> = {
            let n = Arc::clone(&notify);
            Arc::new(move || n.notify_one())
        };
        let (commands, commands_rx) = Inbox::new(Arc::clone(&wake));
        let (control, control_rx) = Inbox::new(wake);
        let stop = Arc::new(AtomicBool::new(false));
        (Self { commands, control, stop: Arc::clone(&stop) }, commands_rx, control_rx, notify, stop)
    }

    /// The mailbox the cores send their upstream commands to.
    pub(crate) fn commands(&self) -> Inbox<(usize, UpstreamCmd)> {
        self.commands.clone()
    }

    /// The upstream's metrics, or `None` if the source does not answer within `timeout`.
    pub(crate) fn snapshot(&self, timeout: Duration) -> Option<UpstreamSnapshot> {
        let (tx, rx) = mpsc::channel();
        if !self.control.send(SourceCtl::Snapshot(tx)) {
            return None;
        }
        rx.recv_timeout(timeout).ok()
    }

    /// What waits in the source for each core, or `None` if it does not answer within `timeout`.
    #[cfg(test)]
    pub(crate) fn queues(&self, timeout: Duration) -> Option<QueueReport> {
        let (tx, rx) = mpsc::channel();
        if !self.control.send(SourceCtl::Queues(tx)) {
            return None;
        }
        rx.recv_timeout(timeout).ok()
    }

    /// Asks the source to stop (it closes the upstream connection and returns).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.control.send(SourceCtl::Stop);
    }
}

/// Runs the source on the calling thread until [`SourceHandle::stop`].
pub(crate) fn run(ctx: SourceContext) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    if !ctx.start.ready() {
        return Ok(());
    }
    rt.block_on(async move {
        let queues = ctx.cores.iter().map(|_| CoreQueue::default()).collect();
        let limit = usize::try_from(ctx.hub.max_pending_bytes).unwrap_or(usize::MAX);
        let fetch_permits = Arc::new(tokio::sync::Semaphore::new(MAX_FETCHES));
        let mut src =
            Source { ctx, stopped: false, queues, limit, blocked: false, batches: 0, fetch_permits };
        match src.ctx.source.clone() {
            SourceConfig::Upstream { addr, client_name } => src.run_upstream(&addr, client_name).await,
            SourceConfig::Synthetic { rate, line_size } => src.run_synthetic(rate, line_size).await,
            SourceConfig::None => src.run_broker().await,
            SourceConfig::Redis(redis) => src.run_redis(&redis).await,
        }
        // Dropping the cores' mailboxes is what tells a core whose Shutdown never came to stop.
        drop(src);
        anyhow::Ok(())
    })
}

/// Why a connection to the master ended.
enum ConnEnd {
    /// The socket closed or failed; the text is for the link and the logs.
    Lost(String),
    /// The link asked to close (after its ERROR, or abort after the linger).
    Closed(CloseHow),
    /// The source is stopping.
    Stop,
}

struct Source {
    ctx: SourceContext,
    stopped: bool,
    /// Per core: messages that did not fit in its mailbox, oldest first.
    queues: Vec<CoreQueue>,
    /// The back-pressure limit in bytes per core queue (the hub's `max_pending_bytes`).
    limit: usize,
    /// Set while waiting for a core whose queue is over `limit` (reported by `Queues`).
    blocked: bool,
    /// Batches handed out so far.
    batches: u64,
    /// Catch-up fetches running at once (see [`Source::start_fetch`]).
    fetch_permits: Arc<tokio::sync::Semaphore>,
}

/// What waits in the source for one core.
#[derive(Default)]
struct CoreQueue {
    msgs: VecDeque<CoreMsg>,
    /// Batch bytes in `msgs`.
    bytes: usize,
    /// The core's mailbox is gone (the core stopped): nothing more is queued for it.
    gone: bool,
}

fn msg_bytes(msg: &CoreMsg) -> usize {
    match msg {
        CoreMsg::Batch(b) => b.data().len(),
        _ => 0,
    }
}

/// Something that can take the cores' commands and report metrics.
trait Upstream {
    fn command(&mut self, core: usize, cmd: UpstreamCmd, now: Now);
    fn snapshot(&self) -> UpstreamSnapshot;
}

impl Source {
    fn stopping(&self) -> bool {
        self.stopped || self.ctx.stop.load(Ordering::Relaxed)
    }

    /// Handles every queued command and control request.
    fn drain(&mut self, up: &mut dyn Upstream) {
        while let Ok((core, cmd)) = self.ctx.commands.try_recv() {
            match cmd {
                UpstreamCmd::Fetch { id, stream, from } => self.start_fetch(core, id, stream, from),
                // Redis-mode messages published on a core: to every core, without waiting
                // (see `hand_out`).
                UpstreamCmd::Publish(batch) => self.hand_out(|| CoreMsg::Batch(Arc::clone(&batch.0))),
                cmd => up.command(core, cmd, self.ctx.clock.now()),
            }
        }
        loop {
            match self.ctx.control.try_recv() {
                Ok(SourceCtl::Snapshot(reply)) => {
                    let _ = reply.send(up.snapshot());
                }
                #[cfg(test)]
                Ok(SourceCtl::Queues(reply)) => {
                    let _ = reply.send(self.queue_report());
                }
                Ok(SourceCtl::Stop) | Err(TryRecvError::Disconnected) => {
                    self.stopped = true;
                    return;
                }
                Err(TryRecvError::Empty) => return,
            }
        }
    }

    /// Fetches a stream's rows after `from` from the master on a connection of its own (a
    /// task beside the main connection), and sends them to core `core` as
    /// [`CoreMsg::Fetched`]. At most [`MAX_FETCHES`] run at once; the others wait.
    fn start_fetch(&mut self, core: usize, id: u64, stream: StreamId, from: i64) {
        let Some(inbox) = self.ctx.cores.get(core).cloned() else { return };
        let addr = match &self.ctx.source {
            SourceConfig::Upstream { addr, .. } => Some(addr.clone()),
            SourceConfig::Synthetic { .. } | SourceConfig::Redis(_) | SourceConfig::None => None,
        };
        let permits = Arc::clone(&self.fetch_permits);
        tokio::spawn(async move {
            let result = match addr {
                Some(addr) => {
                    let _permit = permits.acquire().await;
                    fetch(&addr, stream, from).await
                }
                None => Err("no 1.10-1.12 master to fetch from".to_owned()),
            };
            let mut msg = CoreMsg::Fetched { id, result };
            // The core's mailbox may be full: retry, as the source does for batches.
            loop {
                match inbox.try_send(msg) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => return,
                    Err(TrySendError::Full(m)) => {
                        msg = m;
                        tokio::time::sleep(HOLD_RETRY).await;
                    }
                }
            }
        });
    }

    #[cfg(test)]
    fn queue_report(&self) -> QueueReport {
        QueueReport {
            messages: self.queues.iter().map(|q| q.msgs.len()).collect(),
            bytes: self.queues.iter().map(|q| q.bytes).collect(),
            blocked: self.blocked,
            batches: self.batches,
        }
    }

    /// Moves queued messages into the cores' mailboxes while they have room.
    fn flush(&mut self) {
        for (core, q) in self.ctx.cores.iter().zip(&mut self.queues) {
            while let Some(msg) = q.msgs.pop_front() {
                let n = msg_bytes(&msg);
                match core.try_send(msg) {
                    Ok(()) => q.bytes -= n,
                    Err(TrySendError::Full(m)) => {
                        q.msgs.push_front(m);
                        break;
                    }
                    // That core is gone (it failed, or the server is stopping): forget it.
                    Err(TrySendError::Disconnected(_)) => {
                        q.gone = true;
                        q.msgs.clear();
                        q.bytes = 0;
                    }
                }
            }
        }
    }

    /// Whether a core is busy: after moving what fits into the mailboxes, some core still has a
    /// message queued here (its mailbox is full). Read data is held meanwhile (module doc).
    fn busy(&mut self) -> bool {
        self.flush();
        self.queued()
    }

    /// Whether anything waits here for a core (then the source retries on a timer).
    fn queued(&self) -> bool {
        self.queues.iter().any(|q| !q.msgs.is_empty())
    }

    /// Sends one message to every core, in core order. A core whose mailbox is full gets it
    /// queued here; the others get it at once. Then, while some core's queue is over the limit,
    /// waits for that core (the one rule that slows the source). False if the source must stop.
    async fn broadcast(&mut self, up: &mut dyn Upstream, make: impl Fn() -> CoreMsg) -> bool {
        self.hand_out(make);
        while self.queues.iter().any(|q| q.bytes > self.limit) {
            self.blocked = true;
            // No signal says a core took from its mailbox: retry on a short timer, and keep
            // taking commands and control requests (a stop, a scrape) meanwhile.
            tokio::select! {
                () = self.ctx.wakeup.notified() => {}
                () = tokio::time::sleep(HOLD_RETRY) => {}
            }
            self.drain(up);
            if self.stopping() {
                return false;
            }
            self.flush();
        }
        self.blocked = false;
        true
    }

    /// The first half of [`Source::broadcast`], which never waits: one message to every core,
    /// queued here for a core whose mailbox is full. Redis-mode batches take only this half: a
    /// core's PUBLISH is never held back, and what waits here for a stalled core counts toward
    /// the limit that slows the upstream reads.
    fn hand_out(&mut self, make: impl Fn() -> CoreMsg) {
        self.flush();
        for (core, q) in self.ctx.cores.iter().zip(&mut self.queues) {
            if q.gone {
                continue;
            }
            let msg = make();
            if !q.msgs.is_empty() {
                q.bytes += msg_bytes(&msg);
                q.msgs.push_back(msg);
                continue;
            }
            match core.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(m)) => {
                    q.bytes += msg_bytes(&m);
                    q.msgs.push_back(m);
                }
                Err(TrySendError::Disconnected(_)) => q.gone = true,
            }
        }
    }

    /// Waits until `deadline` (monotonic ms) or a message arrives; false if stopping. While
    /// messages wait here for a full mailbox, wakes every [`HOLD_RETRY`] to move them on.
    async fn idle_until(&mut self, up: &mut dyn Upstream, deadline: Option<u64>) -> bool {
        let mut deadline = deadline;
        if self.queued() {
            let retry = self.ctx.clock.now().mono_ms + HOLD_RETRY.as_millis() as u64;
            deadline = Some(deadline.map_or(retry, |d| d.min(retry)));
        }
        let sleep = deadline.map(|ms| tokio::time::Instant::from_std(self.ctx.clock.instant_at(ms)));
        tokio::select! {
            () = self.ctx.wakeup.notified() => {}
            () = async { if let Some(t) = sleep { tokio::time::sleep_until(t).await } else { std::future::pending().await } } => {}
        }
        self.drain(up);
        self.flush();
        !self.stopping()
    }

    // ----------------------------------------------------------------------------------------
    // Upstream mode

    async fn run_upstream(&mut self, addr: &str, client_name: String) {
        let config = LinkConfig {
            client_name,
            expected_server_name: self.ctx.hub.server_name.clone(),
            session: self.ctx.hub.session.clone(),
            max_forward_queue: MAX_FORWARD_QUEUE,
            protocol: self.ctx.hub.protocol,
        };
        let mut link = LinkHolder(UpstreamLink::new(config));
        let seed = u64::from(std::process::id()) ^ self.ctx.clock.now().wall_ms.unsigned_abs();
        let mut backoff = Backoff::new(self.ctx.backoff.clone(), seed);
        loop {
            self.drain(&mut link);
            if self.stopping() {
                return;
            }
            let dial = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr));
            tokio::pin!(dial);
            let connected = loop {
                tokio::select! {
                    res = &mut dial => break match res {
                        Ok(Ok(stream)) => Ok(stream),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("connect timed out".to_owned()),
                    },
                    () = self.ctx.wakeup.notified() => {
                        // Commands while dialing are queued by the link; a stop ends the dial.
                        self.drain(&mut link);
                        if self.stopping() {
                            return;
                        }
                    }
                    // Messages still waiting for a full mailbox move on while we dial.
                    () = tokio::time::sleep(HOLD_RETRY), if self.queued() => self.flush(),
                }
            };
            match connected {
                Ok(stream) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY on the upstream socket failed");
                    }
                    tracing::info!(upstream = addr, "connected to the upstream");
                    link.0.on_connected(self.ctx.clock.now());
                    let end = self.connection(&mut link, stream, &mut backoff).await;
                    let reason = match end {
                        ConnEnd::Lost(why) => why,
                        ConnEnd::Closed(CloseHow::Graceful) => "closed after an error".to_owned(),
                        ConnEnd::Closed(CloseHow::Abort) => "aborted".to_owned(),
                        // Stopping is not a disconnection anyone needs to hear about.
                        ConnEnd::Stop => return,
                    };
                    link.0.on_disconnected(&reason, self.ctx.clock.now());
                    if !self.dispatch(&mut link, &mut backoff).await || self.stopping() {
                        return;
                    }
                }
                Err(e) => {
                    // Loud for the first failures, then about once a minute at the longest delay.
                    let failures = backoff.failures() + 1;
                    if failures <= 3 || failures % 12 == 0 {
                        tracing::warn!(upstream = addr, error = %e, failures, "cannot connect to the upstream");
                    } else {
                        tracing::debug!(upstream = addr, error = %e, failures, "cannot connect to the upstream");
                    }
                }
            }
            let delay = backoff.next_delay_ms();
            tracing::debug!(delay_ms = delay, "reconnecting to the upstream after a delay");
            let until = self.ctx.clock.now().mono_ms + delay;
            loop {
                if !self.idle_until(&mut link, Some(until)).await {
                    return;
                }
                if self.ctx.clock.now().mono_ms >= until {
                    break;
                }
            }
        }
    }

    /// Hands the link's events to the cores. False if the source must stop.
    async fn dispatch(&mut self, link: &mut LinkHolder, backoff: &mut Backoff) -> bool {
        while let Some(event) = link.0.poll_event() {
            let ok = match event {
                LinkEvent::Batch(batch) => {
                    self.batches += 1;
                    self.broadcast(link, || CoreMsg::Batch(Arc::clone(&batch))).await
                }
                LinkEvent::Up(ev) => {
                    backoff.reset();
                    if let UpstreamEvent::Connected { server_name, .. } = &ev {
                        tracing::info!(server_name = server_name.as_str(), "upstream handshake complete");
                    }
                    self.broadcast(link, || CoreMsg::Upstream(ev.clone())).await
                }
                LinkEvent::Down { reason } => {
                    tracing::debug!(reason, "telling the cores the upstream is down");
                    self.broadcast(link, || CoreMsg::Upstream(UpstreamEvent::Disconnected)).await
                }
            };
            if !ok {
                return false;
            }
        }
        true
    }

    /// Runs one connection to the master until it ends.
    async fn connection(
        &mut self,
        link: &mut LinkHolder,
        mut stream: TcpStream,
        backoff: &mut Backoff,
    ) -> ConnEnd {
        let mut out: VecDeque<Bytes> = VecDeque::new();
        let mut out_off = 0usize;
        // Whether read data waits uncut in the link's buffer for a busy core (module doc).
        // When the oldest read still uncut arrived, if any.
        let mut held: Option<tokio::time::Instant> = None;
        loop {
            if let Some(since) = held {
                if link.0.read_buffer().len() >= COALESCE_BYTES || since.elapsed() >= HOLD_MAX || !self.busy()
                {
                    link.0.on_read(self.ctx.clock.now());
                    held = None;
                }
            }
            if !self.dispatch(link, backoff).await {
                return ConnEnd::Stop;
            }
            while let Some(line) = link.0.poll_transmit() {
                out.push_back(line);
            }
            if !out.is_empty() {
                match write_some(&stream, &mut out, &mut out_off) {
                    Ok(true) => link.0.on_sent(self.ctx.clock.now()),
                    Ok(false) => {}
                    Err(e) => return ConnEnd::Lost(format!("write failed: {e}")),
                }
            }
            match link.0.wants_close() {
                Some(CloseHow::Abort) => {
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    return ConnEnd::Closed(CloseHow::Abort);
                }
                Some(CloseHow::Graceful) if out.is_empty() => {
                    let _ = stream.shutdown().await;
                    return ConnEnd::Closed(CloseHow::Graceful);
                }
                _ => {}
            }
            if self.stopping() {
                return ConnEnd::Stop;
            }
            let mut deadline =
                link.0.poll_timeout().map(|ms| tokio::time::Instant::from_std(self.ctx.clock.instant_at(ms)));
            let retry = match held {
                Some(since) => Some(since + HOLD_MAX),
                None if self.queued() => Some(tokio::time::Instant::now() + HOLD_RETRY),
                None => None,
            };
            if let Some(retry) = retry {
                deadline = Some(deadline.map_or(retry, |d| d.min(retry)));
            }
            tokio::select! {
                biased;
                () = self.ctx.wakeup.notified() => self.drain(link),
                res = stream.writable(), if !out.is_empty() => {
                    if let Err(e) = res {
                        return ConnEnd::Lost(format!("write failed: {e}"));
                    }
                }
                res = stream.readable() => {
                    if let Err(e) = res {
                        return ConnEnd::Lost(format!("read failed: {e}"));
                    }
                    let buf = link.0.read_buffer();
                    if buf.capacity() - buf.len() < READ_MIN_ROOM {
                        buf.reserve(READ_RESERVE);
                    }
                    match stream.try_read_buf(buf) {
                        Ok(0) => return ConnEnd::Lost("closed by the upstream".to_owned()),
                        // Cut at once unless a busy core holds it back; the top of the loop
                        // re-checks held data on every turn.
                        Ok(_) => {
                            held.get_or_insert_with(tokio::time::Instant::now);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return ConnEnd::Lost(format!("read failed: {e}")),
                    }
                }
                () = sleep_opt(deadline) => {
                    // Held data and queued messages are retried at the top of the loop.
                    self.flush();
                    link.0.handle_timeout(self.ctx.clock.now());
                }
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Synthetic mode

    async fn run_synthetic(&mut self, rate: u64, line_size: Option<usize>) {
        let server_name = self
            .ctx
            .hub
            .server_name
            .clone()
            .unwrap_or_else(|| crate::config::DEFAULT_SYNTHETIC_SERVER_NAME.to_owned());
        let config =
            SyntheticConfig { rate, pad_to: line_size, ..SyntheticConfig::for_release(self.ctx.hub.release) };
        let mut gen = SynthHolder(SyntheticSource::new(config, server_name));
        gen.0.start(self.ctx.clock.now());
        loop {
            while let Some(event) = gen.0.poll_event() {
                let ok = match event {
                    LinkEvent::Batch(batch) => {
                        self.batches += 1;
                        self.broadcast(&mut gen, || CoreMsg::Batch(Arc::clone(&batch))).await
                    }
                    LinkEvent::Up(ev) => self.broadcast(&mut gen, || CoreMsg::Upstream(ev.clone())).await,
                    LinkEvent::Down { .. } => {
                        self.broadcast(&mut gen, || CoreMsg::Upstream(UpstreamEvent::Disconnected)).await
                    }
                };
                if !ok {
                    return;
                }
            }
            self.drain(&mut gen);
            if self.stopping() {
                return;
            }
            let now = self.ctx.clock.now();
            match gen.0.poll_timeout() {
                Some(at) if at <= now.mono_ms => {
                    gen.0.tick(now);
                    // Let the runtime look at its timers and the mailbox between chunks.
                    tokio::task::yield_now().await;
                }
                deadline => {
                    if !self.idle_until(&mut gen, deadline).await {
                        return;
                    }
                    let now = self.ctx.clock.now();
                    if gen.0.poll_timeout().is_some_and(|at| at <= now.mono_ms) {
                        gen.0.tick(now);
                    }
                }
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // No source (Redis mode alone: replhub as a pub/sub broker)

    async fn run_broker(&mut self) {
        let mut none = NoUpstream;
        while self.idle_until(&mut none, None).await {}
    }
}

/// The source of a pure pub/sub broker: no master, so commands for one are dropped.
struct NoUpstream;

impl Upstream for NoUpstream {
    fn command(&mut self, _core: usize, _cmd: UpstreamCmd, _now: Now) {}
    fn snapshot(&self) -> UpstreamSnapshot {
        UpstreamSnapshot::default()
    }
}

struct LinkHolder(UpstreamLink);

impl Upstream for LinkHolder {
    fn command(&mut self, core: usize, cmd: UpstreamCmd, now: Now) {
        self.0.on_command(core, cmd, now);
    }
    fn snapshot(&self) -> UpstreamSnapshot {
        self.0.snapshot()
    }
}

struct SynthHolder(SyntheticSource);

impl Upstream for SynthHolder {
    fn command(&mut self, core: usize, cmd: UpstreamCmd, now: Now) {
        self.0.on_command(core, cmd, now);
    }
    fn snapshot(&self) -> UpstreamSnapshot {
        self.0.snapshot()
    }
}

async fn sleep_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Writes as much of `out` as the socket takes (one gathered write). True if anything was
/// written; fully written lines are removed, `off` is the written part of the first one.
fn write_some(stream: &TcpStream, out: &mut VecDeque<Bytes>, off: &mut usize) -> io::Result<bool> {
    let iov: Vec<io::IoSlice<'_>> = out
        .iter()
        .enumerate()
        .take(64)
        .map(|(i, b)| io::IoSlice::new(if i == 0 { &b[*off..] } else { &b[..] }))
        .collect();
    let n = match stream.try_write_vectored(&iov) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
        Err(e) => return Err(e),
    };
    drop(iov);
    let mut left = n;
    while left > 0 {
        let Some(first) = out.front() else { break };
        let rest = first.len() - *off;
        if left >= rest {
            left -= rest;
            out.pop_front();
            *off = 0;
        } else {
            *off += left;
            left = 0;
        }
    }
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{Receiver, RecvTimeoutError};
    use std::thread;
    use std::time::Instant;

    use super::*;
    use crate::hub::Batch;

    /// Fails a test that would otherwise hang; never reached when the code is right.
    const PATIENCE: Duration = Duration::from_secs(20);
    const MAILBOX: usize = 4;

    fn no_wake() -> Arc<dyn Fn() + Send + Sync> {
        Arc::new(|| {})
    }

    /// A source context with `n` cores (mailboxes of [`MAILBOX`]) and the given queue limit.
    fn context(
        source: SourceConfig,
        n: usize,
        limit: u64,
    ) -> (SourceContext, SourceHandle, Vec<Receiver<CoreMsg>>) {
        let (handle, commands, control, wakeup, stop) = SourceHandle::new();
        let (cores, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| Inbox::bounded(no_wake(), MAILBOX)).unzip();
        let hub = HubConfig { max_pending_bytes: limit, ..HubConfig::default() };
        let ctx = SourceContext {
            source,
            hub,
            backoff: BackoffConfig::default(),
            cores,
            commands,
            control,
            wakeup,
            stop,
            clock: Clock::new(),
            resp: None,
            start: crate::driver::StartGate::open_now(),
        };
        (ctx, handle, rxs)
    }

    fn batch(len: usize) -> Arc<Batch> {
        Arc::new(Batch::new(Bytes::from(vec![b'x'; len]), Vec::new()))
    }

    /// Drains a core on a thread, forwarding each batch to the returned receiver.
    fn drain_core(rx: Receiver<CoreMsg>) -> Receiver<Arc<Batch>> {
        let (tx, out) = mpsc::channel();
        thread::spawn(move || {
            while let Ok(msg) = rx.recv() {
                if let CoreMsg::Batch(b) = msg {
                    if tx.send(b).is_err() {
                        return;
                    }
                }
            }
        });
        out
    }

    fn recv(rx: &Receiver<Arc<Batch>>) -> Arc<Batch> {
        match rx.recv_timeout(PATIENCE) {
            Ok(b) => b,
            Err(RecvTimeoutError::Timeout) => panic!("no batch within {PATIENCE:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the core's drain ended"),
        }
    }

    /// The hold rule: read data waits only while a core has a message queued behind its full
    /// mailbox, and stops waiting as soon as that core takes one.
    #[test]
    fn reads_are_held_only_while_a_core_has_a_message_behind_a_full_mailbox() {
        let synthetic = SourceConfig::Synthetic { rate: 0, line_size: None };
        let (ctx, _handle, rxs) = context(synthetic, 2, 1 << 20);
        let queues = ctx.cores.iter().map(|_| CoreQueue::default()).collect();
        let fetch_permits = Arc::new(tokio::sync::Semaphore::new(MAX_FETCHES));
        let mut src =
            Source { ctx, stopped: false, queues, limit: 1 << 20, blocked: false, batches: 0, fetch_permits };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut up = SynthHolder(SyntheticSource::new(SyntheticConfig::default(), "s".to_owned()));
        let mut send = |src: &mut Source| {
            let b = batch(10);
            assert!(rt.block_on(src.broadcast(&mut up, || CoreMsg::Batch(Arc::clone(&b)))));
        };

        // Idle cores: every read is cut at once.
        assert!(!src.busy());
        for _ in 0..MAILBOX {
            send(&mut src);
        }
        assert!(!src.busy(), "full mailboxes with nothing queued behind them hold nothing");
        // One message waits behind core 0's and core 1's full mailboxes: hold.
        send(&mut src);
        assert_eq!(src.queue_report().messages, vec![1, 1]);
        assert!(src.busy());
        // Core 0 takes one: its queued message moves in, but core 1 is still busy.
        rxs[0].try_recv().unwrap();
        assert!(src.busy());
        assert_eq!(src.queue_report().messages, vec![0, 1]);
        // Core 1 takes one: nobody is busy any more.
        rxs[1].try_recv().unwrap();
        assert!(!src.busy());
        assert_eq!(src.queue_report().messages, vec![0, 0]);
    }

    /// One core's loop never drains its mailbox. The other cores still get every batch, the
    /// source keeps generating at full speed until that core's queue in the source passes the
    /// limit, and stops exactly there; when the core drains again, it gets every batch in order
    /// and the source resumes.
    #[test]
    // Measures how long the stalled source waits on real threads.
    #[allow(clippy::disallowed_methods)]
    fn a_stalled_core_slows_the_source_only_past_the_limit() {
        const LIMIT: u64 = 256 << 10;
        let synthetic = SourceConfig::Synthetic { rate: 0, line_size: None };
        let (ctx, handle, mut rxs) = context(synthetic, 3, LIMIT);
        let stalled = rxs.remove(1);
        let fast: Vec<_> = rxs.into_iter().map(drain_core).collect();
        let source = thread::spawn(move || run(ctx));

        // Wait (on the source's own reports, not a sleep) until it has stopped for core 1.
        let start = Instant::now();
        let report = loop {
            let r = handle.queues(PATIENCE).expect("the source answers while it waits");
            if r.blocked {
                break r;
            }
            assert!(start.elapsed() < PATIENCE, "the source never stopped for the stalled core");
            thread::yield_now();
        };
        // Nothing is generated while it waits, so this report stays true.
        assert_eq!(handle.queues(PATIENCE).unwrap(), report);

        // The fast cores got every batch handed out, in the same order.
        let seen: Vec<Vec<Arc<Batch>>> =
            fast.iter().map(|rx| (0..report.batches).map(|_| recv(rx)).collect()).collect();
        assert!(seen[0].iter().zip(&seen[1]).all(|(a, b)| Arc::ptr_eq(a, b)));
        assert_eq!(report.messages[0], 0);
        assert_eq!(report.messages[2], 0);

        // Core 1 holds the `Up` message and the first batches in its mailbox; every other
        // batch waits in the source, and those bytes passed the limit with the last batch only.
        let queued = report.messages[1];
        let queued_batches = usize::try_from(report.batches).unwrap() + 1 - MAILBOX;
        assert_eq!(queued, queued_batches);
        let tail = &seen[0][seen[0].len() - queued..];
        let bytes: usize = tail.iter().map(|b| b.data().len()).sum();
        assert_eq!(report.bytes[1], bytes);
        let last = tail.last().unwrap().data().len();
        assert!(bytes as u64 > LIMIT, "stopped at {bytes} bytes, not over the limit {LIMIT}");
        assert!(((bytes - last) as u64) <= LIMIT, "kept reading past the limit: {bytes} bytes queued");

        // The stalled core comes back: it gets the same batches in the same order, and the
        // source hands out new ones again.
        let slow = drain_core(stalled);
        for b in &seen[0] {
            assert!(Arc::ptr_eq(&recv(&slow), b), "the stalled core lost or reordered a batch");
        }
        let next = recv(&fast[0]);
        assert!(Arc::ptr_eq(&recv(&slow), &next));

        handle.stop();
        source.join().unwrap().unwrap();
    }

    /// Upstream mode with one core stalled: every line the master writes reaches the other
    /// cores by itself (one read, one batch), without waiting for the stalled core; the
    /// stalled core's share waits in the source and arrives complete and in order later.
    #[test]
    fn a_stalled_core_does_not_hold_back_upstream_lines_for_the_others() {
        use std::io::Write;

        const LINES: usize = 50;
        let master = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = master.local_addr().unwrap().to_string();
        let upstream = SourceConfig::Upstream { addr, client_name: "test".to_owned() };
        let (ctx, handle, mut rxs) = context(upstream, 3, 64 << 20);
        let stalled = rxs.remove(1);
        let fast: Vec<_> = rxs.into_iter().map(drain_core).collect();
        let source = thread::spawn(move || run(ctx));

        let (go, next) = mpsc::channel::<()>();
        let writer = thread::spawn(move || {
            let (mut sock, _) = master.accept().unwrap();
            sock.write_all(b"SERVER test\nPING 1\nPOSITION events 0\n").unwrap();
            for n in 1..=LINES {
                sock.write_all(format!("RDATA events {n} [\"x\"]\n").as_bytes()).unwrap();
                if next.recv().is_err() {
                    return;
                }
            }
            // Keep the connection open until the test is done.
            let _ = next.recv();
        });

        // Each line is written only after the previous one reached both fast cores.
        let mut seen: Vec<Vec<Arc<Batch>>> = vec![Vec::new(), Vec::new()];
        for n in 1..=LINES {
            let line = format!("RDATA events {n} [\"x\"]\n");
            for (rx, seen) in fast.iter().zip(&mut seen) {
                loop {
                    let b = recv(rx);
                    seen.push(Arc::clone(&b));
                    if (0..b.lines().len()).any(|i| b.line(i) == line.as_bytes()) {
                        break;
                    }
                }
            }
            go.send(()).unwrap();
        }
        assert_eq!(seen[0].len(), LINES, "one read per line, so one batch per line");
        assert!(seen[0].iter().zip(&seen[1]).all(|(a, b)| Arc::ptr_eq(a, b)));

        // The stalled core's mailbox holds `Up` and the first batches; the rest wait for it in
        // the source, which never stopped reading.
        let report = handle.queues(PATIENCE).unwrap();
        assert!(!report.blocked);
        assert_eq!(report.messages[1] + MAILBOX, LINES + 1);
        let slow = drain_core(stalled);
        for b in &seen[0] {
            assert!(Arc::ptr_eq(&recv(&slow), b), "the stalled core lost or reordered a batch");
        }

        handle.stop();
        source.join().unwrap().unwrap();
        drop(go);
        writer.join().unwrap();
    }
}
