//! A hostile initiator: seeded random sequences of well-formed, malformed and out-of-place
//! full-feature PDUs against a live target, then checks that the target is still whole.
//!
//! RFC 7143 §7.1.1 asks the target to answer a protocol error with a Reject or by dropping the
//! connection, never to act on it; STYLE.md asks that peer input never panics, hangs or leaks.
//! Each sequence logs in with randomly chosen operational keys (digests, burst lengths,
//! InitialR2T, ImmediateData, ErrorRecoveryLevel) and sends up to 60 PDUs chosen at random:
//! reads and writes in and out of range, Data-Out for real and invented transfers, NOP-Outs,
//! task management functions, Text and SNACK requests, random CDBs, commands outside the
//! CmdSN window, BHS bytes flipped after encoding, a Logout in the middle. Between PDUs it
//! reads what the target sends (every PDU must frame and decode; the codec checks digests).
//! After all sequences:
//! - no panic happened in the library (a panic hook counts those raised in `target-core/src`
//!   or `iscsi-proto/src`);
//! - every session is gone once its connection closed;
//! - a fresh session writes and reads back data intact.
//!
//! The seed is fixed so a failure reproduces; `KTGT_HOSTILE_SEED=N` and
//! `KTGT_HOSTILE_SEQUENCES=N` run others.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use iscsi_proto::pdu::{Header, NopOut, SnackRequest, TaskMgmtRequest};
use iscsi_proto::types::{Itt, Lun, Sn, Ttt};
use iscsi_proto::Pdu;
use target_core::workers::Workers;

use crate::lifecycle::wait_for;
use crate::support::*;

/// Panics raised in library code (not in this test's own assertions).
static LIBRARY_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_library_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file()).unwrap_or("");
            if file.contains("target-core/src") || file.contains("iscsi-proto/src") {
                LIBRARY_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// SplitMix64: small, seedable, good enough to pick PDUs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn word(&mut self, items: &[&'static str]) -> &'static str {
        items[self.below(items.len() as u64) as usize]
    }

    fn bytes(&mut self, len: usize) -> Bytes {
        let mut v = vec![0u8; len];
        for b in v.iter_mut() {
            *b = self.next() as u8;
        }
        Bytes::from(v)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the initiator remembers of the target's requests, to answer some of them.
#[derive(Default)]
struct Seen {
    /// (ITT, TTT, offset, length) of R2Ts received.
    r2ts: Vec<(Itt, Ttt, u32, u32)>,
    /// TTTs of NOP-In pings received.
    pings: Vec<Ttt>,
    /// ITTs used for commands.
    itts: Vec<Itt>,
    pdus: usize,
    rejects: usize,
    kind: &'static str,
}

/// Reads whatever the target sends within `wait`; `false` once it closed the connection.
async fn drain(i: &mut Initiator, seen: &mut Seen, wait: Duration) -> bool {
    loop {
        match i.recv_within(wait).await {
            Ok(Some(p)) => {
                seen.pdus += 1;
                match &p.header {
                    Header::R2t(r) => {
                        seen.r2ts.push((
                            r.itt,
                            r.ttt,
                            r.buffer_offset,
                            r.desired_data_transfer_length,
                        ));
                        if seen.r2ts.len() > 16 {
                            seen.r2ts.remove(0);
                        }
                    }
                    Header::NopIn(n) if n.ttt != Ttt::RESERVED => seen.pings.push(n.ttt),
                    Header::Reject(_) => seen.rejects += 1,
                    _ => {}
                }
            }
            Ok(None) => return false,
            Err(()) => return true,
        }
    }
}

fn cdb_rw(opcode: u8, lba: u64, blocks: u32) -> Vec<u8> {
    match opcode {
        0x88 | 0x8a => {
            let mut c = vec![0u8; 16];
            c[0] = opcode;
            c[2..10].copy_from_slice(&lba.to_be_bytes());
            c[10..14].copy_from_slice(&blocks.to_be_bytes());
            c
        }
        _ => {
            let mut c = vec![0u8; 10];
            c[0] = opcode;
            c[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
            c[7..9].copy_from_slice(&(blocks as u16).to_be_bytes());
            c
        }
    }
}

/// One PDU (or a few bytes of one) chosen at random.
fn hostile_pdu(i: &mut Initiator, rng: &mut Rng, seen: &mut Seen) -> Vec<u8> {
    seen.kind = "?";
    let blocks_in_lun = LUN_SIZE / 512;
    let lun = if rng.chance(90) {
        0
    } else {
        rng.below(4) as u16
    };
    let pdu = match rng.below(12) {
        // Reads and writes, mostly in range, lengths sometimes disagreeing with the CDB.
        0..=2 => {
            seen.kind = "read/write";
            let opcode = *rng.pick(&[0x28u8, 0x2a, 0x88, 0x8a]);
            let write = opcode == 0x2a || opcode == 0x8a;
            let blocks = rng.below(65) as u32;
            let lba = if rng.chance(85) {
                rng.below(blocks_in_lun)
            } else {
                blocks_in_lun - rng.below(8)
            };
            let mut edtl = blocks * 512;
            if rng.chance(15) {
                edtl = rng.below(128 << 10) as u32;
            }
            let dir = if write { Dir::Write } else { Dir::Read };
            let imm = if write && rng.chance(60) {
                let n = rng.below(u64::from(edtl.min(16384)) + 1) as usize;
                rng.bytes(n)
            } else {
                Bytes::new()
            };
            let p = i.command(lun, &cdb_rw(opcode, lba, blocks), edtl, dir, imm);
            seen.itts.push(p.header.itt());
            p
        }
        // Data-Out: for an R2T we got (sometimes bent), or for nothing at all.
        3 | 4 => {
            seen.kind = "Data-Out";
            let (itt, ttt, offset, len) = match seen.r2ts.last().copied() {
                Some(r) if rng.chance(70) => r,
                _ => (
                    Itt(rng.next() as u32),
                    Ttt(rng.next() as u32),
                    rng.below(1 << 20) as u32,
                    rng.below(16384) as u32,
                ),
            };
            let offset = if rng.chance(20) {
                offset.wrapping_add(rng.below(8192) as u32)
            } else {
                offset
            };
            let n = (len.min(8192) as usize).min(rng.below(8193) as usize + 1);
            let final_ = rng.chance(70);
            let data_sn = rng.below(3) as u32;
            i.data_out(lun, itt, ttt, data_sn, offset, final_, rng.bytes(n))
        }
        // NOP-Out: a ping, an answer to a ping (real or not), sometimes not immediate.
        5 => {
            seen.kind = "NOP-Out";
            let ttt = match seen.pings.pop() {
                Some(t) if rng.chance(60) => t,
                _ if rng.chance(50) => Ttt::RESERVED,
                _ => Ttt(rng.next() as u32),
            };
            let itt = if ttt == Ttt::RESERVED || rng.chance(20) {
                i.itt()
            } else {
                Itt::RESERVED
            };
            let n = rng.below(4097) as usize;
            Pdu::new(
                Header::NopOut(NopOut {
                    immediate: rng.chance(80),
                    lun: Lun::default(),
                    itt,
                    ttt,
                    cmd_sn: i.cmd_sn,
                    exp_stat_sn: i.exp_stat_sn,
                }),
                rng.bytes(n),
            )
        }
        // Task management: any function code, for a task we sent or an invented one.
        6 => {
            let function = rng.below(16) as u8;
            // RFC 7143 §11.5.1: after TARGET COLD RESET (7) the target drops all connections;
            // every other function (1-8, and the undefined ones) is answered.
            seen.kind = match function {
                7 => "TMF target cold reset",
                _ => "TMF",
            };
            let referenced = match seen.itts.last() {
                Some(&t) if rng.chance(60) => t,
                _ => Itt(rng.next() as u32),
            };
            let itt = i.itt();
            Pdu::new(
                Header::TaskMgmtRequest(TaskMgmtRequest {
                    immediate: rng.chance(80),
                    function,
                    lun: Lun::from_number(lun).unwrap(),
                    itt,
                    referenced_task_tag: referenced,
                    cmd_sn: i.cmd_sn,
                    exp_stat_sn: i.exp_stat_sn,
                    ref_cmd_sn: Sn(rng.next() as u32),
                    exp_data_sn: Sn(rng.below(4) as u32),
                }),
                Bytes::new(),
            )
        }
        // Text: SendTargets, junk, or an unknown TTT.
        7 => {
            seen.kind = "Text";
            let itt = i.itt();
            let ttt = if rng.chance(70) {
                Ttt::RESERVED
            } else {
                Ttt(rng.next() as u32)
            };
            let data = match rng.below(3) {
                0 => Bytes::from_static(b"SendTargets=All\0"),
                1 => Bytes::from_static(b"MaxRecvDataSegmentLength=512\0X-Vendor=1\0"),
                _ => {
                    let n = rng.below(2048) as usize;
                    rng.bytes(n)
                }
            };
            i.text_request(itt, ttt, data)
        }
        // SNACK of any type (ErrorRecoveryLevel 0 targets may reject them).
        8 => {
            seen.kind = "SNACK";
            Pdu::new(
                Header::SnackRequest(SnackRequest {
                    snack_type: rng.below(4) as u8,
                    lun: Lun::from_number(lun).unwrap(),
                    itt: match seen.itts.last() {
                        Some(&t) if rng.chance(50) => t,
                        _ => Itt(rng.next() as u32),
                    },
                    ttt: Ttt(rng.next() as u32),
                    exp_stat_sn: i.exp_stat_sn,
                    beg_run: rng.below(8) as u32,
                    run_length: rng.below(8) as u32,
                }),
                Bytes::new(),
            )
        }
        // A random CDB with random direction, length and immediate data.
        9 => {
            seen.kind = "random CDB";
            let mut cdb = rng.bytes(16).to_vec();
            if rng.chance(50) {
                cdb[0] = *rng.pick(&[
                    0x00u8, 0x03, 0x12, 0x1a, 0x25, 0x35, 0x41, 0x42, 0x5a, 0x5e, 0x5f, 0x89, 0x8f,
                    0x93, 0x9e, 0xa0, 0xa3,
                ]);
            }
            let edtl = rng.below(64 << 10) as u32;
            let dir = *rng.pick(&[Dir::None, Dir::Read, Dir::Write]);
            let imm = if dir == Dir::Write && rng.chance(50) {
                let n = rng.below(u64::from(edtl.min(8192)) + 1) as usize;
                rng.bytes(n)
            } else {
                Bytes::new()
            };
            let p = i.command(lun, &cdb, edtl, dir, imm);
            seen.itts.push(p.header.itt());
            p
        }
        // Outside the CmdSN window, a duplicate CmdSN, or a reused ITT.
        10 => {
            seen.kind = "CmdSN/ITT misuse";
            let cmd_sn = match rng.below(3) {
                0 => i.cmd_sn.add(rng.below(1 << 20) as u32 + 64),
                1 => Sn(i.cmd_sn.0.wrapping_sub(1)),
                _ => Sn(rng.next() as u32),
            };
            let itt = match seen.itts.last() {
                Some(&t) if rng.chance(50) => t,
                _ => i.itt(),
            };
            i.command_with(
                0,
                itt,
                cmd_sn,
                rng.chance(30),
                &[0x00; 6],
                0,
                Dir::None,
                Bytes::new(),
            )
        }
        // A valid command whose encoded header then has a few bytes flipped (not the length
        // fields, so framing survives unless the opcode now says otherwise).
        _ => {
            seen.kind = "flipped BHS";
            let p = i.command(0, &cdb_rw(0x28, 0, 1), 512, Dir::Read, Bytes::new());
            let mut raw = i.codec.encode_to_bytes(&p).to_vec();
            for _ in 0..=rng.below(4) {
                let at = rng.below(48) as usize;
                if (4..8).contains(&at) {
                    continue;
                }
                raw[at] ^= 1 << rng.below(8);
            }
            return raw;
        }
    };
    i.codec.encode_to_bytes(&pdu).to_vec()
}

async fn hostile_session(t: &Target, rng: &mut Rng) -> (Seen, bool) {
    let mut login = Login::normal(TARGET)
        .key("HeaderDigest", rng.word(&["None", "CRC32C"]))
        .key("DataDigest", rng.word(&["None", "CRC32C"]))
        .key(
            "MaxRecvDataSegmentLength",
            rng.word(&["512", "8192", "65536"]),
        )
        .key("FirstBurstLength", rng.word(&["512", "8192", "65536"]))
        .key("MaxBurstLength", rng.word(&["4096", "65536", "262144"]))
        .key("InitialR2T", rng.word(&["Yes", "No"]))
        .key("ImmediateData", rng.word(&["Yes", "No"]))
        .key("ErrorRecoveryLevel", rng.word(&["0", "1", "2"]));
    login.isid.0[5] = rng.next() as u8;
    let mut i = t.login_with(&login).await;
    let mut seen = Seen::default();
    let mut open = true;
    let steps = 10 + rng.below(51);
    for step in 0..steps {
        let bytes = if step > 3 && rng.chance(2) {
            seen.kind = "Logout";
            let (_, p) = i.logout(rng.below(4) as u8);
            i.codec.encode_to_bytes(&p).to_vec()
        } else {
            hostile_pdu(&mut i, rng, &mut seen)
        };
        // The target may close the connection at any point; a failed write ends the sequence.
        if tokio::io::AsyncWriteExt::write_all(&mut i.stream, &bytes)
            .await
            .is_err()
        {
            open = false;
            break;
        }
        if !drain(&mut i, &mut seen, Duration::from_millis(2)).await {
            open = false;
            break;
        }
    }
    if open {
        // Let the target finish answering, then leave without logging out.
        open = drain(&mut i, &mut seen, Duration::from_millis(50)).await;
    }
    (seen, open)
}

async fn hostile_run(t: &Target) {
    count_library_panics();
    let seed = env_u64("KTGT_HOSTILE_SEED", 0x6b74_6774);
    let sequences = env_u64("KTGT_HOSTILE_SEQUENCES", 40);
    let mut rng = Rng(seed);
    let (mut pdus, mut rejects, mut closed) = (0, 0, 0);
    let mut closed_after = std::collections::BTreeMap::<&str, usize>::new();
    for n in 0..sequences {
        let before = LIBRARY_PANICS.load(Ordering::SeqCst);
        let (seen, open) =
            tokio::time::timeout(Duration::from_secs(30), hostile_session(t, &mut rng))
                .await
                .unwrap_or_else(|_| panic!("sequence {n} (seed {seed:#x}) hung"));
        assert_eq!(
            LIBRARY_PANICS.load(Ordering::SeqCst),
            before,
            "sequence {n} (seed {seed:#x}) made the target panic"
        );
        pdus += seen.pdus;
        rejects += seen.rejects;
        closed += usize::from(!open);
        if !open {
            *closed_after.entry(seen.kind).or_default() += 1;
        }
    }
    eprintln!(
        "hostile: {sequences} sequences, {pdus} PDUs from the target ({rejects} Rejects), \
         {closed} connections closed by the target, after: {closed_after:?}"
    );
    // Every session ends once its connection is gone (the drain timeout bounds commands left
    // waiting for Data-Out that never comes).
    wait_for(|| t.table.session_count() == 0).await;
    // And the target still serves data intact.
    let mut i = t.login().await;
    i.clear_ua(0).await;
    let pattern: Vec<u8> = (0..8192u32).map(|b| (b * 7 + 3) as u8).collect();
    let w = i.write(0, 100, &pattern).await;
    assert_eq!(w.status, 0, "write after the hostile sequences");
    let r = i.exec(0, &cdb_rw(0x28, 100, 16), 8192).await;
    assert_eq!(r.status, 0);
    assert!(r.data == pattern, "data read back differs");
    assert_eq!(LIBRARY_PANICS.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn hostile_initiator_cannot_break_the_target() {
    let t = Target::start(state([target(TARGET, &[0, 1])])).await;
    hostile_run(&t).await;
}

/// The same on two connection threads with busy polling, as the agent runs them.
#[tokio::test]
async fn hostile_initiator_on_connection_threads() {
    let workers = Arc::new(Workers::start(2).unwrap());
    let mut opts = options();
    opts.busy_poll = Duration::from_micros(200);
    let t = Target::start_on(state([target(TARGET, &[0, 1])]), opts, Some(workers)).await;
    hostile_run(&t).await;
}
