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
//! driver implements for its I/O), `sockq` (the kernel queue ioctls), and the source thread
//! that runs the upstream link or the synthetic master and hands every batch to every core
//! (one message per core per batch). The drivers hold the sockets and nothing else.
mod core_loop;
pub(crate) mod epoll;
mod outgoing;
// The places `unsafe` is allowed (the crate denies it elsewhere): the ioctl wrapper, the io_uring
// driver, which hands the kernel buffers and reads its completions, and the one call to glibc's
// `malloc_trim`.
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
}

/// The sending side of a mailbox: a channel plus a wake-up for the receiving loop
/// (a tokio `Notify`, or an eventfd for io_uring). Cloneable, `Send`.
///
/// A core's mailbox is bounded ([`Inbox::bounded`]) so that a source producing faster than
/// the cores consume (the synthetic master at rate 0) is held back by [`Inbox::try_send`]
/// instead of growing the queue without limit; the receiving side is the same
/// `mpsc::Receiver` either way.
pub struct Inbox<T> {
    tx: Sender<T>,
    wake: Arc<dyn Fn() + Send + Sync>,
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
        Self { tx, wake: Arc::clone(&self.wake) }
    }
}

impl<T> Inbox<T> {
    /// A mailbox whose receiver is returned; `wake` is called after each send.
    pub fn new(wake: Arc<dyn Fn() + Send + Sync>) -> (Self, mpsc::Receiver<T>) {
        let (tx, rx) = mpsc::channel();
        (Self { tx: Sender::Unbounded(tx), wake }, rx)
    }

    /// A mailbox holding at most `capacity` undelivered messages: [`Inbox::send`] blocks and
    /// [`Inbox::try_send`] refuses while it is full.
    pub fn bounded(wake: Arc<dyn Fn() + Send + Sync>, capacity: usize) -> (Self, mpsc::Receiver<T>) {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        (Self { tx: Sender::Bounded(tx), wake }, rx)
    }

    /// Sends and wakes the receiver (blocking while a bounded mailbox is full). Returns false
    /// if the receiver is gone.
    pub fn send(&self, msg: T) -> bool {
        let ok = match &self.tx {
            Sender::Unbounded(tx) => tx.send(msg).is_ok(),
            Sender::Bounded(tx) => tx.send(msg).is_ok(),
        };
        (self.wake)();
        ok
    }

    /// Sends without blocking and wakes the receiver. A full mailbox gives the message back
    /// (`TrySendError::Full`), after waking the receiver so that it drains.
    pub fn try_send(&self, msg: T) -> Result<(), mpsc::TrySendError<T>> {
        let res = match &self.tx {
            Sender::Unbounded(tx) => tx.send(msg).map_err(|e| mpsc::TrySendError::Disconnected(e.0)),
            Sender::Bounded(tx) => tx.try_send(msg),
        };
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
    /// The other cores' mailboxes (not this one's), in core order: this core hands its
    /// Redis-mode publishes to them itself, one thread hop instead of two through the source.
    pub peers: Vec<Inbox<CoreMsg>>,
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
