//! `replhub loadtest`: the hub, a publisher and N subscribers on one machine, all over
//! loopback, with no setup; or the same load generator against Redis pub/sub
//! (`--target redis://127.0.0.1:PORT`), or against the ideal fan-out server (`--target ideal`,
//! `ideal.rs`: the limit every other figure is a fraction of), for `scripts/compare`. With
//! `--spawn-server` the hub or the ideal server runs as a child process of the same executable,
//! so each process holds one end of each connection (twice the subscribers fit the open-files
//! limit) and the server's CPU and memory are its own.
//!
//! ```text
//!   lt-publisher ──TCP: SERVER, POSITION×16, RDATA…──► replhub (--upstream) ──TCP──► N × Client
//!   (tiny master; paced or windowed)                   in-process, or a child    (lt-client-K
//!                                                      `replhub serve`            threads)
//!   lt-publisher ──TCP: PUBLISH <stream> <line>…────► redis-server ──────────TCP──► N × RESP
//! ```
//!
//! Why a master on a loopback port rather than an embedded publisher: it is the path
//! production takes (upstream socket read, batch indexing, cross-core mailboxes, fan-out
//! writes), it needs no API beyond `Server::start`, and it makes the Redis comparison
//! symmetrical: in both cases one TCP connection brings the lines in and N take them out.
//!
//! Every line carries its publish time (a monotonic clock shared by the publisher and the
//! subscribers, which live in this process) and a per-stream token that goes up by exactly one,
//! so each subscriber measures latency and checks it got every line of its streams, in order.
//! Server CPU comes from `/proc` (the in-process hub's or ideal server's `replhub-*` threads, or
//! every thread of a server process), divided by the lines delivered.
mod cli;
mod hist;
mod ideal;
mod payload;
mod plot;
mod procstat;
mod publisher;
mod report;
mod resp;
mod series;
mod server_under_test;
mod subscriber;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;

pub use cli::{cli, IdealServerArgs, LoadtestArgs, LoadtestCommand, PlotArgs};
pub use hist::Histogram;
pub use publisher::Limit;
pub use report::{Latency, Report};

use crate::config::{IoBackend, ServeConfig, SourceConfig};
use crate::proto::StreamId;
use crate::server::Server;
use procstat::Pid;
use publisher::{Master, PubPlan, RedisSink, Replies};
use report::{build_report, Progress};
use series::RateSeries;
use server_under_test::{spawn_ideal, spawn_server, wait_backend, wait_listening, Running};
pub use subscriber::Check;
use subscriber::{SubPlan, SubTarget, ThreadResult};

/// How long subscribers may take to connect and subscribe (plus 5 ms per connection).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the last lines after publishing stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default window: at most this many bytes in flight per subscriber…
const WINDOW_BYTES_PER_SUBSCRIBER: u64 = 2 << 20;
/// …and at most this many in all (kernel socket buffers and client buffers hold them)…
const WINDOW_BYTES_TOTAL: u64 = 64 << 20;
/// …but never fewer lines than this (enough for large gathered writes).
const WINDOW_MIN_LINES: u64 = 256;
/// Errors kept for the report.
const MAX_ERRORS: usize = 8;

/// Which streams the publisher writes and every subscriber replicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StreamSet {
    /// `events` only (`REPLICATE events`).
    #[default]
    One,
    /// `events`, `presence`, `receipts`, `caches` (four `REPLICATE` lines), round-robin.
    Several,
    /// All 16 streams (`REPLICATE ALL`), round-robin.
    #[value(name = "ALL")]
    All,
}

impl StreamSet {
    /// The streams, in map order.
    pub fn streams(self) -> Vec<StreamId> {
        match self {
            Self::One => vec![StreamId::Events],
            Self::Several => vec![StreamId::Events, StreamId::Presence, StreamId::Receipts, StreamId::Caches],
            Self::All => StreamId::SEED.to_vec(),
        }
    }

    /// What a replhub subscriber sends `REPLICATE` for.
    fn replicate(self) -> Vec<String> {
        match self {
            Self::All => vec!["ALL".to_owned()],
            other => other.streams().iter().map(|s| s.name().to_owned()).collect(),
        }
    }

    /// The name used on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::One => "one",
            Self::Several => "several",
            Self::All => "ALL",
        }
    }
}

/// What to load.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// replhub, started by the load test.
    Replhub {
        /// In this process, or as a child `replhub serve` (from this executable).
        server: ServerMode,
        /// Its I/O backend.
        io: IoBackend,
        /// Its core threads.
        threads: usize,
    },
    /// The ideal fan-out server (`ideal.rs`): the baseline every other target is a fraction
    /// of.
    Ideal {
        /// In this process, or as a child `replhub loadtest ideal-server` (from this
        /// executable).
        server: ServerMode,
        /// Its core threads.
        threads: usize,
    },
    /// A running Redis on a loopback address; `pid` (if given) is measured for CPU and RSS.
    Redis {
        /// Where it listens.
        addr: SocketAddr,
        /// Its process id.
        pid: Option<u32>,
    },
}

/// Where the hub or the ideal server runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerMode {
    /// In this process (CPU counted over the server's `replhub-*` threads; RSS is the whole
    /// process, load generator included).
    InProcess,
    /// `<exe> serve …` or `<exe> loadtest ideal-server …` as a child process (CPU over every
    /// thread of the child, and RSS, are the child's own).
    Process(PathBuf),
}

/// The load test's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadtestOptions {
    /// What to load.
    pub target: Target,
    /// Subscribing connections.
    pub subscribers: usize,
    /// Extra connections that subscribe to nothing (memory per idle worker).
    pub idle: usize,
    /// Extra connections that subscribe like the subscribers and never read (replhub only):
    /// what a crowd of stalled workers costs the others.
    pub stalled: usize,
    /// Open the stalled connections this long after the start instead of before it.
    pub stalled_after: Option<Duration>,
    /// The hub's `--max-pending-bytes` (replhub only); `None` for its default.
    pub max_pending_bytes: Option<u64>,
    /// The hub's `--worker-sndbuf` (replhub only); `None` for its default.
    pub worker_sndbuf: Option<u64>,
    /// Lines per second; 0 = as fast as the server delivers (bounded by `window`).
    pub rate: u64,
    /// How long to publish.
    pub limit: Limit,
    /// Bytes per line, `\n` included (the minimum is about 60 + the stream name).
    pub message_size: usize,
    /// Which streams.
    pub streams: StreamSet,
    /// Threads running the subscribers.
    pub client_threads: usize,
    /// Most lines in flight (published, not yet received by the slowest subscriber);
    /// `None` = 2 MiB worth of lines per subscriber, 64 MiB in all, at least 256 lines.
    pub window: Option<u64>,
    /// How subscribers check what they receive (replhub, the ideal server and Redis: a
    /// counting Redis subscriber still frames every message: by its RESP lengths, or a repeat of
    /// the last message's header by one comparison).
    pub check: Check,
    /// A progress line on stderr once a second.
    pub progress: bool,
}

impl Default for LoadtestOptions {
    fn default() -> Self {
        Self {
            target: Target::Replhub {
                server: ServerMode::InProcess,
                io: IoBackend::Auto,
                threads: crate::config::default_threads(),
            },
            subscribers: 100,
            idle: 0,
            stalled: 0,
            stalled_after: None,
            max_pending_bytes: None,
            worker_sndbuf: None,
            rate: 0,
            limit: Limit::Seconds(10.0),
            message_size: 300,
            streams: StreamSet::One,
            client_threads: crate::config::default_threads(),
            window: None,
            check: Check::Full,
            progress: false,
        }
    }
}

/// A monotonic nanosecond clock shared by the publisher and the subscribers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LtClock(Instant);

impl LtClock {
    #[inline]
    pub(crate) fn now_ns(self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// One subscriber's progress, on its own cache line (written once per read that brought lines).
#[repr(align(64))]
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// Lines received (stored with `Release`, after `last_read_ns`).
    received: AtomicU64,
    /// When (load-test clock) the read that brought `received` to its value was taken.
    last_read_ns: AtomicU64,
    alive: AtomicBool,
}

impl Slot {
    fn live() -> Self {
        Self { alive: AtomicBool::new(true), ..Self::default() }
    }

    /// A read taken at `now_ns` brought the count to `received` (the subscriber's task is the
    /// slot's only writer).
    fn on_read(&self, received: u64, now_ns: u64) {
        if self.received.load(Ordering::Relaxed) != received {
            self.last_read_ns.store(now_ns, Ordering::Relaxed);
            self.received.store(received, Ordering::Release);
        }
    }
}

/// State shared by the publisher, the client threads and the controller.
#[derive(Debug)]
pub(crate) struct Shared {
    clock: LtClock,
    subscribers: usize,
    slots: Box<[Slot]>,
    published: AtomicU64,
    ready: AtomicUsize,
    failed: AtomicUsize,
    stop_clients: AtomicBool,
    abort: AtomicBool,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn new(clock: LtClock, subscribers: usize) -> Self {
        Self {
            clock,
            subscribers,
            slots: (0..subscribers).map(|_| Slot::live()).collect(),
            published: AtomicU64::new(0),
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            stop_clients: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
        }
    }

    fn note_error(&self, e: String) {
        if let Ok(mut errs) = self.errors.lock() {
            if errs.len() < MAX_ERRORS {
                errs.push(e);
            }
        }
    }

    fn connect_failed(&self, e: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.note_error(e);
    }

    /// The fewest lines any live subscriber has received (`None` if none is alive).
    fn slowest_received(&self) -> Option<u64> {
        self.slots
            .iter()
            .filter(|s| s.alive.load(Ordering::Relaxed))
            .map(|s| s.received.load(Ordering::Relaxed))
            .min()
    }

    /// Once every live subscriber has `want` lines: when the last delivery was read (the
    /// latest read that brought lines, on any subscriber; 0 if none ever did). `None` while a
    /// live subscriber is short.
    fn last_delivery(&self, want: u64) -> Option<u64> {
        let mut last = 0;
        for s in self.slots.iter() {
            let received = s.received.load(Ordering::Acquire);
            if received < want && s.alive.load(Ordering::Relaxed) {
                return None;
            }
            last = last.max(s.last_read_ns.load(Ordering::Relaxed));
        }
        Some(last)
    }

    fn total_received(&self) -> u64 {
        self.slots.iter().map(|s| s.received.load(Ordering::Relaxed)).sum()
    }

    fn alive(&self) -> usize {
        self.slots.iter().filter(|s| s.alive.load(Ordering::Relaxed)).count()
    }
}

/// Runs a load test. See the module docs. The blocking work runs on tokio's blocking pool, so
/// this can be awaited from any runtime.
pub async fn run(opts: LoadtestOptions) -> anyhow::Result<Report> {
    tokio::task::spawn_blocking(move || run_blocking(&opts)).await.context("the load test panicked")?
}

/// [`run`] on the calling thread.
pub fn run_blocking(opts: &LoadtestOptions) -> anyhow::Result<Report> {
    check(opts)?;
    let streams = opts.streams.streams();
    let clock = LtClock(Instant::now());
    let window = opts.window.unwrap_or_else(|| default_window(opts.subscribers, opts.message_size));
    let shared = Arc::new(Shared::new(clock, opts.subscribers));

    // The server, and the publisher's connection to it.
    let expect_replies = Arc::new(AtomicU64::new(u64::MAX));
    let replies_stop = Arc::new(AtomicBool::new(false));
    // Whatever happens from here on, the threads started below stop by themselves.
    let _stop = StopOnDrop(Arc::clone(&shared), Arc::clone(&replies_stop));
    let (running, sink, sub_target, backend, master_drain, replies_handle) = match &opts.target {
        Target::Replhub { server, io, threads } => {
            let master = Master::bind().context("cannot listen for the hub's upstream connection")?;
            let master_addr = master.addr()?;
            let (running, worker_addr) = match server {
                ServerMode::InProcess => {
                    let mut config = ServeConfig::new(SourceConfig::Upstream {
                        addr: master_addr.to_string(),
                        client_name: "replhub-loadtest".to_owned(),
                    });
                    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
                    config.metrics_listen = None;
                    config.threads = *threads;
                    config.io = *io;
                    if let Some(bytes) = opts.max_pending_bytes {
                        config.hub.max_pending_bytes = bytes;
                    }
                    if let Some(bytes) = opts.worker_sndbuf {
                        config.worker_sndbuf = usize::try_from(bytes).unwrap_or(usize::MAX);
                    }
                    let server = Server::start(config).context("cannot start the hub")?;
                    let addr = server.local_addr();
                    (Running::InProcess(Box::new(server)), addr)
                }
                ServerMode::Process(exe) => {
                    let (child, addr) = spawn_server(exe, master_addr, *io, *threads, opts)?;
                    (Running::Child(child), addr)
                }
            };
            let give_up = || match &running {
                Running::Child(c) => c.exited(),
                _ => None,
            };
            let (sink, drain) = master.accept(Duration::from_secs(15), &give_up)?;
            let backend = match &running {
                Running::InProcess(s) => s.backend().0.to_owned(),
                Running::Child(c) => {
                    wait_listening(worker_addr)?;
                    wait_backend(c)
                }
                Running::External(_) | Running::Ideal(_) => "external".to_owned(),
            };
            (running, Sink::Replhub(sink), SubTarget::Replhub(worker_addr), backend, Some(drain), None)
        }
        Target::Ideal { server, threads } => {
            let master =
                Master::bind().context("cannot listen for the ideal server's upstream connection")?;
            let (running, addr) = match server {
                ServerMode::InProcess => {
                    let server =
                        ideal::start(master.addr()?, *threads).context("cannot start the ideal server")?;
                    let addr = server.addr();
                    (Running::Ideal(server), addr)
                }
                ServerMode::Process(exe) => {
                    let (child, addr) = spawn_ideal(exe, master.addr()?, *threads)?;
                    (Running::Child(child), addr)
                }
            };
            let give_up = || match &running {
                Running::Child(c) => c.exited(),
                _ => None,
            };
            let (sink, drain) = master.accept(Duration::from_secs(15), &give_up)?;
            (running, Sink::Replhub(sink), SubTarget::Replhub(addr), "ideal".to_owned(), Some(drain), None)
        }
        Target::Redis { addr, pid } => {
            let (sink, replies) =
                RedisSink::connect(*addr, Arc::clone(&expect_replies), Arc::clone(&replies_stop))
                    .with_context(|| format!("cannot connect the publisher to redis at {addr}"))?;
            (
                Running::External(*pid),
                Sink::Redis(sink),
                SubTarget::Redis(*addr),
                "redis".to_owned(),
                None,
                Some(replies),
            )
        }
    };

    // Stalled workers: subscribed like the others, never read (held until the end). With
    // `stalled_after`, a thread opens them that far into the run, among established readers.
    let _stalled = match &sub_target {
        SubTarget::Replhub(_) if opts.stalled == 0 => Vec::new(),
        SubTarget::Replhub(addr) => match opts.stalled_after {
            None => open_stalled(*addr, opts.stalled, &opts.streams.replicate())?,
            Some(after) => {
                let (addr, n, replicate, shared) =
                    (*addr, opts.stalled, opts.streams.replicate(), Arc::clone(&shared));
                std::thread::Builder::new().name("lt-stalled".to_owned()).spawn(move || {
                    std::thread::sleep(after);
                    match open_stalled(addr, n, &replicate) {
                        Ok(held) => {
                            while !shared.stop_clients.load(Ordering::Relaxed) {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            drop(held);
                        }
                        Err(e) => shared.note_error(format!("stalled workers: {e:#}")),
                    }
                })?;
                Vec::new()
            }
        },
        SubTarget::Redis(_) if opts.stalled > 0 => anyhow::bail!("--stalled applies to replhub only"),
        SubTarget::Redis(_) => Vec::new(),
    };

    // Subscribers (and idle connections), spread over the client threads.
    let plan = Arc::new(SubPlan {
        target: sub_target,
        streams: streams.clone(),
        replicate: opts.streams.replicate(),
        check: opts.check,
    });
    let threads = opts.client_threads.max(1);
    let mut clients: Vec<JoinHandle<anyhow::Result<ThreadResult>>> = Vec::with_capacity(threads);
    for t in 0..threads {
        let subs: Vec<usize> = (t..opts.subscribers).step_by(threads).collect();
        let idle: Vec<usize> = (t..opts.idle).step_by(threads).collect();
        let (plan, shared) = (Arc::clone(&plan), Arc::clone(&shared));
        clients.push(
            std::thread::Builder::new()
                .name(format!("lt-client-{t}"))
                .spawn(move || subscriber::client_thread(subs, idle, plan, shared))?,
        );
    }
    let stop_clients =
        |clients: Vec<JoinHandle<anyhow::Result<ThreadResult>>>| -> anyhow::Result<Vec<ThreadResult>> {
            shared.stop_clients.store(true, Ordering::SeqCst);
            let mut out = Vec::new();
            for c in clients {
                out.push(c.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??);
            }
            Ok(out)
        };

    let conns = opts.subscribers + opts.idle;
    let ready_deadline = Instant::now() + READY_TIMEOUT + Duration::from_millis(5 * conns as u64);
    loop {
        let (ready, failed) = (shared.ready.load(Ordering::SeqCst), shared.failed.load(Ordering::SeqCst));
        if failed > 0 {
            let errs = shared.errors.lock().map(|e| e.join("; ")).unwrap_or_default();
            let _ = stop_clients(clients);
            anyhow::bail!("{failed} of {conns} connections failed: {errs}");
        }
        if ready >= conns {
            break;
        }
        if Instant::now() >= ready_deadline {
            let _ = stop_clients(clients);
            anyhow::bail!("only {ready} of {conns} connections were ready after {:?}", READY_TIMEOUT);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let rss_ready = running.rss();

    // Publish, and watch.
    let pub_plan = PubPlan {
        streams: streams.clone(),
        size: opts.message_size,
        rate: opts.rate,
        limit: opts.limit,
        window,
    };
    let cpu_before = running.cpu();
    let gen_before = procstat::thread_cpu(Pid::Own, &|n| n.starts_with("lt-")).unwrap_or_default();
    // The delivery series starts with publishing, when nothing has been delivered yet.
    let series_start = clock.now_ns();
    let pub_handle = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new().name("lt-publisher".to_owned()).spawn(move || match sink {
            Sink::Replhub(mut s) => (publisher::publish(&mut s, &pub_plan, &shared), Some(s)),
            Sink::Redis(mut s) => (publisher::publish(&mut s, &pub_plan, &shared), None),
        })?
    };

    let progress = Progress::new(opts.progress);
    let mut rss_max = rss_ready.map(|r| r.0);
    let mut last_tick = Instant::now();
    let mut rate_series = RateSeries::new(series_start, series::INTERVAL_NS, 0);
    let sample = |series: &mut RateSeries| {
        let now = clock.now_ns();
        if series.due(now) {
            series.sample(now, shared.total_received());
        }
    };
    while !pub_handle.is_finished() {
        std::thread::sleep(Duration::from_millis(2));
        sample(&mut rate_series);
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            progress.tick(&shared);
            if let Some((rss, _)) = running.rss() {
                rss_max = rss_max.max(Some(rss));
            }
        }
    }
    let (published, master_sink) =
        pub_handle.join().map_err(|_| anyhow::anyhow!("the publisher panicked"))?;
    if let Some(e) = &published.error {
        shared.note_error(format!("publisher: {e}"));
    }
    expect_replies.store(published.lines, Ordering::SeqCst);

    // Wait for the last deliveries.
    let drain_deadline = Instant::now() + DRAIN_TIMEOUT;
    let want = published.lines;
    // The run ends at the last delivery as its subscriber read it, not when this loop looked.
    let done_ns = loop {
        let now = clock.now_ns();
        match shared.last_delivery(want) {
            Some(last) if last > 0 => break last,
            Some(_) => break now,
            None if Instant::now() >= drain_deadline => break now,
            None => {}
        }
        sample(&mut rate_series);
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            progress.tick(&shared);
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    let (interval_ns, per_interval) = rate_series.finish(done_ns, shared.total_received());
    let cpu_after = running.cpu();
    let gen_after = procstat::thread_cpu(Pid::Own, &|n| n.starts_with("lt-")).unwrap_or_default();
    let rss_end = running.rss();
    progress.finish();

    let results = stop_clients(clients)?;
    let replies: Option<Replies> = match replies_handle {
        Some(h) => {
            let wait = Instant::now() + Duration::from_secs(10);
            while !h.is_finished() && Instant::now() < wait {
                std::thread::sleep(Duration::from_millis(5));
            }
            replies_stop.store(true, Ordering::SeqCst);
            Some(h.join().map_err(|_| anyhow::anyhow!("the reply reader panicked"))?)
        }
        None => None,
    };
    let server_label = match &running {
        Running::InProcess(_) | Running::Ideal(_) => "in-process",
        Running::Child(_) => "process",
        Running::External(_) => "external",
    };
    let rss_scope = match &running {
        Running::InProcess(_) | Running::Ideal(_) => "whole process (server + load generator)",
        Running::Child(_) if matches!(opts.target, Target::Ideal { .. }) => "server process",
        Running::Child(_) => "hub process",
        Running::External(Some(_)) => "server process",
        Running::External(None) => "not measured (no --server-pid)",
    };
    // Stop the hub before its upstream goes away.
    match running {
        Running::InProcess(server) => {
            if let Err(e) = server.shutdown() {
                shared.note_error(format!("hub shutdown: {e:#}"));
            }
        }
        Running::Child(c) => drop(c),
        Running::Ideal(s) => drop(s),
        Running::External(_) => {}
    }
    if let Some(s) = master_sink {
        s.close();
    }
    if let Some(d) = master_drain {
        let _ = d.join();
    }

    let server_cpu = match (&cpu_before, &cpu_after) {
        (Some(b), Some(a)) => Some(procstat::cpu_delta(b, a)),
        _ => None,
    };
    let gen_cpu = procstat::cpu_delta(&gen_before, &gen_after);
    let mut report = build_report(opts, &results, &published, &streams, done_ns, window);
    report.deliveries_interval_ms = interval_ns / 1_000_000;
    report.deliveries_per_interval = per_interval;
    report.target = match opts.target {
        Target::Replhub { .. } => "replhub".to_owned(),
        Target::Ideal { .. } => "ideal".to_owned(),
        Target::Redis { .. } => "redis".to_owned(),
    };
    report.backend = backend;
    report.server = server_label.to_owned();
    report.server_threads = match opts.target {
        Target::Replhub { threads, .. } | Target::Ideal { threads, .. } => threads,
        Target::Redis { .. } => 0,
    };
    let per = |ns: u64| if report.delivered > 0 { ns as f64 / report.delivered as f64 } else { 0.0 };
    report.server_cpu_seconds = server_cpu.map(|ns| ns as f64 / 1e9);
    report.server_cpu_ns_per_delivery = server_cpu.map(per);
    report.loadgen_cpu_ns_per_delivery = per(gen_cpu);
    report.rss_scope = rss_scope.to_owned();
    report.rss_ready_bytes = rss_ready.map(|r| r.0);
    report.rss_end_bytes = rss_end.map(|r| r.0).max(rss_max);
    report.rss_peak_bytes = rss_end.map(|r| r.1);
    if let Some(r) = &replies {
        report.publish_receivers = Some(r.receivers);
        if let Some(e) = &r.error {
            report.errors.push(format!("publisher replies: {e}"));
        }
        if r.count < published.lines {
            report.errors.push(format!("only {} of {} PUBLISH replies arrived", r.count, published.lines));
        }
    }
    let mut errors = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
    errors.append(&mut report.errors);
    report.errors = errors;
    Ok(report)
}

/// Tells the client threads, the publisher and the reply reader to stop (on every exit path
/// of [`run_blocking`]).
struct StopOnDrop(Arc<Shared>, Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.abort.store(true, Ordering::SeqCst);
        self.0.stop_clients.store(true, Ordering::SeqCst);
        self.1.store(true, Ordering::SeqCst);
    }
}

/// The publisher's connection.
enum Sink {
    Replhub(publisher::ReplhubSink),
    Redis(RedisSink),
}

/// The default window in lines: 2 MiB per subscriber, 64 MiB in all, at least 256 lines. At
/// max rate latency is mostly time spent in the window, so it stays small with many
/// subscribers, while throughput only needs enough lines for large gathered writes.
fn default_window(subscribers: usize, message_size: usize) -> u64 {
    let size = message_size.max(64) as u64;
    let per = WINDOW_BYTES_PER_SUBSCRIBER / size;
    let total = WINDOW_BYTES_TOTAL / (size * subscribers.max(1) as u64);
    per.min(total).max(WINDOW_MIN_LINES)
}

fn check(opts: &LoadtestOptions) -> anyhow::Result<()> {
    if opts.message_size > crate::proto::MAX_LINE_LEN {
        anyhow::bail!(
            "--message-size {} is over the protocol's line limit ({})",
            opts.message_size,
            crate::proto::MAX_LINE_LEN
        );
    }
    match opts.limit {
        Limit::Seconds(s) if !(s > 0.0 && s <= 3600.0) => anyhow::bail!("--seconds must be in (0, 3600]"),
        Limit::Messages(0) => anyhow::bail!("--messages must be at least 1"),
        _ => {}
    }
    if opts.subscribers > 100_000 || opts.idle > 100_000 {
        anyhow::bail!("at most 100000 subscribers and 100000 idle connections");
    }
    if let Target::Redis { addr, .. } = &opts.target {
        if !addr.ip().is_loopback() {
            anyhow::bail!("the load test only talks to loopback addresses, not {addr}");
        }
    }
    if let Target::Replhub { threads, .. } | Target::Ideal { threads, .. } = &opts.target {
        if *threads == 0 || *threads > crate::config::MAX_THREADS {
            anyhow::bail!("--threads must be in 1..={}", crate::config::MAX_THREADS);
        }
    }
    // Each connection is one fd here, plus one in the server when it runs in this process. A
    // server child inherits this limit and needs one fd per connection plus a few of its own,
    // so passing here is enough for it too.
    let conns = (opts.subscribers + opts.idle + opts.stalled) as u64;
    let in_process = matches!(
        opts.target,
        Target::Replhub { server: ServerMode::InProcess, .. }
            | Target::Ideal { server: ServerMode::InProcess, .. }
    );
    let per = if in_process { 2 } else { 1 };
    if let Some(limit) = procstat::open_files_limit() {
        if conns * per + 64 > limit {
            let hint = if in_process { " or run the server as its own process (--spawn-server)" } else { "" };
            anyhow::bail!(
                "{conns} connections need about {} file descriptors but the limit is {limit}: raise it \
                 (ulimit -n){hint}",
                conns * per + 64
            );
        }
    }
    Ok(())
}

/// Opens `n` workers that send `NAME` and their `REPLICATE`s and then never read: their
/// sockets fill up and stay full.
fn open_stalled(
    addr: SocketAddr,
    n: usize,
    replicate: &[String],
) -> anyhow::Result<Vec<std::net::TcpStream>> {
    use std::io::Write as _;

    use crate::proto::{Command, ReplicateTarget};
    (0..n)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(addr).context("connecting a stalled worker")?;
            let name = format!("lt-stalled-{i}");
            let mut hello = Command::Name(&name).to_bytes()?.to_vec();
            for r in replicate {
                hello.extend_from_slice(&Command::Replicate(ReplicateTarget::from_name(r)).to_bytes()?);
            }
            s.write_all(&hello).context("subscribing a stalled worker")?;
            Ok(s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_with(slots: usize) -> Shared {
        Shared::new(LtClock(Instant::now()), slots)
    }

    /// The run ends when the last line was read, by whichever subscriber, not when the
    /// controller looked; a read that brought no line (a PING) does not move it.
    #[test]
    fn the_last_delivery_is_the_latest_read_that_brought_lines() {
        let shared = shared_with(3);
        let [a, b, c] = &shared.slots[..] else { unreachable!() };
        a.on_read(10, 1_000);
        b.on_read(7, 1_200);
        c.on_read(10, 900);
        assert_eq!(shared.last_delivery(10), None, "b is short");
        b.on_read(10, 1_500);
        a.on_read(10, 2_000);
        assert_eq!(shared.last_delivery(10), Some(1_500));
        // A subscriber that is gone does not hold the run open.
        let shared = shared_with(2);
        shared.slots[0].on_read(4, 300);
        shared.slots[1].on_read(2, 200);
        assert_eq!(shared.last_delivery(4), None);
        shared.slots[1].alive.store(false, Ordering::Relaxed);
        assert_eq!(shared.last_delivery(4), Some(300));
        // Nothing read at all: 0, which the drain loop replaces with its own clock.
        assert_eq!(shared_with(1).last_delivery(0), Some(0));
    }

    #[test]
    fn windows() {
        assert_eq!(default_window(1, 300), (2 << 20) / 300);
        assert_eq!(default_window(100, 300), (64 << 20) / 300 / 100);
        assert_eq!(default_window(1000, 300), 256);
    }

    /// A server in this process holds the other end of every connection: twice the descriptors,
    /// and the refusal says how to halve them; as its own process the same count passes.
    #[test]
    fn a_server_process_halves_the_descriptors_needed() {
        let Some(limit) = procstat::open_files_limit() else { return };
        if !(200..=100_000).contains(&limit) {
            // Nothing the subscriber bound (100 000) can show, or too few descriptors to try.
            return;
        }
        // Fits once (n + 64), not twice (2n + 64).
        let n = ((limit - 64) / 2 + 1) as usize;
        let exe = PathBuf::from("/nonexistent/replhub");
        for (server, threads) in [(ServerMode::InProcess, 2), (ServerMode::Process(exe), 2)] {
            let in_process = server == ServerMode::InProcess;
            for target in [
                Target::Ideal { server: server.clone(), threads },
                Target::Replhub { server: server.clone(), io: IoBackend::Epoll, threads },
            ] {
                let opts = LoadtestOptions { target, subscribers: n, ..LoadtestOptions::default() };
                match check(&opts) {
                    Ok(()) => assert!(!in_process, "{n} subscribers in-process pass a limit of {limit}"),
                    Err(e) => {
                        let e = e.to_string();
                        assert!(in_process, "{e}");
                        assert!(e.contains(&format!("need about {}", 2 * n + 64)), "{e}");
                        assert!(e.contains("--spawn-server"), "{e}");
                    }
                }
            }
        }
    }

    #[test]
    fn stream_sets() {
        assert_eq!(StreamSet::One.replicate(), vec!["events"]);
        assert_eq!(StreamSet::Several.streams().len(), 4);
        assert_eq!(StreamSet::All.replicate(), vec!["ALL"]);
        assert_eq!(StreamSet::All.streams().len(), 16);
    }
}
