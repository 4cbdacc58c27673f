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
//! between. A busy core takes every batch waiting in its mailbox in one turn and writes each
//! connection once for all of them, so under load lines coalesce at the core; and a core whose
//! fan-out one line at a time would make `--coalesce-above` writes a second or more takes its
//! mailbox at most once per `--coalesce-window` (`driver::moderation`). Lines coalesce
//! in the source only while a core is far behind: while some core's mailbox is full (it has
//! not taken the last [`CORE_MAILBOX`](crate::server::CORE_MAILBOX) messages yet) and a
//! message waits behind them in the source's queue for that core, further reads stay uncut in
//! the link's buffer. They are cut into one batch as soon as every such core has taken its message (checked
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
//!
//! Redis-mode messages (the cores' PUBLISH batches) are handed out by the publishing core
//! itself, with the same [`Outgoing`] queues and rules (`CoreLoop::publish`); the source only
//! relays the Redis bridge's. They are never held back: a publisher does not wait for a stalled
//! core, as Redis never makes a publisher wait for a slow subscriber. Their queue for a core is bounded by the same
//! `max_pending_bytes` all the same: a batch that would take it past that is dropped for
//! that core alone, and a [`CoreMsg::PublishLost`] takes its place in the core's order,
//! naming the channels it carried. The core, when it gets there, cuts off its subscribers of
//! those channels (the hub's `on_publish_lost`), as Redis cuts off a subscriber over its
//! `client-output-buffer-limit pubsub`: each message still reaches each subscriber once, or
//! the subscriber is disconnected, never silently skipped. The drops are counted in
//! `replhub_resp_batches_dropped_total`.
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::{Clock, CoreMsg, Inbox};
use crate::config::SourceConfig;
use crate::hub::{CloseHow, HubConfig, UpstreamCmd, UpstreamEvent};
use crate::metrics::snapshot::UpstreamSnapshot;
use crate::synthetic::SyntheticConfig;
use crate::time::Now;
use crate::upstream::backoff::{Backoff, BackoffConfig};
use crate::upstream::link::{LinkConfig, LinkEvent, UpstreamLink};
use crate::upstream::SyntheticSource;

use super::outgoing::Outgoing;
use fetch::MAX_FETCHES;

mod broker;
mod fetch;
mod queues;
mod redis_bridge;
#[cfg(test)]
mod tests;

use crate::tls::RedisTlsConnector;

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
    /// Per core: Redis-mode batches dropped because its queue was at the limit.
    pub dropped: Vec<u64>,
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
    /// TLS for a `rediss://` upstream, built when the server starts.
    pub redis_tls: Option<RedisTlsConnector>,
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
    rt.block_on(serve(ctx))
}

/// The source's work until [`SourceHandle::stop`], on the current tokio runtime: its own
/// thread's ([`run`]), or a core's ([`super::HostedSource`]).
pub(crate) async fn serve(ctx: SourceContext) -> anyhow::Result<()> {
    let mut src = Source::new(ctx);
    match src.ctx.source.clone() {
        SourceConfig::Upstream { addr, client_name } => src.run_upstream(&addr, client_name).await,
        SourceConfig::Synthetic { rate, line_size } => src.run_synthetic(rate, line_size).await,
        SourceConfig::None => src.run_broker().await,
        SourceConfig::Redis(redis) => src.run_redis(&redis).await,
    }
    // Dropping the cores' mailboxes is what tells a core whose Shutdown never came to stop.
    drop(src);
    Ok(())
}

/// Why a connection to the master ended.
enum ConnEnd {
    /// The socket closed or failed; the text is for the link and the logs.
    Lost(String),
    /// The link asked to close (after its ERROR, or abort after the linger).
    Closed(CloseHow),
    /// No connection came up: the connect, the TLS handshake or AUTH failed.
    Unreachable(String),
    /// The source is stopping.
    Stop,
}

struct Source {
    ctx: SourceContext,
    stopped: bool,
    /// Per core: messages that did not fit in its mailbox, oldest first, and the back-pressure
    /// limit in bytes per core queue (the hub's `max_pending_bytes`).
    queues: Outgoing,
    /// Set while waiting for a core whose queue is over `limit` (reported by `Queues`).
    blocked: bool,
    /// Batches handed out so far.
    batches: u64,
    /// Catch-up fetches running at once (see [`Source::start_fetch`]).
    fetch_permits: Arc<tokio::sync::Semaphore>,
    /// Attempts to connect upstream that failed, over the life of the process.
    connect_failures: u64,
}

/// Something that can take the cores' commands and report metrics.
trait Upstream {
    fn command(&mut self, core: usize, cmd: UpstreamCmd, now: Now);
    fn snapshot(&self) -> UpstreamSnapshot;
}

impl Source {
    fn new(ctx: SourceContext) -> Self {
        let limit = usize::try_from(ctx.hub.max_pending_bytes).unwrap_or(usize::MAX);
        let queues = Outgoing::new(ctx.cores.len(), limit);
        let fetch_permits = Arc::new(tokio::sync::Semaphore::new(MAX_FETCHES));
        Self { ctx, stopped: false, queues, blocked: false, batches: 0, fetch_permits, connect_failures: 0 }
    }

    /// Counts and logs an attempt to connect to `what` at `addr` that failed: loud for the first
    /// failures, then about once a minute at the longest delay.
    fn connect_failed(&mut self, backoff: &Backoff, what: &str, addr: &str, why: &str) {
        self.connect_failures += 1;
        let failures = backoff.failures() + 1;
        if failures <= 3 || failures % 12 == 0 {
            tracing::warn!(upstream = addr, error = %why, failures, "cannot connect to the {what}");
        } else {
            tracing::debug!(upstream = addr, error = %why, failures, "cannot connect to the {what}");
        }
    }

    fn stopping(&self) -> bool {
        self.stopped || self.ctx.stop.load(Ordering::Relaxed)
    }

    /// Handles every queued command and control request.
    fn drain(&mut self, up: &mut dyn Upstream) {
        while let Ok((core, cmd)) = self.ctx.commands.try_recv() {
            match cmd {
                UpstreamCmd::Fetch { id, stream, from } => self.start_fetch(core, id, stream, from),
                // Redis-mode messages published on a core: to every core, without waiting.
                // The cores hand their own out (`core_loop`); one that comes here goes the
                // same way.
                UpstreamCmd::Publish(batch) => self.queues.hand_out_published(&self.ctx.cores, &batch.0),
                cmd => up.command(core, cmd, self.ctx.clock.now()),
            }
        }
        loop {
            match self.ctx.control.try_recv() {
                Ok(SourceCtl::Snapshot(reply)) => {
                    let snapshot =
                        UpstreamSnapshot { connect_failures: self.connect_failures, ..up.snapshot() };
                    let _ = reply.send(snapshot);
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
                        ConnEnd::Lost(why) | ConnEnd::Unreachable(why) => why,
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
                Err(e) => self.connect_failed(&backoff, "upstream", addr, &e),
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
        // The wake-up, the read and the timer live across turns: a line read costs one read
        // (a short read clears the socket's readiness, so no second read to learn it is empty),
        // and neither a waiter on the mailbox's `Notify` nor a timer entry is made and unmade
        // per line.
        let wakeup = Arc::clone(&self.ctx.wakeup);
        let mut notified = std::pin::pin!(wakeup.notified());
        let mut timer = std::pin::pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
        let mut timer_due: Option<tokio::time::Instant> = None;
        let (mut reader, mut writer) = stream.split();
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
                match write_some(writer.as_ref(), &mut out, &mut out_off) {
                    Ok(true) => link.0.on_sent(self.ctx.clock.now()),
                    Ok(false) => {}
                    Err(e) => return ConnEnd::Lost(format!("write failed: {e}")),
                }
            }
            match link.0.wants_close() {
                Some(CloseHow::Abort) => {
                    let _ = socket2::SockRef::from(writer.as_ref()).set_linger(Some(Duration::ZERO));
                    return ConnEnd::Closed(CloseHow::Abort);
                }
                Some(CloseHow::Graceful) if out.is_empty() => {
                    let _ = writer.shutdown().await;
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
            if deadline != timer_due {
                if let Some(due) = deadline {
                    timer.as_mut().reset(due);
                }
                timer_due = deadline;
            }
            let buf = link.0.read_buffer();
            if buf.capacity() - buf.len() < READ_MIN_ROOM {
                buf.reserve(READ_RESERVE);
            }
            tokio::select! {
                biased;
                () = notified.as_mut() => {
                    notified.set(wakeup.notified());
                    self.drain(link);
                }
                res = writer.writable(), if !out.is_empty() => {
                    if let Err(e) = res {
                        return ConnEnd::Lost(format!("write failed: {e}"));
                    }
                }
                // Cancel-safe: when another branch wins, nothing was read.
                res = reader.read_buf(link.0.read_buffer()) => match res {
                    Ok(0) => return ConnEnd::Lost("closed by the upstream".to_owned()),
                    // Cut at once unless a busy core holds it back; the top of the loop
                    // re-checks held data on every turn.
                    Ok(_) => {
                        held.get_or_insert_with(tokio::time::Instant::now);
                    }
                    Err(e) => return ConnEnd::Lost(format!("read failed: {e}")),
                },
                () = timer.as_mut(), if timer_due.is_some() => {
                    timer_due = None;
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
