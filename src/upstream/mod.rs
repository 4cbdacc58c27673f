//! The upstream link.
