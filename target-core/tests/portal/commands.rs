//! SCSI commands in the full feature phase: unit attentions, Data-In sequences, residuals,
//! missing LUNs, NOP, Reject, digests (RFC 7143 §11.3, §11.4, §11.7, §11.17–§11.19, §13.1).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use iscsi_proto::codec::crc32c;
use iscsi_proto::pdu::{Header, RejectReason, BHS_LEN};
use iscsi_proto::types::{Itt, Ttt};

use crate::support::*;

/// SAM-5 §5.14 (via RFC 7143 §4.2): a new I_T nexus starts with POWER ON, RESET, OR BUS DEVICE
/// RESET OCCURRED (29h/00h) pending; TEST UNIT READY reports it once, then succeeds.
#[tokio::test]
async fn test_unit_ready_clears_power_on_unit_attention() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    let first = i.exec(0, &tur(), 0).await;
    assert_eq!(first.status, CHECK_CONDITION);
    assert_eq!(first.sense_triplet(), (0x6, 0x29, 0x00));
    assert_eq!(i.exec(0, &tur(), 0).await.status, GOOD);
}

/// RFC 7143 §11.7.1: "For incoming data, the bit [F] is 1 for the last input (read) data PDU
/// of a sequence" (sequences are at most MaxBurstLength, §13.13); §11.7.5: DataSN counts the
/// Data-In PDUs of a command from 0; §13.12: no segment above the initiator's
/// MaxRecvDataSegmentLength; §11.7.4: status may be carried in the last Data-In (S bit).
#[tokio::test]
async fn read_data_in_split_by_segment_and_burst() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t
        .login_with(
            &Login::normal(TARGET)
                .key("MaxRecvDataSegmentLength", "4096")
                .key("MaxBurstLength", "16384")
                .key("FirstBurstLength", "16384"),
        )
        .await;
    i.clear_ua(0).await;
    let data = pattern(40960, 7);
    assert_eq!(i.write(0, 100, &data).await.status, GOOD);
    let r = i.exec(0, &read10(100, 80), 40960).await;
    assert_eq!(r.status, GOOD);
    assert_eq!(r.data, data);
    assert_eq!(r.data_in.len(), 10);
    for (n, d) in r.data_in.iter().enumerate() {
        let n = n as u32;
        assert_eq!(d.data_sn.0, n, "DataSN");
        assert_eq!(d.buffer_offset, n * 4096, "offset");
        // Bursts of 16384 bytes: PDUs 3, 7 and the last end a sequence.
        assert_eq!(d.final_, matches!(n, 3 | 7 | 9), "F bit of PDU {n}");
        assert_eq!(d.status_present, n == 9, "S bit of PDU {n}");
    }
    assert_eq!(r.residual, (false, false, 0));
}

/// RFC 7143 §11.4.5.1: "O bit set for Residual Overflow. In this case, the Residual Count
/// indicates the number of bytes that were not transferred because the initiator's Expected
/// Data Transfer Length was not sufficient"; U: "the Residual Count indicates the number of
/// bytes not transferred out of the number of bytes expected to be transferred".
#[tokio::test]
async fn read_residuals_against_edtl() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    i.clear_ua(0).await;
    // CDB asks 8 blocks (4096 bytes), EDTL only 2048: overflow 2048.
    let short = i.exec(0, &read10(0, 8), 2048).await;
    assert_eq!(short.status, GOOD);
    assert_eq!(short.data.len(), 2048);
    assert_eq!(short.residual, (false, true, 2048));
    // EDTL 8192 for 4096 bytes: underflow 4096.
    let long = i.exec(0, &read10(0, 8), 8192).await;
    assert_eq!(long.status, GOOD);
    assert_eq!(long.data.len(), 4096);
    assert_eq!(long.residual, (true, false, 4096));
}

/// SPC-4 §4.4 / SAM-5 §5.9.5: a target without LUN 0 still answers REPORT LUNS at LUN 0.
#[tokio::test]
async fn report_luns_without_lun_zero() {
    let t = Target::start(state([target(TARGET, &[1, 3])])).await;
    let mut i = t.login().await;
    let r = i.exec(0, &report_luns(256), 256).await;
    assert_eq!(r.status, GOOD);
    assert_eq!(parse_report_luns(&r.data), vec![1, 3]);
}

/// SPC-4 §6.6.2: for a LUN the target does not have, INQUIRY reports PERIPHERAL QUALIFIER 011b
/// ("not capable of supporting a peripheral device") and type 1Fh.
#[tokio::test]
async fn inquiry_to_missing_lun_reports_pq_011() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    let r = i.exec(5, &inquiry(36), 36).await;
    assert_eq!(r.status, GOOD);
    assert_eq!(r.data[0], 0x7f);
}

/// SPC-4 §4.4.3 / SAM-5 §5.9.5: other commands to a missing LUN end in CHECK CONDITION,
/// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25h/00h) — reads and writes alike.
#[tokio::test]
async fn command_to_missing_lun_is_lun_not_supported() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    let r = i.exec(5, &read10(0, 1), 512).await;
    assert_eq!(r.status, CHECK_CONDITION);
    assert_eq!(r.sense_triplet(), (0x5, 0x25, 0x00));
    let w = i.write(5, 0, &[0u8; 512]).await;
    assert_eq!(w.status, CHECK_CONDITION);
    assert_eq!(w.sense_triplet(), (0x5, 0x25, 0x00));
}

/// RFC 7143 §11.17.1: reason 0x05 "Command not supported"; "the target returns the header of
/// the rejected PDU" in the data segment (§11.17: "complete header of the PDU being rejected").
#[tokio::test]
async fn unknown_opcode_is_rejected_with_header() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    let mut bhs = [0u8; BHS_LEN];
    bhs[0] = 0x1c; // a reserved initiator opcode
    bhs[1] = 0x80;
    bhs[16..20].copy_from_slice(&0x4242u32.to_be_bytes());
    bhs[24..28].copy_from_slice(&i.cmd_sn.0.to_be_bytes());
    i.send_raw(&bhs).await;
    let (rej, hdr) = as_reject(&i.recv().await);
    assert_eq!(rej.reason, RejectReason::COMMAND_NOT_SUPPORTED);
    assert_eq!(&hdr[..], &bhs[..]);
    // The session continues.
    assert_eq!(i.exec(0, &inquiry(36), 36).await.status, GOOD);
}

/// RFC 7143 §11.18.1/§11.19.1: a NOP-Out with a valid ITT is a ping; the NOP-In answer
/// carries the same ITT, TTT 0xffffffff and "the same data as was sent".
#[tokio::test]
async fn nop_out_ping_echoes_data() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    let (itt, nop) = i.nop_out(Bytes::from_static(b"are you there? 0123"));
    i.send(&nop).await;
    let p = i.recv().await;
    let Header::NopIn(h) = &p.header else {
        panic!("expected NOP-In, got {p:?}");
    };
    assert_eq!(h.itt, itt);
    assert_eq!(h.ttt, Ttt::RESERVED);
    assert_eq!(&p.data[..], b"are you there? 0123");
}

/// RFC 7143 §11.19: the target pings with a NOP-In carrying a valid TTT and ITT 0xffffffff
/// (§11.19.2: StatSN is then not advanced); a connection whose peer stays silent is dropped
/// (§7.1.5: at ERL 0 the target recovers by dropping the session).
#[tokio::test]
async fn nop_in_ping_then_drop_silent_peer() {
    let mut o = options();
    o.nop_interval = Duration::from_millis(200);
    o.nop_timeout = Duration::from_millis(600);
    let t = Target::start_with(state([target(TARGET, &[0])]), o).await;
    let mut i = t.login().await;
    let start = tokio::time::Instant::now();
    let p = i.recv().await;
    let Header::NopIn(h) = &p.header else {
        panic!("expected a NOP-In ping, got {p:?}");
    };
    assert_eq!(h.itt, Itt::RESERVED);
    assert_ne!(h.ttt, Ttt::RESERVED);
    assert_eq!(h.stat_sn, i.exp_stat_sn, "ping carries the next StatSN");
    let rest = i.expect_closed().await;
    assert!(
        rest.iter()
            .all(|p| matches!(p.header, Header::NopIn(_) | Header::AsyncMessage(_))),
        "{rest:?}"
    );
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(400), "dropped after {took:?}");
    assert!(took < Duration::from_secs(4), "dropped after {took:?}");
}

/// RFC 7143 §11.19: a ping answered by the initiator (NOP-Out echoing the TTT, §11.18.3) keeps
/// the connection alive.
#[tokio::test]
async fn answered_ping_keeps_connection() {
    let mut o = options();
    o.nop_interval = Duration::from_millis(200);
    o.nop_timeout = Duration::from_millis(600);
    let t = Target::start_with(state([target(TARGET, &[0])]), o).await;
    let mut i = t.login().await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < deadline {
        let p = i.recv().await;
        let Header::NopIn(h) = &p.header else {
            panic!("expected a NOP-In ping, got {p:?}");
        };
        let answer = iscsi_proto::Pdu::new(
            Header::NopOut(iscsi_proto::pdu::NopOut {
                immediate: true,
                lun: h.lun,
                itt: Itt::RESERVED,
                ttt: h.ttt,
                cmd_sn: i.cmd_sn,
                exp_stat_sn: i.exp_stat_sn,
            }),
            Bytes::new(),
        );
        i.send(&answer).await;
    }
    assert_eq!(i.exec(0, &inquiry(36), 36).await.status, GOOD);
}

/// RFC 7143 §13.1: with HeaderDigest/DataDigest=CRC32C every PDU carries valid digests;
/// §7.8.1: "When a target ... receives any iSCSI PDU with a payload digest error, it MUST
/// answer with a Reject PDU with a reason code of Data-Digest-Error and discard the PDU."
#[tokio::test]
async fn digests_are_valid_and_bad_data_digest_is_rejected() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t
        .login_with(
            &Login::normal(TARGET)
                .key("HeaderDigest", "CRC32C")
                .key("DataDigest", "CRC32C"),
        )
        .await;
    assert_eq!(i.param("HeaderDigest"), Some("CRC32C"));
    assert_eq!(i.param("DataDigest"), Some("CRC32C"));
    assert!(i.codec.header_digest && i.codec.data_digest);
    i.clear_ua(0).await;
    // Our codec checks both digests of everything it decodes.
    let data = pattern(5000 / 512 * 512, 3);
    assert_eq!(i.write(0, 8, &data).await.status, GOOD);
    assert_eq!(i.exec(0, &read10(8, 9), 4608).await.data, data);

    // A NOP-Out ping whose data digest is wrong.
    let (_, nop) = i.nop_out(Bytes::from_static(b"digest me"));
    let mut wire = BytesMut::from(&i.codec.encode_to_bytes(&nop)[..]);
    let n = wire.len();
    wire[n - 1] ^= 0xff;
    let sent_bhs = wire[..BHS_LEN].to_vec();
    // Sanity: the header digest we send is right.
    assert_eq!(
        u32::from_le_bytes(wire[BHS_LEN..BHS_LEN + 4].try_into().unwrap()),
        crc32c(&sent_bhs)
    );
    i.send_raw(&wire).await;
    let (rej, hdr) = as_reject(&i.recv().await);
    assert_eq!(rej.reason, RejectReason::DATA_DIGEST_ERROR);
    assert_eq!(&hdr[..], &sent_bhs[..]);
    // Discarded, not answered; the session goes on.
    assert_eq!(i.exec(0, &inquiry(36), 36).await.status, GOOD);
}

/// RFC 7143 §13.12: MaxRecvDataSegmentLength is the most the receiver accepts in one PDU; a
/// PDU declaring more is a protocol error (§11.17.1 Reject reason 0x04 with the rejected
/// header), and with the stream unframed the target closes the connection.
#[tokio::test]
async fn data_segment_above_limit_is_rejected_then_closed() {
    let t = Target::start(state([target(TARGET, &[0])])).await;
    let mut i = t.login().await;
    let ours: usize = i
        .param("MaxRecvDataSegmentLength")
        .expect("target declares MaxRecvDataSegmentLength")
        .parse()
        .unwrap();
    let (_, nop) = i.nop_out(Bytes::from(vec![0u8; ours + 4]));
    let wire = i.codec.encode_to_bytes(&nop);
    let sent_bhs = wire[..BHS_LEN].to_vec();
    i.send_raw(&wire[..BHS_LEN]).await;
    let got = i.expect_closed().await;
    let rejects: Vec<_> = got
        .iter()
        .filter(|p| matches!(p.header, Header::Reject(_)))
        .collect();
    assert_eq!(rejects.len(), 1, "{got:?}");
    let (rej, hdr) = as_reject(rejects[0]);
    assert_eq!(rej.reason, RejectReason::PROTOCOL_ERROR);
    assert_eq!(
        &hdr[..],
        &sent_bhs[..],
        "Reject carries the offending header"
    );
}
