//! Typed errors of the shards crate.
