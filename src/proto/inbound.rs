//! The receive pipeline for one line, PROTOCOL.md §1.1 steps 4–8, with replhub's policies
//! (ARCHITECTURE.md §4): every case the reference "drops" gets a proper ERROR.
//!
//! * Step 4, strict UTF-8 of the whole line: failure is a parse error carrying Python's
//!   `UnicodeDecodeError(...)` (the reference drops the connection silently).
//! * Step 5, split at the first space: a one-word line is the command with *empty* arguments
//!   (`PING` is a ping; `USER_SYNC` alone fails to parse), where the reference drops.
//! * Step 6, direction check before any argument parsing: unknown and wrong-direction words
//!   (including the empty word of ` NAME x` or `   `) are [`PeerError::InvalidCommand`].
//! * Step 8, arguments: [`parse_args`]. JSON in INVALIDATE_CACHE and USER_IP is validated so a
//!   bad worker can never make the master drop replhub; an RDATA row is *not* parsed (relay
//!   path) unless [`parse_line_strict`] is used. The result is a [`Command`], the type the
//!   encoder takes, so a received command re-encodes as it is.
//!
//! Blank lines (step 3) never get here: [`super::LineSplitter`] skips them.
use super::command::{Command, CommandWord, Role};
use super::error::{FieldError, PeerError};
use super::fields;
use super::line::Line;

/// Steps 4–6: strict UTF-8 of the whole line, then the command word and the direction check
/// for a peer in `role` (we are `role`; the line came from the other side).
pub fn check_command(role: Role, line: &Line) -> Result<CommandWord, PeerError> {
    if let Err(e) = std::str::from_utf8(line.as_bytes()) {
        return Err(PeerError::parse(line.word(), line.args(), FieldError::unicode(line.as_bytes(), &e)));
    }
    match line.command() {
        Some(word) if word.accepted_by(role) => Ok(word),
        // The line is valid UTF-8, so the word is too.
        _ => Err(PeerError::InvalidCommand(String::from_utf8_lossy(line.word()).into_owned())),
    }
}

/// Step 8: the arguments of `line` for `word` (which must be `line`'s command word, as
/// returned by [`check_command`]). INVALIDATE_CACHE and USER_IP JSON is validated; the RDATA
/// row is not.
pub fn parse_args(word: CommandWord, line: &Line) -> Result<Command<'_>, PeerError> {
    let args = line.args();
    parse_fields(word, args).map_err(|e| PeerError::parse(word.as_str().as_bytes(), args, e))
}

/// Steps 4–8 for one line: [`check_command`] then [`parse_args`].
pub fn parse_line(role: Role, line: &Line) -> Result<Command<'_>, PeerError> {
    let word = check_command(role, line)?;
    parse_args(word, line)
}

/// [`parse_line`], plus validation of an RDATA row as JSON (what a Synapse client does with
/// `json.loads`). For a client that decodes rows (`tail --decode`, the client library); the
/// hub's relay path uses [`parse_line`] and forwards rows untouched.
pub fn parse_line_strict(role: Role, line: &Line) -> Result<Command<'_>, PeerError> {
    let parsed = parse_line(role, line)?;
    if let Command::Rdata(r) = &parsed {
        fields::validate_rdata(r).map_err(|e| PeerError::parse(b"RDATA", line.args(), e))?;
    }
    Ok(parsed)
}

fn parse_fields(word: CommandWord, args: &[u8]) -> Result<Command<'_>, FieldError> {
    let text = fields::utf8_field;
    Ok(match word {
        CommandWord::Rdata => Command::Rdata(fields::parse_rdata(args)?),
        CommandWord::Position => Command::Position(fields::parse_position(args)?),
        CommandWord::Replicate => Command::Replicate(fields::parse_replicate(args)?),
        CommandWord::UserSync => Command::UserSync(fields::parse_user_sync(args)?),
        CommandWord::FederationAck => Command::FederationAck(fields::parse_federation_ack(args)?),
        CommandWord::RemovePusher => Command::RemovePusher(fields::parse_remove_pusher(args)?),
        CommandWord::InvalidateCache => {
            let cmd = fields::parse_invalidate_cache(args)?;
            fields::validate_invalidate_cache(&cmd)?;
            Command::InvalidateCache(cmd)
        }
        CommandWord::UserIp => {
            let cmd = fields::parse_user_ip(args)?;
            fields::validate_user_ip(&cmd)?;
            Command::UserIp(cmd)
        }
        CommandWord::Server => Command::Server(text(args)?),
        CommandWord::Sync => Command::Sync(text(args)?),
        CommandWord::Name => Command::Name(text(args)?),
        CommandWord::Ping => Command::Ping(text(args)?),
        CommandWord::Error => Command::Error(text(args)?),
        CommandWord::RemoteServerUp => Command::RemoteServerUp(text(args)?),
        CommandWord::ClearUserSync => Command::ClearUserSync(text(args)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::fields::{FederationAck, Position, Rdata, ReplicateTarget};
    use crate::proto::{StreamId, Token};

    fn line(s: &'static [u8]) -> Line {
        Line::new(bytes::Bytes::from_static(s))
    }

    fn error_text(role: Role, s: &'static [u8]) -> String {
        parse_line(role, &line(s)).unwrap_err().to_string()
    }

    #[test]
    fn direction_check_comes_first() {
        assert_eq!(error_text(Role::Server, b"RDATA garbage"), "invalid command: RDATA");
        assert_eq!(error_text(Role::Server, b"SERVER x"), "invalid command: SERVER");
        assert_eq!(error_text(Role::Client, b"NAME x"), "invalid command: NAME");
        assert_eq!(error_text(Role::Client, b"REPLICATE ALL"), "invalid command: REPLICATE");
        assert_eq!(error_text(Role::Server, b"name worker1"), "invalid command: name");
        assert_eq!(error_text(Role::Server, b"FOO"), "invalid command: FOO");
        assert_eq!(error_text(Role::Server, b" NAME x"), "invalid command: ");
        assert_eq!(error_text(Role::Server, b"   "), "invalid command: ");
        assert_eq!(error_text(Role::Client, b"CLEAR_USER_SYNC abc"), "invalid command: CLEAR_USER_SYNC");
    }

    #[test]
    fn one_word_lines_have_empty_arguments() {
        assert_eq!(parse_line(Role::Server, &line(b"PING")), Ok(Command::Ping("")));
        assert_eq!(
            parse_line(Role::Server, &line(b"REPLICATE")),
            Ok(Command::Replicate(ReplicateTarget::Unknown("")))
        );
        assert_eq!(
            error_text(Role::Server, b"USER_SYNC"),
            "failed to parse line for  'USER_SYNC': ValueError('not enough values to unpack (expected 3, got 1)') (''):"
        );
    }

    #[test]
    fn invalid_utf8_is_a_parse_error() {
        let e = error_text(Role::Server, b"NAME \xff\xfe");
        assert_eq!(
            e,
            "failed to parse line for  'NAME': UnicodeDecodeError('utf-8', b'NAME \\xff\\xfe', 5, 6, 'invalid start byte') ('\u{fffd}\u{fffd}'):"
        );
        // Even in an unknown word: decoding comes before the lookup, as in the reference.
        assert!(error_text(Role::Server, b"F\xffO x")
            .starts_with("failed to parse line for  'F\u{fffd}O': UnicodeDecodeError("));
    }

    #[test]
    fn parses_every_inbound_word() {
        macro_rules! s {
            ($b:expr) => {
                parse_line(Role::Server, &line($b)).unwrap_or_else(|e| panic!("{e}"))
            };
        }
        macro_rules! c {
            ($b:expr) => {
                parse_line(Role::Client, &line($b)).unwrap_or_else(|e| panic!("{e}"))
            };
        }
        assert_eq!(c!(b"SERVER example.com"), Command::Server("example.com"));
        assert_eq!(
            c!(b"RDATA events batch [1]"),
            Command::Rdata(Rdata { stream: "events", token: Token::Batch, row: b"[1]" })
        );
        assert_eq!(
            c!(b"POSITION events 5\r"),
            Command::Position(Position { stream: "events", instance: None, prev: None, token: 5 })
        );
        assert_eq!(c!(b"SYNC abc"), Command::Sync("abc"));
        assert_eq!(c!(b"PING 123\r"), Command::Ping("123\r"));
        assert_eq!(c!(b"ERROR x y"), Command::Error("x y"));
        assert_eq!(c!(b"REMOTE_SERVER_UP r"), Command::RemoteServerUp("r"));
        assert_eq!(s!(b"NAME "), Command::Name(""));
        assert_eq!(s!(b"REPLICATE events"), Command::Replicate(ReplicateTarget::Stream(StreamId::Events)));
        assert!(matches!(s!(b"USER_SYNC @a:hs start 1"), Command::UserSync(_)));
        assert_eq!(s!(b"FEDERATION_ACK 12"), Command::FederationAck(FederationAck { token: 12 }));
        assert!(matches!(s!(b"REMOVE_PUSHER a k @u:hs"), Command::RemovePusher(_)));
        assert!(matches!(s!(b"INVALIDATE_CACHE f [\"k\"]"), Command::InvalidateCache(_)));
        assert!(matches!(s!(b"USER_IP @a:hs [\"t\", \"ip\", null, null, 1]"), Command::UserIp(_)));
        assert_eq!(s!(b"REMOTE_SERVER_UP r"), Command::RemoteServerUp("r"));
    }

    #[test]
    fn json_is_checked_where_required() {
        assert!(error_text(Role::Server, b"INVALIDATE_CACHE f [")
            .starts_with("failed to parse line for  'INVALIDATE_CACHE': JSONDecodeError("));
        assert!(error_text(Role::Server, b"USER_IP @a:hs [1, 2]")
            .starts_with("failed to parse line for  'USER_IP': ValueError('not enough values to unpack (expected 5, got 2)')"));
        // `%` is harmless here (the reference drops the connection).
        assert!(error_text(Role::Server, b"INVALIDATE_CACHE f 100%").ends_with(" ('f 100%'):"));
        // Relay path: RDATA rows are not parsed; strict mode parses them.
        let bad = line(b"RDATA caches 5 [\"f\", null, 1");
        assert!(parse_line(Role::Client, &bad).is_ok());
        assert!(parse_line_strict(Role::Client, &bad)
            .unwrap_err()
            .to_string()
            .starts_with("failed to parse line for  'RDATA': JSONDecodeError("));
    }

    #[test]
    fn re_encodes_to_the_same_line() {
        for (role, l) in [
            (Role::Client, &b"RDATA events 101 [\"ev\", []]"[..]),
            (Role::Client, b"POSITION events 5"),
            (Role::Server, b"USER_SYNC @a:hs end 15"),
            (Role::Server, b"REPLICATE ALL"),
            (Role::Server, b"REPLICATE events 5"),
            (Role::Server, b"PING "),
        ] {
            let l = Line::new(bytes::Bytes::from_static(l));
            let parsed = parse_line(role, &l).unwrap();
            let mut want = l.as_bytes().to_vec();
            want.push(b'\n');
            assert_eq!(parsed.to_bytes().unwrap(), want);
            assert_eq!(parsed.word(), l.command().unwrap());
        }
    }
}
