//! Encoding commands, byte-identical to Synapse (`NAME + " " + args + "\n"`).
//!
//! Synapse refuses to write a line containing `\n` or longer than 16384 bytes (without the
//! `\n`); so do we, appending nothing (PROTOCOL.md §1.3). The newline check comes first, as in
//! Synapse's `send_command`. Integers are written in decimal (Python's `str(int)`), the RDATA
//! token `batch` in lowercase, and empty arguments still get their space (`PING `).
use bytes::{BufMut, Bytes, BytesMut};

use super::command::Command;
use super::error::EncodeError;
use super::fields::{FederationAck, InvalidateCache, Position, Rdata, RemovePusher, Token, UserIp, UserSync};
use super::number::format_i64;
use super::splitter::MAX_LINE_LEN;

impl Command<'_> {
    /// Appends the line and its `\n` to `out`; on error nothing is appended.
    #[inline]
    pub fn encode_into(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let word = self.word().as_str();
        let mut num = [0u8; 20];
        match *self {
            Self::Rdata(Rdata { stream, token, row }) => {
                let token: &[u8] = match token {
                    Token::Batch => b"batch",
                    Token::Value(v) => format_i64(v, &mut num),
                };
                let stream = stream.as_bytes();
                put(word, &[stream, row], &[stream, b" ", token, b" ", row], out)
            }
            Self::Position(Position { stream, instance, prev, token }) => {
                let stream = stream.as_bytes();
                let mut prev_num = [0u8; 20];
                let token = format_i64(token, &mut num);
                // The seed's `<s> <tok>`, 1.13's `<s> <instance> <tok>`, 1.22's `<s> <instance> <prev> <new>`.
                let instance = instance.map(str::as_bytes);
                let prev = prev.map(|p| format_i64(p, &mut prev_num));
                let mut parts: [&[u8]; 7] = [stream, b"", b"", b"", b"", b" ", token];
                if let Some(i) = instance {
                    parts[1] = b" ";
                    parts[2] = i;
                }
                if let Some(p) = prev {
                    parts[3] = b" ";
                    parts[4] = p;
                }
                put(word, &[stream, instance.unwrap_or_default()], &parts, out)
            }
            Self::UserSync(UserSync { user_id, state, last_sync_ms }) => {
                let (u, st) = (user_id.as_bytes(), state.as_str().as_bytes());
                let ms = format_i64(last_sync_ms, &mut num);
                put(word, &[u], &[u, b" ", st, b" ", ms], out)
            }
            Self::FederationAck(FederationAck { token }) => {
                put(word, &[], &[format_i64(token, &mut num)], out)
            }
            Self::RemovePusher(RemovePusher { app_id, push_key, user_id }) => {
                let (a, k, u) = (app_id.as_bytes(), push_key.as_bytes(), user_id.as_bytes());
                put(word, &[a, k, u], &[a, b" ", k, b" ", u], out)
            }
            Self::InvalidateCache(InvalidateCache { cache_func, keys_json }) => {
                let f = cache_func.as_bytes();
                put(word, &[f, keys_json], &[f, b" ", keys_json], out)
            }
            Self::UserIp(UserIp { user_id, json }) => {
                let u = user_id.as_bytes();
                put(word, &[u, json], &[u, b" ", json], out)
            }
            Self::Replicate(target) => {
                let t = target.as_str().as_bytes();
                put(word, &[t], &[t], out)
            }
            Self::Server(s)
            | Self::Sync(s)
            | Self::Name(s)
            | Self::Ping(s)
            | Self::Error(s)
            | Self::RemoteServerUp(s)
            | Self::ClearUserSync(s) => put(word, &[s.as_bytes()], &[s.as_bytes()], out),
        }
    }

    /// The encoded line with its `\n`, in a buffer of its own.
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut out = BytesMut::new();
        self.encode_into(&mut out)?;
        Ok(out.freeze())
    }
}

/// Whether `b` holds a `\n`; short inputs skip memchr's dispatch overhead.
#[inline]
fn has_newline(b: &[u8]) -> bool {
    if b.len() < 32 {
        b.contains(&b'\n')
    } else {
        memchr::memchr(b'\n', b).is_some()
    }
}

/// Writes `word + " " + parts... + "\n"` with one reservation, after checking that the
/// caller-supplied parts (`free`; the others are constants and digits) hold no `\n`.
#[inline]
fn put(word: &'static str, free: &[&[u8]], parts: &[&[u8]], out: &mut BytesMut) -> Result<(), EncodeError> {
    if free.iter().any(|p| has_newline(p)) {
        return Err(EncodeError::ContainsNewline { word });
    }
    let len = word.len() + 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    if len > MAX_LINE_LEN {
        return Err(EncodeError::TooLong { word, len });
    }
    out.reserve(len + 1);
    out.put_slice(word.as_bytes());
    out.put_u8(b' ');
    for p in parts {
        out.put_slice(p);
    }
    out.put_u8(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::fields::{ReplicateTarget, SyncState};

    fn enc(c: Command<'_>) -> Result<Bytes, EncodeError> {
        c.to_bytes()
    }

    #[test]
    fn position_in_every_generation_form() {
        let p = |instance, prev| Command::Position(Position { stream: "events", instance, prev, token: 7 });
        assert_eq!(&enc(p(None, None)).unwrap()[..], b"POSITION events 7\n");
        assert_eq!(&enc(p(Some("master"), None)).unwrap()[..], b"POSITION events master 7\n");
        assert_eq!(&enc(p(Some("master"), Some(-1))).unwrap()[..], b"POSITION events master -1 7\n");
        let bad =
            Command::Position(Position { stream: "events", instance: Some("a\nb"), prev: None, token: 1 });
        assert!(enc(bad).is_err(), "an instance name with a newline is never written");
    }

    #[test]
    fn encodes_like_synapse() {
        let row = b"[\"ev\", []]";
        assert_eq!(
            enc(Command::Rdata(Rdata { stream: "events", token: Token::Batch, row })).unwrap(),
            "RDATA events batch [\"ev\", []]\n"
        );
        assert_eq!(
            enc(Command::Rdata(Rdata { stream: "events", token: Token::Value(-7), row })).unwrap(),
            "RDATA events -7 [\"ev\", []]\n"
        );
        assert_eq!(
            enc(Command::Position(Position { stream: "caches", instance: None, prev: None, token: 250 }))
                .unwrap(),
            "POSITION caches 250\n"
        );
        assert_eq!(
            enc(Command::UserSync(UserSync { user_id: "@a:hs", state: SyncState::End, last_sync_ms: 1 }))
                .unwrap(),
            "USER_SYNC @a:hs end 1\n"
        );
        assert_eq!(
            enc(Command::FederationAck(FederationAck { token: i64::MIN })).unwrap(),
            "FEDERATION_ACK -9223372036854775808\n"
        );
        assert_eq!(
            enc(Command::RemovePusher(RemovePusher { app_id: "m.http", push_key: "k", user_id: "@a:hs" }))
                .unwrap(),
            "REMOVE_PUSHER m.http k @a:hs\n"
        );
        assert_eq!(
            enc(Command::InvalidateCache(InvalidateCache { cache_func: "f", keys_json: b"[]" })).unwrap(),
            "INVALIDATE_CACHE f []\n"
        );
        assert_eq!(
            enc(Command::UserIp(UserIp { user_id: "@a:hs", json: b"[1]" })).unwrap(),
            "USER_IP @a:hs [1]\n"
        );
        assert_eq!(enc(Command::Ping("")).unwrap(), "PING \n");
        assert_eq!(enc(Command::Replicate(ReplicateTarget::from_name(""))).unwrap(), "REPLICATE \n");
        assert_eq!(enc(Command::Ping("123\r")).unwrap(), "PING 123\r\n");
        assert_eq!(enc(Command::ClearUserSync("abcde")).unwrap(), "CLEAR_USER_SYNC abcde\n");
        assert_eq!(enc(Command::Error("Wrong remote")).unwrap(), "ERROR Wrong remote\n");
    }

    #[test]
    fn refuses_newlines_and_overlong_lines_and_appends_nothing() {
        let mut out = BytesMut::from(&b"keep"[..]);
        let e = Command::Name("a\nb").encode_into(&mut out);
        assert_eq!(e, Err(EncodeError::ContainsNewline { word: "NAME" }));
        let max = "x".repeat(MAX_LINE_LEN - "PING ".len());
        assert!(Command::Ping(&max).encode_into(&mut out).is_ok());
        assert_eq!(out.len(), 4 + MAX_LINE_LEN + 1);
        out.truncate(4);
        let over = "x".repeat(MAX_LINE_LEN - "PING ".len() + 1);
        let e = Command::Ping(&over).encode_into(&mut out).unwrap_err();
        assert_eq!(e, EncodeError::TooLong { word: "PING", len: MAX_LINE_LEN + 1 });
        assert_eq!(e.to_string(), "Failed to send command PING as too long (16385 > 16384)");
        let row = vec![b'1'; MAX_LINE_LEN];
        let e = Command::Rdata(Rdata { stream: "caches", token: Token::Value(1), row: &row })
            .encode_into(&mut out);
        assert!(matches!(e, Err(EncodeError::TooLong { word: "RDATA", .. })));
        assert_eq!(&out[..], b"keep");
    }

    #[test]
    fn word_matches_the_encoding() {
        let cmds = [
            Command::Server("s"),
            Command::Sync("s"),
            Command::Position(Position { stream: "s", instance: None, prev: None, token: 1 }),
            Command::RemoteServerUp("r"),
        ];
        for c in cmds {
            let b = c.to_bytes().unwrap();
            assert!(b.starts_with(c.word().as_str().as_bytes()));
            assert_eq!(b[c.word().as_str().len()], b' ');
        }
    }
}
