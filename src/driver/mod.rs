//! I/O drivers: thread per core, each running one [`crate::hub::Hub`] (ARCHITECTURE.md §3, §5).
//!
//! - `epoll`: a tokio current-thread runtime per core (portable; works where io_uring is
//!   blocked, e.g. Docker's default seccomp profile).
//! - `uring`: a hand-written io_uring loop per core (multishot accept/recv, provided buffers,
//!   gathered sends).
//!
//! Shared by both: the messages a core receives ([`CoreMsg`]) through its [`Inbox`], the
//! [`CoreContext`] a core thread starts with, `core_loop` (the mailbox, the hub's outputs, the
//! gathered writes of a turn and the shutdown grace, behind a small `Sockets` trait that each
//! driver implements for its I/O), `moderation` (when a core under heavy fan-out lets lines
//! gather before it takes its mailbox), `balance` (which core holds a new connection), `sockq`
//! (the kernel queue ioctls), and the source thread that runs the upstream link or the
//! synthetic master and hands every batch to every core (one message per core per batch). The
//! drivers hold the sockets and nothing else.
mod balance;
pub use balance::Balance;
mod core_loop;
pub(crate) mod epoll;
pub(crate) mod moderation;
mod outgoing;
// The places `unsafe` is allowed (the crate denies it elsewhere): the epoll driver's timerfd, the
// ioctl wrapper, the io_uring driver, which hands the kernel buffers and reads its completions,
// and the one call to glibc's `malloc_trim`.
#[allow(unsafe_code)]
mod hold_timer;
#[allow(unsafe_code)]
pub mod sockq;
pub(crate) mod source;
mod start_gate;
pub use start_gate::StartGate;
#[allow(unsafe_code)]
mod trim;
#[allow(unsafe_code)]
pub(crate) mod uring;

use std::sync::mpsc;
use std::sync::Arc;

use crate::hub::stats::CoreSnapshot;
use crate::hub::{Batch, HubConfig, UpstreamCmd, UpstreamEvent};
/// Re-exported for the source thread; the clock lives beside [`crate::time::Now`].
pub(crate) use crate::time::Clock;

/// A message for one core, in order with the batches.
// `Upstream` is large (a token per stream) but rare (one per upstream connect); boxing it would
// cost an allocation per core per connect and change nothing on the batch path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum CoreMsg {
    /// Append to the log.
    Batch(Arc<Batch>),
    /// Upstream connected or dropped.
    Upstream(UpstreamEvent),
    /// Send a metrics snapshot back.
    Snapshot(mpsc::Sender<CoreSnapshot>),
    /// Rows fetched from a 1.10–1.12 master for this core's `UpstreamCmd::Fetch` `id` (or why
    /// not).
    Fetched {
        /// The core's request id.
        id: u64,
        /// The rows and the master's POSITION, or the error.
        result: Result<crate::hub::Fetched, String>,
    },
    /// Say `ERROR server shutting down` to every worker, flush, close, and stop.
    Shutdown,
    /// Redis-mode batches (`batches` of them) carrying messages on these channels (channel
    /// ids, sorted) were dropped for this core, here in its order with the batches: its queue
    /// in the source was at its bound (see `driver::source`, "Back-pressure"). The core cuts
    /// off its subscribers of those channels, as Redis cuts off a subscriber over its
    /// `client-output-buffer-limit pubsub`, so nobody silently misses a message.
    PublishLost {
        /// The channels whose messages were dropped, sorted, without repeats.
        channels: Vec<u32>,
        /// How many batches were dropped.
        batches: u64,
    },
    /// A connection another core accepted, for this core to hold: it has fewer connections
    /// (`balance`). Nothing was read from the socket or written to it yet.
    Adopt(Adopted),
}

/// A socket accepted on one core and handed to another ([`CoreMsg::Adopt`]).
#[derive(Debug)]
pub struct Adopted {
    /// The accepted socket.
    pub fd: std::os::fd::OwnedFd,
    /// Accepted on the Redis-mode listener rather than the worker one.
    pub resp: bool,
}

/// The sending side of a mailbox: a channel plus a wake-up for the receiving loop
/// (a tokio `Notify`, or an eventfd for io_uring). Cloneable, `Send`.
///
/// Every send puts the message in the channel, then issues one sequentially consistent fence,
/// and only then looks at what decides the wake-up ([`IdleCore`]'s flag, then in the wake-up
/// itself io_uring's "may be asleep" flag). That one fence is the sender's half of both
/// handshakes, so neither flag's reader fences again.
///
/// A core's mailbox is bounded ([`Inbox::bounded`]) so that a source producing faster than
/// the cores consume (the synthetic master at rate 0) is held back by [`Inbox::try_send`]
/// instead of growing the queue without limit; the receiving side is the same
/// `mpsc::Receiver` either way.
pub struct Inbox<T> {
    tx: Sender<T>,
    wake: Arc<dyn Fn() + Send + Sync>,
    /// A core's mailbox: whether the core has connections ([`Inbox::try_send_update`]).
    idle: Option<Arc<IdleCore>>,
}

/// Whether a core has any connection, as the senders to its mailbox see it. A core with none
/// needs the batches and the upstream's news only before its next connection arrives (it
/// takes its mail at the top of every turn, before it reads anything a new connection sent),
/// so [`Inbox::try_send_update`] leaves it asleep until [`IdleCore::wake_after`] such
/// messages wait, or its mailbox is full. On a machine with more core threads than workers
/// this spares every idle core a wake-up per batch.
///
/// The core says what it is at the top of each mailbox drain (`IdleCore::observe`); when it
/// gains its first connection it clears the flag and fences before it looks at the mailbox,
/// and a sender fences after its send before it reads the flag: either the sender sees the
/// core busy and wakes it, or the core's drain finds the message.
#[derive(Debug)]
pub struct IdleCore {
    idle: std::sync::atomic::AtomicBool,
    /// Update messages sent since the core last drained its mailbox while idle.
    unread: std::sync::atomic::AtomicUsize,
    wake_after: usize,
}

impl IdleCore {
    /// For a mailbox of `depth` messages: an idle core is woken once half of it waits.
    pub fn new(depth: usize) -> Arc<Self> {
        Arc::new(Self {
            idle: std::sync::atomic::AtomicBool::new(false),
            unread: std::sync::atomic::AtomicUsize::new(0),
            wake_after: (depth / 2).max(1),
        })
    }

    /// How many update messages an idle core leaves unread before a sender wakes it.
    pub fn wake_after(&self) -> usize {
        self.wake_after
    }

    /// The core, before it takes its mail: whether it has no connection now.
    pub(crate) fn observe(&self, no_connections: bool) {
        use std::sync::atomic::{fence, Ordering};
        if self.idle.load(Ordering::Relaxed) != no_connections {
            self.idle.store(no_connections, Ordering::Relaxed);
            // Orders the store before the drain's loads (the sender's fence is the other half).
            fence(Ordering::SeqCst);
        }
        if no_connections {
            self.unread.store(0, Ordering::Relaxed);
        }
    }

    /// A sender, after its send and the fence that follows it ([`Inbox`]): whether the core
    /// may be left asleep.
    fn may_wait(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.idle.load(Ordering::Relaxed) && self.unread.fetch_add(1, Ordering::Relaxed) + 1 < self.wake_after
    }
}

/// After a send, before anything that decides whether to wake the receiver: orders the
/// message before those loads (see [`Inbox`]; the receiver's half is its own store, fence,
/// then look at the channel).
#[inline]
fn sent() {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

enum Sender<T> {
    Unbounded(mpsc::Sender<T>),
    Bounded(mpsc::SyncSender<T>),
}

impl<T> Clone for Inbox<T> {
    fn clone(&self) -> Self {
        let tx = match &self.tx {
            Sender::Unbounded(tx) => Sender::Unbounded(tx.clone()),
            Sender::Bounded(tx) => Sender::Bounded(tx.clone()),
        };
        Self { tx, wake: Arc::clone(&self.wake), idle: self.idle.clone() }
    }
}

impl<T> Inbox<T> {
    /// A mailbox whose receiver is returned; `wake` is called after each send.
    pub fn new(wake: Arc<dyn Fn() + Send + Sync>) -> (Self, mpsc::Receiver<T>) {
        let (tx, rx) = mpsc::channel();
        (Self { tx: Sender::Unbounded(tx), wake, idle: None }, rx)
    }

    /// A mailbox holding at most `capacity` undelivered messages: [`Inbox::send`] blocks and
    /// [`Inbox::try_send`] refuses while it is full.
    pub fn bounded(wake: Arc<dyn Fn() + Send + Sync>, capacity: usize) -> (Self, mpsc::Receiver<T>) {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        (Self { tx: Sender::Bounded(tx), wake, idle: None }, rx)
    }

    /// This mailbox's core tells its senders whether it has connections through `idle`
    /// ([`Inbox::try_send_update`]).
    #[must_use]
    pub fn with_idle(mut self, idle: Arc<IdleCore>) -> Self {
        self.idle = Some(idle);
        self
    }

    /// Sends and wakes the receiver (blocking while a bounded mailbox is full). Returns false
    /// if the receiver is gone.
    pub fn send(&self, msg: T) -> bool {
        let ok = match &self.tx {
            Sender::Unbounded(tx) => tx.send(msg).is_ok(),
            Sender::Bounded(tx) => tx.send(msg).is_ok(),
        };
        sent();
        (self.wake)();
        ok
    }

    /// Sends without blocking and wakes the receiver. A full mailbox gives the message back
    /// (`TrySendError::Full`), after waking the receiver so that it drains.
    pub fn try_send(&self, msg: T) -> Result<(), mpsc::TrySendError<T>> {
        let res = self.push(msg);
        (self.wake)();
        res
    }

    /// Puts `msg` in the mailbox without blocking, then fences ([`sent`]); wakes no one.
    fn push(&self, msg: T) -> Result<(), mpsc::TrySendError<T>> {
        let res = match &self.tx {
            Sender::Unbounded(tx) => tx.send(msg).map_err(|e| mpsc::TrySendError::Disconnected(e.0)),
            Sender::Bounded(tx) => tx.try_send(msg),
        };
        sent();
        res
    }

    /// [`Inbox::try_send`] for a message that only brings the core's state up to date (a
    /// batch, the upstream's news): a core with no connection ([`IdleCore`]) is not woken for
    /// it until [`IdleCore::wake_after`] of them wait. A full mailbox always wakes it.
    pub fn try_send_update(&self, msg: T) -> Result<(), mpsc::TrySendError<T>> {
        let res = self.push(msg);
        if res.is_ok() && self.idle.as_ref().is_some_and(|idle| idle.may_wait()) {
            return res;
        }
        (self.wake)();
        res
    }
}

/// How a core's loop is woken when its inbox gets a message.
pub enum CoreWakeup {
    /// The epoll driver waits on a tokio `Notify`.
    Notify(Arc<tokio::sync::Notify>),
    /// The io_uring driver reads an eventfd, which senders write only while `asleep` is set
    /// (by the core, before it sleeps; `uring::wakeup`).
    EventFd {
        /// The eventfd.
        fd: std::os::fd::OwnedFd,
        /// Set by the core when it may sleep, cleared by the sender that wakes it.
        asleep: Arc<std::sync::atomic::AtomicBool>,
    },
}

/// What a core thread starts with.
pub struct CoreContext {
    /// Core index (0-based).
    pub index: usize,
    /// This core's listener: bound with SO_REUSEPORT, non-blocking, already listening.
    pub listener: std::net::TcpListener,
    /// Hub settings.
    pub hub: HubConfig,
    /// Messages from the source thread and the scraper.
    pub inbox: mpsc::Receiver<CoreMsg>,
    /// How `inbox` wakes this core.
    pub wakeup: CoreWakeup,
    /// Shared with the senders to `inbox`: whether this core has connections.
    pub idle: Arc<IdleCore>,
    /// Commands for the upstream, tagged with this core's index.
    pub upstream: Inbox<(usize, UpstreamCmd)>,
    /// The process clock.
    pub clock: Clock,
    /// SO_SNDBUF for accepted worker sockets (0: the kernel's default and auto-tuning).
    pub worker_sndbuf: usize,
    /// Redis mode: this core's RESP listener (SO_REUSEPORT, non-blocking, listening) and the
    /// state every core shares.
    pub resp: Option<(std::net::TcpListener, Arc<crate::resp::RespState>)>,
    /// Passed once the core holds its own descriptors; accepting starts only after it opens.
    pub start: StartGate,
    /// TCP_NOTSENT_LOWAT for accepted worker sockets (0: 64 KiB until the worker proves it
    /// reads, then none).
    pub worker_notsent_lowat: usize,
    /// When the core holds its mailbox back to share writes (`moderation`).
    pub moderation: moderation::ModerationConfig,
    /// The other cores' mailboxes (not this one's), in core order: this core hands its
    /// Redis-mode publishes to them itself, one thread hop instead of two through the source,
    /// and the connections it accepts while another core has fewer (`balance`).
    pub peers: Vec<Inbox<CoreMsg>>,
    /// Every core's connection counts, shared by the cores (`balance`).
    pub balance: Arc<Balance>,
    /// The source, when this core runs it on its own thread (`--threads 1`: see
    /// `HostedSource`) instead of a source thread beside it. The core's `wakeup` is then a
    /// tokio `Notify` on either driver.
    pub hosted_source: Option<HostedSource>,
}

/// The source thread's work, run as a task on a core's own tokio runtime instead
/// (`--threads 1`, either driver; the io_uring loop then sleeps in tokio, see
/// `uring::event_loop::Driver::run_hosted`). A line from the master then reaches the
/// workers' sockets without a wake-up of another thread (README, "The source on the core's
/// thread"). Opaque outside the crate.
pub struct HostedSource(pub(crate) source::SourceContext);

impl HostedSource {
    /// Starts the source as a task of this thread's `LocalSet`.
    pub(crate) fn spawn_local(self) -> SourceTask {
        let stopping = Arc::clone(&self.0.stop);
        SourceTask { handle: tokio::task::spawn_local(source::serve(self.0)), stopping }
    }
}

/// The source running on board ([`HostedSource::spawn_local`]).
pub(crate) struct SourceTask {
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Set by the server when it stops the source.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl SourceTask {
    /// Whether the source has ended ([`SourceTask::ended`] then returns at once).
    pub(crate) fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the source to end: `None` if the server stopped it, else why it stopped on
    /// its own (the core then stops too: a core without its source serves nothing new). Call
    /// it once.
    pub(crate) async fn ended(&mut self) -> Option<anyhow::Error> {
        let res = (&mut self.handle).await;
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        Some(match res {
            Ok(Err(e)) => e.context("the source stopped"),
            _ => anyhow::anyhow!("the source stopped"),
        })
    }
}

impl Drop for SourceTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::TrySendError;
    use std::sync::Arc;

    use super::{IdleCore, Inbox};

    /// A mailbox of `depth` with an [`IdleCore`], and a count of its wake-ups.
    fn mailbox(
        depth: usize,
        idle_depth: usize,
    ) -> (Inbox<u32>, std::sync::mpsc::Receiver<u32>, Arc<IdleCore>, Arc<AtomicUsize>) {
        let wakes = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&wakes);
        let (inbox, rx) = Inbox::bounded(
            Arc::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
            depth,
        );
        let idle = IdleCore::new(idle_depth);
        (inbox.with_idle(Arc::clone(&idle)), rx, idle, wakes)
    }

    #[test]
    fn an_idle_core_is_woken_once_half_its_mailbox_waits() {
        let (inbox, rx, idle, wakes) = mailbox(64, 64);
        idle.observe(true);
        assert_eq!(idle.wake_after(), 32);
        for i in 0..31 {
            inbox.try_send_update(i).unwrap();
        }
        assert_eq!(wakes.load(Ordering::SeqCst), 0, "31 updates left an idle core asleep");
        inbox.try_send_update(31).unwrap();
        assert_eq!(wakes.load(Ordering::SeqCst), 1, "the 32nd woke it");
        // The core takes its mail: the count starts again.
        idle.observe(true);
        assert_eq!(rx.try_iter().count(), 32);
        inbox.try_send_update(32).unwrap();
        assert_eq!(wakes.load(Ordering::SeqCst), 1);
        // Anything else wakes it at once.
        inbox.try_send(33).unwrap();
        assert_eq!(wakes.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_core_with_connections_is_woken_for_every_update() {
        let (inbox, _rx, idle, wakes) = mailbox(64, 64);
        idle.observe(true);
        inbox.try_send_update(0).unwrap();
        assert_eq!(wakes.load(Ordering::SeqCst), 0);
        // Its first connection: the next update wakes it.
        idle.observe(false);
        for i in 1..=5 {
            inbox.try_send_update(i).unwrap();
        }
        assert_eq!(wakes.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn a_full_mailbox_wakes_an_idle_core() {
        // A mailbox smaller than the idle threshold says: only a full one wakes.
        let (inbox, _rx, idle, wakes) = mailbox(2, 64);
        idle.observe(true);
        inbox.try_send_update(0).unwrap();
        inbox.try_send_update(1).unwrap();
        assert_eq!(wakes.load(Ordering::SeqCst), 0);
        assert!(matches!(inbox.try_send_update(2), Err(TrySendError::Full(2))));
        assert_eq!(wakes.load(Ordering::SeqCst), 1);
    }
}
