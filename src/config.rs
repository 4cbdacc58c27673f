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
use std::time::Duration;

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
    /// A real Redis (`--upstream-redis`): Redis mode bridged to it. replhub subscribes once
    /// to the Synapse channels there, delivers what arrives to its own RESP clients, and
    /// publishes their messages on those channels there (they come back through the
    /// subscription, so every client gets each message once).
    Redis(RedisUpstream),
    /// No replication source: Redis mode alone (`--resp-listen` without `--upstream` or
    /// `--synthetic`), replhub as a pub/sub broker.
    None,
}

/// Where `--upstream-redis` points, parsed from `redis://[[user]:password@]HOST:PORT[/db]`
/// (or `rediss://…` for TLS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisUpstream {
    /// `HOST:PORT`.
    pub addr: String,
    /// AUTH user, if given.
    pub user: Option<String>,
    /// AUTH password, if given.
    pub password: Option<String>,
    /// The channels subscribed there: the server name and `<server name>/USER_IP`.
    pub channels: Vec<String>,
    /// TLS settings, for a `rediss://` URL.
    pub tls: Option<RedisTls>,
}

/// TLS to the Redis upstream (`rediss://`): the server's certificate is checked against the
/// system's trusted roots (or `ca_file`) and the URL's host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisTls {
    /// The name the server's certificate must carry: the URL's host (a DNS name or an IP).
    pub server_name: String,
    /// PEM certificates to trust instead of the system's roots (`--upstream-redis-ca`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and its private key, for a Redis that checks clients'
    /// certificates (`tls-auth-clients yes`, Redis's default): `--upstream-redis-cert` and
    /// `--upstream-redis-key`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl RedisUpstream {
    /// Parses the URL; `server_name` names the channels.
    pub fn parse(url: &str, server_name: &str) -> Result<Self, ConfigError> {
        Self::parse_for("--upstream-redis", url, server_name)
    }

    /// [`RedisUpstream::parse`] for the option `flag` (named in the errors).
    pub fn parse_for(flag: &str, url: &str, server_name: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| {
            ConfigError::new(format!(
                "{flag} {url:?}: {why} (expected redis://[[user]:password@]HOST:PORT[/db], \
                 or rediss://… for TLS)"
            ))
        };
        let (rest, tls) = match (url.strip_prefix("redis://"), url.strip_prefix("rediss://")) {
            (Some(rest), _) => (rest, false),
            (None, Some(rest)) => (rest, true),
            (None, None) => return Err(bad("not a redis:// or rediss:// URL")),
        };
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        // The database does not matter to pub/sub (channels are global in Redis).
        let addr = hostpart.split('/').next().unwrap_or_default();
        check_host_port(addr, flag).map_err(|_| bad("bad HOST:PORT"))?;
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_owned()), Some(p.to_owned())),
                None => (None, Some(a.to_owned())),
            },
        };
        let tls = tls.then(|| {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            RedisTls { server_name: host.to_owned(), ca_file: None, client_cert: None }
        });
        Ok(Self {
            addr: addr.to_owned(),
            user,
            password,
            channels: vec![server_name.to_owned(), format!("{server_name}/USER_IP")],
            tls,
        })
    }

    /// Applies `--upstream-redis-ca`, `--upstream-redis-cert` and `--upstream-redis-key`,
    /// which need a `rediss://` URL (and the certificate and key go together).
    fn with_tls_files(
        mut self,
        ca: Option<&PathBuf>,
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
    ) -> Result<Self, ConfigError> {
        if ca.is_none() && cert.is_none() && key.is_none() {
            return Ok(self);
        }
        let Some(tls) = &mut self.tls else {
            return Err(ConfigError::new(
                "--upstream-redis-ca, --upstream-redis-cert and --upstream-redis-key need a rediss:// URL (TLS)",
            ));
        };
        tls.ca_file = ca.cloned();
        tls.client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => {
                return Err(ConfigError::new(
                    "--upstream-redis-cert and --upstream-redis-key go together (a client certificate and its key)",
                ))
            }
        };
        Ok(self)
    }
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
    /// `/healthz` turns 503 once the upstream has been disconnected for longer than this (ms).
    pub health_upstream_grace_ms: u64,
    /// Redis-mode listen address (`--resp-listen`); `None`: no Redis mode.
    pub resp_listen: Option<SocketAddr>,
    /// Redis-mode settings (used when `resp_listen` is set).
    pub resp: crate::resp::RespConfig,
    /// TCP_NOTSENT_LOWAT for accepted worker sockets (0: 64 KiB until the worker proves it
    /// reads, then none).
    pub worker_notsent_lowat: usize,
    /// When a core holds its mailbox back so that close lines share writes
    /// (`--coalesce-above`, `--coalesce-window`).
    pub moderation: ModerationConfig,
}

/// Default `--coalesce-above`: 200 000 would-be writes a second on one core. At about a
/// microsecond of kernel time per small write that is a fifth of a CPU in per-write costs
/// alone, where sharing writes starts to pay back more than the window costs (README, "Write
/// moderation").
pub const DEFAULT_COALESCE_ABOVE: u64 = 200_000;

/// Default `--coalesce-window`: 200 µs. At 10 000 lines/s to 100 workers on two vCPUs it cut the
/// p99 by a third to a half and left the median where it was (README, "Write moderation").
pub const DEFAULT_COALESCE_WINDOW: Duration = Duration::from_micros(200);

/// When a core moderates its writes, as configured (`--coalesce-above`, `--coalesce-window`):
/// see the module `driver::moderation` and README, "Write moderation".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModerationConfig {
    /// Would-be writes per second on one core at which moderation engages; 0: never.
    pub above: u64,
    /// How long after a fan-out turn began the core leaves its mailbox alone while engaged.
    pub window: Duration,
}

impl Default for ModerationConfig {
    fn default() -> Self {
        Self { above: DEFAULT_COALESCE_ABOVE, window: DEFAULT_COALESCE_WINDOW }
    }
}

impl ModerationConfig {
    /// Never moderate: every batch goes out in the turn after it arrives.
    pub const OFF: Self = Self { above: 0, window: Duration::ZERO };
}

/// Longest `--coalesce-window` accepted: a line never waits longer than this for company.
pub const MAX_COALESCE_WINDOW_US: u64 = 10_000;

/// Default `--health-upstream-grace`: long enough for a reconnect with backoff, short enough
/// for a load balancer to notice a master that is gone.
pub const DEFAULT_HEALTH_UPSTREAM_GRACE_MS: u64 = 30_000;

/// Default `--worker-sndbuf`: a worker that stops reading holds at most this much kernel
/// memory (twice this, as Linux counts it), and costs the core at most this much copying.
pub const DEFAULT_WORKER_SNDBUF: usize = 256 << 10;

/// Default `--worker-notsent-lowat`: 0, which sets 64 KiB on every worker socket until the
/// worker has proven it reads (its socket took more than 1 MiB) and lifts it then. So a worker
/// that stops reading takes its receive window plus 64 KiB before its socket blocks, not its
/// whole send buffer as well: a crowd of them is filled several times faster and holds that
/// much less kernel memory, and a reader's socket queues as much as the kernel lets it once
/// proven. A value other than 0 applies to every worker socket for good.
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
        // Only a master can be asked for rows older than the history (1.10–1.12 workers).
        hub.fetch_catch_up = matches!(source, SourceConfig::Upstream { .. });
        // Synapse on Redis speaks 1.13+ (1.22+ POSITIONs unless `--protocol 1.13` says so):
        // TCP workers behind it are served as its processes are (`hub/subscribe.rs`).
        if let SourceConfig::Redis(r) = &source {
            // The first channel is the server name; workers are greeted with it at once.
            hub.server_name = r.channels.first().cloned();
            hub.redis_bridge = true;
            hub.protocol = crate::proto::ProtocolChoice::Pinned(crate::proto::Generation::V1_22);
        }
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            source,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9093))),
            threads: default_threads(),
            io: IoBackend::Auto,
            hub,
            worker_sndbuf: DEFAULT_WORKER_SNDBUF,
            health_upstream_grace_ms: DEFAULT_HEALTH_UPSTREAM_GRACE_MS,
            resp_listen: None,
            resp: crate::resp::RespConfig::default(),
            worker_notsent_lowat: DEFAULT_WORKER_NOTSENT_LOWAT,
            moderation: ModerationConfig::default(),
        }
    }

    /// Validates user options (flags already merged over the file).
    pub fn from_options(opts: &ServeOptions) -> Result<Self, ConfigError> {
        let source = match (&opts.upstream, opts.synthetic) {
            _ if opts.upstream_redis.is_some() => {
                let url = opts.upstream_redis.as_deref().unwrap_or_default();
                if opts.upstream.is_some() || opts.synthetic.is_some() {
                    return Err(ConfigError::new("give one of --upstream, --synthetic and --upstream-redis"));
                }
                let Some(name) = &opts.server_name else {
                    return Err(ConfigError::new(
                        "--upstream-redis needs --server-name (Synapse's channels are named after it)",
                    ));
                };
                SourceConfig::Redis(RedisUpstream::parse(url, name)?.with_tls_files(
                    opts.upstream_redis_ca.as_ref(),
                    opts.upstream_redis_cert.as_ref(),
                    opts.upstream_redis_key.as_ref(),
                )?)
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::new("give either --upstream or --synthetic, not both"))
            }
            (None, None) if opts.resp_listen.is_some() => SourceConfig::None,
            (None, None) => {
                return Err(ConfigError::new(
                    "no data source: give --upstream HOST:PORT (a Synapse master), --synthetic RATE \
                     (the built-in generator) or --resp-listen ADDR (Redis mode alone)",
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
                return Err(ConfigError::new("--protocol only applies with --upstream (the synthetic master plays the release given by --synapse-version)"));
            }
            if matches!(config.source, SourceConfig::Redis(_))
                && !protocol.pinned().is_some_and(|g| g.has_instance())
            {
                return Err(ConfigError::new(
                    "--upstream-redis speaks Synapse 1.13+'s protocol: --protocol 1.13 or 1.22 (the default)",
                ));
            }
            config.hub.protocol = protocol;
        }
        if let Some(release) = opts.synapse_version {
            // The release fixes the wire generation; an explicit --protocol must agree.
            let generation = release.generation();
            if let Some(other) = opts.protocol.and_then(crate::proto::ProtocolChoice::pinned) {
                if other != generation {
                    return Err(ConfigError::new(format!(
                        "--synapse-version {release} speaks protocol {generation}, not --protocol {other}"
                    )));
                }
            }
            if matches!(config.source, SourceConfig::Redis(_)) && !generation.has_instance() {
                return Err(ConfigError::new(format!(
                    "--synapse-version {release} has no Redis support (1.13 or later)"
                )));
            }
            if matches!(config.source, SourceConfig::Upstream { .. } | SourceConfig::Redis(_)) {
                config.hub.protocol = crate::proto::ProtocolChoice::Pinned(generation);
            }
            config.hub.release = Some(release);
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
        if let Some(bytes) = &opts.history_bytes {
            let bytes = bytes.to_string();
            config.hub.history_bytes = parse_bytes(&bytes)
                .map_err(|e| ConfigError::new(format!("--history-bytes {bytes:?}: {e}")))?;
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
        if let Some(t) = &opts.health_upstream_grace {
            let t = t.to_string();
            config.health_upstream_grace_ms = parse_duration_ms(&t)
                .map_err(|e| ConfigError::new(format!("--health-upstream-grace {t:?}: {e}")))?;
        }
        resp_options(opts, &mut config)?;
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
        if let Some(n) = opts.coalesce_above {
            config.moderation.above = n;
        }
        if let Some(t) = &opts.coalesce_window {
            let t = t.to_string();
            let us = parse_duration_us(&t)
                .map_err(|e| ConfigError::new(format!("--coalesce-window {t:?}: {e}")))?;
            if us > MAX_COALESCE_WINDOW_US {
                return Err(ConfigError::new(format!(
                    "--coalesce-window {t:?} is out of range (0 for none, or up to 10ms)"
                )));
            }
            config.moderation.window = Duration::from_micros(us);
        }
        Ok(config)
    }

    /// A short description of the source for logs.
    pub fn source_label(&self) -> String {
        match &self.source {
            SourceConfig::Upstream { addr, .. } => format!("upstream {addr}"),
            SourceConfig::Synthetic { rate: 0, .. } => "synthetic (unlimited rate)".to_owned(),
            SourceConfig::Synthetic { rate, .. } => format!("synthetic ({rate} lines/s)"),
            SourceConfig::None => "none (Redis mode only)".to_owned(),
            SourceConfig::Redis(r) => format!("redis {}", r.addr),
        }
    }
}

/// The Redis-mode options (`--resp-*`).
fn resp_options(opts: &ServeOptions, config: &mut ServeConfig) -> Result<(), ConfigError> {
    let Some(listen) = &opts.resp_listen else {
        let given = opts.resp_password.is_some()
            || opts.resp_user.is_some()
            || opts.resp_max_bulk_len.is_some()
            || opts.resp_max_args.is_some()
            || opts.resp_output_limit.is_some()
            || opts.resp_cache_max_bytes.is_some();
        if given {
            return Err(ConfigError::new("the --resp-* options only apply with --resp-listen"));
        }
        return Ok(());
    };
    config.resp_listen = Some(resolve(listen, "--resp-listen")?);
    let resp = &mut config.resp;
    if let SourceConfig::Redis(r) = &config.source {
        resp.upstream_channels = r.channels.clone();
    }
    if opts.resp_user.is_some() && opts.resp_password.is_none() {
        return Err(ConfigError::new("--resp-user needs --resp-password"));
    }
    if let Some(p) = &opts.resp_password {
        if p.is_empty() {
            return Err(ConfigError::new("--resp-password must not be empty"));
        }
    }
    resp.session.password = opts.resp_password.clone();
    resp.session.user = opts.resp_user.clone();
    if let Some(q) = &opts.resp_max_bulk_len {
        let q = q.to_string();
        let n = parse_bytes(&q).map_err(|e| ConfigError::new(format!("--resp-max-bulk-len {q:?}: {e}")))?;
        if !(1 << 10..=1 << 30).contains(&n) {
            return Err(ConfigError::new(format!("--resp-max-bulk-len {q:?} is out of range (1KiB..=1GiB)")));
        }
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        resp.session.limits.max_bulk_len = n;
        resp.session.limits.max_command_bytes = resp.session.limits.max_command_bytes.max(n);
    }
    if let Some(n) = opts.resp_max_args {
        if !(3..=1 << 20).contains(&n) {
            return Err(ConfigError::new(format!("--resp-max-args {n} is out of range (3..=1048576)")));
        }
        resp.session.limits.max_args = n;
    }
    if let Some(text) = &opts.resp_output_limit {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let bad = || {
            ConfigError::new(format!(
                "--resp-output-limit {text:?}: expected \"HARD SOFT SECONDS\" as Redis's \
                 client-output-buffer-limit (e.g. \"32mb 8mb 60\", 0 for none)"
            ))
        };
        let [hard, soft, secs] = parts[..] else { return Err(bad()) };
        resp.output.hard = redis_memory(hard).ok_or_else(bad)?;
        resp.output.soft = redis_memory(soft).ok_or_else(bad)?;
        resp.output.soft_ms = secs.parse::<u64>().map_err(|_| bad())?.saturating_mul(1000);
    }
    if let Some(q) = &opts.resp_cache_max_bytes {
        let q = q.to_string();
        let n =
            parse_bytes(&q).map_err(|e| ConfigError::new(format!("--resp-cache-max-bytes {q:?}: {e}")))?;
        resp.cache_max_bytes = usize::try_from(n).unwrap_or(usize::MAX);
    }
    Ok(())
}

/// A memory amount as Redis's config reads it (`memtoull`): `k`/`m`/`g` are powers of 1000,
/// `kb`/`mb`/`gb` powers of 1024, case-insensitive.
fn redis_memory(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" => 1_000,
        "kb" => 1 << 10,
        "m" => 1_000_000,
        "mb" => 1 << 20,
        "g" => 1_000_000_000,
        "gb" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
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
    ///
    /// The source thread that reads the master comes on top, except with 1: the core then runs
    /// the source itself. On a 2-CPU machine that also runs the workers, 1 gives a shorter tail
    /// at moderate load for less at saturation (README, "How many core threads on a small
    /// machine", "The source on the core's thread").
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
    /// connection), 1.10 (Synapse 1.10–1.12; also accepted as 1.12), seed, 1.13 (Synapse
    /// 1.13–1.21) or 1.22 (Synapse 1.22–1.66) [default: auto]
    #[arg(long, value_name = "GENERATION")]
    pub protocol: Option<crate::proto::ProtocolChoice>,
    /// The Synapse release of the master, 1.10 to 1.66 (e.g. 1.66, 1.22.1 or 1.12). With
    /// --upstream: pins its protocol and lets replhub answer the worker commands that release
    /// lacks (INVALIDATE_CACHE from 1.14, REMOVE_PUSHER from 1.29) as it would, instead of
    /// dropping them. With --synthetic: the built-in master writes exactly that release's lines
    /// (1.10–1.12: and its workers are caught up from their token) [default: the seed's]
    #[arg(long, value_name = "X.Y")]
    #[serde(alias = "synapse_version")]
    pub synapse_version: Option<crate::proto::SynapseRelease>,
    /// Recent upstream batches kept per core to catch Synapse 1.10–1.12 workers up from the
    /// token in their `REPLICATE <stream> <token>` (suffixes as --max-pending-bytes; cores
    /// share the bytes) [default: 16MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(alias = "history_bytes")]
    pub history_bytes: Option<Quantity>,
    /// Kernel send buffer (SO_SNDBUF) of each worker socket; bounds what a worker that stops
    /// reading holds in the kernel. 0 leaves the kernel's auto-tuning [default: 256KiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(alias = "worker_sndbuf")]
    pub worker_sndbuf: Option<Quantity>,
    /// /healthz answers 503 once the upstream has been disconnected for longer than this
    /// (seconds, or with a unit: 500ms, 1m) [default: 30]
    #[arg(long, value_name = "SECS")]
    #[serde(alias = "health_upstream_grace")]
    pub health_upstream_grace: Option<Quantity>,
    /// Redis mode: also speak RESP2 (Redis pub/sub, SET/GET) on this address, so Synapse's
    /// `redis:` replication can point here. Alone (no --upstream/--synthetic), replhub is a
    /// pure pub/sub broker
    #[arg(long, value_name = "ADDR")]
    #[serde(alias = "resp_listen")]
    pub resp_listen: Option<String>,
    /// Bridge to a real Redis: subscribe there once to the Synapse channels (--server-name
    /// and NAME/USER_IP) and serve this machine's local RESP clients (--resp-listen) and TCP
    /// replication workers (--listen, Synapse 1.22–1.66; --protocol 1.13 for 1.13–1.21) as
    /// Synapse's own processes on that Redis; their messages are published there
    /// (rediss:// for TLS)
    #[arg(long, value_name = "redis://[[USER]:PASS@]HOST:PORT[/DB]")]
    #[serde(alias = "upstream_redis")]
    pub upstream_redis: Option<String>,
    /// With a rediss:// --upstream-redis: trust the certificates in this PEM file (a private
    /// CA) instead of the system's roots
    #[arg(long, value_name = "PEM")]
    #[serde(alias = "upstream_redis_ca")]
    pub upstream_redis_ca: Option<PathBuf>,
    /// With a rediss:// --upstream-redis: present this PEM certificate chain to a Redis that
    /// checks clients' certificates (tls-auth-clients); needs --upstream-redis-key
    #[arg(long, value_name = "PEM")]
    #[serde(alias = "upstream_redis_cert")]
    pub upstream_redis_cert: Option<PathBuf>,
    /// The private key (PEM) of --upstream-redis-cert
    #[arg(long, value_name = "PEM")]
    #[serde(alias = "upstream_redis_key")]
    pub upstream_redis_key: Option<PathBuf>,
    /// Redis mode: require AUTH with this password (Redis's requirepass)
    #[arg(long, value_name = "PASSWORD")]
    #[serde(alias = "resp_password")]
    pub resp_password: Option<String>,
    /// Redis mode: the user name `AUTH user password` accepts [default: default]
    #[arg(long, value_name = "USER")]
    #[serde(alias = "resp_user")]
    pub resp_user: Option<String>,
    /// Redis mode: largest argument (and command) accepted, in bytes [default: 64MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(alias = "resp_max_bulk_len")]
    pub resp_max_bulk_len: Option<Quantity>,
    /// Redis mode: most arguments in one command [default: 1024]
    #[arg(long, value_name = "N")]
    #[serde(alias = "resp_max_args")]
    pub resp_max_args: Option<usize>,
    /// Redis mode: "HARD SOFT SECONDS", Redis's client-output-buffer-limit for subscribers
    /// [default: "32mb 8mb 60"]
    #[arg(long, value_name = "LIMITS")]
    #[serde(alias = "resp_output_limit")]
    pub resp_output_limit: Option<String>,
    /// Redis mode: memory bound of the SET/GET store [default: 64MiB]
    #[arg(long, value_name = "BYTES")]
    #[serde(alias = "resp_cache_max_bytes")]
    pub resp_cache_max_bytes: Option<Quantity>,
    /// Most bytes a worker socket holds unsent (TCP_NOTSENT_LOWAT): with the peer's receive
    /// window, what a worker that stops reading costs in kernel memory and copying. 0 sets
    /// 64 KiB until the worker has proven it reads (1 MiB taken) and lifts it then [default: 0]
    #[arg(long, value_name = "BYTES")]
    #[serde(alias = "worker_notsent_lowat")]
    pub worker_notsent_lowat: Option<Quantity>,
    /// Most distinct users one worker connection may hold syncing (USER_SYNC start without
    /// end); one more is ERROR and a close [default: 100000]
    #[arg(long, value_name = "N")]
    #[serde(alias = "max_user_syncs")]
    pub max_user_syncs: Option<usize>,
    /// Write moderation: a core whose fan-out would make this many writes per second or more
    /// (lines taken one by one, times the workers written) takes its mailbox at most once per
    /// --coalesce-window, so lines close together share one write per worker; 0: never
    /// (README, "Write moderation") [default: 200000]
    #[arg(long, value_name = "WRITES_PER_SEC")]
    #[serde(alias = "coalesce_above")]
    pub coalesce_above: Option<u64>,
    /// Write moderation: the longest a line waits for company while it is on (with a unit:
    /// 100us, 0.5ms; up to 10ms; 0: never) [default: 200us]
    #[arg(long, value_name = "DURATION")]
    #[serde(alias = "coalesce_window")]
    pub coalesce_window: Option<Quantity>,
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
            synapse_version: self.synapse_version.or(file.synapse_version),
            history_bytes: self.history_bytes.or(file.history_bytes),
            worker_sndbuf: self.worker_sndbuf.or(file.worker_sndbuf),
            health_upstream_grace: self.health_upstream_grace.or(file.health_upstream_grace),
            worker_notsent_lowat: self.worker_notsent_lowat.or(file.worker_notsent_lowat),
            max_user_syncs: self.max_user_syncs.or(file.max_user_syncs),
            coalesce_above: self.coalesce_above.or(file.coalesce_above),
            coalesce_window: self.coalesce_window.or(file.coalesce_window),
            log_level: self.log_level.or(file.log_level),
            resp_listen: self.resp_listen.or(file.resp_listen),
            upstream_redis: self.upstream_redis.or(file.upstream_redis),
            upstream_redis_ca: self.upstream_redis_ca.or(file.upstream_redis_ca),
            upstream_redis_cert: self.upstream_redis_cert.or(file.upstream_redis_cert),
            upstream_redis_key: self.upstream_redis_key.or(file.upstream_redis_key),
            resp_password: self.resp_password.or(file.resp_password),
            resp_user: self.resp_user.or(file.resp_user),
            resp_max_bulk_len: self.resp_max_bulk_len.or(file.resp_max_bulk_len),
            resp_max_args: self.resp_max_args.or(file.resp_max_args),
            resp_output_limit: self.resp_output_limit.or(file.resp_output_limit),
            resp_cache_max_bytes: self.resp_cache_max_bytes.or(file.resp_cache_max_bytes),
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
    parse_duration(s, 1000.0)
}

/// Parses a duration as [`parse_duration_ms`] does, and also in microseconds (`100us`,
/// `100µs`); in µs.
pub fn parse_duration_us(s: &str) -> Result<u64, String> {
    parse_duration(s, 1.0)
}

/// A duration in units of `unit_us` microseconds, rounded.
fn parse_duration(s: &str, unit_us: f64) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| "expected a number of seconds, e.g. 10 or 500ms".to_owned())?;
    let us = match unit.trim() {
        "" | "s" => 1e6,
        "ms" => 1e3,
        "us" | "µs" if unit_us < 1000.0 => 1.0,
        "m" | "min" => 6e7,
        other if unit_us < 1000.0 => return Err(format!("unknown unit {other:?} (use us, ms, s or m)")),
        other => return Err(format!("unknown unit {other:?} (use ms, s or m)")),
    };
    let v = n * us / unit_us;
    if !v.is_finite() || n * us > 86_400e6 * 365.0 {
        return Err("duration too long".to_owned());
    }
    Ok(v.round() as u64)
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
mod tests;
