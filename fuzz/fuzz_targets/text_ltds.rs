//! Text across PDUs with the C bit: see `iscsi_proto::internal::fuzz_text`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| iscsi_proto::internal::fuzz_text(data));
