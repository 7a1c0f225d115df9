//! ktgt's iSCSI target core: everything between the socket and the backing store.
//!
//! Holds no Kubernetes types: callers hand it a [`config::DesiredState`] and it serves that.
//!
//! # Layout
//! - [`config`]: the desired state (targets, LUNs, ACLs, CHAP accounts) callers apply.
//! - [`table`]: the live target table: applies a desired state, holds the sessions.
//! - [`portal`]: the listening sockets; each accepted connection goes to [`session`].
//! - [`session`]: login, then the full-feature phase of one connection.
//! - [`scsi`]: SCSI device emulation of a block logical unit (SPC-4, SBC-3).
//! - [`lun`]: backing stores (RAM, files and block devices through io_uring or a thread
//!   pool) and reflink copies of files ([`lun::clone`]).
//! - [`stats`]: per-LUN I/O counters and latency histograms.
//! - [`events`]: logins, Rejects, task management, unit attentions and session ends counted
//!   by reason, and the notices (refused logins, dropped sessions) an operator should hear of.
//! - [`workers`]: the connection threads.
#![deny(unused_must_use)]

pub mod config;
pub mod events;
pub mod lun;
mod parts;
pub mod portal;
pub mod scsi;
pub mod session;
pub mod stats;
pub mod table;
pub mod workers;

/// A CHAP secret for the login machine, or `None` if it violates RFC 7143 §12.1.3's length
/// rule (configuration loaders refuse such secrets earlier, with a message naming the field).
pub(crate) fn chap_secret(bytes: &[u8]) -> Option<iscsi_proto::chap::ChapSecret> {
    iscsi_proto::chap::ChapSecret::new(bytes.to_vec()).ok()
}
