//! PDU framing round trip: see `iscsi_proto::internal::fuzz_pdu_decode`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| iscsi_proto::internal::fuzz_pdu_decode(data));
