//! Per-core fan-out hub (sans-IO).
