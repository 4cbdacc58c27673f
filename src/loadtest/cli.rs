//! `replhub loadtest` on the command line: the flags, and the subcommand itself.
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context as _;

use super::plot::{self, Format, Labelled};
use super::{run_blocking, Check, Limit, LoadtestOptions, ServerMode, StreamSet, Target};
use crate::config::IoBackend;

/// `replhub loadtest` flags.
#[derive(Clone, Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LoadtestArgs {
    /// Something else than a run
    #[command(subcommand)]
    pub command: Option<LoadtestCommand>,
    /// Subscribing worker connections
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub subscribers: usize,
    /// Lines per second to publish; 0 = as fast as the server delivers
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub rate: u64,
    /// Publish for this many seconds [default: 10, unless --messages]
    #[arg(long, value_name = "S", conflicts_with = "messages")]
    pub seconds: Option<f64>,
    /// Publish this many lines in all
    #[arg(long, value_name = "M")]
    pub messages: Option<u64>,
    /// Bytes per RDATA line, newline included
    #[arg(long, value_name = "BYTES", default_value_t = 300)]
    pub message_size: usize,
    /// Streams published and replicated: one (events), several (4), ALL (16)
    #[arg(long, value_name = "one|several|ALL", default_value = "one", ignore_case = true)]
    pub streams: StreamSet,
    /// The hub's I/O backend
    #[arg(long, value_name = "BACKEND", default_value = "auto")]
    pub io: IoBackend,
    /// The hub's core threads [default: number of CPUs]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Threads running the subscribers [default: number of CPUs]
    #[arg(long, value_name = "N")]
    pub client_threads: Option<usize>,
    /// Extra worker connections that subscribe to nothing (idle memory)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub idle: usize,
    /// Extra worker connections that subscribe like the subscribers and never read (what a
    /// crowd of stalled workers costs the others)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub stalled: usize,
    /// Open the --stalled connections this many seconds into the run (among readers that are
    /// already established) instead of before it
    #[arg(long, value_name = "S")]
    pub stalled_after: Option<f64>,
    /// The hub's --max-pending-bytes (replhub only) [default: the hub's]
    #[arg(long, value_name = "BYTES")]
    pub max_pending_bytes: Option<String>,
    /// The hub's --worker-sndbuf (replhub only) [default: the hub's]
    #[arg(long, value_name = "BYTES")]
    pub worker_sndbuf: Option<String>,
    /// Most lines in flight (published, not yet received by the slowest subscriber)
    /// [default: 2 MiB per subscriber, 64 MiB in all, at least 256 lines]
    #[arg(long, value_name = "LINES")]
    pub window: Option<u64>,
    /// How subscribers check what they get: full (every line parsed, token and latency) or
    /// count (lines counted with memchr, tokens checked once per read: for max-rate runs,
    /// where the full check costs as much CPU as the server)
    #[arg(long, value_name = "full|count", default_value = "full")]
    pub check: Check,
    /// Run the server as its own child process: the hub as `replhub serve`, or with
    /// `--target ideal` the ideal server (its own CPU and RSS are measured, and each process
    /// holds only its own end of every connection)
    #[arg(long)]
    pub spawn_server: bool,
    /// Load something other than replhub: Redis pub/sub on a loopback address
    /// (redis://127.0.0.1:PORT), or `ideal`, the minimal fan-out server the load test runs
    /// (in-process, or as a child with --spawn-server) as the baseline
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,
    /// With --target: the server's process id, to measure its CPU and RSS
    #[arg(long, value_name = "PID", requires = "target")]
    pub server_pid: Option<u32>,
    /// Print the final report as JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// Also write the report to FILE, by its extension: .json (the JSON report), .svg (the
    /// latency CDF and deliveries/s over the run), .html (those plots and the figures as a
    /// table, one self-contained page); repeatable
    #[arg(long, value_name = "FILE")]
    pub report: Vec<PathBuf>,
    /// No progress line
    #[arg(long)]
    pub quiet: bool,
    /// Log level or filter [default: $RUST_LOG, else warn]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

/// `replhub loadtest` subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum LoadtestCommand {
    /// Draw saved JSON reports on the same axes: latency CDF and deliveries/s over time, each
    /// labelled by its target (replhub uring, replhub epoll, redis, ideal)
    Plot(PlotArgs),
    /// The ideal server as its own process, for `--target ideal --spawn-server`: prints
    /// `listening on ADDR` on stdout and serves until its stdin closes. Not for direct use.
    #[command(hide = true)]
    IdealServer(IdealServerArgs),
}

/// `replhub loadtest ideal-server` flags (hidden: the load test starts it).
#[derive(Clone, Debug, clap::Args)]
pub struct IdealServerArgs {
    /// The load test's master
    #[arg(long, value_name = "ADDR")]
    pub upstream: SocketAddr,
    /// Core threads
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,
}

/// `replhub loadtest plot` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct PlotArgs {
    /// Where to write the plot: FILE.svg, or FILE.html (the plot and the figures as a table)
    #[arg(long, short, value_name = "FILE")]
    pub out: PathBuf,
    /// JSON reports (written by --report FILE.json, or --json on stdout), drawn in this order
    #[arg(value_name = "REPORT", required = true)]
    pub reports: Vec<PathBuf>,
}

/// `replhub loadtest plot`: reads the reports and writes the plot.
fn plot_cli(args: &PlotArgs) -> anyhow::Result<()> {
    if Format::of(&args.out)? == Format::Json {
        anyhow::bail!("--out {}: a plot is .svg or .html", args.out.display());
    }
    let reports = args
        .reports
        .iter()
        .map(|p| Ok((p.clone(), plot::read_report(p)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    plot::write(&args.out, &plot::label_all(reports))
}

impl LoadtestArgs {
    /// The options these flags describe.
    pub fn to_options(&self) -> anyhow::Result<LoadtestOptions> {
        let server = || -> anyhow::Result<ServerMode> {
            Ok(if self.spawn_server {
                ServerMode::Process(std::env::current_exe().context("cannot find the replhub executable")?)
            } else {
                ServerMode::InProcess
            })
        };
        let target = match &self.target {
            None => Target::Replhub {
                server: server()?,
                io: self.io,
                threads: self.threads.unwrap_or_else(crate::config::default_threads),
            },
            Some(ideal) if ideal == "ideal" => Target::Ideal {
                server: server()?,
                threads: self.threads.unwrap_or_else(crate::config::default_threads),
            },
            Some(url) => {
                let rest = url
                    .strip_prefix("redis://")
                    .ok_or_else(|| anyhow::anyhow!("--target {url:?}: expected redis://127.0.0.1:PORT"))?;
                let addr: SocketAddr = rest
                    .trim_end_matches('/')
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--target {url:?}: expected redis://IP:PORT"))?;
                if !matches!(addr.ip(), IpAddr::V4(ip) if ip.is_loopback()) && !addr.ip().is_loopback() {
                    anyhow::bail!("--target {url:?}: only loopback addresses");
                }
                if self.spawn_server {
                    anyhow::bail!(
                        "--spawn-server starts a hub or the ideal server; it does not apply to Redis"
                    );
                }
                Target::Redis { addr, pid: self.server_pid }
            }
        };
        let limit = match (self.seconds, self.messages) {
            (_, Some(m)) => Limit::Messages(m),
            (Some(s), None) => Limit::Seconds(s),
            (None, None) => Limit::Seconds(10.0),
        };
        Ok(LoadtestOptions {
            target,
            subscribers: self.subscribers,
            idle: self.idle,
            stalled: self.stalled,
            stalled_after: self
                .stalled_after
                .map(std::time::Duration::try_from_secs_f64)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--stalled-after: {e}"))?,
            max_pending_bytes: self
                .max_pending_bytes
                .as_deref()
                .map(crate::config::parse_bytes)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--max-pending-bytes: {e}"))?,
            worker_sndbuf: self
                .worker_sndbuf
                .as_deref()
                .map(crate::config::parse_bytes)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--worker-sndbuf: {e}"))?,
            rate: self.rate,
            limit,
            message_size: self.message_size,
            streams: self.streams,
            client_threads: self.client_threads.unwrap_or_else(crate::config::default_threads).max(1),
            window: self.window,
            check: self.check,
            progress: !self.quiet,
        })
    }
}

/// `replhub loadtest`: runs, prints the report (text, or JSON on stdout with `--json`), and
/// fails if any line was lost.
pub fn cli(args: LoadtestArgs) -> anyhow::Result<()> {
    let filter = match &args.log_level {
        Some(l) => tracing_subscriber::EnvFilter::try_new(l)
            .map_err(|e| anyhow::anyhow!("--log-level {l:?}: {e}"))?,
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    match &args.command {
        Some(LoadtestCommand::Plot(p)) => return plot_cli(p),
        Some(LoadtestCommand::IdealServer(a)) => return super::ideal::run_process(a.upstream, a.threads),
        None => {}
    }
    // A name that would be refused after the run is refused before it.
    for path in &args.report {
        Format::of(path)?;
    }
    let opts = args.to_options()?;
    let report = run_blocking(&opts)?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    let labelled = [Labelled { label: plot::label(&report), report: report.clone() }];
    for path in &args.report {
        plot::write(path, &labelled)?;
    }
    if !report.is_clean() {
        anyhow::bail!(
            "the run was not clean: delivered {} of {}, lost {}, reordered {}, disconnected {}, errors {}",
            report.delivered,
            report.expected,
            report.lost,
            report.reordered,
            report.disconnected,
            report.errors.len()
        );
    }
    Ok(())
}
