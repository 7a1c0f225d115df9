//! PDU sequences into the login state machine: see `iscsi_proto::internal::fuzz_login`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| iscsi_proto::internal::fuzz_login(data));
