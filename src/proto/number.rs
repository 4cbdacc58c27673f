//! Integer fields (PROTOCOL.md §1.2).
use super::error::FieldError;

/// Parses a decimal token, timestamp or id.
pub fn parse_i64(field: &[u8]) -> Result<i64, FieldError> {
    let _ = field;
    todo!()
}
