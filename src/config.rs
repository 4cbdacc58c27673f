//! Typed configuration from flags and file.
