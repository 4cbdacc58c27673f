//! One worker connection as the hub sees it: its session, what it subscribes to, how far its
//! close has gone, and its [`Outbox`].
use super::log::{LineMeta, PUBSUB};
use super::outbox::Outbox;
use super::resp::RespConn;
use super::stats::{CloseReason, ConnPhase, WORDS};
use crate::proto::{StreamId, StreamMask};
use crate::session::Session;
use crate::time::Now;

/// How far a connection's close has gone. The reason is decided once and never changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CloseState {
    /// Not closing.
    Open,
    /// We decided to close: what is queued (the ERROR, the rest of a half-written line) drains,
    /// then `Close{Graceful}` goes out.
    Closing(CloseReason),
    /// `Close{Graceful}` was emitted: waiting for the driver's `on_peer_closed` (or the close
    /// linger, which aborts).
    CloseEmitted(CloseReason),
    /// `Close{Abort}` was emitted (possibly after a graceful one): nothing more to do but
    /// wait for `on_peer_closed`.
    AbortEmitted(CloseReason),
}

impl CloseState {
    /// Why the connection closes, once decided.
    pub(super) fn reason(self) -> Option<CloseReason> {
        match self {
            Self::Open => None,
            Self::Closing(r) | Self::CloseEmitted(r) | Self::AbortEmitted(r) => Some(r),
        }
    }

    /// Whether a close was decided (emitted or not).
    #[inline]
    pub(super) fn is_closing(self) -> bool {
        self != Self::Open
    }

    /// Whether a `Close` (of either kind) went to the driver: no more writes are started.
    #[inline]
    pub(super) fn emitted(self) -> bool {
        matches!(self, Self::CloseEmitted(_) | Self::AbortEmitted(_))
    }

    /// Decides to close for `reason`, unless a reason was already decided.
    pub(super) fn decide(&mut self, reason: CloseReason) {
        if *self == Self::Open {
            *self = Self::Closing(reason);
        }
    }
}

/// What a connection subscribes to: which log lines its outbox sends.
pub(super) struct Subscriptions {
    pub mask: StreamMask,
    /// Stream `s` is delivered from log line `from[s]` on.
    pub from: [u64; StreamId::COUNT],
    /// Every line from this sequence number on is wanted (`u64::MAX` unless subscribed to all).
    pub full_from: u64,
    /// Streams whose REPLICATE waits for a batch boundary or for the upstream's tokens.
    pub pending: StreamMask,
    /// Greeted with a bare `REPLICATE` (Synapse 1.13+).
    pub bare: bool,
    /// Asked for every stream the upstream serves (`ALL` or a bare `REPLICATE`), so a waiting
    /// stream the upstream turns out not to serve is skipped, not an error.
    pub all: bool,
    /// Redis mode: channel ids subscribed, each delivered from a log line on; sorted by id,
    /// so a delivery checks it in logarithmic time however many channels a client takes.
    pub channels: Vec<(u32, u64)>,
}

impl Subscriptions {
    const fn new() -> Self {
        Self {
            mask: StreamMask::NONE,
            from: [0; StreamId::COUNT],
            full_from: u64::MAX,
            pending: StreamMask::NONE,
            bare: false,
            all: false,
            channels: Vec::new(),
        }
    }

    /// Whether log line `seq` (a stream's line, a BROADCAST line, or a Redis-mode message) is
    /// wanted; `broadcast` says whether BROADCAST lines are.
    #[inline]
    pub(super) fn wants(&self, meta: &LineMeta, seq: u64, broadcast: bool) -> bool {
        match StreamId::from_index(meta.stream as usize) {
            Some(s) => self.mask.contains(s) && seq >= self.from[s.index()],
            None if meta.stream == PUBSUB => meta.channel().is_some_and(|ch| {
                self.channels.binary_search_by_key(&ch, |&(c, _)| c).is_ok_and(|i| seq >= self.channels[i].1)
            }),
            None => broadcast,
        }
    }

    /// Whether no log line at all is wanted: no stream, no channel, and (`broadcast` false) no
    /// BROADCAST line. A Redis client that only publishes is one: its outbox holds only its
    /// replies, and the log between them is skipped whole.
    #[inline]
    pub(super) fn wants_nothing(&self, broadcast: bool) -> bool {
        !broadcast && self.mask.is_empty() && self.channels.is_empty()
    }

    /// Recomputes [`Subscriptions::full_from`] after a change.
    pub(super) fn refresh_full_from(&mut self) {
        self.full_from =
            if self.mask.is_all() { self.from.iter().copied().max().unwrap_or(0) } else { u64::MAX };
    }
}

/// Per-connection hub state.
pub(super) struct Conn {
    pub session: Session,
    pub phase: ConnPhase,
    pub subs: Subscriptions,
    pub outbox: Outbox,
    pub close: CloseState,
    pub name: Option<String>,
    /// Inbound commands past the direction check, by command word.
    pub inbound: [u64; WORDS],
    /// Bytes its socket took in all (see `writes::PROVEN_READER_BYTES`).
    pub written: u64,
    /// The most its socket's send queue can hold: the driver's last measure
    /// ([`Hub::on_send_queue`](super::Hub::on_send_queue)) plus what it took since.
    pub queue_bound: u64,
    /// When it was accepted (both clocks: uptime from the monotonic one, the wall one to show).
    pub connected_at: Now,
    /// When it last sent `PING` (monotonic ms), if ever.
    pub last_ping_ms: Option<u64>,
    /// A Redis-mode (RESP) connection's own state; `None` for a replication worker.
    pub resp: Option<Box<RespConn>>,
}

impl Conn {
    /// Its socket took more than a worker that never reads could absorb
    /// (`writes::PROVEN_READER_BYTES`): a reader, whose writes go first in every turn.
    #[inline]
    pub(super) fn is_proven_reader(&self) -> bool {
        self.written > super::writes::PROVEN_READER_BYTES
    }

    pub(super) fn new(session: Session, outbox: Outbox, now: Now) -> Self {
        Self {
            session,
            phase: ConnPhase::Waiting,
            subs: Subscriptions::new(),
            outbox,
            close: CloseState::Open,
            name: None,
            inbound: [0; WORDS],
            written: 0,
            queue_bound: 0,
            connected_at: now,
            last_ping_ms: None,
            resp: None,
        }
    }

    /// Whether BROADCAST log lines (relayed REMOTE_SERVER_UP) go to this connection: once
    /// greeted, until it closes.
    #[inline]
    pub(super) fn wants_broadcast(&self) -> bool {
        !self.close.is_closing() && self.phase != ConnPhase::Waiting && self.resp.is_none()
    }

    pub(super) fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or("anon")
    }
}
