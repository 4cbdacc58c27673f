//! One connection's protocol state machine, both roles (PROTOCOL.md §1, §3), sans-IO.
//!
//! The session owns the line splitter, the keep-alive schedule, the ping timeout, the close
//! linger and the direction check. It never touches a socket or reads the clock: every input
//! takes `now`, and the lines it wants written are drained with [`Session::poll_transmit`]
//! (the hub instead moves them into its own ordered queue).
//!
//! ```text
//!   on_bytes ─► poll_line ─► (word, Line) to the owner, who parses fields lazily
//!   read_buffer ← recv ─► poll_chunk ─► complete lines as one Bytes (a relay's receive side);
//!                         the owner runs check_line on each line it handles itself
//!   handle_timeout ─► PING / ERROR ping timeout / abort
//!   fail(err) ─► "ERROR <text>" queued, state Closing: nothing more is read
//! ```
//!
//! There are two ways to receive. [`Session::poll_line`] hands out one checked line at a time
//! (the hub's worker connections). [`Session::poll_chunk`] hands out every complete line
//! buffered, as one zero-copy `Bytes`, for an owner that relays most lines untouched (the
//! upstream link cuts them into batches without copying): the lines it relays are not decoded
//! or checked (the relay policy), and the lines it handles itself go through
//! [`Session::check_line`]. Either way a received line defers the ping timeout, and the PING
//! schedule, the ping timeout and the close linger are the same.
use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::proto::inbound::check_command;
use crate::proto::release::{check_released_line, ReleasedParse};
use crate::proto::{
    Command, CommandWord, Line, LineSplitter, PeerError, ReplicateTarget, Role, MAX_LINE_LEN,
};
use crate::time::Now;

/// Protocol timing constants (PROTOCOL.md §3.2); tests shorten them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Send a PING when nothing was written for this long (and tick period).
    pub ping_interval_ms: u64,
    /// Close with `ERROR ping timeout` after this long without a received command, once the
    /// peer has pinged.
    pub ping_timeout_ms: u64,
    /// Abort a connection still open this long after we asked to close it.
    pub close_timeout_ms: u64,
    /// Longest accepted line.
    pub max_line_len: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            ping_interval_ms: 5_000,
            ping_timeout_ms: 25_000,
            close_timeout_ms: 25_000,
            max_line_len: MAX_LINE_LEN,
        }
    }
}

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Reading and writing.
    Open,
    /// Close requested at `since_ms` (after an ERROR, or by us): nothing more is read; what is
    /// queued is still written.
    Closing {
        /// When the close was requested (monotonic ms).
        since_ms: u64,
    },
}

/// What a timer tick asks of the owner beyond the lines it queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerAction {
    /// Nothing special (a PING may have been queued).
    None,
    /// The close linger expired: drop the connection now (RST).
    Abort,
}

/// One connection's protocol state.
pub struct Session {
    role: Role,
    config: SessionConfig,
    splitter: LineSplitter,
    state: State,
    started: bool,
    last_sent_ms: u64,
    last_recv_ms: u64,
    peer_pinged: bool,
    next_tick_ms: u64,
    out: VecDeque<Bytes>,
    error: Option<PeerError>,
    /// Check received lines as a Synapse 1.13+ peer does, once the owner knows the peer is of
    /// that generation.
    released_parse: Option<ReleasedParse>,
}

impl Session {
    /// A new session for a connection that was just established at `now`. Nothing is sent
    /// until [`Session::start`].
    pub fn new(role: Role, config: SessionConfig, now: Now) -> Self {
        let splitter = LineSplitter::new(config.max_line_len);
        Self {
            role,
            splitter,
            state: State::Open,
            started: false,
            last_sent_ms: now.mono_ms,
            last_recv_ms: now.mono_ms,
            peer_pinged: false,
            next_tick_ms: now.mono_ms + config.ping_interval_ms,
            config,
            out: VecDeque::new(),
            error: None,
            released_parse: None,
        }
    }

    /// From now on, check received lines as a Synapse 1.13+ peer does (PROTOCOL.md §8.2:
    /// look up, parse, then the direction), with its error texts; blank lines included, which
    /// such a peer parses too (its blank-line check never matches) and refuses.
    pub fn set_released_parse(&mut self, rules: ReleasedParse) {
        self.released_parse = Some(rules);
        self.splitter.keep_blank_lines();
    }

    /// Our role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        matches!(self.state, State::Closing { .. })
    }

    /// The error we sent the peer, if any.
    pub fn error(&self) -> Option<&PeerError> {
        self.error.as_ref()
    }

    /// Whether the opening lines were queued.
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// Queues the opening lines and starts the keep-alive schedule: the server's
    /// `SERVER <name>` + `PING <ms>`, or the client's `NAME <name>` + `PING <ms>` followed by the
    /// given `REPLICATE` lines (PROTOCOL.md §3.1).
    pub fn start(&mut self, name: &str, replicate: &[&str], now: Now) {
        if self.started || self.is_closing() {
            return;
        }
        self.started = true;
        let first = match self.role {
            Role::Server => Command::Server(name),
            Role::Client => Command::Name(name),
        };
        self.send(&first);
        self.send_ping(now);
        if self.role == Role::Client {
            for s in replicate {
                self.send(&Command::Replicate(ReplicateTarget::from_name(s)));
            }
        }
        self.next_tick_ms = now.mono_ms + self.config.ping_interval_ms;
    }

    fn send_ping(&mut self, now: Now) {
        let mut buf = itoa::Buffer::new();
        let ms = buf.format(now.wall_ms);
        self.send(&Command::Ping(ms));
    }

    /// Queues a command. Refused (and logged) if it cannot be encoded (over 16384 bytes or
    /// containing `\n`); dropped silently once closing, like the reference.
    pub fn send(&mut self, cmd: &Command<'_>) -> bool {
        if self.is_closing() {
            return false;
        }
        let mut buf = BytesMut::new();
        match cmd.encode_into(&mut buf) {
            Ok(()) => {
                self.out.push_back(buf.freeze());
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "refusing to send an unencodable command");
                false
            }
        }
    }

    /// Queues an already encoded line (ending in `\n`).
    pub fn send_encoded(&mut self, line: Bytes) -> bool {
        if self.is_closing() {
            return false;
        }
        self.out.push_back(line);
        true
    }

    /// The next line to write, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// Whether lines are queued.
    pub fn has_transmit(&self) -> bool {
        !self.out.is_empty()
    }

    /// The owner wrote something to the socket at `now` (any command counts for the PING
    /// schedule, RDATA included).
    pub fn on_sent(&mut self, now: Now) {
        self.last_sent_ms = now.mono_ms;
    }

    /// Received bytes.
    pub fn on_bytes(&mut self, data: &[u8]) {
        if !self.is_closing() {
            self.splitter.extend_from_slice(data);
        }
    }

    /// The splitter's buffer, to read into without a copy.
    pub fn read_buffer(&mut self) -> &mut BytesMut {
        self.splitter.buffer_mut()
    }

    /// The next received command that passed the direction check: its word and the line.
    /// On a framing or direction error the session has already queued the `ERROR` and moved to
    /// closing, and returns the error once; afterwards nothing more is read.
    pub fn poll_line(&mut self, now: Now) -> Option<Result<(CommandWord, Line), PeerError>> {
        if self.is_closing() {
            return None;
        }
        let raw = match self.splitter.next_line() {
            Ok(Some(raw)) => raw,
            Ok(None) => {
                self.splitter.release_if_empty();
                return None;
            }
            Err(_) => {
                let err = PeerError::LineTooLong;
                self.fail(&err, now);
                return Some(Err(err));
            }
        };
        let line = Line::new(raw);
        Some(self.check_line(&line, now).map(|word| (word, line)))
    }

    /// Every complete line received so far, as one chunk ending in `\n` that shares the read
    /// buffer (no copy; see [`LineSplitter::next_chunk`]), for an owner that relays lines as
    /// they are. The chunk counts as received for the ping timeout; its lines are *not*
    /// checked: run [`Session::check_line`] on each line the owner does not simply relay.
    /// An over-long line is handled as in [`Session::poll_line`]. Once closing, returns `None`
    /// and drops whatever was read since (nothing more is read).
    pub fn poll_chunk(&mut self, now: Now) -> Option<Result<Bytes, PeerError>> {
        if self.is_closing() {
            self.splitter.buffer_mut().clear();
            return None;
        }
        match self.splitter.next_chunk() {
            Ok(Some(chunk)) => {
                self.last_recv_ms = now.mono_ms;
                Some(Ok(chunk))
            }
            Ok(None) => None,
            Err(_) => {
                let err = PeerError::LineTooLong;
                self.fail(&err, now);
                Some(Err(err))
            }
        }
    }

    /// The receive checks for one line (PROTOCOL.md §1.1 steps 4–6): strict UTF-8, a known
    /// word the peer may send. A received PING arms the ping timeout. On an error the session
    /// has queued the `ERROR` and is closing.
    pub fn check_line(&mut self, line: &Line, now: Now) -> Result<CommandWord, PeerError> {
        let checked = match self.released_parse {
            Some(rules) => check_released_line(self.role, line, rules),
            None => check_command(self.role, line),
        };
        match checked {
            Ok(word) => {
                self.last_recv_ms = now.mono_ms;
                if word == CommandWord::Ping {
                    self.peer_pinged = true;
                }
                Ok(word)
            }
            Err(err) => {
                self.fail(&err, now);
                Err(err)
            }
        }
    }

    /// Sends `ERROR <text>` and closes (PROTOCOL.md §1.4). The ERROR is queued even though
    /// we are closing; nothing more is read.
    pub fn fail(&mut self, err: &PeerError, now: Now) {
        if self.is_closing() {
            return;
        }
        self.out.push_back(err.to_line());
        self.error = Some(err.clone());
        self.close(now);
    }

    /// Closes without an ERROR: queued lines are still written.
    pub fn close(&mut self, now: Now) {
        if !self.is_closing() {
            self.state = State::Closing { since_ms: now.mono_ms };
            // The linger is timed here, not in the drivers: tick when it ends, not up to one
            // ping interval later.
            self.next_tick_ms = self.next_tick_ms.min(self.linger_end(now.mono_ms));
        }
    }

    /// The first instant that is more than the close linger after `since_ms`.
    fn linger_end(&self, since_ms: u64) -> u64 {
        since_ms.saturating_add(self.config.close_timeout_ms).saturating_add(1)
    }

    /// When [`Session::handle_timeout`] next wants to run (monotonic ms).
    pub fn poll_timeout(&self) -> u64 {
        self.next_tick_ms
    }

    /// Runs the 5-second tick if due (PROTOCOL.md §3.2): abort after the close linger; PING
    /// after an idle interval; `ERROR ping timeout` when a pinging peer went silent.
    pub fn handle_timeout(&mut self, now: Now) -> TimerAction {
        if now.mono_ms < self.next_tick_ms {
            return TimerAction::None;
        }
        while self.next_tick_ms <= now.mono_ms {
            self.next_tick_ms += self.config.ping_interval_ms.max(1);
        }
        if let State::Closing { since_ms } = self.state {
            if now.mono_ms.saturating_sub(since_ms) > self.config.close_timeout_ms {
                return TimerAction::Abort;
            }
            // Still within the linger, so its end is in the future.
            self.next_tick_ms = self.next_tick_ms.min(self.linger_end(since_ms));
            return TimerAction::None;
        }
        if self.started && now.mono_ms.saturating_sub(self.last_sent_ms) >= self.config.ping_interval_ms {
            self.send_ping(now);
            // The PING counts as sent once the owner reports the write; until then avoid
            // queueing another one on the next tick.
            self.last_sent_ms = now.mono_ms;
        }
        if self.peer_pinged && now.mono_ms.saturating_sub(self.last_recv_ms) > self.config.ping_timeout_ms {
            self.fail(&PeerError::PingTimeout, now);
        }
        TimerAction::None
    }
}

#[cfg(test)]
mod tests;
