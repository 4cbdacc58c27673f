//! `replhub serve` as a library: the source thread, one thread per core and the `/metrics`
//! endpoint, wired together (ARCHITECTURE.md §3, §5, §6).
//!
//! ```text
//!   source thread ──CoreMsg (one per core per batch)──► replhub-core-0 … replhub-core-N-1
//!        ▲                                                   │  (each: own SO_REUSEPORT listener,
//!        └────────── (core, UpstreamCmd) ◄───────────────────┘   own Hub, epoll or io_uring)
//!   metrics thread: Snapshot to every core + the source at scrape time ─► render
//!     (/metrics, /connections), or the source alone (/healthz)
//! ```
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use replhub::config::{ServeConfig, SourceConfig};
//! let mut config = ServeConfig::new(SourceConfig::Synthetic { rate: 100, line_size: None });
//! config.listen = "127.0.0.1:0".parse()?;
//! let server = replhub::server::Server::start(config)?;
//! println!("workers connect to {}", server.local_addr());
//! server.shutdown()?;
//! # Ok(())
//! # }
//! ```
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{IoBackend, ServeConfig};
use crate::driver::source::{self, SourceContext, SourceHandle};
use crate::driver::{epoll, uring, Balance, CoreContext, CoreMsg, HostedSource, IdleCore, Inbox, StartGate};
use crate::hub::stats::CoreSnapshot;
use crate::metrics::connections::{ConnQuery, ConnectionsPage, PageContext};
use crate::metrics::http::Limits;
use crate::metrics::snapshot::UpstreamSnapshot;
use crate::metrics::{MetricsServer, Pages, RenderInfo};
use crate::time::Clock;
use crate::tls::RedisTlsConnector;
use crate::upstream::backoff::BackoffConfig;

/// Set to `1` to make the io_uring probe fail (tests of the epoll fallback).
pub const DISABLE_URING_ENV: &str = "REPLHUB_DISABLE_URING";
/// Messages a core's mailbox holds; more wait in the source's queue for that core, and while
/// one waits the source coalesces reads (see `driver::source`). A core takes every message
/// waiting in its mailbox before it writes, and writes each connection once for all of them,
/// so under load the batches coalesce at the core anyway. A mailbox has no "taken" signal:
/// with room for one message, a batch cut while the core had not yet taken the previous one
/// waited in the source for the next upstream read (about 100 µs at 10 000 lines/s) or the
/// 1 ms retry, which put 1.5% of the lines of a paced run 100 µs behind (p99 140 µs against
/// the ideal server's 53 µs). With 64 the p99 is 59–71 µs in the same run, and max-rate
/// deliveries at 100 and 1000 subscribers went up 3–13% (docs/performance-history.md).
pub const CORE_MAILBOX: usize = 64;
/// The same in Redis mode: PUBLISH batches are made on the cores, ready, and the source cannot
/// coalesce them as it does a master's reads, so a one-message mailbox would hand a core that
/// fell behind one small batch per source wake-up (about one a millisecond while the source
/// waits on its retry timer). A deeper mailbox lets the core take every waiting batch in one
/// turn; it is still bounded, and what does not fit waits in the source as before.
pub const RESP_CORE_MAILBOX: usize = 256;
/// Listen backlog of each core's listener.
const BACKLOG: i32 = 1024;
/// How long a scrape waits for the cores and the source.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// A running hub. Stop it with [`Server::shutdown`] (or [`Server::wait_for_signal`]); dropping
/// it does the same, ignoring errors.
pub struct Server {
    local_addr: SocketAddr,
    resp_addr: Option<SocketAddr>,
    backend: &'static str,
    fallback: Option<String>,
    cores: Vec<Inbox<CoreMsg>>,
    core_threads: Vec<JoinHandle<anyhow::Result<()>>>,
    source: SourceHandle,
    source_thread: Option<JoinHandle<anyhow::Result<()>>>,
    metrics: Option<MetricsServer>,
    watch: Watch,
}

/// Notices a core or the source thread ending before it was asked to.
#[derive(Clone, Default)]
struct Watch {
    stopping: Arc<AtomicBool>,
    exited: Arc<tokio::sync::Notify>,
    what: Arc<Mutex<Option<String>>>,
}

impl Watch {
    fn exited(&self, what: &str) {
        if !self.stopping.load(Ordering::SeqCst) {
            tracing::error!("{what} stopped unexpectedly");
            if let Ok(mut w) = self.what.lock() {
                w.get_or_insert_with(|| what.to_owned());
            }
            self.exited.notify_one();
        }
    }
}

/// The io backend chosen at start, and why io_uring is not used when `auto` fell back.
fn choose_backend(io: IoBackend) -> anyhow::Result<(IoBackend, Option<String>)> {
    let probe = || -> Result<(), String> {
        if std::env::var(DISABLE_URING_ENV).is_ok_and(|v| v == "1") {
            return Err(format!("disabled by {DISABLE_URING_ENV}=1"));
        }
        uring::probe()
    };
    match io {
        IoBackend::Epoll => Ok((IoBackend::Epoll, None)),
        IoBackend::Uring => match probe() {
            Ok(()) => Ok((IoBackend::Uring, None)),
            Err(why) => anyhow::bail!("--io uring: io_uring is unavailable: {why}"),
        },
        IoBackend::Auto => match probe() {
            Ok(()) => Ok((IoBackend::Uring, None)),
            Err(why) => Ok((IoBackend::Epoll, Some(why))),
        },
    }
}

/// A non-blocking listener with `SO_REUSEPORT`, so that every core can bind the same port.
fn bind_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

impl Server {
    /// Starts the source thread, `config.threads` core threads and the metrics endpoint, and
    /// returns once every core's listener is bound and listening (connections made from then
    /// on are queued by the kernel until the core accepts them).
    pub fn start(config: ServeConfig) -> anyhow::Result<Self> {
        Self::start_with(config, BackoffConfig::default())
    }

    /// [`Server::start`] with explicit upstream reconnect delays (tests use short ones).
    pub fn start_with(config: ServeConfig, backoff: BackoffConfig) -> anyhow::Result<Self> {
        let (backend, fallback) = choose_backend(config.io)?;
        let backend_name = match backend {
            IoBackend::Uring => "uring",
            _ => "epoll",
        };
        match (&fallback, config.io) {
            (Some(why), _) => {
                tracing::info!("io backend: epoll (io_uring unavailable: {why}; using epoll instead)");
            }
            (None, IoBackend::Auto) => tracing::info!("io backend: {backend_name} (probed)"),
            (None, io) => tracing::info!("io backend: {backend_name} (--io {})", io.as_str()),
        }

        // A rediss:// upstream's CA and client certificate are read now, so that a bad file
        // stops the start with its name instead of failing every reconnect.
        let redis_tls = match &config.source {
            crate::config::SourceConfig::Redis(r) => {
                r.tls.as_ref().map(RedisTlsConnector::new).transpose().context("--upstream-redis (TLS)")?
            }
            _ => None,
        };

        let threads = config.threads.max(1);
        // One core thread runs the source itself (`HostedSource`): one thread in all, and no
        // wake-up of another thread between the master and the workers. That core sleeps in
        // tokio on either driver, so its wake-up is a `Notify`.
        let hosted = threads == 1;
        let first =
            bind_listener(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..threads {
            listeners.push(
                bind_listener(local_addr)
                    .with_context(|| format!("cannot bind another SO_REUSEPORT listener on {local_addr}"))?,
            );
        }

        // Redis mode: one more SO_REUSEPORT listener per core, and the state the cores share.
        let mut resp_listeners: Vec<Option<std::net::TcpListener>> = (0..threads).map(|_| None).collect();
        let mut resp_addr = None;
        let resp_state = config.resp_listen.map(|_| Arc::new(crate::resp::RespState::new(&config.resp)));
        if let Some(addr) = config.resp_listen {
            let first =
                bind_listener(addr).with_context(|| format!("cannot listen on {addr} (--resp-listen)"))?;
            let bound = first.local_addr()?;
            resp_addr = Some(bound);
            resp_listeners[0] = Some(first);
            for slot in resp_listeners.iter_mut().skip(1) {
                *slot = Some(
                    bind_listener(bound)
                        .with_context(|| format!("cannot bind another SO_REUSEPORT listener on {bound}"))?,
                );
            }
        }

        let clock = Clock::new();
        let gate = StartGate::new();
        let (source, commands_rx, control_rx, source_wakeup, stop) = SourceHandle::new();
        let mut cores = Vec::with_capacity(threads);
        let mut contexts = Vec::with_capacity(threads);
        let balance = Arc::new(Balance::new(threads));
        for (index, (listener, resp_listener)) in listeners.into_iter().zip(resp_listeners).enumerate() {
            let (wakeup, wake) = match backend {
                IoBackend::Uring if !hosted => {
                    uring::new_wakeup().context("cannot create an io_uring wake-up")?
                }
                _ => epoll::new_wakeup(),
            };
            // The Redis bridge does not coalesce its reads either (its TCP workers too).
            let uncoalesced = config.resp_listen.is_some()
                || matches!(config.source, crate::config::SourceConfig::Redis(_));
            let depth = if uncoalesced { RESP_CORE_MAILBOX } else { CORE_MAILBOX };
            let (inbox, rx) = Inbox::bounded(wake, depth);
            let idle = IdleCore::new(depth);
            cores.push(inbox.with_idle(Arc::clone(&idle)));
            contexts.push(CoreContext {
                index,
                listener,
                hub: config.hub.clone(),
                inbox: rx,
                wakeup,
                idle,
                upstream: source.commands(),
                clock,
                worker_sndbuf: config.worker_sndbuf,
                resp: resp_listener.zip(resp_state.clone()),
                start: gate.clone(),
                worker_notsent_lowat: config.worker_notsent_lowat,
                moderation: config.moderation,
                peers: Vec::new(),
                balance: Arc::clone(&balance),
                hosted_source: None,
            });
        }
        for ctx in &mut contexts {
            // Not its own: a core's mailbox must close once the server and the source let go.
            ctx.peers =
                cores.iter().enumerate().filter(|&(i, _)| i != ctx.index).map(|(_, c)| c.clone()).collect();
        }

        let source_ctx = SourceContext {
            source: config.source.clone(),
            hub: config.hub.clone(),
            backoff,
            cores: cores.clone(),
            commands: commands_rx,
            control: control_rx,
            wakeup: source_wakeup,
            stop,
            clock,
            resp: resp_state,
            start: gate.clone(),
            redis_tls,
        };
        let mut source_ctx = Some(source_ctx);
        if hosted {
            contexts[0].hosted_source = source_ctx.take().map(HostedSource);
        }

        let watch = Watch::default();
        let mut core_threads = Vec::with_capacity(threads);
        for ctx in contexts {
            let index = ctx.index;
            let watch = watch.clone();
            let spawned = std::thread::Builder::new().name(format!("replhub-core-{index}")).spawn(move || {
                // Every log line from this core (the hub's included) names it.
                let _span = tracing::info_span!("core", n = index).entered();
                let res = match backend {
                    IoBackend::Uring => uring::run_core(ctx),
                    _ => epoll::run_core(ctx),
                };
                if let Err(e) = &res {
                    tracing::error!(core = index, error = %format!("{e:#}"), "core stopped with an error");
                }
                watch.exited(&format!("core {index}"));
                res
            });
            match spawned {
                Ok(handle) => core_threads.push(handle),
                Err(e) => {
                    gate.abort();
                    stop_cores(&cores, core_threads);
                    return Err(e).context("cannot spawn a core thread");
                }
            }
        }

        let source_watch = watch.clone();
        let source_thread = match source_ctx.map(|ctx| {
            std::thread::Builder::new().name("replhub-source".to_owned()).spawn(move || {
                let res = source::run(ctx);
                if let Err(e) = &res {
                    tracing::error!(error = %format!("{e:#}"), "source thread stopped with an error");
                }
                source_watch.exited("the source thread");
                res
            })
        }) {
            None => None,
            Some(Ok(h)) => Some(h),
            Some(Err(e)) => {
                gate.abort();
                stop_cores(&cores, core_threads);
                return Err(e).context("cannot spawn the source thread");
            }
        };
        let waiting_threads = threads + usize::from(source_thread.is_some());

        let mut server = Self {
            local_addr,
            resp_addr,
            backend: backend_name,
            fallback,
            cores,
            core_threads,
            source,
            source_thread,
            metrics: None,
            watch,
        };
        // Every thread takes its own descriptors before any core accepts (`start_gate.rs`).
        let all_ready = gate.wait_ready(waiting_threads, || {
            server.core_threads.iter().any(JoinHandle::is_finished)
                || server.source_thread.as_ref().is_some_and(JoinHandle::is_finished)
        });
        if !all_ready {
            gate.abort();
            let why = server.start_failure();
            drop(server);
            return Err(why);
        }
        if let Some(addr) = config.metrics_listen {
            let info = RenderInfo {
                io_backend: backend_name,
                io_fallback_reason: server.fallback.clone(),
                version: env!("CARGO_PKG_VERSION"),
                threads,
                max_pending_bytes: config.hub.max_pending_bytes,
            };
            let scraper = Arc::new(Scraper {
                cores: server.cores.clone(),
                source: server.source.clone(),
                info,
                clock,
                health_upstream_grace_ms: config.health_upstream_grace_ms,
            });
            let (for_connections, for_health) = (Arc::clone(&scraper), Arc::clone(&scraper));
            let pages = Pages::metrics(move || scraper.render())
                .with_connections(move |query| for_connections.connections(query))
                .with_health(move || for_health.health());
            match MetricsServer::start_pages(addr, Limits::default(), pages) {
                Ok(m) => server.metrics = Some(m),
                Err(e) => {
                    gate.abort();
                    drop(server);
                    return Err(anyhow::Error::new(e).context(format!("cannot serve metrics on {addr}")));
                }
            }
        }
        tracing::info!(
            listen = %local_addr,
            resp = %resp_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
            metrics = %server.metrics_addr().map_or_else(|| "off".to_owned(), |a| a.to_string()),
            threads,
            source = config.source_label(),
            "replhub serving"
        );
        gate.open();
        Ok(server)
    }

    /// Why a thread ended before the start-up gate opened (it could not take its descriptors).
    fn start_failure(&mut self) -> anyhow::Error {
        let (what, thread) = match self.core_threads.iter().position(JoinHandle::is_finished) {
            Some(i) => ("a core", Some(self.core_threads.swap_remove(i))),
            None => ("the source thread", self.source_thread.take_if(|t| t.is_finished())),
        };
        match thread.map(JoinHandle::join) {
            Some(Ok(Err(e))) => e.context(format!("{what} could not start")),
            _ => anyhow::anyhow!("{what} ended while starting"),
        }
    }

    /// The worker-facing address (with the real port when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The Redis-mode (RESP) address, with the real port, when `--resp-listen` is on.
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.resp_addr
    }

    /// The `/metrics` address, unless metrics are off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// The backend in use (`"uring"` or `"epoll"`) and, when `--io auto` fell back to epoll,
    /// why io_uring was not used.
    pub fn backend(&self) -> (&'static str, Option<String>) {
        (self.backend, self.fallback.clone())
    }

    /// Every core's metrics snapshot (cores that do not answer within `timeout` are left out).
    // Hidden: the snapshot types are internals (reachable through `testing`); the integration
    // tests read them, embedders scrape `/metrics`.
    #[doc(hidden)]
    pub fn core_snapshots(&self, timeout: Duration) -> Vec<CoreSnapshot> {
        collect_snapshots(&self.cores, timeout)
    }

    /// The source's metrics snapshot.
    #[doc(hidden)]
    pub fn upstream_snapshot(&self, timeout: Duration) -> Option<UpstreamSnapshot> {
        self.source.snapshot(timeout)
    }

    /// Says `ERROR server shutting down` to every worker, flushes, closes, stops the source and
    /// joins every thread. A core gives up on workers that do not close after about 2 s.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop_all()
    }

    fn stop_all(&mut self) -> anyhow::Result<()> {
        if self.core_threads.is_empty() && self.source_thread.is_none() {
            return Ok(());
        }
        tracing::info!("shutting down");
        self.watch.stopping.store(true, Ordering::SeqCst);
        self.source.stop();
        let mut first_err: Option<anyhow::Error> = None;
        for core in &self.cores {
            core.send(CoreMsg::Shutdown);
        }
        for (i, t) in self.core_threads.drain(..).enumerate() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e.context(format!("core {i}")));
                }
                Err(_) => {
                    first_err.get_or_insert(anyhow::anyhow!("core {i} panicked"));
                }
            }
        }
        if let Some(t) = self.source_thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(e.context("source thread"));
                }
                Err(_) => {
                    first_err.get_or_insert(anyhow::anyhow!("source thread panicked"));
                }
            }
        }
        if let Some(m) = self.metrics.take() {
            m.shutdown();
        }
        tracing::info!("stopped");
        first_err.map_or(Ok(()), Err)
    }

    /// Runs until SIGINT or SIGTERM, then [`Server::shutdown`]. If a core or the source thread
    /// stops on its own first, shuts down too and returns an error naming it.
    pub fn wait_for_signal(self) -> anyhow::Result<()> {
        self.wait_for(Signals::install()?)
    }

    /// [`Server::wait_for_signal`] with handlers installed before the server started, so that
    /// waiting takes no file descriptor once workers may have taken them all.
    pub fn wait_for(self, signals: Signals) -> anyhow::Result<()> {
        let Signals { rt, mut term, mut int } = signals;
        let exited = Arc::clone(&self.watch.exited);
        let signal = rt.block_on(async {
            tokio::select! {
                _ = int.recv() => Some("SIGINT"),
                _ = term.recv() => Some("SIGTERM"),
                () = exited.notified() => None,
            }
        });
        drop(rt);
        if let Some(signal) = signal {
            tracing::info!(signal, "signal received");
            return self.shutdown();
        }
        let what = self.watch.what.lock().ok().and_then(|w| w.clone()).unwrap_or_default();
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %format!("{e:#}"), "error while stopping");
        }
        anyhow::bail!("{what} stopped unexpectedly")
    }
}

/// SIGTERM and SIGINT handlers and the runtime that waits on them, taken before
/// [`Server::start`] (see [`Server::wait_for`]): they hold file descriptors of their own.
#[derive(Debug)]
pub struct Signals {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers: from here on SIGTERM and SIGINT no longer end the process, they
    /// wait for [`Server::wait_for`].
    pub fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (term, int) = {
            let _inside = rt.enter();
            (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?)
        };
        Ok(Self { rt, term, int })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.stop_all() {
            tracing::warn!(error = %format!("{e:#}"), "error while stopping the server");
        }
    }
}

/// Stops cores after a failed start.
fn stop_cores(cores: &[Inbox<CoreMsg>], threads: Vec<JoinHandle<anyhow::Result<()>>>) {
    for core in cores {
        core.send(CoreMsg::Shutdown);
    }
    for t in threads {
        let _ = t.join();
    }
}

// A real deadline on a channel of real threads: this waits in the I/O layer, not in sans-IO code.
#[allow(clippy::disallowed_methods)]
fn collect_snapshots(cores: &[Inbox<CoreMsg>], timeout: Duration) -> Vec<CoreSnapshot> {
    let (tx, rx) = mpsc::channel();
    let mut asked = 0;
    for core in cores {
        if core.send(CoreMsg::Snapshot(tx.clone())) {
            asked += 1;
        }
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut snaps = Vec::with_capacity(asked);
    while snaps.len() < asked {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(s) => snaps.push(s),
            Err(_) => {
                tracing::warn!(
                    answered = snaps.len(),
                    asked,
                    "a core did not answer the metrics scrape in time"
                );
                break;
            }
        }
    }
    snaps.sort_by_key(|s| s.core);
    snaps
}

/// What the metrics thread calls for each request (on its one render thread).
struct Scraper {
    cores: Vec<Inbox<CoreMsg>>,
    source: SourceHandle,
    info: RenderInfo,
    /// The clock the cores and the source read, so their monotonic times compare with ours.
    clock: Clock,
    health_upstream_grace_ms: u64,
}

impl Scraper {
    /// `/metrics`.
    fn render(&self) -> String {
        let snaps = collect_snapshots(&self.cores, SCRAPE_TIMEOUT);
        let upstream = self.source.snapshot(SCRAPE_TIMEOUT).unwrap_or_default();
        crate::metrics::render(&snaps, &upstream, &self.info)
    }

    /// `/connections`.
    fn connections(&self, query: &ConnQuery) -> String {
        let snaps = collect_snapshots(&self.cores, SCRAPE_TIMEOUT);
        let upstream = self.source.snapshot(SCRAPE_TIMEOUT);
        let now = self.clock.now();
        let ctx = PageContext {
            version: self.info.version,
            cores: self.info.threads,
            now_mono_ms: now.mono_ms,
            now_wall_ms: now.wall_ms,
        };
        ConnectionsPage::build(&snaps, upstream.as_ref(), ctx, query).to_json()
    }

    /// `/healthz`: only the source is asked (a core too busy to answer a scrape is still
    /// serving).
    fn health(&self) -> Result<(), String> {
        let upstream = self.source.snapshot(SCRAPE_TIMEOUT);
        crate::metrics::health::check(
            upstream.as_ref(),
            self.clock.now().mono_ms,
            self.health_upstream_grace_ms,
        )
    }
}
