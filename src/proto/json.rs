//! Synapse-compatible JSON (simplejson 3.17 defaults, PROTOCOL.md §2.3).
