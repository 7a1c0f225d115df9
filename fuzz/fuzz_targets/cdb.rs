//! CDBs and Data-Out into an in-memory LU: see `target_core::scsi::internal::fuzz_cdb`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| target_core::scsi::internal::fuzz_cdb(data));
