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
//! - [`runtime`]: the tokio runtime the benches run on.
//! - [`initiator`]: a minimal iSCSI initiator over a loopback TCP socket (login without CHAP,
//!   then pipelined SCSI commands), for the end-to-end bench.

pub mod cdb;
pub mod initiator;
pub mod pattern;

/// The runtime every bench runs on: two workers, like the agent on this 2-core machine.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a 2-worker tokio runtime")
}
