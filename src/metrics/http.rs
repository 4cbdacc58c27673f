//! The operator's HTTP endpoint (`/metrics`, `/connections`, `/healthz`): a small HTTP/1.1
//! server on a thread of its own, independent of the I/O driver.
//!
//! ```text
//!  listener ─accept─► Conns: at most max_conns; when full, the oldest connection not being
//!      │               rendered for is closed (or, if every one is, the newcomer gets a 503)
//!      └─► one task per connection, all under one conn_timeout from accept:
//!            read the head (≤ MAX_HEAD bytes, head_timeout) ─► Routes::route
//!              ─► render on the render thread (asks every core) ─► write ─► half-close, linger
//! ```
//!
//! The thread runs a tokio current-thread runtime, so a silent, trickling or non-reading client
//! occupies one small task and never delays another connection: a scrape is answered as soon as
//! its own request has arrived and the cores have answered. Rendering (which blocks on the cores'
//! replies) runs on the runtime's one blocking thread, so scrapes are rendered one at a time and
//! only for complete requests. Every response says `Connection: close` and the server closes
//! first, so a client that keeps its end open after reading costs at most `linger`, and can be
//! closed at once to make room.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio::time::{timeout_at, Instant};

use super::connections::ConnQuery;

/// Longest request head accepted (request line and headers).
pub(crate) const MAX_HEAD: usize = 8 * 1024;

/// The content type of Prometheus text exposition 0.0.4.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type of `/connections`.
pub(crate) const JSON_CONTENT_TYPE: &str = "application/json";

/// Listen backlog. Accepting never waits on a client, so the queue only has to absorb a burst of
/// connects between two turns of the accept loop.
const BACKLOG: i32 = 1024;

/// Pause after an accept error such as `EMFILE`, which would otherwise repeat at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// How long stopping waits for a render in progress before leaving it behind.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Limits on each connection to the endpoint and on all of them together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once (at least 1). When full, a new connection closes the oldest one that is not
    /// waiting for its render (so a crowd of slow clients cannot lock a scrape out); if every
    /// one is, the newcomer is told `503 Service Unavailable` and closed.
    pub max_conns: usize,
    /// Time a client has, from accept, to send its whole request head; then it is told
    /// `408 Request Timeout` (or closed without a word if it sent nothing).
    pub head_timeout: Duration,
    /// Time a connection may live from accept, whatever it is doing (waiting for the render,
    /// or writing to a client that does not read).
    pub conn_timeout: Duration,
    /// After responding, how long to drain what the client still sends before closing, so that
    /// unread request bytes do not turn our close into a reset that destroys the response.
    pub linger: Duration,
}

impl Default for Limits {
    /// 128 connections (a Prometheus server uses one per scrape), 2 s for the head, 10 s in all
    /// (Prometheus's default scrape timeout), 500 ms of linger.
    fn default() -> Self {
        Self {
            max_conns: 128,
            head_timeout: Duration::from_secs(2),
            conn_timeout: Duration::from_secs(10),
            linger: Duration::from_millis(500),
        }
    }
}

/// Produces `/metrics`'s body; called on the render thread, once per complete request for it.
type Render = Arc<dyn Fn() -> String + Send + Sync>;
/// Produces `/connections`'s JSON for a parsed query; called on the render thread.
type RenderConnections = Arc<dyn Fn(&ConnQuery) -> String + Send + Sync>;
/// Says whether the server is healthy (`Err` says why not); called on the render thread.
type CheckHealth = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The pages an endpoint serves: `/metrics` always, `/connections` and `/healthz` when given.
#[derive(Clone)]
pub struct Pages {
    metrics: Render,
    connections: Option<RenderConnections>,
    health: Option<CheckHealth>,
}

impl Pages {
    /// Serves `/metrics` with what `render` returns, and nothing else.
    pub fn metrics(render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self { metrics: Arc::new(render), connections: None, health: None }
    }

    /// Also serves `/connections` with the JSON `render` returns for the request's query.
    #[must_use]
    pub fn with_connections(mut self, render: impl Fn(&ConnQuery) -> String + Send + Sync + 'static) -> Self {
        self.connections = Some(Arc::new(render));
        self
    }

    /// Also serves `/healthz`: `200 ok` while `check` says `Ok`, else `503` with its reason.
    #[must_use]
    pub fn with_health(mut self, check: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Self {
        self.health = Some(Arc::new(check));
        self
    }
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pages")
            .field("connections", &self.connections.is_some())
            .field("health", &self.health.is_some())
            .finish_non_exhaustive()
    }
}

/// A running `/metrics` endpoint. Stops (and joins its thread) on [`shutdown`](Self::shutdown)
/// or drop.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves `GET /metrics` with the text `render` returns, on a new thread,
    /// with the default [`Limits`].
    ///
    /// `render` is called once per complete `GET /metrics` request, on the render thread, one
    /// call at a time.
    pub fn start(addr: SocketAddr, render: impl Fn() -> String + Send + Sync + 'static) -> io::Result<Self> {
        Self::start_with(addr, Limits::default(), render)
    }

    /// [`MetricsServer::start`] with explicit limits (tests use small ones).
    pub fn start_with(
        addr: SocketAddr,
        limits: Limits,
        render: impl Fn() -> String + Send + Sync + 'static,
    ) -> io::Result<Self> {
        Self::start_pages(addr, limits, Pages::metrics(render))
    }

    /// Binds `addr` and serves `pages` on a new thread.
    pub fn start_pages(addr: SocketAddr, limits: Limits, pages: Pages) -> io::Result<Self> {
        let listener = bind(addr)?;
        let local_addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            // One blocking thread: scrapes are rendered one at a time, which bounds what a burst
            // of requests can ask of the cores.
            .max_blocking_threads(1)
            .thread_name("replhub-metrics")
            .build()?;
        let listener = {
            let _in_runtime = rt.enter();
            TcpListener::from_std(listener)?
        };
        // With no slot at all every connection would be refused.
        let limits = Limits { max_conns: limits.max_conns.max(1), ..limits };
        let shared =
            Arc::new(Shared { limits, routes: Routes { pages }, conns: Mutex::new(Conns::default()) });
        let (stop, stopped) = oneshot::channel();
        let thread =
            std::thread::Builder::new().name("replhub-metrics-http".to_owned()).spawn(move || {
                rt.block_on(accept_loop(listener, shared, stopped));
                // The listener is closed by now; this drops every connection still open.
                rt.shutdown_timeout(SHUTDOWN_GRACE);
            })?;
        Ok(Self { local_addr, stop: Some(stop), thread: Some(thread) })
    }

    /// The address actually bound (useful with port 0).
    pub const fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every open connection (waiting at most 1 s for a render in
    /// progress) and joins the thread. The port is free when this returns.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the accept loop has already ended; joining is all that is left.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("metrics thread panicked");
            }
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// A non-blocking listener with a backlog large enough for a burst of connects.
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// What every connection task shares.
struct Shared {
    limits: Limits,
    routes: Routes,
    conns: Mutex<Conns>,
}

impl Shared {
    /// The registry. Held only between awaits, on the one runtime thread, so never contended;
    /// nothing in it can be left half-updated by a panic.
    fn conns(&self) -> MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The open connections, by id (ids grow with accept order, so the first is the oldest).
///
/// A connection's task is registered right after it is spawned, before it first runs: the
/// runtime has one thread, and the accept loop does not yield in between.
#[derive(Default)]
struct Conns {
    /// Connections that may be closed to make room: reading a head, writing, lingering.
    evictable: BTreeMap<u64, AbortHandle>,
    /// Connections waiting for their render, which are never closed to make room: each is a
    /// complete request, and its render is bounded by the cores' reply timeout.
    rendering: BTreeMap<u64, AbortHandle>,
}

impl Conns {
    fn len(&self) -> usize {
        self.evictable.len() + self.rendering.len()
    }

    /// Closes the oldest evictable connections until fewer than `max` remain; false if that is
    /// not possible (every connection is waiting for a render).
    fn make_room(&mut self, max: usize) -> bool {
        while self.len() >= max {
            if !self.evict_oldest() {
                return false;
            }
        }
        true
    }

    /// Aborts the oldest evictable connection's task (dropping it closes the socket).
    fn evict_oldest(&mut self) -> bool {
        match self.evictable.pop_first() {
            Some((_, task)) => {
                task.abort();
                true
            }
            None => false,
        }
    }

    /// Moves `id` into or out of the rendering set; false if it is not registered.
    fn set_rendering(&mut self, id: u64, rendering: bool) -> bool {
        let (from, to) = if rendering {
            (&mut self.evictable, &mut self.rendering)
        } else {
            (&mut self.rendering, &mut self.evictable)
        };
        match from.remove(&id) {
            Some(task) => {
                to.insert(id, task);
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, id: u64) {
        self.evictable.remove(&id);
        self.rendering.remove(&id);
    }
}

/// Unregisters a connection when its task ends, however it ends (finished, timed out, evicted,
/// runtime shut down).
struct Registered<'a> {
    id: u64,
    shared: &'a Shared,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.conns().remove(self.id);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let id = next_id;
                next_id += 1;
                let mut conns = shared.conns();
                if !conns.make_room(shared.limits.max_conns) {
                    drop(conns);
                    tracing::debug!(%peer, "metrics endpoint full of renders; refusing a connection");
                    refuse(&stream);
                    continue;
                }
                let task = tokio::spawn(serve_conn(stream, peer, id, Instant::now(), Arc::clone(&shared)));
                conns.evictable.insert(id, task.abort_handle());
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
            Err(e) => {
                // Out of descriptors, most likely: give back the oldest idle one so the next
                // accept can succeed, instead of leaving the listen queue to fill.
                let freed = shared.conns().evict_oldest();
                tracing::warn!(error = %e, freed, "metrics listener accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Best effort `503` to a connection there is no room for: one non-blocking write (the socket's
/// empty send buffer takes it whole), then close.
fn refuse(stream: &TcpStream) {
    let reply = Reply {
        extra_header: Some("Retry-After: 1"),
        ..Reply::text("503 Service Unavailable", "too many connections\n")
    };
    let _ = stream.try_write(&reply.into_bytes());
}

async fn serve_conn(
    mut stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    accepted: Instant,
    shared: Arc<Shared>,
) {
    let _registered = Registered { id, shared: &shared };
    let limits = shared.limits;
    match timeout_at(accepted + limits.conn_timeout, exchange(&mut stream, id, accepted, &shared)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics request failed"),
        Err(_) => tracing::debug!(%peer, "metrics connection timed out"),
    }
}

/// Reads one request, answers it, half-closes and lingers.
async fn exchange(stream: &mut TcpStream, id: u64, accepted: Instant, shared: &Shared) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_HEAD];
    let reply = match read_head(stream, &mut buf, accepted + shared.limits.head_timeout).await? {
        Head::Complete(len) => match shared.routes.route(&buf[..len]) {
            Route::Reply(reply) => reply,
            Route::Render(job) => {
                if !shared.conns().set_rendering(id, true) {
                    return Ok(());
                }
                let reply = render(job).await;
                shared.conns().set_rendering(id, false);
                reply
            }
        },
        Head::Incomplete { got: 0, .. } => return Ok(()),
        Head::Incomplete { timed_out: true, .. } => {
            Reply::text("408 Request Timeout", "request head not received in time\n")
        }
        Head::Incomplete { timed_out: false, .. } => Reply::text("400 Bad Request", "incomplete request\n"),
        Head::TooLarge => Reply::text("400 Bad Request", "request head too large\n"),
    };
    drop(buf);
    stream.write_all(&reply.into_bytes()).await?;
    linger_close(stream, shared.limits.linger).await;
    Ok(())
}

/// How reading a request head ended.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// A complete head of this many bytes (terminator included).
    Complete(usize),
    /// The peer closed or went silent after sending this many bytes, without a complete head.
    Incomplete { got: usize, timed_out: bool },
    /// [`MAX_HEAD`] bytes without a terminator.
    TooLarge,
}

/// Reads until the end of the request head, the size limit, EOF, or `deadline`.
async fn read_head(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<Head> {
    let mut got = 0;
    // Where the next search for the blank line starts: a terminator (at most 3 bytes) that was
    // not complete in what was already searched ends in the new bytes.
    let mut from = 0;
    loop {
        if let Some(len) = head_len(&buf[from..got]) {
            return Ok(Head::Complete(from + len));
        }
        if got == buf.len() {
            return Ok(Head::TooLarge);
        }
        from = got.saturating_sub(2);
        match timeout_at(deadline, stream.read(&mut buf[got..])).await {
            Err(_) => return Ok(Head::Incomplete { got, timed_out: true }),
            Ok(Ok(0)) => return Ok(Head::Incomplete { got, timed_out: false }),
            Ok(Ok(n)) => got += n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Half-closes, then discards whatever the client still sends (a request body, say) for at
/// most `linger`, so that closing with unread data does not reset the connection before the
/// client has read the response. A client that keeps its end open after reading only holds the
/// connection that long.
async fn linger_close(stream: &mut TcpStream, linger: Duration) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let deadline = Instant::now() + linger;
    let mut sink = [0u8; 4096];
    loop {
        match timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

/// Length of the head (through its blank line) if `buf` holds all of it. Bare `\n` line ends
/// are tolerated, as most servers do.
fn head_len(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let nl = from + i;
        let rest = &buf[nl + 1..];
        if rest.first() == Some(&b'\n') {
            return Some(nl + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        from = nl + 1;
    }
    None
}

/// One response, always with `Connection: close`.
struct Reply {
    status: &'static str,
    content_type: &'static str,
    extra_header: Option<&'static str>,
    body: Vec<u8>,
}

impl Reply {
    fn text(status: &'static str, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            extra_header: None,
            body: body.as_bytes().to_vec(),
        }
    }

    fn ok(content_type: &'static str, body: String) -> Self {
        Self { status: "200 OK", content_type, extra_header: None, body: body.into_bytes() }
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 160);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(self.status.as_bytes());
        out.extend_from_slice(b"\r\nContent-Type: ");
        out.extend_from_slice(self.content_type.as_bytes());
        out.extend_from_slice(b"\r\nContent-Length: ");
        out.extend_from_slice(itoa::Buffer::new().format(self.body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(h) = self.extra_header {
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

/// The request line of a head, parsed just enough to route it.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a [u8],
    path: &'a [u8],
    /// What follows `?` in the target (empty if nothing), without a `#fragment`.
    query: &'a [u8],
}

/// Parses the head: a request line `METHOD SP target SP HTTP/1.x`, then `name: value` lines.
fn parse(head: &[u8]) -> Option<Request<'_>> {
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next()?;
    let mut parts = line.split(|&b| b == b' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || method.is_empty()
        || !method.iter().all(|&b| is_tchar(b))
        || !matches!(version, b"HTTP/1.0" | b"HTTP/1.1")
    {
        return None;
    }
    for header in lines.take_while(|l| !l.is_empty()) {
        let colon = memchr::memchr(b':', header)?;
        let name = &header[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return None;
        }
    }
    let (path, query) = path_of(target)?;
    Some(Request { method, path, query })
}

/// The path and query of an origin-form (`/p?q`) or absolute-form (`http://host/p?q`) target.
fn path_of(target: &[u8]) -> Option<(&[u8], &[u8])> {
    let target = if target.starts_with(b"/") {
        target
    } else {
        let rest = target.strip_prefix(b"http://").or_else(|| target.strip_prefix(b"https://"))?;
        &rest[memchr::memchr(b'/', rest)?..]
    };
    let end = memchr::memchr2(b'?', b'#', target).unwrap_or(target.len());
    if target[..end].iter().any(|b| b.is_ascii_control() || *b == b' ') {
        return None;
    }
    let query = match target.get(end) {
        Some(b'?') => {
            let rest = &target[end + 1..];
            &rest[..memchr::memchr(b'#', rest).unwrap_or(rest.len())]
        }
        _ => &[],
    };
    Some((&target[..end], query))
}

/// An RFC 9110 token character.
const fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// The work of answering one request for a page: runs on the render thread.
type Job = Box<dyn FnOnce() -> Reply + Send>;

/// Runs `job` on the render thread. A bug in rendering must not take the endpoint down for
/// every later request, so a panic is a `500`.
async fn render(job: Job) -> Reply {
    let (tx, rx) = oneshot::channel();
    // Detached: if the connection goes away first, the job sees it and skips the render.
    drop(tokio::task::spawn_blocking(move || {
        if !tx.is_closed() {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(job)));
        }
    }));
    match rx.await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => {
            tracing::error!("metrics rendering panicked");
            Reply::text("500 Internal Server Error", "rendering failed\n")
        }
        Err(_) => Reply::text("500 Internal Server Error", "server stopping\n"),
    }
}

/// The pages served. A new endpoint is a field of [`Pages`] and one arm in [`Routes::route`].
struct Routes {
    pages: Pages,
}

/// What a request resolves to.
enum Route {
    /// A fixed reply (an error), sent without asking anyone.
    Reply(Reply),
    /// A page to render on the render thread.
    Render(Job),
}

impl Routes {
    fn route(&self, head: &[u8]) -> Route {
        let Some(req) = parse(head) else {
            return Route::Reply(Reply::text("400 Bad Request", "malformed request\n"));
        };
        if req.method != b"GET" {
            return Route::Reply(Reply {
                extra_header: Some("Allow: GET"),
                ..Reply::text("405 Method Not Allowed", "only GET is supported\n")
            });
        }
        match (req.path, &self.pages.connections, &self.pages.health) {
            (b"/metrics", _, _) => {
                let render = Arc::clone(&self.pages.metrics);
                Route::Render(Box::new(move || Reply::ok(CONTENT_TYPE, render())))
            }
            (b"/connections", Some(render), _) => match ConnQuery::parse(req.query) {
                Ok(query) => {
                    let render = Arc::clone(render);
                    Route::Render(Box::new(move || Reply::ok(JSON_CONTENT_TYPE, render(&query))))
                }
                Err(e) => Route::Reply(Reply::text("400 Bad Request", &format!("{e}\n"))),
            },
            (b"/healthz", _, Some(check)) => {
                let check = Arc::clone(check);
                Route::Render(Box::new(move || match check() {
                    Ok(()) => Reply::text("200 OK", "ok\n"),
                    Err(why) => Reply::text("503 Service Unavailable", &format!("{why}\n")),
                }))
            }
            _ => Route::Reply(Reply::text("404 Not Found", "not found; try /metrics\n")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_len_finds_the_blank_line() {
        assert_eq!(head_len(b"GET / HTTP/1.1\r\n\r\n"), Some(18));
        assert_eq!(head_len(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), Some(27));
        assert_eq!(head_len(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_len(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_len(b""), None);
        assert_eq!(head_len(b"\n\n"), Some(2));
    }

    #[test]
    fn parses_request_lines() {
        let r = parse(b"GET /metrics?name[]=x HTTP/1.1\r\nHost: h:9\r\nAccept: */*\r\n\r\n");
        assert_eq!(r, Some(Request { method: b"GET", path: b"/metrics", query: b"name[]=x" }));
        let r = parse(b"GET http://h:9/metrics HTTP/1.0\r\n\r\n");
        assert_eq!(r, Some(Request { method: b"GET", path: b"/metrics", query: b"" }));
        let r = parse(b"POST /x HTTP/1.1\r\n\r\n");
        assert_eq!(r, Some(Request { method: b"POST", path: b"/x", query: b"" }));
        let r = parse(b"GET /connections?sort=name&limit=2#top HTTP/1.1\r\n\r\n");
        assert_eq!(r, Some(Request { method: b"GET", path: b"/connections", query: b"sort=name&limit=2" }));
        let r = parse(b"GET /c#x?y HTTP/1.1\r\n\r\n");
        assert_eq!(r, Some(Request { method: b"GET", path: b"/c", query: b"" }));
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 x\r\n\r\n",
            b"G(T /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n: empty name\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    fn routes(render: impl Fn() -> String + Send + Sync + 'static) -> Routes {
        Routes { pages: Pages::metrics(render) }
    }

    /// Routes `head` and, for a page, renders it on a runtime like the server's.
    fn answer(routes: &Routes, head: &[u8]) -> Reply {
        match routes.route(head) {
            Route::Reply(reply) => reply,
            Route::Render(job) => tokio::runtime::Builder::new_current_thread()
                .max_blocking_threads(1)
                .build()
                .unwrap()
                .block_on(render(job)),
        }
    }

    fn body(reply: &Reply) -> &str {
        std::str::from_utf8(&reply.body).unwrap()
    }

    #[test]
    fn routes_connections_and_health_when_served() {
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = Arc::clone(&healthy);
        let r = Routes {
            pages: Pages::metrics(String::new)
                .with_connections(|q| format!("{{\"limit\":{}}}", q.limit))
                .with_health(move || {
                    if flag.load(std::sync::atomic::Ordering::SeqCst) {
                        Ok(())
                    } else {
                        Err("upstream disconnected for 31s".to_owned())
                    }
                }),
        };
        let ok = answer(&r, b"GET /connections?limit=7 HTTP/1.1\r\n\r\n");
        assert_eq!((ok.status, ok.content_type, body(&ok)), ("200 OK", JSON_CONTENT_TYPE, "{\"limit\":7}"));
        let bad = answer(&r, b"GET /connections?sort=colour HTTP/1.1\r\n\r\n");
        assert_eq!(bad.status, "400 Bad Request");
        assert!(body(&bad).contains("colour"), "{}", body(&bad));
        let up = answer(&r, b"GET /healthz HTTP/1.1\r\n\r\n");
        assert_eq!((up.status, body(&up)), ("200 OK", "ok\n"));
        healthy.store(false, std::sync::atomic::Ordering::SeqCst);
        let down = answer(&r, b"GET /healthz HTTP/1.1\r\n\r\n");
        assert_eq!(
            (down.status, body(&down)),
            ("503 Service Unavailable", "upstream disconnected for 31s\n")
        );
        // An endpoint serving only /metrics knows nothing else.
        let only = routes(String::new);
        assert_eq!(answer(&only, b"GET /connections HTTP/1.1\r\n\r\n").status, "404 Not Found");
        assert_eq!(answer(&only, b"GET /healthz HTTP/1.1\r\n\r\n").status, "404 Not Found");
    }

    #[test]
    fn routes_requests() {
        let r = routes(|| "body\n".to_owned());
        let ok = String::from_utf8(answer(&r, b"GET /metrics HTTP/1.1\r\n\r\n").into_bytes()).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(ok.contains("\r\nContent-Length: 5\r\n"));
        assert!(ok.ends_with("\r\nConnection: close\r\n\r\nbody\n"));
        assert_eq!(answer(&r, b"GET /nope HTTP/1.1\r\n\r\n").status, "404 Not Found");
        let post = answer(&r, b"POST /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(post.status, "405 Method Not Allowed");
        assert_eq!(post.extra_header, Some("Allow: GET"));
        assert_eq!(answer(&r, b"nonsense\r\n\r\n").status, "400 Bad Request");
    }

    #[test]
    fn a_panicking_render_is_a_500() {
        let r = routes(|| -> String { panic!("render bug") });
        assert_eq!(answer(&r, b"GET /metrics HTTP/1.1\r\n\r\n").status, "500 Internal Server Error");
    }

    #[test]
    fn room_is_made_by_closing_the_oldest_connection_not_rendering() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let _in_runtime = rt.enter();
        let mut conns = Conns::default();
        let mut tasks = Vec::new();
        for id in 0..3 {
            let task = tokio::spawn(std::future::pending::<()>());
            conns.evictable.insert(id, task.abort_handle());
            tasks.push(task);
        }
        assert!(conns.set_rendering(0, true));
        assert!(conns.make_room(3));
        // Connection 0 renders, so 1 (the oldest other) goes.
        assert_eq!(conns.evictable.keys().copied().collect::<Vec<_>>(), [2]);
        assert!(rt.block_on(&mut tasks[1]).unwrap_err().is_cancelled());
        assert!(conns.make_room(2));
        assert!(conns.evictable.is_empty());
        // Only renders left: no room can be made below one.
        assert!(!conns.make_room(1));
        assert!(conns.set_rendering(0, false));
        assert!(!conns.set_rendering(7, true));
        conns.remove(0);
        assert_eq!(conns.len(), 0);
    }
}
