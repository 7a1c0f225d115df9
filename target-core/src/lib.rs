//! ktgt's iSCSI target core: everything between the socket and the backing store.
//!
//! Holds no Kubernetes types: callers hand it a [`config::DesiredState`] and it serves that.
//!
//! # Layout
//! - [`config`]: the desired state (targets, LUNs, ACLs, CHAP accounts) callers apply.
//! - [`scsi`]: SCSI device emulation of a block logical unit (SPC-4, SBC-3).
#![deny(unused_must_use)]

pub mod config;
pub mod lun;
pub mod scsi;
