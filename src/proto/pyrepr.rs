//! Python `repr()` of a str, for ERROR texts that embed it.

/// Python's `repr(s)`.
pub fn py_repr(s: &str) -> String {
    let _ = s;
    todo!()
}
