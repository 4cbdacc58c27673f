//! One `GET` to the hub's metrics endpoint over a blocking socket: all `top` needs of HTTP (the
//! endpoint always answers `Connection: close` with a `Content-Length`).
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::metrics::connections::ConnectionsPage;

/// Largest response read (a full page of 10 000 connections is a few MB).
const MAX_RESPONSE: u64 = 64 << 20;

/// Why a poll failed, worded for the footer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Could not connect, send or read.
    #[error("{addr}: {source}")]
    Io {
        /// The endpoint.
        addr: String,
        /// What failed.
        source: io::Error,
    },
    /// Not an HTTP response we understand.
    #[error("{addr}: malformed HTTP response")]
    Malformed {
        /// The endpoint.
        addr: String,
    },
    /// An answer other than 200.
    #[error("{addr}: {status}")]
    Status {
        /// The endpoint.
        addr: String,
        /// The status line's code and text, and the body's first line.
        status: String,
    },
    /// The body is not a `/connections` page.
    #[error("{addr}: not a /connections page: {source}")]
    Json {
        /// The endpoint.
        addr: String,
        /// What serde said.
        source: serde_json::Error,
    },
}

/// `GET path` from `addr`: the body of a `200`.
pub fn get(addr: &str, path: &str, timeout: Duration) -> Result<Vec<u8>, FetchError> {
    let io_err = |source| FetchError::Io { addr: addr.to_owned(), source };
    let target =
        addr.to_socket_addrs().map_err(io_err)?.next().ok_or_else(|| {
            io_err(io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address"))
        })?;
    let mut stream = TcpStream::connect_timeout(&target, timeout).map_err(io_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(io_err)?;
    let mut response = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut response).map_err(io_err)?;
    let malformed = || FetchError::Malformed { addr: addr.to_owned() };
    let head_end = memchr::memmem::find(&response, b"\r\n\r\n").ok_or_else(malformed)?;
    let head = std::str::from_utf8(&response[..head_end]).map_err(|_| malformed())?;
    let status = head.lines().next().and_then(|l| l.split_once(' ')).map(|(_, s)| s).ok_or_else(malformed)?;
    let body = response[head_end + 4..].to_vec();
    if !status.starts_with("200 ") {
        let first = String::from_utf8_lossy(&body).lines().next().unwrap_or_default().to_owned();
        return Err(FetchError::Status { addr: addr.to_owned(), status: format!("{status}: {first}") });
    }
    Ok(body)
}

/// Reads `/connections` (with `path`'s query) from `addr`.
pub fn connections(addr: &str, path: &str, timeout: Duration) -> Result<ConnectionsPage, FetchError> {
    let body = get(addr, path, timeout)?;
    serde_json::from_slice(&body).map_err(|source| FetchError::Json { addr: addr.to_owned(), source })
}
