//! SCSI CDBs used by the benches (SPC-4, SBC-3), as 16-byte arrays ready for a SCSI Command
//! BHS; the bytes past each command's length are zero.

/// TEST UNIT READY (SPC-4 §6.47).
pub fn test_unit_ready() -> [u8; 16] {
    [0; 16]
}

/// Standard INQUIRY (SPC-4 §6.6) with ALLOCATION LENGTH `len`.
pub fn inquiry(len: u16) -> [u8; 16] {
    let l = len.to_be_bytes();
    pad(&[0x12, 0, 0, l[0], l[1], 0])
}

/// READ(10) of `blocks` blocks at `lba` (SBC-3 §5.11).
pub fn read10(lba: u32, blocks: u16) -> [u8; 16] {
    rw10(0x28, lba, blocks)
}

/// WRITE(10) of `blocks` blocks at `lba` (SBC-3 §5.32).
pub fn write10(lba: u32, blocks: u16) -> [u8; 16] {
    rw10(0x2a, lba, blocks)
}

/// REPORT LUNS (SPC-4 §6.33), SELECT REPORT 0, with ALLOCATION LENGTH `len`.
pub fn report_luns(len: u32) -> [u8; 16] {
    let l = len.to_be_bytes();
    pad(&[0xa0, 0, 0, 0, 0, 0, l[0], l[1], l[2], l[3], 0, 0])
}

fn rw10(opcode: u8, lba: u32, blocks: u16) -> [u8; 16] {
    let a = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    pad(&[opcode, 0, a[0], a[1], a[2], a[3], 0, b[0], b[1], 0])
}

fn pad(cdb: &[u8]) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..cdb.len()].copy_from_slice(cdb);
    c
}
