//! Command-level tests on an in-memory LU.

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::lun::MemStore;

const NEXUS: u64 = 1;
const OTHER: u64 = 2;

fn lu_with(blocks: u64, bs: u32, read_only: bool) -> LogicalUnit {
    let store = Store::Memory(MemStore::new(blocks * u64::from(bs)).unwrap());
    let id = LuIdentity::derive("iqn.2024-01.io.ktgt:test", 3, None);
    LogicalUnit::new(3, store, bs, read_only, id).unwrap()
}

fn lu() -> LogicalUnit {
    lu_with(1024, 512, false)
}

async fn run(lu: &LogicalUnit, cdb: &[u8], data: &[u8]) -> ScsiResult {
    let len = data.len() as u32;
    lu.execute(NEXUS, cdb, vec![Bytes::copy_from_slice(data)], len)
        .await
}

#[track_caller]
fn good(r: &ScsiResult) {
    assert_eq!(r.status, status::GOOD, "expected GOOD, got {r:?}");
    assert!(r.sense.is_none());
}

#[track_caller]
fn check(r: &ScsiResult, key: SenseKey, asc: u8, ascq: u8) -> Sense {
    assert_eq!(
        r.status,
        status::CHECK_CONDITION,
        "expected CHECK CONDITION, got {r:?}"
    );
    let s = r.sense.expect("sense with CHECK CONDITION");
    assert_eq!((s.key, s.asc, s.ascq), (key, asc, ascq), "sense {s:?}");
    s
}

#[track_caller]
fn invalid_cdb(r: &ScsiResult) -> Sense {
    check(r, SenseKey::ILLEGAL_REQUEST, 0x24, 0x00)
}

#[track_caller]
fn oob(r: &ScsiResult) {
    check(r, SenseKey::ILLEGAL_REQUEST, 0x21, 0x00);
}

fn rw10(op: u8, flags: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let n = blocks.to_be_bytes();
    [op, flags, l[0], l[1], l[2], l[3], 0, n[0], n[1], 0]
}

fn rw16(op: u8, flags: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn fixed_sense_golden() {
    // INVALID FIELD IN CDB, byte 2 bit 5: SKSV | C/D | BPV | bit 5, field pointer 0002h.
    let s = ScsiError::cdb_bit(2, 5).sense();
    assert_eq!(
        s.to_fixed(),
        [0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0xCD, 0x00, 0x02]
    );
    // MISCOMPARE with INFORMATION: VALID bit.
    let s = ScsiError::Miscompare { offset: 0x1234 }.sense();
    let f = s.to_fixed();
    assert_eq!(f[0], 0xF0);
    assert_eq!(&f[3..7], &[0, 0, 0x12, 0x34]);
    assert_eq!((f[2], f[12]), (0x0E, 0x1D));
    // Too large for the fixed INFORMATION field: VALID clear.
    let s = ScsiError::Miscompare { offset: 1 << 40 }.sense();
    assert_eq!(s.to_fixed()[0], 0x70);
    let (d, n) = s.to_descriptor();
    assert_eq!(n, 20);
    assert_eq!(&d[..8], &[0x72, 0x0E, 0x1D, 0, 0, 0, 0, 12]);
    assert_eq!(&d[8..12], &[0, 0x0A, 0x80, 0]);
    // Parameter list pointer: C/D clear.
    assert_eq!(ScsiError::param(9).sense().sks, Some([0x80, 0, 9]));
}

#[test]
fn construction_checks() {
    let store = || Store::Memory(MemStore::new(4096).unwrap());
    let id = LuIdentity::derive("iqn.x", 0, None);
    assert_eq!(
        LogicalUnit::new(0, store(), 1024, false, id.clone()).unwrap_err(),
        LuError::BlockSize(1024)
    );
    let small = Store::Memory(MemStore::new(100).unwrap());
    assert!(matches!(
        LogicalUnit::new(0, small, 512, false, id.clone()),
        Err(LuError::TooSmall { .. })
    ));
    let lu = LogicalUnit::new(0, store(), 4096, false, id).unwrap();
    assert_eq!(lu.num_blocks(), 1);
}

#[tokio::test]
async fn test_unit_ready_and_unknown_opcode() {
    let lu = lu();
    good(&run(&lu, &[0; 6], &[]).await);
    check(
        &run(&lu, &[0xC0; 16], &[]).await,
        SenseKey::ILLEGAL_REQUEST,
        0x20,
        0,
    );
    check(
        &run(&lu, &[0x7F; 16], &[]).await,
        SenseKey::ILLEGAL_REQUEST,
        0x20,
        0,
    );
    check(
        &run(&lu, &[], &[]).await,
        SenseKey::ILLEGAL_REQUEST,
        0x20,
        0,
    );
    // NACA in the CONTROL byte.
    let s = invalid_cdb(&run(&lu, &[0, 0, 0, 0, 0, 0x04], &[]).await);
    assert_eq!(s.sks, Some([0xC0 | 0x08 | 2, 0, 5]));
}

#[tokio::test]
async fn unit_attentions() {
    let lu = lu();
    lu.add_nexus(NEXUS, "iqn.test:a,i,0x000000000001", 1);
    lu.add_nexus(OTHER, "iqn.test:b,i,0x000000000001", 1);
    // INQUIRY and REPORT LUNS do not report or clear it.
    good(&run(&lu, &[0x12, 0, 0, 0, 36, 0], &[]).await);
    good(&run(&lu, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]).await);
    check(
        &run(&lu, &[0; 6], &[]).await,
        SenseKey::UNIT_ATTENTION,
        0x29,
        0x00,
    );
    good(&run(&lu, &[0; 6], &[]).await);
    // REQUEST SENSE reports and clears it on the other nexus.
    let r = lu.execute(OTHER, &[0x03, 0, 0, 0, 18, 0], vec![], 0).await;
    good(&r);
    assert_eq!(
        (r.data_in[2], r.data_in[12], r.data_in[13]),
        (0x06, 0x29, 0x00)
    );
    good(&lu.execute(OTHER, &[0; 6], vec![], 0).await);

    // LUN reset: every nexus, the requester included, sees 29h/03h; WCE back to default.
    lu.wce.store(false, Ordering::Release);
    lu.reset();
    assert!(lu.wce());
    check(
        &run(&lu, &[0; 6], &[]).await,
        SenseKey::UNIT_ATTENTION,
        0x29,
        0x03,
    );
    good(&run(&lu, &[0; 6], &[]).await);
    let r = lu.execute(OTHER, &rw10(0x28, 0, 0, 1), vec![], 0).await;
    check(&r, SenseKey::UNIT_ATTENTION, 0x29, 0x03);
    good(&lu.execute(OTHER, &rw10(0x28, 0, 0, 1), vec![], 0).await);

    // REPORTED LUNS DATA HAS CHANGED is cleared by REPORT LUNS.
    lu.set_target_luns(&[0, 3]);
    lu.raise_unit_attention(UnitAttention::ReportedLunsDataChanged, None);
    let r = run(&lu, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]).await;
    good(&r);
    assert_eq!(&r.data_in[..4], &[0, 0, 0, 16]);
    assert_eq!(&r.data_in[16..24], &[0, 3, 0, 0, 0, 0, 0, 0]);
    good(&run(&lu, &[0; 6], &[]).await);
    check(
        &lu.execute(OTHER, &[0; 6], vec![], 0).await,
        SenseKey::UNIT_ATTENTION,
        0x3F,
        0x0E,
    );
    assert!(!lu.ua_pending.load(Ordering::Acquire));

    // A reset supersedes queued conditions; duplicates are not queued twice.
    lu.raise_unit_attention(UnitAttention::CapacityDataChanged, None);
    lu.raise_unit_attention(UnitAttention::CapacityDataChanged, None);
    lu.raise_unit_attention(UnitAttention::PowerOnReset, None);
    check(
        &run(&lu, &[0; 6], &[]).await,
        SenseKey::UNIT_ATTENTION,
        0x29,
        0x00,
    );
    good(&run(&lu, &[0; 6], &[]).await);
    lu.remove_nexus(OTHER);
    assert!(!lu.ua_pending.load(Ordering::Acquire));
}

#[tokio::test]
async fn read_write_round_trip_all_sizes() {
    let lu = lu();
    let data = pattern(4 * 512, 7);
    good(&run(&lu, &rw10(0x2A, 0, 10, 4), &data).await);
    let r = run(&lu, &rw10(0x28, 0, 10, 4), &[]).await;
    good(&r);
    assert_eq!(&r.data_in[..], &data[..]);
    // READ(16) with FUA and DPO, READ(12), READ(6).
    let r = run(&lu, &rw16(0x88, 0x18, 11, 2), &[]).await;
    assert_eq!(&r.data_in[..], &data[512..1536]);
    let r = run(&lu, &[0xA8, 0, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0], &[]).await;
    assert_eq!(&r.data_in[..], &data[1024..1536]);
    let r = run(&lu, &[0x08, 0, 0, 13, 1, 0], &[]).await;
    assert_eq!(&r.data_in[..], &data[1536..]);
    // WRITE(16) FUA, WRITE(12), WRITE(6).
    let d2 = pattern(512, 99);
    good(&run(&lu, &rw16(0x8A, 0x08, 0, 1), &d2).await);
    good(&run(&lu, &[0xAA, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0], &d2).await);
    good(&run(&lu, &[0x0A, 0, 0, 2, 1, 0], &d2).await);
    let r = run(&lu, &rw10(0x28, 0, 0, 3), &[]).await;
    assert_eq!(&r.data_in[..], &[d2.clone(), d2.clone(), d2].concat()[..]);
    // WRITE AND VERIFY(10), without and with BYTCHK (write, read back, compare).
    good(&run(&lu, &rw10(0x2E, 0, 5, 1), &data[..512]).await);
    good(&run(&lu, &rw10(0x2E, 0x02, 6, 1), &data[512..1024]).await);
    let r = run(&lu, &rw10(0x28, 0, 5, 2), &[]).await;
    assert_eq!(&r.data_in[..], &data[..1024]);
}

#[tokio::test]
async fn read6_zero_means_256() {
    let lu = lu();
    let r = run(&lu, &[0x08, 0, 0, 0, 0, 0], &[]).await;
    good(&r);
    assert_eq!(r.data_in.len(), 256 * 512);
    assert_eq!(lu.data_out_length(&[0x0A, 0, 0, 0, 0, 0]), Ok(256 * 512));
}

#[tokio::test]
async fn lba_range_checks() {
    let lu = lu();
    let n = lu.num_blocks();
    // Last block is fine, one past is not; no wrap near 2^32 or 2^64.
    good(&run(&lu, &rw10(0x28, 0, (n - 1) as u32, 1), &[]).await);
    oob(&run(&lu, &rw10(0x28, 0, (n - 1) as u32, 2), &[]).await);
    oob(&run(&lu, &rw10(0x28, 0, u32::MAX, 1), &[]).await);
    oob(&run(&lu, &rw16(0x88, 0, u64::MAX, 2), &[]).await);
    oob(&run(&lu, &rw16(0x8A, 0, u64::MAX, 1), &[0; 512]).await);
    oob(&run(&lu, &[0x08, 0x1F, 0xFF, 0xFF, 1, 0], &[]).await);
    // Zero blocks: GOOD at LBA 0 and at the end, out of range past the end (libiscsi
    // Read10.ZeroBlocks expectations).
    let r = run(&lu, &rw10(0x28, 0, 0, 0), &[]).await;
    good(&r);
    assert!(r.data_in.is_empty());
    good(&run(&lu, &rw10(0x28, 0, n as u32, 0), &[]).await);
    oob(&run(&lu, &rw10(0x28, 0, n as u32 + 1, 0), &[]).await);
    good(&run(&lu, &rw10(0x2A, 0, 0, 0), &[]).await);
    oob(&run(&lu, &rw10(0x2A, 0, 0x8000_0000, 0), &[]).await);
}

#[tokio::test]
async fn transfer_limits_and_protect_fields() {
    let lu = lu_with(131_072, 512, false);
    let max = MAX_TRANSFER_BYTES / 512;
    let s = invalid_cdb(&run(&lu, &rw16(0x88, 0, 0, max + 1), &[]).await);
    assert_eq!(s.sks, Some([0xC0, 0, 10]));
    assert_eq!(
        lu.data_out_length(&rw16(0x8A, 0, 0, max + 1)),
        Err(ScsiError::cdb(10))
    );
    // RDPROTECT / WRPROTECT / VRPROTECT without protection information.
    for flags in [0x20u8, 0x40, 0x60, 0x80, 0xE0] {
        let s = invalid_cdb(&run(&lu, &rw10(0x28, flags, 0, 1), &[]).await);
        assert_eq!(s.sks, Some([0xC0 | 0x08 | 7, 0, 1]));
        invalid_cdb(&run(&lu, &rw10(0x2A, flags, 0, 1), &[0; 512]).await);
        invalid_cdb(&run(&lu, &rw10(0x2F, flags, 0, 1), &[]).await);
    }
}

#[tokio::test]
async fn read_only_lu() {
    let lu = lu_with(64, 512, true);
    let wp = |r: &ScsiResult| {
        check(r, SenseKey::DATA_PROTECT, 0x27, 0x00);
    };
    wp(&run(&lu, &rw10(0x2A, 0, 0, 1), &[0; 512]).await);
    wp(&run(&lu, &[0x0A, 0, 0, 0, 1, 0], &[0; 512]).await);
    wp(&run(&lu, &rw16(0x93, 0, 0, 1), &[0; 512]).await);
    wp(&run(&lu, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 24]).await);
    wp(&run(&lu, &rw10(0x2E, 0, 0, 1), &[0; 512]).await);
    good(&run(&lu, &rw10(0x28, 0, 0, 1), &[]).await);
    // MODE SENSE shows WP.
    let r = run(&lu, &[0x1A, 0, 0x3F, 0, 255, 0], &[]).await;
    assert_eq!(r.data_in[2] & 0x80, 0x80);
}

#[tokio::test]
async fn short_data_out_writes_whole_blocks_only() {
    let lu = lu();
    good(&run(&lu, &rw10(0x2A, 0, 0, 2), &[b'a'; 1024]).await);
    // Two blocks asked, one block of data sent: only the first block changes.
    good(&run(&lu, &rw10(0x2A, 0, 0, 2), &[b'b'; 512]).await);
    // More data than asked: the rest is ignored.
    good(&run(&lu, &rw10(0x2A, 0, 2, 1), &[b'c'; 1024]).await);
    // 200 bytes: nothing written.
    good(&run(&lu, &rw10(0x2A, 0, 1, 1), &[b'd'; 200]).await);
    let r = run(&lu, &rw10(0x28, 0, 0, 4), &[]).await;
    assert!(r.data_in[..512].iter().all(|&b| b == b'b'));
    assert!(r.data_in[512..1024].iter().all(|&b| b == b'a'));
    assert!(r.data_in[1024..1536].iter().all(|&b| b == b'c'));
    assert!(r.data_in[1536..].iter().all(|&b| b == 0));
    // Split buffers are written in order.
    let r = lu
        .execute(
            NEXUS,
            &rw10(0x2A, 0, 4, 2),
            vec![Bytes::from(vec![1u8; 300]), Bytes::from(vec![2u8; 724])],
            1024,
        )
        .await;
    good(&r);
    let r = run(&lu, &rw10(0x28, 0, 4, 2), &[]).await;
    assert!(r.data_in[..300].iter().all(|&b| b == 1));
    assert!(r.data_in[300..].iter().all(|&b| b == 2));
}

#[tokio::test]
async fn wce_off_still_writes() {
    let lu = lu();
    // MODE SELECT(6) caching page with WCE=0.
    let mut list = vec![0u8, 0, 0, 0];
    let mut page = [0u8; 20];
    page[0] = 0x08;
    page[1] = 0x12;
    list.extend_from_slice(&page);
    good(&run(&lu, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list).await);
    assert!(!lu.wce());
    good(&run(&lu, &rw10(0x2A, 0, 0, 1), &[5; 512]).await);
    assert_eq!(run(&lu, &rw10(0x28, 0, 0, 1), &[]).await.data_in[0], 5);
}

#[tokio::test]
async fn verify_bytchk() {
    let lu = lu();
    let data = pattern(3 * 512, 1);
    good(&run(&lu, &rw10(0x2A, 0, 8, 3), &data).await);
    // BYTCHK 0: range check only.
    good(&run(&lu, &rw10(0x2F, 0, 8, 3), &[]).await);
    oob(&run(&lu, &rw10(0x2F, 0, 1023, 2), &[]).await);
    good(&run(&lu, &rw10(0x2F, 0, 1024, 0), &[]).await);
    // BYTCHK 1: compare.
    good(&run(&lu, &rw10(0x2F, 0x02, 8, 3), &data).await);
    good(&run(&lu, &[0xAF, 0x02, 0, 0, 0, 8, 0, 0, 0, 3, 0, 0], &data).await);
    good(&run(&lu, &rw16(0x8F, 0x02, 8, 3), &data).await);
    let mut bad = data.clone();
    bad[700] ^= 0x58;
    let s = check(
        &run(&lu, &rw10(0x2F, 0x02, 8, 3), &bad).await,
        SenseKey::MISCOMPARE,
        0x1D,
        0x00,
    );
    assert_eq!(s.info, Some(700));
    // BYTCHK 11b: one block against each.
    good(&run(&lu, &rw10(0x2A, 0, 20, 2), &[9; 1024]).await);
    good(&run(&lu, &rw10(0x2F, 0x06, 20, 2), &[9; 512]).await);
    let s = check(
        &run(&lu, &rw10(0x2F, 0x06, 19, 2), &[9; 512]).await,
        SenseKey::MISCOMPARE,
        0x1D,
        0,
    );
    assert_eq!(s.info, Some(0));
    // BYTCHK 10b is reserved.
    invalid_cdb(&run(&lu, &rw10(0x2F, 0x04, 8, 1), &[]).await);
    assert_eq!(lu.data_out_length(&rw10(0x2F, 0x02, 8, 3)), Ok(1536));
    assert_eq!(lu.data_out_length(&rw10(0x2F, 0x06, 8, 3)), Ok(512));
    assert_eq!(lu.data_out_length(&rw10(0x2F, 0, 8, 3)), Ok(0));
}

#[tokio::test]
async fn write_same() {
    let lu = lu();
    let block = pattern(512, 3);
    good(&run(&lu, &rw10(0x41, 0, 100, 5), &block).await);
    let r = run(&lu, &rw10(0x28, 0, 99, 7), &[]).await;
    assert!(r.data_in[..512].iter().all(|&b| b == 0));
    for i in 1..6 {
        assert_eq!(&r.data_in[i * 512..(i + 1) * 512], &block[..]);
    }
    assert!(r.data_in[6 * 512..].iter().all(|&b| b == 0));
    // UNMAP with zero data deallocates; LBPRZ: reads back zero.
    good(&run(&lu, &rw16(0x93, 0x08, 100, 5), &[0; 512]).await);
    let r = run(&lu, &rw10(0x28, 0, 100, 5), &[]).await;
    assert!(r.data_in.iter().all(|&b| b == 0));
    // NDOB (WRITE SAME(16) only): zeroes, no data.
    good(&run(&lu, &rw10(0x41, 0, 0, 2), &block).await);
    assert_eq!(lu.data_out_length(&rw16(0x93, 0x09, 0, 2)), Ok(0));
    good(&run(&lu, &rw16(0x93, 0x09, 0, 2), &[]).await);
    assert!(run(&lu, &rw10(0x28, 0, 0, 2), &[])
        .await
        .data_in
        .iter()
        .all(|&b| b == 0));
    // ANCHOR without ANC_SUP, reserved bit, beyond the end.
    invalid_cdb(&run(&lu, &rw10(0x41, 0x10, 0, 1), &block).await);
    invalid_cdb(&run(&lu, &rw10(0x41, 0x18, 0, 1), &block).await);
    invalid_cdb(&run(&lu, &rw10(0x41, 0x01, 0, 1), &block).await);
    oob(&run(&lu, &rw10(0x41, 0, 1024, 1), &block).await);
    if WRITE_SAME_NON_ZERO {
        // Zero blocks refused (WSNZ=1); beyond-the-end LBAs still report the range first.
        invalid_cdb(&run(&lu, &rw10(0x41, 0, 0, 0), &block).await);
        invalid_cdb(&run(&lu, &rw16(0x93, 0, 1023, 0), &block).await);
    } else {
        // Zero blocks (WSNZ=0): from the LBA to the end of the medium; the LBA must exist.
        good(&run(&lu, &rw10(0x41, 0, 1020, 0), &block).await);
        let r = run(&lu, &rw10(0x28, 0, 1019, 5), &[]).await;
        assert!(r.data_in[..512].iter().all(|&b| b == 0));
        assert_eq!(&r.data_in[512..], &block.repeat(4)[..]);
        good(&run(&lu, &rw16(0x93, 0, 1023, 0), &block).await);
        oob(&run(&lu, &rw10(0x41, 0, 1024, 0), &block).await);
    }
    oob(&run(&lu, &rw10(0x41, 0, 1025, 0), &block).await);
    oob(&run(&lu, &rw10(0x41, 0, u32::MAX, 0), &block).await);
    oob(&run(&lu, &rw16(0x93, 0, u64::MAX, 1), &block).await);
}

#[tokio::test]
async fn write_same_large_range_in_chunks() {
    let lu = lu_with(8192, 512, false);
    good(&run(&lu, &rw10(0x41, 0, 1, 5000), &[0xAB; 512]).await);
    let r = run(&lu, &rw10(0x28, 0, 0, 5002), &[]).await;
    assert!(r.data_in[..512].iter().all(|&b| b == 0));
    assert!(r.data_in[512..5001 * 512].iter().all(|&b| b == 0xAB));
    assert!(r.data_in[5001 * 512..].iter().all(|&b| b == 0));
}

fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&((6 + 16 * descs.len()) as u16).to_be_bytes());
    v.extend_from_slice(&((16 * descs.len()) as u16).to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    for (lba, n) in descs {
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    v
}

fn unmap_cdb(len: usize) -> [u8; 10] {
    let l = (len as u16).to_be_bytes();
    [0x42, 0, 0, 0, 0, 0, 0, l[0], l[1], 0]
}

#[tokio::test]
async fn unmap() {
    let lu = lu();
    good(&run(&lu, &rw10(0x2A, 0, 0, 8), &[b'a'; 4096]).await);
    let list = unmap_list(&[(1, 2), (5, 1)]);
    good(&run(&lu, &unmap_cdb(list.len()), &list).await);
    let r = run(&lu, &rw10(0x28, 0, 0, 8), &[]).await;
    let blk = |i: usize| &r.data_in[i * 512..(i + 1) * 512];
    assert!(blk(0).iter().all(|&b| b == b'a'));
    assert!(blk(1).iter().all(|&b| b == 0) && blk(2).iter().all(|&b| b == 0));
    assert!(blk(3).iter().all(|&b| b == b'a') && blk(5).iter().all(|&b| b == 0));
    // Zero-length list, no descriptors, zero blocks at the end: GOOD.
    good(&run(&lu, &unmap_cdb(0), &[]).await);
    let list = unmap_list(&[]);
    good(&run(&lu, &unmap_cdb(list.len()), &list).await);
    let list = unmap_list(&[(1024, 0), (3, 0)]);
    good(&run(&lu, &unmap_cdb(list.len()), &list).await);
    // Out of range: nothing is unmapped, even the valid first descriptor.
    good(&run(&lu, &rw10(0x2A, 0, 0, 1), &[b'z'; 512]).await);
    let list = unmap_list(&[(0, 1), (1020, 5)]);
    oob(&run(&lu, &unmap_cdb(list.len()), &list).await);
    assert_eq!(run(&lu, &rw10(0x28, 0, 0, 1), &[]).await.data_in[0], b'z');
    let list = unmap_list(&[(u64::MAX, 2)]);
    oob(&run(&lu, &unmap_cdb(list.len()), &list).await);
    // Short parameter list; ANCHOR.
    check(
        &run(&lu, &unmap_cdb(7), &[0; 7]).await,
        SenseKey::ILLEGAL_REQUEST,
        0x1A,
        0,
    );
    let mut c = unmap_cdb(list.len());
    c[1] = 0x01;
    invalid_cdb(&run(&lu, &c, &list).await);
    // A trailing partial descriptor is ignored.
    let mut list = unmap_list(&[(0, 1)]);
    list[3] += 8;
    list.extend_from_slice(&[0xFF; 8]);
    good(&run(&lu, &unmap_cdb(list.len()), &list).await);
    assert_eq!(lu.data_out_length(&unmap_cdb(40)), Ok(40));
}

#[tokio::test]
async fn compare_and_write() {
    let lu = lu();
    let old = pattern(1024, 4);
    let new = pattern(1024, 200);
    good(&run(&lu, &rw10(0x2A, 0, 50, 2), &old).await);
    let mut cdb = [0u8; 16];
    cdb[0] = 0x89;
    cdb[2..10].copy_from_slice(&50u64.to_be_bytes());
    cdb[13] = 2;
    assert_eq!(lu.data_out_length(&cdb), Ok(2048));
    // Mismatch: nothing written, INFORMATION = offset of the first difference.
    let mut wrong = old.clone();
    wrong[600] ^= 1;
    let s = check(
        &run(&lu, &cdb, &[wrong, new.clone()].concat()).await,
        SenseKey::MISCOMPARE,
        0x1D,
        0,
    );
    assert_eq!(s.info, Some(600));
    assert_eq!(
        &run(&lu, &rw10(0x28, 0, 50, 2), &[]).await.data_in[..],
        &old[..]
    );
    good(&run(&lu, &cdb, &[old, new.clone()].concat()).await);
    assert_eq!(
        &run(&lu, &rw10(0x28, 0, 50, 2), &[]).await.data_in[..],
        &new[..]
    );
    // Beyond the end, too many blocks, short data.
    cdb[2..10].copy_from_slice(&1023u64.to_be_bytes());
    oob(&run(&lu, &cdb, &[0; 2048]).await);
    cdb[2..10].copy_from_slice(&0u64.to_be_bytes());
    cdb[13] = MAX_COMPARE_AND_WRITE_BLOCKS + 1;
    invalid_cdb(&run(&lu, &cdb, &[]).await);
    cdb[13] = 1;
    check(
        &run(&lu, &cdb, &[0; 512]).await,
        SenseKey::ILLEGAL_REQUEST,
        0x1A,
        0,
    );
}

#[tokio::test]
async fn sync_cache_and_prefetch() {
    let lu = lu();
    for op in [0x35u8, 0x34] {
        good(&run(&lu, &rw10(op, 0, 0, 0), &[]).await);
        good(&run(&lu, &rw10(op, 0x02, 1000, 24), &[]).await);
        oob(&run(&lu, &rw10(op, 0, 1000, 25), &[]).await);
        oob(&run(&lu, &rw10(op, 0, 1025, 0), &[]).await);
    }
    for op in [0x91u8, 0x90] {
        good(&run(&lu, &rw16(op, 0, 0, 1024), &[]).await);
        oob(&run(&lu, &rw16(op, 0, u64::MAX, 1), &[]).await);
    }
}

#[tokio::test]
async fn read_capacity() {
    let lu = lu_with(1000, 4096, false);
    let r = run(&lu, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(&r.data_in[..], &[0, 0, 0x03, 0xE7, 0, 0, 0x10, 0]);
    invalid_cdb(&run(&lu, &[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], &[]).await);
    good(&run(&lu, &[0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0], &[]).await);
    let mut c = [0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x10;
    c[13] = 32;
    let r = run(&lu, &c, &[]).await;
    good(&r);
    assert_eq!(r.data_in.len(), 32);
    assert_eq!(
        &r.data_in[..12],
        &[0, 0, 0, 0, 0, 0, 0x03, 0xE7, 0, 0, 0x10, 0]
    );
    assert_eq!(r.data_in[14], 0xC0, "LBPME and LBPRZ");
    c[13] = 8;
    assert_eq!(run(&lu, &c, &[]).await.data_in.len(), 8);
    c[1] = 0x11;
    invalid_cdb(&run(&lu, &c, &[]).await);
}

#[tokio::test]
async fn get_lba_status() {
    let lu = lu();
    good(&run(&lu, &rw10(0x2A, 0, 10, 3), &[1; 1536]).await);
    let mut c = [0u8; 16];
    c[0] = 0x9E;
    c[1] = 0x12;
    c[13] = 24;
    let r = run(&lu, &c, &[]).await;
    good(&r);
    assert_eq!(&r.data_in[..4], &[0, 0, 0, 20]);
    assert_eq!(
        &r.data_in[8..24],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 1, 0, 0, 0]
    );
    c[2..10].copy_from_slice(&10u64.to_be_bytes());
    let r = run(&lu, &c, &[]).await;
    assert_eq!(&r.data_in[16..21], &[0, 0, 0, 3, 0]);
    c[2..10].copy_from_slice(&1023u64.to_be_bytes());
    assert_eq!(&run(&lu, &c, &[]).await.data_in[16..21], &[0, 0, 0, 1, 1]);
    c[2..10].copy_from_slice(&1024u64.to_be_bytes());
    oob(&run(&lu, &c, &[]).await);
    c[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    oob(&run(&lu, &c, &[]).await);
}

#[tokio::test]
async fn inquiry_standard_and_vpd() {
    let lu = lu();
    let r = run(&lu, &[0x12, 0, 0, 1, 4, 0], &[]).await;
    good(&r);
    let d = &r.data_in;
    assert_eq!(d.len(), 96);
    assert_eq!(usize::from(d[4]), d.len() - 5);
    assert_eq!((d[0], d[2], d[3] & 0x1F, d[7] & 0x02), (0, 6, 0x12, 0x02));
    assert_eq!(&d[8..16], b"KTGT    ");
    assert!(d[8..36].iter().all(|&b| (0x20..0x7F).contains(&b)));
    // Allocation length truncates.
    assert_eq!(run(&lu, &[0x12, 0, 0, 0, 5, 0], &[]).await.data_in.len(), 5);
    // EVPD=0 with a page code; CMDDT.
    invalid_cdb(&run(&lu, &[0x12, 0, 0x80, 0, 255, 0], &[]).await);
    invalid_cdb(&run(&lu, &[0x12, 0x02, 0, 0, 255, 0], &[]).await);
    invalid_cdb(&run(&lu, &[0x12, 0x01, 0x42, 0, 255, 0], &[]).await);
    let vpd = |page: u8| {
        let lu = &lu;
        async move {
            let r = run(lu, &[0x12, 0x01, page, 1, 0, 0], &[]).await;
            good(&r);
            assert_eq!(r.data_in[1], page);
            assert_eq!(
                usize::from(u16::from_be_bytes([r.data_in[2], r.data_in[3]])),
                r.data_in.len() - 4
            );
            r.data_in
        }
    };
    assert_eq!(&vpd(0x00).await[4..], &[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    assert_eq!(&vpd(0x80).await[4..], lu.identity.serial.as_bytes());
    let d = vpd(0x83).await;
    // First designator: NAA, 16 bytes.
    assert_eq!(&d[4..8], &[0x01, 0x03, 0, 16]);
    assert_eq!(&d[8..24], &lu.identity.naa);
    // T10 vendor ID next.
    assert_eq!(&d[24..28], &[0x02, 0x01, 0, 8 + 16]);
    assert_eq!(&d[28..36], b"KTGT    ");
    let port = b"iqn.2024-01.io.ktgt:test,t,0x0001";
    assert!(d.windows(port.len()).any(|w| w == port));
    let d = vpd(0xB0).await;
    assert_eq!(d.len(), 64);
    assert_eq!(d[4] & 1, u8::from(WRITE_SAME_NON_ZERO), "WSNZ");
    assert_eq!(
        u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
        MAX_TRANSFER_BYTES / 512
    );
    assert_eq!(
        u32::from_be_bytes([d[24], d[25], d[26], d[27]]),
        MAX_UNMAP_DESCRIPTORS
    );
    let d = vpd(0xB1).await;
    assert_eq!(&d[4..6], &[0, 1]);
    let d = vpd(0xB2).await;
    assert_eq!(d[5], 0xE4);
}

#[tokio::test]
async fn report_luns_encoding_and_errors() {
    let luns = [0u16, 1, 255, 256, 16383, 16384];
    let cdb = |select: u8, alloc: u32| {
        let a = alloc.to_be_bytes();
        [0xA0, 0, select, 0, 0, 0, a[0], a[1], a[2], a[3], 0, 0]
    };
    let d = report_luns(&cdb(0, 4096), &luns).unwrap();
    assert_eq!(&d[..8], &[0, 0, 0, 40, 0, 0, 0, 0]);
    assert_eq!(&d[8..16], &[0; 8]);
    assert_eq!(&d[16..18], &[0, 1]);
    assert_eq!(&d[24..26], &[0, 255]);
    assert_eq!(&d[32..34], &[0x41, 0x00]);
    assert_eq!(&d[40..42], &[0x7F, 0xFF]);
    assert_eq!(d.len(), 48);
    assert_eq!(report_luns(&cdb(2, 16), &luns).unwrap().len(), 16);
    assert_eq!(&report_luns(&cdb(1, 16), &luns).unwrap()[..], &[0; 8]);
    assert_eq!(report_luns(&cdb(0, 15), &luns), Err(ScsiError::cdb(6)));
    assert_eq!(report_luns(&cdb(3, 64), &luns), Err(ScsiError::cdb(2)));
}

#[tokio::test]
async fn mode_sense() {
    let lu = lu();
    // MODE SENSE(6), all pages, block descriptor.
    let r = run(&lu, &[0x1A, 0, 0x3F, 0, 255, 0], &[]).await;
    good(&r);
    let d = &r.data_in;
    assert_eq!(usize::from(d[0]), d.len() - 1);
    assert_eq!((d[2], d[3]), (0x10, 8));
    assert_eq!(&d[4..12], &[0, 0, 0x04, 0x00, 0, 0, 0x02, 0x00]);
    assert_eq!(&d[12..14], &[0x08, 0x12]);
    assert_eq!(d[14] & 0x04, 0x04, "WCE");
    assert_eq!(&d[32..34], &[0x0A, 0x0A]);
    assert_eq!(&d[44..46], &[0x1C, 0x0A]);
    assert_eq!(d.len(), 56);
    // Truncated, but MODE DATA LENGTH stays the full length.
    let r = run(&lu, &[0x1A, 0, 0x3F, 0, 4, 0], &[]).await;
    assert_eq!(&r.data_in[..], &[55, 0, 0x10, 8]);
    // DBD, one page, changeable values.
    let r = run(&lu, &[0x1A, 0x08, 0x48, 0, 255, 0], &[]).await;
    assert_eq!(r.data_in[3], 0);
    assert_eq!(r.data_in[6], 0x04);
    assert!(r.data_in[7..].iter().all(|&b| b == 0));
    // Subpage FFh works, others do not; unknown page; saved values.
    good(&run(&lu, &[0x1A, 0, 0x3F, 0xFF, 255, 0], &[]).await);
    invalid_cdb(&run(&lu, &[0x1A, 0, 0x3F, 0x01, 255, 0], &[]).await);
    invalid_cdb(&run(&lu, &[0x1A, 0, 0x19, 0, 255, 0], &[]).await);
    check(
        &run(&lu, &[0x1A, 0, 0xC8, 0, 255, 0], &[]).await,
        SenseKey::ILLEGAL_REQUEST,
        0x39,
        0,
    );
    // MODE SENSE(10) with LLBAA: long descriptor.
    let r = run(&lu, &[0x5A, 0x10, 0x08, 0, 0, 0, 0, 1, 0, 0], &[]).await;
    let d = &r.data_in;
    assert_eq!(usize::from(u16::from_be_bytes([d[0], d[1]])), d.len() - 2);
    assert_eq!((d[4] & 1, d[7]), (1, 16));
    assert_eq!(&d[8..16], &1024u64.to_be_bytes());
    assert_eq!(&d[20..24], &512u32.to_be_bytes());
    assert_eq!(d[24], 0x08);
    let r = run(&lu, &[0x5A, 0, 0x0A, 0, 0, 0, 0, 1, 0, 0], &[]).await;
    assert_eq!(r.data_in[7], 8);
    assert_eq!(r.data_in.len(), 8 + 8 + 12);
}

#[tokio::test]
async fn mode_select() {
    let lu = lu();
    lu.add_nexus(NEXUS, "iqn.test:a,i,0x000000000001", 1);
    lu.add_nexus(OTHER, "iqn.test:b,i,0x000000000001", 1);
    let _ = run(&lu, &[0; 6], &[]).await;
    let _ = lu.execute(OTHER, &[0; 6], vec![], 0).await;
    // Take what MODE SENSE(10) returns, clear WCE, send it back (as sdparm does).
    let r = run(&lu, &[0x5A, 0, 0x08, 0, 0, 0, 0, 1, 0, 0], &[]).await;
    let mut list = r.data_in.to_vec();
    list[0] = 0;
    list[1] = 0;
    list[3] = 0; // device-specific parameter is ignored by us anyway
    list[16 + 2] &= !0x04;
    let l = (list.len() as u16).to_be_bytes();
    good(&run(&lu, &[0x55, 0x10, 0, 0, 0, 0, 0, l[0], l[1], 0], &list).await);
    assert!(!lu.wce());
    let r = run(&lu, &[0x1A, 0x08, 0x08, 0, 255, 0], &[]).await;
    assert_eq!(r.data_in[6] & 0x04, 0);
    // Default still says WCE=1.
    let r = run(&lu, &[0x1A, 0x08, 0x88, 0, 255, 0], &[]).await;
    assert_eq!(r.data_in[6] & 0x04, 0x04);
    // The other nexus hears about it; we do not.
    good(&run(&lu, &[0; 6], &[]).await);
    check(
        &lu.execute(OTHER, &[0; 6], vec![], 0).await,
        SenseKey::UNIT_ATTENTION,
        0x2A,
        0x01,
    );

    // Changing a non-changeable field: INVALID FIELD IN PARAMETER LIST at that byte.
    let mut list = vec![0u8, 0, 0, 0];
    let mut ctl = [0u8; 12];
    ctl[0] = 0x0A;
    ctl[1] = 0x0A;
    ctl[2] = 0x04; // D_SENSE
    ctl[3] = 0x10;
    ctl[8] = 0xFF;
    ctl[9] = 0xFF;
    list.extend_from_slice(&ctl);
    let s = check(
        &run(&lu, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list).await,
        SenseKey::ILLEGAL_REQUEST,
        0x26,
        0,
    );
    assert_eq!(s.sks, Some([0x80, 0, 6]));
    list[6] = 0;
    good(&run(&lu, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list).await);
    // Wrong page length, unknown page, truncated page, SP, bad block descriptor.
    list[5] = 0x0B;
    list.push(0);
    check(
        &run(&lu, &[0x15, 0x10, 0, 0, 17, 0], &list).await,
        SenseKey::ILLEGAL_REQUEST,
        0x26,
        0,
    );
    let bad = [0u8, 0, 0, 0, 0x19, 0x02, 0, 0];
    check(
        &run(&lu, &[0x15, 0x10, 0, 0, 8, 0], &bad).await,
        SenseKey::ILLEGAL_REQUEST,
        0x26,
        0,
    );
    check(
        &run(&lu, &[0x15, 0x10, 0, 0, 10, 0], &list[..10]).await,
        SenseKey::ILLEGAL_REQUEST,
        0x1A,
        0,
    );
    invalid_cdb(&run(&lu, &[0x15, 0x11, 0, 0, 16, 0], &list).await);
    let bd = [0u8, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x10, 0];
    check(
        &run(&lu, &[0x15, 0x10, 0, 0, 12, 0], &bd).await,
        SenseKey::ILLEGAL_REQUEST,
        0x26,
        0,
    );
    let bd = [0u8, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x02, 0];
    good(&run(&lu, &[0x15, 0x10, 0, 0, 12, 0], &bd).await);
    good(&run(&lu, &[0x15, 0x10, 0, 0, 0, 0], &[]).await);
}

#[tokio::test]
async fn request_sense_formats() {
    let lu = lu();
    let r = run(&lu, &[0x03, 0, 0, 0, 252, 0], &[]).await;
    good(&r);
    assert_eq!(&r.data_in[..], &Sense::NO_SENSE.to_fixed()[..]);
    let r = run(&lu, &[0x03, 0x01, 0, 0, 252, 0], &[]).await;
    assert_eq!(&r.data_in[..], &[0x72, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(run(&lu, &[0x03, 0, 0, 0, 8, 0], &[]).await.data_in.len(), 8);
}

#[tokio::test]
async fn start_stop_and_prevent_allow() {
    let lu = lu();
    good(&run(&lu, &[0x1B, 0x01, 0, 0, 0x02, 0], &[]).await);
    good(&run(&lu, &[0x1B, 0, 0, 0, 0x01, 0], &[]).await);
    good(&run(&lu, &[0x1E, 0, 0, 0, 1, 0], &[]).await);
    good(&run(&lu, &[0x1E, 0, 0, 0, 0, 0], &[]).await);
    invalid_cdb(&run(&lu, &[0x1E, 0, 0, 0, 2, 0], &[]).await);
}

fn rsoc(options: u8, rctd: bool, opcode: u8, sa: u16) -> [u8; 12] {
    let s = sa.to_be_bytes();
    let opts = options | if rctd { 0x80 } else { 0 };
    [0xA3, 0x0C, opts, opcode, s[0], s[1], 0, 0, 0xFF, 0xFF, 0, 0]
}

#[tokio::test]
async fn report_supported_operation_codes() {
    let lu = lu();
    let r = run(&lu, &rsoc(0, false, 0, 0), &[]).await;
    good(&r);
    let d = &r.data_in;
    let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize;
    assert_eq!(len + 4, d.len());
    assert_eq!(len % 8, 0);
    let descs: Vec<&[u8]> = d[4..].chunks(8).collect();
    // Every listed command answers one-command queries per its SERVACTV bit.
    for desc in &descs {
        let (opcode, sa, servactv) = (desc[0], u16::from_be_bytes([desc[2], desc[3]]), desc[5] & 1);
        let cdb_len = u16::from_be_bytes([desc[6], desc[7]]);
        if servactv == 1 {
            invalid_cdb(&run(&lu, &rsoc(1, false, opcode, sa), &[]).await);
            let r = run(&lu, &rsoc(2, false, opcode, sa), &[]).await;
            good(&r);
            assert_eq!(r.data_in[1] & 0x07, 3);
            assert_eq!(r.data_in[4], opcode);
        } else {
            invalid_cdb(&run(&lu, &rsoc(2, false, opcode, sa), &[]).await);
            let r = run(&lu, &rsoc(1, false, opcode, 0), &[]).await;
            good(&r);
            assert_eq!(r.data_in[1] & 0x07, 3);
            assert_eq!(u16::from_be_bytes([r.data_in[2], r.data_in[3]]), cdb_len);
            assert_eq!(r.data_in.len(), 4 + usize::from(cdb_len));
            assert_eq!(r.data_in[4], opcode);
            // The command accepts the CDB length it reports.
            assert!(opcodes::cdb_len(opcode) == Some(usize::from(cdb_len)));
        }
    }
    assert!(descs.iter().any(|d| d[0] == 0x28));
    // RCTD: 20-byte descriptors with CTDP and a timeouts descriptor.
    let r = run(&lu, &rsoc(0, true, 0, 0), &[]).await;
    let d = &r.data_in;
    assert_eq!((d.len() - 4) % 20, 0);
    assert_eq!(d[4 + 5] & 0x02, 0x02);
    assert_eq!(&d[4 + 8..4 + 10], &[0, 0x0A]);
    let r = run(&lu, &rsoc(1, true, 0x28, 0), &[]).await;
    assert_eq!(r.data_in[1] & 0x80, 0x80);
    assert_eq!(r.data_in.len(), 4 + 10 + 12);
    // Unsupported opcode: SUPPORT 001b; unsupported service action likewise.
    let r = run(&lu, &rsoc(1, false, 0xC5, 0), &[]).await;
    good(&r);
    assert_eq!(r.data_in[1] & 0x07, 1);
    let r = run(&lu, &rsoc(2, false, 0x9E, 0x13), &[]).await;
    assert_eq!(r.data_in[1] & 0x07, 1);
    invalid_cdb(&run(&lu, &rsoc(3, false, 0x28, 0), &[]).await);
    // Unsupported MAINTENANCE IN service action.
    invalid_cdb(&run(&lu, &[0xA3, 0x05, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]).await);
}

#[test]
fn no_lun_answers() {
    let r = execute_no_lun(&[0x12, 0, 0, 0, 96, 0], &[0, 1]);
    good(&r);
    assert_eq!(r.data_in[0], 0x7F);
    let r = execute_no_lun(&[0x12, 1, 0, 0, 96, 0], &[0, 1]);
    assert_eq!(&r.data_in[..], &[0x7F, 0, 0, 1, 0]);
    let r = execute_no_lun(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[0, 1]);
    good(&r);
    assert_eq!(&r.data_in[..4], &[0, 0, 0, 16]);
    let r = execute_no_lun(&[0x03, 0, 0, 0, 18, 0], &[]);
    good(&r);
    assert_eq!((r.data_in[2], r.data_in[12]), (0x05, 0x25));
    check(
        &execute_no_lun(&[0; 6], &[]),
        SenseKey::ILLEGAL_REQUEST,
        0x25,
        0,
    );
    check(
        &execute_no_lun(&rw10(0x28, 0, 0, 1), &[]),
        SenseKey::ILLEGAL_REQUEST,
        0x25,
        0,
    );
    check(
        &execute_no_lun(&[], &[]),
        SenseKey::ILLEGAL_REQUEST,
        0x25,
        0,
    );
}

#[test]
fn data_out_lengths() {
    let lu = lu();
    assert_eq!(lu.data_out_length(&rw10(0x2A, 0, 0, 3)), Ok(1536));
    assert_eq!(lu.data_out_length(&rw10(0x28, 0, 0, 3)), Ok(0));
    assert_eq!(lu.data_out_length(&rw10(0x41, 0, 0, 3)), Ok(512));
    assert_eq!(lu.data_out_length(&[0x15, 0x10, 0, 0, 28, 0]), Ok(28));
    assert_eq!(
        lu.data_out_length(&[0x55, 0x10, 0, 0, 0, 0, 0, 1, 2, 0]),
        Ok(258)
    );
    assert_eq!(lu.data_out_length(&[]), Ok(0));
    assert_eq!(lu.data_out_length(&[0x2A, 0]), Err(ScsiError::cdb(0)));
    // Write beyond the end: reported at once.
    assert_eq!(
        lu.data_out_length(&rw10(0x2A, 0, 1024, 1)),
        Err(ScsiError::LbaOutOfRange)
    );
}

#[test]
fn fuzz_hook_smoke() {
    internal::fuzz_cdb(&[]);
    internal::fuzz_cdb(&[4, 0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 2, 3]);
    internal::fuzz_cdb(&[0x85, 0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any CDB of 6..=16 bytes, with the opcode biased towards supported ones, never panics
    /// and always ends in GOOD or CHECK CONDITION with sense.
    #[test]
    fn arbitrary_cdbs_never_panic(
        known in proptest::sample::select(vec![
            0x00u8, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x1A, 0x1B, 0x1E, 0x25, 0x28, 0x2A, 0x2E,
            0x2F, 0x34, 0x35, 0x41, 0x42, 0x55, 0x5A, 0x88, 0x89, 0x8A, 0x8E, 0x8F, 0x90,
            0x91, 0x93, 0x9E, 0xA0, 0xA3, 0xA8, 0xAA, 0xAE, 0xAF,
        ]),
        use_known in any::<bool>(),
        mut cdb in proptest::collection::vec(any::<u8>(), 6..=16),
        data in proptest::collection::vec(any::<u8>(), 0..2048),
        data_len in 0u32..4096,
        ro in any::<bool>(),
    ) {
        if use_known {
            cdb[0] = known;
        }
        let lu = lu_with(64, 512, ro);
        lu.add_nexus(NEXUS, "iqn.test:a,i,0x000000000001", 1);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let _ = lu.data_out_length(&cdb);
        for _ in 0..2 {
            let r = rt.block_on(lu.execute(NEXUS, &cdb, vec![Bytes::from(data.clone())], data_len));
            prop_assert!(
                (r.status == status::GOOD && r.sense.is_none())
                    || (r.status == status::CHECK_CONDITION && r.sense.is_some())
            );
        }
        let r = execute_no_lun(&cdb, &[0, 5]);
        prop_assert!(r.status == status::GOOD || r.status == status::CHECK_CONDITION);
    }
}

#[tokio::test]
async fn orwrite() {
    // libiscsi OrWrite.Verify: zeros | A5 = A5, then | 5A = FF.
    let lu = lu();
    for (lba, n) in [(0u64, 1u32), (0, 7), (1024 - 3, 3)] {
        let len = n as usize * 512;
        let cdb = rw16(0x8A, 0, lba, n);
        good(&run(&lu, &cdb, &vec![0; len]).await);
        let or = rw16(0x8B, 0, lba, n);
        assert_eq!(lu.data_out_length(&or), Ok(len as u64));
        good(&run(&lu, &or, &vec![0xA5; len]).await);
        let r = run(&lu, &rw16(0x88, 0, lba, n), &[]).await;
        assert!(r.data_in.iter().all(|&b| b == 0xA5));
        // DPO and FUA accepted (OrWrite.DpoFua).
        good(&run(&lu, &rw16(0x8B, 0x18, lba, n), &vec![0x5A; len]).await);
        let r = run(&lu, &rw16(0x88, 0, lba, n), &[]).await;
        assert!(r.data_in.iter().all(|&b| b == 0xFF));
    }
    // A pattern ORed over a pattern.
    let a = pattern(1024, 1);
    let b = pattern(1024, 2);
    good(&run(&lu, &rw16(0x8A, 0, 50, 2), &a).await);
    good(&run(&lu, &rw16(0x8B, 0, 50, 2), &b).await);
    let r = run(&lu, &rw16(0x88, 0, 50, 2), &[]).await;
    let want: Vec<u8> = a.iter().zip(&b).map(|(x, y)| x | y).collect();
    assert_eq!(&r.data_in[..], &want[..]);
    // Zero blocks (OrWrite.ZeroBlocks), beyond the end (OrWrite.BeyondEol), ORPROTECT
    // without protection information (OrWrite.Protect).
    good(&run(&lu, &rw16(0x8B, 0, 0, 0), &[]).await);
    oob(&run(&lu, &rw16(0x8B, 0, 1024, 1), &[0; 512]).await);
    oob(&run(&lu, &rw16(0x8B, 0, u64::MAX, 1), &[0; 512]).await);
    for protect in 1..8u8 {
        invalid_cdb(&run(&lu, &rw16(0x8B, protect << 5, 0, 1), &[0; 512]).await);
    }
    let ro = lu_with(16, 512, true);
    check(
        &run(&ro, &rw16(0x8B, 0, 0, 1), &[0; 512]).await,
        SenseKey::DATA_PROTECT,
        0x27,
        0,
    );
}
