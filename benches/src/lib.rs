//! Helpers shared by the criterion benches in `benches/benches/` (see `benches/README.md`).
//!
//! Not an API for anything but those benches: it exists so the bench binaries do not repeat
//! the CDB builders, the offset patterns and the scripted initiator.
//!
//! # Layout
//! - [`cdb`]: the few SCSI CDBs the benches send (TEST UNIT READY, INQUIRY, READ/WRITE(10),
//!   REPORT LUNS).
//! - [`pattern`]: deterministic data and offset patterns (no `rand`, so every run reads and
//!   writes the same places).
//! - [`initiator`]: a minimal iSCSI initiator over a loopback TCP socket (login without CHAP,
//!   then pipelined SCSI commands), for the end-to-end bench.

pub mod cdb;
pub mod initiator;
pub mod pattern;
