//! rehydrate: restore volumes from block snapshots in object stores.
//!
//! A block flows manifest → store → fetch → verify → write → checkpoint, with
//! `job` as the control plane and `cli`, `metrics`, `config` at the edges.

pub mod block;
pub mod checkpoint;
pub mod error;
pub mod manifest;
pub mod store;
pub mod verify;
pub mod write;
