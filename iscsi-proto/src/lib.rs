//! iSCSI wire layer (RFC 7143) for the target side, sans-IO.
//!
//! This crate decodes and encodes every iSCSI PDU, parses and builds text key=value data,
//! negotiates login and operational keys, and runs the target side of login (including CHAP)
//! as a state machine. It contains no sockets, tasks or clocks: callers feed it bytes, PDUs and
//! the current time, and send what it returns.
//!
//! # Layout
//! - [`types`]: wire integers (task tags, serial-arithmetic sequence numbers, LUN, ISID, TSIH).
//! - [`pdu`]: typed Basic Header Segments for all opcodes, both directions.
//! - [`codec`]: framing with padding, CRC32C digests and length limits.
//! - [`text`]: key=value text, multi-PDU assembly, value encodings.
//! - [`negotiate`]: operational key negotiation and the resulting session parameters.
//! - [`chap`]: CHAP (RFC 1994) algorithms, secrets and challenges.
//! - [`login`]: the target side of login as a state machine.
#![forbid(unsafe_code)]
#![deny(unused_must_use)]

pub mod chap;
pub mod codec;
pub mod login;
pub mod negotiate;
pub mod pdu;
pub mod text;
pub mod types;

pub use codec::{Codec, ConnectionAction, DecodeError};
pub use pdu::{Header, Pdu};

/// Hooks for fuzz targets. Not a stable interface.
#[doc(hidden)]
pub mod internal;
