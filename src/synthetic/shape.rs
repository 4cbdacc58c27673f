//! The row shapes of PROTOCOL.md §6: per stream, the names and JSON types of a row's fields.
//!
//! One table ([`row_shape`]) read by both sides that need it: `replhub tail --decode` names
//! the fields of the rows it prints from it (only the names, and only by field count, so a row
//! of an unexpected type is still named), and [`check`] verifies a row's types against it (the
//! synthetic generator's tests check every generated row with it).
//!
//! Rows are JSON arrays. Most are *flat* (one element per field); `events` and `federation`
//! rows are `[kind, data]`. Later Synapse releases appended fields to some rows, so a stream
//! (or an `events` kind) may list several layouts, told apart by their length; the first is
//! the seed's.
use std::fmt;

#[cfg(test)]
use crate::proto::json::{self, Value};
use crate::proto::StreamId;

/// The JSON type of one field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JsonType {
    /// Any value.
    Any,
    /// A string.
    Str,
    /// An integer.
    Int,
    /// `true` or `false`.
    Bool,
    /// Any object.
    Object,
    /// `null` or the inner type.
    Nullable(&'static Self),
    /// An array whose every element has the inner type.
    ArrayOf(&'static Self),
    /// An object with exactly these members, in this order.
    Record(&'static [Field]),
    /// A string holding the JSON text of a value of the inner type.
    Encoded(&'static Self),
    /// Either of two types.
    Either(&'static Self, &'static Self),
}

/// One named field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Field {
    /// The field's name in PROTOCOL.md §6 (and in `tail --decode` output).
    pub name: &'static str,
    /// Its JSON type.
    pub ty: JsonType,
}

/// The fields of a flat row (or of a `[kind, [fields…]]` row's data), in order.
pub(crate) type Layout = &'static [Field];

/// One kind of a `[kind, data]` row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Kind<D: 'static> {
    /// The first element of the row.
    pub kind: &'static str,
    /// What the second element holds.
    pub data: D,
}

/// How a stream's rows are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowShape {
    /// `[field, …]`: one of these layouts (by length; the first is the seed's).
    Flat(&'static [Layout]),
    /// `[kind, [field, …]]` (`events`): per kind, the data's layouts (by length). Rows of
    /// other kinds do not fit the shape.
    KindFields(&'static [Kind<&'static [Layout]>]),
    /// `[kind, data]` (`federation`): per kind, the type of the one data value. Rows of other
    /// kinds keep the `[kind, data]` form but their data's type is unknown.
    KindValue(&'static [Kind<JsonType>]),
}

const fn f(name: &'static str, ty: JsonType) -> Field {
    Field { name, ty }
}

use JsonType::{Any, Bool, Int, Object, Str};
const OPT_STR: JsonType = JsonType::Nullable(&Str);
const STRS: JsonType = JsonType::ArrayOf(&Str);

/// An `ev` row's data: the seed's six fields, then `membership`, `rejected` and `outlier`
/// (later releases send 8 or 9).
const EV: [Field; 9] = [
    f("event_id", Str),
    f("room_id", Str),
    f("type", Str),
    f("state_key", OPT_STR),
    f("redacts", OPT_STR),
    f("relates_to", OPT_STR),
    f("membership", OPT_STR),
    f("rejected", Bool),
    f("outlier", Bool),
];
const EV_SEED: Layout = EV.split_at(6).0;
const STATE: Layout = &[f("room_id", Str), f("type", Str), f("state_key", Str), f("event_id", OPT_STR)];
const BACKFILL: Layout = EV_SEED;
/// The presence fields: a `presence` row, and the object of a `federation` `p` row.
const PRESENCE: Layout = &[
    f("user_id", Str),
    f("state", Str),
    f("last_active_ts", Int),
    f("last_federation_update_ts", Int),
    f("last_user_sync_ts", Int),
    f("status_msg", OPT_STR),
    f("currently_active", Bool),
];
/// Synapse's `Edu` as a federation row carries it (its key order).
const EDU: JsonType =
    JsonType::Record(&[f("origin", Str), f("destination", Str), f("edu_type", Str), f("content", Object)]);
const TYPING: Layout = &[f("room_id", Str), f("user_ids", STRS)];
const RECEIPTS: Layout =
    &[f("room_id", Str), f("receipt_type", Str), f("user_id", Str), f("event_id", Str), f("data", Object)];
const USER_ID: Layout = &[f("user_id", Str)];
const PUSHERS: Layout = &[f("user_id", Str), f("app_id", Str), f("pushkey", Str), f("deleted", Bool)];
const CACHES: Layout = &[
    f("cache_func", Str),
    // null = invalidate the whole cache
    f("keys", JsonType::Nullable(&JsonType::ArrayOf(&Any))),
    f("invalidation_ts", Int),
];
const PUBLIC_ROOMS: Layout =
    &[f("room_id", Str), f("visibility", Bool), f("appservice_id", OPT_STR), f("network_id", OPT_STR)];
/// A user id or a remote server name.
const ENTITY: Layout = &[f("entity", Str)];
/// `presence_federation` rows (Synapse 1.33+).
const PRESENCE_FEDERATION: Layout = &[f("destination", Str), f("user_id", Str)];
/// `device_lists` rows before Synapse 1.13 (`destination` is `null` when no server is poked).
const DEVICE_LISTS_OLD: Layout = &[f("user_id", Str), f("destination", OPT_STR)];
/// The tags' `data` is a string holding the tags object in PROTOCOL.md §6 (what the generator
/// writes), but the recorded stream (`shared/vectors/stream-sample.txt`) carries an object
/// `{"tags": {…}}`: both fit.
const TAG_ACCOUNT_DATA: Layout = &[
    f("user_id", Str),
    f("room_id", Str),
    f("data", JsonType::Either(&JsonType::Encoded(&Object), &Object)),
];
const ACCOUNT_DATA: Layout = &[f("user_id", Str), f("room_id", OPT_STR), f("data_type", Str)];
const GROUPS: Layout = &[f("group_id", Str), f("user_id", Str), f("type", Str), f("content", Object)];

const EVENTS: &[Kind<&[Layout]>] =
    &[Kind { kind: "ev", data: &[EV_SEED, EV.split_at(8).0, &EV] }, Kind { kind: "state", data: &[STATE] }];
const FEDERATION: &[Kind<JsonType>] = &[
    Kind { kind: "p", data: JsonType::Record(PRESENCE) },
    Kind { kind: "pd", data: JsonType::Record(&[f("state", JsonType::Record(PRESENCE)), f("dests", STRS)]) },
    Kind { kind: "k", data: JsonType::Record(&[f("key", STRS), f("edu", EDU)]) },
    Kind { kind: "e", data: EDU },
];

/// The shape of `stream`'s rows.
pub(crate) fn row_shape(stream: StreamId) -> RowShape {
    match stream {
        StreamId::Events => RowShape::KindFields(EVENTS),
        StreamId::Backfill => RowShape::Flat(&[BACKFILL]),
        StreamId::Presence => RowShape::Flat(&[PRESENCE]),
        StreamId::Typing => RowShape::Flat(&[TYPING]),
        StreamId::Receipts => RowShape::Flat(&[RECEIPTS]),
        StreamId::PushRules | StreamId::UserSignature => RowShape::Flat(&[USER_ID]),
        StreamId::Pushers => RowShape::Flat(&[PUSHERS]),
        StreamId::Caches => RowShape::Flat(&[CACHES]),
        StreamId::PublicRooms => RowShape::Flat(&[PUBLIC_ROOMS]),
        StreamId::DeviceLists => RowShape::Flat(&[ENTITY, DEVICE_LISTS_OLD]),
        StreamId::ToDevice => RowShape::Flat(&[ENTITY]),
        StreamId::Federation => RowShape::KindValue(FEDERATION),
        StreamId::TagAccountData => RowShape::Flat(&[TAG_ACCOUNT_DATA]),
        StreamId::AccountData => RowShape::Flat(&[ACCOUNT_DATA]),
        StreamId::Groups => RowShape::Flat(&[GROUPS]),
        StreamId::PresenceFederation => RowShape::Flat(&[PRESENCE_FEDERATION]),
    }
}

/// The layout among `layouts` with `len` fields.
pub(crate) fn layout_of_len(layouts: &'static [Layout], len: usize) -> Option<Layout> {
    layouts.iter().copied().find(|l| l.len() == len)
}

/// Why a row does not fit its stream's shape: where (a path of field names), and what.
#[cfg(test)]
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {what}")]
pub(crate) struct ShapeError {
    /// The stream and the field names down to the misfit, e.g. `federation.pd.state.user_id`.
    pub path: String,
    /// What was expected.
    pub what: String,
}

/// Checks `row` against `stream`'s shape: the layout (by length), every field's type, and for
/// `[kind, data]` rows a known kind.
#[cfg(test)]
pub(crate) fn check(stream: StreamId, row: &Value) -> Result<(), ShapeError> {
    let path = stream.name().to_owned();
    let fail = |path: &str, what: &str| Err(ShapeError { path: path.to_owned(), what: what.to_owned() });
    let Some(items) = row.as_array() else {
        return fail(&path, "expected an array");
    };
    let kind_and_data = || match items {
        [kind, data] => kind.as_str().map(|k| (k, data)).ok_or(()),
        _ => Err(()),
    };
    match row_shape(stream) {
        RowShape::Flat(layouts) => check_fields(&path, layouts, items),
        RowShape::KindFields(kinds) => {
            let Ok((kind, data)) = kind_and_data() else {
                return fail(&path, "expected [kind, data]");
            };
            let Some(kind) = kinds.iter().find(|k| k.kind == kind) else {
                return fail(&path, "unknown kind");
            };
            let path = format!("{path}.{kind}", kind = kind.kind);
            match data.as_array() {
                Some(data) => check_fields(&path, kind.data, data),
                None => fail(&path, "expected an array"),
            }
        }
        RowShape::KindValue(kinds) => {
            let Ok((kind, data)) = kind_and_data() else {
                return fail(&path, "expected [kind, data]");
            };
            let Some(kind) = kinds.iter().find(|k| k.kind == kind) else {
                return fail(&path, "unknown kind");
            };
            check_value(&format!("{path}.{kind}", kind = kind.kind), kind.data, data)
        }
    }
}

#[cfg(test)]
fn check_fields(path: &str, layouts: &'static [Layout], items: &[Value]) -> Result<(), ShapeError> {
    let Some(layout) = layout_of_len(layouts, items.len()) else {
        let lens: Vec<String> = layouts.iter().map(|l| l.len().to_string()).collect();
        return Err(ShapeError {
            path: path.to_owned(),
            what: format!("{} fields, expected {}", items.len(), lens.join(" or ")),
        });
    };
    for (field, value) in layout.iter().zip(items) {
        check_value(&format!("{path}.{}", field.name), field.ty, value)?;
    }
    Ok(())
}

#[cfg(test)]
fn check_value(path: &str, ty: JsonType, v: &Value) -> Result<(), ShapeError> {
    let ok = match ty {
        JsonType::Any => true,
        JsonType::Str => v.as_str().is_some(),
        JsonType::Int => v.as_i64().is_some(),
        JsonType::Bool => v.as_bool().is_some(),
        JsonType::Object => v.as_object().is_some(),
        JsonType::Nullable(inner) => return if v.is_null() { Ok(()) } else { check_value(path, *inner, v) },
        JsonType::ArrayOf(inner) => {
            let Some(items) = v.as_array() else {
                return Err(ShapeError { path: path.to_owned(), what: "expected an array".into() });
            };
            return items.iter().try_for_each(|item| check_value(path, *inner, item));
        }
        JsonType::Record(fields) => {
            let Some(members) = v.as_object() else {
                return Err(ShapeError { path: path.to_owned(), what: "expected an object".into() });
            };
            let keys: Vec<&str> = members.iter().map(|(k, _)| k.as_str()).collect();
            let names: Vec<&str> = fields.iter().map(|f| f.name).collect();
            if keys != names {
                return Err(ShapeError {
                    path: path.to_owned(),
                    what: format!("keys {keys:?}, expected {names:?}"),
                });
            }
            return fields
                .iter()
                .zip(members)
                .try_for_each(|(f, (_, value))| check_value(&format!("{path}.{}", f.name), f.ty, value));
        }
        JsonType::Either(a, b) => {
            return check_value(path, *a, v).or_else(|_| check_value(path, *b, v));
        }
        JsonType::Encoded(inner) => {
            let Some(text) = v.as_str() else {
                return Err(ShapeError { path: path.to_owned(), what: "expected a string of JSON".into() });
            };
            return match json::parse(text.as_bytes()) {
                Ok(inner_value) => check_value(path, *inner, &inner_value),
                Err(e) => Err(ShapeError { path: path.to_owned(), what: format!("not JSON: {}", e.message) }),
            };
        }
    };
    if ok {
        Ok(())
    } else {
        Err(ShapeError { path: path.to_owned(), what: format!("expected {ty}") })
    }
}

impl fmt::Display for JsonType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any value"),
            Self::Str => f.write_str("a string"),
            Self::Int => f.write_str("an integer"),
            Self::Bool => f.write_str("a boolean"),
            Self::Object => f.write_str("an object"),
            Self::Nullable(inner) => write!(f, "null or {inner}"),
            Self::ArrayOf(inner) => write!(f, "an array of {inner}"),
            Self::Record(_) => f.write_str("an object with named members"),
            Self::Encoded(inner) => write!(f, "a string holding {inner}"),
            Self::Either(a, b) => write!(f, "{a} or {b}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(text: &str) -> Value {
        json::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn the_protocol_examples_fit() {
        // PROTOCOL.md §6's example lines.
        let examples = [
            (
                "events",
                r#"["ev", ["$a1:example.com", "!r:example.com", "m.room.message", null, null, null]]"#,
            ),
            ("events", r#"["state", ["!r:example.com", "m.room.name", "", null]]"#),
            ("events", r#"["ev", ["$e", "!r", "t", null, null, null, "join", false, true]]"#),
            (
                "backfill",
                r#"["$old:remote.org", "!r:example.com", "m.room.member", "@bob:remote.org", null, null]"#,
            ),
            (
                "presence",
                r#"["@alice:example.com", "online", 1583254800000, 1583254790000, 1583254800000, null, true]"#,
            ),
            ("typing", r#"["!r:example.com", ["@alice:example.com"]]"#),
            (
                "receipts",
                r#"["!r:example.com", "m.read", "@alice:example.com", "$a1:example.com", {"ts": 1}]"#,
            ),
            ("push_rules", r#"["@alice:example.com"]"#),
            ("pushers", r#"["@alice:example.com", "m.http", "pushkey123", false]"#),
            ("caches", r#"["get_user_by_id", ["@bob:example.com"], 1583254801000]"#),
            ("caches", r#"["get_server_version", null, 1583254801000]"#),
            ("public_rooms", r#"["!r:example.com", true, null, null]"#),
            ("device_lists", r#"["remote.example.org"]"#),
            ("device_lists", r#"["@a:hs", "remote.org"]"#),
            ("to_device", r#"["@alice:example.com"]"#),
            (
                "federation",
                r#"["e", {"origin": "example.com", "destination": "remote.org", "edu_type": "m.typing", "content": {}}]"#,
            ),
            (
                "tag_account_data",
                r#"["@alice:example.com", "!r:example.com", "{\"m.favourite\": {\"order\": 0.5}}"]"#,
            ),
            ("account_data", r#"["@alice:example.com", null, "m.direct"]"#),
            ("groups", r#"["+g:example.com", "@alice:example.com", "membership", {"membership": "join"}]"#),
            ("user_signature", r#"["@alice:example.com"]"#),
        ];
        for (stream, text) in examples {
            let s = StreamId::from_name(stream.as_bytes()).unwrap();
            check(s, &row(text)).unwrap_or_else(|e| panic!("{e}: {text}"));
        }
    }

    #[test]
    fn every_row_of_the_recorded_stream_fits() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors/stream-sample.txt");
        let data = std::fs::read(path).expect("shared/vectors/stream-sample.txt beside the repo");
        let mut n = 0;
        for line in data.split(|&b| b == b'\n').filter(|l| l.starts_with(b"RDATA ")) {
            let r = crate::proto::fields::parse_rdata(&line[6..]).unwrap();
            let stream = StreamId::from_name(r.stream.as_bytes()).unwrap();
            let value = json::parse(r.row).unwrap();
            check(stream, &value).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(line)));
            n += 1;
        }
        assert_eq!(n, 3460);
    }

    #[test]
    fn misfits_say_where() {
        let err = |s: StreamId, text: &str| check(s, &row(text)).unwrap_err().to_string();
        assert_eq!(
            err(StreamId::Pushers, r#"["@a", "m.http", "k", 0]"#),
            "pushers.deleted: expected a boolean"
        );
        assert_eq!(err(StreamId::Pushers, r#"["@a"]"#), "pushers: 1 fields, expected 4");
        assert_eq!(err(StreamId::DeviceLists, r#"[]"#), "device_lists: 0 fields, expected 1 or 2");
        assert_eq!(err(StreamId::Events, r#"["nope", []]"#), "events: unknown kind");
        assert_eq!(
            err(StreamId::Events, r#"["ev", ["$e", "!r", 3, null, null, null]]"#),
            "events.ev.type: expected a string"
        );
        assert_eq!(err(StreamId::Caches, r#"["f", 5, 1]"#), "caches.keys: expected an array");
        assert_eq!(
            err(StreamId::TagAccountData, r#"["@a", "!r", "[1]"]"#),
            "tag_account_data.data: expected an object"
        );
        assert_eq!(
            err(StreamId::Federation, r#"["k", {"key": ["a"], "edu": {"origin": "a"}}]"#),
            r#"federation.k.edu: keys ["origin"], expected ["origin", "destination", "edu_type", "content"]"#
        );
        assert_eq!(err(StreamId::Typing, r#"{"a": 1}"#), "typing: expected an array");
    }
}
