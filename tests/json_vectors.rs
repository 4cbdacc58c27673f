//! The JSON encoder and decoder against the conformance vectors in `../shared/vectors/`, which
//! were produced by running Synapse's own code (simplejson 3.17): every JSON text Synapse wrote
//! must decode and re-encode to the same bytes, and every JSON error must read the same.
use std::path::PathBuf;

use replhub::proto::json::{self, Number, Value};

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vectors")
}

fn read_vector(name: &str) -> Vec<u8> {
    let path = vectors_dir().join(name);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("conformance vector {} is missing or unreadable: {e}", path.display()))
}

/// commands.json, read with our own decoder (it holds bare `NaN`, which stricter decoders
/// refuse). Everything compared below is byte strings taken from it, so a decoding mistake
/// here shows up as a mismatch, not as a silent pass.
fn commands() -> Value {
    json::parse(&read_vector("commands.json")).expect("commands.json parses")
}

fn section<'a>(doc: &'a Value, name: &str) -> &'a [Value] {
    doc.get(name).and_then(Value::as_array).unwrap_or_else(|| panic!("no section {name}"))
}

fn str_field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name).and_then(Value::as_str)
}

/// The JSON part of a line, split as Synapse splits it (`str.split(" ", n)`), or None for
/// commands that carry no JSON.
fn json_part(line: &str) -> Option<&str> {
    let (name, args) = line.split_once(' ')?;
    match name {
        "RDATA" => args.splitn(3, ' ').nth(2),
        "INVALIDATE_CACHE" | "USER_IP" => args.split_once(' ').map(|(_, rest)| rest),
        _ => None,
    }
}

fn reencode(text: &str) -> String {
    let v = json::parse(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"));
    String::from_utf8(json::to_vec(&v)).expect("encoder writes ASCII")
}

fn int(i: i64) -> Value {
    Value::from(i)
}

/// The Python values of `json_encoding.examples`, built by hand.
fn python_example(python: &str) -> Option<Value> {
    let s = |x: &str| Value::from(x);
    Some(match python {
        "None" => Value::Null,
        "True" => Value::Bool(true),
        "(1, 2)" => Value::Array(vec![int(1), int(2)]),
        "Named(a=1, b='x')" => Value::Array(vec![int(1), s("x")]),
        "{'b': 1, 'a': 2}" => Value::Object(vec![("b".into(), int(1)), ("a".into(), int(2))]),
        "[1.0, 1.5, 0.1, 1e16, 1e-07, 1e100, -0.0]" => {
            Value::Array([1.0, 1.5, 0.1, 1e16, 1e-07, 1e100, -0.0].map(Value::from).to_vec())
        }
        "float('nan'), float('inf')" => {
            Value::Array([f64::NAN, f64::INFINITY, f64::NEG_INFINITY].map(Value::from).to_vec())
        }
        "2**64" => Value::Number(Number::Int("18446744073709551616".into())),
        "'é😀'" => s("é😀"),
        "'\\x00\\x1f\\x7f'" => s("\u{0}\u{1f}\u{7f}"),
        "'\\u2028\\u2029'" => s("\u{2028}\u{2029}"),
        "'a/b'" => s("a/b"),
        "'\\t\\n\\r\\b\\f'" => s("\t\n\r\u{8}\u{c}"),
        "{}" => Value::Object(vec![]),
        "[]" => Value::Array(vec![]),
        "{1: 'int key'}" => Value::Object(vec![("1".into(), s("int key"))]),
        _ => return None,
    })
}

#[test]
fn json_encoding_examples() {
    let doc = commands();
    let examples = doc
        .get("json_encoding")
        .and_then(|e| e.get("examples"))
        .and_then(Value::as_array)
        .expect("json_encoding.examples");
    assert!(examples.len() >= 16);
    for ex in examples {
        let python = str_field(ex, "python").expect("python");
        let want = str_field(ex, "json").expect("json");
        assert_eq!(reencode(want), want, "round trip of {python}");
        let value =
            python_example(python).unwrap_or_else(|| panic!("new example {python:?}: build it by hand here"));
        assert_eq!(String::from_utf8(json::to_vec(&value)).unwrap(), want, "encoding {python}");
        assert_eq!(json::parse(want.as_bytes()).unwrap(), value, "decoding {want}");
    }
}

#[test]
fn every_valid_json_text_reencodes_byte_identically() {
    let doc = commands();
    let mut checked = 0;
    for v in section(&doc, "valid") {
        let id = str_field(v, "id").unwrap_or("?");
        let line = str_field(v, "line").expect("line");
        let Some(text) = json_part(line) else {
            continue;
        };
        assert_eq!(reencode(text), text, "{id}");
        json::validate(text.as_bytes()).unwrap_or_else(|e| panic!("{id}: {e}"));
        // The decoded row equals the Python value the vector recorded.
        let fields = v.get("fields").expect("fields");
        let expected = fields.get("row").or_else(|| fields.get("keys"));
        if let Some(expected) = expected {
            assert_eq!(&json::parse(text.as_bytes()).unwrap(), expected, "{id}");
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} JSON-bearing valid lines");
}

#[test]
fn noncanonical_json_reencodes_to_the_canonical_line() {
    let doc = commands();
    let mut checked = 0;
    for v in section(&doc, "accepted_noncanonical") {
        let id = str_field(v, "id").unwrap_or("?");
        let (Some(line), Some(canonical)) = (str_field(v, "line"), str_field(v, "canonical_line")) else {
            continue;
        };
        let (Some(text), Some(want)) = (json_part(line), json_part(canonical)) else {
            continue;
        };
        assert_eq!(reencode(text), want, "{id}");
        json::validate(text.as_bytes()).unwrap_or_else(|e| panic!("{id}: {e}"));
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} noncanonical JSON lines");
}

#[test]
fn json_errors_read_as_simplejson_writes_them() {
    let doc = commands();
    let mut checked = 0;
    for v in section(&doc, "invalid") {
        let id = str_field(v, "id").unwrap_or("?");
        let Some(from_line) = v.get("from_line") else {
            continue;
        };
        if str_field(from_line, "raises") != Some("JSONDecodeError") {
            continue;
        }
        let want = str_field(from_line, "message").expect("message");
        let line = str_field(v, "line").or_else(|| str_field(v, "line_full")).expect("line");
        let text = json_part(line).expect("JSON part");
        let err = json::parse(text.as_bytes()).expect_err(id);
        assert_eq!(err.message, want, "{id}");
        assert_eq!(json::validate(text.as_bytes()).expect_err(id), err, "{id}");
        // The ERROR line Synapse sent embeds repr(exc).
        let sent = ["received_by_synapse_server", "received_by_synapse_client"]
            .iter()
            .filter_map(|k| v.get(k)?.get("sent_by_synapse")?.as_array())
            .flatten()
            .filter_map(Value::as_str)
            .find(|l| l.starts_with("ERROR "));
        if let Some(sent) = sent {
            assert!(sent.contains(&err.python_repr()), "{id}: {sent} lacks {}", err.python_repr());
        }
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} JSON error vectors");
}

#[test]
fn stream_sample_rows_reencode_byte_identically() {
    let sample = read_vector("stream-sample.txt");
    let text = std::str::from_utf8(&sample).expect("sample is UTF-8");
    let mut rows = 0;
    for line in text.lines().filter(|l| l.starts_with("RDATA ")) {
        let row = json_part(line).expect("RDATA has a row");
        assert_eq!(reencode(row), row, "{line}");
        json::validate(row.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e}"));
        rows += 1;
    }
    assert!(rows >= 3000, "only {rows} RDATA lines in the sample");
}
