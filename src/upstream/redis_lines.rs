//! Behind `--upstream-redis`, for TCP workers: the messages on the server's channel as the
//! lines a Synapse 1.13+ master writes to its TCP workers ([`TcpLines`]), and the pacing of
//! the `REPLICATE`s replhub publishes on their behalf ([`ReplicatePacer`]). Sans-IO.
//!
//! A message on `<server name>` is one command line in the TCP form (PROTOCOL.md §8.4), so
//! relaying it to a TCP worker is that payload and a `\n`. Only the commands a master relays
//! between its processes go on: `RDATA`, `POSITION` and `REMOTE_SERVER_UP`. The rest are
//! commands for the writers (`USER_SYNC`, `CLEAR_USER_SYNC`, `FEDERATION_ACK`, `REPLICATE`,
//! `USER_IP`), which a worker answers with `ERROR invalid command` and a close, or words
//! newer Synapses publish that a 1.13–1.66 worker does not know (`KeyError`, a close). A line
//! a worker would fail to parse (a POSITION of the other generation's shape, RDATA whose row
//! is not JSON, a payload with a newline or over the 16384-byte line limit) is dropped and
//! counted, as Synapse's own processes on that Redis log and drop an unparsable message:
//! passed on, it would cost every TCP worker its connection.
use bytes::{BufMut, BytesMut};

use crate::hub::{Batch, LineMeta, BROADCAST};
use crate::proto::generation::{rdata_head, RdataForm};
use crate::proto::number::parse_i64;
use crate::proto::release::{check_released_line, ReleasedParse};
use crate::proto::{CommandWord, Generation, Line, Role, StreamId};

/// Longest line a Synapse worker reads (its `LineOnlyReceiver.MAX_LENGTH`, without the `\n`).
const MAX_LINE: usize = 16384;

/// The TCP lines of one read's messages, built up message by message and taken as one batch.
#[derive(Debug)]
pub(crate) struct TcpLines {
    buf: BytesMut,
    /// Each candidate line's range in `buf`, `\n` included.
    ranges: Vec<(u32, u32)>,
    rules: ReleasedParse,
    /// Messages on the server's channel that a worker would not have parsed: dropped.
    pub(crate) dropped: u64,
}

impl TcpLines {
    /// Lines for workers of `generation` (1.13 or 1.22: the POSITION shape they parse).
    pub(crate) fn new(generation: Generation) -> Self {
        Self {
            buf: BytesMut::new(),
            ranges: Vec::new(),
            rules: ReleasedParse { generation, release: None },
            dropped: 0,
        }
    }

    /// One message payload from the server's channel.
    pub(crate) fn push(&mut self, payload: &[u8]) {
        let word = &payload[..memchr::memchr(b' ', payload).unwrap_or(payload.len())];
        let relayed = matches!(
            CommandWord::parse(word),
            Some(CommandWord::Rdata | CommandWord::Position | CommandWord::RemoteServerUp)
        );
        if !relayed {
            // Commands for the writers (and unknown words) are no worker's business; Synapse's
            // own REPLICATE and USER_SYNC traffic is expected, so these are not counted.
            return;
        }
        if payload.len() > MAX_LINE || memchr::memchr(b'\n', payload).is_some() {
            self.dropped += 1;
            return;
        }
        let (Ok(start), Ok(end)) =
            (u32::try_from(self.buf.len()), u32::try_from(self.buf.len() + payload.len() + 1))
        else {
            self.dropped += 1;
            return;
        };
        self.buf.reserve(payload.len() + 1);
        self.buf.put_slice(payload);
        self.buf.put_u8(b'\n');
        self.ranges.push((start, end));
    }

    /// The lines pushed since the last call, checked as a worker of the generation parses them:
    /// RDATA of a stream replhub knows is indexed with its stream and token (so that workers
    /// take it in order from their REPLICATE on, every one the same bytes); the rest (POSITION,
    /// REMOTE_SERVER_UP, RDATA of a stream newer than replhub, which 1.22+ workers ignore) goes
    /// to every worker ([`BROADCAST`]). `None` if none passed.
    pub(crate) fn take_batch(&mut self) -> Option<Batch> {
        if self.ranges.is_empty() {
            return None;
        }
        let data = self.buf.split().freeze();
        let mut metas = Vec::with_capacity(self.ranges.len());
        for (start, end) in self.ranges.drain(..) {
            let line = Line::new(data.slice(start as usize..end as usize - 1));
            match check_released_line(Role::Client, &line, self.rules) {
                Ok(CommandWord::Rdata) => {
                    let (stream, token) = rdata_meta(line.args());
                    metas.push(LineMeta { start, end, stream, token });
                }
                Ok(_) => metas.push(LineMeta { start, end, stream: BROADCAST, token: None }),
                Err(err) => {
                    self.dropped += 1;
                    tracing::debug!(error = %err, "a message on the redis channel no worker would parse; dropped");
                }
            }
        }
        (!metas.is_empty()).then(|| Batch::new(data, metas))
    }
}

/// The index of an instance-named RDATA line that passed the worker's parse: its stream and
/// token (`None` for `batch`), or [`BROADCAST`] for a stream replhub does not know.
fn rdata_meta(args: &[u8]) -> (u8, Option<i64>) {
    let Some((stream, token, _)) = rdata_head(args, RdataForm::Instance) else {
        return (BROADCAST, None);
    };
    match StreamId::from_name(stream) {
        Some(s) => (s as u8, parse_i64(token).ok()),
        None => (BROADCAST, None),
    }
}

/// How often at most replhub publishes `REPLICATE` for its TCP workers: each one makes every
/// writer publish a POSITION per stream it writes, and every process on the Redis read them.
pub(crate) const REPLICATE_INTERVAL_MS: u64 = 500;

/// Paces the `REPLICATE`s published for TCP workers: a worker's REPLICATE must be followed by
/// one published after it (the answers must come after its subscription starts), and many
/// workers connecting at once share one, at most one per [`REPLICATE_INTERVAL_MS`].
#[derive(Debug, Default)]
pub(crate) struct ReplicatePacer {
    /// When the last one went out (monotonic ms).
    last_ms: Option<u64>,
    /// When the next one is due, if one was asked for since.
    due_ms: Option<u64>,
}

impl ReplicatePacer {
    /// A worker asked at `now_ms`: one is due now, or an interval after the last one.
    pub(crate) fn request(&mut self, now_ms: u64) {
        if self.due_ms.is_none() {
            self.due_ms = Some(self.last_ms.map_or(now_ms, |last| now_ms.max(last + REPLICATE_INTERVAL_MS)));
        }
    }

    /// When one is due, if any.
    pub(crate) fn due_ms(&self) -> Option<u64> {
        self.due_ms
    }

    /// Whether one is due at `now_ms`; if so it counts as sent.
    pub(crate) fn poll(&mut self, now_ms: u64) -> bool {
        if self.due_ms.is_some_and(|due| due <= now_ms) {
            self.sent(now_ms);
            true
        } else {
            false
        }
    }

    /// One went out at `now_ms` (asked for or not, e.g. on a reconnect): it answers every
    /// request so far.
    pub(crate) fn sent(&mut self, now_ms: u64) {
        self.due_ms = None;
        self.last_ms = Some(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(batch: &Batch) -> Vec<(String, u8, Option<i64>)> {
        (0..batch.lines().len())
            .map(|i| {
                let m = batch.lines()[i];
                (String::from_utf8_lossy(batch.line(i)).into_owned(), m.stream, m.token)
            })
            .collect()
    }

    #[test]
    fn only_what_a_master_relays_and_a_worker_parses_becomes_a_line() {
        let mut t = TcpLines::new(Generation::V1_22);
        for payload in [
            "REPLICATE ",
            "POSITION events master 5 7",
            "USER_SYNC abcde @a:hs start 1",
            "RDATA events persister batch [\"$a\"]",
            "RDATA events persister 7 [\"$b\"]",
            "RDATA typing master 3 not-json",
            "POSITION events master 7",
            "RDATA thread_subscriptions master 4 []",
            "REMOTE_SERVER_UP other.example",
            "LOCK_RELEASED x y z",
            "FEDERATION_ACK fs 3",
            "RDATA events master 8 [\"a\nb\"]",
        ] {
            t.push(payload.as_bytes());
        }
        let batch = t.take_batch().expect("lines");
        let ev = StreamId::Events as u8;
        assert_eq!(
            lines(&batch),
            vec![
                ("POSITION events master 5 7\n".to_owned(), BROADCAST, None),
                ("RDATA events persister batch [\"$a\"]\n".to_owned(), ev, None),
                ("RDATA events persister 7 [\"$b\"]\n".to_owned(), ev, Some(7)),
                ("RDATA thread_subscriptions master 4 []\n".to_owned(), BROADCAST, None),
                ("REMOTE_SERVER_UP other.example\n".to_owned(), BROADCAST, None),
            ]
        );
        // Not JSON, a 1.13 POSITION for 1.22 workers, a newline inside.
        assert_eq!(t.dropped, 3);
        assert!(t.take_batch().is_none(), "nothing new");
        let mut t13 = TcpLines::new(Generation::V1_13);
        t13.push(b"POSITION events master 7");
        t13.push(b"POSITION events master 5 7");
        assert_eq!(lines(&t13.take_batch().expect("one")).len(), 1);
    }

    #[test]
    fn many_requests_share_one_replicate_per_interval() {
        let mut p = ReplicatePacer::default();
        assert!(!p.poll(0), "nothing asked");
        p.request(1_000);
        assert!(p.poll(1_000), "the first goes out at once");
        p.request(1_100);
        p.request(1_200);
        assert_eq!(p.due_ms(), Some(1_000 + REPLICATE_INTERVAL_MS), "one, an interval after the last");
        assert!(!p.poll(1_499));
        assert!(p.poll(1_500));
        assert!(!p.poll(1_501), "both answered by it");
        // One sent for another reason answers what was asked before it.
        p.request(3_000);
        p.sent(3_000);
        assert!(!p.poll(10_000));
        p.request(10_000);
        assert!(p.poll(10_000), "long after the last: at once");
    }
}
