//! Task management across sessions: a reset or CLEAR TASK SET received in one session acts on
//! the tasks of the others (RFC 7143 §11.5.1, SAM-5 §5.6 and §7), ABORT TASK SET does not,
//! and TARGET COLD RESET drops every session of the target.

use std::time::Duration;

use bytes::Bytes;
use iscsi_proto::pdu::{tmf, tmf_response, Header, R2t};
use iscsi_proto::types::{Isid, Itt};

use crate::support::*;

/// Two sessions of the same initiator (two ISIDs: two I_T nexuses) with their power-on unit
/// attentions reported.
async fn two_sessions(t: &Target) -> (Initiator, Initiator) {
    let mut a = t
        .login_with(&Login::normal(TARGET).key("ImmediateData", "No"))
        .await;
    let mut lb = Login::normal(TARGET);
    lb.isid = Isid([0x80, 0, 0x02, 0x3d, 0, 2]);
    let mut b = t.login_with(&lb).await;
    a.clear_ua(0).await;
    b.clear_ua(0).await;
    (a, b)
}

/// A WRITE of 8 blocks at LBA 40 waiting for its Data-Out: the task stays in the target
/// until the data comes or something aborts it.
async fn pending_write(a: &mut Initiator) -> (Itt, R2t) {
    let cmd = a.command(0, &write10(40, 8), 4096, Dir::Write, Bytes::new());
    let itt = cmd.header.itt();
    a.send(&cmd).await;
    let p = a.recv().await;
    let Header::R2t(r) = p.header else {
        panic!("expected an R2T, got {p:?}");
    };
    (itt, r)
}

async fn tmf_from(b: &mut Initiator, function: u8) -> u8 {
    let (titt, req) = b.tmf(function, 0, Itt::RESERVED);
    b.send(&req).await;
    let p = b.recv().await;
    let Header::TaskMgmtResponse(h) = p.header else {
        panic!("expected a TMF response, got {p:?}");
    };
    assert_eq!(h.itt, titt);
    h.response
}

/// Sends the pending write's data; returns the SCSI status if the target answered the write
/// within a second (`None`: the task was gone).
async fn finish_write(a: &mut Initiator, itt: Itt, r2t: &R2t) -> Option<u8> {
    let d = a.data_out(0, itt, r2t.ttt, 0, 0, true, Bytes::from(pattern(4096, 3)));
    a.send(&d).await;
    loop {
        match a.recv_within(Duration::from_secs(1)).await {
            Ok(Some(p)) => match p.header {
                Header::ScsiResponse(r) if r.itt == itt => return Some(r.status),
                // A Data-Out for a transfer that no longer exists may be rejected.
                Header::Reject(_) => continue,
                other => panic!("unexpected {other:?}"),
            },
            _ => return None,
        }
    }
}

/// B sends `function` while A's write waits for its data; then A sends the data. Returns
/// A's write status, `None` when the write was aborted (no response).
async fn tmf_during_a_pending_write(
    a: &mut Initiator,
    b: &mut Initiator,
    function: u8,
) -> Option<u8> {
    let (itt, r2t) = pending_write(a).await;
    assert_eq!(tmf_from(b, function).await, tmf_response::COMPLETE);
    tokio::time::sleep(Duration::from_millis(100)).await;
    finish_write(a, itt, &r2t).await
}

#[tokio::test]
async fn lun_reset_aborts_the_tasks_of_every_session() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let (mut a, mut b) = two_sessions(&t).await;
    // A's write ended without a response (TAS 0); A hears of the reset.
    assert_eq!(
        tmf_during_a_pending_write(&mut a, &mut b, tmf::LOGICAL_UNIT_RESET).await,
        None
    );
    let r = a.exec(0, &tur(), 0).await;
    assert_eq!(r.sense_triplet(), (0x6, 0x29, 0x03));
    assert_eq!(a.exec(0, &tur(), 0).await.status, GOOD);
    // The aborted write gave its window slot back: A goes on writing.
    assert_eq!(a.write(0, 40, &pattern(512, 1)).await.status, GOOD);
}

#[tokio::test]
async fn abort_task_set_leaves_other_sessions_alone() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let (mut a, mut b) = two_sessions(&t).await;
    assert_eq!(
        tmf_during_a_pending_write(&mut a, &mut b, tmf::ABORT_TASK_SET).await,
        Some(GOOD)
    );
    assert_eq!(a.exec(0, &tur(), 0).await.status, GOOD, "no unit attention");
}

/// CLEAR TASK SET (TST 000b: one task set for all I_T nexuses) aborts A's task, and A gets
/// COMMANDS CLEARED BY ANOTHER INITIATOR (2Fh/00h).
#[tokio::test]
async fn clear_task_set_clears_every_session_and_says_so() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let (mut a, mut b) = two_sessions(&t).await;
    assert_eq!(
        tmf_during_a_pending_write(&mut a, &mut b, tmf::CLEAR_TASK_SET).await,
        None
    );
    let r = a.exec(0, &tur(), 0).await;
    assert_eq!(r.sense_triplet(), (0x6, 0x2F, 0x00));
    assert_eq!(
        b.exec(0, &tur(), 0).await.status,
        GOOD,
        "B had nothing cleared"
    );
}

#[tokio::test]
async fn target_warm_reset_acts_on_the_whole_target() {
    let t = Target::start(state([target(TARGET, &[0, 1])])).await;
    let (mut a, mut b) = two_sessions(&t).await;
    a.clear_ua(1).await;
    assert_eq!(
        tmf_during_a_pending_write(&mut a, &mut b, tmf::TARGET_WARM_RESET).await,
        None
    );
    for lun in [0, 1] {
        let r = a.exec(lun, &tur(), 0).await;
        assert_eq!(r.sense_triplet(), (0x6, 0x29, 0x03), "LUN {lun}");
    }
    assert_eq!(t.table.target(TARGET).unwrap().sessions().len(), 2);
}

/// RFC 7143 §11.5.1: after the response to TARGET COLD RESET every connection to the target
/// is dropped; the initiators log in again.
#[tokio::test]
async fn target_cold_reset_drops_every_session() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let (mut a, mut b) = two_sessions(&t).await;
    assert_eq!(
        tmf_from(&mut b, tmf::TARGET_COLD_RESET).await,
        tmf_response::COMPLETE
    );
    b.expect_closed().await;
    a.expect_closed().await;
    let mut c = t.login().await;
    c.clear_ua(0).await;
    assert_eq!(c.exec(0, &tur(), 0).await.status, GOOD);
}
