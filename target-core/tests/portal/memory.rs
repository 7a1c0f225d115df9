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

/// Reads are bounded too: a READ takes min(EDTL, queue_depth × MaxBurstLength) of the
/// session's read budget before it executes and gives it back once its Data-In is in the
/// socket. An initiator that sends the whole window of large READs and then stops reading
/// makes the target hold about one budget of read data, not queue_depth × the transfer size.
#[tokio::test]
async fn read_buffering_is_bounded_per_session() {
    const QD: u32 = 8;
    const MBL: u32 = 65536; // budget: 8 × 64 KiB = 512 KiB, so each 4 MiB READ runs alone
    const LEN: u32 = 4 << 20;
    const IQN: &str = "iqn.2024-01.test:read-budget";
    let mut cfg = target(IQN, &[]);
    let mut lun = mem_lun(0);
    lun.backing = target_core::config::Backing::Memory {
        size: 8 * u64::from(LEN),
    };
    cfg.luns.insert(0, lun);
    let mut o = options();
    o.queue_depth = QD;
    let t = Target::start_with(state([cfg]), o).await;
    let mut i = Initiator::connect_with_recv_buffer(t.addr, 64 * 1024).await;
    i.login(
        &Login::normal(IQN)
            .key("MaxBurstLength", &MBL.to_string())
            .key("MaxRecvDataSegmentLength", "65536"),
    )
    .await
    .expect("login");
    i.clear_ua(0).await;
    let reads = || {
        target_core::stats::global()
            .snapshot()
            .into_iter()
            .find(|s| s.iqn == IQN)
            .map_or(0, |s| s.read.ops)
    };
    let before = reads();
    let mut itts = Vec::new();
    for n in 0..QD {
        let lba = n * (LEN / 512);
        // READ(16): READ(10) carries at most 65535 blocks.
        let mut c16 = [0u8; 16];
        c16[0] = 0x88;
        c16[2..10].copy_from_slice(&u64::from(lba).to_be_bytes());
        c16[10..14].copy_from_slice(&(LEN / 512).to_be_bytes());
        let c = i.command(0, &c16, LEN, Dir::Read, Bytes::new());
        itts.push(c.header.itt());
        i.send(&c).await;
    }
    // Do not read: the target fills the socket buffers, then must stop executing READs.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let executed = reads() - before;
    // One READ whose data did not all fit in the socket buffers holds the budget; the
    // buffers (a few MiB on loopback) may have taken one or two before it.
    assert!(
        executed <= 4,
        "{executed} of {QD} 4 MiB READs executed against an initiator that reads nothing"
    );
    // Reading again, every READ completes with its data.
    for itt in itts {
        let out = i.collect(itt).await;
        assert_eq!(out.status, GOOD);
        assert_eq!(out.data.len(), LEN as usize);
    }
}

/// RFC 7143 §13.12 and §6.2: until the Login Phase completes, a data segment is bounded by the
/// default MaxRecvDataSegmentLength (8192). A peer that announces 16 MiB - 1 in a Login
/// header (before any authentication) is disconnected at once, before the target buffers it;
/// sixty such peers once took the agent from 20 to 979 MiB resident.
#[tokio::test]
async fn unauthenticated_login_segments_are_bounded_before_buffering() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut peers = Vec::new();
    for _ in 0..8 {
        let mut i = t.connect().await;
        let mut bhs = [0u8; 48];
        bhs[0] = 0x43; // Login Request, immediate
        bhs[1] = 0x87; // T, CSG 1, NSG 3
        bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        i.send_raw(&bhs).await;
        // The first 64 KiB of the announced segment; a target that buffers would wait for more.
        i.send_raw(&vec![b'a'; 64 * 1024]).await;
        peers.push(i);
    }
    for mut i in peers {
        let got = i.expect_closed().await;
        assert!(got.is_empty(), "answered an oversized login with {got:?}");
    }
    // An 8192-byte login segment (the default limit itself) is still read and answered.
    let mut i = t.connect().await;
    let mut text = b"InitiatorName=iqn.2026-11.io.ktgt.test:big\0SessionType=Discovery\0".to_vec();
    text.extend(b"X-ktgt.example.pad=");
    text.resize(8191, b'p');
    text.push(0);
    let mut bhs = [0u8; 48];
    bhs[0] = 0x43;
    bhs[1] = 0x81; // T, CSG 0 (security), NSG 1
    bhs[5..8].copy_from_slice(&[0x00, 0x20, 0x00]);
    bhs[8] = 0x02; // ISID: type 0x02 (random)
    bhs[20..24].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
    i.send_raw(&bhs).await;
    i.send_raw(&text).await;
    let p = i
        .recv_within(std::time::Duration::from_secs(5))
        .await
        .expect("an answer")
        .expect("the connection stays open");
    assert!(
        matches!(p.header, Header::LoginResponse(_)),
        "answered with {p:?}"
    );
}
