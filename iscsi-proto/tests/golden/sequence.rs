//! The decoded captures make sense as iSCSI conversations: login first and paired, no login
//! PDU afterwards, the opcode sequence `index.tsv` recorded, responses only for tasks the
//! initiator started, CmdSN/StatSN/DataSN advancing as RFC 7143 says. These catch a decoder
//! that frames correctly but puts fields in the wrong place.

use std::collections::HashMap;

use crate::capture::{self, Connection, Framed};
use iscsi_proto::pdu::{Header, Stage};
use iscsi_proto::types::{Itt, Sn, Ttt};

fn check_login(conn: &Connection, failures: &mut Vec<String>) {
    let n = conn.login.login_pdus;
    let ini = &conn.initiator.pdus;
    let tgt = &conn.target.pdus;
    let name = &conn.name;
    if !matches!(
        ini.first().map(|f| &f.pdu.header),
        Some(Header::LoginRequest(_))
    ) {
        failures.push(format!(
            "{name}: first initiator PDU is not a Login Request"
        ));
    }
    if !matches!(
        tgt.first().map(|f| &f.pdu.header),
        Some(Header::LoginResponse(_))
    ) {
        failures.push(format!("{name}: first target PDU is not a Login Response"));
    }
    for i in 0..n {
        let (Some(Header::LoginRequest(req)), Some(Header::LoginResponse(rsp))) = (
            ini.get(i).map(|f| &f.pdu.header),
            tgt.get(i).map(|f| &f.pdu.header),
        ) else {
            failures.push(format!(
                "{name}: login PDU {i} is not a request/response pair"
            ));
            continue;
        };
        // RFC 7143 §11.13: the response echoes ISID and ITT, and answers in the request's CSG
        // (§11.13.3, "the CSG field ... MUST be the same as in the corresponding request").
        if req.itt != rsp.itt {
            failures.push(format!("{name}: login PDU {i}: ITT not echoed"));
        }
        // tgtd zeroes the ISID in a failure response (status class 2 in the bad-secret
        // captures); the initiator closes the connection anyway (§11.13.5).
        if rsp.status_class == 0 && req.isid != rsp.isid {
            failures.push(format!("{name}: login PDU {i}: ISID not echoed"));
        }
        if req.csg != rsp.csg {
            failures.push(format!(
                "{name}: login PDU {i}: CSG {:?} answered in {:?}",
                req.csg, rsp.csg
            ));
        }
        // RFC 7143 §11.12.4: version numbers; both sides speak version 0.
        if req.version_max != 0 || req.version_min != 0 || rsp.version_active != 0 {
            failures.push(format!("{name}: login PDU {i}: unexpected version fields"));
        }
        if rsp.transit && !req.transit {
            failures.push(format!(
                "{name}: login PDU {i}: target transits without T=1 request"
            ));
        }
        if rsp.transit && rsp.nsg == Stage::FullFeature && rsp.tsih.0 == 0 {
            failures.push(format!("{name}: final Login Response without a TSIH"));
        }
    }
    for (side, pdus) in [("initiator", ini), ("target", tgt)] {
        if let Some(f) = pdus[n.min(pdus.len())..].iter().find(|f| {
            matches!(
                f.pdu.header,
                Header::LoginRequest(_) | Header::LoginResponse(_)
            )
        }) {
            failures.push(format!(
                "{name}: {side} login PDU at offset {} after the login",
                f.offset
            ));
        }
    }
    if !conn.login.completed && (ini.len() != n || tgt.len() != n) {
        failures.push(format!("{name}: PDUs after a failed login"));
    }
}

/// ITTs the initiator used for tasks, and the last CmdSN it sent.
fn check_initiator(conn: &Connection, tally: &mut Tally, failures: &mut Vec<String>) -> Vec<Itt> {
    let name = &conn.name;
    let ini = &conn.initiator.pdus;
    let n = conn.login.login_pdus;
    let mut itts = Vec::new();
    // RFC 7143 §4.2.2.1: CmdSN advances by one for every non-immediate command; immediate
    // commands carry the current value. The login's CmdSN is the first one used.
    let mut next: Option<Sn> = ini
        .get(n.saturating_sub(1))
        .and_then(|f| match &f.pdu.header {
            Header::LoginRequest(r) => Some(r.cmd_sn),
            _ => None,
        });
    for f in &ini[n.min(ini.len())..] {
        let (immediate, cmd_sn, itt) = match &f.pdu.header {
            Header::ScsiCommand(c) => (c.immediate, c.cmd_sn, c.itt),
            Header::TextRequest(c) => (c.immediate, c.cmd_sn, c.itt),
            Header::LogoutRequest(c) => (c.immediate, c.cmd_sn, c.itt),
            Header::TaskMgmtRequest(c) => (c.immediate, c.cmd_sn, c.itt),
            Header::NopOut(c) => {
                // A NOP-Out answering a NOP-In carries ITT 0xffffffff and is not a command.
                if c.itt == Itt::RESERVED {
                    if !c.immediate {
                        failures.push(format!("{name}: NOP-Out ping answer not immediate"));
                    }
                    continue;
                }
                (c.immediate, c.cmd_sn, c.itt)
            }
            Header::DataOut(d) => {
                if !itts.contains(&d.itt) {
                    failures.push(format!("{name}: Data-Out for unknown ITT {:?}", d.itt));
                }
                continue;
            }
            other => {
                failures.push(format!(
                    "{name}: unexpected initiator opcode {:#04x}",
                    other.opcode()
                ));
                continue;
            }
        };
        if let Some(expected) = next {
            tally.cmd_sn += 1;
            if cmd_sn != expected {
                failures.push(format!(
                    "{name}: CmdSN {} at offset {}, expected {}",
                    cmd_sn.0, f.offset, expected.0
                ));
            }
        }
        next = Some(if immediate { cmd_sn } else { cmd_sn.add(1) });
        itts.push(itt);
    }
    itts
}

fn check_target(conn: &Connection, itts: &[Itt], tally: &mut Tally, failures: &mut Vec<String>) {
    let name = &conn.name;
    let tgt = &conn.target.pdus;
    let n = conn.login.login_pdus;
    // RFC 7143 §4.2.2.2: StatSN advances by one for every response that carries status; the
    // first full-feature response follows the final Login Response's StatSN.
    let mut stat_sn: Option<Sn> = tgt
        .get(n.saturating_sub(1))
        .and_then(|f| match &f.pdu.header {
            Header::LoginResponse(r) => Some(r.stat_sn),
            _ => None,
        });
    // Data-In: DataSN from 0 and BufferOffset contiguous per task (RFC 7143 §11.7.5, §11.7.6).
    let mut data_in: HashMap<Itt, (u32, u32)> = HashMap::new();
    let mut r2t_ttts: Vec<(Itt, Ttt)> = Vec::new();
    for f in &tgt[n.min(tgt.len())..] {
        let mut status = |sn: Sn, what: &str, f: &Framed| {
            if let Some(prev) = stat_sn {
                tally.stat_sn += 1;
                if sn != prev.add(1) {
                    failures.push(format!(
                        "{name}: {what} at offset {} has StatSN {}, expected {}",
                        f.offset,
                        sn.0,
                        prev.0.wrapping_add(1)
                    ));
                }
            }
            stat_sn = Some(sn);
        };
        let itt = f.pdu.header.itt();
        match &f.pdu.header {
            Header::ScsiResponse(r) => status(r.stat_sn, "SCSI Response", f),
            Header::TextResponse(r) => status(r.stat_sn, "Text Response", f),
            Header::LogoutResponse(r) => status(r.stat_sn, "Logout Response", f),
            Header::DataIn(d) => {
                if d.status_present {
                    status(d.stat_sn, "Data-In with status", f);
                }
                tally.data_in += 1;
                let (sn, off) = data_in.entry(d.itt).or_insert((0, 0));
                if d.data_sn.0 != *sn || d.buffer_offset != *off {
                    failures.push(format!(
                        "{name}: Data-In at offset {}: DataSN {} offset {}, expected {} and {}",
                        f.offset, d.data_sn.0, d.buffer_offset, sn, off
                    ));
                }
                *sn += 1;
                *off += f.pdu.data.len() as u32;
            }
            Header::R2t(r) => {
                // An R2T carries the next StatSN without advancing it (RFC 7143 §11.8.3).
                if stat_sn.is_some_and(|s| r.stat_sn != s.add(1)) {
                    failures.push(format!(
                        "{name}: R2T at offset {} has StatSN {}",
                        f.offset, r.stat_sn.0
                    ));
                }
                r2t_ttts.push((r.itt, r.ttt));
            }
            Header::NopIn(p) => {
                if p.itt == Itt::RESERVED {
                    // Target-initiated ping: needs a TTT for the answer, does not advance StatSN.
                    if p.ttt == Ttt::RESERVED {
                        failures.push(format!("{name}: unsolicited NOP-In without TTT"));
                    }
                    continue;
                }
                status(p.stat_sn, "NOP-In", f);
            }
            other => {
                failures.push(format!(
                    "{name}: unexpected target opcode {:#04x}",
                    other.opcode()
                ));
                continue;
            }
        }
        if !itts.contains(&itt) {
            failures.push(format!(
                "{name}: target PDU at offset {} for unknown ITT {:?}",
                f.offset, itt
            ));
        }
    }
    // Every Data-Out answers an R2T by ITT and TTT, or is unsolicited (TTT 0xffffffff).
    for f in &conn.initiator.pdus {
        if let Header::DataOut(d) = &f.pdu.header {
            tally.data_out += 1;
            if d.ttt != Ttt::RESERVED && !r2t_ttts.contains(&(d.itt, d.ttt)) {
                failures.push(format!(
                    "{name}: Data-Out at offset {} answers no R2T",
                    f.offset
                ));
            }
        }
    }
}

/// How many checks ran, so that a decoder bug cannot make them vacuous.
#[derive(Debug, Default)]
struct Tally {
    cmd_sn: usize,
    stat_sn: usize,
    data_in: usize,
    data_out: usize,
}

#[test]
fn opcode_sequences_make_sense() {
    let mut failures = Vec::new();
    let mut tally = Tally::default();
    for conn in capture::connections() {
        for (row, decoded) in [
            (&conn.initiator_row, &conn.initiator),
            (&conn.target_row, &conn.target),
        ] {
            let got = capture::summary(&decoded.pdus);
            if got != row.pdu_summary {
                failures.push(format!(
                    "{}: PDUs {got}\n  index says {}",
                    row.file, row.pdu_summary
                ));
            }
        }
        check_login(&conn, &mut failures);
        let itts = check_initiator(&conn, &mut tally, &mut failures);
        check_target(&conn, &itts, &mut tally, &mut failures);
    }
    assert!(
        tally.cmd_sn > 500 && tally.stat_sn > 300 && tally.data_in > 200 && tally.data_out >= 9,
        "too few checks ran: {tally:?}"
    );
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
