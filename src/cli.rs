//! The command line: `replhub serve | tail | …` (clap derive). Each subcommand is one variant
//! of [`Command`] plus one arm in [`run`]. Shell completions and the man pages are generated
//! from these same definitions (`replhub completions`, `replhub manpage`), so they cannot drift
//! from the flags the binary accepts.
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use replhub::config::ServeOptions;
use replhub::server::Server;

/// A fan-out hub for Synapse's TCP replication protocol: one upstream, thousands of workers.
#[derive(Debug, Parser)]
#[command(name = "replhub", version, about, long_about = None, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve workers from one upstream master (or the built-in synthetic one).
    // Boxed: the serve options are the largest variant by far, and parsed once.
    Serve(Box<ServeArgs>),
    /// Connect as a worker and print what it receives.
    Tail(TailArgs),
    /// Load-test the hub (or Redis pub/sub) end to end over loopback.
    Loadtest(replhub::loadtest::LoadtestArgs),
    /// A live terminal view of a running hub's workers (polls its /connections).
    Top(TopArgs),
    /// Print a shell completion script to stdout.
    ///
    /// bash: `replhub completions bash > /etc/bash_completion.d/replhub`;
    /// zsh: `replhub completions zsh > "${fpath[1]}/_replhub"`;
    /// fish: `replhub completions fish > ~/.config/fish/completions/replhub.fish`.
    Completions(CompletionsArgs),
    /// Print the replhub(1) man page (roff) to stdout, or write every page to a directory.
    #[command(visible_alias = "man")]
    Manpage(ManpageArgs),
}

#[derive(Debug, Args)]
struct CompletionsArgs {
    /// The shell to generate the script for
    #[arg(value_name = "SHELL")]
    shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
struct ManpageArgs {
    /// Write replhub.1 and one page per subcommand (replhub-serve.1, …) into DIR instead of
    /// printing replhub.1
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    options: ServeOptions,
    /// TOML file with the same keys as these flags (flags win)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct TailArgs {
    /// The hub (or master) to connect to
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9092")]
    connect: String,
    /// Stream to subscribe to, or ALL
    #[arg(long, value_name = "S|ALL", default_value = "ALL")]
    stream: String,
    /// Decode rows instead of printing raw lines
    #[arg(long)]
    decode: bool,
    /// Stop after N RDATA lines
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// The NAME to announce
    #[arg(long, value_name = "NAME", default_value = "replhub-tail")]
    name: String,
    /// Redis mode: subscribe to a Redis-based deployment's channels on this Redis (or replhub
    /// --resp-listen) instead of connecting as a worker: HOST:PORT, or a
    /// redis://[[USER]:PASS@]HOST:PORT URL (rediss:// for TLS)
    #[arg(long, value_name = "ADDR|URL", conflicts_with_all = ["stream", "name"])]
    resp: Option<String>,
    /// Redis mode with a rediss:// URL: trust the certificates in this PEM file instead of the
    /// system's roots
    #[arg(long, value_name = "PEM", requires = "resp")]
    ca: Option<std::path::PathBuf>,
    /// Redis mode with a rediss:// URL: the client certificate (PEM) for a Redis that checks
    /// clients' certificates; needs --key
    #[arg(long, value_name = "PEM", requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --cert
    #[arg(long, value_name = "PEM", requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// Redis mode: the channel to subscribe to (repeatable; Synapse's is its server name, and
    /// `<name>/USER_IP`) [default: every channel with subscribers]
    #[arg(long, value_name = "NAME", requires = "resp")]
    channel: Vec<String>,
    /// Redis mode: AUTH with this password
    #[arg(long, value_name = "PASSWORD", requires = "resp")]
    password: Option<String>,
    /// Redis mode: AUTH as this user (with --password)
    #[arg(long, value_name = "USER", requires = "password")]
    user: Option<String>,
    /// Log level or filter [default: $RUST_LOG, else warn]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
}

#[derive(Debug, Args)]
struct TopArgs {
    /// The hub's metrics endpoint (its --metrics-listen)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9093")]
    metrics: String,
    /// The first sort of the worker table (keys b, r, n switch it)
    #[arg(long, value_name = "KEY", default_value = "backlog")]
    sort: replhub::top::model::TopSort,
    /// Time between polls (seconds, or with a unit: 500ms, 2s)
    #[arg(long, value_name = "SECS", default_value = "1s")]
    interval: String,
}

/// Parses the command line and runs; the process exit code.
pub(crate) fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Prints help/version to stdout (exit 0) or the error with usage to stderr (exit 2).
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replhub: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Tail(args) => tail(args),
        Command::Loadtest(args) => replhub::loadtest::cli(args),
        Command::Top(args) => top(&args),
        Command::Completions(args) => completions(args.shell),
        Command::Manpage(args) => manpage(args.dir.as_deref()),
    }
}

/// Writes the completion script for `shell` to stdout.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "replhub", &mut out);
    write_stdout(&out)
}

/// Writes replhub(1) to stdout, or every page (the top one and one per subcommand) into `dir`.
fn manpage(dir: Option<&Path>) -> anyhow::Result<()> {
    // `replhub help` needs no page of its own (generate_to would list one it never writes).
    let cmd = Cli::command().disable_help_subcommand(true);
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
            Ok(())
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            write_stdout(&out)
        }
    }
}

/// Writes `bytes` to stdout in one go; a closed pipe (`| head`) is not an error worth a message.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (config, log_level) = args.options.resolve(args.config.as_ref())?;
    init_logging(log_level.as_deref(), "info")?;
    // The signal handlers first: once the server runs, workers may take every descriptor.
    let signals = replhub::server::Signals::install()?;
    let server = Server::start(config)?;
    server.wait_for(signals)
}

fn top(args: &TopArgs) -> anyhow::Result<()> {
    let interval_ms = replhub::config::parse_duration_ms(&args.interval)
        .map_err(|e| anyhow::anyhow!("--interval {:?}: {e}", args.interval))?;
    if interval_ms == 0 {
        anyhow::bail!("--interval must be more than 0");
    }
    let opts = replhub::top::TopOptions {
        metrics: args.metrics.clone(),
        sort: args.sort,
        interval: std::time::Duration::from_millis(interval_ms),
    };
    replhub::top::run(&opts)
}

fn tail(args: TailArgs) -> anyhow::Result<()> {
    init_logging(args.log_level.as_deref(), "warn")?;
    if let Some(target) = args.resp {
        let (connect, mut tls, user, password) =
            if target.starts_with("redis://") || target.starts_with("rediss://") {
                let url = replhub::config::RedisUpstream::parse_for("--resp", &target, "")?;
                (url.addr, url.tls, args.user.or(url.user), args.password.or(url.password))
            } else {
                (target, None, args.user, args.password)
            };
        match &mut tls {
            Some(tls) => {
                tls.ca_file = args.ca;
                tls.client_cert = args.cert.zip(args.key);
            }
            None if args.ca.is_some() || args.cert.is_some() => {
                anyhow::bail!("--ca, --cert and --key need a rediss:// URL in --resp (TLS)")
            }
            None => {}
        }
        let opts = replhub::tail::RespTailOptions {
            connect,
            tls,
            channels: args.channel,
            password,
            user,
            decode: args.decode,
            count: args.count,
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        return rt.block_on(replhub::tail::run_resp(opts));
    }
    let opts = replhub::tail::TailOptions {
        connect: args.connect,
        stream: args.stream,
        decode: args.decode,
        name: args.name,
        count: args.count,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(replhub::tail::run(opts))
}

/// Logs to stderr: `--log-level` if given, else `RUST_LOG`, else `default`.
fn init_logging(level: Option<&str>, default: &str) -> anyhow::Result<()> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| anyhow::anyhow!("--log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A failed log write must not take a thread down: by default tracing-subscriber reports
        // it with `eprint!`, which panics when stderr itself is the problem (a closed pipe, a
        // restarted journald), and that panic would kill a core mid-connection.
        .log_internal_errors(false)
        .init();
    Ok(())
}
