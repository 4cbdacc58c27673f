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
//!
//! Files: `value.rs` (the decoded [`Value`]), `parse.rs` ([`parse`]), `validate.rs`
//! ([`validate`], [`Scratch`]), `encode.rs` ([`encode`], [`to_vec`], the `write_*` primitives),
//! `float.rs` ([`write_f64`], Python's float `repr`), `error.rs` ([`JsonError`]).

mod encode;
mod error;
mod float;
mod parse;
mod validate;
mod value;

pub use encode::{
    encode, to_vec, write_bool, write_i64, write_key, write_null, write_sep, write_str, write_str_contents,
    write_u64,
};
pub use error::JsonError;
pub use float::write_f64;
pub use parse::parse;
pub use validate::{validate, Scratch};
pub use value::{Number, Value};

/// Deepest nesting of arrays and objects [`parse`] and [`validate`] accept.
pub const MAX_DEPTH: usize = 128;

#[cfg(test)]
mod tests;
