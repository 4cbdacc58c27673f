//! Decoding with `json.loads` semantics as Synapse runs it (simplejson's C scanner): error
//! texts and positions as simplejson words them, Python dict semantics for repeated keys.

use super::error::JsonError;
use super::value::{Number, Value};
use super::MAX_DEPTH;

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
