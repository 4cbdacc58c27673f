//! The public Rust client library: connect to a replication server (Synapse's master or
//! replhub) as a worker would, and read what it sends.
//!
//! Built on the same sans-IO [`Session`] as the hub (client role), driven by tokio. Reads go
//! straight into the session's line buffer (one large buffer, 256 KiB by default), and lines
//! are split off it without copying: an RDATA row handed out by [`Client::next`] is a slice of
//! that buffer. Nothing parses JSON unless the caller decodes a row itself.
//!
//! Two levels:
//! - [`Client::next`]: typed [`Event`]s (SERVER, POSITION, RDATA, ...), fields parsed.
//! - [`Client::next_raw`]: each received [`Line`] after the direction check, for load testers
//!   that count lines and parse only the token ([`crate::proto::fields::parse_rdata`]).
//!
//! The keep-alive (PING after 5 s of write silence, `ERROR ping timeout` after 25 s of silence
//! from a peer that pings) runs inside `next`/`next_raw`, so it keeps going while the caller
//! waits for data. Nothing is spawned: a client that is not polled sends nothing.
use std::io;
use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

use crate::proto::inbound::parse_args;
use crate::proto::Role;
use crate::proto::{Command, CommandWord, EncodeError, Line, PeerError, ReplicateTarget, Token};
use crate::session::{Session, SessionConfig, TimerAction};
use crate::time::Clock;
use crate::time::Now;

/// Default read size: bytes reserved in the line buffer before each read.
pub const DEFAULT_READ_BUFFER: usize = 256 * 1024;

/// How to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// The `NAME` to announce.
    pub name: String,
    /// One `REPLICATE` per entry: stream names, or `["ALL"]`. Empty: subscribe to nothing.
    pub streams: Vec<String>,
    /// If set, a server announcing another `SERVER` name gets `ERROR Wrong remote` and
    /// [`ClientError::WrongRemote`] is returned.
    pub expected_server_name: Option<String>,
    /// Run the keep-alive (periodic PING, ping timeout). The opening PING is always sent.
    pub ping: bool,
    /// Ping/timeout/linger constants and the line limit (tests shorten them).
    pub session: SessionConfig,
    /// Bytes to reserve for each read.
    pub read_buffer: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            name: "replhub-client".to_owned(),
            streams: vec!["ALL".to_owned()],
            expected_server_name: None,
            ping: true,
            session: SessionConfig::default(),
            read_buffer: DEFAULT_READ_BUFFER,
        }
    }
}

/// What can go wrong.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket error.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol (or went silent): we sent `ERROR <text>` and closed.
    #[error("protocol error: sent ERROR {0}")]
    Protocol(PeerError),
    /// The server's `SERVER` name is not the expected one: we sent `ERROR Wrong remote`.
    #[error("wrong remote: expected server name {expected:?}, got {got:?}")]
    WrongRemote {
        /// What [`ClientOptions::expected_server_name`] said.
        expected: String,
        /// What the server sent.
        got: String,
    },
    /// A command that cannot be written (over 16384 bytes or containing `\n`).
    #[error("cannot send: {0}")]
    Encode(#[from] EncodeError),
    /// The connection was closed by us (after an error or a timeout).
    #[error("the connection is closed")]
    Closed,
}

/// A received command, fields parsed (RDATA rows are not: see [`Event::Rdata`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `SERVER <name>`
    Server(String),
    /// `POSITION <stream> <token>`
    Position {
        /// Stream name.
        stream: String,
        /// Token.
        token: i64,
    },
    /// `RDATA <stream> <token|batch> <row>`
    Rdata {
        /// Stream name.
        stream: String,
        /// Token, or `batch`.
        token: Token,
        /// The row's JSON text, a zero-copy slice of the read buffer (not parsed).
        row: Bytes,
    },
    /// `REMOTE_SERVER_UP <server>`
    RemoteServerUp(String),
    /// `ERROR <text>`: the server is about to close.
    Error(String),
    /// `PING <data>`
    Ping(String),
    /// `SYNC <data>`
    Sync(String),
}

/// A replication client connection.
///
/// ```no_run
/// use replhub::client::{Client, ClientOptions, Event};
///
/// # async fn demo() -> Result<(), replhub::client::ClientError> {
/// let opts = ClientOptions {
///     name: "my-worker".into(),
///     streams: vec!["events".into(), "caches".into()],
///     ..ClientOptions::default()
/// };
/// let mut client = Client::connect("127.0.0.1:9092", opts).await?;
/// while let Some(event) = client.next().await? {
///     match event {
///         Event::Position { stream, token } => println!("{stream} is at {token}"),
///         Event::Rdata { stream, token, row } => {
///             println!("{stream} {token:?} {}", String::from_utf8_lossy(&row));
///         }
///         _ => {}
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct Client {
    stream: TcpStream,
    session: Session,
    clock: Clock,
    /// When the last read completed: lines are stamped with it (one clock read per read, not
    /// per line).
    read_at: Now,
    options: ClientOptions,
    /// Encoded lines not yet written.
    out: BytesMut,
    server_name: Option<String>,
    eof: bool,
    aborted: bool,
}

impl Client {
    /// Connects and sends the opening lines: `NAME`, `PING`, one `REPLICATE` per stream.
    pub async fn connect(addr: impl ToSocketAddrs, options: ClientOptions) -> Result<Self, ClientError> {
        Command::Name(&options.name).to_bytes()?;
        for s in &options.streams {
            Command::Replicate(ReplicateTarget::from_name(s)).to_bytes()?;
        }
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let clock = Clock::new();
        let now = clock.now();
        let mut session = Session::new(Role::Client, options.session.clone(), now);
        let streams: Vec<&str> = options.streams.iter().map(String::as_str).collect();
        session.start(&options.name, &streams, now);
        let mut client = Self {
            stream,
            session,
            clock,
            read_at: now,
            options,
            out: BytesMut::new(),
            server_name: None,
            eof: false,
            aborted: false,
        };
        client.flush().await?;
        Ok(client)
    }

    /// Our address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// The server's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    /// The server's name, once it sent `SERVER`.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// The next event; `Ok(None)` once the server closed the connection.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        let Some(line) = self.next_raw().await? else {
            return Ok(None);
        };
        match to_event(&line) {
            Ok(event) => Ok(Some(event)),
            Err(err) => {
                self.session.fail(&err, self.clock.now());
                // Best effort: the ERROR goes out before we report the failure.
                let _ = self.flush().await;
                Err(ClientError::Protocol(err))
            }
        }
    }

    /// The next received line that passed the direction check (fields unparsed); `Ok(None)`
    /// once the server closed the connection.
    pub async fn next_raw(&mut self) -> Result<Option<Line>, ClientError> {
        loop {
            match self.try_next_raw() {
                Ok(Some(line)) => return Ok(Some(line)),
                Ok(None) => {}
                Err(err) => {
                    let _ = self.flush().await;
                    return Err(err);
                }
            }
            if self.session.is_closing() || self.aborted {
                let _ = self.flush().await;
                return Err(self.closed_error());
            }
            if self.eof {
                return Ok(None);
            }
            self.drive().await?;
        }
    }

    /// A line already in the buffer, without waiting (`Ok(None)`: nothing complete yet). Lets
    /// a caller process everything one read brought before doing something else (e.g. flush
    /// its output). After an error here, the `ERROR` line we queued is written by the next
    /// call to [`Self::next_raw`], [`Self::flush`] or [`Self::close`].
    pub fn try_next_raw(&mut self) -> Result<Option<Line>, ClientError> {
        match self.session.poll_line(self.read_at) {
            None => Ok(None),
            Some(Err(err)) => Err(ClientError::Protocol(err)),
            Some(Ok((word, line))) => {
                if word == CommandWord::Server {
                    self.check_server(&line)?;
                }
                Ok(Some(line))
            }
        }
    }

    /// Records the server name; a mismatch with the expected one is `ERROR Wrong remote`.
    fn check_server(&mut self, line: &Line) -> Result<(), ClientError> {
        let name = match parse_args(CommandWord::Server, line) {
            Ok(Command::Server(name)) => name,
            Ok(_) => return Ok(()),
            Err(err) => {
                self.session.fail(&err, self.clock.now());
                return Err(ClientError::Protocol(err));
            }
        };
        if let Some(expected) = &self.options.expected_server_name {
            if expected != name {
                let err = ClientError::WrongRemote { expected: expected.clone(), got: name.to_owned() };
                self.session.fail(&PeerError::WrongRemote, self.clock.now());
                return Err(err);
            }
        }
        self.server_name = Some(name.to_owned());
        Ok(())
    }

    /// Sends a command (e.g. `USER_SYNC`) and waits until it is written.
    pub async fn send(&mut self, cmd: Command<'_>) -> Result<(), ClientError> {
        let line = cmd.to_bytes()?;
        if !self.session.send_encoded(line) {
            return Err(self.closed_error());
        }
        self.flush().await
    }

    /// Writes every queued line.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        loop {
            self.fill_out();
            if self.out.is_empty() {
                return Ok(());
            }
            let n = self.stream.write(&self.out).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            self.out.advance(n);
            self.session.on_sent(self.clock.now());
        }
    }

    /// Writes what is queued (e.g. our `ERROR`), then shuts the connection down.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.flush().await?;
        self.stream.shutdown().await?;
        Ok(())
    }

    fn fill_out(&mut self) {
        while let Some(line) = self.session.poll_transmit() {
            self.out.extend_from_slice(&line);
        }
    }

    fn closed_error(&self) -> ClientError {
        self.session.error().map_or(ClientError::Closed, |e| ClientError::Protocol(e.clone()))
    }

    /// Waits for one of: bytes to read, the keep-alive tick, write progress.
    async fn drive(&mut self) -> Result<(), ClientError> {
        self.fill_out();
        let deadline = self
            .options
            .ping
            .then(|| tokio::time::Instant::from_std(self.clock.instant_at(self.session.poll_timeout())));
        let read_size = self.options.read_buffer.max(1024);
        let buf = self.session.read_buffer();
        if buf.capacity() - buf.len() < read_size / 4 {
            buf.reserve(read_size);
        }
        let (mut rd, mut wr) = self.stream.split();
        let out = &self.out;
        let tick = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let woke = tokio::select! {
            read = rd.read_buf(buf) => Woke::Read(read?),
            written = wr.write(out), if !out.is_empty() => Woke::Wrote(written?),
            () = tick => Woke::Tick,
        };
        let now = self.clock.now();
        self.read_at = now;
        match woke {
            Woke::Read(0) => self.eof = true,
            Woke::Read(_) => {}
            Woke::Wrote(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Woke::Wrote(n) => {
                self.out.advance(n);
                self.session.on_sent(now);
            }
            Woke::Tick => {
                if self.session.handle_timeout(now) == TimerAction::Abort {
                    self.aborted = true;
                }
            }
        }
        Ok(())
    }
}

/// What ended one wait in [`Client::drive`].
enum Woke {
    Read(usize),
    Wrote(usize),
    Tick,
}

/// Parses a line that passed the client-role direction check into an [`Event`].
fn to_event(line: &Line) -> Result<Event, PeerError> {
    let Some(word) = line.command() else {
        return Err(PeerError::InvalidCommand(String::from_utf8_lossy(line.word()).into_owned()));
    };
    Ok(match parse_args(word, line)? {
        Command::Server(s) => Event::Server(s.to_owned()),
        Command::Rdata(r) => {
            Event::Rdata { stream: r.stream.to_owned(), token: r.token, row: line.bytes().slice_ref(r.row) }
        }
        Command::Position(p) => Event::Position { stream: p.stream.to_owned(), token: p.token },
        Command::RemoteServerUp(s) => Event::RemoteServerUp(s.to_owned()),
        Command::Error(s) => Event::Error(s.to_owned()),
        Command::Ping(s) => Event::Ping(s.to_owned()),
        Command::Sync(s) => Event::Sync(s.to_owned()),
        other => return Err(PeerError::InvalidCommand(other.word().as_str().to_owned())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(s: &'static [u8]) -> Result<Event, PeerError> {
        to_event(&Line::new(Bytes::from_static(s)))
    }

    #[test]
    fn events_from_lines() {
        assert_eq!(ev(b"SERVER hs"), Ok(Event::Server("hs".into())));
        assert_eq!(ev(b"POSITION events 5"), Ok(Event::Position { stream: "events".into(), token: 5 }));
        assert_eq!(
            ev(b"RDATA caches batch [\"f\", null, 1]"),
            Ok(Event::Rdata {
                stream: "caches".into(),
                token: Token::Batch,
                row: Bytes::from_static(b"[\"f\", null, 1]")
            })
        );
        assert_eq!(ev(b"PING"), Ok(Event::Ping(String::new())));
        assert_eq!(ev(b"ERROR x y"), Ok(Event::Error("x y".into())));
        assert_eq!(ev(b"SYNC s"), Ok(Event::Sync("s".into())));
        assert_eq!(ev(b"REMOTE_SERVER_UP r"), Ok(Event::RemoteServerUp("r".into())));
        assert!(ev(b"RDATA caches 5")
            .unwrap_err()
            .to_string()
            .starts_with("failed to parse line for  'RDATA'"));
    }

    #[test]
    fn rows_are_slices_of_the_line() {
        let line = Line::new(Bytes::from_static(b"RDATA events 7 [1, 2]"));
        let Ok(Event::Rdata { row, .. }) = to_event(&line) else { panic!() };
        assert_eq!(row.as_ptr(), line.as_bytes()[15..].as_ptr());
    }
}
