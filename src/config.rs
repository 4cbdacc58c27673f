//! Typed configuration for `replhub serve`, from flags and an optional TOML file, validated once
//! at start (ARCHITECTURE.md §7).
//!
//! [`ServeOptions`] is what a user can say, every field optional: the same struct is parsed from
//! the command line (clap) and from the `--config` file (TOML, same keys as the flags, in
//! `kebab-case` or `snake_case`). [`ServeOptions::merge`] lets flags win over the file, and
//! [`ServeConfig::from_options`] validates the result into the typed [`ServeConfig`] the server
//! runs with. Every mistake is a [`ConfigError`] with a sentence for the user, never a panic.
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// The hub's tunables, a field of [`ServeConfig`].
pub use crate::hub::HubConfig;
/// How the upstream link backs off between dials ([`crate::server::Server::start_with`]).
pub use crate::upstream::BackoffConfig;

/// Which I/O backend to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    /// io_uring when the probe succeeds, epoll otherwise.
    #[default]
    Auto,
    /// io_uring or fail.
    #[serde(alias = "io_uring", alias = "io-uring")]
    #[value(alias = "io_uring", alias = "io-uring")]
    Uring,
    /// tokio (epoll).
    Epoll,
}

impl IoBackend {
    /// The name used on the command line and in logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Uring => "uring",
            Self::Epoll => "epoll",
        }
    }
}

/// Where the replication data comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    /// Dial a real master (or another replhub).
    Upstream {
        /// `HOST:PORT` as given (resolved at each connect).
        addr: String,
        /// The `NAME` replhub announces upstream.
        client_name: String,
    },
    /// The built-in synthetic master at this many lines per second (0 = as fast as possible).
    Synthetic {
        /// Lines per second.
        rate: u64,
        /// Pad rows to about this many bytes per line.
        line_size: Option<usize>,
    },
}

/// Everything `serve` needs, validated.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Worker-facing listen address.
    pub listen: SocketAddr,
    /// The data source.
    pub source: SourceConfig,
    /// Prometheus `/metrics` address; `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Core threads.
    pub threads: usize,
    /// I/O backend.
    pub io: IoBackend,
    /// Hub settings (server name, slow-consumer policy, timing).
    pub hub: HubConfig,
    /// SO_SNDBUF for accepted worker sockets (0: the kernel's default and auto-tuning).
    pub worker_sndbuf: usize,
    /// TCP_NOTSENT_LOWAT for accepted worker sockets (0: not set).
    pub worker_notsent_lowat: usize,
}

/// Default `--worker-sndbuf`: a worker that stops reading holds at most this much kernel
/// memory (twice this, as Linux counts it), and costs the core at most this much copying.
pub const DEFAULT_WORKER_SNDBUF: usize = 256 << 10;

/// Default `--worker-notsent-lowat`: unset. With it (e.g. 128 KiB) a worker socket holds at most
/// that much data not yet sent beyond what its peer's receive window let through, so a worker
/// that stops reading takes its receive window plus that, not its whole send buffer: a crowd of
/// them is filled three to four times faster and holds that much less kernel memory. It is not
/// the default because with io_uring, at a 4 MiB `--max-pending-bytes`, the readers beside such
/// a crowd measured worse with it than without (README, "Stalled workers and memory").
pub const DEFAULT_WORKER_NOTSENT_LOWAT: usize = 0;

/// Default `NAME` replhub announces to its upstream.
pub(crate) const DEFAULT_CLIENT_NAME: &str = "replhub";
/// Server name of the synthetic master unless `--server-name` says otherwise.
pub(crate) const DEFAULT_SYNTHETIC_SERVER_NAME: &str = "localhost";
/// Most core threads accepted (a typo guard, not a design limit).
pub(crate) const MAX_THREADS: usize = 1024;

impl ServeConfig {
    /// A configuration with every default, serving `source` (tests and embedders start here).
    /// In synthetic mode the server name is `localhost`.
    pub fn new(source: SourceConfig) -> Self {
        let mut hub = HubConfig::default();
        if matches!(source, SourceConfig::Synthetic { .. }) {
            hub.server_name = Some(DEFAULT_SYNTHETIC_SERVER_NAME.to_owned());
        }
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            source,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9093))),
            threads: default_threads(),
            io: IoBackend::Auto,
            hub,
            worker_sndbuf: DEFAULT_WORKER_SNDBUF,
            worker_notsent_lowat: DEFAULT_WORKER_NOTSENT_LOWAT,
        }
    }

    /// Validates user options (flags already merged over the file).
    pub fn from_options(opts: &ServeOptions) -> Result<Self, ConfigError> {
        let source = match (&opts.upstream, opts.synthetic) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new("give either --upstream or --synthetic, not both"))
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "no data source: give --upstream HOST:PORT (a Synapse master) or --synthetic RATE \
                     (the built-in generator)",
                ))
            }
            (Some(addr), None) => {
                check_host_port(addr, "--upstream")?;
                if opts.line_size.is_some() {
                    return Err(ConfigError::new("--line-size only applies with --synthetic"));
                }
                let client_name = opts.client_name.clone().unwrap_or_else(|| DEFAULT_CLIENT_NAME.to_owned());
                check_name(&client_name, "--client-name")?;
                SourceConfig::Upstream { addr: addr.clone(), client_name }
            }
            (None, Some(rate)) => {
                if opts.client_name.is_some() {
                    return Err(ConfigError::new("--client-name only applies with --upstream"));
                }
                if let Some(size) = opts.line_size {
                    if !(32..=16_384).contains(&size) {
                        return Err(ConfigError::new(format!(
                            "--line-size {size} is out of range (32..=16384 bytes)"
                        )));
                    }
                }
                SourceConfig::Synthetic { rate, line_size: opts.line_size }
            }
        };
        let mut config = Self::new(source);
        if let Some(listen) = &opts.listen {
            config.listen = resolve(listen, "--listen")?;
        }
        if let Some(m) = &opts.metrics_listen {
            config.metrics_listen =
                if m.eq_ignore_ascii_case("off") { None } else { Some(resolve(m, "--metrics-listen")?) };
        }
        if let Some(threads) = opts.threads {
            if threads == 0 || threads > MAX_THREADS {
                return Err(ConfigError::new(format!(
                    "--threads {threads} is out of range (1..={MAX_THREADS})"
                )));
            }
            config.threads = threads;
        }
        if let Some(io) = opts.io {
            config.io = io;
        }
        if let Some(name) = &opts.server_name {
            check_name(name, "--server-name")?;
            config.hub.server_name = Some(name.clone());
        }
        if let Some(protocol) = opts.protocol {
            if matches!(config.source, SourceConfig::Synthetic { .. }) {
                return Err(ConfigError::new("--protocol only applies with --upstream"));
            }
            config.hub.protocol = protocol;
        }
        if let Some(bytes) = &opts.max_pending_bytes {
            let bytes = bytes.to_string();
            let n = parse_bytes(&bytes)
                .map_err(|e| ConfigError::new(format!("--max-pending-bytes {bytes:?}: {e}")))?;
            if n < 64 << 10 {
                return Err(ConfigError::new(format!(
                    "--max-pending-bytes {bytes:?} is too small (at least 64KiB)"
                )));
            }
            config.hub.max_pending_bytes = n;
        }
        if let Some(n) = opts.max_user_syncs {
            if n == 0 {
                return Err(ConfigError::new("--max-user-syncs must be at least 1"));
            }
            config.hub.max_user_syncs = n;
        }
        if let Some(t) = &opts.write_timeout {
            let t = t.to_string();
            let ms =
                parse_duration_ms(&t).map_err(|e| ConfigError::new(format!("--write-timeout {t:?}: {e}")))?;
            if ms == 0 {
                return Err(ConfigError::new("--write-timeout must be more than 0"));
            }
            config.hub.write_timeout_ms = ms;
        }
        if let Some(bytes) = &opts.worker_sndbuf {
            let bytes = bytes.to_string();
            let n = parse_bytes(&bytes)
                .map_err(|e| ConfigError::new(format!("--worker-sndbuf {bytes:?}: {e}")))?;
            if n != 0 && !(4 << 10..=1 << 30).contains(&n) {
                return Err(ConfigError::new(format!(
                    "--worker-sndbuf {bytes:?} is out of range (0 for the kernel's, or 4KiB..=1GiB)"
                )));
            }
            config.worker_sndbuf = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(bytes) = &opts.worker_notsent_lowat {
            let bytes = bytes.to_string();
            let n = parse_bytes(&bytes)
                .map_err(|e| ConfigError::new(format!("--worker-notsent-lowat {bytes:?}: {e}")))?;
            if n != 0 && !(1 << 10..=1 << 30).contains(&n) {
                return Err(ConfigError::new(format!(
                    "--worker-notsent-lowat {bytes:?} is out of range (0 for none, or 1KiB..=1GiB)"
                )));
            }
            config.worker_notsent_lowat = usize::try_from(n).unwrap_or(usize::MAX);
        }
        Ok(config)
    }

    /// A short description of the source for logs.
    pub fn source_label(&self) -> String {
        match &self.source {
            SourceConfig::Upstream { addr, .. } => format!("upstream {addr}"),
            SourceConfig::Synthetic { rate: 0, .. } => "synthetic (unlimited rate)".to_owned(),
            SourceConfig::Synthetic { rate, .. } => format!("synthetic ({rate} lines/s)"),
        }
    }
}

/// The number of CPUs this process may use (the default for `--threads`).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// A number of bytes or seconds as given on the command line or in the file: a plain number
/// or a string with a unit (`64MiB`, `1.5s`).
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum Quantity {
    /// A bare integer.
    Int(u64),
    /// A bare decimal (seconds only).
    Float(f64),
    /// Text with an optional unit.
    Text(String),
}

impl std::fmt::Display for Quantity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Int(n) => n.fmt(f),
            Self::Float(x) => x.fmt(f),
            Self::Text(s) => s.fmt(f),
        }
    }
}

impl std::str::FromStr for Quantity {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::Text(s.to_owned()))
    }
}

/// What the user said about `serve`, from flags or from the config file; all optional.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeOptions {
    /// Worker-facing listen address [default: 127.0.0.1:9092]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Dial this Synapse master (or another replhub) as one replication client
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<String>,
    /// Serve the built-in synthetic master at RATE lines/s (0 = as fast as possible)
    #[arg(long, value_name = "RATE")]
    pub synthetic: Option<u64>,
    /// Synthetic mode: pad rows to about N bytes per line
    #[arg(long, value_name = "N")]
    #[serde(alias = "line_size")]
    pub line_size: Option<usize>,
    /// The SERVER name shown to workers [default: learned from the upstream; `localhost` in
    /// synthetic mode]. With --upstream the master must announce the same name.
    #[arg(long, value_name = "NAME")]
    #[serde(alias = "server_name")]
    pub server_name: Option<String>,
    /// The NAME replhub announces to its upstream [default: replhub]
    #[arg(long, value_name = "NAME")]
    #[serde(alias = "client_name")]
    pub client_name: Option<String>,
    /// Prometheus /metrics address, or "off" [default: 127.0.0.1:9093]
    #[arg(long, value_name = "ADDR|off")]
    #[serde(alias = "metrics_listen")]
    pub metrics_listen: Option<String>,
    /// Core threads, each with its own listener (SO_REUSEPORT) [default: number of CPUs]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// I/O backend: io_uring if available (auto), io_uring or fail (uring), or epoll
    /// [default: auto]
    #[arg(long, value_name = "BACKEND")]
    pub io: Option<IoBackend>,
    /// Evict a worker whose backlog exceeds this many bytes (suffixes: KiB, MiB, GiB, KB, MB,
    /// GB) [default: 64MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(alias = "max_pending_bytes")]
    pub max_pending_bytes: Option<Quantity>,
    /// Evict a backlogged worker whose socket makes no write progress for this long (seconds,
    /// or with a unit: 500ms, 10s) [default: 10]
    #[arg(long, value_name = "SECS")]
    #[serde(alias = "write_timeout")]
    pub write_timeout: Option<Quantity>,
    /// The master's replication protocol generation: auto (learnt from what it sends on each
    /// connection), seed, 1.13 (Synapse 1.13–1.21) or 1.22 (Synapse 1.22–1.66) [default: auto]
    #[arg(long, value_name = "GENERATION")]
    pub protocol: Option<crate::proto::ProtocolChoice>,
    /// Kernel send buffer (SO_SNDBUF) of each worker socket; bounds what a worker that stops
    /// reading holds in the kernel. 0 leaves the kernel's auto-tuning [default: 256KiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(alias = "worker_sndbuf")]
    pub worker_sndbuf: Option<Quantity>,
    /// Most bytes a worker socket holds unsent (TCP_NOTSENT_LOWAT): with the peer's receive
    /// window, what a worker that stops reading costs in kernel memory and copying. 0 leaves
    /// it unset [default: 0]
    #[arg(long, value_name = "BYTES")]
    #[serde(alias = "worker_notsent_lowat")]
    pub worker_notsent_lowat: Option<Quantity>,
    /// Most distinct users one worker connection may hold syncing (USER_SYNC start without
    /// end); one more is ERROR and a close [default: 100000]
    #[arg(long, value_name = "N")]
    #[serde(alias = "max_user_syncs")]
    pub max_user_syncs: Option<usize>,
    /// Log level or filter (trace, debug, info, warn, error, or a RUST_LOG-style filter)
    /// [default: $RUST_LOG, else info]
    #[arg(long, value_name = "LEVEL")]
    #[serde(alias = "log_level")]
    pub log_level: Option<String>,
}

impl ServeOptions {
    /// Reads a TOML config file with the same keys as the flags.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(format!("cannot read config file {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            ConfigError::new(format!("config file {}: {}", path.display(), e.to_string().trim_end()))
        })
    }

    /// These options with every unset field taken from `file` (flags win).
    #[must_use]
    pub fn merge(self, file: Self) -> Self {
        Self {
            listen: self.listen.or(file.listen),
            upstream: self.upstream.or(file.upstream),
            synthetic: self.synthetic.or(file.synthetic),
            line_size: self.line_size.or(file.line_size),
            server_name: self.server_name.or(file.server_name),
            client_name: self.client_name.or(file.client_name),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            threads: self.threads.or(file.threads),
            io: self.io.or(file.io),
            max_pending_bytes: self.max_pending_bytes.or(file.max_pending_bytes),
            write_timeout: self.write_timeout.or(file.write_timeout),
            protocol: self.protocol.or(file.protocol),
            worker_sndbuf: self.worker_sndbuf.or(file.worker_sndbuf),
            worker_notsent_lowat: self.worker_notsent_lowat.or(file.worker_notsent_lowat),
            max_user_syncs: self.max_user_syncs.or(file.max_user_syncs),
            log_level: self.log_level.or(file.log_level),
        }
    }

    /// Flags merged over the config file at `path` (if any), validated.
    pub fn resolve(self, path: Option<&PathBuf>) -> Result<(ServeConfig, Option<String>), ConfigError> {
        let opts = match path {
            Some(p) => self.merge(Self::from_file(p)?),
            None => self,
        };
        Ok((ServeConfig::from_options(&opts)?, opts.log_level))
    }
}

/// A configuration mistake, worded for the user.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Parses `64MiB`-style sizes: an integer with an optional unit (B, K/KB = 1000, KiB = 1024,
/// and the same for M and G; case-insensitive).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err("expected a number of bytes, e.g. 64MiB".to_owned());
    }
    let n: u64 = num.parse().map_err(|_| "number too large".to_owned())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB or GB)")),
    };
    n.checked_mul(mult).ok_or_else(|| "number too large".to_owned())
}

/// Parses a duration: seconds (`10`, `1.5`) or with a unit (`500ms`, `2s`, `1m`); in ms.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| "expected a number of seconds, e.g. 10 or 500ms".to_owned())?;
    let mult = match unit.trim() {
        "" | "s" => 1000.0,
        "ms" => 1.0,
        "m" | "min" => 60_000.0,
        other => return Err(format!("unknown unit {other:?} (use ms, s or m)")),
    };
    let ms = n * mult;
    if !ms.is_finite() || ms > 86_400_000.0 * 365.0 {
        return Err("duration too long".to_owned());
    }
    Ok(ms.round() as u64)
}

fn resolve(addr: &str, flag: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    check_host_port(addr, flag)?;
    addr.to_socket_addrs()
        .map_err(|e| ConfigError::new(format!("{flag} {addr:?}: {e}")))?
        .next()
        .ok_or_else(|| ConfigError::new(format!("{flag} {addr:?}: the name resolves to no address")))
}

fn check_host_port(addr: &str, flag: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::new(format!("{flag} {addr:?}: expected HOST:PORT, e.g. 127.0.0.1:9092"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

fn check_name(name: &str, flag: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.contains(['\n', '\r']) || name.len() > 1024 {
        return Err(ConfigError::new(format!("{flag} {name:?}: must be 1 to 1024 bytes on one line")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ServeOptions {
        ServeOptions { synthetic: Some(10), ..ServeOptions::default() }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("256kib"), Ok(256 << 10));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("2 GB"), Ok(2_000_000_000));
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
        assert!(parse_bytes("99999999999999999999").is_err());
        assert_eq!(parse_duration_ms("10"), Ok(10_000));
        assert_eq!(parse_duration_ms("1.5"), Ok(1_500));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert!(parse_duration_ms("soon").is_err());
        assert!(parse_duration_ms("1e400").is_err());
    }

    #[test]
    fn exactly_one_source() {
        let none = ServeOptions::default();
        assert!(ServeConfig::from_options(&none).is_err());
        let both = ServeOptions { upstream: Some("h:1".into()), ..opts() };
        assert!(ServeConfig::from_options(&both).is_err());
        let bad = ServeOptions { upstream: Some("nohost".into()), ..ServeOptions::default() };
        assert!(ServeConfig::from_options(&bad).is_err());
    }

    #[test]
    fn synthetic_defaults_to_localhost() {
        let c = ServeConfig::from_options(&opts()).expect("valid");
        assert_eq!(c.hub.server_name.as_deref(), Some("localhost"));
        let named = ServeOptions { server_name: Some("example.com".into()), ..opts() };
        let c = ServeConfig::from_options(&named).expect("valid");
        assert_eq!(c.hub.server_name.as_deref(), Some("example.com"));
        let up = ServeOptions { upstream: Some("master:9092".into()), ..ServeOptions::default() };
        let c = ServeConfig::from_options(&up).expect("valid");
        assert_eq!(c.hub.server_name, None);
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: ServeOptions = toml::from_str(
            "listen = \"127.0.0.1:1\"\nsynthetic = 5\nmax-pending-bytes = \"1MiB\"\nwrite_timeout = 2.5\nmetrics-listen = \"off\"\n",
        )
        .expect("toml");
        let flags = ServeOptions { listen: Some("127.0.0.1:2".into()), ..ServeOptions::default() };
        let c = ServeConfig::from_options(&flags.merge(file)).expect("valid");
        assert_eq!(c.listen, "127.0.0.1:2".parse().expect("addr"));
        assert_eq!(c.hub.max_pending_bytes, 1 << 20);
        assert_eq!(c.hub.write_timeout_ms, 2_500);
        assert_eq!(c.metrics_listen, None);
        assert!(matches!(c.source, SourceConfig::Synthetic { rate: 5, .. }));
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(toml::from_str::<ServeOptions>("listn = \"x\"").is_err());
        assert!(toml::from_str::<ServeOptions>("io = \"kqueue\"").is_err());
        assert_eq!(
            toml::from_str::<ServeOptions>("io = \"io_uring\"").map(|o| o.io),
            Ok(Some(IoBackend::Uring))
        );
    }

    #[test]
    fn protocol_generation_flag_and_key() {
        use crate::proto::{Generation, ProtocolChoice};
        let up = ServeOptions { upstream: Some("127.0.0.1:9092".into()), ..ServeOptions::default() };
        assert_eq!(ServeConfig::from_options(&up).unwrap().hub.protocol, ProtocolChoice::Auto);
        let pinned = ServeOptions { protocol: Some(ProtocolChoice::Pinned(Generation::V1_13)), ..up };
        assert_eq!(
            ServeConfig::from_options(&pinned).unwrap().hub.protocol.pinned(),
            Some(Generation::V1_13)
        );
        let synthetic = ServeOptions { protocol: Some(ProtocolChoice::Auto), ..opts() };
        assert!(ServeConfig::from_options(&synthetic).is_err());
        assert_eq!(
            toml::from_str::<ServeOptions>("protocol = \"1.22\"").map(|o| o.protocol),
            Ok(Some(ProtocolChoice::Pinned(Generation::V1_22)))
        );
        assert!(toml::from_str::<ServeOptions>("protocol = \"1.66\"").is_err());
    }

    #[test]
    fn ranges() {
        let z = ServeOptions { threads: Some(0), ..opts() };
        assert!(ServeConfig::from_options(&z).is_err());
        let small = ServeOptions { max_pending_bytes: Some(Quantity::Int(10)), ..opts() };
        assert!(ServeConfig::from_options(&small).is_err());
        let zero = ServeOptions { write_timeout: Some(Quantity::Text("0".into())), ..opts() };
        assert!(ServeConfig::from_options(&zero).is_err());
    }

    #[test]
    fn worker_sndbuf_defaults_to_256kib_and_0_means_the_kernels() {
        assert_eq!(ServeConfig::from_options(&opts()).expect("valid").worker_sndbuf, 256 << 10);
        let sndbuf = |q: &str| {
            let o = ServeOptions { worker_sndbuf: Some(Quantity::Text(q.into())), ..opts() };
            ServeConfig::from_options(&o).map(|c| c.worker_sndbuf)
        };
        assert_eq!(sndbuf("64KiB").ok(), Some(64 << 10));
        assert_eq!(sndbuf("0").ok(), Some(0));
        assert!(sndbuf("100").is_err(), "below 4KiB");
        assert!(sndbuf("2GiB").is_err(), "above 1GiB");
        let file: ServeOptions = toml::from_str("synthetic = 5\nworker-sndbuf = \"128KiB\"\n").expect("toml");
        assert_eq!(ServeConfig::from_options(&file).expect("valid").worker_sndbuf, 128 << 10);
    }

    #[test]
    fn max_user_syncs_defaults_to_100000_and_must_be_positive() {
        assert_eq!(ServeConfig::from_options(&opts()).expect("valid").hub.max_user_syncs, 100_000);
        let zero = ServeOptions { max_user_syncs: Some(0), ..opts() };
        assert!(ServeConfig::from_options(&zero).is_err());
        let file: ServeOptions = toml::from_str("synthetic = 5\nmax-user-syncs = 50\n").expect("toml");
        assert_eq!(ServeConfig::from_options(&file).expect("valid").hub.max_user_syncs, 50);
    }

    #[test]
    fn worker_notsent_lowat_defaults_to_unset() {
        assert_eq!(ServeConfig::from_options(&opts()).expect("valid").worker_notsent_lowat, 0);
        let lowat = |q: &str| {
            let o = ServeOptions { worker_notsent_lowat: Some(Quantity::Text(q.into())), ..opts() };
            ServeConfig::from_options(&o).map(|c| c.worker_notsent_lowat)
        };
        assert_eq!(lowat("16KiB").ok(), Some(16 << 10));
        assert_eq!(lowat("0").ok(), Some(0));
        assert!(lowat("100").is_err(), "below 1KiB");
        let file: ServeOptions =
            toml::from_str("synthetic = 5\nworker-notsent-lowat = \"64KiB\"\n").expect("toml");
        assert_eq!(ServeConfig::from_options(&file).expect("valid").worker_notsent_lowat, 64 << 10);
    }
}
