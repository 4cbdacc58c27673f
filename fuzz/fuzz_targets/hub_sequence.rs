//! The whole hub under an arbitrary sequence of events: worker input (real command words, real
//! stream names and user ids mixed with junk, in arbitrary chunks), upstream batches (with
//! `batch` runs), broadcasts, upstream drops and reconnects (with streams served or not),
//! accepts and disconnects, stalled, partial and unlimited writers, and clock steps.
//!
//! Checked after every step: no panic; the log holds at most the eviction bound plus one batch;
//! every line written to a worker is a line a worker parses (a known word, at most 16384 bytes,
//! valid fields) and nothing follows an ERROR; every line forwarded upstream is one the master
//! accepts; the master never sees a USER_SYNC `start` twice or an `end` without a `start`.
//!
//! Checked at the end, for each worker that sent `REPLICATE ALL`, never sent any other
//! REPLICATE, was never closed and is drained (invariants 1–3 of the design): per stream, the
//! POSITION and RDATA lines it received are exactly those of a small model of the hub's
//! subscription rules (a subscription starts at the next batch boundary of its stream; a
//! reconnect gives a fresh POSITION per subscribed stream), so no RDATA is lost, reordered or
//! duplicated, and every POSITION carries the right token.
#![no_main]

use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use replhub::config::HubConfig;
use replhub::proto::{generation, parse_line, Line, Role, StreamId, SyncState, Token, MAX_LINE_LEN};
use replhub::session::SessionConfig;
use replhub::testing::hub::sim::{Capacity, Sim};
use replhub::testing::hub::{ConnId, UpstreamCmd, UpstreamEvent};

/// Hub settings the input picks: small bounds so that evictions and partial gathers happen.
#[derive(Arbitrary, Debug)]
struct Setup {
    max_pending_kib: u8,
    max_iov: u8,
    max_write: u16,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Accept,
    /// `REPLICATE ALL` on a line of its own.
    ReplicateAll(u8),
    /// Text built from real words, sent in two chunks split at `split`.
    Input {
        who: u8,
        toks: Vec<Tok>,
        split: u16,
    },
    /// Arbitrary bytes.
    Raw {
        who: u8,
        data: Vec<u8>,
    },
    /// One upstream batch: `(stream, is a batch-run line)` per row.
    Batch(Vec<(u8, bool)>),
    /// A REMOTE_SERVER_UP from the upstream (goes to every greeted worker).
    Broadcast,
    Disconnect(u8),
    Capacity {
        who: u8,
        cap: Cap,
    },
    Advance(u16),
    UpstreamDown,
    /// The upstream (re)connects; bit `i` of `unserved` leaves stream `i` unserved, `jump`
    /// moves the tokens forward (the master went on while we were away).
    UpstreamUp {
        unserved: u32,
        jump: u8,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Cap {
    Unlimited,
    Stalled,
    PerWrite(u8),
    ThenStall(u8),
}

/// One piece of worker input. Content pieces are joined with a space.
#[derive(Arbitrary, Debug)]
enum Tok {
    Word(u8),
    Stream(u8),
    All,
    BatchWord,
    Num(i64),
    Small(u8),
    User(u8),
    State(bool),
    Json(u8),
    Junk(Vec<u8>),
    Long(u16),
    Space,
    Newline,
    CrLf,
}

const WORDS: &[&str] = &[
    "NAME",
    "REPLICATE",
    "USER_SYNC",
    "FEDERATION_ACK",
    "REMOVE_PUSHER",
    "INVALIDATE_CACHE",
    "USER_IP",
    "PING",
    "ERROR",
    "REMOTE_SERVER_UP",
    "CLEAR_USER_SYNC",
    "SERVER",
    "RDATA",
    "POSITION",
    "SYNC",
    "replicate",
    "PING\t",
];

const JSON: &[&str] = &[
    "[]",
    "{}",
    "null",
    "[\"k\"]",
    "[\"tok\",\"1.2.3.4\",\"ua\",null,123]",
    "[\"tok\",\"1.2.3.4\",\"ua\",\"dev\"]",
    "{\"a\":[1,2,{\"b\":\"\\u00e9\"}]}",
    "[1,",
    "\"\\ud800\"",
    "12e400",
    "\"abcde\"",
];

impl Tok {
    fn is_content(&self) -> bool {
        !matches!(self, Tok::Junk(_) | Tok::Space | Tok::Newline | Tok::CrLf)
    }

    fn render(&self, out: &mut Vec<u8>) {
        match self {
            Tok::Word(i) => out.extend_from_slice(WORDS[usize::from(*i) % WORDS.len()].as_bytes()),
            Tok::Stream(i) => {
                let names = StreamId::ALL.len();
                let i = usize::from(*i) % (names + 2);
                let name = match i {
                    _ if i < names => StreamId::ALL[i].name(),
                    _ if i == names => "nosuchstream",
                    _ => "EVENTS",
                };
                out.extend_from_slice(name.as_bytes());
            }
            Tok::All => out.extend_from_slice(b"ALL"),
            Tok::BatchWord => out.extend_from_slice(b"batch"),
            Tok::Num(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Tok::Small(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Tok::User(u) => out.extend_from_slice(format!("@u{}:hs", u % 4).as_bytes()),
            Tok::State(start) => out.extend_from_slice(if *start { b"start" } else { b"end" }),
            Tok::Json(i) => out.extend_from_slice(JSON[usize::from(*i) % JSON.len()].as_bytes()),
            Tok::Junk(b) => out.extend_from_slice(&b[..b.len().min(16)]),
            Tok::Long(n) => out.resize(out.len() + usize::from(*n % 20_000), b'x'),
            Tok::Space => out.push(b' '),
            Tok::Newline => out.push(b'\n'),
            Tok::CrLf => out.extend_from_slice(b"\r\n"),
        }
    }
}

fn render(toks: &[Tok]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev_content = false;
    for t in toks {
        if prev_content && t.is_content() {
            out.push(b' ');
        }
        t.render(&mut out);
        prev_content = t.is_content();
    }
    out
}

/// What the model knows of one worker that subscribed with `REPLICATE ALL`.
#[derive(Default)]
struct Tracked {
    /// Subscribed streams.
    sub: [bool; StreamId::COUNT],
    /// Streams waiting for a batch boundary or the upstream.
    pending: [bool; StreamId::COUNT],
    /// POSITION and RDATA lines expected, per stream, in order.
    expected: [Vec<String>; StreamId::COUNT],
    /// Lines received so far, per stream (POSITION and RDATA only).
    got: [Vec<String>; StreamId::COUNT],
}

/// Per worker: the line checks that apply to every worker, and the model for tracked ones.
#[derive(Default)]
struct Worker {
    /// An ERROR line was received.
    errored: bool,
    /// Sent only REPLICATE ALL (through `Op::ReplicateAll`) and no other REPLICATE.
    tracked: Option<Tracked>,
    /// Input that mentioned REPLICATE otherwise: the model cannot follow it.
    untrackable: bool,
}

/// The upstream's side of the model, mirroring what the hub learns from it.
struct Upstream {
    up: bool,
    /// Served streams, once the upstream has connected.
    served: Option<[bool; StreamId::COUNT]>,
    tokens: [Option<i64>; StreamId::COUNT],
    open_run: [bool; StreamId::COUNT],
    /// The master's next token per stream.
    next: [i64; StreamId::COUNT],
}

struct Fuzz {
    sim: Sim,
    max_pending: u64,
    largest_batch: u64,
    live: Vec<ConnId>,
    workers: BTreeMap<ConnId, Worker>,
    upstream: Upstream,
    syncing: HashSet<String>,
    accepted: usize,
    connects: usize,
}

impl Fuzz {
    fn pick(&self, who: u8) -> Option<ConnId> {
        if self.live.is_empty() {
            None
        } else {
            Some(self.live[usize::from(who) % self.live.len()])
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Accept => {
                // A bound keeps each run fast; disconnects free room.
                if self.live.len() < 6 && self.accepted < 24 {
                    self.accepted += 1;
                    let w = self.sim.accept();
                    self.live.push(w);
                    self.workers.insert(w, Worker::default());
                }
            }
            Op::ReplicateAll(who) => {
                let Some(w) = self.pick(*who) else { return };
                // The leading newline ends any partial line first, so this is a line of its own.
                self.sim.send(w, "\nREPLICATE ALL");
                self.subscribe_all(w);
            }
            Op::Input { who, toks, split } => {
                let Some(w) = self.pick(*who) else { return };
                let data = render(toks);
                self.note_input(w, &data);
                let at = usize::from(*split) % (data.len() + 1);
                self.sim.send_raw(w, &data[..at]);
                self.sim.send_raw(w, &data[at..]);
            }
            Op::Raw { who, data } => {
                let Some(w) = self.pick(*who) else { return };
                self.note_input(w, data);
                self.sim.send_raw(w, data);
            }
            Op::Batch(rows) => self.batch(rows),
            Op::Broadcast => {
                if self.upstream.up {
                    self.largest_batch = self.largest_batch.max(64);
                    self.sim.broadcast("REMOTE_SERVER_UP other.example");
                }
            }
            Op::Disconnect(who) => {
                let Some(w) = self.pick(*who) else { return };
                // What it received before leaving is still checked.
                self.check_received(w);
                self.live.retain(|x| *x != w);
                self.workers.remove(&w);
                self.sim.disconnect(w);
            }
            Op::Capacity { who, cap } => {
                let Some(w) = self.pick(*who) else { return };
                let cap = match *cap {
                    Cap::Unlimited => Capacity::Unlimited,
                    Cap::Stalled => Capacity::Stalled,
                    Cap::PerWrite(n) => Capacity::PerWrite(1 + usize::from(n)),
                    Cap::ThenStall(n) => Capacity::ThenStall(usize::from(n)),
                };
                self.sim.set_capacity(w, cap);
            }
            Op::Advance(ms) => self.sim.advance(u64::from(*ms)),
            Op::UpstreamDown => {
                if self.upstream.up {
                    self.upstream.up = false;
                    self.sim.hub.on_upstream(&UpstreamEvent::Disconnected, self.sim.now);
                    self.sim.flush();
                }
            }
            Op::UpstreamUp { unserved, jump } => {
                if self.upstream.up {
                    self.upstream.up = false;
                    self.sim.hub.on_upstream(&UpstreamEvent::Disconnected, self.sim.now);
                    self.sim.flush();
                }
                self.connect(*unserved, *jump);
            }
        }
    }

    /// Input other than `Op::ReplicateAll` that could subscribe takes the worker out of the
    /// model. Input that leaves a partial line behind does too, since the splitter could join
    /// it with the next input into a REPLICATE; otherwise every line lies within `data`.
    fn note_input(&mut self, w: ConnId, data: &[u8]) {
        let Some(worker) = self.workers.get_mut(&w) else { return };
        let lower = data.to_ascii_lowercase();
        if lower.windows(9).any(|x| x == b"replicate") || !data.ends_with(b"\n") {
            worker.untrackable = true;
            worker.tracked = None;
        }
    }

    fn subscribe_all(&mut self, w: ConnId) {
        let Some(worker) = self.workers.get_mut(&w) else { return };
        if worker.untrackable {
            return;
        }
        let t = worker.tracked.get_or_insert_with(Tracked::default);
        let up = &self.upstream;
        for s in StreamId::ALL {
            let i = s.index();
            if up.served.is_some_and(|served| !served[i]) {
                continue;
            }
            let ready = up.served.is_some() && !up.open_run[i];
            match (ready, up.tokens[i]) {
                (true, Some(token)) => {
                    t.sub[i] = true;
                    t.expected[i].push(format!("POSITION {} {token}", s.name()));
                }
                _ => t.pending[i] = true,
            }
        }
    }

    fn connect(&mut self, unserved: u32, jump: u8) {
        let mut positions = [None; StreamId::COUNT];
        let mut served = [false; StreamId::COUNT];
        for s in StreamId::ALL {
            let i = s.index();
            self.upstream.next[i] += i64::from(jump);
            if unserved & s.bit() == 0 {
                served[i] = true;
                positions[i] = Some(self.upstream.next[i]);
            }
        }
        self.connects += 1;
        self.upstream.up = true;
        self.upstream.served = Some(served);
        self.upstream.tokens = positions;
        self.upstream.open_run = [false; StreamId::COUNT];
        for worker in self.workers.values_mut() {
            let Some(t) = worker.tracked.as_mut() else { continue };
            for s in StreamId::ALL {
                let i = s.index();
                if let (true, Some(token)) = (t.sub[i], positions[i]) {
                    t.expected[i].push(format!("POSITION {} {token}", s.name()));
                }
            }
            for s in StreamId::ALL {
                let i = s.index();
                if !std::mem::take(&mut t.pending[i]) {
                    continue;
                }
                match positions[i] {
                    Some(token) => {
                        t.sub[i] = true;
                        t.expected[i].push(format!("POSITION {} {token}", s.name()));
                    }
                    // `REPLICATE ALL` asks for what is served: a stream that is not is skipped.
                    None => {}
                }
            }
        }
        self.sim.connect_upstream("example.com", positions);
    }

    fn batch(&mut self, rows: &[(u8, bool)]) {
        if !self.upstream.up {
            return;
        }
        let served = self.upstream.served.unwrap_or([true; StreamId::COUNT]);
        let rows: Vec<(StreamId, Token)> = rows
            .iter()
            .take(32)
            // Four streams at most, so that runs and subscriptions interleave.
            .map(|(s, run)| (StreamId::ALL[usize::from(*s) % 4], *run))
            .filter(|(s, _)| served[s.index()])
            .map(|(s, run)| {
                if run {
                    (s, Token::Batch)
                } else {
                    self.upstream.next[s.index()] += 1;
                    (s, Token::Value(self.upstream.next[s.index()]))
                }
            })
            .collect();
        let lines = self.sim.batch(&rows);
        let bytes: usize = lines.iter().map(Bytes::len).sum();
        self.largest_batch = self.largest_batch.max(bytes as u64);
        for (line, (s, token)) in lines.iter().zip(&rows) {
            let i = s.index();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            for worker in self.workers.values_mut() {
                let Some(t) = worker.tracked.as_mut() else { continue };
                if t.sub[i] {
                    t.expected[i].push(text.clone());
                }
            }
            match token {
                Token::Batch => self.upstream.open_run[i] = true,
                Token::Value(v) => {
                    self.upstream.open_run[i] = false;
                    self.upstream.tokens[i] = Some(*v);
                    for worker in self.workers.values_mut() {
                        let Some(t) = worker.tracked.as_mut() else { continue };
                        if std::mem::take(&mut t.pending[i]) {
                            t.sub[i] = true;
                            t.expected[i].push(format!("POSITION {} {v}", s.name()));
                        }
                    }
                }
            }
        }
    }

    /// Takes the complete lines a worker received since the last call and checks each.
    fn check_received(&mut self, w: ConnId) {
        let Some(conn) = self.sim.conns.get_mut(&w) else { return };
        let complete = conn.received.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let data: Vec<u8> = conn.received.drain(..complete).collect();
        let Some(worker) = self.workers.get_mut(&w) else { return };
        for raw in data.split(|&b| b == b'\n') {
            if raw.is_empty() {
                continue;
            }
            assert!(!worker.errored, "{w}: a line after ERROR: {:?}", String::from_utf8_lossy(raw));
            assert!(raw.len() <= MAX_LINE_LEN, "{w}: a line of {} bytes", raw.len());
            let line = Line::new(Bytes::copy_from_slice(raw));
            if let Err(e) = parse_line(Role::Client, &line) {
                panic!("{w}: a worker cannot parse {:?}: {e}", String::from_utf8_lossy(raw));
            }
            let text = std::str::from_utf8(raw).expect("parsed lines are UTF-8");
            let mut parts = text.splitn(3, ' ');
            let word = parts.next().unwrap_or("");
            if word == "ERROR" {
                worker.errored = true;
            }
            if let (Some(t), "POSITION" | "RDATA") = (worker.tracked.as_mut(), word) {
                let stream = parts.next().and_then(|n| StreamId::from_name(n.as_bytes()));
                let s = stream.expect("a known stream");
                t.got[s.index()].push(text.to_owned());
            }
        }
    }

    fn check_step(&mut self) {
        for w in self.live.clone() {
            self.check_received(w);
        }
        // Invariant 4: the log holds at most the hard eviction bound (twice the limit) plus the
        // batch being appended.
        let held = self.sim.hub.log().held_bytes();
        assert!(
            held <= 2 * self.max_pending + self.largest_batch,
            "log holds {held} bytes; bound 2 × {} + batch {}",
            self.max_pending,
            self.largest_batch
        );
        for cmd in self.sim.take_upstream() {
            match cmd {
                UpstreamCmd::Forward(bytes) => {
                    assert_eq!(bytes.last(), Some(&b'\n'));
                    let line = Line::new(bytes.slice(..bytes.len() - 1));
                    if let Err(e) = parse_line(Role::Server, &line) {
                        // Before the first upstream handshake the hub knows no generation and
                        // takes a worker that sent a bare REPLICATE (1.13+ only) at its word:
                        // its released-form lines go on as they are, for its own master, which
                        // runs its release (`hub::released`, "the worker's own command is the
                        // best hint"). Every other line must parse as this harness's seed
                        // master parses it.
                        assert!(
                            self.connects == 0 && released_form(&line),
                            "the master would reject {bytes:?}: {e}"
                        );
                    }
                }
                // Catch-up fetches need `fetch_catch_up`, which this harness leaves off.
                UpstreamCmd::Fetch { .. } => panic!("a fetch without fetching enabled"),
                // Invariant 6: the master's view of who syncs stays consistent.
                UpstreamCmd::UserSync { user_id, state, .. } => match state {
                    SyncState::Start => assert!(self.syncing.insert(user_id), "double start"),
                    SyncState::End => assert!(self.syncing.remove(&user_id), "end without start"),
                },
                // Only Redis-mode clients publish, and this target drives none.
                UpstreamCmd::Publish(_) | UpstreamCmd::RedisPublish(_) => {
                    panic!("a replication worker published")
                }
                // Only a hub behind `--upstream-redis` asks the writers for their positions,
                // and this target drives a hub behind a master.
                UpstreamCmd::RedisReplicate => panic!("a REPLICATE for Redis behind a master"),
            }
        }
    }

    /// Drains every worker, then compares what each tracked one received with the model.
    fn finish(&mut self) {
        for w in self.live.clone() {
            self.sim.set_capacity(w, Capacity::Unlimited);
        }
        self.check_step();
        let (mut checked, mut lines) = (0, 0);
        for (w, worker) in &self.workers {
            let Some(t) = &worker.tracked else { continue };
            if worker.errored || self.sim.closed(*w).is_some() {
                continue;
            }
            for s in StreamId::ALL {
                let i = s.index();
                assert_eq!(
                    without_repeats(&t.got[i]),
                    without_repeats(&t.expected[i]),
                    "{w}: stream {}: received vs expected",
                    s.name()
                );
                lines += t.got[i].len();
            }
            checked += 1;
        }
        // How deep an input got, for judging a corpus: run the target binary on its files.
        static STATS: OnceLock<bool> = OnceLock::new();
        if *STATS.get_or_init(|| std::env::var_os("HUB_SEQUENCE_STATS").is_some()) {
            let errored = self.workers.values().filter(|w| w.errored).count();
            eprintln!(
                "workers checked against the model: {checked}, their POSITION/RDATA lines: {lines}, \
                 workers that got an ERROR: {errored}, upstream connects: {}",
                self.connects
            );
        }
    }
}

/// Whether `line` is a 1.13+ form of a command the seed parses differently: `USER_SYNC` with
/// an instance id, `FEDERATION_ACK` with an instance name, `CLEAR_USER_SYNC`.
fn released_form(line: &Line) -> bool {
    let args = line.args();
    match line.word() {
        b"USER_SYNC" => generation::parse_instance_user_sync(args).is_ok(),
        b"FEDERATION_ACK" => args.contains(&b' ') && generation::parse_any_federation_ack(args).is_ok(),
        b"CLEAR_USER_SYNC" => std::str::from_utf8(args).is_ok(),
        _ => false,
    }
}

/// A stream's lines with each run of identical POSITION lines back to back taken as one. The
/// hub sends one where the model may expect two: a second identical POSITION (a repeated
/// REPLICATE, or an upstream reconnect at the same token) while the first still waits unsent
/// at the same place in the log is coalesced (`Outbox::push_private_coalesced`), and for the
/// worker the second would be a no-op. Whether the first was still queued depends on the
/// worker's reads, which the model does not follow; a repeated RDATA is never merged.
fn without_repeats(lines: &[String]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::with_capacity(lines.len());
    for line in lines {
        if line.starts_with("POSITION ") && out.last() == Some(&line.as_str()) {
            continue;
        }
        out.push(line);
    }
    out
}

fuzz_target!(|input: (Setup, Vec<Op>)| {
    let (setup, ops) = input;
    let max_pending = 1024 * (1 + u64::from(setup.max_pending_kib % 64));
    let config = HubConfig {
        max_pending_bytes: max_pending,
        write_timeout_ms: 2_000,
        session: SessionConfig {
            ping_interval_ms: 5_000,
            ping_timeout_ms: 25_000,
            close_timeout_ms: 10_000,
            max_line_len: MAX_LINE_LEN,
        },
        max_iov: if setup.max_iov >= 128 { 256 } else { 1 + usize::from(setup.max_iov % 8) },
        max_write_bytes: if setup.max_write >= 32_768 { 1 << 20 } else { 64 + usize::from(setup.max_write) },
        server_name: None,
        protocol: replhub::proto::ProtocolChoice::Auto,
        release: None,
        ..HubConfig::default()
    };
    let mut fuzz = Fuzz {
        sim: Sim::new(config),
        max_pending,
        largest_batch: 0,
        live: Vec::new(),
        workers: BTreeMap::new(),
        upstream: Upstream {
            up: false,
            served: None,
            tokens: [None; StreamId::COUNT],
            open_run: [false; StreamId::COUNT],
            next: std::array::from_fn(|i| 100 + i as i64),
        },
        syncing: HashSet::new(),
        accepted: 0,
        connects: 0,
    };
    for op in ops.iter().take(256) {
        fuzz.step(op);
        fuzz.check_step();
    }
    fuzz.finish();
});
