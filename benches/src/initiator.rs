//! A minimal iSCSI initiator for the end-to-end bench: one TCP connection, login without
//! authentication, then SCSI commands kept pipelined within the target's command window.
//!
//! Deliberately small (compare `target-core/tests/portal/support.rs`, which scripts every
//! PDU type for tests): it handles what a read/write workload with `ImmediateData=Yes`,
//! `InitialR2T=No` and writes no larger than FirstBurstLength receives — Data-In (with or
//! without phase-collapsed status), SCSI Response and NOP-In pings. Anything else (R2T,
//! Reject, Async Message, a non-GOOD status in [`Initiator::run`]) is an error: the bench
//! is then measuring the wrong thing and should stop.
//!
//! The initiator runs in one task: it writes as many commands as the window and the queue
//! depth allow in one `write_all`, then reads whatever the target sent and counts the
//! completions. Its requests are small (a 48-byte BHS, plus at most FirstBurstLength of
//! immediate data), so while it writes, the target's reader keeps draining the socket and the
//! single task cannot deadlock against the target's writer.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use iscsi_proto::login::test_support::{encode, LoginRequestBuilder};
use iscsi_proto::pdu::{Header, LoginResponse, NopOut, ScsiCommand, Stage, TaskAttr};
use iscsi_proto::types::{Isid, Itt, Lun, Sn, Ttt};
use iscsi_proto::{text, Codec, Pdu};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a login or a whole [`Initiator::run`] may take before it is reported as hung.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Room made in the receive buffer before each read.
const READ_CHUNK: usize = 512 * 1024;

/// One SCSI command: CDB, direction, Expected Data Transfer Length, immediate data.
#[derive(Debug, Clone)]
pub struct Command {
    pub cdb: [u8; 16],
    pub read: bool,
    pub write: bool,
    pub expected_len: u32,
    /// Write data sent in the command PDU (ImmediateData=Yes). Must be the whole transfer:
    /// this initiator answers no R2T.
    pub immediate_data: Bytes,
}

impl Command {
    /// A command without data (TEST UNIT READY and such).
    pub fn no_data(cdb: [u8; 16]) -> Command {
        Command {
            cdb,
            read: false,
            write: false,
            expected_len: 0,
            immediate_data: Bytes::new(),
        }
    }

    /// A command reading `len` bytes.
    pub fn read(cdb: [u8; 16], len: u32) -> Command {
        Command {
            cdb,
            read: true,
            write: false,
            expected_len: len,
            immediate_data: Bytes::new(),
        }
    }

    /// A command writing `data`, all of it as immediate data.
    pub fn write(cdb: [u8; 16], data: Bytes) -> Command {
        Command {
            cdb,
            read: false,
            write: true,
            expected_len: data.len() as u32,
            immediate_data: data,
        }
    }
}

/// What a [`Initiator::run`] moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Commands completed (all with status GOOD).
    pub commands: u64,
    /// Data-In bytes received.
    pub data_in_bytes: u64,
}

/// A logged-in session on one connection.
pub struct Initiator {
    stream: TcpStream,
    codec: Codec,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// CmdSN of the next non-immediate command.
    cmd_sn: Sn,
    /// One past the last StatSN received.
    exp_stat_sn: Sn,
    /// The highest MaxCmdSN the target announced (RFC 7143 §4.2.2.1: it never decreases).
    max_cmd_sn: Sn,
    next_itt: u32,
    /// Key=value pairs the target answered during login, in order.
    negotiated: Vec<(String, String)>,
    /// Data-In bytes received since the last [`Initiator::run`] started.
    data_in_bytes: u64,
}

/// A completed command: its tag and SCSI status.
struct Completion {
    itt: Itt,
    status: u8,
}

impl Initiator {
    /// Connects to `addr` and logs in as `initiator` to `target` with no authentication,
    /// offering `keys` in the operational stage. Digests follow what was negotiated.
    ///
    /// # Errors
    /// I/O errors, a refused login (Status-Class and -Detail in the message), a target that
    /// does not reach the full feature phase, or [`TIMEOUT`].
    pub async fn login(
        addr: SocketAddr,
        initiator: &str,
        target: &str,
        keys: &[(&str, &str)],
    ) -> io::Result<Initiator> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut ini = Initiator {
            stream,
            codec: Codec::default(),
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(256 * 1024),
            cmd_sn: Sn(1),
            exp_stat_sn: Sn(0),
            max_cmd_sn: Sn(0),
            next_itt: 0,
            negotiated: Vec::new(),
            data_in_bytes: 0,
        };
        tokio::time::timeout(TIMEOUT, ini.login_phase(initiator, target, keys))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "login timed out"))??;
        Ok(ini)
    }

    /// The value the target answered for `key` at login.
    pub fn negotiated(&self, key: &str) -> Option<&str> {
        self.negotiated
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Runs one command to completion and returns its SCSI status (any status, so that a
    /// caller can clear a unit attention).
    ///
    /// # Errors
    /// I/O errors, a PDU this initiator does not handle, or [`TIMEOUT`].
    pub async fn exec(&mut self, cmd: &Command) -> io::Result<u8> {
        tokio::time::timeout(TIMEOUT, async {
            let itt = self.encode_command(cmd);
            loop {
                self.flush().await?;
                while let Some(pdu) = self.decode()? {
                    if let Some(c) = self.handle(&pdu)? {
                        if c.itt == itt {
                            return Ok(c.status);
                        }
                    }
                }
                self.read_more().await?;
            }
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "command timed out"))?
    }

    /// Sends `total` commands, `next(n)` giving the `n`th, keeping up to `depth` of them
    /// outstanding (and never beyond the target's MaxCmdSN), until all have completed.
    ///
    /// # Errors
    /// I/O errors, a status other than GOOD, a PDU this initiator does not handle, or
    /// [`TIMEOUT`] for the whole run.
    pub async fn run(
        &mut self,
        total: u64,
        depth: usize,
        next: impl FnMut(u64) -> Command,
    ) -> io::Result<RunStats> {
        tokio::time::timeout(TIMEOUT, self.run_pipelined(total, depth.max(1), next))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{total} commands at depth {depth} took over {TIMEOUT:?}"),
                )
            })?
    }

    async fn run_pipelined(
        &mut self,
        total: u64,
        depth: usize,
        mut next: impl FnMut(u64) -> Command,
    ) -> io::Result<RunStats> {
        self.data_in_bytes = 0;
        let (mut issued, mut completed, mut in_flight) = (0u64, 0u64, 0usize);
        loop {
            // Completions already buffered first: they may open the window.
            while let Some(pdu) = self.decode()? {
                if let Some(c) = self.handle(&pdu)? {
                    if c.status != 0 {
                        return Err(io::Error::other(format!(
                            "command ITT {:#x} ended with SCSI status {:#04x}",
                            c.itt.0, c.status
                        )));
                    }
                    in_flight -= 1;
                    completed += 1;
                }
            }
            if completed == total {
                return Ok(RunStats {
                    commands: completed,
                    data_in_bytes: self.data_in_bytes,
                });
            }
            // Top up the pipeline and send everything in one write.
            while issued < total && in_flight < depth && self.cmd_sn.le(self.max_cmd_sn) {
                self.encode_command(&next(issued));
                issued += 1;
                in_flight += 1;
            }
            self.flush().await?;
            if in_flight == 0 {
                return Err(io::Error::other(format!(
                    "command window closed with nothing outstanding (CmdSN {}, MaxCmdSN {})",
                    self.cmd_sn, self.max_cmd_sn
                )));
            }
            self.read_more().await?;
        }
    }

    // --- Login ------------------------------------------------------------------------------

    async fn login_phase(
        &mut self,
        initiator: &str,
        target: &str,
        keys: &[(&str, &str)],
    ) -> io::Result<()> {
        let builder = LoginRequestBuilder {
            isid: Isid([0x80, 0, 0x02, 0x3d, 0xbe, 0x01]),
            itt: Itt(0),
            cmd_sn: self.cmd_sn,
            ..LoginRequestBuilder::default()
        };
        // Security stage: no authentication, straight on to the operational stage.
        let security = [
            ("InitiatorName", initiator),
            ("TargetName", target),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ];
        let (h, _) = self
            .login_step(&builder, Stage::Security, Stage::Operational, &security)
            .await?;
        if !h.transit {
            return Err(io::Error::other(
                "target did not leave the security stage with AuthMethod=None",
            ));
        }
        // Operational stage: offer our keys, then answer what the target offers (echoing its
        // values) until it transits to the full feature phase.
        let mut offer: Vec<(String, String)> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for _ in 0..4 {
            let pairs: Vec<(&str, &str)> = offer
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let (h, answered) = self
                .login_step(&builder, Stage::Operational, Stage::FullFeature, &pairs)
                .await?;
            if h.transit && h.nsg == Stage::FullFeature {
                // RFC 7143 §4.2.2.1 and §13.1: the window and digests from here on.
                self.max_cmd_sn = h.max_cmd_sn;
                self.codec.header_digest = self.negotiated("HeaderDigest") == Some("CRC32C");
                self.codec.data_digest = self.negotiated("DataDigest") == Some("CRC32C");
                return Ok(());
            }
            offer = answered
                .into_iter()
                .filter(|(k, _)| keys.iter().all(|(ours, _)| ours != k))
                .collect();
        }
        Err(io::Error::other(
            "login did not reach the full feature phase in 4 operational requests",
        ))
    }

    async fn login_step(
        &mut self,
        builder: &LoginRequestBuilder,
        csg: Stage,
        nsg: Stage,
        pairs: &[(&str, &str)],
    ) -> io::Result<(LoginResponse, Vec<(String, String)>)> {
        let mut b = builder.clone();
        b.exp_stat_sn = self.exp_stat_sn;
        let pdu = b.pdu(csg, nsg, true, false, encode(pairs));
        self.codec.encode(&pdu, &mut self.wbuf);
        self.flush().await?;
        let resp = loop {
            if let Some(p) = self.decode()? {
                break p;
            }
            self.read_more().await?;
        };
        let Header::LoginResponse(h) = resp.header else {
            return Err(io::Error::other(format!(
                "expected a Login Response, got opcode {:#04x}",
                resp.opcode()
            )));
        };
        if h.status_class != 0 {
            return Err(io::Error::other(format!(
                "login refused: status {:02x}{:02x}",
                h.status_class, h.status_detail
            )));
        }
        self.exp_stat_sn = h.stat_sn.add(1);
        let answered: Vec<(String, String)> = text::parse(&resp.data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        self.negotiated.extend(answered.iter().cloned());
        Ok((h, answered))
    }

    // --- Full feature phase ---------------------------------------------------------------

    /// Appends a SCSI Command PDU for `cmd` to the write buffer with the next ITT and CmdSN.
    fn encode_command(&mut self, cmd: &Command) -> Itt {
        self.next_itt = self.next_itt.wrapping_add(1);
        if self.next_itt == Itt::RESERVED.0 {
            self.next_itt = 1;
        }
        let itt = Itt(self.next_itt);
        let cmd_sn = self.cmd_sn;
        self.cmd_sn = cmd_sn.add(1);
        let pdu = Pdu::new(
            Header::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: true,
                read: cmd.read,
                write: cmd.write,
                attr: TaskAttr::SIMPLE,
                lun: Lun::default(),
                itt,
                expected_data_transfer_length: cmd.expected_len,
                cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                cdb: cmd.cdb,
            }),
            cmd.immediate_data.clone(),
        );
        self.codec.encode(&pdu, &mut self.wbuf);
        itt
    }

    /// Tracks sequence numbers of a received PDU; returns the completion it carries, if any.
    fn handle(&mut self, pdu: &Pdu) -> io::Result<Option<Completion>> {
        match &pdu.header {
            Header::DataIn(d) => {
                self.window(d.max_cmd_sn);
                self.data_in_bytes += pdu.data.len() as u64;
                if d.status_present {
                    // RFC 7143 §11.7.4: StatSN is only meaningful with the S bit.
                    self.exp_stat_sn = d.stat_sn.add(1);
                    return Ok(Some(Completion {
                        itt: d.itt,
                        status: d.status,
                    }));
                }
                Ok(None)
            }
            Header::ScsiResponse(r) => {
                self.window(r.max_cmd_sn);
                self.exp_stat_sn = r.stat_sn.add(1);
                if r.response != 0 {
                    return Err(io::Error::other(format!(
                        "ITT {:#x}: target failure (response {:#04x})",
                        r.itt.0, r.response
                    )));
                }
                Ok(Some(Completion {
                    itt: r.itt,
                    status: r.status,
                }))
            }
            Header::NopIn(n) => {
                self.window(n.max_cmd_sn);
                if n.itt != Itt::RESERVED {
                    self.exp_stat_sn = n.stat_sn.add(1);
                }
                if n.ttt != Ttt::RESERVED {
                    // A ping (RFC 7143 §11.19): answer with the same TTT, ITT reserved.
                    let reply = Pdu::new(
                        Header::NopOut(NopOut {
                            immediate: true,
                            lun: n.lun,
                            itt: Itt::RESERVED,
                            ttt: n.ttt,
                            cmd_sn: self.cmd_sn,
                            exp_stat_sn: self.exp_stat_sn,
                        }),
                        Bytes::new(),
                    );
                    self.codec.encode(&reply, &mut self.wbuf);
                }
                Ok(None)
            }
            other => Err(io::Error::other(format!(
                "unexpected PDU (opcode {:#04x}) for this workload: {other:?}",
                other.opcode()
            ))),
        }
    }

    fn window(&mut self, max_cmd_sn: Sn) {
        if max_cmd_sn.gt(self.max_cmd_sn) {
            self.max_cmd_sn = max_cmd_sn;
        }
    }

    fn decode(&mut self) -> io::Result<Option<Pdu>> {
        self.codec
            .decode(&mut self.rbuf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    async fn read_more(&mut self) -> io::Result<()> {
        // Keep room for a large read: `read_buf` on a full buffer would only grow it by 64
        // bytes. On an empty buffer whose PDUs were dropped this reclaims the allocation.
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "target closed the connection",
            ));
        }
        Ok(())
    }
}
