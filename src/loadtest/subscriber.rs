//! The subscriber side: client threads, each a tokio current-thread runtime running one task
//! per connection. A replhub subscriber is a [`Client`] (`next_raw`, then `try_next_raw` until
//! the read is used up); a Redis subscriber speaks RESP over a `TcpStream` with the same read
//! buffer size. Both hand each delivered line to the same accounting ([`SubState::on_rdata`]):
//! the token only (`parse_rdata`), the publish time at its fixed offset, no JSON parsing.
//!
//! [`Check::Count`] is the cheap replhub subscriber for max-rate runs, where the full check costs
//! the load generator as much CPU per line as the server spends: a raw socket, lines found with
//! `memchr` and counted, and only the last RDATA line of each read parsed. With one stream the
//! tokens go up by exactly one, so that line's token must be the previous read's last token
//! plus the lines counted in between: loss, duplication and reordering are still caught at
//! every read boundary (and the total at the end). With several streams the sampled tokens must
//! only go up, and the total must match. Latency is one sample per read, its first line (the
//! oldest one in the read).
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use memchr::memchr_iter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::hist::Histogram;
use super::resp::{self, Frame};
use super::{payload, Shared};
use crate::client::{Client, ClientOptions, DEFAULT_READ_BUFFER};
use crate::proto::fields::{parse_position, parse_rdata};
use crate::proto::{Line, StreamId, Token};

/// Connections a client thread opens at the same time (the rest wait), so that thousands of
/// connects do not overflow the listen backlog.
const CONNECT_CONCURRENCY: usize = 64;
/// How often an idle client thread looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(5);
/// `last` of a stream whose POSITION (or SUBSCRIBE confirmation) has not arrived.
const UNSET: i64 = i64::MIN;

/// Where subscribers connect and what they subscribe to.
#[derive(Clone, Debug)]
pub(super) struct SubPlan {
    /// replhub's worker port, or Redis.
    pub target: SubTarget,
    /// The streams every subscriber gets (= the streams published).
    pub streams: Vec<StreamId>,
    /// What a replhub subscriber sends `REPLICATE` for (`["ALL"]` or the stream names).
    pub replicate: Vec<String>,
    /// How a replhub subscriber checks what it receives.
    pub check: Check,
}

/// How a replhub subscriber checks the lines it receives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Check {
    /// Every line through the client library: split, direction-checked, its token compared
    /// with the previous one and its latency recorded.
    #[default]
    Full,
    /// Lines counted with `memchr`; the token of the last line of each read checked against the
    /// count, one latency sample per read (see the module docs).
    Count,
}

impl Check {
    /// The name used on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Count => "count",
        }
    }
}

/// The server the subscribers talk to.
#[derive(Clone, Copy, Debug)]
pub(super) enum SubTarget {
    /// replhub (or a Synapse master): the replication protocol.
    Replhub(SocketAddr),
    /// Redis pub/sub: one channel per stream, named like the stream.
    Redis(SocketAddr),
}

/// One subscriber's accounting.
#[derive(Clone, Debug)]
pub(super) struct SubState {
    /// Global subscriber index.
    pub id: usize,
    /// Last token seen per stream ([`UNSET`] before its POSITION).
    pub last: [i64; StreamId::COUNT],
    /// Streams with a POSITION / confirmation.
    positioned: u32,
    /// Lines accounted (each subscribed stream's RDATA).
    pub received: u64,
    /// Bytes of those lines (with `\n`).
    pub bytes: u64,
    /// Lines skipped over by a token jump (lost in the middle).
    pub gaps: u64,
    /// Lines whose token was not above the previous one (duplicate or reordered).
    pub reordered: u64,
    /// RDATA lines that are not ours (bad token, unknown or unsubscribed stream, no time).
    pub unexpected: u64,
    /// Why the connection ended before the stop, if it did.
    pub ended: Option<String>,
    /// Accounted by counting ([`Check::Count`]): `last` holds sampled tokens only, so what is
    /// missing at the end is what was published minus what was counted.
    pub counted: bool,
}

impl SubState {
    fn new(id: usize) -> Self {
        Self {
            id,
            last: [UNSET; StreamId::COUNT],
            positioned: 0,
            received: 0,
            bytes: 0,
            gaps: 0,
            reordered: 0,
            unexpected: 0,
            ended: None,
            counted: false,
        }
    }

    /// The stream's starting point (POSITION, or a Redis subscription: tokens start at 1).
    fn position(&mut self, stream: StreamId, token: i64) {
        let i = stream.index();
        if self.last[i] == UNSET {
            self.positioned += 1;
            self.last[i] = token;
        }
    }

    /// One delivered RDATA line: `args` is `<stream> <token> <row>`, `len` the line's length
    /// with its `\n`.
    #[inline]
    fn on_rdata(&mut self, hist: &mut Histogram, args: &[u8], len: usize, now_ns: u64) {
        let Ok(r) = parse_rdata(args) else {
            self.unexpected += 1;
            return;
        };
        let (Some(stream), Token::Value(token)) = (StreamId::from_name(r.stream.as_bytes()), r.token) else {
            self.unexpected += 1;
            return;
        };
        let last = &mut self.last[stream.index()];
        if *last == UNSET {
            self.unexpected += 1;
            return;
        }
        if token == *last + 1 {
            *last = token;
        } else if token > *last {
            self.gaps += (token - *last - 1) as u64;
            *last = token;
        } else {
            self.reordered += 1;
            return;
        }
        self.received += 1;
        self.bytes += len as u64;
        match payload::publish_time(r.row) {
            Some(ts) => hist.record(now_ns.saturating_sub(ts)),
            None => self.unexpected += 1,
        }
    }
}

/// A run of RDATA lines in one read, as a counting subscriber sees it.
#[derive(Default)]
struct Run<'a> {
    /// Lines.
    n: u64,
    /// Their bytes, `\n` included.
    len: u64,
    /// The first one's `<stream> <token> <row>` (for latency).
    first: Option<&'a [u8]>,
    /// The last one's `<stream> <token> <row>` (for the token check).
    last: &'a [u8],
}

impl<'a> Run<'a> {
    /// Adds one RDATA line: `line` is the whole line (without `\n`), `args` what follows `RDATA `.
    fn push(&mut self, line: &[u8], args: &'a [u8]) {
        self.n += 1;
        self.len += line.len() as u64 + 1;
        self.last = args;
        self.first.get_or_insert(args);
    }
}

/// After a read taken at `now_ns` has been accounted: publishes the subscriber's count (and,
/// if it grew, when) and, the first time every stream is positioned, releases its connect
/// permit and counts it as ready. The permit being gone is what marks the subscriber ready.
fn after_read(
    shared: &Shared,
    sub: &SubState,
    want: u32,
    permit: &mut Option<SemaphorePermit<'_>>,
    now_ns: u64,
) {
    shared.slots[sub.id].on_read(sub.received, now_ns);
    if permit.is_some() && sub.positioned >= want {
        drop(permit.take());
        shared.ready.fetch_add(1, Ordering::SeqCst);
    }
}

impl SubState {
    /// A run of RDATA lines counted in one read. With `exact` (one stream), the last token
    /// must be the previous one plus the lines counted.
    fn on_counted(&mut self, hist: &mut Histogram, run: &Run<'_>, exact: bool, now_ns: u64) {
        let n = run.n;
        let Ok(r) = parse_rdata(run.last) else {
            self.unexpected += n;
            return;
        };
        let (Some(stream), Token::Value(token)) = (StreamId::from_name(r.stream.as_bytes()), r.token) else {
            self.unexpected += n;
            return;
        };
        let last = &mut self.last[stream.index()];
        if *last == UNSET {
            self.unexpected += n;
            return;
        }
        let want = if exact { *last + n as i64 } else { *last + 1 };
        if token < want {
            // Lines counted twice, or an older line after a newer one.
            self.reordered += (want - token) as u64;
        } else if exact && token > want {
            self.gaps += (token - want) as u64;
        }
        *last = token.max(*last);
        self.received += n;
        self.bytes += run.len;
        let first = run.first.and_then(|a| parse_rdata(a).ok());
        match first.and_then(|r| payload::publish_time(r.row)) {
            Some(ts) => hist.record(now_ns.saturating_sub(ts)),
            None => self.unexpected += 1,
        }
    }
}

/// What a client thread hands back.
#[derive(Debug, Default)]
pub(super) struct ThreadResult {
    /// Latency of every line its subscribers got.
    pub hist: Histogram,
    /// Its subscribers.
    pub subs: Vec<SubState>,
}

struct Local {
    hist: Histogram,
    subs: Vec<SubState>,
}

/// Runs one client thread: opens `subs` subscribers and `idle` idle connections, then reads
/// until `shared.stop_clients`.
pub(super) fn client_thread(
    subs: Vec<usize>,
    idle: Vec<usize>,
    plan: Arc<SubPlan>,
    shared: Arc<Shared>,
) -> anyhow::Result<ThreadResult> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local_set = tokio::task::LocalSet::new();
    let state = Rc::new(RefCell::new(Local {
        hist: Histogram::new(),
        subs: subs.iter().map(|&id| SubState::new(id)).collect(),
    }));
    let gate = Rc::new(Semaphore::new(CONNECT_CONCURRENCY));
    local_set.block_on(&rt, async {
        let mut tasks = Vec::with_capacity(subs.len() + idle.len());
        for (slot, _) in subs.iter().enumerate() {
            let (state, plan, shared, gate) =
                (Rc::clone(&state), Arc::clone(&plan), Arc::clone(&shared), Rc::clone(&gate));
            tasks.push(tokio::task::spawn_local(async move {
                let id = state.borrow().subs[slot].id;
                let res = match plan.target {
                    SubTarget::Replhub(addr) if plan.check == Check::Count => {
                        counting_subscriber(addr, slot, &plan, &state, &shared, &gate).await
                    }
                    SubTarget::Replhub(addr) => {
                        replhub_subscriber(addr, slot, &plan, &state, &shared, &gate).await
                    }
                    SubTarget::Redis(addr) => {
                        redis_subscriber(addr, slot, &plan, &state, &shared, &gate).await
                    }
                };
                shared.slots[id].alive.store(false, Ordering::Relaxed);
                let why = match res {
                    Ok(()) => "closed by the server".to_owned(),
                    Err(e) => e,
                };
                state.borrow_mut().subs[slot].ended = Some(why);
            }));
        }
        for &id in &idle {
            let (plan, shared, gate) = (Arc::clone(&plan), Arc::clone(&shared), Rc::clone(&gate));
            tasks.push(tokio::task::spawn_local(async move {
                let res = match plan.target {
                    SubTarget::Replhub(addr) => replhub_idle(addr, id, &shared, &gate).await,
                    SubTarget::Redis(addr) => redis_idle(addr, &shared, &gate).await,
                };
                if let Err(e) = res {
                    shared.note_error(format!("idle connection {id}: {e}"));
                }
            }));
        }
        while !shared.stop_clients.load(Ordering::Relaxed) {
            tokio::time::sleep(STOP_POLL).await;
        }
        for t in &tasks {
            t.abort();
        }
    });
    // Dropping the set drops every task (and its socket), leaving `state` with one owner.
    drop(local_set);
    let local =
        std::mem::replace(&mut *state.borrow_mut(), Local { hist: Histogram::new(), subs: Vec::new() });
    Ok(ThreadResult { hist: local.hist, subs: local.subs })
}

/// A replhub subscriber: connect, wait for the POSITION of every stream, then account every
/// line until stopped (the task is aborted) or the server closes (returned).
async fn replhub_subscriber(
    addr: SocketAddr,
    slot: usize,
    plan: &SubPlan,
    state: &RefCell<Local>,
    shared: &Shared,
    gate: &Semaphore,
) -> Result<(), String> {
    let id = state.borrow().subs[slot].id;
    let opts = ClientOptions {
        name: format!("lt-sub-{id}"),
        streams: plan.replicate.clone(),
        ..ClientOptions::default()
    };
    let permit = gate.acquire().await.map_err(|e| e.to_string())?;
    let mut client = match Client::connect(addr, opts).await {
        Ok(c) => c,
        Err(e) => {
            shared.connect_failed(format!("subscriber {id}: connect: {e}"));
            return Err(format!("connect: {e}"));
        }
    };
    let want = plan.streams.len() as u32;
    let mut permit = Some(permit);
    loop {
        let first = match client.next_raw().await {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let now = shared.clock.now_ns();
        let mut guard = state.borrow_mut();
        let Local { hist, subs } = &mut *guard;
        let sub = &mut subs[slot];
        on_line(sub, hist, &first, now);
        loop {
            match client.try_next_raw() {
                Ok(Some(line)) => on_line(sub, hist, &line, now),
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        after_read(shared, sub, want, &mut permit, now);
        drop(guard);
    }
}

/// A replhub subscriber that counts ([`Check::Count`]): a raw socket sends `NAME` and the
/// `REPLICATE`s (no `PING`, so the server never arms its ping timeout for it), then every read
/// is scanned with `memchr`. A line that does not start with `RDATA ` (`SERVER`, `POSITION`,
/// a keep-alive `PING`) goes through the full parse; RDATA lines are only counted.
async fn counting_subscriber(
    addr: SocketAddr,
    slot: usize,
    plan: &SubPlan,
    state: &RefCell<Local>,
    shared: &Shared,
    gate: &Semaphore,
) -> Result<(), String> {
    let id = state.borrow().subs[slot].id;
    let permit = gate.acquire().await.map_err(|e| e.to_string())?;
    let mut hello = format!("NAME lt-sub-{id}\n");
    for r in &plan.replicate {
        hello.push_str(&format!("REPLICATE {r}\n"));
    }
    let connect = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(hello.as_bytes()).await?;
        Ok::<_, std::io::Error>(stream)
    };
    let mut stream = match connect.await {
        Ok(s) => s,
        Err(e) => {
            shared.connect_failed(format!("subscriber {id}: connect: {e}"));
            return Err(format!("connect: {e}"));
        }
    };
    state.borrow_mut().subs[slot].counted = true;
    let exact = plan.streams.len() == 1;
    let want = plan.streams.len() as u32;
    let permit = Some(permit);
    read_loop(&mut stream, slot, state, shared, want, permit, |sub, hist, buf, now| {
        Ok(scan_counted(sub, hist, buf, exact, now))
    })
    .await
}

/// The read loop of the raw-socket subscribers: each read's complete frames go to `scan`
/// (which returns the bytes it used) with the subscriber's state borrowed, then
/// [`after_read`]. Returns `Ok` when the server closes.
async fn read_loop(
    stream: &mut TcpStream,
    slot: usize,
    state: &RefCell<Local>,
    shared: &Shared,
    want: u32,
    mut permit: Option<SemaphorePermit<'_>>,
    mut scan: impl FnMut(&mut SubState, &mut Histogram, &[u8], u64) -> Result<usize, String>,
) -> Result<(), String> {
    let mut buf = BytesMut::new();
    loop {
        if !fill(stream, &mut buf).await? {
            return Ok(());
        }
        let now = shared.clock.now_ns();
        let mut guard = state.borrow_mut();
        let Local { hist, subs } = &mut *guard;
        let sub = &mut subs[slot];
        let used = scan(sub, hist, &buf, now)?;
        buf.advance(used);
        after_read(shared, sub, want, &mut permit, now);
        drop(guard);
    }
}

/// Accounts the complete lines at the start of `buf` (see [`counting_subscriber`]); returns
/// how many bytes they take.
fn scan_counted(sub: &mut SubState, hist: &mut Histogram, buf: &[u8], exact: bool, now: u64) -> usize {
    const RDATA: &[u8] = b"RDATA ";
    let mut start = 0usize;
    let mut run = Run::default();
    for nl in memchr_iter(b'\n', buf) {
        let line = &buf[start..nl];
        if let Some(args) = line.strip_prefix(RDATA) {
            run.push(line, args);
        } else {
            // Account the RDATA run before it first, so the accounting stays in line order.
            if run.n > 0 {
                sub.on_counted(hist, &run, exact, now);
                run = Run::default();
            }
            other_line(sub, line);
        }
        start = nl + 1;
    }
    if run.n > 0 {
        sub.on_counted(hist, &run, exact, now);
    }
    start
}

/// A line other than RDATA seen by a counting subscriber.
fn other_line(sub: &mut SubState, line: &[u8]) {
    if let Some(args) = line.strip_prefix(b"POSITION ") {
        if let Ok(p) = parse_position(args) {
            if let Some(s) = StreamId::from_name(p.stream.as_bytes()) {
                sub.position(s, p.token);
            }
        }
    }
}

#[inline]
fn on_line(sub: &mut SubState, hist: &mut Histogram, line: &Line, now: u64) {
    match line.word() {
        b"RDATA" => sub.on_rdata(hist, line.args(), line.as_bytes().len() + 1, now),
        b"POSITION" => {
            if let Ok(p) = parse_position(line.args()) {
                if let Some(s) = StreamId::from_name(p.stream.as_bytes()) {
                    sub.position(s, p.token);
                }
            }
        }
        _ => {}
    }
}

/// A replhub worker that subscribes to nothing: connect, wait for `SERVER`, then keep the
/// connection alive (answering the keep-alive) until stopped.
async fn replhub_idle(addr: SocketAddr, id: usize, shared: &Shared, gate: &Semaphore) -> Result<(), String> {
    let opts =
        ClientOptions { name: format!("lt-idle-{id}"), streams: Vec::new(), ..ClientOptions::default() };
    let permit = gate.acquire().await.map_err(|e| e.to_string())?;
    let mut client = match Client::connect(addr, opts).await {
        Ok(c) => c,
        Err(e) => {
            shared.connect_failed(format!("idle connection {id}: connect: {e}"));
            return Err(format!("connect: {e}"));
        }
    };
    let mut permit = Some(permit);
    loop {
        match client.next_raw().await {
            Ok(Some(line)) => {
                if permit.is_some() && line.word() == b"SERVER" {
                    drop(permit.take());
                    shared.ready.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok(None) => return Err("closed by the server".to_owned()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Reads more bytes into `buf` (reserving like the replhub client does); `Ok(false)` on EOF.
async fn fill(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<bool, String> {
    if buf.capacity() - buf.len() < DEFAULT_READ_BUFFER / 4 {
        buf.reserve(DEFAULT_READ_BUFFER);
    }
    match stream.read_buf(buf).await {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        Err(e) => Err(e.to_string()),
    }
}

async fn redis_connect(addr: SocketAddr, channels: &[&[u8]]) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut cmd = Vec::new();
    let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
    args.extend_from_slice(channels);
    resp::write_command(&mut cmd, &args);
    stream.write_all(&cmd).await.map_err(|e| e.to_string())?;
    Ok(stream)
}

/// A Redis subscriber: SUBSCRIBE to one channel per stream, wait for the confirmations, then
/// account every message exactly like a replhub line.
async fn redis_subscriber(
    addr: SocketAddr,
    slot: usize,
    plan: &SubPlan,
    state: &RefCell<Local>,
    shared: &Shared,
    gate: &Semaphore,
) -> Result<(), String> {
    let id = state.borrow().subs[slot].id;
    let channels: Vec<&[u8]> = plan.streams.iter().map(|s| s.name().as_bytes()).collect();
    let permit = gate.acquire().await.map_err(|e| e.to_string())?;
    let mut stream = match redis_connect(addr, &channels).await {
        Ok(s) => s,
        Err(e) => {
            shared.connect_failed(format!("subscriber {id}: {e}"));
            return Err(e);
        }
    };
    let want = plan.streams.len() as u32;
    let permit = Some(permit);
    let mut framer = resp::Framer::default();
    read_loop(&mut stream, slot, state, shared, want, permit, |sub, hist, buf, now| {
        let mut used = 0;
        // With `--check count`, the messages of a read are framed (by the remembered header
        // and its length, see `resp::Framer`) and counted, and only the run's first and last
        // payloads are parsed, as `counting_subscriber` does.
        let count = plan.check == Check::Count;
        sub.counted |= count;
        let exact = plan.streams.len() == 1;
        let mut run = Run::default();
        loop {
            match framer.next(&buf[used..]) {
                Ok(Some((frame, n))) => {
                    used += n;
                    match frame {
                        Frame::Message { payload, .. } => match payload.strip_prefix(b"RDATA ") {
                            Some(args) if count => run.push(payload, args),
                            Some(args) => sub.on_rdata(hist, args, payload.len() + 1, now),
                            None => sub.unexpected += 1,
                        },
                        Frame::Subscribed { channel } => {
                            if let Some(s) = StreamId::from_name(channel) {
                                sub.position(s, 0);
                            }
                        }
                        Frame::Int(_) | Frame::Other => {}
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        if run.n > 0 {
            sub.on_counted(hist, &run, exact, now);
        }
        Ok(used)
    })
    .await
}

/// A Redis connection subscribed to a channel nobody publishes to.
async fn redis_idle(addr: SocketAddr, shared: &Shared, gate: &Semaphore) -> Result<(), String> {
    let permit = gate.acquire().await.map_err(|e| e.to_string())?;
    let mut stream = match redis_connect(addr, &[b"lt-idle"]).await {
        Ok(s) => s,
        Err(e) => {
            shared.connect_failed(format!("idle connection: {e}"));
            return Err(e);
        }
    };
    let mut permit = Some(permit);
    let mut buf = BytesMut::new();
    loop {
        if !fill(&mut stream, &mut buf).await? {
            return Err("closed by the server".to_owned());
        }
        let mut used = 0;
        while let Some((frame, n)) = resp::parse(&buf[used..]).map_err(|e| e.to_string())? {
            used += n;
            if permit.is_some() && matches!(frame, Frame::Subscribed { .. }) {
                drop(permit.take());
                shared.ready.fetch_add(1, Ordering::SeqCst);
            }
        }
        buf.advance(used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(stream: StreamId, token: u64, ts: u64) -> Vec<u8> {
        let mut v = Vec::new();
        payload::write_line(&mut v, stream, token, ts, 120);
        v
    }

    #[test]
    fn accounting_counts_gaps_reorders_and_strangers() {
        let mut s = SubState::new(0);
        let mut h = Histogram::new();
        let feed =
            |s: &mut SubState, h: &mut Histogram, l: &[u8]| s.on_rdata(h, &l[6..l.len() - 1], l.len(), 1_000);
        // Before POSITION: not ours.
        feed(&mut s, &mut h, &line(StreamId::Events, 1, 10));
        assert_eq!((s.received, s.unexpected), (0, 1));
        s.position(StreamId::Events, 0);
        for t in 1..=3 {
            feed(&mut s, &mut h, &line(StreamId::Events, t, 400));
        }
        assert_eq!((s.received, s.gaps, s.reordered), (3, 0, 0));
        feed(&mut s, &mut h, &line(StreamId::Events, 6, 400));
        assert_eq!((s.received, s.gaps), (4, 2));
        feed(&mut s, &mut h, &line(StreamId::Events, 5, 400));
        assert_eq!((s.received, s.reordered), (4, 1));
        feed(&mut s, &mut h, &line(StreamId::Caches, 1, 400));
        assert_eq!(s.unexpected, 2, "unsubscribed stream");
        assert_eq!(s.last[StreamId::Events.index()], 6);
        assert_eq!(s.bytes, 4 * 120);
        assert_eq!((h.len(), h.quantile(0.5)), (4, 600));
    }

    #[test]
    fn counting_checks_tokens_at_read_boundaries() {
        let mut s = SubState::new(0);
        let mut h = Histogram::new();
        let mut buf = b"SERVER x\nPOSITION events 0\n".to_vec();
        for t in 1..=3 {
            buf.extend(line(StreamId::Events, t, 400));
        }
        buf.extend_from_slice(b"PING 5\nRDATA events 4 [\"lt\"");
        let used = scan_counted(&mut s, &mut h, &buf, true, 1_000);
        assert_eq!(&buf[used..], b"RDATA events 4 [\"lt\"", "the partial line is kept");
        assert_eq!((s.received, s.gaps, s.reordered, s.unexpected), (3, 0, 0, 0));
        assert_eq!((s.last[StreamId::Events.index()], h.len()), (3, 1));
        // Four lines counted after token 3 end in token 6 where 7 was due: one came twice.
        let mut buf = Vec::new();
        for t in [4, 5, 5, 6] {
            buf.extend(line(StreamId::Events, t, 400));
        }
        scan_counted(&mut s, &mut h, &buf, true, 1_000);
        assert_eq!((s.received, s.reordered), (7, 1));
        // Two lines that never came: 9 where 6 + 1 was due.
        let buf = line(StreamId::Events, 9, 400);
        scan_counted(&mut s, &mut h, &buf, true, 1_000);
        assert_eq!((s.received, s.gaps), (8, 2));
    }
}
