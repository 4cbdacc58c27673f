//! The decoded value: [`Value`] and [`Number`], shaped as Python holds them after `json.loads`.

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
    /// An object, in insertion order. [`parse`](super::parse) never yields duplicate keys; a hand-built
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
