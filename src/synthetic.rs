//! The synthetic master.
