//! The source thread: the one place replication data enters the process (ARCHITECTURE.md §3
//! steps 1–2).
//!
//! It runs either the [`UpstreamLink`] to a master (dial with `TCP_NODELAY`, read straight into
//! the link's buffer, write its lines, reconnect forever with [`Backoff`]) or the
//! [`SyntheticSource`], on a tokio current-thread runtime of its own. Every event becomes one
//! message per core, in order: `Batch` → [`CoreMsg::Batch`] (an `Arc` clone, never a copy),
//! `Up` / `Down` → [`CoreMsg::Upstream`]. Commands from the cores arrive on the source's own
//! [`Inbox`] and go to the link (or the generator).
//!
//! Back-pressure: the cores' mailboxes are bounded. When one is full the source waits
//! (without reading upstream or generating) until that core drained it, so a generator running
//! at full speed can never grow the cores' queues without limit. A real master is read as fast
//! as the cores append, which is much faster than any socket write.
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
use crate::synthetic::SyntheticConfig;
use crate::time::Now;
use crate::upstream::backoff::{Backoff, BackoffConfig};
use crate::upstream::link::{LinkConfig, LinkEvent, UpstreamLink};
use crate::upstream::SyntheticSource;

/// How much spare room the upstream read buffer gets before each read.
const READ_RESERVE: usize = 256 << 10;
/// Reads that arrive less than this long after the last batch wait (at most this long) to be
/// cut into one batch with what follows: at a few thousand lines per second every line would
/// otherwise be its own batch, and so its own write to every worker. Idle links are not delayed.
const COALESCE: Duration = Duration::from_millis(1);
/// ... unless this much is already buffered.
const COALESCE_BYTES: usize = 64 << 10;
/// How long to wait before retrying a full core mailbox.
const FULL_RETRY: Duration = Duration::from_millis(1);
/// Give up dialing after this long (then back off and retry).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default forward-queue bound while the upstream is down.
const MAX_FORWARD_QUEUE: usize = 10_000;

/// Control requests for the source thread.
#[derive(Debug)]
pub enum SourceCtl {
    /// Reply with the upstream's metrics.
    Snapshot(mpsc::Sender<UpstreamSnapshot>),
    /// Stop: close the upstream connection and return.
    Stop,
}

/// Everything the source thread starts with.
pub struct SourceContext {
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
}

/// The sending side of the source thread's mailboxes. Cloneable and shareable.
#[derive(Clone)]
pub struct SourceHandle {
    commands: Inbox<(usize, UpstreamCmd)>,
    control: Inbox<SourceCtl>,
    stop: Arc<AtomicBool>,
}

impl SourceHandle {
    /// Mailboxes for a source thread: the handle, and the receiving halves for the context
    /// (`commands`, `control`, `wakeup`, `stop`).
    #[allow(clippy::type_complexity)]
    pub fn new() -> (Self, Receiver<(usize, UpstreamCmd)>, Receiver<SourceCtl>, Arc<Notify>, Arc<AtomicBool>)
    {
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
    pub fn commands(&self) -> Inbox<(usize, UpstreamCmd)> {
        self.commands.clone()
    }

    /// The upstream's metrics, or `None` if the source does not answer within `timeout`.
    pub fn snapshot(&self, timeout: Duration) -> Option<UpstreamSnapshot> {
        let (tx, rx) = mpsc::channel();
        if !self.control.send(SourceCtl::Snapshot(tx)) {
            return None;
        }
        rx.recv_timeout(timeout).ok()
    }

    /// Asks the source to stop (it closes the upstream connection and returns).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.control.send(SourceCtl::Stop);
    }
}

/// Runs the source on the calling thread until [`SourceHandle::stop`].
pub fn run(ctx: SourceContext) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let mut src = Source { ctx, stopped: false };
        match src.ctx.source.clone() {
            SourceConfig::Upstream { addr, client_name } => src.run_upstream(&addr, client_name).await,
            SourceConfig::Synthetic { rate, line_size } => src.run_synthetic(rate, line_size).await,
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
            up.command(core, cmd, self.ctx.clock.now());
        }
        loop {
            match self.ctx.control.try_recv() {
                Ok(SourceCtl::Snapshot(reply)) => {
                    let _ = reply.send(up.snapshot());
                }
                Ok(SourceCtl::Stop) | Err(TryRecvError::Disconnected) => {
                    self.stopped = true;
                    return;
                }
                Err(TryRecvError::Empty) => return,
            }
        }
    }

    /// Sends one message to every core, in core order, waiting while a mailbox is full.
    /// Returns false if the source must stop.
    async fn broadcast(&self, make: impl Fn() -> CoreMsg) -> bool {
        for core in &self.ctx.cores {
            let mut msg = make();
            loop {
                match core.try_send(msg) {
                    Ok(()) => break,
                    // That core is gone (it failed, or the server is stopping): skip it.
                    Err(TrySendError::Disconnected(_)) => break,
                    Err(TrySendError::Full(m)) => {
                        if self.stopping() {
                            return false;
                        }
                        msg = m;
                        tokio::time::sleep(FULL_RETRY).await;
                    }
                }
            }
        }
        true
    }

    /// Waits until `deadline` (monotonic ms) or a message arrives; false if stopping.
    async fn idle_until(&mut self, up: &mut dyn Upstream, deadline: Option<u64>) -> bool {
        let sleep = deadline.map(|ms| tokio::time::Instant::from_std(self.ctx.clock.instant_at(ms)));
        tokio::select! {
            () = self.ctx.wakeup.notified() => {}
            () = async { if let Some(t) = sleep { tokio::time::sleep_until(t).await } else { std::future::pending().await } } => {}
        }
        self.drain(up);
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
                    if !self.dispatch(&mut link.0, &mut backoff).await || self.stopping() {
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
    async fn dispatch(&self, link: &mut UpstreamLink, backoff: &mut Backoff) -> bool {
        while let Some(event) = link.poll_event() {
            let ok = match event {
                LinkEvent::Batch(batch) => self.broadcast(|| CoreMsg::Batch(Arc::clone(&batch))).await,
                LinkEvent::Up(ev) => {
                    backoff.reset();
                    if let UpstreamEvent::Connected { server_name, .. } = &ev {
                        tracing::info!(server_name = server_name.as_str(), "upstream handshake complete");
                    }
                    self.broadcast(|| CoreMsg::Upstream(ev.clone())).await
                }
                LinkEvent::Down { reason } => {
                    tracing::debug!(reason, "telling the cores the upstream is down");
                    self.broadcast(|| CoreMsg::Upstream(UpstreamEvent::Disconnected)).await
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
        // Bytes read but not yet cut into a batch (see COALESCE), and when the last batch was cut.
        let mut held = false;
        let mut last_cut = tokio::time::Instant::now();
        loop {
            if !self.dispatch(&mut link.0, backoff).await {
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
            if held {
                let cut_at = last_cut + COALESCE;
                deadline = Some(deadline.map_or(cut_at, |d| d.min(cut_at)));
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
                    buf.reserve(READ_RESERVE);
                    match stream.try_read_buf(buf) {
                        Ok(0) => return ConnEnd::Lost("closed by the upstream".to_owned()),
                        Ok(_) => {
                            let t = tokio::time::Instant::now();
                            if buf.len() >= COALESCE_BYTES || t >= last_cut + COALESCE {
                                link.0.on_read(self.ctx.clock.now());
                                held = false;
                                last_cut = t;
                            } else {
                                held = true;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return ConnEnd::Lost(format!("read failed: {e}")),
                    }
                }
                () = sleep_opt(deadline) => {
                    if held && tokio::time::Instant::now() >= last_cut + COALESCE {
                        link.0.on_read(self.ctx.clock.now());
                        held = false;
                        last_cut = tokio::time::Instant::now();
                    }
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
        let config = SyntheticConfig { rate, pad_to: line_size, ..SyntheticConfig::default() };
        let mut gen = SynthHolder(SyntheticSource::new(config, server_name));
        gen.0.start(self.ctx.clock.now());
        loop {
            while let Some(event) = gen.0.poll_event() {
                let ok = match event {
                    LinkEvent::Batch(batch) => self.broadcast(|| CoreMsg::Batch(Arc::clone(&batch))).await,
                    LinkEvent::Up(ev) => self.broadcast(|| CoreMsg::Upstream(ev.clone())).await,
                    LinkEvent::Down { .. } => {
                        self.broadcast(|| CoreMsg::Upstream(UpstreamEvent::Disconnected)).await
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
