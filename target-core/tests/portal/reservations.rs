//! Persistent reservations through a restart (APTPL, SPC-4 §5.14.5): the holder and type are
//! as before in a new target table over the same backing file (what an agent restart does),
//! and an initiator that was not registered still gets RESERVATION CONFLICT; the same after a
//! reload that edits the LUN. A corrupt state file keeps the LUN from being served.

use bytes::Bytes;
use iscsi_proto::types::Isid;
use target_core::config::{Backing, DesiredState, LunConfig};
use target_core::table::TargetTable;

use crate::support::*;

const KEY: u64 = 0x1234_5678_9abc_def0;
const RESERVATION_CONFLICT: u8 = 0x18;

fn file_target(file: &std::path::Path, size: u64) -> DesiredState {
    let mut t = target(TARGET, &[]);
    t.luns.insert(
        0,
        LunConfig {
            backing: Backing::Path(file.to_path_buf()),
            create_size: Some(size),
            ..mem_lun(0)
        },
    );
    state([t])
}

async fn login_as(t: &Target, isid_last: u8) -> Initiator {
    let mut l = Login::normal(TARGET);
    l.isid = Isid([0x80, 0, 0x02, 0x3d, 0, isid_last]);
    let mut i = t.login_with(&l).await;
    i.clear_ua(0).await;
    i
}

/// PERSISTENT RESERVE OUT with a 24-byte parameter list.
async fn prout(i: &mut Initiator, sa: u8, kind: u8, key: u64, sa_key: u64, aptpl: bool) -> u8 {
    let mut p = [0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = u8::from(aptpl);
    let cdb = [0x5F, sa, kind, 0, 0, 0, 0, 0, 24, 0];
    let cmd = i.command(0, &cdb, 24, Dir::Write, Bytes::copy_from_slice(&p));
    i.send(&cmd).await;
    i.collect(cmd.header.itt()).await.status
}

/// READ RESERVATION: (key, type) of the reservation, if any.
async fn read_reservation(i: &mut Initiator) -> Option<(u64, u8)> {
    let o = i.exec(0, &[0x5E, 1, 0, 0, 0, 0, 0, 0, 64, 0], 64).await;
    assert_eq!(o.status, GOOD);
    (o.data.len() >= 24).then(|| {
        (
            u64::from_be_bytes(o.data[8..16].try_into().unwrap()),
            o.data[21] & 0x0F,
        )
    })
}

#[tokio::test]
async fn reservations_survive_a_restart_and_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lun0.img");
    let t = Target::start(file_target(&file, 1 << 20)).await;
    let mut a = login_as(&t, 1).await;
    // REPORT CAPABILITIES: PTPL_C on a file LUN, PTPL_A once APTPL is set.
    let caps = a.exec(0, &[0x5E, 2, 0, 0, 0, 0, 0, 0, 8, 0], 8).await;
    assert_eq!((caps.data[2] & 1, caps.data[3] & 1), (1, 0));
    assert_eq!(
        prout(&mut a, 0, 0, 0, KEY, true).await,
        GOOD,
        "REGISTER, APTPL"
    );
    assert_eq!(
        prout(&mut a, 1, 5, KEY, 0, false).await,
        GOOD,
        "RESERVE WE_RO"
    );
    let caps = a.exec(0, &[0x5E, 2, 0, 0, 0, 0, 0, 0, 8, 0], 8).await;
    assert_eq!(caps.data[3] & 1, 1, "PTPL_A");
    assert!(dir.path().join("lun0.img.pr").exists());
    t.cancel.cancel();
    t.serve.await.unwrap();

    // "Restart": a new table over the same file.
    let t = Target::start(file_target(&file, 1 << 20)).await;
    let mut a = login_as(&t, 1).await;
    assert_eq!(read_reservation(&mut a).await, Some((KEY, 5)));
    let mut b = login_as(&t, 2).await;
    assert_eq!(
        b.write(0, 8, &pattern(512, 1)).await.status,
        RESERVATION_CONFLICT
    );
    assert_eq!(a.write(0, 8, &pattern(512, 1)).await.status, GOOD);

    // A reload that edits the LUN (it grows) keeps them.
    let report = t.table.apply(&file_target(&file, 2 << 20)).await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    a.clear_ua(0).await;
    b.clear_ua(0).await;
    assert_eq!(read_reservation(&mut b).await, Some((KEY, 5)));
    assert_eq!(
        b.write(0, 8, &pattern(512, 2)).await.status,
        RESERVATION_CONFLICT
    );

    // REGISTER with APTPL=0 stops persisting: the file goes, the state stays until restart.
    assert_eq!(prout(&mut a, 0, 0, KEY, KEY, false).await, GOOD);
    assert!(!dir.path().join("lun0.img.pr").exists());
    assert_eq!(read_reservation(&mut a).await, Some((KEY, 5)));
}

#[tokio::test]
async fn a_memory_lun_refuses_aptpl() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut a = login_as(&t, 1).await;
    let caps = a.exec(0, &[0x5E, 2, 0, 0, 0, 0, 0, 0, 8, 0], 8).await;
    assert_eq!(caps.data[2] & 1, 0, "PTPL_C");
    assert_eq!(prout(&mut a, 0, 0, 0, KEY, true).await, CHECK_CONDITION);
}

#[tokio::test]
async fn a_truncated_state_file_keeps_the_lun_from_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lun0.img");
    {
        let t = Target::start(file_target(&file, 1 << 20)).await;
        let mut a = login_as(&t, 1).await;
        assert_eq!(prout(&mut a, 0, 0, 0, KEY, true).await, GOOD);
        t.cancel.cancel();
        t.serve.await.unwrap();
    }
    let pr = dir.path().join("lun0.img.pr");
    let text = std::fs::read(&pr).unwrap();
    std::fs::write(&pr, &text[..text.len() - 5]).unwrap();
    let table = TargetTable::new();
    let report = table.apply(&file_target(&file, 1 << 20)).await;
    let errors = format!("{:?}", report.errors);
    assert!(
        errors.contains("lun0.img.pr is unreadable"),
        "the error names the state file: {errors}"
    );
    assert!(
        table.target(TARGET).unwrap().lun(0).is_none(),
        "LUN served without its reservations"
    );
}

/// A state file that cannot be written fails the PERSISTENT RESERVE OUT with INSUFFICIENT
/// REGISTRATION RESOURCES and leaves the reservation state as it was.
#[tokio::test]
async fn a_failed_save_fails_the_command_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lun0.img");
    let t = Target::start(file_target(&file, 1 << 20)).await;
    let mut a = login_as(&t, 1).await;
    // A directory where the state file goes: the rename over it fails.
    std::fs::create_dir(dir.path().join("lun0.img.pr")).unwrap();
    let mut p = [0u8; 24];
    p[8..16].copy_from_slice(&KEY.to_be_bytes());
    p[20] = 1;
    let cmd = a.command(
        0,
        &[0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        24,
        Dir::Write,
        Bytes::copy_from_slice(&p),
    );
    a.send(&cmd).await;
    let o = a.collect(cmd.header.itt()).await;
    assert_eq!(
        (o.status, o.sense_triplet()),
        (CHECK_CONDITION, (0x5, 0x55, 0x04))
    );
    assert_eq!(a.exec(0, &tur(), 0).await.status, GOOD);
    let keys = a.exec(0, &[0x5E, 0, 0, 0, 0, 0, 0, 0, 64, 0], 64).await;
    assert_eq!(
        u32::from_be_bytes(keys.data[4..8].try_into().unwrap()),
        0,
        "no key registered"
    );
    // Without APTPL nothing is saved, so the same registration works.
    assert_eq!(prout(&mut a, 0, 0, 0, KEY, false).await, GOOD);
}
