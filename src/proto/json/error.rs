//! [`JsonError`], and its Python `repr` for `ERROR failed to parse line` replies.

use std::fmt::Write as _;

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
pub(super) fn py_str_repr(s: &str) -> String {
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
