//! The `/metrics` endpoint: a minimal HTTP/1.1 responder on one std thread.
//!
//! Prometheus scrapes once every 15 s or so, so a dedicated blocking thread serving one request
//! per connection (`Connection: close`) is all that is needed, and it works the same under both
//! I/O drivers without touching their loops. Each connection gets at most [`HEAD_TIMEOUT`] to
//! deliver its request head (≤ [`MAX_HEAD`] bytes), so a silent or trickling client cannot hold
//! the thread for longer than that.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;

/// Time a client has, from accept, to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// Per-write timeout for the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// After responding, how long to drain what the client still sends before closing, so that
/// unread request bytes do not turn our close into a reset that destroys the response.
const LINGER: Duration = Duration::from_millis(500);

/// Pause after an accept error such as `EMFILE`, which would otherwise repeat at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The content type of Prometheus text exposition 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A running `/metrics` endpoint. Stops (and joins its thread) on [`shutdown`](Self::shutdown)
/// or drop.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves `GET /metrics` with the text `render` returns, on a new thread.
    ///
    /// `render` is called once per scrape, on the server thread.
    pub fn start(addr: SocketAddr, render: impl Fn() -> String + Send + Sync + 'static) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("replhub-metrics".to_owned()).spawn({
            let stop = Arc::clone(&stop);
            move || serve(&listener, &stop, &render)
        })?;
        Ok(Self { local_addr, stop, thread: Some(thread) })
    }

    /// The address actually bound (useful with port 0).
    pub const fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, finishes the request in progress (bounded by the timeouts) and joins
    /// the thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // The thread is blocked in accept(); one connection wakes it, and it sees the flag.
        match TcpStream::connect_timeout(&wake_addr(self.local_addr), Duration::from_secs(1)) {
            Ok(_) => {
                if thread.join().is_err() {
                    tracing::error!("metrics thread panicked");
                }
            }
            // Without the wake-up, joining could block forever; the thread is left to end
            // with the process instead.
            Err(e) => tracing::warn!(error = %e, "could not wake the metrics thread to stop it"),
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Where to connect to reach a listener bound to `addr` (loopback for a wildcard address).
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

fn serve(listener: &TcpListener, stop: &AtomicBool, render: &dyn Fn() -> String) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, peer)) => {
                if let Err(e) = handle(stream, render) {
                    tracing::debug!(%peer, error = %e, "metrics request failed");
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener accept failed");
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
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

fn handle(mut stream: TcpStream, render: &dyn Fn() -> String) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut buf = [0u8; MAX_HEAD];
    let reply = match read_head(&mut stream, &mut buf)? {
        Head::Complete(len) => respond(&buf[..len], render),
        Head::Incomplete { got: 0, .. } => return Ok(()),
        Head::Incomplete { timed_out: true, .. } => {
            Reply::text("408 Request Timeout", "request head not received in time\n")
        }
        Head::Incomplete { timed_out: false, .. } => Reply::text("400 Bad Request", "incomplete request\n"),
        Head::TooLarge => Reply::text("400 Bad Request", "request head too large\n"),
    };
    stream.write_all(&reply.into_bytes())?;
    stream.flush()?;
    linger_close(stream);
    Ok(())
}

/// Reads until the end of the request head, the size limit, EOF, or [`HEAD_TIMEOUT`].
fn read_head(stream: &mut TcpStream, buf: &mut [u8; MAX_HEAD]) -> io::Result<Head> {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut got = 0;
    loop {
        if let Some(len) = head_len(&buf[..got]) {
            return Ok(Head::Complete(len));
        }
        if got == buf.len() {
            return Ok(Head::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Head::Incomplete { got, timed_out: true });
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Ok(Head::Incomplete { got, timed_out: false }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Ok(Head::Incomplete { got, timed_out: true });
            }
            Err(e) => return Err(e),
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
    Some(Request { method, path: path_of(target)? })
}

/// The path of an origin-form (`/p?q`) or absolute-form (`http://host/p?q`) target.
fn path_of(target: &[u8]) -> Option<&[u8]> {
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
    Some(&target[..end])
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

fn respond(head: &[u8], render: &dyn Fn() -> String) -> Reply {
    let Some(req) = parse(head) else {
        return Reply::text("400 Bad Request", "malformed request\n");
    };
    if req.method != b"GET" {
        return Reply {
            extra_header: Some("Allow: GET"),
            ..Reply::text("405 Method Not Allowed", "only GET is supported\n")
        };
    }
    if req.path != b"/metrics" {
        return Reply::text("404 Not Found", "not found; try /metrics\n");
    }
    // A bug in rendering must not take the endpoint down for every later scrape.
    match catch_unwind(AssertUnwindSafe(render)) {
        Ok(body) => Reply {
            status: "200 OK",
            content_type: CONTENT_TYPE,
            extra_header: None,
            body: body.into_bytes(),
        },
        Err(_) => {
            tracing::error!("metrics rendering panicked");
            Reply::text("500 Internal Server Error", "rendering metrics failed\n")
        }
    }
}

/// Half-closes, then discards whatever the client still sends (a request body, say) for at
/// most [`LINGER`], so that closing with unread data does not reset the connection before the
/// client has read the response.
fn linger_close(mut stream: TcpStream) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
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
        assert_eq!(r, Some(Request { method: b"GET", path: b"/metrics" }));
        let r = parse(b"GET http://h:9/metrics HTTP/1.0\r\n\r\n");
        assert_eq!(r, Some(Request { method: b"GET", path: b"/metrics" }));
        let r = parse(b"POST /x HTTP/1.1\r\n\r\n");
        assert_eq!(r, Some(Request { method: b"POST", path: b"/x" }));
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

    #[test]
    fn routes() {
        let render = || "body\n".to_owned();
        let ok = respond(b"GET /metrics HTTP/1.1\r\n\r\n", &render).into_bytes();
        let ok = String::from_utf8(ok).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(ok.contains("\r\nContent-Length: 5\r\n"));
        assert!(ok.ends_with("\r\nConnection: close\r\n\r\nbody\n"));
        assert_eq!(respond(b"GET /nope HTTP/1.1\r\n\r\n", &render).status, "404 Not Found");
        let post = respond(b"POST /metrics HTTP/1.1\r\n\r\n", &render);
        assert_eq!(post.status, "405 Method Not Allowed");
        assert_eq!(post.extra_header, Some("Allow: GET"));
        assert_eq!(respond(b"nonsense\r\n\r\n", &render).status, "400 Bad Request");
    }

    #[test]
    fn a_panicking_render_is_a_500() {
        let render = || -> String { panic!("render bug") };
        let r = respond(b"GET /metrics HTTP/1.1\r\n\r\n", &render);
        assert_eq!(r.status, "500 Internal Server Error");
    }

    #[test]
    fn wake_addr_uses_loopback_for_wildcards() {
        let a: SocketAddr = "0.0.0.0:9093".parse().unwrap();
        assert_eq!(wake_addr(a), "127.0.0.1:9093".parse().unwrap());
        let a: SocketAddr = "[::]:9093".parse().unwrap();
        assert_eq!(wake_addr(a), "[::1]:9093".parse().unwrap());
        let a: SocketAddr = "10.1.2.3:9093".parse().unwrap();
        assert_eq!(wake_addr(a), a);
    }
}
