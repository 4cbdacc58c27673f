//! Synapse-compatible JSON (simplejson 3.17 defaults, PROTOCOL.md §2.3).
//!
//! Synapse writes every row with `simplejson.JSONEncoder(namedtuple_as_object=False)`, and a
//! worker compares nothing byte for byte, but replhub's own rows (the synthetic master, cache
//! invalidations it originates) must be indistinguishable from the master's. So:
//!
//! * **Encoding** ([`encode`], [`to_vec`] and the `write_*` primitives) reproduces simplejson
//!   exactly: `", "` and `": "` separators, insertion-ordered keys, `ensure_ascii` escaping with
//!   lowercase `\uXXXX` and surrogate pairs, floats in Python `repr` form, bare `NaN` /
//!   `Infinity` / `-Infinity`, arbitrary-precision integers. Output is pure ASCII with no raw
//!   newline, so it can always sit inside one protocol line.
//! * **Decoding** ([`parse`]) has `json.loads` semantics as Synapse runs it (simplejson's C
//!   scanner): surrounding whitespace is allowed, trailing data is an error, `NaN` and the
//!   infinities are accepted, integers keep every digit, duplicate keys keep the last value at
//!   the first key's position, and error messages match simplejson's text and positions
//!   (`Expecting ',' delimiter or ']': line 1 column 18 (char 17)`), counted in code points.
//!   Two deliberate differences: nesting deeper than [`MAX_DEPTH`] is an error (Python would
//!   go on to about 1000 levels), and a lone UTF-16 surrogate escape (`"\ud800"`), which
//!   Python keeps in its `str`, becomes U+FFFD because a Rust `String` cannot hold it; such
//!   input is accepted, but does not re-encode to the same bytes.
//! * **Validation** ([`validate`]) answers "would `json.loads` accept this?" quickly: simd-json
//!   first, and [`parse`] only when simd-json says no (it rejects some input the reference
//!   accepts: big integers, `NaN`, lone surrogates, a BOM).
use std::cell::RefCell;
use std::fmt::Write as _;

use bytes::BufMut;

/// Deepest nesting of arrays and objects [`parse`] and [`validate`] accept.
pub const MAX_DEPTH: usize = 128;

/// A JSON value as Python holds it after `json.loads`.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A number: an integer of any size or a float.
    Number(Number),
    /// A string.
    String(String),
    /// An array (or a Python tuple).
    Array(Vec<Self>),
    /// An object, in insertion order. [`parse`] never yields duplicate keys; a hand-built
    /// object with duplicates is encoded as it stands.
    Object(Vec<(String, Self)>),
}

/// A JSON number, split the way Python splits it: `int` or `float`.
///
/// Equality compares floats by bit pattern, so `-0.0 != 0.0` and `NaN == NaN` (any NaN),
/// which is what "re-encodes identically" needs.
#[derive(Clone, Debug)]
pub enum Number {
    /// An integer: canonical decimal digits with an optional leading `-` (no `+`, no leading
    /// zeros, never `-0`), any size.
    Int(String),
    /// A float (Python `float`, IEEE 754 double).
    Float(f64),
}

impl PartialEq for Number {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Int(a), Self::Int(b)) => a == b,
            (Self::Float(a), Self::Float(b)) => a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
            _ => false,
        }
    }
}

impl Number {
    /// The integer as an `i64`, if it is one and fits.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Self::Int(s) => s.parse().ok(),
            Self::Float(_) => None,
        }
    }
}

impl From<i64> for Number {
    fn from(v: i64) -> Self {
        Self::Int(v.to_string())
    }
}

impl From<u64> for Number {
    fn from(v: u64) -> Self {
        Self::Int(v.to_string())
    }
}

impl From<f64> for Number {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}

impl Value {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The items, if this is an array.
    pub fn as_array(&self) -> Option<&[Self]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The members, if this is an object.
    pub fn as_object(&self) -> Option<&[(String, Self)]> {
        match self {
            Self::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The integer, if this is an integer that fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Self::Number(n) => n.as_i64(),
            _ => None,
        }
    }

    /// Whether this is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }

    /// The value of `key` (the first one, should a hand-built object repeat it), if this is an
    /// object that has it.
    pub fn get(&self, key: &str) -> Option<&Self> {
        self.as_object()?.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Self::String(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Self::String(s)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Self::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Number(v.into())
    }
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Self::Number(v.into())
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self::Number(v.into())
    }
}

impl From<Vec<Self>> for Value {
    fn from(v: Vec<Self>) -> Self {
        Self::Array(v)
    }
}

impl<T: Into<Self>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::Null, Into::into)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Input that `json.loads` would reject. `message` is simplejson's text, e.g.
/// `Expecting value: line 1 column 1 (char 0)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JsonError {
    /// The message, as Python's `str(exc)`.
    pub message: String,
}

impl JsonError {
    /// Python's `repr(exc)`: `JSONDecodeError('…')`, quoted the way Python quotes a str (with
    /// `"` when the message contains `'` and no `"`). This is the `<detail>` of an
    /// `ERROR failed to parse line for …` reply (PROTOCOL.md §1.1 step 8).
    pub fn python_repr(&self) -> String {
        format!("JSONDecodeError({})", py_str_repr(&self.message))
    }
}

/// Python's `repr()` of a str. Non-printable characters are escaped for the code points a
/// JSON error message can contain (controls, and the usual invisible ones); other non-ASCII
/// text is kept as Python 3 keeps it.
fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut r = String::with_capacity(s.len() + 2);
    r.push(quote);
    for c in s.chars() {
        let cp = c as u32;
        match c {
            '\\' => r.push_str("\\\\"),
            '\n' => r.push_str("\\n"),
            '\r' => r.push_str("\\r"),
            '\t' => r.push_str("\\t"),
            _ if c == quote => {
                r.push('\\');
                r.push(c);
            }
            _ if cp < 0x20 || (0x7f..0xa1).contains(&cp) || cp == 0xad => {
                let _ = write!(r, "\\x{cp:02x}");
            }
            _ if is_py_unprintable(cp) => {
                if cp < 0x10000 {
                    let _ = write!(r, "\\u{cp:04x}");
                } else {
                    let _ = write!(r, "\\U{cp:08x}");
                }
            }
            _ => r.push(c),
        }
    }
    r.push(quote);
    r
}

/// The non-ASCII code points Python's `str.isprintable()` rejects that matter in practice
/// (separators, format characters, private use, non-characters); not the full Unicode table.
fn is_py_unprintable(cp: u32) -> bool {
    matches!(cp,
        0x1680 | 0x180e | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x206f | 0x3000
        | 0xe000..=0xf8ff | 0xfeff | 0xfff9..=0xfffb | 0xfffe | 0xffff
        | 0xf0000..=0x10ffff)
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

const ERR_EXPECTING_VALUE: &str = "Expecting value";
const ERR_ARRAY_DELIMITER: &str = "Expecting ',' delimiter or ']'";
const ERR_ARRAY_VALUE_FIRST: &str = "Expecting value or ']'";
const ERR_OBJECT_DELIMITER: &str = "Expecting ',' delimiter or '}'";
const ERR_OBJECT_PROPERTY: &str = "Expecting property name enclosed in double quotes";
const ERR_OBJECT_PROPERTY_FIRST: &str = "Expecting property name enclosed in double quotes or '}'";
const ERR_OBJECT_PROPERTY_DELIMITER: &str = "Expecting ':' delimiter";
const ERR_STRING_UNTERMINATED: &str = "Unterminated string starting at";
const ERR_STRING_ESC1: &str = "Invalid \\X escape sequence '\\\\'";
const ERR_STRING_ESC4: &str = "Invalid \\uXXXX escape sequence";

/// Parses one JSON document with Python `json.loads` semantics (see the module docs).
///
/// The input must be UTF-8 (Synapse decodes the line before parsing; an invalid byte is
/// reported the way Python's decoder words it).
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    let text = std::str::from_utf8(bytes).map_err(|e| utf8_error(bytes, &e))?;
    let mut p = Parser { text, s: text.as_bytes(), depth: 0 };
    let mut i = 0;
    // simplejson's raw_decode strips one BOM, as U+FEFF or as its three Latin-1 characters.
    if p.s.starts_with("\u{feff}".as_bytes()) {
        i = 3;
    } else if p.s.starts_with("\u{ef}\u{bb}\u{bf}".as_bytes()) {
        i = 6;
    }
    i = p.skip_ws(i);
    let (value, end) = p.value(i)?;
    let end = p.skip_ws(end);
    if end != p.s.len() {
        return Err(p.err_range("Extra data", end, p.s.len()));
    }
    Ok(value)
}

fn utf8_error(bytes: &[u8], e: &std::str::Utf8Error) -> JsonError {
    let pos = e.valid_up_to();
    let byte = bytes.get(pos).copied().unwrap_or(0);
    let reason = match e.error_len() {
        None => "unexpected end of data",
        Some(_) if matches!(byte, 0x80..=0xc1 | 0xf5..=0xff) => "invalid start byte",
        Some(_) => "invalid continuation byte",
    };
    JsonError { message: format!("'utf-8' codec can't decode byte 0x{byte:02x} in position {pos}: {reason}") }
}

struct Parser<'a> {
    text: &'a str,
    s: &'a [u8],
    depth: usize,
}

#[inline]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Parser<'_> {
    #[inline]
    fn skip_ws(&self, mut i: usize) -> usize {
        while i < self.s.len() && is_ws(self.s[i]) {
            i += 1;
        }
        i
    }

    #[inline]
    fn at(&self, i: usize) -> Option<u8> {
        self.s.get(i).copied()
    }

    /// Code-point index of byte offset `pos` (Python positions count characters).
    fn char_index(&self, pos: usize) -> usize {
        self.s[..pos.min(self.s.len())].iter().filter(|&&b| (b as i8) >= -0x40).count()
    }

    /// simplejson's `linecol` + `pos`, all in characters.
    fn linecol(&self, pos: usize) -> (usize, usize, usize) {
        let pos = pos.min(self.s.len());
        let cpos = self.char_index(pos);
        let prefix = &self.s[..pos];
        let line = prefix.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = match memchr::memrchr(b'\n', prefix) {
            None => cpos + 1,
            Some(nl) => cpos - self.char_index(nl),
        };
        (line, col, cpos)
    }

    #[cold]
    fn err(&self, msg: &str, pos: usize) -> JsonError {
        let (line, col, cpos) = self.linecol(pos);
        JsonError { message: format!("{msg}: line {line} column {col} (char {cpos})") }
    }

    #[cold]
    fn err_range(&self, msg: &str, pos: usize, end: usize) -> JsonError {
        let (line, col, cpos) = self.linecol(pos);
        let (eline, ecol, ecpos) = self.linecol(end);
        JsonError {
            message: format!(
                "{msg}: line {line} column {col} - line {eline} column {ecol} (char {cpos} - {ecpos})"
            ),
        }
    }

    #[cold]
    fn err_control(&self, pos: usize) -> JsonError {
        let c = self.s[pos];
        let r = match c {
            b'\n' => "'\\n'".to_owned(),
            b'\r' => "'\\r'".to_owned(),
            b'\t' => "'\\t'".to_owned(),
            _ => format!("'\\x{c:02x}'"),
        };
        self.err(&format!("Invalid control character {r} at"), pos)
    }

    #[cold]
    fn err_depth(&self, pos: usize, what: &str) -> JsonError {
        let (line, col, cpos) = self.linecol(pos);
        JsonError {
            message: format!(
                "maximum nesting depth ({MAX_DEPTH}) exceeded while decoding a JSON {what}: \
                 line {line} column {col} (char {cpos})"
            ),
        }
    }

    /// One value starting exactly at `i` (whitespace already skipped); returns it and the
    /// offset just after it. Mirrors simplejson's `scan_once_unicode`.
    fn value(&mut self, i: usize) -> Result<(Value, usize), JsonError> {
        let s = self.s;
        let Some(c) = self.at(i) else {
            return Err(self.err(ERR_EXPECTING_VALUE, i));
        };
        match c {
            b'"' => {
                let (st, end) = self.string(i + 1)?;
                return Ok((Value::String(st), end));
            }
            b'{' => return self.object(i + 1),
            b'[' => return self.array(i + 1),
            b'n' if s[i..].starts_with(b"null") => return Ok((Value::Null, i + 4)),
            b't' if s[i..].starts_with(b"true") => return Ok((Value::Bool(true), i + 4)),
            b'f' if s[i..].starts_with(b"false") => return Ok((Value::Bool(false), i + 5)),
            b'N' if s[i..].starts_with(b"NaN") => {
                return Ok((Value::Number(Number::Float(f64::NAN)), i + 3));
            }
            b'I' if s[i..].starts_with(b"Infinity") => {
                return Ok((Value::Number(Number::Float(f64::INFINITY)), i + 8));
            }
            b'-' if s[i..].starts_with(b"-Infinity") => {
                return Ok((Value::Number(Number::Float(f64::NEG_INFINITY)), i + 9));
            }
            _ => {}
        }
        self.number(i)
    }

    /// simplejson's `_match_number_unicode`, including where it reports "Expecting value".
    fn number(&self, start: usize) -> Result<(Value, usize), JsonError> {
        let s = self.s;
        let len = s.len();
        let mut i = start;
        if s[i] == b'-' {
            if i + 1 >= len {
                return Err(self.err(ERR_EXPECTING_VALUE, i));
            }
            i += 1;
        }
        match s[i] {
            b'0' => i += 1,
            b'1'..=b'9' => {
                i += 1;
                while i < len && s[i].is_ascii_digit() {
                    i += 1;
                }
            }
            _ => return Err(self.err(ERR_EXPECTING_VALUE, i)),
        }
        let mut is_float = false;
        if i + 1 < len && s[i] == b'.' && s[i + 1].is_ascii_digit() {
            is_float = true;
            i += 2;
            while i < len && s[i].is_ascii_digit() {
                i += 1;
            }
        }
        if i + 1 < len && (s[i] == b'e' || s[i] == b'E') {
            let e_start = i;
            i += 1;
            if i + 1 < len && (s[i] == b'-' || s[i] == b'+') {
                i += 1;
            }
            while i < len && s[i].is_ascii_digit() {
                i += 1;
            }
            if s[i - 1].is_ascii_digit() {
                is_float = true;
            } else {
                i = e_start;
            }
        }
        let text = &self.text[start..i];
        let n = if is_float {
            match text.parse::<f64>() {
                Ok(f) => Number::Float(f),
                Err(_) => return Err(self.err(ERR_EXPECTING_VALUE, start)),
            }
        } else if text == "-0" {
            Number::Int("0".to_owned())
        } else {
            Number::Int(text.to_owned())
        };
        Ok((Value::Number(n), i))
    }

    /// A string whose opening quote is at `start - 1`; mirrors `scanstring_unicode` (strict).
    fn string(&self, start: usize) -> Result<(String, usize), JsonError> {
        let s = self.s;
        let len = s.len();
        let begin = start - 1;
        let mut out: Option<String> = None;
        let mut end = start;
        loop {
            let mut next = end;
            let c = loop {
                let Some(&b) = s.get(next) else {
                    return Err(self.err(ERR_STRING_UNTERMINATED, begin));
                };
                if b == b'"' || b == b'\\' {
                    break b;
                }
                if b < 0x20 {
                    return Err(self.err_control(next));
                }
                next += 1;
            };
            // Both ends are at ASCII bytes, so this slice is on character boundaries.
            let chunk = &self.text[end..next];
            next += 1;
            if c == b'"' {
                let st = match out {
                    None => chunk.to_owned(),
                    Some(mut o) => {
                        o.push_str(chunk);
                        o
                    }
                };
                return Ok((st, next));
            }
            let o = out.get_or_insert_with(String::new);
            o.push_str(chunk);
            let Some(&esc) = s.get(next) else {
                return Err(self.err(ERR_STRING_UNTERMINATED, begin));
            };
            if esc != b'u' {
                end = next + 1;
                let ch = match esc {
                    b'"' => '"',
                    b'\\' => '\\',
                    b'/' => '/',
                    b'b' => '\u{8}',
                    b'f' => '\u{c}',
                    b'n' => '\n',
                    b'r' => '\r',
                    b't' => '\t',
                    _ => return Err(self.err(ERR_STRING_ESC1, end - 2)),
                };
                o.push(ch);
                continue;
            }
            next += 1;
            end = next + 4;
            if end >= len {
                return Err(self.err(ERR_STRING_ESC4, next - 1));
            }
            let Some(mut cp) = hex4(&s[next..end]) else {
                return Err(self.err(ERR_STRING_ESC4, end - 5));
            };
            next = end;
            if cp & 0xfc00 == 0xd800 && end + 6 < len && s[next] == b'\\' && s[next + 1] == b'u' {
                let Some(lo) = hex4(&s[next + 2..next + 6]) else {
                    return Err(self.err(ERR_STRING_ESC4, next + 1));
                };
                if lo & 0xfc00 == 0xdc00 {
                    cp = 0x10000 + (((cp - 0xd800) << 10) | (lo - 0xdc00));
                    end += 6;
                }
            }
            // A lone surrogate (which Python would keep) cannot live in a Rust string.
            o.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
        }
    }

    fn enter(&mut self, pos: usize, what: &str) -> Result<(), JsonError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.err_depth(pos, what));
        }
        self.depth += 1;
        Ok(())
    }

    /// An array whose `[` is at `i - 1`; mirrors `_parse_array_unicode`.
    fn array(&mut self, i: usize) -> Result<(Value, usize), JsonError> {
        self.enter(i - 1, "array")?;
        let mut items = Vec::new();
        let mut i = self.skip_ws(i);
        if self.at(i).is_some_and(|c| c != b']') {
            let mut trailing_delimiter = false;
            while i < self.s.len() {
                trailing_delimiter = false;
                let (v, next) = self.value(i)?;
                items.push(v);
                i = self.skip_ws(next);
                match self.at(i) {
                    None | Some(b']') => break,
                    Some(b',') => {}
                    Some(_) => return Err(self.err(ERR_ARRAY_DELIMITER, i)),
                }
                i = self.skip_ws(i + 1);
                trailing_delimiter = true;
            }
            if trailing_delimiter {
                return Err(self.err(ERR_EXPECTING_VALUE, i));
            }
        }
        if self.at(i) != Some(b']') {
            let msg = if items.is_empty() { ERR_ARRAY_VALUE_FIRST } else { ERR_ARRAY_DELIMITER };
            return Err(self.err(msg, i));
        }
        self.depth -= 1;
        Ok((Value::Array(items), i + 1))
    }

    /// An object whose `{` is at `i - 1`; mirrors `_parse_object_unicode`.
    fn object(&mut self, i: usize) -> Result<(Value, usize), JsonError> {
        self.enter(i - 1, "object")?;
        let mut members: Vec<(String, Value)> = Vec::new();
        let mut did_parse = false;
        let mut i = self.skip_ws(i);
        if self.at(i).is_some_and(|c| c != b'}') {
            let mut trailing_delimiter = false;
            while i < self.s.len() {
                trailing_delimiter = false;
                if self.s[i] != b'"' {
                    return Err(self.err(ERR_OBJECT_PROPERTY, i));
                }
                let (key, next) = self.string(i + 1)?;
                i = self.skip_ws(next);
                if self.at(i) != Some(b':') {
                    return Err(self.err(ERR_OBJECT_PROPERTY_DELIMITER, i));
                }
                i = self.skip_ws(i + 1);
                let (v, next) = self.value(i)?;
                members.push((key, v));
                i = self.skip_ws(next);
                did_parse = true;
                match self.at(i) {
                    None | Some(b'}') => break,
                    Some(b',') => {}
                    Some(_) => return Err(self.err(ERR_OBJECT_DELIMITER, i)),
                }
                i = self.skip_ws(i + 1);
                trailing_delimiter = true;
            }
            if trailing_delimiter {
                return Err(self.err(ERR_OBJECT_PROPERTY, i));
            }
        }
        if self.at(i) != Some(b'}') {
            let msg = if did_parse { ERR_OBJECT_DELIMITER } else { ERR_OBJECT_PROPERTY_FIRST };
            return Err(self.err(msg, i));
        }
        self.depth -= 1;
        Ok((Value::Object(dedup_keys(members)), i + 1))
    }
}

fn hex4(h: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &d in h {
        v = (v << 4) | (d as char).to_digit(16)?;
    }
    Some(v)
}

/// Python dict semantics for a decoded object: a repeated key keeps its first position and
/// takes the last value.
fn dedup_keys(mut members: Vec<(String, Value)>) -> Vec<(String, Value)> {
    const LINEAR_MAX: usize = 16;
    if members.len() < 2 {
        return members;
    }
    let n = members.len();
    // target[j] = index of the first occurrence of members[j]'s key.
    let mut target: Vec<usize> = (0..n).collect();
    let mut any_dup = false;
    if n <= LINEAR_MAX {
        for j in 1..n {
            if let Some(first) = (0..j).find(|&k| members[k].0 == members[j].0) {
                target[j] = target[first];
                any_dup = true;
            }
        }
    } else {
        let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::with_capacity(n);
        for (j, (k, _)) in members.iter().enumerate() {
            match seen.entry(k.as_str()) {
                std::collections::hash_map::Entry::Occupied(e) => {
                    target[j] = *e.get();
                    any_dup = true;
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(j);
                }
            }
        }
    }
    if !any_dup {
        return members;
    }
    for j in 0..n {
        if target[j] != j {
            let v = std::mem::replace(&mut members[j].1, Value::Null);
            members[target[j]].1 = v;
        }
    }
    let mut j = 0;
    members.retain(|_| {
        let keep = target[j] == j;
        j += 1;
        keep
    });
    members
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// Reusable buffers for [`Scratch::validate`]: simd-json parses in place, so the input is
/// copied into a padded buffer kept here between calls.
pub struct Scratch {
    input: Vec<u8>,
    buffers: simd_json::Buffers,
    tape: simd_json::Tape<'static>,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch").field("capacity", &self.input.capacity()).finish()
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    /// Buffers larger than this are dropped after use rather than kept.
    const KEEP_MAX: usize = 1 << 20;

    /// Empty buffers.
    pub fn new() -> Self {
        Self {
            input: Vec::new(),
            buffers: simd_json::Buffers::new(1024),
            tape: simd_json::Tape::null().reset(),
        }
    }

    /// Whether `json.loads` would accept `bytes`; the error is [`parse`]'s. See [`validate`].
    pub fn validate(&mut self, bytes: &[u8]) -> Result<(), JsonError> {
        let fast_ok = self.simd_accepts(bytes);
        if bytes.len() > Self::KEEP_MAX {
            *self = Self::new();
        }
        if fast_ok && !too_deep(bytes) {
            return Ok(());
        }
        parse(bytes).map(drop)
    }

    fn simd_accepts(&mut self, bytes: &[u8]) -> bool {
        self.input.clear();
        self.input.extend_from_slice(bytes);
        self.input.resize(bytes.len() + simd_json::INPUT_PADDING, b' ');
        let mut tape = std::mem::replace(&mut self.tape, simd_json::Tape::null()).reset();
        let ok =
            simd_json::fill_tape_padded(&mut self.input, bytes.len(), &mut self.buffers, &mut tape).is_ok();
        self.tape = tape.reset();
        ok
    }
}

/// Whether valid JSON `bytes` nests deeper than [`MAX_DEPTH`]. Counting brackets first keeps
/// the common case to one vectorisable pass.
fn too_deep(bytes: &[u8]) -> bool {
    let opens = bytes.iter().filter(|&&b| b == b'[' || b == b'{').count();
    if opens <= MAX_DEPTH {
        return false;
    }
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for &b in bytes {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::new());
}

/// Whether Python's `json.loads` (as Synapse runs it) would accept `bytes`, with [`parse`]'s
/// error if not. Uses simd-json on a per-thread scratch copy first, and [`parse`] only when
/// simd-json rejects, so NaN, huge integers and the like still pass.
pub fn validate(bytes: &[u8]) -> Result<(), JsonError> {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => s.validate(bytes),
        Err(_) => Scratch::new().validate(bytes),
    })
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Appends `value` encoded exactly as simplejson 3.17 would (PROTOCOL.md §2.3).
pub fn encode<B: BufMut + ?Sized>(value: &Value, out: &mut B) {
    match value {
        Value::Null => write_null(out),
        Value::Bool(b) => write_bool(out, *b),
        Value::Number(Number::Int(digits)) => out.put_slice(digits.as_bytes()),
        Value::Number(Number::Float(f)) => write_f64(out, *f),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.put_u8(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    write_sep(out);
                }
                encode(v, out);
            }
            out.put_u8(b']');
        }
        Value::Object(members) => {
            out.put_u8(b'{');
            for (i, (k, v)) in members.iter().enumerate() {
                if i > 0 {
                    write_sep(out);
                }
                write_key(out, k);
                encode(v, out);
            }
            out.put_u8(b'}');
        }
    }
}

/// `value` encoded as simplejson would, in a new `Vec`.
pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    encode(value, &mut out);
    out
}

/// `null`
#[inline]
pub fn write_null<B: BufMut + ?Sized>(out: &mut B) {
    out.put_slice(b"null");
}

/// `true` / `false`
#[inline]
pub fn write_bool<B: BufMut + ?Sized>(out: &mut B, b: bool) {
    out.put_slice(if b { b"true" } else { b"false" });
}

/// The item separator, `", "`.
#[inline]
pub fn write_sep<B: BufMut + ?Sized>(out: &mut B) {
    out.put_slice(b", ");
}

/// An object key and its separator: `"key": `.
#[inline]
pub fn write_key<B: BufMut + ?Sized>(out: &mut B, key: &str) {
    write_str(out, key);
    out.put_slice(b": ");
}

/// A decimal integer.
#[inline]
pub fn write_i64<B: BufMut + ?Sized>(out: &mut B, v: i64) {
    if v < 0 {
        out.put_u8(b'-');
    }
    write_u64(out, v.unsigned_abs());
}

/// A decimal integer.
#[inline]
pub fn write_u64<B: BufMut + ?Sized>(out: &mut B, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_slice(&buf[i..]);
}

/// A fixed-size stack buffer for `core::fmt` output.
struct StackBuf {
    buf: [u8; 32],
    len: usize,
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A float as Python's `repr` writes it: the shortest digits that round-trip, fixed notation
/// for 1e-4 <= |x| < 1e16 (with `.0` when integral), otherwise `d.ddde±XX`; `-0.0`, `NaN`,
/// `Infinity`, `-Infinity`.
pub fn write_f64<B: BufMut + ?Sized>(out: &mut B, x: f64) {
    if x.is_nan() {
        return out.put_slice(b"NaN");
    }
    if x.is_infinite() {
        return out.put_slice(if x > 0.0 { b"Infinity" } else { b"-Infinity" });
    }
    if x == 0.0 {
        return out.put_slice(if x.is_sign_negative() { b"-0.0" } else { b"0.0" });
    }
    // `{:e}` gives the shortest round-trip digits: `-1.2345e-7`, `5e-324`, `1e16`.
    let mut sci = StackBuf { buf: [0; 32], len: 0 };
    if write!(sci, "{:e}", x.abs()).is_err() {
        // Cannot happen (at most 24 bytes); fall back to Rust's own shortest form.
        return out.put_slice(x.to_string().as_bytes());
    }
    let sci = &sci.buf[..sci.len];
    let e_pos = sci.iter().position(|&b| b == b'e').unwrap_or(sci.len());
    let mut digits = [0u8; 20];
    let mut n = 0;
    for &b in &sci[..e_pos] {
        if b.is_ascii_digit() && n < digits.len() {
            digits[n] = b;
            n += 1;
        }
    }
    let exp: i32 = std::str::from_utf8(&sci[(e_pos + 1).min(sci.len())..])
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    round_half_even(x.abs(), &mut digits[..n], exp);
    let digits = &digits[..n];
    if x.is_sign_negative() {
        out.put_u8(b'-');
    }
    if (-4..16).contains(&exp) {
        if exp < 0 {
            out.put_slice(b"0.");
            for _ in 0..(-exp - 1) {
                out.put_u8(b'0');
            }
            out.put_slice(digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.put_slice(digits);
                for _ in digits.len()..int_len {
                    out.put_u8(b'0');
                }
                out.put_slice(b".0");
            } else {
                out.put_slice(&digits[..int_len]);
                out.put_u8(b'.');
                out.put_slice(&digits[int_len..]);
            }
        }
    } else {
        out.put_slice(&digits[..1]);
        if digits.len() > 1 {
            out.put_u8(b'.');
            out.put_slice(&digits[1..]);
        }
        out.put_slice(if exp < 0 { b"e-" } else { b"e+" });
        let a = exp.unsigned_abs();
        if a < 10 {
            out.put_u8(b'0');
        }
        write_u64(out, u64::from(a));
    }
}

/// Python (David Gay's dtoa) and Rust agree on the shortest round-trip digit count and pick
/// the candidate nearest to the exact value, but break an exact tie differently: Rust rounds
/// half up, Python half to even (`996219154410990.25` is `…990.2` in Python). A tie needs the
/// float to equal, exactly, the decimal halfway between two candidates, so check that with
/// integer arithmetic and switch to the even neighbour when it also round-trips.
fn round_half_even(x: f64, digits: &mut [u8], exp: i32) {
    let n = digits.len();
    let Some(&last) = digits.last() else {
        return;
    };
    if (last - b'0') % 2 == 0 || n > 19 {
        return;
    }
    let dint = digits.iter().fold(0u64, |a, &d| a * 10 + u64::from(d - b'0'));
    // x ~ dint * 10^(exp - n + 1); the halfway points are (10 * dint -+ 5) * 10^(exp - n).
    let q = exp - n as i32;
    for (cand, half) in [(dint - 1, 10 * dint - 5), (dint + 1, 10 * dint + 5)] {
        if !exactly_equals(x, half, q) {
            continue;
        }
        let mut buf = StackBuf { buf: [0; 32], len: 0 };
        let text = write!(buf, "{cand}e{}", q + 1).ok().map(|()| &buf.buf[..buf.len]);
        let round_trips = text
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(|t| t.parse::<f64>().ok())
            .is_some_and(|y| y == x);
        let mut c = cand;
        let mut tmp = [0u8; 20];
        let mut len = 0;
        while c > 0 && len < tmp.len() {
            tmp[len] = b'0' + (c % 10) as u8;
            c /= 10;
            len += 1;
        }
        if round_trips && len == n {
            for (d, t) in digits.iter_mut().zip(tmp[..n].iter().rev()) {
                *d = *t;
            }
        }
        return;
    }
}

/// Whether positive finite `x` equals `p * 10^q` exactly.
fn exactly_equals(x: f64, p: u64, q: i32) -> bool {
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i64;
    let frac = bits & ((1 << 52) - 1);
    let (mut mant, mut e2) = if biased == 0 { (frac, -1074i64) } else { (frac | (1 << 52), biased - 1075) };
    if mant == 0 || p == 0 {
        return false;
    }
    let tz = mant.trailing_zeros();
    mant >>= tz;
    e2 += i64::from(tz);
    let ptz = p.trailing_zeros();
    let p_odd = u128::from(p >> ptz);
    let ptz = i64::from(ptz);
    let mant = u128::from(mant);
    let pow5 = |k: u32| 5u128.checked_pow(k);
    if q >= 0 {
        // x = mant * 2^e2, p * 10^q = p_odd * 5^q * 2^(ptz + q)
        e2 == ptz + i64::from(q) && pow5(q.unsigned_abs()).and_then(|f| p_odd.checked_mul(f)) == Some(mant)
    } else {
        // mant * 2^e2 * 2^a * 5^a = p_odd * 2^ptz, with a = -q
        let a = q.unsigned_abs();
        ptz == e2 + i64::from(a) && pow5(a).and_then(|f| mant.checked_mul(f)) == Some(p_odd)
    }
}

/// Whether byte `b` cannot be copied into an encoded string as it is: controls, DEL,
/// non-ASCII, `"` and `\`.
#[inline(always)]
fn needs_escape(b: u8) -> bool {
    b.wrapping_sub(0x20) >= 0x5f || b == b'"' || b == b'\\'
}

/// Whether any of 16 bytes needs escaping; no early exit, so it compiles to SIMD compares.
#[inline(always)]
fn block_needs_escape(block: &[u8; 16]) -> bool {
    let mut any = false;
    for &b in block {
        any |= needs_escape(b);
    }
    any
}

/// Length of the prefix of `bytes` that can be copied verbatim: 16-byte blocks, then one
/// overlapping block for the tail, then bytewise only inside the block that needs escaping.
#[inline]
fn plain_prefix_len(bytes: &[u8]) -> usize {
    let n = bytes.len();
    let mut i = 0;
    while let Some(block) = bytes.get(i..i + 16).and_then(|b| <&[u8; 16]>::try_from(b).ok()) {
        if block_needs_escape(block) {
            break;
        }
        i += 16;
    }
    if i < n && i + 16 > n && n >= 16 {
        if let Ok(tail) = <&[u8; 16]>::try_from(&bytes[n - 16..]) {
            if !block_needs_escape(tail) {
                return n;
            }
        }
    }
    i + bytes[i..].iter().position(|&b| needs_escape(b)).unwrap_or(n - i)
}

/// A string, quoted and escaped as simplejson's `ensure_ascii` encoder does.
#[inline]
pub fn write_str<B: BufMut + ?Sized>(out: &mut B, s: &str) {
    out.put_u8(b'"');
    write_str_contents(out, s);
    out.put_u8(b'"');
}

/// The escaped body of a string without the quotes, for writers that build one string from
/// parts (a caller may splice plain ASCII between two calls).
pub fn write_str_contents<B: BufMut + ?Sized>(out: &mut B, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    loop {
        let i = start + plain_prefix_len(&bytes[start..]);
        if i > start {
            out.put_slice(&bytes[start..i]);
        }
        let Some(&b) = bytes.get(i) else {
            return;
        };
        if b < 0x80 {
            match b {
                b'"' => out.put_slice(b"\\\""),
                b'\\' => out.put_slice(b"\\\\"),
                b'\n' => out.put_slice(b"\\n"),
                b'\r' => out.put_slice(b"\\r"),
                b'\t' => out.put_slice(b"\\t"),
                0x08 => out.put_slice(b"\\b"),
                0x0c => out.put_slice(b"\\f"),
                _ => write_u_escape(out, u32::from(b)),
            }
            start = i + 1;
        } else {
            // `i` follows only ASCII since the last boundary, so it is a char boundary.
            let Some(ch) = s[i..].chars().next() else {
                return;
            };
            let cp = ch as u32;
            if cp >= 0x10000 {
                let v = cp - 0x10000;
                write_u_escape(out, 0xd800 | (v >> 10));
                write_u_escape(out, 0xdc00 | (v & 0x3ff));
            } else {
                write_u_escape(out, cp);
            }
            start = i + ch.len_utf8();
        }
    }
}

#[inline]
fn write_u_escape<B: BufMut + ?Sized>(out: &mut B, cp: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let h = |shift: u32| HEX[((cp >> shift) & 0xf) as usize];
    out.put_slice(&[b'\\', b'u', h(12), h(8), h(4), h(0)]);
}

#[cfg(test)]
mod tests {
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
        assert_eq!(
            enc(&Value::Object(vec![("b".into(), int(1)), ("a".into(), int(2))])),
            "{\"b\": 1, \"a\": 2}"
        );
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
            prop_oneof![Just(f64::NAN), Just(-0.0), Just(5e-324), Just(1e16), Just(1e-5)]
                .prop_map(Value::from),
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
}
