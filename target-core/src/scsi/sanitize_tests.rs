//! SANITIZE and software write protect on an in-memory LU, following libiscsi's Sanitize.*
//! and ModeSense6.Control-SWP scenarios.

use bytes::Bytes;

use super::sanitize::SanitizeState;
use super::*;
use crate::lun::MemStore;

const NEXUS: u64 = 1;
const BLOCKS: u64 = 64;

fn lu() -> LogicalUnit {
    let store = Store::Memory(MemStore::new(BLOCKS * 512).unwrap());
    let id = LuIdentity::derive("iqn.2024-01.io.ktgt:sanitize", 0, None);
    let lu = LogicalUnit::new(0, store, 512, false, id).unwrap();
    lu.add_nexus(NEXUS, "iqn.2024-01.test:h,i,0x400001370000", 1);
    lu
}

async fn run(lu: &LogicalUnit, cdb: &[u8], data: &[u8]) -> ScsiResult {
    lu.execute(
        NEXUS,
        cdb,
        vec![Bytes::copy_from_slice(data)],
        data.len() as u32,
    )
    .await
}

async fn settled() -> LogicalUnit {
    let lu = lu();
    assert_eq!(run(&lu, &[0; 6], &[]).await.status, status::CHECK_CONDITION);
    lu
}

fn sense(r: &ScsiResult) -> (SenseKey, u8, u8) {
    let s = r.sense.unwrap_or_else(|| panic!("no sense: {r:?}"));
    (s.key, s.asc, s.ascq)
}

fn sanitize(sa: u8, immed: bool, len: u16) -> [u8; 10] {
    let l = len.to_be_bytes();
    [
        0x48,
        sa | if immed { 0x80 } else { 0 },
        0,
        0,
        0,
        0,
        0,
        l[0],
        l[1],
        0,
    ]
}

/// OVERWRITE parameter list: count, INVERT, then the pattern.
fn overwrite_list(count: u8, invert: bool, pattern: &[u8]) -> Vec<u8> {
    let mut p = vec![count | if invert { 0x80 } else { 0 }, 0];
    p.extend_from_slice(&(pattern.len() as u16).to_be_bytes());
    p.extend_from_slice(pattern);
    p
}

async fn read_all(lu: &LogicalUnit) -> Vec<u8> {
    let n = (BLOCKS as u16).to_be_bytes();
    let r = run(lu, &[0x28, 0, 0, 0, 0, 0, 0, n[0], n[1], 0], &[]).await;
    assert_eq!(r.status, status::GOOD, "{r:?}");
    r.data_in.to_vec()
}

const ILLEGAL: SenseKey = SenseKey::ILLEGAL_REQUEST;

#[tokio::test]
async fn overwrite_fills_every_block_with_the_pattern() {
    let lu = settled().await;
    let list = overwrite_list(1, false, &[0xAA; 512]);
    let r = run(&lu, &sanitize(1, false, list.len() as u16), &list).await;
    assert_eq!(r.status, status::GOOD, "{r:?}");
    assert!(read_all(&lu).await.iter().all(|&b| b == 0xAA));
    // A 4-byte pattern repeats within each block.
    let list = overwrite_list(1, false, b"ktgt");
    assert_eq!(
        run(&lu, &sanitize(1, false, 8), &list).await.status,
        status::GOOD
    );
    let data = read_all(&lu).await;
    assert!(data.chunks(4).all(|c| c == b"ktgt"));
    // Three passes with INVERT: the last pass writes the pattern as given.
    let list = overwrite_list(3, true, &[0x0F]);
    assert_eq!(
        run(&lu, &sanitize(1, false, 5), &list).await.status,
        status::GOOD
    );
    assert!(read_all(&lu).await.iter().all(|&b| b == 0x0F));
}

#[tokio::test]
async fn overwrite_parameter_errors() {
    let lu = settled().await;
    let full = overwrite_list(1, false, &[0xAA; 512]);
    // PARAMETER LIST LENGTH below 5 or above block size + 4: INVALID FIELD IN CDB.
    for len in [0u16, 1, 4, 517] {
        let mut data = full.clone();
        data.resize(usize::from(len), 0);
        let r = run(&lu, &sanitize(1, false, len), &data).await;
        assert_eq!(sense(&r), (ILLEGAL, 0x24, 0), "length {len}");
    }
    // OVERWRITE COUNT 0, INITIALIZATION PATTERN LENGTH 0 or past the block: INVALID FIELD
    // IN PARAMETER LIST.
    let mut zero_count = full.clone();
    zero_count[0] = 0;
    let mut zero_len = full.clone();
    zero_len[2..4].copy_from_slice(&[0, 0]);
    let mut long = full.clone();
    long[2..4].copy_from_slice(&516u16.to_be_bytes());
    for bad in [zero_count, zero_len, long] {
        let r = run(&lu, &sanitize(1, false, 516), &bad).await;
        assert_eq!(sense(&r), (ILLEGAL, 0x26, 0));
    }
    // Reserved CDB bits and bytes; unknown and unsupported service actions.
    let mut cdb = sanitize(1, false, 516);
    cdb[1] |= 0x40;
    assert_eq!(sense(&run(&lu, &cdb, &full).await), (ILLEGAL, 0x24, 0));
    let mut cdb = sanitize(1, false, 516);
    cdb[4] = 1;
    assert_eq!(sense(&run(&lu, &cdb, &full).await), (ILLEGAL, 0x24, 0));
    for sa in [0u8, 3, 4, 0x1E] {
        assert_eq!(
            sense(&run(&lu, &sanitize(sa, false, 0), &[]).await),
            (ILLEGAL, 0x24, 0),
            "service action {sa:#x}"
        );
    }
    // BLOCK ERASE and EXIT FAILURE MODE take no parameter list.
    for sa in [2u8, 0x1F] {
        let r = run(&lu, &sanitize(sa, false, 8), &[0; 8]).await;
        assert_eq!(sense(&r), (ILLEGAL, 0x24, 0), "service action {sa:#x}");
    }
}

#[tokio::test]
async fn block_erase_leaves_zeroes() {
    let lu = settled().await;
    let w = run(&lu, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0x55; 512]).await;
    assert_eq!(w.status, status::GOOD);
    assert_eq!(
        run(&lu, &sanitize(2, false, 0), &[]).await.status,
        status::GOOD
    );
    assert!(read_all(&lu).await.iter().all(|&b| b == 0));
    // Block Device Characteristics: WABEREQ 01b.
    let r = run(&lu, &[0x12, 1, 0xB1, 0, 64, 0], &[]).await;
    assert_eq!(r.data_in[7] >> 6, 0b01);
}

#[tokio::test]
async fn in_progress_and_failure_mode_answer_for_the_lu() {
    let lu = settled().await;
    lu.sanitize.set_for_test(SanitizeState::InProgress);
    for cdb in [
        &[0u8; 6][..],
        &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0][..],
        &[0x1B, 0, 0, 0, 1, 0][..],
    ] {
        assert_eq!(
            sense(&run(&lu, cdb, &[]).await),
            (SenseKey::NOT_READY, 0x04, 0x1B)
        );
    }
    assert_eq!(
        run(&lu, &[0x12, 0, 0, 0, 36, 0], &[]).await.status,
        status::GOOD
    );
    assert_eq!(
        run(&lu, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[])
            .await
            .status,
        status::GOOD
    );
    // A second SANITIZE waits its turn the same way.
    assert_eq!(
        sense(&run(&lu, &sanitize(2, false, 0), &[]).await),
        (SenseKey::NOT_READY, 0x04, 0x1B)
    );
    lu.sanitize.set_for_test(SanitizeState::Failed);
    assert_eq!(
        sense(&run(&lu, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]).await),
        (SenseKey::MEDIUM_ERROR, 0x31, 0x03)
    );
    assert_eq!(
        run(&lu, &sanitize(0x1F, false, 0), &[]).await.status,
        status::GOOD
    );
    assert_eq!(
        run(&lu, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[])
            .await
            .status,
        status::GOOD
    );
}

/// IMMED: the command completes once started; the sanitize finishes on its own.
#[tokio::test]
async fn immed_returns_before_the_sanitize_ends() {
    let lu = settled().await;
    let list = overwrite_list(1, false, &[0x11]);
    assert_eq!(
        run(&lu, &sanitize(1, true, 5), &list).await.status,
        status::GOOD
    );
    for _ in 0..100 {
        if lu.sanitize.get() == SanitizeState::Idle {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(read_all(&lu).await.iter().all(|&b| b == 0x11));
}

/// SPC-4 §7.5.8 SWP: changeable in the Control mode page; set, writes (and SANITIZE) end in
/// DATA PROTECT, MODE SENSE reports WP; a LOGICAL UNIT RESET clears it.
#[tokio::test]
async fn software_write_protect() {
    let lu = settled().await;
    let changeable = run(&lu, &[0x1A, 0x08, 0x40 | 0x0A, 0, 255, 0], &[]).await;
    assert_eq!(changeable.data_in[4 + 4] & 0x08, 0x08, "SWP changeable");
    let current = run(&lu, &[0x1A, 0x08, 0x0A, 0, 255, 0], &[]).await;
    let mut page = current.data_in[4..].to_vec();
    page[4] |= 0x08;
    let mut list = vec![0, 0, 0, 0];
    list.extend_from_slice(&page);
    let sel = [0x15, 0x10, 0, 0, list.len() as u8, 0];
    assert_eq!(run(&lu, &sel, &list).await.status, status::GOOD);
    let ms = run(&lu, &[0x1A, 0x08, 0x0A, 0, 255, 0], &[]).await;
    assert_eq!(ms.data_in[2] & 0x80, 0x80, "WP");
    assert_eq!(ms.data_in[4 + 4] & 0x08, 0x08, "SWP");
    let w = run(&lu, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 512]).await;
    assert_eq!(sense(&w), (SenseKey::DATA_PROTECT, 0x27, 0));
    let list5 = overwrite_list(1, false, &[1]);
    let s = run(&lu, &sanitize(1, false, 5), &list5).await;
    assert_eq!(sense(&s), (SenseKey::DATA_PROTECT, 0x27, 0));
    assert_eq!(
        run(&lu, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[])
            .await
            .status,
        status::GOOD
    );
    lu.reset();
    let _ = run(&lu, &[0; 6], &[]).await;
    let w = run(&lu, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 512]).await;
    assert_eq!(w.status, status::GOOD);
}

/// SBC-3 §4.11.2: an aborted SANITIZE (its command dropped, as ABORT TASK or a lost
/// connection does) goes on to the end.
#[tokio::test]
async fn a_sanitize_outlives_its_aborted_command() {
    // A file store through the thread pool: its writes wait, so the command is pending
    // when dropped.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = crate::lun::StoreConfig::new(dir.path().join("lun.img"), 512);
    cfg.create_size = Some(BLOCKS * 512);
    cfg.engine = crate::lun::Engine::ThreadPool;
    let store = Store::open(&cfg).unwrap();
    let id = LuIdentity::derive("iqn.2024-01.io.ktgt:sanitize", 0, None);
    let lu = LogicalUnit::new(0, store, 512, false, id).unwrap();
    let list = overwrite_list(2, false, &[0x77]);
    let cdb = sanitize(1, false, 5);
    let command = run(&lu, &cdb, &list);
    // Polled once (the sanitize starts), then dropped.
    let _ = tokio::time::timeout(std::time::Duration::ZERO, command).await;
    for _ in 0..200 {
        if lu.sanitize.get() == SanitizeState::Idle {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(lu.sanitize.get(), SanitizeState::Idle);
    assert!(read_all(&lu).await.iter().all(|&b| b == 0x77));
}
