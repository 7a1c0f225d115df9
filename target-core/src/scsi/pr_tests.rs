//! Reservation tests: several I_T nexuses (session ids mapped to initiator ports) on one
//! in-memory LU, following the scenarios of libiscsi's Prin*, Prout* and Reserve6 tests.

use bytes::Bytes;

use super::*;
use crate::lun::MemStore;

const A: u64 = 1;
const B: u64 = 2;
const PORT_A: &str = "iqn.2007-10.test:a,i,0x000000000001";
const PORT_B: &str = "iqn.2007-10.test:b,i,0x000000000002";
const K1: u64 = 0x1111_2222_3333_4444;
const K2: u64 = 0x5555_6666_7777_8888;

/// PERSISTENT RESERVE OUT service actions.
const REGISTER: u8 = 0;
const RESERVE: u8 = 1;
const RELEASE: u8 = 2;
const CLEAR: u8 = 3;
const PREEMPT: u8 = 4;
const PREEMPT_AND_ABORT: u8 = 5;
const REGISTER_AND_IGNORE: u8 = 6;

/// Reservation types.
const WE: u8 = 1;
const EA: u8 = 3;
const WE_RO: u8 = 5;
const EA_RO: u8 = 6;
const WE_AR: u8 = 7;
const EA_AR: u8 = 8;

/// A LU with sessions A and B, their POWER ON unit attentions already reported.
async fn lu() -> LogicalUnit {
    let store = Store::Memory(MemStore::new(64 * 512).unwrap());
    let id = LuIdentity::derive("iqn.2024-01.io.ktgt:pr", 0, None);
    let lu = LogicalUnit::new(0, store, 512, false, id).unwrap();
    lu.add_nexus(A, PORT_A, 1);
    lu.add_nexus(B, PORT_B, 1);
    assert_eq!(take_uas(&lu, A).await, vec![(0x29, 0)]);
    assert_eq!(take_uas(&lu, B).await, vec![(0x29, 0)]);
    lu
}

async fn run(lu: &LogicalUnit, nexus: u64, cdb: &[u8], data: &[u8]) -> ScsiResult {
    lu.execute(
        nexus,
        cdb,
        vec![Bytes::copy_from_slice(data)],
        data.len() as u32,
    )
    .await
}

/// TEST UNIT READY until GOOD; returns the unit attentions reported on the way.
async fn take_uas(lu: &LogicalUnit, nexus: u64) -> Vec<(u8, u8)> {
    let mut seen = Vec::new();
    for _ in 0..16 {
        let r = run(lu, nexus, &[0; 6], &[]).await;
        if r.status == status::GOOD {
            return seen;
        }
        let s = r.sense.expect("unit attention sense");
        assert_eq!(s.key, SenseKey::UNIT_ATTENTION, "{r:?}");
        seen.push((s.asc, s.ascq));
    }
    panic!("unit attentions do not stop: {seen:?}");
}

fn prout_cdb(sa: u8, kind: u8, len: u32) -> [u8; 10] {
    let l = len.to_be_bytes();
    [0x5F, sa, kind, 0, 0, l[0], l[1], l[2], l[3], 0]
}

fn prout_params(key: u64, sa_key: u64, flags: u8) -> [u8; 24] {
    let mut p = [0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = flags;
    p
}

async fn prout(
    lu: &LogicalUnit,
    nexus: u64,
    sa: u8,
    kind: u8,
    key: u64,
    sa_key: u64,
) -> ScsiResult {
    let cdb = prout_cdb(sa, kind, 24);
    assert_eq!(lu.data_out_length(&cdb), Ok(24));
    run(lu, nexus, &cdb, &prout_params(key, sa_key, 0)).await
}

async fn prin(lu: &LogicalUnit, nexus: u64, sa: u8, alloc: u16) -> ScsiResult {
    let a = alloc.to_be_bytes();
    run(lu, nexus, &[0x5E, sa, 0, 0, 0, 0, 0, a[0], a[1], 0], &[]).await
}

/// READ KEYS: (PRGENERATION, keys).
async fn read_keys(lu: &LogicalUnit, nexus: u64) -> (u32, Vec<u64>) {
    let r = prin(lu, nexus, 0, 4096).await;
    good(&r);
    let d = &r.data_in;
    let gen = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
    let len = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as usize;
    assert_eq!(d.len(), 8 + len);
    let keys = d[8..]
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect();
    (gen, keys)
}

/// READ RESERVATION: `Some((key, type))` when reserved.
async fn read_reservation(lu: &LogicalUnit, nexus: u64) -> Option<(u64, u8)> {
    let r = prin(lu, nexus, 1, 4096).await;
    good(&r);
    let d = &r.data_in;
    match u32::from_be_bytes([d[4], d[5], d[6], d[7]]) {
        0 => {
            assert_eq!(d.len(), 8);
            None
        }
        16 => {
            assert_eq!(d.len(), 24);
            let key = u64::from_be_bytes(d[8..16].try_into().unwrap());
            assert_eq!(d[21] >> 4, 0, "LU_SCOPE");
            Some((key, d[21] & 0x0F))
        }
        n => panic!("ADDITIONAL LENGTH {n}"),
    }
}

async fn read1(lu: &LogicalUnit, nexus: u64) -> ScsiResult {
    run(lu, nexus, &[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0], &[]).await
}

async fn write1(lu: &LogicalUnit, nexus: u64) -> ScsiResult {
    run(lu, nexus, &[0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0], &[0xAB; 512]).await
}

#[track_caller]
fn good(r: &ScsiResult) {
    assert_eq!(r.status, status::GOOD, "expected GOOD, got {r:?}");
}

#[track_caller]
fn conflict(r: &ScsiResult) {
    assert_eq!(
        r.status,
        status::RESERVATION_CONFLICT,
        "expected RESERVATION CONFLICT, got {r:?}"
    );
    assert!(r.sense.is_none(), "RESERVATION CONFLICT carries no sense");
    assert!(r.data_in.is_empty());
}

#[track_caller]
fn check(r: &ScsiResult, key: SenseKey, asc: u8, ascq: u8) {
    assert_eq!(r.status, status::CHECK_CONDITION, "{r:?}");
    let s = r.sense.expect("sense");
    assert_eq!((s.key, s.asc, s.ascq), (key, asc, ascq), "{s:?}");
}

#[track_caller]
fn allowed(r: &ScsiResult, yes: bool) {
    if yes {
        good(r)
    } else {
        conflict(r)
    }
}

#[test]
fn initiator_port_is_name_and_isid() {
    assert_eq!(
        initiator_port("iqn.2007-10.Test:A", &[0x80, 0, 0, 0, 0x12, 0x34]),
        "iqn.2007-10.test:a,i,0x800000001234"
    );
}

#[tokio::test]
async fn register_reregister_unregister() {
    // ProutRegister.Simple.
    let lu = lu().await;
    assert_eq!(read_keys(&lu, A).await, (0, vec![]));
    // Unregistered, SARK zero: nothing happens, PRGENERATION unchanged.
    good(&prout(&lu, A, REGISTER, 0, 0, 0).await);
    assert_eq!(read_keys(&lu, A).await, (0, vec![]));
    // Unregistered REGISTER with a non-zero RESERVATION KEY conflicts.
    conflict(&prout(&lu, A, REGISTER, 0, 7, K1).await);
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
    assert_eq!(read_keys(&lu, B).await, (1, vec![K1]));
    // Re-register with the wrong RESERVATION KEY conflicts.
    conflict(&prout(&lu, A, REGISTER, 0, 0, K1 + 1).await);
    // With the right one the key changes.
    good(&prout(&lu, A, REGISTER, 0, K1, K2).await);
    assert_eq!(read_keys(&lu, A).await, (2, vec![K2]));
    // REGISTER AND IGNORE EXISTING KEY ignores the RESERVATION KEY field.
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 999, K1).await);
    assert_eq!(read_keys(&lu, A).await, (3, vec![K1]));
    good(&prout(&lu, B, REGISTER_AND_IGNORE, 0, 0, K2).await);
    assert_eq!(read_keys(&lu, A).await, (4, vec![K1, K2]));
    // Unregister.
    good(&prout(&lu, A, REGISTER, 0, K1, 0).await);
    good(&prout(&lu, B, REGISTER_AND_IGNORE, 0, 0, 0).await);
    assert_eq!(read_keys(&lu, A).await, (6, vec![]));
    // Registrations alone never raise the fast-path flag.
    assert!(!lu.reserved.load(std::sync::atomic::Ordering::Acquire));
}

#[tokio::test]
async fn read_keys_truncated_keeps_additional_length() {
    // PrinReadKeys.Truncate.
    let lu = lu().await;
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
    let r = prin(&lu, A, 0, 8).await;
    good(&r);
    assert_eq!(&r.data_in[..], &[0, 0, 0, 1, 0, 0, 0, 8]);
    let r = prin(&lu, A, 0, 3).await;
    assert_eq!(r.data_in.len(), 3);
}

#[tokio::test]
async fn report_capabilities() {
    // PrinReportCapabilities.Simple: LENGTH 8, ALLOW COMMANDS <= 5, only defined types, and
    // every advertised type can be reserved, read back and released.
    let lu = lu().await;
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
    let r = prin(&lu, A, 2, 4096).await;
    good(&r);
    let d = &r.data_in;
    assert_eq!(d.len(), 8);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]), 8);
    assert_eq!(d[2] & 0x0D, 0, "SIP_C, ATP_C, PTPL_C");
    assert!((d[3] >> 4) & 0x07 <= 5);
    assert_eq!(d[3] & 0x01, 0, "PTPL_A");
    let mask = u16::from_be_bytes([d[4], d[5]]);
    assert_eq!(mask, 0xEA01);
    for kind in [WE_AR, EA_RO, WE_RO, EA, WE, EA_AR] {
        good(&prout(&lu, A, RESERVE, kind, K1, 0).await);
        let key = if kind >= WE_AR { 0 } else { K1 };
        assert_eq!(read_reservation(&lu, A).await, Some((key, kind)));
        good(&prout(&lu, A, RELEASE, kind, K1, 0).await);
        assert_eq!(read_reservation(&lu, A).await, None);
    }
    // RESERVE and RELEASE do not bump PRGENERATION.
    assert_eq!(read_keys(&lu, A).await.0, 1);
    good(&prout(&lu, A, REGISTER, 0, K1, 0).await);
}

#[tokio::test]
async fn access_by_reservation_type() {
    // ProutReserve.Access*: (registered B reads, writes, unregistered B reads, writes).
    let cases = [
        (EA, false, false, false, false),
        (WE, true, false, true, false),
        (EA_RO, true, true, false, false),
        (WE_RO, true, true, true, false),
        (EA_AR, true, true, false, false),
        (WE_AR, true, true, true, false),
    ];
    for (kind, reg_r, reg_w, unreg_r, unreg_w) in cases {
        let lu = lu().await;
        good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
        good(&prout(&lu, B, REGISTER_AND_IGNORE, 0, 0, K2).await);
        good(&prout(&lu, A, RESERVE, kind, K1, 0).await);
        assert!(lu.reserved.load(std::sync::atomic::Ordering::Acquire));
        // Another nexus cannot take a reservation that exists, unless it already holds it
        // (every registrant holds an all-registrants reservation).
        allowed(&prout(&lu, B, RESERVE, kind, K2, 0).await, kind >= WE_AR);
        good(&read1(&lu, A).await);
        good(&write1(&lu, A).await);
        allowed(&read1(&lu, B).await, reg_r);
        allowed(&write1(&lu, B).await, reg_w);
        // Commands every type allows.
        good(&run(&lu, B, &[0x12, 0, 0, 0, 96, 0], &[]).await);
        good(&run(&lu, B, &[0; 6], &[]).await);
        good(&run(&lu, B, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
        good(&prin(&lu, B, 0, 64).await);
        good(&prout(&lu, B, REGISTER, 0, K2, 0).await);
        allowed(&read1(&lu, B).await, unreg_r);
        allowed(&write1(&lu, B).await, unreg_w);
        // The write side of the hot path and the rest of the command set agree.
        allowed(
            &run(&lu, B, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await,
            unreg_w,
        );
        good(&prout(&lu, A, RELEASE, kind, K1, 0).await);
        assert!(!lu.reserved.load(std::sync::atomic::Ordering::Acquire));
        good(&write1(&lu, B).await);
        good(&prout(&lu, A, REGISTER, 0, K1, 0).await);
        assert_eq!(read_keys(&lu, B).await.1, Vec::<u64>::new());
        assert_eq!(take_uas(&lu, B).await, vec![]);
    }
}

#[tokio::test]
async fn ownership_when_the_holder_unregisters() {
    // ProutReserve.Ownership*: unregistering the holder releases the reservation, except for
    // all-registrants types, which another registrant still holds.
    for kind in [EA, WE, EA_RO, WE_RO, EA_AR, WE_AR] {
        let lu = lu().await;
        good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
        good(&prout(&lu, B, REGISTER_AND_IGNORE, 0, 0, K2).await);
        good(&prout(&lu, A, RESERVE, kind, K1, 0).await);
        good(&prout(&lu, A, REGISTER, 0, K1, 0).await);
        // The unregistering nexus gets no unit attention.
        assert_eq!(take_uas(&lu, A).await, vec![], "type {kind}");
        if kind >= WE_AR {
            assert_eq!(read_reservation(&lu, A).await, Some((0, kind)));
            good(&prout(&lu, B, RELEASE, kind, K2, 0).await);
            assert_eq!(take_uas(&lu, B).await, vec![]);
        } else {
            assert_eq!(read_reservation(&lu, A).await, None);
            // SPC-4 §5.12.11.2.1: RESERVATIONS RELEASED for the other registrants of a
            // registrants-only reservation.
            let expect = if kind == WE_RO || kind == EA_RO {
                vec![(0x2A, 0x04)]
            } else {
                vec![]
            };
            assert_eq!(take_uas(&lu, B).await, expect, "type {kind}");
        }
        good(&prout(&lu, B, REGISTER, 0, K2, 0).await);
        assert_eq!(read_keys(&lu, A).await.1, Vec::<u64>::new());
    }
}

#[tokio::test]
async fn clear_removes_everything() {
    // ProutClear.Simple: PRGENERATION goes up once for CLEAR, not for RESERVE.
    let lu = lu().await;
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
    good(&prout(&lu, B, REGISTER_AND_IGNORE, 0, 0, K2).await);
    let (gen, keys) = read_keys(&lu, A).await;
    assert_eq!(keys, vec![K1, K2]);
    good(&prout(&lu, A, RESERVE, EA, K1, 0).await);
    assert_eq!(read_reservation(&lu, A).await, Some((K1, EA)));
    // Only a registered nexus with its own key may clear.
    conflict(&prout(&lu, B, CLEAR, 0, K1, 0).await);
    good(&prout(&lu, A, CLEAR, 0, K1, 0).await);
    assert_eq!(read_reservation(&lu, A).await, None);
    assert_eq!(read_keys(&lu, A).await, (gen + 1, vec![]));
    assert_eq!(take_uas(&lu, B).await, vec![(0x2A, 0x03)]);
    assert_eq!(take_uas(&lu, A).await, vec![]);
    good(&write1(&lu, B).await);
}

#[tokio::test]
async fn preempt_removes_a_registration() {
    // ProutPreempt.RemoveRegistration: no reservation; PREEMPT removes the registrations with
    // the SERVICE ACTION RESERVATION KEY and bumps PRGENERATION once.
    let lu = lu().await;
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
    good(&prout(&lu, A, CLEAR, 0, K1, 0).await);
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
    good(&prout(&lu, B, REGISTER_AND_IGNORE, 0, 0, K2).await);
    let (gen, keys) = read_keys(&lu, A).await;
    assert_eq!(keys.len(), 2);
    // A key nobody holds conflicts; a zero key is an invalid parameter.
    conflict(&prout(&lu, B, PREEMPT, EA, K2, 42).await);
    check(
        &prout(&lu, B, PREEMPT, EA, K2, 0).await,
        SenseKey::ILLEGAL_REQUEST,
        0x26,
        0x00,
    );
    good(&prout(&lu, B, PREEMPT, EA, K2, K1).await);
    assert_eq!(take_uas(&lu, A).await, vec![(0x2A, 0x05)]);
    assert_eq!(take_uas(&lu, B).await, vec![]);
    assert_eq!(read_keys(&lu, A).await, (gen + 1, vec![K2]));
    assert_eq!(read_reservation(&lu, A).await, None);
    good(&prout(&lu, B, REGISTER, 0, K2, 0).await);
}

#[tokio::test]
async fn preempt_takes_over_the_reservation() {
    let lu = lu().await;
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
    good(&prout(&lu, B, REGISTER_AND_IGNORE, 0, 0, K2).await);
    good(&prout(&lu, A, RESERVE, WE, K1, 0).await);
    conflict(&write1(&lu, B).await);
    // PREEMPT AND ABORT naming the holder's key: B holds a new EA reservation, A is gone.
    good(&prout(&lu, B, PREEMPT_AND_ABORT, EA, K2, K1).await);
    assert_eq!(read_reservation(&lu, B).await, Some((K2, EA)));
    assert_eq!(read_keys(&lu, B).await.1, vec![K2]);
    assert_eq!(take_uas(&lu, A).await, vec![(0x2A, 0x05)]);
    conflict(&read1(&lu, A).await);
    good(&write1(&lu, B).await);
    // All-registrants with a zero key: everyone else is removed, the preempter holds it.
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
    good(&prout(&lu, B, RELEASE, EA, K2, 0).await);
    good(&prout(&lu, B, RESERVE, WE_AR, K2, 0).await);
    good(&prout(&lu, A, PREEMPT, EA_RO, K1, 0).await);
    assert_eq!(read_reservation(&lu, A).await, Some((K1, EA_RO)));
    assert_eq!(read_keys(&lu, A).await.1, vec![K1]);
    assert_eq!(take_uas(&lu, B).await, vec![(0x2A, 0x05)]);
    conflict(&read1(&lu, B).await);
    good(&prout(&lu, A, CLEAR, 0, K1, 0).await);
}

#[tokio::test]
async fn registrations_belong_to_the_initiator_port() {
    // A re-login of the same initiator name and ISID is the same I_T nexus.
    let lu = lu().await;
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
    good(&prout(&lu, A, RESERVE, WE, K1, 0).await);
    lu.remove_nexus(A);
    lu.remove_nexus(A);
    // The registration and the reservation survive I_T nexus loss and LUN reset.
    lu.reset();
    assert_eq!(take_uas(&lu, B).await, vec![(0x29, 0x03)]);
    assert_eq!(read_reservation(&lu, B).await.map(|r| r.0), Some(K1));
    conflict(&write1(&lu, B).await);
    lu.add_nexus(7, PORT_A, 1);
    take_uas(&lu, 7).await;
    good(&write1(&lu, 7).await);
    good(&prout(&lu, 7, RELEASE, WE, K1, 0).await);
    good(&prout(&lu, 7, REGISTER, 0, K1, 0).await);
    assert_eq!(read_keys(&lu, 7).await.1, Vec::<u64>::new());
    // A session that never called add_nexus is an I_T nexus of its own.
    good(&prout(&lu, 99, REGISTER_AND_IGNORE, 0, 0, K2).await);
    conflict(&prout(&lu, 7, REGISTER, 0, K2, 0).await);
    good(&prout(&lu, 99, REGISTER, 0, K2, 0).await);
}

#[tokio::test]
async fn prout_field_checks() {
    let lu = lu().await;
    let params = prout_params(0, K1, 0);
    // PARAMETER LIST LENGTH other than 24, or less data than that.
    check(
        &run(&lu, A, &prout_cdb(REGISTER, 0, 23), &params[..23]).await,
        SenseKey::ILLEGAL_REQUEST,
        0x1A,
        0,
    );
    check(
        &run(&lu, A, &prout_cdb(REGISTER, 0, 24), &params[..20]).await,
        SenseKey::ILLEGAL_REQUEST,
        0x1A,
        0,
    );
    // APTPL (refused on a memory LU: PTPL_C=0), SPEC_I_PT, ALL_TG_PT.
    for (flag, bit) in [(0x01, 0), (0x08, 3), (0x04, 2)] {
        let r = run(
            &lu,
            A,
            &prout_cdb(REGISTER, 0, 24),
            &prout_params(0, K1, flag),
        )
        .await;
        check(&r, SenseKey::ILLEGAL_REQUEST, 0x26, 0);
        assert_eq!(r.sense.unwrap().sks, Some([0x88 | bit, 0, 20]));
    }
    assert_eq!(read_keys(&lu, A).await, (0, vec![]));
    // REGISTER AND MOVE (not offered), a reserved service action, bad TYPE and SCOPE.
    for cdb in [
        prout_cdb(7, WE, 24),
        prout_cdb(8, WE, 24),
        prout_cdb(RESERVE, 2, 24),
        prout_cdb(RESERVE, 0x11, 24),
    ] {
        check(
            &run(&lu, A, &cdb, &params).await,
            SenseKey::ILLEGAL_REQUEST,
            0x24,
            0,
        );
    }
    // RELEASE by the holder with another TYPE.
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
    good(&prout(&lu, A, RESERVE, WE, K1, 0).await);
    check(
        &prout(&lu, A, RELEASE, EA, K1, 0).await,
        SenseKey::ILLEGAL_REQUEST,
        0x26,
        0x04,
    );
    // The holder reserving again with the same type is a no-op, another type conflicts.
    good(&prout(&lu, A, RESERVE, WE, K1, 0).await);
    conflict(&prout(&lu, A, RESERVE, EA, K1, 0).await);
    // RELEASE with the wrong key conflicts; from a non-holder registrant it does nothing.
    conflict(&prout(&lu, A, RELEASE, WE, K2, 0).await);
    good(&prout(&lu, B, REGISTER_AND_IGNORE, 0, 0, K2).await);
    good(&prout(&lu, B, RELEASE, WE, K2, 0).await);
    assert_eq!(read_reservation(&lu, A).await, Some((K1, WE)));
    // Unregistered nexuses cannot reserve, release, clear or preempt.
    good(&prout(&lu, B, REGISTER, 0, K2, 0).await);
    for sa in [RESERVE, RELEASE, CLEAR, PREEMPT] {
        conflict(&prout(&lu, B, sa, WE, 0, K1).await);
    }
    // PERSISTENT RESERVE IN: reserved service action.
    check(
        &prin(&lu, A, 4, 64).await,
        SenseKey::ILLEGAL_REQUEST,
        0x24,
        0,
    );
    good(&prout(&lu, A, CLEAR, 0, K1, 0).await);
}

#[tokio::test]
async fn read_full_status() {
    let lu = lu().await;
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
    good(&prout(&lu, B, REGISTER_AND_IGNORE, 0, 0, K2).await);
    good(&prout(&lu, A, RESERVE, WE_RO, K1, 0).await);
    let r = prin(&lu, A, 3, 4096).await;
    good(&r);
    let d = &r.data_in;
    assert_eq!(u32::from_be_bytes([d[0], d[1], d[2], d[3]]), 2);
    let len = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as usize;
    assert_eq!(d.len(), 8 + len);
    let mut at = 8;
    let mut seen = Vec::new();
    while at < d.len() {
        let desc = &d[at..];
        let key = u64::from_be_bytes(desc[..8].try_into().unwrap());
        let holder = desc[12] & 0x01 != 0;
        let kind = desc[13];
        assert_eq!(u16::from_be_bytes([desc[18], desc[19]]), 1);
        let tid_len = u32::from_be_bytes([desc[20], desc[21], desc[22], desc[23]]) as usize;
        let tid = &desc[24..24 + tid_len];
        assert_eq!(tid[0], 0x45);
        let name_len = usize::from(u16::from_be_bytes([tid[2], tid[3]]));
        let name = &tid[4..4 + name_len];
        let end = name.iter().position(|&b| b == 0).unwrap();
        seen.push((
            key,
            holder,
            kind,
            String::from_utf8(name[..end].to_vec()).unwrap(),
        ));
        at += 24 + tid_len;
    }
    assert_eq!(
        seen,
        vec![
            (K1, true, WE_RO, PORT_A.to_owned()),
            (K2, false, 0, PORT_B.to_owned())
        ]
    );
    good(&prout(&lu, A, CLEAR, 0, K1, 0).await);
}

#[tokio::test]
async fn reserve6_two_initiators() {
    // Reserve6.Simple and Reserve6.2Initiators.
    let lu = lu().await;
    let reserve6 = [0x16, 0, 0, 0, 0, 0];
    let release6 = [0x17, 0, 0, 0, 0, 0];
    let mode_sense = [0x1A, 0, 0x3F, 0, 0xFF, 0];
    good(&run(&lu, A, &reserve6, &[]).await);
    good(&run(&lu, A, &reserve6, &[]).await);
    conflict(&run(&lu, B, &reserve6, &[]).await);
    // RELEASE from another nexus is a no-op.
    good(&run(&lu, B, &release6, &[]).await);
    good(&run(&lu, A, &mode_sense, &[]).await);
    conflict(&run(&lu, B, &mode_sense, &[]).await);
    conflict(&read1(&lu, B).await);
    conflict(&run(&lu, B, &[0; 6], &[]).await);
    good(&run(&lu, B, &[0x12, 0, 0, 0, 96, 0], &[]).await);
    good(&run(&lu, B, &[0x03, 0, 0, 0, 18, 0], &[]).await);
    // PERSISTENT RESERVE IN/OUT conflict for everyone while an SPC-2 reservation exists.
    conflict(&prin(&lu, A, 0, 64).await);
    conflict(&prout(&lu, B, REGISTER_AND_IGNORE, 0, 0, K2).await);
    conflict(&run(&lu, B, &reserve6, &[]).await);
    good(&run(&lu, A, &release6, &[]).await);
    // The 10-byte forms.
    good(&run(&lu, B, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
    conflict(&write1(&lu, A).await);
    good(&write1(&lu, B).await);
    good(&run(&lu, B, &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
    good(&write1(&lu, A).await);
    // Third-party reservations are not supported.
    check(
        &run(&lu, A, &[0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await,
        SenseKey::ILLEGAL_REQUEST,
        0x24,
        0,
    );
    assert!(!lu.reserved.load(std::sync::atomic::Ordering::Acquire));
}

#[tokio::test]
async fn reserve6_released_by_nexus_loss_and_lun_reset() {
    // Reserve6.Logout, Reserve6.ITNexusLoss, Reserve6.LUNReset.
    let lu = lu().await;
    let reserve6 = [0x16, 0, 0, 0, 0, 0];
    good(&run(&lu, A, &reserve6, &[]).await);
    conflict(&run(&lu, B, &reserve6, &[]).await);
    lu.remove_nexus(A);
    lu.add_nexus(3, PORT_A, 1);
    take_uas(&lu, 3).await;
    good(&run(&lu, B, &reserve6, &[]).await);
    conflict(&run(&lu, 3, &reserve6, &[]).await);
    lu.reset();
    assert_eq!(take_uas(&lu, 3).await, vec![(0x29, 0x03)]);
    good(&run(&lu, 3, &reserve6, &[]).await);
    good(&run(&lu, 3, &[0x17, 0, 0, 0, 0, 0], &[]).await);
}

#[tokio::test]
async fn reserve6_conflicts_with_registrations() {
    // SPC-4 §5.12.3: RESERVE and RELEASE conflict while any nexus is registered.
    let lu = lu().await;
    good(&prout(&lu, B, REGISTER_AND_IGNORE, 0, 0, K2).await);
    conflict(&run(&lu, A, &[0x16, 0, 0, 0, 0, 0], &[]).await);
    conflict(&run(&lu, B, &[0x17, 0, 0, 0, 0, 0], &[]).await);
    good(&prout(&lu, B, REGISTER, 0, K2, 0).await);
    good(&run(&lu, A, &[0x16, 0, 0, 0, 0, 0], &[]).await);
    good(&run(&lu, A, &[0x17, 0, 0, 0, 0, 0], &[]).await);
}

#[tokio::test]
async fn registration_limit() {
    let lu = lu().await;
    for n in 0..MAX_REGISTRATIONS as u64 {
        good(&prout(&lu, 100 + n, REGISTER_AND_IGNORE, 0, 0, n + 1).await);
    }
    check(
        &prout(&lu, 5000, REGISTER_AND_IGNORE, 0, 0, 1).await,
        SenseKey::ILLEGAL_REQUEST,
        0x55,
        0x04,
    );
}

#[tokio::test]
async fn prout_data_out_is_bounded() {
    let lu = lu().await;
    assert_eq!(
        lu.data_out_length(&prout_cdb(REGISTER, 0, u32::MAX)),
        Ok(4096)
    );
    check(
        &run(&lu, A, &prout_cdb(REGISTER, 0, u32::MAX), &[0; 4096]).await,
        SenseKey::ILLEGAL_REQUEST,
        0x1A,
        0,
    );
}

/// The same initiator port through two portal groups is two I_T nexuses (SPC-4 §5.12: a
/// registration is for one I_T nexus; ALL_TG_PT is not supported): a write exclusive,
/// registrants only reservation taken through group 1 leaves the group 2 path unregistered,
/// until it registers too; READ FULL STATUS names each registration's target port.
#[tokio::test]
async fn a_registration_is_for_one_target_port() {
    const VIA_2: u64 = 9;
    let lu = lu().await;
    lu.set_port_groups(&[1, 2]);
    lu.add_nexus(VIA_2, PORT_A, 2);
    let _ = take_uas(&lu, VIA_2).await;
    good(&prout(&lu, A, REGISTER_AND_IGNORE, 0, 0, K1).await);
    good(&prout(&lu, A, RESERVE, WE_RO, K1, 0).await);
    good(&write1(&lu, A).await);
    conflict(&write1(&lu, VIA_2).await);
    good(&read1(&lu, VIA_2).await);
    good(&prout(&lu, VIA_2, REGISTER_AND_IGNORE, 0, 0, K1).await);
    good(&write1(&lu, VIA_2).await);
    let r = prin(&lu, A, 3, 4096).await;
    good(&r);
    let d = &r.data_in;
    let mut ports = Vec::new();
    let mut at = 8;
    while at < d.len() {
        let desc = &d[at..];
        ports.push(u16::from_be_bytes([desc[18], desc[19]]));
        let tid_len = u32::from_be_bytes([desc[20], desc[21], desc[22], desc[23]]) as usize;
        at += 24 + tid_len;
    }
    ports.sort_unstable();
    assert_eq!(ports, [1, 2]);
}
