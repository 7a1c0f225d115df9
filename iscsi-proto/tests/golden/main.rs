//! Integration tests for `iscsi-proto`, one binary (STYLE §8: rustls-test's `api.rs` includes
//! its parts as modules; `tests/golden/main.rs` is the binary, the parts sit beside it).
//!
//! - `capture`: loads `testdata/index.tsv` and decodes one captured connection (both
//!   directions), switching digests on where the login negotiated them.
//! - `streams`: every stream decodes into whole PDUs and re-encodes to the same bytes.
//! - `sequence`: the decoded PDU sequences make sense as iSCSI conversations (login first,
//!   request/response pairing, sequence numbers).

mod capture;
mod sequence;
mod streams;
