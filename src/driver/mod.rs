//! I/O drivers.
