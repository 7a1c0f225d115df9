//! The scripted initiator: a real target (table + portal on 127.0.0.1:0) and an initiator that
//! speaks PDUs over a loopback socket, built from `iscsi_proto` types (as h2's `h2-support`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use iscsi_proto::chap::{ChapAlgorithm, ChapSecret};
use iscsi_proto::login::test_support::{chap_response, encode, LoginRequestBuilder};
use iscsi_proto::pdu::{
    DataIn, DataOut, Header, LoginResponse, LogoutRequest, NopOut, Reject, ScsiCommand,
    ScsiResponse, Stage, TaskAttr, TaskMgmtRequest, TextRequest,
};
use iscsi_proto::types::{Isid, Itt, Lun, Sn, Ttt};
use iscsi_proto::{text, Codec, Pdu};
use target_core::config::{
    Acl, AddressRule, ChapConfig, ChapCredentials, DesiredState, LunConfig, TargetConfig,
};
use target_core::portal::{NetworkPortal, Portal};
use target_core::session::SessionOptions;
use target_core::table::TargetTable;
use target_core::workers::Workers;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const INITIATOR: &str = "iqn.2024-01.test:initiator";
pub const TARGET: &str = "iqn.2024-01.test:disk";
pub const LUN_SIZE: u64 = 4 * 1024 * 1024;
/// How long a test waits for a PDU the target must send.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

// --- Desired state builders ------------------------------------------------------------------

/// A target admitting [`INITIATOR`] (by name, from any address) with memory LUNs.
pub fn target(iqn: &str, luns: &[u16]) -> TargetConfig {
    TargetConfig {
        iqn: iqn.to_owned(),
        alias: None,
        luns: luns.iter().map(|&n| (n, mem_lun(n))).collect(),
        acl: Acl::single(vec![INITIATOR.to_owned()], vec![AddressRule::All]),
        chap: ChapConfig::default(),
    }
}

pub fn mem_lun(n: u16) -> LunConfig {
    LunConfig::memory(n, LUN_SIZE)
}

pub fn state(targets: impl IntoIterator<Item = TargetConfig>) -> DesiredState {
    DesiredState {
        targets: targets
            .into_iter()
            .map(|t| (t.iqn.clone(), t))
            .collect::<BTreeMap<_, _>>(),
        discovery_chap: None,
    }
}

pub fn chap_account(user: &str, secret: &[u8]) -> ChapCredentials {
    ChapCredentials {
        user: user.to_owned(),
        secret: secret.to_vec(),
    }
}

/// Short keepalive timers so a silent peer is noticed within a second.
pub fn options() -> SessionOptions {
    let mut o = SessionOptions {
        queue_depth: 16,
        drain_timeout: Duration::from_secs(2),
        ..SessionOptions::default()
    };
    o.limits.max_outstanding_r2t = 4;
    o
}

// --- The target ------------------------------------------------------------------------------

/// A served target table on a loopback port.
pub struct Target {
    pub table: Arc<TargetTable>,
    /// The first portal's address.
    pub addr: SocketAddr,
    /// Every portal bound, with its tag.
    pub portals: Vec<NetworkPortal>,
    pub cancel: CancellationToken,
    pub serve: JoinHandle<()>,
}

impl Target {
    pub async fn start(desired: DesiredState) -> Target {
        Target::start_with(desired, options()).await
    }

    pub async fn start_with(desired: DesiredState, opts: SessionOptions) -> Target {
        Target::start_on(desired, opts, None).await
    }

    /// With `workers`, connections run on those threads (as in the agent).
    pub async fn start_on(
        desired: DesiredState,
        opts: SessionOptions,
        workers: Option<Arc<Workers>>,
    ) -> Target {
        let loopback = NetworkPortal::new("127.0.0.1:0".parse().unwrap());
        Target::start_portals(desired, opts, workers, &[loopback]).await
    }

    /// On each of `portals` (loopback addresses, port 0 for any).
    pub async fn start_portals(
        desired: DesiredState,
        opts: SessionOptions,
        workers: Option<Arc<Workers>>,
        portals: &[NetworkPortal],
    ) -> Target {
        let table = TargetTable::new();
        let report = table.apply(&desired).await;
        assert!(report.errors.is_empty(), "apply: {:?}", report.errors);
        let mut portal = Portal::bind_portals(portals, table.clone(), opts, 64)
            .await
            .expect("bind loopback");
        if let Some(w) = workers {
            portal = portal.with_workers(w);
        }
        let portals = portal.portals();
        let addr = portals[0].addr;
        let cancel = CancellationToken::new();
        let serve = tokio::spawn(portal.serve(cancel.clone()));
        Target {
            table,
            addr,
            portals,
            cancel,
            serve,
        }
    }

    /// A TCP connection, not logged in.
    pub async fn connect(&self) -> Initiator {
        Initiator::connect(self.addr).await
    }

    /// A logged-in normal session to [`TARGET`] with default keys.
    pub async fn login(&self) -> Initiator {
        self.login_with(&Login::normal(TARGET)).await
    }

    pub async fn login_with(&self, l: &Login) -> Initiator {
        let mut i = self.connect().await;
        i.login(l).await.expect("login succeeds");
        i
    }
}

// --- Login -----------------------------------------------------------------------------------

/// What the initiator asks for at login.
#[derive(Clone)]
pub struct Login {
    pub initiator: String,
    /// `None`: a discovery session.
    pub target: Option<String>,
    pub isid: Isid,
    pub chap: Option<(String, Vec<u8>)>,
    /// Operational keys offered in the operational stage.
    pub keys: Vec<(String, String)>,
}

impl Login {
    pub fn normal(target: &str) -> Login {
        Login {
            initiator: INITIATOR.to_owned(),
            target: Some(target.to_owned()),
            isid: Isid([0x80, 0, 0x02, 0x3d, 0, 1]),
            chap: None,
            keys: [
                ("HeaderDigest", "None"),
                ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", "8192"),
                ("MaxBurstLength", "262144"),
                ("FirstBurstLength", "65536"),
                ("InitialR2T", "Yes"),
                ("ImmediateData", "Yes"),
                ("MaxOutstandingR2T", "1"),
                ("ErrorRecoveryLevel", "0"),
                ("MaxConnections", "1"),
                ("DataPDUInOrder", "Yes"),
                ("DataSequenceInOrder", "Yes"),
                ("DefaultTime2Wait", "2"),
                ("DefaultTime2Retain", "20"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        }
    }

    pub fn discovery() -> Login {
        let mut l = Login::normal("");
        l.target = None;
        l
    }

    /// Replaces (or adds) an operational key.
    pub fn key(mut self, k: &str, v: &str) -> Login {
        match self.keys.iter_mut().find(|(key, _)| key == k) {
            Some(e) => e.1 = v.to_owned(),
            None => self.keys.push((k.to_owned(), v.to_owned())),
        }
        self
    }

    pub fn initiator(mut self, name: &str) -> Login {
        self.initiator = name.to_owned();
        self
    }

    pub fn chap(mut self, user: &str, secret: &[u8]) -> Login {
        self.chap = Some((user.to_owned(), secret.to_vec()));
        self
    }
}

/// A refused login: (Status-Class, Status-Detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginRefused(pub u8, pub u8);

// --- The initiator ---------------------------------------------------------------------------

/// A scripted initiator on one TCP connection.
pub struct Initiator {
    pub stream: TcpStream,
    rbuf: BytesMut,
    /// Our framing; digests switch on after login.
    pub codec: Codec,
    /// Next CmdSN to use.
    pub cmd_sn: Sn,
    /// ExpStatSN: one past the last StatSN seen.
    pub exp_stat_sn: Sn,
    /// The latest MaxCmdSN the target announced.
    pub max_cmd_sn: Sn,
    next_itt: u32,
    /// The negotiated keys as the target answered them.
    pub negotiated: Vec<(String, String)>,
    /// The last Login Response (final or refusal).
    pub login_response: Option<LoginResponse>,
}

impl Initiator {
    pub async fn connect(addr: SocketAddr) -> Initiator {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Initiator::over(stream)
    }

    /// As [`Initiator::connect`], with a small receive buffer, so that a target writing to
    /// an initiator that does not read is held up soon.
    pub async fn connect_with_recv_buffer(addr: SocketAddr, bytes: u32) -> Initiator {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        Initiator::over(stream)
    }

    fn over(stream: TcpStream) -> Initiator {
        stream.set_nodelay(true).unwrap();
        Initiator {
            stream,
            rbuf: BytesMut::new(),
            codec: Codec::default(),
            cmd_sn: Sn(1),
            exp_stat_sn: Sn(0),
            max_cmd_sn: Sn(0),
            next_itt: 0x100,
            negotiated: Vec::new(),
            login_response: None,
        }
    }

    pub fn itt(&mut self) -> Itt {
        self.next_itt += 1;
        Itt(self.next_itt)
    }

    /// The negotiated value of `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.negotiated
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub async fn send(&mut self, pdu: &Pdu) {
        let bytes = self.codec.encode_to_bytes(pdu);
        self.send_raw(&bytes).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// The next PDU, or `None` if the target closed the connection.
    pub async fn recv_within(&mut self, limit: Duration) -> Result<Option<Pdu>, ()> {
        let fut = async {
            loop {
                if let Some(p) = self.codec.decode(&mut self.rbuf).expect("target framing") {
                    return Some(p);
                }
                match self.stream.read_buf(&mut self.rbuf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        match tokio::time::timeout(limit, fut).await {
            Ok(p) => {
                if let Some(p) = &p {
                    self.track(p);
                }
                Ok(p)
            }
            Err(_) => Err(()),
        }
    }

    /// The next PDU; panics on close or timeout.
    pub async fn recv(&mut self) -> Pdu {
        match self.recv_within(RECV_TIMEOUT).await {
            Ok(Some(p)) => p,
            Ok(None) => panic!("target closed the connection"),
            Err(()) => panic!("no PDU from the target within {RECV_TIMEOUT:?}"),
        }
    }

    /// Asserts nothing arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Ok(p) = self.recv_within(d).await {
            panic!("expected silence, got {p:?}");
        }
    }

    /// Reads until the target closes the connection, returning what came before.
    pub async fn expect_closed(&mut self) -> Vec<Pdu> {
        let mut got = Vec::new();
        loop {
            match self.recv_within(RECV_TIMEOUT).await {
                Ok(Some(p)) => got.push(p),
                Ok(None) => return got,
                Err(()) => panic!("connection still open; received {got:?}"),
            }
        }
    }

    fn track(&mut self, p: &Pdu) {
        let max = match &p.header {
            Header::ScsiResponse(h) => Some(h.max_cmd_sn),
            Header::DataIn(h) => Some(h.max_cmd_sn),
            Header::R2t(h) => Some(h.max_cmd_sn),
            Header::TaskMgmtResponse(h) => Some(h.max_cmd_sn),
            Header::TextResponse(h) => Some(h.max_cmd_sn),
            Header::NopIn(h) => Some(h.max_cmd_sn),
            Header::LoginResponse(h) => Some(h.max_cmd_sn),
            _ => None,
        };
        if let Some(m) = max {
            // RFC 7143 §4.2.2.1: MaxCmdSN never moves backwards (in serial arithmetic).
            if m.gt(self.max_cmd_sn) || self.max_cmd_sn == Sn(0) {
                self.max_cmd_sn = m;
            }
        }
        let sn = match &p.header {
            Header::ScsiResponse(h) => Some(h.stat_sn),
            Header::DataIn(h) if h.status_present => Some(h.stat_sn),
            Header::TaskMgmtResponse(h) => Some(h.stat_sn),
            Header::TextResponse(h) => Some(h.stat_sn),
            Header::LogoutResponse(h) => Some(h.stat_sn),
            Header::Reject(h) => Some(h.stat_sn),
            Header::AsyncMessage(h) => Some(h.stat_sn),
            Header::NopIn(h) if h.itt != Itt::RESERVED => Some(h.stat_sn),
            Header::LoginResponse(h) => Some(h.stat_sn),
            _ => None,
        };
        if let Some(sn) = sn {
            self.exp_stat_sn = sn.add(1);
        }
    }

    // --- Login --------------------------------------------------------------------------------

    /// Logs in as `l` says. On success the codec switches to the negotiated digests.
    pub async fn login(&mut self, l: &Login) -> Result<(), LoginRefused> {
        let builder = LoginRequestBuilder {
            isid: l.isid,
            itt: Itt(0x10),
            cmd_sn: self.cmd_sn,
            ..LoginRequestBuilder::default()
        };
        let mut ident: Vec<(&str, &str)> = vec![("InitiatorName", &l.initiator)];
        match &l.target {
            Some(t) => {
                ident.push(("SessionType", "Normal"));
                ident.push(("TargetName", t));
            }
            None => ident.push(("SessionType", "Discovery")),
        }
        // Security stage.
        if let Some((user, secret)) = &l.chap {
            let mut pairs = ident.clone();
            pairs.push(("AuthMethod", "CHAP,None"));
            let r = self
                .login_step(&builder, Stage::Security, Stage::Operational, false, &pairs)
                .await?;
            assert_eq!(value(&r, "AuthMethod"), Some("CHAP"));
            let r = self
                .login_step(
                    &builder,
                    Stage::Security,
                    Stage::Operational,
                    false,
                    &[("CHAP_A", "5")],
                )
                .await?;
            let id: u8 = value(&r, "CHAP_I").unwrap().parse().unwrap();
            let c = text::decode_binary(value(&r, "CHAP_C").unwrap(), 1024).unwrap();
            let secret = ChapSecret::new(secret.clone()).unwrap();
            let resp = chap_response(ChapAlgorithm::Md5, id, &secret, &c);
            self.login_step(
                &builder,
                Stage::Security,
                Stage::Operational,
                true,
                &[("CHAP_N", user), ("CHAP_R", &resp)],
            )
            .await?;
        } else {
            let mut pairs = ident.clone();
            pairs.push(("AuthMethod", "None"));
            self.login_step(&builder, Stage::Security, Stage::Operational, true, &pairs)
                .await?;
        }
        // Operational stage: offer every key, then answer what the target offers until it
        // transits to the full feature phase.
        let mut offer: Vec<(String, String)> = l
            .keys
            .iter()
            .filter(|(k, _)| {
                l.target.is_some()
                    || matches!(
                        k.as_str(),
                        "HeaderDigest" | "DataDigest" | "MaxRecvDataSegmentLength"
                    )
            })
            .cloned()
            .collect();
        for _ in 0..4 {
            let pairs: Vec<(&str, &str)> = offer
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let r = self
                .login_step(
                    &builder,
                    Stage::Operational,
                    Stage::FullFeature,
                    true,
                    &pairs,
                )
                .await?;
            let h = self.login_response.clone().unwrap();
            if h.transit && h.nsg == Stage::FullFeature {
                self.codec.header_digest = self.param("HeaderDigest") == Some("CRC32C");
                self.codec.data_digest = self.param("DataDigest") == Some("CRC32C");
                return Ok(());
            }
            // Accept what the target offered (echo its values).
            offer = r
                .into_iter()
                .filter(|(k, _)| l.keys.iter().all(|(ours, _)| ours != k))
                .collect();
        }
        panic!("login did not reach the full feature phase");
    }

    async fn login_step(
        &mut self,
        b: &LoginRequestBuilder,
        csg: Stage,
        nsg: Stage,
        transit: bool,
        pairs: &[(&str, &str)],
    ) -> Result<Vec<(String, String)>, LoginRefused> {
        let mut b = b.clone();
        b.exp_stat_sn = self.exp_stat_sn;
        let pdu = b.pdu(csg, nsg, transit, false, encode(pairs));
        self.send(&pdu).await;
        let resp = self.recv().await;
        let Header::LoginResponse(h) = &resp.header else {
            panic!("expected a Login Response, got {resp:?}");
        };
        self.login_response = Some(h.clone());
        if h.status_class != 0 {
            return Err(LoginRefused(h.status_class, h.status_detail));
        }
        let got: Vec<(String, String)> = text::parse(&resp.data)
            .expect("login text")
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        self.negotiated.extend(got.iter().cloned());
        Ok(got)
    }

    // --- Full feature phase builders ----------------------------------------------------------

    /// A SCSI Command PDU taking the next CmdSN.
    pub fn command(
        &mut self,
        lun: u16,
        cdb: &[u8],
        edtl: u32,
        dir: Dir,
        immediate_data: Bytes,
    ) -> Pdu {
        let itt = self.itt();
        let cmd_sn = self.next_cmd_sn();
        self.command_with(lun, itt, cmd_sn, false, cdb, edtl, dir, immediate_data)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn command_with(
        &self,
        lun: u16,
        itt: Itt,
        cmd_sn: Sn,
        immediate: bool,
        cdb: &[u8],
        edtl: u32,
        dir: Dir,
        immediate_data: Bytes,
    ) -> Pdu {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        Pdu::new(
            Header::ScsiCommand(ScsiCommand {
                immediate,
                final_: true,
                read: dir == Dir::Read,
                write: dir == Dir::Write,
                attr: TaskAttr::SIMPLE,
                lun: Lun::from_number(lun).unwrap(),
                itt,
                expected_data_transfer_length: edtl,
                cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                cdb: c,
            }),
            immediate_data,
        )
    }

    pub fn next_cmd_sn(&mut self) -> Sn {
        let s = self.cmd_sn;
        self.cmd_sn = s.add(1);
        s
    }

    #[allow(clippy::too_many_arguments)]
    pub fn data_out(
        &self,
        lun: u16,
        itt: Itt,
        ttt: Ttt,
        data_sn: u32,
        offset: u32,
        final_: bool,
        data: Bytes,
    ) -> Pdu {
        Pdu::new(
            Header::DataOut(DataOut {
                final_,
                lun: Lun::from_number(lun).unwrap(),
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn: Sn(data_sn),
                buffer_offset: offset,
            }),
            data,
        )
    }

    pub fn nop_out(&mut self, data: Bytes) -> (Itt, Pdu) {
        let itt = self.itt();
        let pdu = Pdu::new(
            Header::NopOut(NopOut {
                immediate: true,
                lun: Lun::default(),
                itt,
                ttt: Ttt::RESERVED,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            }),
            data,
        );
        (itt, pdu)
    }

    pub fn tmf(&mut self, function: u8, lun: u16, referenced: Itt) -> (Itt, Pdu) {
        let itt = self.itt();
        let pdu = Pdu::new(
            Header::TaskMgmtRequest(TaskMgmtRequest {
                immediate: true,
                function,
                lun: Lun::from_number(lun).unwrap(),
                itt,
                referenced_task_tag: referenced,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                ref_cmd_sn: self.cmd_sn,
                exp_data_sn: Sn(0),
            }),
            Bytes::new(),
        );
        (itt, pdu)
    }

    pub fn text_request(&mut self, itt: Itt, ttt: Ttt, data: Bytes) -> Pdu {
        let cmd_sn = self.next_cmd_sn();
        Pdu::new(
            Header::TextRequest(TextRequest {
                immediate: false,
                final_: true,
                continue_: false,
                lun: Lun::default(),
                itt,
                ttt,
                cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            }),
            data,
        )
    }

    pub fn logout(&mut self, reason: u8) -> (Itt, Pdu) {
        let itt = self.itt();
        let cmd_sn = self.next_cmd_sn();
        let pdu = Pdu::new(
            Header::LogoutRequest(LogoutRequest {
                immediate: false,
                reason,
                itt,
                cid: 0,
                cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            }),
            Bytes::new(),
        );
        (itt, pdu)
    }

    // --- Whole exchanges ----------------------------------------------------------------------

    /// Runs a command with no data or a read to completion: the Data-In PDUs and the status.
    pub async fn exec(&mut self, lun: u16, cdb: &[u8], edtl: u32) -> Outcome {
        let dir = if edtl > 0 { Dir::Read } else { Dir::None };
        let pdu = self.command(lun, cdb, edtl, dir, Bytes::new());
        self.send(&pdu).await;
        self.collect(pdu.header.itt()).await
    }

    /// Reads PDUs for `itt` until its status arrives.
    pub async fn collect(&mut self, itt: Itt) -> Outcome {
        let mut out = Outcome::default();
        loop {
            let p = self.recv().await;
            match &p.header {
                Header::DataIn(d) if d.itt == itt => {
                    out.data.extend_from_slice(&p.data);
                    out.data_in.push(d.clone());
                    if d.status_present {
                        out.status = d.status;
                        out.residual = (d.underflow, d.overflow, d.residual_count);
                        return out;
                    }
                }
                Header::ScsiResponse(r) if r.itt == itt => {
                    out.status = r.status;
                    out.residual = (r.underflow, r.overflow, r.residual_count);
                    if p.data.len() >= 2 {
                        out.sense = p.data.slice(2..);
                    }
                    out.response = Some(r.clone());
                    return out;
                }
                _ => panic!("unexpected PDU while waiting for ITT {itt:?}: {p:?}"),
            }
        }
    }

    /// A write with InitialR2T=Yes: immediate data as allowed, then answers every R2T.
    pub async fn write(&mut self, lun: u16, lba: u32, data: &[u8]) -> Outcome {
        let blocks = (data.len() / 512) as u16;
        let imm = if self.param("ImmediateData") == Some("Yes") {
            let first = self
                .param("FirstBurstLength")
                .map(|v| v.parse::<usize>().unwrap())
                .unwrap_or(65536);
            let mrdsl: usize = 8192.min(first);
            Bytes::copy_from_slice(&data[..data.len().min(mrdsl)])
        } else {
            Bytes::new()
        };
        let pdu = self.command(
            lun,
            &write10(lba, blocks),
            data.len() as u32,
            Dir::Write,
            imm,
        );
        let itt = pdu.header.itt();
        self.send(&pdu).await;
        loop {
            let p = self.recv().await;
            match &p.header {
                Header::R2t(r) if r.itt == itt => {
                    let (off, len) = (
                        r.buffer_offset as usize,
                        r.desired_data_transfer_length as usize,
                    );
                    let mut sn = 0;
                    let mut pos = off;
                    while pos < off + len {
                        let n = (off + len - pos).min(8192);
                        let d = self.data_out(
                            lun,
                            itt,
                            r.ttt,
                            sn,
                            pos as u32,
                            pos + n == off + len,
                            Bytes::copy_from_slice(&data[pos..pos + n]),
                        );
                        self.send(&d).await;
                        sn += 1;
                        pos += n;
                    }
                }
                Header::ScsiResponse(r) if r.itt == itt => {
                    let mut out = Outcome {
                        status: r.status,
                        residual: (r.underflow, r.overflow, r.residual_count),
                        response: Some(r.clone()),
                        ..Outcome::default()
                    };
                    if p.data.len() >= 2 {
                        out.sense = p.data.slice(2..);
                    }
                    return out;
                }
                _ => panic!("unexpected PDU during write: {p:?}"),
            }
        }
    }

    /// Clears the power-on unit attention of `lun` (TEST UNIT READY until GOOD).
    pub async fn clear_ua(&mut self, lun: u16) {
        for _ in 0..8 {
            if self.exec(lun, &tur(), 0).await.status == GOOD {
                return;
            }
        }
        panic!("unit attention does not clear");
    }
}

/// Data direction of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    None,
    Read,
    Write,
}

/// What a command produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub data_in: Vec<DataIn>,
    pub data: Vec<u8>,
    pub status: u8,
    /// (U, O, residual count).
    pub residual: (bool, bool, u32),
    /// Sense data without the SenseLength prefix.
    pub sense: Bytes,
    pub response: Option<ScsiResponse>,
}

impl Outcome {
    /// (sense key, ASC, ASCQ) of fixed-format sense data.
    pub fn sense_triplet(&self) -> (u8, u8, u8) {
        assert!(self.sense.len() >= 14, "no sense data: {self:?}");
        (self.sense[2] & 0x0f, self.sense[12], self.sense[13])
    }
}

pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;

/// The value of `key` in text pairs.
pub fn value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The Reject PDU's header and rejected BHS.
pub fn as_reject(p: &Pdu) -> (Reject, Bytes) {
    match &p.header {
        Header::Reject(r) => (r.clone(), p.data.clone()),
        _ => panic!("expected a Reject, got {p:?}"),
    }
}

// --- CDBs ------------------------------------------------------------------------------------

pub fn tur() -> [u8; 6] {
    [0; 6]
}

pub fn inquiry(len: u16) -> [u8; 6] {
    let l = len.to_be_bytes();
    [0x12, 0, 0, l[0], l[1], 0]
}

pub fn report_luns(len: u32) -> [u8; 12] {
    let l = len.to_be_bytes();
    [0xa0, 0, 0, 0, 0, 0, l[0], l[1], l[2], l[3], 0, 0]
}

pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let a = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    [0x28, 0, a[0], a[1], a[2], a[3], 0, b[0], b[1], 0]
}

pub fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let a = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    [0x2a, 0, a[0], a[1], a[2], a[3], 0, b[0], b[1], 0]
}

/// LUN numbers from REPORT LUNS parameter data (single-level peripheral addressing).
pub fn parse_report_luns(data: &[u8]) -> Vec<u16> {
    let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    data[8..8 + len]
        .chunks(8)
        .map(|e| u16::from_be_bytes([e[0] & 0x3f, e[1]]))
        .collect()
}

/// A recognisable pattern of `len` bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Text pairs of a Text Response data segment, in order and with repeated keys (SendTargets
/// answers repeat TargetName and TargetAddress).
pub fn pairs(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let kv = std::str::from_utf8(kv).expect("UTF-8 text");
            let (k, v) = kv.split_once('=').expect("key=value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}
