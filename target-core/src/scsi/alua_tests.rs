//! ALUA tests: INQUIRY TPGS, the device identification designators per target port, REPORT
//! TARGET PORT GROUPS in both header formats, and what a group in a non-active state refuses.

use bytes::Bytes;

use super::alua::AccessState;
use super::*;
use crate::lun::MemStore;

/// Sessions through portal group 1 and portal group 2 of the same initiator port.
const VIA_1: u64 = 1;
const VIA_2: u64 = 2;
const PORT: &str = "iqn.2024-01.test:host,i,0x400001370000";

fn lu() -> LogicalUnit {
    let store = Store::Memory(MemStore::new(64 * 512).unwrap());
    let id = LuIdentity::derive("iqn.2024-01.io.ktgt:alua", 0, None);
    let lu = LogicalUnit::new(0, store, 512, false, id).unwrap();
    lu.set_port_groups(&[2, 1]);
    lu.add_nexus(VIA_1, PORT, 1);
    lu.add_nexus(VIA_2, PORT, 2);
    lu
}

async fn run(lu: &LogicalUnit, nexus: u64, cdb: &[u8]) -> ScsiResult {
    lu.execute(nexus, cdb, vec![Bytes::new()], 0).await
}

/// Reports the POWER ON unit attention of `nexus` and checks the next command is served.
async fn settle(lu: &LogicalUnit, nexus: u64) {
    let r = run(lu, nexus, &[0; 6]).await;
    assert_eq!(r.status, status::CHECK_CONDITION);
    assert_eq!(run(lu, nexus, &[0; 6]).await.status, status::GOOD);
}

fn rtpg(format: u8, alloc: u32) -> [u8; 12] {
    let a = alloc.to_be_bytes();
    [
        0xA3,
        (format << 5) | 0x0A,
        0,
        0,
        0,
        0,
        a[0],
        a[1],
        a[2],
        a[3],
        0,
        0,
    ]
}

/// The (designator type, association, value) of each designation descriptor of page 83h.
fn designators(page: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut d = &page[4..];
    while d.len() >= 4 {
        let len = usize::from(d[3]);
        out.push((d[1] & 0x0F, (d[1] >> 4) & 0x03, d[4..4 + len].to_vec()));
        d = &d[4 + len..];
    }
    out
}

#[tokio::test]
async fn inquiry_reports_implicit_alua() {
    let lu = lu();
    let r = run(&lu, VIA_1, &[0x12, 0, 0, 0, 96, 0]).await;
    assert_eq!(r.status, status::GOOD);
    assert_eq!((r.data_in[5] >> 4) & 0x03, 0b01, "TPGS implicit only");
}

#[tokio::test]
async fn each_path_names_its_own_target_port_and_group() {
    let lu = lu();
    let mut lu_ids = Vec::new();
    for (nexus, tpgt) in [(VIA_1, 1u8), (VIA_2, 2)] {
        let r = run(&lu, nexus, &[0x12, 1, 0x83, 0x01, 0, 0]).await;
        assert_eq!(r.status, status::GOOD);
        let ds = designators(&r.data_in);
        // Type 4h relative target port, type 5h target port group: association 1 (port).
        assert!(ds.contains(&(0x4, 1, vec![0, 0, 0, tpgt])), "{ds:?}");
        assert!(ds.contains(&(0x5, 1, vec![0, 0, 0, tpgt])), "{ds:?}");
        let name = ds
            .iter()
            .find(|(t, a, _)| *t == 0x8 && *a == 1)
            .map(|(_, _, v)| {
                String::from_utf8_lossy(v)
                    .trim_end_matches('\0')
                    .to_string()
            })
            .unwrap();
        assert_eq!(name, format!("iqn.2024-01.io.ktgt:alua,t,0x000{tpgt}"));
        lu_ids.push(ds.into_iter().find(|(t, a, _)| *t == 0x3 && *a == 0));
    }
    // The LU's own designator is the same on both paths: that is how multipath pairs them.
    assert!(lu_ids[0].is_some());
    assert_eq!(lu_ids[0], lu_ids[1]);
}

#[tokio::test]
async fn report_target_port_groups_lists_every_group() {
    let lu = lu();
    settle(&lu, VIA_1).await;
    settle(&lu, VIA_2).await;
    // Length-only header: 4 bytes, then one 12-byte descriptor per group.
    let r = run(&lu, VIA_2, &rtpg(0, 1024)).await;
    assert_eq!(r.status, status::GOOD, "{r:?}");
    let d = &r.data_in;
    assert_eq!(d.len(), 4 + 2 * 12);
    assert_eq!(u32::from_be_bytes([d[0], d[1], d[2], d[3]]), 24);
    for (i, id) in [1u8, 2].into_iter().enumerate() {
        let g = &d[4 + 12 * i..16 + 12 * i];
        assert_eq!(g[0], 0x00, "active/optimized, not preferred");
        assert_eq!(g[1], 0x8F, "T_SUP U_SUP S_SUP AN_SUP AO_SUP");
        assert_eq!(&g[2..4], &[0, id]);
        assert_eq!(g[7], 1, "one target port");
        assert_eq!(&g[8..12], &[0, 0, 0, id]);
    }
    // Extended header: FORMAT TYPE 001b and the implicit transition time; the length counts
    // the header's last four bytes.
    let r = run(&lu, VIA_1, &rtpg(1, 1024)).await;
    let d = &r.data_in;
    assert_eq!(d.len(), 8 + 24);
    assert_eq!(u32::from_be_bytes([d[0], d[1], d[2], d[3]]), 28);
    assert_eq!(d[4] & 0x70, 0x10);
    assert_eq!(&d[8..12], &[0x00, 0x8F, 0, 1]);
    // ALLOCATION LENGTH truncates; a reserved format is INVALID FIELD IN CDB.
    assert_eq!(run(&lu, VIA_1, &rtpg(0, 6)).await.data_in.len(), 6);
    let r = run(&lu, VIA_1, &rtpg(2, 1024)).await;
    let s = r.sense.expect("sense");
    assert_eq!((s.key, s.asc, s.ascq), (SenseKey::ILLEGAL_REQUEST, 0x24, 0));
    // REPORT SUPPORTED OPERATION CODES lists it (one command, by service action).
    let r = run(
        &lu,
        VIA_1,
        &[0xA3, 0x0C, 0x02, 0xA3, 0, 0x0A, 0, 0, 0, 64, 0, 0],
    )
    .await;
    assert_eq!(r.data_in[1] & 0x07, 0x03, "supported: {r:?}");
}

#[tokio::test]
async fn a_standby_group_serves_only_what_spc4_allows() {
    let lu = lu();
    settle(&lu, VIA_1).await;
    settle(&lu, VIA_2).await;
    assert!(lu.set_access_state(2, AccessState::Standby));
    assert!(!lu.set_access_state(7, AccessState::Standby), "no group 7");
    // Every nexus hears of the change once: ASYMMETRIC ACCESS STATE CHANGED.
    for nexus in [VIA_1, VIA_2] {
        let r = run(&lu, nexus, &[0x12, 0, 0, 0, 36, 0]).await;
        assert_eq!(r.status, status::GOOD, "INQUIRY is not held up");
        let r = run(&lu, nexus, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]).await;
        let s = r.sense.expect("unit attention");
        assert_eq!(
            (s.key, s.asc, s.ascq),
            (SenseKey::UNIT_ATTENTION, 0x2A, 0x06)
        );
    }
    // Through group 2: READ CAPACITY and READ are NOT READY, TARGET PORT IN STANDBY STATE.
    for cdb in [
        &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
        &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0][..],
    ] {
        let r = run(&lu, VIA_2, cdb).await;
        let s = r.sense.expect("NOT READY");
        assert_eq!((s.key, s.asc, s.ascq), (SenseKey::NOT_READY, 0x04, 0x0B));
    }
    // What standby serves: INQUIRY, REPORT LUNS, RTPG, MODE SENSE, PERSISTENT RESERVE IN.
    for cdb in [
        &[0x12, 0, 0, 0, 36, 0][..],
        &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0][..],
        &rtpg(0, 256)[..],
        &[0x1A, 0, 0x3F, 0, 255, 0][..],
        &[0x5E, 0, 0, 0, 0, 0, 0, 0, 64, 0][..],
    ] {
        assert_eq!(
            run(&lu, VIA_2, cdb).await.status,
            status::GOOD,
            "{cdb:02x?}"
        );
    }
    // RTPG shows the state; group 1 still serves everything.
    let r = run(&lu, VIA_1, &rtpg(0, 1024)).await;
    assert_eq!(r.data_in[4] & 0x0F, 0x0);
    assert_eq!(r.data_in[16] & 0x0F, 0x2);
    assert_eq!(
        run(&lu, VIA_1, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])
            .await
            .status,
        status::GOOD
    );
    // Unavailable refuses MODE SENSE too, with its own qualifier; back to active serves all.
    lu.set_access_state(2, AccessState::Unavailable);
    let _ = run(&lu, VIA_2, &[0x03, 0, 0, 0, 18, 0]).await;
    let r = run(&lu, VIA_2, &[0x1A, 0, 0x3F, 0, 255, 0]).await;
    let s = r.sense.expect("NOT READY");
    assert_eq!((s.key, s.asc, s.ascq), (SenseKey::NOT_READY, 0x04, 0x0C));
    lu.set_access_state(2, AccessState::ActiveOptimized);
    let r = run(&lu, VIA_2, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]).await;
    assert_eq!(r.sense.map(|s| (s.asc, s.ascq)), Some((0x2A, 0x06)));
    assert_eq!(
        run(&lu, VIA_2, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])
            .await
            .status,
        status::GOOD
    );
}

#[test]
fn new_groups_start_active_and_known_ones_keep_their_state() {
    let lu = lu();
    lu.set_access_state(2, AccessState::Standby);
    lu.set_port_groups(&[1, 2, 3]);
    let states: Vec<(u16, AccessState)> =
        lu.port_groups().iter().map(|g| (g.id, g.state)).collect();
    assert_eq!(
        states,
        [
            (1, AccessState::ActiveOptimized),
            (2, AccessState::Standby),
            (3, AccessState::ActiveOptimized)
        ]
    );
    lu.set_port_groups(&[]);
    assert_eq!(lu.port_groups().len(), 1, "group 1 by default");
}
