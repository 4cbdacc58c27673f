//! A one-shot catch-up from a Synapse 1.10–1.12 master over its own TCP connection (sans-IO).
//!
//! When a 1.10–1.12 worker asks a hub for rows older than its history, the hub's core asks the
//! source thread for them ([`crate::hub::UpstreamCmd::Fetch`]); the source opens a fresh
//! connection to the master and drives a [`Fetch`]: it sends `NAME`, then `REPLICATE <stream>
//! <token>` as a 1.12 worker would, takes the master's catch-up rows (`RDATA <stream> <tok>
//! <json>`, each with its own token) until `POSITION <stream> <token>`, and closes. The rows go
//! back to that core ([`crate::hub::Fetched`]), which splices them in front of its history.
use bytes::Bytes;

use crate::hub::Fetched;
use crate::proto::generation::{parse_any_position, rdata_head, RdataForm};
use crate::proto::number::parse_i64;
use crate::proto::{Command, Generation, ReplicateTarget, StreamId};

/// What a fetch ended with.
pub(crate) type FetchResult = Result<Fetched, String>;

/// The client side of one catch-up connection. Feed it the master's lines; it says when done.
pub(crate) struct Fetch {
    stream: StreamId,
    rows: Vec<(i64, Bytes)>,
    /// Rows of a `batch` run (live rows can arrive once the catch-up is done; not before).
    run: Vec<Bytes>,
}

impl Fetch {
    /// A fetch of `stream`'s rows after `from`.
    pub(crate) fn new(stream: StreamId, from: i64) -> (Self, Vec<Bytes>) {
        let replicate = format!("{} {from}", stream.name());
        let lines =
            [Command::Name("replhub-catch-up"), Command::Replicate(ReplicateTarget::from_name(&replicate))]
                .iter()
                .filter_map(|c| c.to_bytes().ok())
                .collect();
        (Self { stream, rows: Vec::new(), run: Vec::new() }, lines)
    }

    /// One line from the master (without `\n`). `Some` once the fetch is over: the rows and
    /// the master's POSITION, or why not (the master's ERROR text, or a malformed line).
    pub(crate) fn on_line(&mut self, line: &[u8]) -> Option<FetchResult> {
        let (word, args) = match memchr::memchr(b' ', line) {
            Some(sp) => (&line[..sp], &line[sp + 1..]),
            None => (line, &b""[..]),
        };
        match word {
            b"RDATA" => {
                let (stream, token, _) = rdata_head(args, RdataForm::Seed)?;
                if stream != self.stream.name().as_bytes() {
                    return None;
                }
                let mut bytes = Vec::with_capacity(line.len() + 1);
                bytes.extend_from_slice(line);
                bytes.push(b'\n');
                let bytes = Bytes::from(bytes);
                if token == b"batch" {
                    self.run.push(bytes);
                    return None;
                }
                let Ok(token) = parse_i64(token) else {
                    return Some(Err(format!(
                        "malformed RDATA token in {:?}",
                        String::from_utf8_lossy(line)
                    )));
                };
                for b in self.run.drain(..) {
                    self.rows.push((token, b));
                }
                self.rows.push((token, bytes));
                None
            }
            b"POSITION" => match parse_any_position(args, Some(Generation::V1_10)) {
                Ok(p) if p.stream == self.stream.name() => {
                    Some(Ok(Fetched { rows: std::mem::take(&mut self.rows), position: p.token }))
                }
                Ok(_) => None,
                Err(e) => Some(Err(format!("malformed POSITION: {e}"))),
            },
            b"ERROR" => Some(Err(String::from_utf8_lossy(args).into_owned())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_until_the_position() {
        let (mut f, lines) = Fetch::new(StreamId::Events, 5);
        assert_eq!(lines, [Bytes::from("NAME replhub-catch-up\n"), Bytes::from("REPLICATE events 5\n")]);
        assert!(f.on_line(b"SERVER hs").is_none());
        assert!(f.on_line(b"PING 1").is_none());
        assert!(f.on_line(b"RDATA events 6 [1]").is_none());
        assert!(f.on_line(b"RDATA typing 6 [x]").is_none(), "another stream's row is not ours");
        assert!(f.on_line(b"RDATA events 7 [2]").is_none());
        assert!(f.on_line(b"POSITION typing 9").is_none());
        let done = f.on_line(b"POSITION events 8").unwrap().unwrap();
        assert_eq!(done.position, 8);
        assert_eq!(
            done.rows,
            [(6, Bytes::from("RDATA events 6 [1]\n")), (7, Bytes::from("RDATA events 7 [2]\n"))]
        );
    }

    #[test]
    fn errors_end_it() {
        let (mut f, _) = Fetch::new(StreamId::Events, 5);
        let text = "failed to handle replicate: Exception('stream events has fallen behind')";
        assert_eq!(f.on_line(format!("ERROR {text}").as_bytes()), Some(Err(text.to_owned())));
        let (mut f, _) = Fetch::new(StreamId::Events, 5);
        assert!(f.on_line(b"POSITION events master 8").unwrap().is_err());
    }
}
