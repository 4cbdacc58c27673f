//! Protocol generations of released Synapse (PROTOCOL.md §8): which one a master speaks, how
//! to recognise it from the lines it sends, and the generation-specific forms replhub parses
//! and writes.
//!
//! RDATA lines are relayed as the master's bytes, so workers behind replhub are served in the
//! master's generation; only the lines replhub writes itself (POSITION) are formatted here.
//!
//! | generation | POSITION                              | RDATA                                   |
//! |------------|---------------------------------------|-----------------------------------------|
//! | 1.10–1.12  | `POSITION <s> <tok>`                  | `RDATA <s> <tok\|batch> <json>`          |
//! | seed       | `POSITION <s> <tok>`                  | `RDATA <s> <tok\|batch> <json>`          |
//! | 1.13–1.21  | `POSITION <s> <instance> <tok>`       | `RDATA <s> <instance> <tok\|batch> <json>` |
//! | 1.22–1.66  | `POSITION <s> <instance> <prev> <new>`| as 1.13                                  |
use bytes::Bytes;

use super::command::Command;
use super::error::FieldError;
use super::fields::{not_enough_values, split_fields, utf8_field, Position, SyncState};
use super::line::short_field_end;
use super::number::parse_i64;
use super::pyrepr::{py_exc, py_repr};

/// A protocol generation replhub can relay and serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Generation {
    /// Synapse 1.10–1.12: the seed's line formats, but `REPLICATE <stream|ALL> <token|NOW>`:
    /// the master catches a worker up from its token over TCP (PROTOCOL.md §8.1).
    V1_10,
    /// The unreleased seed: no instance names, `REPLICATE <stream|ALL>` subscribes.
    Seed,
    /// Synapse 1.13–1.21: instance names in RDATA and POSITION, bare `REPLICATE`.
    V1_13,
    /// Synapse 1.22–1.66: as 1.13, POSITION carries `<prev> <new>`.
    V1_22,
}

impl Generation {
    /// Every generation, oldest first.
    pub const ALL: [Self; 4] = [Self::V1_10, Self::Seed, Self::V1_13, Self::V1_22];

    /// The label used in logs, metrics and `--protocol`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::V1_10 => "1.10",
            Self::Seed => "seed",
            Self::V1_13 => "1.13",
            Self::V1_22 => "1.22",
        }
    }

    /// Whether RDATA and POSITION carry the writer's instance name (1.13 on).
    pub const fn has_instance(self) -> bool {
        !matches!(self, Self::Seed | Self::V1_10)
    }

    /// Whether workers subscribe per stream with a token (`REPLICATE <s> <tok>`, 1.10–1.12)
    /// or name (seed), rather than with a bare `REPLICATE` (1.13 on).
    pub const fn subscribes(self) -> bool {
        matches!(self, Self::Seed | Self::V1_10)
    }

    /// Space-separated fields of this generation's POSITION, stream included.
    const fn position_fields(self) -> usize {
        match self {
            Self::V1_10 | Self::Seed => 2,
            Self::V1_13 => 3,
            Self::V1_22 => 4,
        }
    }

    /// The generation whose POSITION has `fields` space-separated fields (stream included):
    /// 2 seed (or 1.10, which only the greeting tells apart), 3 1.13, 4 1.22.
    const fn from_position_fields(fields: usize) -> Option<Self> {
        match fields {
            2 => Some(Self::Seed),
            3 => Some(Self::V1_13),
            4 => Some(Self::V1_22),
            _ => None,
        }
    }

    /// `POSITION <stream> …` as this generation's master writes it, with `\n`. `instance` is
    /// the master's instance name (ignored by the seed); replies to REPLICATE carry
    /// `prev = new = token` from 1.22 on (PROTOCOL.md §8.2).
    pub fn position_line(self, stream: &str, instance: &str, token: i64) -> Bytes {
        let position = Command::Position(Position {
            stream,
            instance: self.has_instance().then_some(instance),
            prev: (self == Self::V1_22).then_some(token),
            token,
        });
        // A stream name, an instance name and numbers: never a newline, never near the limit.
        position.to_bytes().unwrap_or_else(|e| unreachable!("{e}: POSITION {stream} {instance} {token}"))
    }
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// `--protocol`: learn the upstream's generation from what it sends, or insist on one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum ProtocolChoice {
    /// Learn it from the first POSITION (or RDATA) of each connection.
    #[default]
    Auto,
    /// Only this generation; anything else from the master is a parse error.
    Pinned(Generation),
}

impl std::str::FromStr for ProtocolChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "seed" => Ok(Self::Pinned(Generation::Seed)),
            // Every release from 1.10 to 1.12 speaks the same protocol; 1.12 is the last.
            "1.10" | "1.11" | "1.12" => Ok(Self::Pinned(Generation::V1_10)),
            "1.13" => Ok(Self::Pinned(Generation::V1_13)),
            "1.22" => Ok(Self::Pinned(Generation::V1_22)),
            other => {
                Err(format!("unknown protocol {other:?} (expected auto, seed, 1.10 (or 1.12), 1.13 or 1.22)"))
            }
        }
    }
}

impl TryFrom<String> for ProtocolChoice {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl ProtocolChoice {
    /// The generation fixed by this choice, if any.
    pub const fn pinned(self) -> Option<Generation> {
        match self {
            Self::Auto => None,
            Self::Pinned(g) => Some(g),
        }
    }
}

/// A POSITION from the master in any generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnyPosition<'a> {
    /// The generation its shape belongs to.
    pub generation: Generation,
    /// Stream name.
    pub stream: &'a str,
    /// The writer's instance name (1.13 on).
    pub instance: Option<&'a str>,
    /// 1.22 on: the token the writer had before (`prev`).
    pub prev: Option<i64>,
    /// The stream's current token (`new` from 1.22 on).
    pub token: i64,
}

/// Parses POSITION arguments of any generation, recognised by their field count. With
/// `expect` set, a different shape is an error, worded like the parse error that
/// generation's client would report (Python's `int()` of the unsplit rest).
pub fn parse_any_position(args: &[u8], expect: Option<Generation>) -> Result<AnyPosition<'_>, FieldError> {
    let fields: Vec<&[u8]> = args.split(|&b| b == b' ').collect();
    let shape = Generation::from_position_fields(fields.len());
    let generation = match (expect, shape) {
        (Some(g), Some(s)) if g.position_fields() == s.position_fields() => g,
        (None, Some(s)) => s,
        (Some(g), _) => return Err(mismatch(args, g)),
        (None, None) => return Err(not_enough_values(2, fields.len().min(1))),
    };
    let stream = utf8_field(fields[0])?;
    Ok(match generation {
        Generation::V1_10 | Generation::Seed => {
            AnyPosition { generation, stream, instance: None, prev: None, token: parse_i64(fields[1])? }
        }
        Generation::V1_13 => AnyPosition {
            generation,
            stream,
            instance: Some(utf8_field(fields[1])?),
            prev: None,
            token: parse_i64(fields[2])?,
        },
        Generation::V1_22 => AnyPosition {
            generation,
            stream,
            instance: Some(utf8_field(fields[1])?),
            prev: Some(parse_i64(fields[2])?),
            token: parse_i64(fields[3])?,
        },
    })
}

/// The error `g`'s client raises for a POSITION of another shape: too few fields to unpack,
/// or `int()` of the rest that still holds a space.
fn mismatch(args: &[u8], g: Generation) -> FieldError {
    let want = g.position_fields();
    let got = args.split(|&b| b == b' ').count();
    if got < want {
        return not_enough_values(want, got);
    }
    let mut rest = args;
    for _ in 0..want - 1 {
        if let Some(sp) = memchr::memchr(b' ', rest) {
            rest = &rest[sp + 1..];
        }
    }
    match parse_i64(rest) {
        Err(e) => e,
        Ok(_) => not_enough_values(want, got),
    }
}

/// The RDATA layout the upstream link expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RdataForm {
    /// `RDATA <s> <tok|batch> <json>` (seed).
    Seed,
    /// `RDATA <s> <instance> <tok|batch> <json>` (1.13 on).
    Instance,
    /// Not known yet: a second field that is `batch` or a number is the token (seed), anything
    /// else is an instance name followed by the token.
    Sniff,
}

impl RdataForm {
    /// The form for a generation, or [`RdataForm::Sniff`] while it is not known.
    pub const fn of(generation: Option<Generation>) -> Self {
        match generation {
            None => Self::Sniff,
            Some(Generation::Seed | Generation::V1_10) => Self::Seed,
            Some(_) => Self::Instance,
        }
    }
}

/// The head of RDATA arguments in `form`: (stream, token field, whether an instance field was
/// present). `None` if a field is missing. Only memchr; the row is not looked at.
#[inline]
pub fn rdata_head(args: &[u8], form: RdataForm) -> Option<(&[u8], &[u8], bool)> {
    let sp1 = short_field_end(args)?;
    let stream = &args[..sp1];
    let rest = &args[sp1 + 1..];
    let sp2 = short_field_end(rest)?;
    let second = &rest[..sp2];
    let instance = match form {
        RdataForm::Seed => false,
        RdataForm::Instance => true,
        RdataForm::Sniff => second != b"batch" && parse_i64(second).is_err(),
    };
    if !instance {
        return Some((stream, second, false));
    }
    let rest = &rest[sp2 + 1..];
    let sp3 = short_field_end(rest)?;
    Some((stream, &rest[..sp3], true))
}

/// RDATA arguments of any generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnyRdata<'a> {
    /// Stream name.
    pub stream: &'a str,
    /// The writer's instance name (1.13 on).
    pub instance: Option<&'a str>,
    /// The row's token, or `batch`.
    pub token: super::fields::Token,
    /// The row's JSON text.
    pub row: &'a [u8],
}

/// Parses RDATA arguments in `form` (with [`RdataForm::Sniff`], the seed form if the second
/// field is a token, else the instance-named form).
pub fn parse_any_rdata(args: &[u8], form: RdataForm) -> Result<AnyRdata<'_>, FieldError> {
    let Some((stream, token, has_instance)) = rdata_head(args, form) else {
        return Err(not_enough_values(if form == RdataForm::Seed { 3 } else { 4 }, 2));
    };
    let mut row_at = stream.len() + 1;
    let instance = if has_instance {
        // `rdata_head` found a space after the instance field.
        let end = memchr::memchr(b' ', &args[row_at..]).map_or(args.len(), |sp| row_at + sp);
        let instance = utf8_field(&args[row_at..end])?;
        row_at = end + 1;
        Some(instance)
    } else {
        None
    };
    row_at += token.len() + 1;
    let token = if token == b"batch" {
        super::fields::Token::Batch
    } else {
        super::fields::Token::Value(parse_i64(token)?)
    };
    Ok(AnyRdata { stream: utf8_field(stream)?, instance, token, row: &args[row_at..] })
}

/// `USER_SYNC <instance_id> <user_id> <start|end> <last_sync_ms>` (Synapse 1.13+).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceUserSync<'a> {
    /// The worker process's random instance id (not its NAME).
    pub instance_id: &'a str,
    /// User id.
    pub user_id: &'a str,
    /// Start or end.
    pub state: SyncState,
    /// Last sync time, ms.
    pub last_sync_ms: i64,
}

/// Parses 1.13+ USER_SYNC arguments (four fields), with the errors a 1.13+ master reports.
pub fn parse_instance_user_sync(args: &[u8]) -> Result<InstanceUserSync<'_>, FieldError> {
    let [instance_id, user_id, state, ms] = split_fields::<4>(args)?;
    let state = match state {
        b"start" => SyncState::Start,
        b"end" => SyncState::End,
        other => {
            let shown = py_repr(&String::from_utf8_lossy(other));
            return Err(FieldError(py_exc("Exception", &format!("Invalid USER_SYNC state {shown}"))));
        }
    };
    Ok(InstanceUserSync {
        instance_id: utf8_field(instance_id)?,
        user_id: utf8_field(user_id)?,
        state,
        last_sync_ms: parse_i64(ms)?,
    })
}

/// Checks FEDERATION_ACK arguments of any release: `<token>` (up to 1.17) or
/// `<instance> <token>` (1.18+, exactly two fields). Returns the token.
pub fn parse_any_federation_ack(args: &[u8]) -> Result<i64, FieldError> {
    match memchr::memchr(b' ', args) {
        None => parse_i64(args),
        Some(sp) => {
            utf8_field(&args[..sp])?;
            parse_i64(&args[sp + 1..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_every_generation() {
        let p = parse_any_position(b"events 100", None).unwrap();
        assert_eq!(
            (p.generation, p.stream, p.instance, p.prev, p.token),
            (Generation::Seed, "events", None, None, 100)
        );
        let p = parse_any_position(b"events master 100", None).unwrap();
        assert_eq!((p.generation, p.instance, p.token), (Generation::V1_13, Some("master"), 100));
        let p = parse_any_position(b"events master 7 100", None).unwrap();
        assert_eq!((p.generation, p.prev, p.token), (Generation::V1_22, Some(7), 100));
        assert!(parse_any_position(b"events", None).is_err());
        assert!(parse_any_position(b"events master x 1 2", None).is_err());
        assert!(parse_any_position(b"events master", None).is_err(), "bad token in the 1.13 shape");
    }

    #[test]
    fn a_pinned_generation_reports_what_its_client_would() {
        // What a 1.13 worker answered to a 1.22 POSITION (PROTOCOL.md §8.3.1).
        let e = parse_any_position(b"events master 100 100", Some(Generation::V1_13)).unwrap_err();
        assert_eq!(e.0, "ValueError(\"invalid literal for int() with base 10: '100 100'\")");
        let e = parse_any_position(b"events 100", Some(Generation::V1_22)).unwrap_err();
        assert_eq!(e.0, "ValueError('not enough values to unpack (expected 4, got 2)')");
    }

    #[test]
    fn position_lines_as_each_master_writes_them() {
        assert_eq!(&Generation::Seed.position_line("events", "master", 5)[..], b"POSITION events 5\n");
        assert_eq!(&Generation::V1_10.position_line("events", "master", 5)[..], b"POSITION events 5\n");
        assert_eq!(
            &Generation::V1_13.position_line("events", "master", 5)[..],
            b"POSITION events master 5\n"
        );
        assert_eq!(
            &Generation::V1_22.position_line("events", "master", -1)[..],
            b"POSITION events master -1 -1\n"
        );
    }

    #[test]
    fn rdata_heads_in_every_form() {
        let seed = &b"events 5 [\"ev\"]"[..];
        let inst = &b"events master batch [\"ev\"]"[..];
        assert_eq!(rdata_head(seed, RdataForm::Seed), Some((&b"events"[..], &b"5"[..], false)));
        assert_eq!(rdata_head(seed, RdataForm::Sniff), Some((&b"events"[..], &b"5"[..], false)));
        assert_eq!(rdata_head(inst, RdataForm::Instance), Some((&b"events"[..], &b"batch"[..], true)));
        assert_eq!(rdata_head(inst, RdataForm::Sniff), Some((&b"events"[..], &b"batch"[..], true)));
        assert_eq!(rdata_head(b"events master 5", RdataForm::Instance), None);
        assert_eq!(rdata_head(b"events 5", RdataForm::Seed), None);
    }

    #[test]
    fn rdata_of_every_generation() {
        let r = parse_any_rdata(b"events master batch [\"ev\"]", RdataForm::Sniff).unwrap();
        assert_eq!(
            (r.stream, r.instance, r.token, r.row),
            ("events", Some("master"), super::super::fields::Token::Batch, &b"[\"ev\"]"[..])
        );
        let r = parse_any_rdata(b"typing 5 [1, 2]", RdataForm::Sniff).unwrap();
        assert_eq!((r.instance, r.token.value(), r.row), (None, Some(5), &b"[1, 2]"[..]));
        assert!(parse_any_rdata(b"typing master x [1]", RdataForm::Instance).is_err());
        assert!(parse_any_rdata(b"typing 5", RdataForm::Seed).is_err());
    }

    #[test]
    fn worker_commands_of_released_synapse() {
        let u = parse_instance_user_sync(b"AbCdE @a:hs start 15").unwrap();
        assert_eq!(
            (u.instance_id, u.user_id, u.state, u.last_sync_ms),
            ("AbCdE", "@a:hs", SyncState::Start, 15)
        );
        assert_eq!(
            parse_instance_user_sync(b"AbCdE @a:hs stop 15").unwrap_err().0,
            "Exception(\"Invalid USER_SYNC state 'stop'\")"
        );
        assert!(parse_instance_user_sync(b"@a:hs start 15").is_err());
        assert_eq!(parse_any_federation_ack(b"12"), Ok(12));
        assert_eq!(parse_any_federation_ack(b"federation_sender1 12"), Ok(12));
        assert!(parse_any_federation_ack(b"a b 12").is_err());
    }

    #[test]
    fn protocol_choice_parses() {
        assert_eq!("auto".parse::<ProtocolChoice>(), Ok(ProtocolChoice::Auto));
        assert_eq!("1.22".parse::<ProtocolChoice>(), Ok(ProtocolChoice::Pinned(Generation::V1_22)));
        assert!("1.66".parse::<ProtocolChoice>().is_err());
        assert_eq!("1.12".parse::<ProtocolChoice>(), Ok(ProtocolChoice::Pinned(Generation::V1_10)));
        for g in Generation::ALL {
            assert_eq!(g.label().parse::<ProtocolChoice>(), Ok(ProtocolChoice::Pinned(g)));
        }
    }
}
