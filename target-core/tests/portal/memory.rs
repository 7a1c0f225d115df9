//! Bounds on what an initiator can make the target hold (RFC 7143 §13.13–§13.17).

use std::collections::HashMap;

use bytes::Bytes;
use iscsi_proto::pdu::{tmf, Header};
use iscsi_proto::types::Itt;

use crate::support::*;

/// RFC 7143 §13.17 and §13.13–§13.15: per task the target accepts at most FirstBurstLength
/// unsolicited bytes and MaxOutstandingR2T bursts of MaxBurstLength at a time; with at most
/// queue-depth tasks (§4.2.2.1) a session must not make the target hold more than
/// queue_depth × (FirstBurstLength + MaxBurstLength × MaxOutstandingR2T) bytes of write data,
/// however large the initiator's EDTLs. The target delays R2Ts to stay within that.
#[tokio::test]
async fn write_buffering_is_bounded_per_session() {
    const QD: usize = 4;
    const FBL: usize = 16384;
    const MBL: usize = 65536;
    const BUDGET: usize = QD * (FBL + MBL);
    let mut o = options();
    o.queue_depth = QD as u32;
    o.limits.max_outstanding_r2t = 1;
    let t = Target::start_with(state([target(TARGET, &[0])]), o).await;
    let mut i = t
        .login_with(
            &Login::normal(TARGET)
                .key("ImmediateData", "No")
                .key("InitialR2T", "Yes")
                .key("FirstBurstLength", &FBL.to_string())
                .key("MaxBurstLength", &MBL.to_string()),
        )
        .await;
    i.clear_ua(0).await;
    // Eight writes of 256 KiB, half of them claiming a 16 MiB EDTL: 2 MiB of data (and 66 MiB
    // of claims) against a 320 KiB budget.
    const LEN: usize = 256 * 1024;
    const WRITES: usize = 8;
    let mut datas = HashMap::new();
    let mut lba = HashMap::new();
    let mut to_send: Vec<_> = (0..WRITES)
        .map(|n| {
            let edtl = if n % 2 == 1 { 16 << 20 } else { LEN as u32 };
            (n, edtl)
        })
        .collect();
    to_send.reverse();
    // Per unfinished command: bytes sent plus bytes solicited and not yet sent.
    let mut held: HashMap<Itt, usize> = HashMap::new();
    let mut peak = 0;
    let mut done = 0;
    while done < WRITES {
        // A well-behaved initiator stays within [ExpCmdSN, MaxCmdSN].
        while to_send.last().is_some() && i.cmd_sn.le(i.max_cmd_sn) {
            let (n, edtl) = to_send.pop().unwrap();
            let cmd = i.command(
                0,
                &write10((n * LEN / 512) as u32, (LEN / 512) as u16),
                edtl,
                Dir::Write,
                Bytes::new(),
            );
            datas.insert(cmd.header.itt(), pattern(LEN, n as u8));
            lba.insert(cmd.header.itt(), n * LEN / 512);
            held.insert(cmd.header.itt(), 0);
            i.send(&cmd).await;
        }
        let p = i.recv().await;
        match &p.header {
            Header::R2t(r) => {
                *held.get_mut(&r.itt).expect("R2T for a live write") +=
                    r.desired_data_transfer_length as usize;
                let total: usize = held.values().sum();
                peak = peak.max(total);
                assert!(
                    total <= BUDGET,
                    "target solicited {total} bytes with {held:?} held; budget {BUDGET}"
                );
                let data = &datas[&r.itt];
                let (off, len) = (
                    r.buffer_offset as usize,
                    r.desired_data_transfer_length as usize,
                );
                let mut pos = off;
                let mut sn = 0;
                while pos < off + len {
                    let n = (off + len - pos).min(8192);
                    let d = i.data_out(
                        0,
                        r.itt,
                        r.ttt,
                        sn,
                        pos as u32,
                        pos + n == off + len,
                        Bytes::copy_from_slice(&data[pos..pos + n]),
                    );
                    i.send(&d).await;
                    pos += n;
                    sn += 1;
                }
            }
            Header::ScsiResponse(r) => {
                assert_eq!(r.status, GOOD);
                held.remove(&r.itt).expect("response for a live write");
                done += 1;
            }
            _ => panic!("unexpected {p:?}"),
        }
    }
    assert!(peak >= MBL, "peak {peak}");
    for (itt, data) in &datas {
        let got = i
            .exec(0, &read10(lba[itt] as u32, (LEN / 512) as u16), LEN as u32)
            .await;
        assert_eq!(&got.data, data);
    }
}

/// RFC 7143 §11.2.1.6: an ITT identifies a task only while it is active; once the initiator
/// has the status it may reuse the tag at once, and §4.2.2.1 keeps the window whole.
#[tokio::test]
async fn itt_reuse_right_after_status_is_accepted() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    let itt = Itt(0x7777);
    for _ in 0..300 {
        let sn = i.next_cmd_sn();
        let c = i.command_with(
            0,
            itt,
            sn,
            false,
            &read10(0, 1),
            512,
            Dir::Read,
            Bytes::new(),
        );
        i.send(&c).await;
        assert_eq!(i.collect(itt).await.status, GOOD);
    }
}

/// RFC 7143 §11.6.1: ABORT TASK for a task that already completed answers "Function complete"
/// or "Task does not exist" — and must not disturb the command window (§4.2.2.1: with nothing
/// outstanding the window spans the queue depth).
#[tokio::test]
async fn abort_racing_completion_keeps_window() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    for _ in 0..200 {
        let c = i.command(0, &read10(0, 1), 512, Dir::Read, Bytes::new());
        let itt = c.header.itt();
        i.send(&c).await;
        i.collect(itt).await;
        let (titt, abort) = i.tmf(tmf::ABORT_TASK, 0, itt);
        i.send(&abort).await;
        let p = i.recv().await;
        assert_eq!(p.header.itt(), titt);
    }
    let r = i.exec(0, &tur(), 0).await.response.unwrap();
    assert_eq!(r.max_cmd_sn.0.wrapping_sub(r.exp_cmd_sn.0) + 1, 16);
}
