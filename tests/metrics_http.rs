//! The `/metrics` endpoint over real loopback TCP: routing, status codes, and that a silent
//! client cannot block later scrapes (`metrics_crowd.rs` does the same with hundreds).
// Integration tests wait for real processes and sockets with real deadlines.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use replhub::testing::hub::stats::{ConnPhase, ConnSample, CoreSnapshot, CoreStats};
use replhub::testing::metrics::Limits;
use replhub::testing::metrics::UpstreamSnapshot;
use replhub::testing::metrics::{render, MetricsServer, RenderInfo};

/// Guards every client read: a hung server fails the test instead of hanging it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

fn fixed_render() -> String {
    let cores = vec![CoreSnapshot {
        core: 0,
        stats: CoreStats { accepted: 2, user_sync: 1, ..CoreStats::default() },
        resp: Default::default(),
        conns: vec![
            ConnSample {
                name: "synchrotron1".to_owned(),
                phase: ConnPhase::Connected,
                ..ConnSample::default()
            },
            ConnSample {
                name: "synchrotron1".to_owned(),
                phase: ConnPhase::Connected,
                ..ConnSample::default()
            },
        ],
    }];
    let up = UpstreamSnapshot { mode: "synthetic", connected: true, ..UpstreamSnapshot::default() };
    let info = RenderInfo {
        io_backend: "epoll",
        io_fallback_reason: None,
        version: env!("CARGO_PKG_VERSION"),
        threads: 1,
        max_pending_bytes: 64 << 20,
    };
    render(&cores, &up, &info)
}

fn start() -> MetricsServer {
    MetricsServer::start("127.0.0.1:0".parse().unwrap(), fixed_render).unwrap()
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    s
}

struct Response {
    status_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads a whole `Connection: close` response.
fn read_response(mut s: TcpStream) -> Response {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no end of head");
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap().to_owned();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(": ").unwrap();
            (n.to_owned(), v.to_owned())
        })
        .collect();
    Response { status_line, headers, body: raw[split + 4..].to_vec() }
}

fn exchange(addr: SocketAddr, request: &[u8]) -> Response {
    let mut s = connect(addr);
    s.write_all(request).unwrap();
    read_response(s)
}

fn scrape(addr: SocketAddr) -> Response {
    exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n")
}

#[test]
fn get_metrics_is_200_with_exposition() {
    let server = start();
    let r = exchange(
        server.local_addr(),
        b"GET /metrics?name[]=x HTTP/1.1\r\nHost: localhost\r\nUser-Agent: Prometheus/2.53\r\n\r\n",
    );
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(r.header("Content-Type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    assert_eq!(r.header("Connection"), Some("close"));
    assert_eq!(r.header("Content-Length"), Some(r.body.len().to_string().as_str()));
    let body = String::from_utf8(r.body).unwrap();
    assert!(body.contains("\nsynapse_replication_tcp_resource_total_connections 2\n"), "{body}");
    assert!(body.contains("synapse_replication_tcp_protocol_pending_commands{name=\"synchrotron1\"} 0\n"));
    assert!(body.contains("\nsynapse_replication_tcp_resource_user_sync_total 1\n"));
    assert_eq!(body, fixed_render());
    server.shutdown();
}

#[test]
fn other_paths_are_404() {
    let server = start();
    let r = exchange(server.local_addr(), b"GET /nope HTTP/1.1\r\n\r\n");
    assert_eq!(r.status_line, "HTTP/1.1 404 Not Found");
    assert_eq!(r.header("Content-Length"), Some(r.body.len().to_string().as_str()));
    let r = exchange(server.local_addr(), b"GET /metrics/extra HTTP/1.0\r\n\r\n");
    assert_eq!(r.status_line, "HTTP/1.1 404 Not Found");
}

#[test]
fn other_methods_are_405() {
    let server = start();
    let r = exchange(
        server.local_addr(),
        b"POST /metrics HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world",
    );
    assert_eq!(r.status_line, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(r.header("Allow"), Some("GET"));
    let r = exchange(server.local_addr(), b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(r.status_line, "HTTP/1.1 405 Method Not Allowed");
}

#[test]
fn garbage_is_400() {
    let server = start();
    let addr = server.local_addr();
    let r = exchange(addr, b"\x16\x03\x01\x02\x00garbage\xff\r\n\r\n");
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");
    let r = exchange(addr, b"GET /metrics HTTP/9.9\r\n\r\n");
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");
    let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nthis is not a header\r\n\r\n");
    assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");

    // A head cut short by the client's half-close.
    let mut s = connect(addr);
    s.write_all(b"GET /metr").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_response(s).status_line, "HTTP/1.1 400 Bad Request");

    // A head that never ends within the size limit.
    let mut s = connect(addr);
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
    big.resize(10 * 1024, b'a');
    // The server may stop reading (and answer) before all of it is written.
    let _ = s.write_all(&big);
    assert_eq!(read_response(s).status_line, "HTTP/1.1 400 Bad Request");

    // Still serving.
    assert_eq!(scrape(addr).status_line, "HTTP/1.1 200 OK");
}

#[test]
fn a_silent_client_does_not_block_later_scrapes() {
    let server = start();
    let addr = server.local_addr();
    let mut silent = connect(addr);
    let mut partial = connect(addr);
    partial.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();

    // Served beside both, without waiting for their head deadline.
    let head_timeout = Limits::default().head_timeout;
    let t = Instant::now();
    let r = scrape(addr);
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert!(t.elapsed() < head_timeout / 2, "scrape took {:?}", t.elapsed());

    // Then, at their deadline, the silent one is closed without a response, and the partial
    // one told it timed out.
    let mut rest = Vec::new();
    assert_eq!(silent.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(read_response(partial).status_line, "HTTP/1.1 408 Request Timeout");
    assert!(t.elapsed() >= head_timeout / 2, "closed before its deadline");
}

#[test]
fn serves_many_scrapes_then_stops() {
    let server = start();
    let addr = server.local_addr();
    for _ in 0..20 {
        assert_eq!(scrape(addr).status_line, "HTTP/1.1 200 OK");
    }
    server.shutdown();
    assert!(TcpStream::connect(addr).is_err(), "still listening after shutdown");
}

#[test]
fn drop_stops_the_server() {
    let server = start();
    let addr = server.local_addr();
    drop(server);
    assert!(TcpStream::connect(addr).is_err(), "still listening after drop");
}
