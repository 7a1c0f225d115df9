//! Write data transfer (RFC 7143 §4.2.5, §11.7, §11.8, §13.13–§13.17).

use std::time::Duration;

use bytes::Bytes;
use iscsi_proto::pdu::{tmf, tmf_response, Header, R2t};
use iscsi_proto::types::{Itt, Ttt};

use crate::support::*;

async fn expect_r2t(i: &mut Initiator, itt: Itt) -> R2t {
    let p = i.recv().await;
    match p.header {
        Header::R2t(r) if r.itt == itt => r,
        _ => panic!("expected an R2T for {itt:?}, got {p:?}"),
    }
}

/// RFC 7143 §13.14 ImmediateData=Yes: data may accompany the command; when it covers the whole
/// EDTL no R2T is needed and the status follows.
#[tokio::test]
async fn write_with_immediate_data_only() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    let data = pattern(4096, 9);
    let cmd = i.command(
        0,
        &write10(10, 8),
        4096,
        Dir::Write,
        Bytes::from(data.clone()),
    );
    i.send(&cmd).await;
    let r = i.collect(cmd.header.itt()).await;
    assert_eq!(r.status, GOOD);
    assert_eq!(i.exec(0, &read10(10, 8), 4096).await.data, data);
}

/// RFC 7143 §13.13 InitialR2T=Yes: no unsolicited Data-Out; §11.8: each R2T has a fresh
/// Target Transfer Tag, R2TSN counts the command's R2Ts from 0, offsets/lengths cover the EDTL
/// in MaxBurstLength pieces; §13.17: at most MaxOutstandingR2T R2Ts outstanding.
#[tokio::test]
async fn write_solicited_with_r2t() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t
        .login_with(
            &Login::normal(TARGET)
                .key("ImmediateData", "No")
                .key("MaxBurstLength", "2048")
                .key("FirstBurstLength", "2048")
                .key("MaxOutstandingR2T", "2"),
        )
        .await;
    assert_eq!(i.param("MaxOutstandingR2T"), Some("2"));
    i.clear_ua(0).await;
    let data = pattern(8192, 5);
    let cmd = i.command(0, &write10(20, 16), 8192, Dir::Write, Bytes::new());
    let itt = cmd.header.itt();
    i.send(&cmd).await;
    let a = expect_r2t(&mut i, itt).await;
    let b = expect_r2t(&mut i, itt).await;
    // Only MaxOutstandingR2T=2 at once.
    i.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(
        (a.r2t_sn.0, a.buffer_offset, a.desired_data_transfer_length),
        (0, 0, 2048)
    );
    assert_eq!(
        (b.r2t_sn.0, b.buffer_offset, b.desired_data_transfer_length),
        (1, 2048, 2048)
    );
    assert_ne!(a.ttt, b.ttt);
    assert_ne!(a.ttt, Ttt::RESERVED);
    let mut seen = vec![a.ttt, b.ttt];
    let mut pending = vec![a, b];
    let mut next_sn = 2;
    while let Some(r) = pending.first().cloned() {
        pending.remove(0);
        let (off, len) = (
            r.buffer_offset as usize,
            r.desired_data_transfer_length as usize,
        );
        // Two Data-Out PDUs per R2T, DataSN 0 and 1.
        let half = len / 2;
        for (sn, (s, e)) in [(off, off + half), (off + half, off + len)]
            .into_iter()
            .enumerate()
        {
            let d = i.data_out(
                0,
                itt,
                r.ttt,
                sn as u32,
                s as u32,
                e == off + len,
                Bytes::copy_from_slice(&data[s..e]),
            );
            i.send(&d).await;
        }
        if next_sn < 4 {
            let n = expect_r2t(&mut i, itt).await;
            assert_eq!(n.r2t_sn.0, next_sn);
            assert_eq!(n.buffer_offset, next_sn * 2048);
            assert!(!seen.contains(&n.ttt), "TTT reused while outstanding");
            seen.push(n.ttt);
            pending.push(n);
            next_sn += 1;
        }
    }
    let r = i.collect(itt).await;
    assert_eq!(r.status, GOOD);
    assert_eq!(
        r.response.unwrap().exp_data_sn.0,
        4,
        "ExpDataSN counts R2Ts for writes"
    );
    assert_eq!(i.exec(0, &read10(20, 16), 8192).await.data, data);
}

/// RFC 7143 §13.13 InitialR2T=No: the initiator sends unsolicited data up to FirstBurstLength
/// (§13.15) — immediate data plus Data-Out with TTT 0xffffffff — and the target solicits the
/// rest with R2Ts starting after the first burst.
#[tokio::test]
async fn write_with_unsolicited_data_out() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t
        .login_with(
            &Login::normal(TARGET)
                .key("InitialR2T", "No")
                .key("FirstBurstLength", "4096")
                .key("MaxBurstLength", "8192"),
        )
        .await;
    assert_eq!(i.param("InitialR2T"), Some("No"));
    i.clear_ua(0).await;
    let data = pattern(12288, 11);
    let cmd = i.command(
        0,
        &write10(40, 24),
        12288,
        Dir::Write,
        Bytes::copy_from_slice(&data[..1024]),
    );
    let itt = cmd.header.itt();
    i.send(&cmd).await;
    let d0 = i.data_out(
        0,
        itt,
        Ttt::RESERVED,
        0,
        1024,
        false,
        Bytes::copy_from_slice(&data[1024..2048]),
    );
    let d1 = i.data_out(
        0,
        itt,
        Ttt::RESERVED,
        1,
        2048,
        true,
        Bytes::copy_from_slice(&data[2048..4096]),
    );
    i.send(&d0).await;
    i.send(&d1).await;
    let r = expect_r2t(&mut i, itt).await;
    assert_eq!(
        (r.buffer_offset, r.desired_data_transfer_length),
        (4096, 8192)
    );
    let d = i.data_out(
        0,
        itt,
        r.ttt,
        0,
        4096,
        true,
        Bytes::copy_from_slice(&data[4096..]),
    );
    i.send(&d).await;
    assert_eq!(i.collect(itt).await.status, GOOD);
    assert_eq!(i.exec(0, &read10(40, 24), 12288).await.data, data);
}

/// RFC 7143 §11.7.5: DataSN of Data-Out "starts with 0 for the first data PDU ... and is
/// incremented by 1"; at ERL 0 a gap cannot be recovered, the command fails (ABORTED COMMAND,
/// 4Bh/00h DATA PHASE ERROR per SPC-4 Annex D) and the session continues.
#[tokio::test]
async fn bad_data_out_data_sn_fails_command_not_session() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t
        .login_with(
            &Login::normal(TARGET)
                .key("InitialR2T", "No")
                .key("ImmediateData", "No"),
        )
        .await;
    i.clear_ua(0).await;
    let cmd = i.command(0, &write10(0, 4), 2048, Dir::Write, Bytes::new());
    let itt = cmd.header.itt();
    i.send(&cmd).await;
    let d0 = i.data_out(
        0,
        itt,
        Ttt::RESERVED,
        0,
        0,
        false,
        Bytes::from(vec![1u8; 1024]),
    );
    let d1 = i.data_out(
        0,
        itt,
        Ttt::RESERVED,
        7,
        1024,
        true,
        Bytes::from(vec![1u8; 1024]),
    );
    i.send(&d0).await;
    i.send(&d1).await;
    let r = i.collect(itt).await;
    assert_eq!(r.status, CHECK_CONDITION);
    assert_eq!(r.sense_triplet(), (0x0b, 0x4b, 0x00));
    // Nothing was written, and the session goes on.
    assert_eq!(i.exec(0, &read10(0, 4), 2048).await.data, vec![0u8; 2048]);
}

/// RFC 7143 §11.5.1 ABORT TASK: "the target ... MUST abort the task"; the response is
/// "Function complete" (§11.6.1) and the aborted task gets no SCSI Response.
#[tokio::test]
async fn abort_task_of_write_awaiting_data() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t
        .login_with(&Login::normal(TARGET).key("ImmediateData", "No"))
        .await;
    i.clear_ua(0).await;
    let cmd = i.command(0, &write10(0, 8), 4096, Dir::Write, Bytes::new());
    let itt = cmd.header.itt();
    i.send(&cmd).await;
    let _r2t = expect_r2t(&mut i, itt).await;
    let (titt, abort) = i.tmf(tmf::ABORT_TASK, 0, itt);
    i.send(&abort).await;
    let p = i.recv().await;
    let Header::TaskMgmtResponse(h) = &p.header else {
        panic!("expected a TMF response, got {p:?}");
    };
    assert_eq!((h.itt, h.response), (titt, tmf_response::COMPLETE));
    // Nothing more for the aborted task; the window is whole again.
    let r = i.exec(0, &tur(), 0).await.response.unwrap();
    assert_eq!(r.max_cmd_sn.0.wrapping_sub(r.exp_cmd_sn.0) + 1, 16);
    assert_eq!(i.exec(0, &read10(0, 8), 4096).await.data, vec![0u8; 4096]);
}

/// SAM-5 §6.3.3 (via RFC 7143 §11.5.1 LOGICAL UNIT RESET): the reset establishes a unit
/// attention BUS DEVICE RESET FUNCTION OCCURRED (29h/03h); §11.6.1: response 2 "Logical unit
/// does not exist" for a LUN the target lacks.
#[tokio::test]
async fn lun_reset_raises_ua_and_unknown_lun_is_response_2() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    let (titt, reset) = i.tmf(tmf::LOGICAL_UNIT_RESET, 0, Itt::RESERVED);
    i.send(&reset).await;
    let Header::TaskMgmtResponse(h) = i.recv().await.header else {
        panic!()
    };
    assert_eq!((h.itt, h.response), (titt, tmf_response::COMPLETE));
    let r = i.exec(0, &tur(), 0).await;
    assert_eq!(r.status, CHECK_CONDITION);
    assert_eq!(r.sense_triplet(), (0x6, 0x29, 0x03));
    assert_eq!(i.exec(0, &tur(), 0).await.status, GOOD);

    let (titt, reset) = i.tmf(tmf::LOGICAL_UNIT_RESET, 9, Itt::RESERVED);
    i.send(&reset).await;
    let Header::TaskMgmtResponse(h) = i.recv().await.header else {
        panic!()
    };
    assert_eq!(
        (h.itt, h.response),
        (titt, tmf_response::LUN_DOES_NOT_EXIST)
    );
}
