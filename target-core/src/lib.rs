//! ktgt's iSCSI target core: everything between the socket and the backing store.
//!
//! Holds no Kubernetes types: callers hand it a [`config::DesiredState`] and it serves that.
//!
//! # Layout
//! - [`config`]: the desired state (targets, LUNs, ACLs, CHAP accounts) callers apply.
#![deny(unused_must_use)]

pub mod config;
pub mod lun;
