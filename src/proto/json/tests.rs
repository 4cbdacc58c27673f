//! JSON tests: Python reference tables, simplejson error texts, and properties.
use super::error::py_str_repr;
use super::*;
use proptest::prelude::*;

fn enc(v: &Value) -> String {
    String::from_utf8(to_vec(v)).expect("ascii")
}

fn f64_repr(x: f64) -> String {
    let mut v = Vec::new();
    write_f64(&mut v, x);
    String::from_utf8(v).expect("ascii")
}

fn err(input: &str) -> String {
    parse(input.as_bytes()).expect_err(input).message
}

fn s(x: &str) -> Value {
    Value::from(x)
}

fn int(x: i64) -> Value {
    Value::from(x)
}

#[test]
#[allow(clippy::excessive_precision)] // the literals are the exact decimal values meant
fn python_float_repr_table() {
    // Every right-hand side is Python 3.11's repr(x).
    let table: &[(f64, &str)] = &[
        (0.1, "0.1"),
        (1.0, "1.0"),
        (1.5, "1.5"),
        (-1.5, "-1.5"),
        (100.0, "100.0"),
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (1e16, "1e+16"),
        (1e15, "1000000000000000.0"),
        (9999999999999998.0, "9999999999999998.0"),
        (1234567890123456.7, "1234567890123456.8"),
        (1e-4, "0.0001"),
        (1e-5, "1e-05"),
        (0.00012345, "0.00012345"),
        (1e-7, "1e-07"),
        (123456789012345680.0, "1.2345678901234568e+17"),
        (5e-324, "5e-324"),
        (2.2250738585072014e-308, "2.2250738585072014e-308"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (-1.7976931348623157e308, "-1.7976931348623157e+308"),
        (1e22, "1e+22"),
        (1e23, "1e+23"),
        (1e100, "1e+100"),
        (1.5e300, "1.5e+300"),
        (1e-100, "1e-100"),
        (0.3, "0.3"),
        (0.1 + 0.2, "0.30000000000000004"),
        (2.0 / 3.0, "0.6666666666666666"),
        (std::f64::consts::PI, "3.141592653589793"),
        (1583254800000.0, "1583254800000.0"),
        (0.5, "0.5"),
        (123.456, "123.456"),
        (-0.000123, "-0.000123"),
        (9.999999999999999e15, "1e+16"),
        (1.0000000000000002, "1.0000000000000002"),
        (4.35, "4.35"),
        (1e21, "1e+21"),
        (12345678.9, "12345678.9"),
        (f64::NAN, "NaN"),
        (f64::INFINITY, "Infinity"),
        (f64::NEG_INFINITY, "-Infinity"),
        (2f64.powi(53), "9007199254740992.0"),
        (2f64.powi(60), "1.152921504606847e+18"),
        (f64::EPSILON, "2.220446049250313e-16"),
        // Exact ties between two shortest candidates: Python rounds half to even.
        (996219154410990.25, "996219154410990.2"),
        (1608882928643910.25, "1608882928643910.2"),
        (-1810343442499578.25, "-1810343442499578.2"),
        (649452691699634.25, "649452691699634.2"),
    ];
    for (x, want) in table {
        assert_eq!(f64_repr(*x), *want, "repr of {x:e}");
    }
}

#[test]
fn json_encoding_examples() {
    // The `json_encoding.examples` of commands.json, built by hand.
    assert_eq!(enc(&Value::Null), "null");
    assert_eq!(enc(&Value::Bool(true)), "true");
    assert_eq!(enc(&Value::Array(vec![int(1), int(2)])), "[1, 2]");
    assert_eq!(enc(&Value::Array(vec![int(1), s("x")])), "[1, \"x\"]");
    assert_eq!(enc(&Value::Object(vec![("b".into(), int(1)), ("a".into(), int(2))])), "{\"b\": 1, \"a\": 2}");
    let floats = [1.0, 1.5, 0.1, 1e16, 1e-07, 1e100, -0.0].map(Value::from);
    assert_eq!(enc(&Value::Array(floats.to_vec())), "[1.0, 1.5, 0.1, 1e+16, 1e-07, 1e+100, -0.0]");
    let specials = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY].map(Value::from);
    assert_eq!(enc(&Value::Array(specials.to_vec())), "[NaN, Infinity, -Infinity]");
    assert_eq!(enc(&Value::Number(Number::Int("18446744073709551616".into()))), "18446744073709551616");
    assert_eq!(enc(&s("é😀")), "\"\\u00e9\\ud83d\\ude00\"");
    assert_eq!(enc(&s("\u{0}\u{1f}\u{7f}")), "\"\\u0000\\u001f\\u007f\"");
    assert_eq!(enc(&s("\u{2028}\u{2029}")), "\"\\u2028\\u2029\"");
    assert_eq!(enc(&s("a/b")), "\"a/b\"");
    assert_eq!(enc(&s("\t\n\r\u{8}\u{c}")), "\"\\t\\n\\r\\b\\f\"");
    assert_eq!(enc(&Value::Object(vec![])), "{}");
    assert_eq!(enc(&Value::Array(vec![])), "[]");
    assert_eq!(enc(&Value::Object(vec![("1".into(), s("int key"))])), "{\"1\": \"int key\"}");
}

#[test]
fn integers() {
    let mut v = Vec::new();
    for x in [0, 1, -1, 9, 10, i64::MAX, i64::MIN, 1583254800000] {
        v.clear();
        write_i64(&mut v, x);
        assert_eq!(v, x.to_string().as_bytes());
    }
    v.clear();
    write_u64(&mut v, u64::MAX);
    assert_eq!(v, b"18446744073709551615");
}

#[test]
fn escapes_in_long_strings() {
    // The chunked scan must find escapes at every offset, not only at block starts.
    for pos in 0..40 {
        let mut st = "a".repeat(40);
        st.replace_range(pos..=pos, "\"");
        let out = enc(&s(&st));
        assert_eq!(out.len(), 40 + 3, "{out}");
        assert_eq!(&out[pos + 1..pos + 3], "\\\"");
    }
    assert_eq!(enc(&s(&"b".repeat(33))), format!("\"{}\"", "b".repeat(33)));
    assert_eq!(enc(&s("😀😀")), "\"\\ud83d\\ude00\\ud83d\\ude00\"");
    assert_eq!(enc(&s("\u{ffff}\u{10000}\u{10ffff}")), "\"\\uffff\\ud800\\udc00\\udbff\\udfff\"");
    assert_eq!(enc(&s("~\u{80}")), "\"~\\u0080\"");
}

#[test]
fn parses_python_accepted_forms() {
    assert_eq!(parse(b" \t\r\n[1] \n").unwrap(), Value::Array(vec![int(1)]));
    assert_eq!(parse(b"-0").unwrap(), int(0));
    assert_eq!(parse(b"-0.0").unwrap(), Value::from(-0.0));
    assert_eq!(parse(b"1E5").unwrap(), Value::from(100000.0));
    assert_eq!(parse(b"1e400").unwrap(), Value::from(f64::INFINITY));
    assert_eq!(
        parse(b"99999999999999999999999").unwrap(),
        Value::Number(Number::Int("99999999999999999999999".into()))
    );
    assert_eq!(parse(b"-Infinity").unwrap(), Value::from(f64::NEG_INFINITY));
    assert_eq!(parse(b"\"\\ud83d\\ude00\\u00E9\\/\"").unwrap(), s("😀é/"));
    assert_eq!(parse("\"raw ü\u{7f}\"".as_bytes()).unwrap(), s("raw ü\u{7f}"));
    assert_eq!(parse(b"\"\\ud800\"").unwrap(), s("\u{fffd}"));
    assert_eq!(parse(b"\"\\ude00\\ud83d\"").unwrap(), s("\u{fffd}\u{fffd}"));
    assert_eq!(parse(b"\"\\ud800\\ud800\\udc00\"").unwrap(), s("\u{fffd}\u{10000}"));
    assert_eq!(parse("\u{feff}[1]".as_bytes()).unwrap(), Value::Array(vec![int(1)]));
    let dup = parse(br#"{"a":1,"b":2,"a":3}"#).unwrap();
    assert_eq!(dup, Value::Object(vec![("a".into(), int(3)), ("b".into(), int(2))]));
    let many: String = (0..40).map(|i| format!("\"k{}\": {i}, ", i % 20)).collect();
    let many = parse(format!("{{{many}\"k0\": -1}}").as_bytes()).unwrap();
    let m = many.as_object().unwrap();
    assert_eq!(m.len(), 20);
    assert_eq!(m[0], ("k0".to_owned(), int(-1)));
    assert_eq!(m[19], ("k19".to_owned(), int(39)));
}

#[test]
fn error_messages_match_simplejson() {
    // Messages as simplejson 3.17 (C speedups) raises them.
    let cases: &[(&str, &str)] = &[
        ("", "Expecting value: line 1 column 1 (char 0)"),
        (" ", "Expecting value: line 1 column 2 (char 1)"),
        ("[", "Expecting value or ']': line 1 column 2 (char 1)"),
        ("]", "Expecting value: line 1 column 1 (char 0)"),
        ("[1,", "Expecting value: line 1 column 4 (char 3)"),
        ("[1, ", "Expecting value: line 1 column 5 (char 4)"),
        ("[1 2]", "Expecting ',' delimiter or ']': line 1 column 4 (char 3)"),
        ("[\"f\", null, 1", "Expecting ',' delimiter or ']': line 1 column 14 (char 13)"),
        ("[\"f\", null, 1] x", "Extra data: line 1 column 16 - line 1 column 17 (char 15 - 16)"),
        ("{", "Expecting property name enclosed in double quotes or '}': line 1 column 2 (char 1)"),
        ("{ ", "Expecting property name enclosed in double quotes or '}': line 1 column 3 (char 2)"),
        ("{  x", "Expecting property name enclosed in double quotes: line 1 column 4 (char 3)"),
        ("{\"a\"", "Expecting ':' delimiter: line 1 column 5 (char 4)"),
        ("{\"a\" 1}", "Expecting ':' delimiter: line 1 column 6 (char 5)"),
        ("{\"a\":", "Expecting value: line 1 column 6 (char 5)"),
        ("{\"a\":1", "Expecting ',' delimiter or '}': line 1 column 7 (char 6)"),
        ("{\"a\":1,", "Expecting property name enclosed in double quotes: line 1 column 8 (char 7)"),
        ("{\"a\":1, }", "Expecting property name enclosed in double quotes: line 1 column 9 (char 8)"),
        ("{\"a\":1 \"b\"}", "Expecting ',' delimiter or '}': line 1 column 8 (char 7)"),
        ("{1:2}", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ("[,]", "Expecting value: line 1 column 2 (char 1)"),
        ("[1,]", "Expecting value: line 1 column 4 (char 3)"),
        ("\"abc", "Unterminated string starting at: line 1 column 1 (char 0)"),
        ("\"a\u{1}b\"", "Invalid control character '\\x01' at: line 1 column 3 (char 2)"),
        ("\"a\nb\"", "Invalid control character '\\n' at: line 1 column 3 (char 2)"),
        ("\"\t\"", "Invalid control character '\\t' at: line 1 column 2 (char 1)"),
        ("\"\\x\"", "Invalid \\X escape sequence '\\\\': line 1 column 2 (char 1)"),
        ("\"é\\q\"", "Invalid \\X escape sequence '\\\\': line 1 column 3 (char 2)"),
        ("\"\\u12\"", "Invalid \\uXXXX escape sequence: line 1 column 3 (char 2)"),
        ("\"\\u0041", "Invalid \\uXXXX escape sequence: line 1 column 3 (char 2)"),
        ("\"\\ud83d\\ude00", "Invalid \\uXXXX escape sequence: line 1 column 9 (char 8)"),
        ("\"\\ud83d\\uzzzz\"", "Invalid \\uXXXX escape sequence: line 1 column 9 (char 8)"),
        ("\"\\ud83d\\ude00x", "Unterminated string starting at: line 1 column 1 (char 0)"),
        ("\"\\ud800\\\"", "Unterminated string starting at: line 1 column 1 (char 0)"),
        ("[\"a\", \"b\\", "Unterminated string starting at: line 1 column 7 (char 6)"),
        ("01", "Extra data: line 1 column 2 - line 1 column 3 (char 1 - 2)"),
        ("-", "Expecting value: line 1 column 1 (char 0)"),
        ("-a", "Expecting value: line 1 column 2 (char 1)"),
        ("[-]", "Expecting value: line 1 column 3 (char 2)"),
        ("1.", "Extra data: line 1 column 2 - line 1 column 3 (char 1 - 2)"),
        ("1.e5", "Extra data: line 1 column 2 - line 1 column 5 (char 1 - 4)"),
        ("[1.5e+]", "Expecting ',' delimiter or ']': line 1 column 5 (char 4)"),
        (".5", "Expecting value: line 1 column 1 (char 0)"),
        ("nan", "Expecting value: line 1 column 1 (char 0)"),
        ("-NaN", "Expecting value: line 1 column 2 (char 1)"),
        ("tru", "Expecting value: line 1 column 1 (char 0)"),
        ("[True]", "Expecting value: line 1 column 2 (char 1)"),
        ("[NaNx]", "Expecting ',' delimiter or ']': line 1 column 5 (char 4)"),
        ("[1]\n\n x", "Extra data: line 3 column 2 - line 3 column 3 (char 6 - 7)"),
        ("\n\n[1,\n 2 x]", "Expecting ',' delimiter or ']': line 4 column 4 (char 9)"),
        ("[1,\r\n2 3]", "Expecting ',' delimiter or ']': line 2 column 3 (char 7)"),
        ("\"é\" x", "Extra data: line 1 column 5 - line 1 column 6 (char 4 - 5)"),
        ("[\"é☃😀\" x]", "Expecting ',' delimiter or ']': line 1 column 8 (char 7)"),
        ("\u{feff}", "Expecting value: line 1 column 2 (char 1)"),
        ("\u{feff}[1", "Expecting ',' delimiter or ']': line 1 column 4 (char 3)"),
        (" \u{feff}[1]", "Expecting value: line 1 column 2 (char 1)"),
        ("[1]\u{a0}", "Extra data: line 1 column 4 - line 1 column 5 (char 3 - 4)"),
        ("[\n", "Expecting value or ']': line 2 column 1 (char 2)"),
        ("{\"a\":1,\"b\":[1,{\"c\":tru}]}", "Expecting value: line 1 column 20 (char 19)"),
    ];
    for (input, want) in cases {
        assert_eq!(err(input), *want, "input {input:?}");
    }
}

#[test]
fn python_repr_of_errors() {
    let e = parse(br#"["@a:example.com""#).unwrap_err();
    assert_eq!(
        e.python_repr(),
        "JSONDecodeError(\"Expecting ',' delimiter or ']': line 1 column 18 (char 17)\")"
    );
    let e = parse(br#"["f", null, 1] x"#).unwrap_err();
    assert_eq!(
        e.python_repr(),
        "JSONDecodeError('Extra data: line 1 column 16 - line 1 column 17 (char 15 - 16)')"
    );
    let e = parse(br#""\x""#).unwrap_err();
    assert_eq!(
        e.python_repr(),
        r#"JSONDecodeError("Invalid \\X escape sequence '\\\\': line 1 column 2 (char 1)")"#
    );
    assert_eq!(py_str_repr("a'b\"c"), r#"'a\'b"c'"#);
    assert_eq!(py_str_repr("x\u{1}\u{7f}é\u{2028}"), "'x\\x01\\x7fé\\u2028'");
}

#[test]
fn invalid_utf8_is_an_error() {
    assert_eq!(
        err_bytes(b"[\"\xff\"]"),
        "'utf-8' codec can't decode byte 0xff in position 2: invalid start byte"
    );
    assert_eq!(
        err_bytes(b"[\"\xc3\x28\"]"),
        "'utf-8' codec can't decode byte 0xc3 in position 2: invalid continuation byte"
    );
    assert_eq!(
        err_bytes(b"\"\xe2\x82"),
        "'utf-8' codec can't decode byte 0xe2 in position 1: unexpected end of data"
    );
}

fn err_bytes(b: &[u8]) -> String {
    parse(b).unwrap_err().message
}

#[test]
fn depth_limit() {
    let nest = |d: usize| format!("{}1{}", "[".repeat(d), "]".repeat(d));
    assert!(parse(nest(MAX_DEPTH).as_bytes()).is_ok());
    assert!(validate(nest(MAX_DEPTH).as_bytes()).is_ok());
    let e = parse(nest(MAX_DEPTH + 1).as_bytes()).unwrap_err();
    assert!(e.message.starts_with("maximum nesting depth (128) exceeded"), "{e}");
    assert!(validate(nest(MAX_DEPTH + 1).as_bytes()).is_err());
    let objs = format!("{}1{}", "{\"a\":".repeat(MAX_DEPTH + 1), "}".repeat(MAX_DEPTH + 1));
    assert!(parse(objs.as_bytes()).is_err());
    assert!(validate(objs.as_bytes()).is_err());
    // Far beyond any stack: still an error, not a crash.
    assert!(parse("[".repeat(1_000_000).as_bytes()).is_err());
    assert!(validate("[".repeat(1_000_000).as_bytes()).is_err());
    // Many brackets inside strings do not count.
    let wide = format!("[\"{}\", {}]", "[".repeat(500), "[1], ".repeat(300) + "[]");
    assert!(validate(wide.as_bytes()).is_ok());
}

#[test]
fn validate_agrees_with_parse_on_edge_cases() {
    let cases: &[&[u8]] = &[
        b"[1, 2]",
        b"[NaN, Infinity, -Infinity]",
        b"123456789012345678901234567890",
        b"-123456789012345678901234567890.5e-3",
        b"\"\\ud800\"",
        "\u{feff}{}".as_bytes(),
        b"",
        b" ",
        b"[1,]",
        b"{\"a\":1,}",
        b"01",
        b"1.",
        b"-",
        b"[1] x",
        b"\"a\x01\"",
        b"\"\\x\"",
        b"[\"\xff\"]",
        b"\x0c[1]",
        b"[1]\x0c",
        b"\"\x7f\"",
        b"{\"a\" 1}",
        b"tru",
        b"nul",
        b"[1e5, 1E+5, 1e-5, -0, -0.0]",
        b"\"\\u00zz\"",
        b"{\"a\":1,\"a\":2}",
        b"\"",
        b"[\"\\",
    ];
    for c in cases {
        assert_eq!(validate(c).is_ok(), parse(c).is_ok(), "{:?}", String::from_utf8_lossy(c));
        if let Err(e) = validate(c) {
            assert_eq!(e, parse(c).unwrap_err());
        }
    }
}

fn same(a: &Value, b: &Value) -> bool {
    a == b
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "-?[1-9][0-9]{18,40}".prop_map(|d| Value::Number(Number::Int(d))),
        any::<f64>().prop_map(Value::from),
        prop_oneof![Just(f64::NAN), Just(-0.0), Just(5e-324), Just(1e16), Just(1e-5)].prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[ -~]{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..8).prop_map(|m| {
                // Python dicts cannot hold a key twice: keep the first of each.
                let mut seen = std::collections::HashSet::new();
                Value::Object(m.into_iter().filter(|(k, _)| seen.insert(k.clone())).collect())
            }),
        ]
    })
}

proptest! {
    #[test]
    fn encode_parse_round_trip(v in arb_value()) {
        let bytes = to_vec(&v);
        prop_assert!(bytes.iter().all(|&b| (0x20..0x7f).contains(&b)), "{:?}", bytes);
        let back = parse(&bytes).map_err(|e| TestCaseError::fail(e.message))?;
        prop_assert!(same(&back, &v), "{:?} != {:?}", back, v);
        prop_assert!(validate(&bytes).is_ok());
        prop_assert_eq!(to_vec(&back), bytes);
    }

    #[test]
    fn floats_round_trip_and_follow_repr_rules(bits in any::<u64>()) {
        let x = f64::from_bits(bits);
        let r = f64_repr(x);
        let back = parse(r.as_bytes()).map_err(|e| TestCaseError::fail(e.message))?;
        prop_assert!(same(&back, &Value::from(x)), "{} -> {:?}", r, back);
        if x.is_finite() {
            let a = x.abs();
            let fixed = a == 0.0 || (1e-4..1e16).contains(&a);
            prop_assert_eq!(fixed, !r.contains('e'), "{}", r);
            prop_assert!(r.contains('.') || r.contains('e'), "{}", r);
            if let Some((_, e)) = r.split_once('e') {
                prop_assert!(e.starts_with('+') || e.starts_with('-'));
                prop_assert!(e.len() >= 3);
            }
        }
    }

    #[test]
    fn validate_agrees_with_parse(v in arb_value(), cut in any::<prop::sample::Index>(),
                                  junk in prop::sample::select(vec![
                                      "", ",", "]", "}", "\"", "\\", "x", " ", "\u{1}", "01",
                                      "[", "{", ":", "-", "e", ".", "\u{e9}", "NaN",
                                  ]), mode in 0u8..3) {
        let mut text = String::from_utf8(to_vec(&v)).expect("ascii");
        let at = cut.index(text.len() + 1);
        match mode {
            0 => text.insert_str(at, junk),
            1 => text.truncate(at),
            _ => { text.replace_range(at..(at + 1).min(text.len()), junk); }
        }
        let p = parse(text.as_bytes());
        let q = validate(text.as_bytes());
        prop_assert_eq!(p.is_ok(), q.is_ok(), "{:?}", text);
        if let (Err(a), Err(b)) = (p, q) {
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = parse(&bytes);
        let _ = validate(&bytes);
    }

    #[test]
    fn parse_agrees_with_serde_json_on_standard_json(v in arb_value()) {
        // serde_json (arbitrary_precision, preserve_order) as an independent decoder: for
        // input without NaN/Infinity both must accept, with the same strings and digits.
        let bytes = to_vec(&v);
        let text = String::from_utf8(bytes.clone()).expect("ascii");
        if !text.contains("NaN") && !text.contains("Infinity") {
            let sj: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(parse(&bytes).is_ok());
            let compact = serde_json::to_vec(&sj).expect("serialize");
            let ours = parse(&compact).map_err(|e| TestCaseError::fail(e.message))?;
            prop_assert_eq!(to_vec(&ours), bytes);
        }
    }
}
