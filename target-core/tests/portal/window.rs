//! Command numbering (RFC 7143 §4.2.2): StatSN, the ExpCmdSN/MaxCmdSN window, ordering and
//! immediate delivery.

use std::time::Duration;

use bytes::Bytes;
use iscsi_proto::pdu::Header;
use iscsi_proto::types::Sn;

use crate::support::*;

/// RFC 7143 §4.2.2.2: "StatSN ... is incremented by 1 for every response/status sent on a
/// connection", except NOP-In pings with ITT 0xffffffff and Data-In without status.
#[tokio::test]
async fn stat_sn_increases_by_one_per_status() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    let mut expect = i.exp_stat_sn;
    let mut check = |sn: Sn| {
        assert_eq!(sn, expect, "StatSN");
        expect = expect.add(1);
    };
    for _ in 0..3 {
        let r = i.exec(0, &tur(), 0).await;
        check(r.response.unwrap().stat_sn);
    }
    let w = i.write(0, 0, &pattern(8192, 1)).await;
    check(w.response.unwrap().stat_sn);
    let r = i.exec(0, &read10(0, 16), 8192).await;
    for d in &r.data_in[..r.data_in.len() - 1] {
        assert!(!d.status_present);
    }
    check(r.data_in.last().unwrap().stat_sn);
    let (_, nop) = i.nop_out(Bytes::from_static(b"x"));
    i.send(&nop).await;
    let Header::NopIn(n) = i.recv().await.header else {
        panic!()
    };
    check(n.stat_sn);
}

/// RFC 7143 §4.2.2.1: the window is [ExpCmdSN, MaxCmdSN]; with nothing outstanding it spans
/// the whole queue depth: MaxCmdSN - ExpCmdSN + 1 == queue depth.
#[tokio::test]
async fn idle_window_equals_queue_depth() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    let h = i.login_response.clone().unwrap();
    assert_eq!(h.exp_cmd_sn, i.cmd_sn, "login response ExpCmdSN");
    assert_eq!(h.max_cmd_sn.0.wrapping_sub(h.exp_cmd_sn.0) + 1, 16);
    let r = i.exec(0, &tur(), 0).await.response.unwrap();
    assert_eq!(r.exp_cmd_sn, i.cmd_sn);
    assert_eq!(r.max_cmd_sn.0.wrapping_sub(r.exp_cmd_sn.0) + 1, 16);
}

/// RFC 7143 §4.2.2.1: "For non-immediate commands, the CmdSN field can take any value from
/// ExpCmdSN to MaxCmdSN inclusive. The target MUST silently ignore any non-immediate command
/// outside of this range or non-immediate duplicates within the range."
#[tokio::test]
async fn command_outside_window_is_ignored() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    let exp = i.cmd_sn;
    // Beyond MaxCmdSN.
    let itt = i.itt();
    let far = i.command_with(
        0,
        itt,
        exp.add(100),
        false,
        &tur(),
        0,
        Dir::None,
        Bytes::new(),
    );
    i.send(&far).await;
    // A duplicate of an already consumed CmdSN.
    let itt = i.itt();
    let dup = i.command_with(
        0,
        itt,
        exp.add(u32::MAX),
        false,
        &tur(),
        0,
        Dir::None,
        Bytes::new(),
    );
    i.send(&dup).await;
    i.expect_silence(Duration::from_millis(300)).await;
    let r = i.exec(0, &tur(), 0).await.response.unwrap();
    assert_eq!(
        r.exp_cmd_sn,
        exp.add(1),
        "ignored commands did not advance ExpCmdSN"
    );
}

/// RFC 7143 §3.2.2.1: "the target MUST ... deliver the commands to the SCSI layer in CmdSN
/// order": a command ahead of ExpCmdSN waits until the gap is filled.
#[tokio::test]
async fn command_ahead_is_held_until_gap_fills() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    let exp = i.cmd_sn;
    let late_itt = i.itt();
    let second = i.command_with(
        0,
        late_itt,
        exp.add(1),
        false,
        &tur(),
        0,
        Dir::None,
        Bytes::new(),
    );
    i.send(&second).await;
    i.expect_silence(Duration::from_millis(300)).await;
    let first_itt = i.itt();
    let first = i.command_with(
        0,
        first_itt,
        exp,
        false,
        &inquiry(36),
        36,
        Dir::Read,
        Bytes::new(),
    );
    i.send(&first).await;
    i.cmd_sn = exp.add(2);
    let a = i.collect(first_itt).await;
    assert_eq!(a.status, GOOD);
    let b = i.collect(late_itt).await;
    assert_eq!(b.status, GOOD);
    assert_eq!(b.response.unwrap().exp_cmd_sn, exp.add(2));
}

/// RFC 7143 §3.2.2.1: an immediate command carries CmdSN but "does not advance the CmdSN"; it
/// is delivered at once.
#[tokio::test]
async fn immediate_command_does_not_advance_exp_cmd_sn() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    let exp = i.cmd_sn;
    let itt = i.itt();
    let imm = i.command_with(0, itt, exp, true, &tur(), 0, Dir::None, Bytes::new());
    i.send(&imm).await;
    let r = i.collect(itt).await.response.unwrap();
    assert_eq!(r.status, GOOD);
    assert_eq!(r.exp_cmd_sn, exp);
    // The same CmdSN is still free for a non-immediate command.
    let r = i.exec(0, &tur(), 0).await.response.unwrap();
    assert_eq!(r.exp_cmd_sn, exp.add(1));
}

/// RFC 7143 §4.2.2.1: "MaxCmdSN ... ExpCmdSN - 1 ... indicates to the initiator that the
/// target cannot accept new commands" — and commands outside [ExpCmdSN, MaxCmdSN] are
/// ignored, so a closed window holds even for CmdSN == ExpCmdSN.
#[tokio::test]
async fn closed_window_ignores_command_at_exp_cmd_sn() {
    let mut o = options();
    o.queue_depth = 2;
    let t = Target::start_with(state([target(TARGET, &[0])]), o).await;
    let mut i = t
        .login_with(&Login::normal(TARGET).key("ImmediateData", "No"))
        .await;
    i.clear_ua(0).await;
    // Two writes waiting for data fill the window.
    for lba in [0, 8] {
        let c = i.command(0, &write10(lba, 8), 4096, Dir::Write, Bytes::new());
        i.send(&c).await;
        let p = i.recv().await;
        assert!(matches!(p.header, Header::R2t(_)), "{p:?}");
    }
    assert_eq!(i.max_cmd_sn, i.cmd_sn.add(u32::MAX), "window closed");
    let c = i.command(0, &tur(), 0, Dir::None, Bytes::new());
    i.send(&c).await;
    i.expect_silence(Duration::from_millis(300)).await;
}

/// RFC 7143 §4.2.2.1: a command within an advertised window must be accepted, since the
/// target "MUST silently ignore" the others and at ErrorRecoveryLevel 0 nothing resends them.
/// An initiator that keeps the window full from each response's MaxCmdSN (libiscsi does)
/// must see every command answered, however the target's tasks interleave; a MaxCmdSN read
/// half-updated once stranded a command and hung the initiator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_kept_full_from_advertised_max_cmd_sn_loses_nothing() {
    let mut o = options();
    o.queue_depth = 2;
    let t = Target::start_with(state([target(TARGET, &[0])]), o).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    const COMMANDS: usize = 4000;
    let (mut sent, mut answered) = (0usize, 0usize);
    while answered < COMMANDS {
        // Send everything the advertised window admits: TEST UNIT READY and 16 KiB READs.
        let mut batch = Vec::new();
        while sent < COMMANDS && i.cmd_sn.le(i.max_cmd_sn) {
            let c = if sent % 2 == 0 {
                i.command(0, &tur(), 0, Dir::None, Bytes::new())
            } else {
                i.command(0, &read10(0, 32), 16384, Dir::Read, Bytes::new())
            };
            batch.extend_from_slice(&i.codec.encode_to_bytes(&c));
            sent += 1;
        }
        if !batch.is_empty() {
            i.send_raw(&batch).await;
        }
        match i.recv_within(Duration::from_secs(5)).await {
            Ok(Some(p)) => match p.header {
                Header::ScsiResponse(r) => {
                    assert_eq!(r.status, GOOD);
                    answered += 1;
                }
                Header::DataIn(d) => {
                    if d.status_present {
                        assert_eq!(d.status, GOOD);
                        answered += 1;
                    }
                }
                other => panic!("unexpected {other:?}"),
            },
            Ok(None) => panic!("target closed the connection"),
            Err(()) => panic!(
                "stalled: {answered} of {sent} sent answered, CmdSN {} MaxCmdSN {}",
                i.cmd_sn, i.max_cmd_sn
            ),
        }
    }
}

/// Immediate commands take no CmdSN slot (RFC 7143 §3.2.2.1) but are still bounded: with
/// queue_depth of them executing, one more is answered TASK SET FULL (SAM-5 §5.3.1), and the
/// CmdSN window is untouched by them.
#[tokio::test]
async fn immediate_commands_beyond_queue_depth_get_task_set_full() {
    let mut o = options();
    o.queue_depth = 2;
    let t = Target::start_with(state([target(TARGET, &[0])]), o).await;
    let mut i = t
        .login_with(&Login::normal(TARGET).key("ImmediateData", "No"))
        .await;
    i.clear_ua(0).await;
    let exp = i.cmd_sn;
    // Two immediate writes waiting for their data hold both immediate slots.
    for lba in [0, 8] {
        let itt = i.itt();
        let c = i.command_with(
            0,
            itt,
            exp,
            true,
            &write10(lba, 8),
            4096,
            Dir::Write,
            Bytes::new(),
        );
        i.send(&c).await;
        let p = i.recv().await;
        assert!(matches!(p.header, Header::R2t(_)), "{p:?}");
    }
    let itt = i.itt();
    let c = i.command_with(0, itt, exp, true, &tur(), 0, Dir::None, Bytes::new());
    i.send(&c).await;
    let r = i.collect(itt).await.response.unwrap();
    assert_eq!(r.status, 0x28, "TASK SET FULL");
    assert_eq!(r.max_cmd_sn, exp.add(1), "the CmdSN window stays open");
    // Non-immediate commands still run.
    let r = i.exec(0, &tur(), 0).await.response.unwrap();
    assert_eq!(r.status, GOOD);
}
