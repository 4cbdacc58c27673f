//! Session state machine (sans-IO).
