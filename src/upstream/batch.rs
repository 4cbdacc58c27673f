//! Turning one upstream read into a relayable [`Batch`] (ARCHITECTURE.md §3 item 1).
//!
//! The input is a chunk of complete lines, each ending in `\n`, exactly as
//! [`LineSplitter::next_chunk`](crate::proto::LineSplitter::next_chunk) returns it. Nothing is
//! copied: the batch shares the chunk's bytes and indexes the lines to relay. Per line only the
//! command word, and for RDATA the stream name and the token, are looked at (memchr, no JSON).
//!
//! * `RDATA <known stream> [<instance>] <token|batch> <row>` (the instance field from Synapse
//!   1.13 on, PROTOCOL.md §8.1; see [`RdataForm`]) → relayed, [`LineMeta`] with the stream index
//!   and the token (`None` for `batch`).
//! * `REMOTE_SERVER_UP <server>` → relayed to every worker ([`BROADCAST`]).
//! * RDATA of a stream replhub does not know, or with a bad token or too few fields → neither
//!   relayed nor handed on: counted and logged (a Synapse worker would also drop such a row).
//! * Empty lines → skipped.
//! * Everything else (SERVER, PING, POSITION, ERROR, SYNC, and anything unexpected) → a
//!   [`ControlLine`] for the link, which runs the direction check and the handshake.
use bytes::Bytes;

use crate::hub::{Batch, LineMeta, BROADCAST};
use crate::proto::generation::{rdata_head, RdataForm};
use crate::proto::number::parse_i64;
use crate::proto::{Line, StreamId};

/// A line the link handles itself, and where it sat among the relayed lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlLine {
    /// The line without its `\n` (a zero-copy slice of the chunk).
    pub line: Line,
    /// How many relayable lines came before it in the chunk.
    pub after: usize,
}

/// One indexed chunk.
#[derive(Debug, Default)]
pub struct Indexed {
    /// The chunk, shared with the batch built from it.
    pub data: Bytes,
    /// The relayable lines, in order.
    pub lines: Vec<LineMeta>,
    /// The other lines, in order.
    pub control: Vec<ControlLine>,
    /// RDATA lines per known stream (map order), relayed or malformed: Synapse's
    /// `inbound_rdata_count`, counted before the row is looked at.
    pub rdata: [u64; StreamId::COUNT],
    /// RDATA lines of a stream replhub does not know (dropped).
    pub unknown_stream: u64,
    /// RDATA lines with a bad token or missing fields (dropped).
    pub malformed: u64,
    /// Whether the first RDATA of a known stream had an instance field (Synapse 1.13+);
    /// `None` without such a line.
    pub instance_rdata: Option<bool>,
}

impl Indexed {
    /// Keeps only the first `n` relayable lines (the link cuts a chunk at a line it refused:
    /// after sending ERROR nothing more is read, PROTOCOL.md §1.4).
    pub fn truncate(&mut self, n: usize) {
        self.lines.truncate(n);
    }

    /// Whether the chunk held any line at all (relayed, control or dropped).
    pub fn has_lines(&self) -> bool {
        !self.lines.is_empty() || !self.control.is_empty() || self.unknown_stream != 0 || self.malformed != 0
    }

    /// Whether any of the relayable lines in `range` is an RDATA line.
    pub fn has_rdata_in(&self, range: std::ops::Range<usize>) -> bool {
        self.lines.get(range).is_some_and(|ls| ls.iter().any(|m| m.stream != BROADCAST))
    }

    /// The batch of relayable lines (sharing the chunk's bytes).
    pub fn into_batch(self) -> Batch {
        Batch::new(self.data, self.lines)
    }
}

/// Indexes a chunk of complete seed-form lines (see the module docs). A trailing unterminated
/// fragment, which `next_chunk` never returns, is ignored.
pub fn index_chunk(chunk: &Bytes) -> Indexed {
    index_chunk_as(chunk, RdataForm::Seed)
}

/// [`index_chunk`] with RDATA read in `form` (the upstream's generation, once known). The
/// result also says whether an RDATA line carried an instance field ([`Indexed::instance_rdata`]),
/// so that the link can learn the generation from RDATA too.
pub(crate) fn index_chunk_as(chunk: &Bytes, form: RdataForm) -> Indexed {
    debug_assert!(u32::try_from(chunk.len()).is_ok(), "chunk over 4 GiB");
    let data: &[u8] = chunk;
    let mut out = Indexed { data: chunk.clone(), ..Indexed::default() };
    let mut start = 0usize;
    for nl in memchr::memchr_iter(b'\n', data) {
        let line = &data[start..nl];
        let meta_start = start;
        start = nl + 1;
        if line.is_empty() {
            continue;
        }
        // The command word by prefix, not by searching for its space: at max rate to one
        // subscriber, `memchr` over the few bytes of each field was among the source thread's
        // largest costs (its vector set-up is paid per call).
        if let Some(args) = line.strip_prefix(b"RDATA ") {
            let Some((stream, token, instance)) = rdata_head(args, form) else {
                out.malformed += 1;
                log_dropped("malformed RDATA (too few fields)", line);
                continue;
            };
            let Some(id) = StreamId::from_name(stream) else {
                out.unknown_stream += 1;
                log_dropped("RDATA for a stream replhub does not know", line);
                continue;
            };
            out.rdata[id.index()] += 1;
            out.instance_rdata.get_or_insert(instance);
            let token = if token == b"batch" {
                None
            } else if let Ok(t) = parse_i64(token) {
                Some(t)
            } else {
                out.malformed += 1;
                log_dropped("malformed RDATA (bad token)", line);
                continue;
            };
            out.lines.push(LineMeta { start: meta_start as u32, end: start as u32, stream: id as u8, token });
        } else if line
            .strip_prefix(b"REMOTE_SERVER_UP ")
            .is_some_and(|name| std::str::from_utf8(name).is_ok())
        {
            out.lines.push(LineMeta {
                start: meta_start as u32,
                end: start as u32,
                stream: BROADCAST,
                token: None,
            });
        } else {
            out.control
                .push(ControlLine { line: Line::new(chunk.slice(meta_start..nl)), after: out.lines.len() });
        }
    }
    out
}

#[cold]
fn log_dropped(what: &str, line: &[u8]) {
    let shown = &line[..line.len().min(200)];
    tracing::warn!(line = %String::from_utf8_lossy(shown), "{what} from upstream: not relayed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bytes {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors/stream-sample.txt");
        Bytes::from(std::fs::read(path).expect("shared/vectors/stream-sample.txt beside the repo"))
    }

    #[test]
    fn indexes_every_rdata_of_the_sample_byte_identical() {
        let chunk = sample();
        let idx = index_chunk(&chunk);
        let want: Vec<&[u8]> =
            chunk.split_inclusive(|&b| b == b'\n').filter(|l| l.starts_with(b"RDATA ")).collect();
        assert_eq!(want.len(), 3460);
        assert_eq!(idx.lines.len(), want.len());
        assert_eq!(idx.control.len(), 18, "SERVER, PING, 16 POSITION");
        assert_eq!(idx.control[0].line.as_bytes(), b"SERVER example.com");
        assert!(idx.control.iter().all(|c| c.after == 0));
        assert_eq!((idx.malformed, idx.unknown_stream), (0, 0));
        assert_eq!(idx.rdata.iter().sum::<u64>(), 3460);
        assert_eq!(idx.rdata[StreamId::Events.index()], 2000);
        let batches = idx.lines.iter().filter(|m| m.token.is_none()).count();
        assert_eq!(batches, 667);
        let batch = idx.into_batch();
        for (i, w) in want.iter().enumerate() {
            assert_eq!(batch.line(i), *w);
        }
        let first = batch.lines()[0];
        assert_eq!((first.stream_id(), first.token), (Some(StreamId::Events), None));
        assert_eq!(batch.lines()[1].token, Some(101));
        // All RDATA lines follow the handshake, so they form one contiguous run.
        assert_eq!(batch.run_end(0), batch.lines().len());
    }

    #[test]
    fn sorts_lines_into_relayed_control_and_dropped() {
        let chunk = Bytes::from_static(
            b"PING 1\n\nRDATA caches 5 [\"f\", null, 1]\nREMOTE_SERVER_UP other.org\nPOSITION events 3\n\
              RDATA nosuch 1 []\nRDATA events 5x []\nRDATA events 7\nRDATA typing batch [1]\r\n\
              REMOTE_SERVER_UP\nNAME x\nRDATA typing -3 []\n",
        );
        let idx = index_chunk(&chunk);
        let metas: Vec<(u8, Option<i64>)> = idx.lines.iter().map(|m| (m.stream, m.token)).collect();
        assert_eq!(
            metas,
            vec![
                (StreamId::Caches as u8, Some(5)),
                (BROADCAST, None),
                (StreamId::Typing as u8, None),
                (StreamId::Typing as u8, Some(-3)),
            ]
        );
        let control: Vec<(&[u8], usize)> = idx.control.iter().map(|c| (c.line.as_bytes(), c.after)).collect();
        assert_eq!(
            control,
            vec![(&b"PING 1"[..], 0), (b"POSITION events 3", 2), (b"REMOTE_SERVER_UP", 3), (b"NAME x", 3),]
        );
        assert_eq!((idx.unknown_stream, idx.malformed), (1, 2));
        assert_eq!(idx.rdata[StreamId::Events.index()], 1, "bad token counted as received");
        assert!(idx.has_rdata_in(0..1) && !idx.has_rdata_in(1..2) && !idx.has_rdata_in(9..10));
        let batch = idx.into_batch();
        assert_eq!(batch.line(1), b"REMOTE_SERVER_UP other.org\n");
        assert_eq!(batch.line(2), b"RDATA typing batch [1]\r\n", "the CR stays part of the row");
    }

    #[test]
    fn indexes_every_released_generation_in_place() {
        for release in ["1.13.0", "1.22.1", "1.66.0"] {
            let path = format!(
                "{}/../shared/vectors/generations/stream-sample-{release}.txt",
                env!("CARGO_MANIFEST_DIR")
            );
            let chunk = Bytes::from(std::fs::read(&path).expect("generation samples beside the repo"));
            let want: Vec<&[u8]> =
                chunk.split_inclusive(|&b| b == b'\n').filter(|l| l.starts_with(b"RDATA ")).collect();
            for form in [RdataForm::Sniff, RdataForm::Instance] {
                let idx = index_chunk_as(&chunk, form);
                let known = want.len() - usize::try_from(idx.unknown_stream).unwrap();
                assert_eq!((idx.lines.len(), idx.malformed), (known, 0), "{release} {form:?}");
                assert_eq!(idx.instance_rdata, Some(true), "{release}");
                assert_eq!(idx.lines[0].token, None, "{release}: the first ev row is a batch");
                assert_eq!(idx.lines[1].token, Some(101), "{release}");
                let batch = idx.into_batch();
                // Zero copy, bytes untouched: every relayed line is the master's line.
                let mut wanted = want
                    .iter()
                    .filter(|l| StreamId::from_name(l.split(|&b| b == b' ').nth(1).unwrap()).is_some());
                for i in 0..batch.lines().len() {
                    assert_eq!(batch.line(i), *wanted.next().unwrap(), "{release} line {i}");
                }
            }
            // Read as seed lines, the instance name is a bad token: dropped, never misrelayed.
            let idx = index_chunk_as(&chunk, RdataForm::Seed);
            assert!(idx.lines.is_empty() && idx.malformed > 0, "{release}");
        }
    }

    #[test]
    fn empty_chunk_and_blank_lines() {
        let idx = index_chunk(&Bytes::from_static(b"\n\n"));
        assert!(!idx.has_lines());
        let idx = index_chunk(&Bytes::new());
        assert!(!idx.has_lines());
    }
}
