//! The server under test: the hub in this process, the hub as a child `replhub serve`, the
//! ideal fan-out server in this process or as a child `replhub loadtest ideal-server`, or an
//! external server (Redis) known by its pid; and how its CPU time and memory are read.
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStderr, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::procstat::{self, Pid};
use crate::config::IoBackend;
use crate::server::Server;

/// The server under test, and how to measure it.
pub(super) enum Running {
    InProcess(Box<Server>),
    Ideal(super::ideal::IdealServer),
    Child(ChildServer),
    External(Option<u32>),
}

impl Running {
    pub(super) fn pid(&self) -> Option<Pid> {
        match self {
            Self::InProcess(_) | Self::Ideal(_) => Some(Pid::Own),
            Self::Child(c) => Some(Pid::Other(c.pid)),
            Self::External(pid) => pid.map(Pid::Other),
        }
    }

    /// Server CPU by thread.
    pub(super) fn cpu(&self) -> Option<HashMap<u64, u64>> {
        match self {
            Self::InProcess(_) | Self::Ideal(_) => {
                procstat::thread_cpu(Pid::Own, &|n| n.starts_with("replhub-")).ok()
            }
            other => procstat::thread_cpu(other.pid()?, &|_| true).ok(),
        }
    }

    pub(super) fn rss(&self) -> Option<(u64, u64)> {
        procstat::rss(self.pid()?).ok()
    }
}

/// How long a child ideal server may take to exit once its stdin is closed before it is killed.
const CHILD_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a child ideal server may take to say where it listens.
const CHILD_LISTEN_TIMEOUT: Duration = Duration::from_secs(15);

/// A server child process: a `replhub serve`, killed when dropped, or a `replhub loadtest
/// ideal-server`, stopped when dropped by closing its stdin (killed if it does not exit).
pub(super) struct ChildServer {
    child: Mutex<Child>,
    pid: u32,
    /// What the child is, for messages (`replhub serve`).
    what: &'static str,
    /// The pipe whose end stops the child, if that is how it stops.
    stdin: Option<ChildStdin>,
    backend: Arc<Mutex<Option<String>>>,
}

impl ChildServer {
    /// Why the child is gone, if it is.
    pub(super) fn exited(&self) -> Option<String> {
        let mut child = self.child.lock().ok()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited ({status})", self.what)),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let stop_by_stdin = self.stdin.take().is_some();
        if let Ok(child) = self.child.get_mut() {
            if stop_by_stdin {
                // The stdin pipe is closed now: the child sees its end and exits.
                let deadline = Instant::now() + CHILD_EXIT_TIMEOUT;
                while Instant::now() < deadline {
                    match child.try_wait() {
                        Ok(Some(status)) => {
                            if !status.success() {
                                eprintln!("{}: exited ({status})", self.what);
                            }
                            return;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                        Err(_) => break,
                    }
                }
                eprintln!(
                    "{}: still running {CHILD_EXIT_TIMEOUT:?} after the end of the run: killed",
                    self.what
                );
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `<exe> serve` on a free loopback port, dialing `master`.
pub(super) fn spawn_server(
    exe: &std::path::Path,
    master: SocketAddr,
    io: IoBackend,
    threads: usize,
    opts: &super::LoadtestOptions,
) -> anyhow::Result<(ChildServer, SocketAddr)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = Command::new(exe)
        .args(["serve", "--listen", &addr.to_string(), "--upstream", &master.to_string()])
        .args(["--metrics-listen", "off", "--threads", &threads.to_string(), "--io", io.as_str()])
        .args(["--log-level", "info"])
        .args(opts.max_pending_bytes.map(|b| format!("--max-pending-bytes={b}")))
        .args(opts.worker_sndbuf.map(|b| format!("--worker-sndbuf={b}")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {} serve", exe.display()))?;
    let backend = Arc::new(Mutex::new(None));
    if let Some(err) = child.stderr.take() {
        forward_log(err, "hub", Some(Arc::clone(&backend)))?;
    }
    let pid = child.id();
    let server = ChildServer { child: Mutex::new(child), pid, what: "replhub serve", stdin: None, backend };
    Ok((server, addr))
}

/// Starts `<exe> loadtest ideal-server` dialing `master`, and learns its address from its
/// first line on stdout (it binds its own port, so no other process can take it in between).
/// The child holds only its end of each connection, which is what lets 10 000 subscribers
/// fit a limit of 20 000 open files.
pub(super) fn spawn_ideal(
    exe: &std::path::Path,
    master: SocketAddr,
    threads: usize,
) -> anyhow::Result<(ChildServer, SocketAddr)> {
    let mut child = Command::new(exe)
        .args(["loadtest", "ideal-server", "--upstream", &master.to_string()])
        .args(["--threads", &threads.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {} loadtest ideal-server", exe.display()))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    if let Some(err) = child.stderr.take() {
        forward_log(err, "ideal", None)?;
    }
    let pid = child.id();
    let server = ChildServer {
        child: Mutex::new(child),
        pid,
        what: "the ideal server",
        stdin,
        backend: Arc::new(Mutex::new(None)),
    };
    let stdout = stdout.context("the ideal server's stdout is not a pipe")?;
    // The read blocks, so it happens on a thread of its own and is waited for with a deadline.
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new().name("lt-server-addr".to_owned()).spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    })?;
    let Ok(line) = rx.recv_timeout(CHILD_LISTEN_TIMEOUT) else {
        anyhow::bail!("the ideal server did not say where it listens within {CHILD_LISTEN_TIMEOUT:?}")
    };
    let addr = line.trim_end().strip_prefix("listening on ").and_then(|a| a.parse().ok());
    match addr {
        Some(addr) => Ok((server, addr)),
        None => {
            // An empty line is its stdout closing: it is exiting, and its status says more.
            let deadline = Instant::now() + Duration::from_secs(1);
            let why = loop {
                match server.exited() {
                    Some(why) => break why,
                    None if Instant::now() >= deadline => break format!("it printed {line:?}"),
                    None => std::thread::sleep(Duration::from_millis(5)),
                }
            };
            anyhow::bail!("the ideal server did not start: {why}")
        }
    }
}

/// Copies a child's warnings and errors to stderr, prefixed with `who`; with `backend` (the hub,
/// which also logs at info level), notes the I/O backend it logs (`io backend: …`) and copies
/// only the lines at WARN or ERROR; without, copies every line (the ideal server logs only
/// warnings, and its fatal error).
fn forward_log(
    err: ChildStderr,
    who: &'static str,
    backend: Option<Arc<Mutex<Option<String>>>>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("lt-server-log".to_owned()).spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let (Some(backend), Some(rest)) = (&backend, line.split("io backend: ").nth(1)) {
                let name = rest.split_whitespace().next().unwrap_or("").to_owned();
                if let Ok(mut b) = backend.lock() {
                    *b = Some(name);
                }
            }
            if backend.is_none() || line.contains("WARN") || line.contains("ERROR") {
                eprintln!("{who}: {line}");
            }
        }
    })?;
    Ok(())
}

/// Waits until the child hub accepts connections.
pub(super) fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("the hub does not listen on {addr}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The backend the child hub logged (`io backend: …`), waiting briefly for the line.
pub(super) fn wait_backend(c: &ChildServer) -> String {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(b) = c.backend.lock().ok().and_then(|b| b.clone()) {
            return b;
        }
        if Instant::now() >= deadline {
            return "unknown".to_owned();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
