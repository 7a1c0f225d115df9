//! Loading and decoding the captures in `testdata/` (see `testdata/README.md`).

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use iscsi_proto::pdu::{opcode, Header, Stage};
use iscsi_proto::text::{self, TextAssembler};
use iscsi_proto::{Codec, Pdu};

/// One row of `testdata/index.tsv`.
#[derive(Debug, Clone)]
pub struct IndexRow {
    /// Path relative to `testdata/`, e.g. `libiscsi/inq-standard-c1.initiator.bin`.
    pub file: String,
    pub bytes: usize,
    pub pdus: usize,
    /// Index of the first full-feature-phase PDU, `None` when the login never completed.
    pub first_ffp_pdu: Option<usize>,
    /// `none`, `header` or `header+data`.
    pub digests: String,
    /// Whether the capture was cut (`truncated from ...`).
    pub truncated: bool,
    /// Opcode names, `*k` for repeats.
    pub pdu_summary: String,
}

pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// Every row of `index.tsv`. Panics if the index is missing or malformed: the goldens are
/// part of the repository.
pub fn index() -> Vec<IndexRow> {
    let path = testdata().join("index.tsv");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("file\tbytes\tpdus\tfirst_ffp_pdu\tdigests\tstream\tpdu_summary"),
        "index.tsv header"
    );
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 7, "index.tsv row {line:?}");
            IndexRow {
                file: f[0].to_owned(),
                bytes: f[1].parse().expect("bytes column"),
                pdus: f[2].parse().expect("pdus column"),
                first_ffp_pdu: (f[3] != "-").then(|| f[3].parse().expect("first_ffp_pdu column")),
                digests: f[4].to_owned(),
                truncated: match f[5] {
                    "complete" => false,
                    s if s.starts_with("truncated from ") => true,
                    s => panic!("stream column {s:?}"),
                },
                pdu_summary: f[6].to_owned(),
            }
        })
        .collect()
}

/// Digest settings in force in the full feature phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

impl Digests {
    /// The `digests` column of `index.tsv`.
    pub fn column(self) -> &'static str {
        match (self.header, self.data) {
            (false, false) => "none",
            (true, false) => "header",
            (true, true) => "header+data",
            (false, true) => "data",
        }
    }
}

/// One decoded PDU with where it sat in the stream and the codec settings it was framed with.
#[derive(Debug, Clone)]
pub struct Framed {
    pub pdu: Pdu,
    pub offset: usize,
    pub len: usize,
    pub digests: Digests,
}

/// One decoded direction of a connection.
#[derive(Debug)]
pub struct Decoded {
    pub pdus: Vec<Framed>,
    /// Bytes after the last whole PDU (non-empty only for a capture cut mid-PDU).
    pub rest: BytesMut,
}

/// What the login of one connection settled, read from the target's Login Responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginOutcome {
    /// Number of Login Responses (and so Login Requests) in the login phase.
    pub login_pdus: usize,
    /// Whether the last Login Response was final and successful (T=1, NSG=3, status 0).
    pub completed: bool,
    /// Digests in force from the first full-feature-phase PDU on.
    pub digests: Digests,
}

fn is_crc32c(v: &str) -> bool {
    match v {
        "CRC32C" => true,
        "None" => false,
        other => panic!("unexpected digest answer {other:?}"),
    }
}

/// Decodes the login phase of a target stream (no digests in login PDUs, RFC 7143 §13.1),
/// joining Login Response text across the C bit, and reads the HeaderDigest/DataDigest
/// answers.
pub fn login_outcome(target_stream: &[u8]) -> LoginOutcome {
    let mut codec = Codec::default();
    let mut buf = BytesMut::from(target_stream);
    let mut assembler = TextAssembler::default();
    let mut outcome = LoginOutcome {
        login_pdus: 0,
        completed: false,
        digests: Digests::default(),
    };
    while buf.len() >= 48 && buf[0] & 0x3f == opcode::LOGIN_RESPONSE {
        let pdu = codec
            .decode(&mut buf)
            .expect("login response decodes")
            .expect("login response is whole");
        let Header::LoginResponse(rsp) = &pdu.header else {
            unreachable!("opcode checked above")
        };
        outcome.login_pdus += 1;
        if let Some(ltds) = assembler
            .handle_segment(&pdu.data, rsp.continue_)
            .expect("login text within caps")
        {
            for (key, value) in text::parse(&ltds).expect("login text parses") {
                match key {
                    "HeaderDigest" => outcome.digests.header = is_crc32c(value),
                    "DataDigest" => outcome.digests.data = is_crc32c(value),
                    _ => {}
                }
            }
        }
        let success = rsp.status_class == 0 && rsp.status_detail == 0;
        if rsp.transit && rsp.nsg == Stage::FullFeature && success {
            outcome.completed = true;
            break;
        }
        if !success {
            break;
        }
    }
    if !outcome.completed {
        outcome.digests = Digests::default();
    }
    outcome
}

/// Decodes a whole stream: the first `login_pdus` PDUs without digests, the rest with
/// `digests`. Stops at the first incomplete PDU; a decode error fails the test with the
/// offset.
pub fn decode_stream(name: &str, stream: &[u8], login_pdus: usize, digests: Digests) -> Decoded {
    let mut buf = BytesMut::from(stream);
    let mut pdus = Vec::new();
    let mut offset = 0;
    loop {
        let d = if pdus.len() < login_pdus {
            Digests::default()
        } else {
            digests
        };
        // As a receiver would: a large MaxRecvDataSegmentLength, so that the test checks the
        // framing and not the peer's declared limit.
        let mut codec = Codec {
            header_digest: d.header,
            data_digest: d.data,
            ..Codec::default()
        };
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(pdu)) => {
                let len = before - buf.len();
                pdus.push(Framed {
                    pdu,
                    offset,
                    len,
                    digests: d,
                });
                offset += len;
            }
            Ok(None) => break,
            Err(e) => panic!("{name}: PDU {} at offset {offset}: {e}", pdus.len()),
        }
    }
    Decoded { pdus, rest: buf }
}

/// Re-encodes a decoded PDU with the settings it was decoded with.
pub fn encode(framed: &Framed) -> BytesMut {
    let codec = Codec {
        header_digest: framed.digests.header,
        data_digest: framed.digests.data,
        ..Codec::default()
    };
    let mut out = BytesMut::new();
    codec.encode(&framed.pdu, &mut out);
    out
}

/// Both directions of one captured connection.
#[derive(Debug)]
pub struct Connection {
    /// `<client>/<scenario>-c<N>`.
    pub name: String,
    pub initiator_row: IndexRow,
    pub target_row: IndexRow,
    pub initiator_bytes: Vec<u8>,
    pub target_bytes: Vec<u8>,
    pub login: LoginOutcome,
    pub initiator: Decoded,
    pub target: Decoded,
}

/// Every captured connection, decoded.
pub fn connections() -> Vec<Connection> {
    let rows = index();
    let mut out = Vec::new();
    for irow in rows.iter().filter(|r| r.file.ends_with(".initiator.bin")) {
        let name = irow.file.trim_end_matches(".initiator.bin").to_owned();
        let trow = rows
            .iter()
            .find(|r| r.file == format!("{name}.target.bin"))
            .unwrap_or_else(|| panic!("{name}: no target stream in index.tsv"))
            .clone();
        let read = |f: &str| {
            let p = testdata().join(f);
            std::fs::read(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"))
        };
        let initiator_bytes = read(&irow.file);
        let target_bytes = read(&trow.file);
        let login = login_outcome(&target_bytes);
        // The initiator sends one Login Request per Login Response; its digests start after
        // the last one (testdata/README.md).
        let initiator = decode_stream(
            &irow.file,
            &initiator_bytes,
            login.login_pdus,
            login.digests,
        );
        let target = decode_stream(&trow.file, &target_bytes, login.login_pdus, login.digests);
        out.push(Connection {
            name,
            initiator_row: irow.clone(),
            target_row: trow,
            initiator_bytes,
            target_bytes,
            login,
            initiator,
            target,
        });
    }
    out
}

/// The `pdu_summary` notation of `index.tsv` for a PDU sequence.
pub fn summary(pdus: &[Framed]) -> String {
    let names: Vec<String> = pdus.iter().map(|f| name(&f.pdu)).collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < names.len() {
        let run = names[i..].iter().take_while(|n| **n == names[i]).count();
        out.push(if run > 1 {
            format!("{}*{run}", names[i])
        } else {
            names[i].clone()
        });
        i += run;
    }
    out.join(" ")
}

fn name(pdu: &Pdu) -> String {
    match &pdu.header {
        Header::NopOut(_) => "NopOut".into(),
        Header::ScsiCommand(c) => format!("ScsiCmd({:02x})", c.cdb[0]),
        Header::TaskMgmtRequest(_) => "TmfReq".into(),
        Header::LoginRequest(_) => "LoginReq".into(),
        Header::TextRequest(_) => "TextReq".into(),
        Header::DataOut(_) => "DataOut".into(),
        Header::LogoutRequest(_) => "LogoutReq".into(),
        Header::SnackRequest(_) => "Snack".into(),
        Header::NopIn(_) => "NopIn".into(),
        Header::ScsiResponse(_) => "ScsiRsp".into(),
        Header::TaskMgmtResponse(_) => "TmfRsp".into(),
        Header::LoginResponse(_) => "LoginRsp".into(),
        Header::TextResponse(_) => "TextRsp".into(),
        Header::DataIn(_) => "DataIn".into(),
        Header::LogoutResponse(_) => "LogoutRsp".into(),
        Header::R2t(_) => "R2T".into(),
        Header::AsyncMessage(_) => "Async".into(),
        Header::Reject(_) => "Reject".into(),
        other => format!("Unknown({:02x})", other.opcode()),
    }
}
