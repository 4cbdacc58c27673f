//! The server under test: the hub in this process, the hub as a child `replhub serve`, the
//! ideal fan-out server in this process, or an external server (Redis) known by its pid; and how its CPU time and memory are read.
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
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

/// A `replhub serve` child, killed when dropped.
pub(super) struct ChildServer {
    child: Mutex<Child>,
    pid: u32,
    backend: Arc<Mutex<Option<String>>>,
}

impl ChildServer {
    /// Why the child is gone, if it is.
    pub(super) fn exited(&self) -> Option<String> {
        let mut child = self.child.lock().ok()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(format!("replhub serve exited ({status})")),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
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
        let backend = Arc::clone(&backend);
        std::thread::Builder::new().name("lt-server-log".to_owned()).spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("io backend: ").nth(1) {
                    let name = rest.split_whitespace().next().unwrap_or("").to_owned();
                    if let Ok(mut b) = backend.lock() {
                        *b = Some(name);
                    }
                }
                if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("hub: {line}");
                }
            }
        })?;
    }
    let pid = child.id();
    Ok((ChildServer { child: Mutex::new(child), pid, backend }, addr))
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
