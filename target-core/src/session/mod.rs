//! Connections and sessions: login, then the full feature phase.
//!
//! One task per connection reads PDUs and dispatches them; a SCSI command is answered inline
//! when it can be, else its future joins the connection's set of pending commands (polled by
//! the same task, no task each), so many can be in flight; a writer task ([`writer`]) sends responses in completion
//! order with StatSN assigned at send time. ErrorRecoveryLevel 0, one connection per session
//! (RFC 7143 §7.1.5: session recovery is the only recovery at ERL 0).

mod ffp;
pub mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use iscsi_proto::login::{
    AuthRequirement, LoginAuthority, LoginConfig, LoginMachine, LoginStep, TargetLookup,
};
use iscsi_proto::negotiate::{SessionParams, TargetLimits};
use iscsi_proto::pdu::Header;
use iscsi_proto::types::{Isid, Sn, Tsih};
use iscsi_proto::{Codec, Pdu};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::chap_secret;
use crate::events::{LoginOutcome, Notice};
use crate::table::{SessionHandle, TargetTable};

/// Knobs of the session layer.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Most commands an initiator may have outstanding per session (the CmdSN window).
    pub queue_depth: u32,
    /// Our side of the operational key negotiation.
    pub limits: TargetLimits,
    /// Send a NOP-In ping after this long without hearing from the initiator.
    pub nop_interval: Duration,
    /// Drop the connection when the initiator has been silent this long.
    pub nop_timeout: Duration,
    /// A login must complete within this time.
    pub login_timeout: Duration,
    /// How long in-flight commands may take to finish when a session is ended by the target.
    pub drain_timeout: Duration,
    /// How long a connection whose last command was answered inline polls its socket for
    /// the next one before it sleeps (zero: never polls). Keep it short (the agent allows
    /// at most 1 ms): while it polls, the connection watches nothing else, shutdown
    /// included. See `read_polling` in `session/ffp.rs` and docs/design/sessions.md.
    pub busy_poll: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            queue_depth: 128,
            limits: TargetLimits::default(),
            nop_interval: Duration::from_secs(10),
            nop_timeout: Duration::from_secs(30),
            login_timeout: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(10),
            busy_poll: Duration::from_micros(50),
        }
    }
}

/// Everything a connection task needs.
#[derive(Clone)]
pub struct ConnectionContext {
    pub table: Arc<TargetTable>,
    pub options: Arc<SessionOptions>,
    /// Cancelled when the agent shuts down.
    pub shutdown: CancellationToken,
    /// The target portal group of the portal this connection arrived on: its TPGT is what the
    /// login reports (RFC 7143 §13.9 TargetPortalGroupTag) and the SCSI target port of the
    /// session's I_T nexus.
    pub tpgt: u16,
    /// Every portal the agent listens on, for SendTargets.
    pub portals: Arc<[crate::portal::NetworkPortal]>,
}

/// Answers the login machine's questions from the target table, for one peer address.
struct Authority<'a> {
    table: &'a TargetTable,
    peer: SocketAddr,
    /// The portal group the connection arrived on: a session is named by its ISID, TSIH and
    /// TPGT (RFC 7143 §4.4.3: "the target portal group tag ... and the ISID ... together form
    /// the session identifier").
    tpgt: u16,
}

impl LoginAuthority for Authority<'_> {
    fn lookup_target(&self, target_name: &str, initiator_name: &str) -> TargetLookup {
        let Some(target) = self.table.target(target_name) else {
            return TargetLookup::NotFound;
        };
        if !target.admits(initiator_name, self.peer.ip()) {
            return TargetLookup::Forbidden;
        }
        let st = target.state();
        let auth = if st.chap.incoming.is_empty() {
            AuthRequirement::None
        } else {
            chap_requirement(&st.chap)
        };
        TargetLookup::Allowed {
            alias: st.alias.clone(),
            auth,
        }
    }

    fn session_exists(&self, initiator_name: &str, isid: Isid, tsih: Tsih) -> bool {
        self.table
            .session_exists(initiator_name, isid.0, tsih.0, self.tpgt)
    }
}

/// CHAP required with `chap`'s accounts (none: nobody can authenticate).
fn chap_requirement(chap: &crate::config::ChapConfig) -> AuthRequirement {
    let accounts = chap
        .incoming
        .iter()
        .filter_map(|c| chap_secret(&c.secret).map(|s| (c.user.clone(), s)))
        .collect();
    let mutual = chap
        .outgoing
        .as_ref()
        .and_then(|c| chap_secret(&c.secret).map(|s| (c.user.clone(), s)));
    AuthRequirement::Chap { accounts, mutual }
}

/// Serves one accepted TCP connection until it closes.
pub async fn serve_connection(stream: TcpStream, peer: SocketAddr, ctx: ConnectionContext) {
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(%peer, error = %e, "cannot read local address; closing");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    if let Err(e) = run(stream, peer, local, ctx).await {
        info!(%peer, error = %e, "connection closed");
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Decode(#[from] iscsi_proto::DecodeError),
    #[error("login failed: {0}")]
    Login(String),
    #[error("login timed out")]
    LoginTimeout,
    #[error("peer closed the connection during login")]
    ClosedDuringLogin,
    #[error("protocol: {0}")]
    Protocol(&'static str),
    #[error("initiator silent for {0:?}: NOP-Out ping unanswered")]
    NopTimeout(Duration),
}

async fn run(
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    ctx: ConnectionContext,
) -> Result<(), ConnectionError> {
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    // Login PDUs are bounded by the default MaxRecvDataSegmentLength until login completes.
    let mut codec = Codec::login();
    let login = tokio::time::timeout(
        ctx.options.login_timeout,
        login_phase(&mut stream, peer, &ctx, &mut rbuf, &mut codec),
    )
    .await
    .map_err(|_| ConnectionError::LoginTimeout)??;
    let Some(done) = login else {
        return Ok(());
    };
    ffp::run(stream, peer, local, ctx, rbuf, done).await
}

/// The result of a successful login.
pub(crate) struct LoggedIn {
    pub params: SessionParams,
    pub tsih: u16,
    /// StatSN for the first full-feature response.
    pub next_stat_sn: Sn,
    /// CmdSN of the first full-feature command.
    pub exp_cmd_sn: Sn,
}

async fn read_pdu(
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    codec: &mut Codec,
) -> Result<Option<Pdu>, ConnectionError> {
    loop {
        if let Some(pdu) = codec.decode(rbuf)? {
            return Ok(Some(pdu));
        }
        if stream.read_buf(rbuf).await? == 0 {
            return Ok(None);
        }
    }
}

async fn login_phase(
    stream: &mut TcpStream,
    peer: SocketAddr,
    ctx: &ConnectionContext,
    rbuf: &mut BytesMut,
    codec: &mut Codec,
) -> Result<Option<LoggedIn>, ConnectionError> {
    let opts = &ctx.options;
    let mut machine = LoginMachine::new(LoginConfig {
        limits: opts.limits.clone(),
        portal_group_tag: ctx.tpgt,
        // RFC 7143 §12: discovery sessions authenticate as normal ones do when CHAP is
        // configured for them; with it configured and no valid account, nobody discovers.
        discovery_auth: ctx
            .table
            .discovery_chap()
            .map_or(AuthRequirement::None, |c| chap_requirement(&c)),
        initial_stat_sn: Sn(rand::random::<u32>() & 0x0fff_ffff),
        queue_depth: opts.queue_depth,
    });
    // A CSPRNG for CHAP challenges (RFC 1994 §2.3: challenges must be unpredictable).
    let mut rng = StdRng::from_entropy();
    let authority = Authority {
        table: &ctx.table,
        peer,
        tpgt: ctx.tpgt,
    };
    let mut wbuf = BytesMut::new();
    let mut last_cmd_sn;
    let (mut initiator, mut target) = (String::new(), String::new());
    loop {
        let Some(pdu) = read_pdu(stream, rbuf, codec).await? else {
            return Err(ConnectionError::ClosedDuringLogin);
        };
        if let Header::LoginRequest(req) = &pdu.header {
            last_cmd_sn = req.cmd_sn;
            // Remember who is asking, for the log line of a refusal.
            if let Ok(pairs) = iscsi_proto::text::parse(&pdu.data) {
                for (k, v) in pairs {
                    match k {
                        "InitiatorName" if initiator.is_empty() => initiator = v.to_string(),
                        "TargetName" if target.is_empty() => target = v.to_string(),
                        _ => {}
                    }
                }
            }
        } else {
            // RFC 7143 §6.3: "the initiator MUST NOT send any PDU other than Login Requests"
            // before the login completes; a target receiving one ends the login.
            return Err(ConnectionError::Protocol(
                "non-login PDU before login completed",
            ));
        }
        let mut step = machine.handle_pdu(&pdu, &authority, &mut rng);
        if let LoginStep::Complete { params, .. } = &step {
            // RFC 7143 §11.13.3: "For a new session, the target MUST generate a non-zero
            // TSIH" for the final Login Response, discovery sessions included.
            if params.tsih == Tsih(0) {
                step.set_tsih(Tsih(ctx.table.allocate_tsih()));
            }
        }
        match step {
            LoginStep::Continue(resp) => {
                codec.encode(&resp, &mut wbuf);
                stream.write_all(&wbuf).await?;
                wbuf.clear();
            }
            LoginStep::Complete { response, params } => {
                let tsih = params.tsih.0;
                let next_stat_sn = match &response.header {
                    Header::LoginResponse(r) => r.stat_sn.add(1),
                    _ => Sn(0),
                };
                codec.encode(&response, &mut wbuf);
                stream.write_all(&wbuf).await?;
                wbuf.clear();
                // RFC 7143 §13.1: digests take effect "after the completion of the Login
                // Phase"; the data segment limit is the one we declared.
                codec.header_digest = params.header_digest;
                codec.data_digest = params.data_digest;
                codec.max_recv_data_segment_length = params.max_recv_data_segment_length;
                info!(
                    %peer,
                    initiator = %params.initiator_name,
                    target = params.target_name.as_deref().unwrap_or("-"),
                    session_type = ?params.session_type,
                    tsih,
                    "login complete"
                );
                crate::events::global().login(params.target_name.as_deref(), LoginOutcome::Success);
                return Ok(Some(LoggedIn {
                    params,
                    tsih,
                    next_stat_sn,
                    exp_cmd_sn: last_cmd_sn,
                }));
            }
            LoginStep::Fail { response, error } => {
                let (class, detail) = error.status();
                warn!(
                    %peer,
                    initiator = %initiator,
                    target = if target.is_empty() { "-" } else { &target },
                    status = format_args!("{class:02x}{detail:02x}"),
                    error = %error,
                    "login refused"
                );
                // Counted under the target's name only when the table serves it: a peer
                // cannot mint series by naming targets (see `crate::events`).
                let outcome = LoginOutcome::of_error(&error);
                let served = (!target.is_empty() && ctx.table.target(&target).is_some())
                    .then_some(target.as_str());
                let events = crate::events::global();
                events.login(served, outcome);
                if let Some(t) = served {
                    events.notify(Notice::LoginRefused {
                        target: t.to_owned(),
                        initiator: initiator.clone(),
                        peer,
                        outcome,
                        message: error.to_string(),
                    });
                }
                codec.encode(&response, &mut wbuf);
                stream.write_all(&wbuf).await?;
                let _ = stream.shutdown().await;
                return Err(ConnectionError::Login(error.to_string()));
            }
        }
    }
}

/// Registers the session with its target (reinstating an older one of the same ISID).
pub(crate) fn new_handle(
    table: &TargetTable,
    params: &SessionParams,
    tsih: u16,
    peer: SocketAddr,
    local: SocketAddr,
    tpgt: u16,
) -> Arc<SessionHandle> {
    Arc::new(SessionHandle {
        id: table.allocate_session_id(),
        tsih,
        initiator: params.initiator_name.clone(),
        isid: params.isid.0,
        tpgt,
        peer,
        cancel: CancellationToken::new(),
        end_reason: std::sync::Mutex::new(None),
        info: crate::table::SessionInfo {
            portal: Some(local),
            since: std::time::SystemTime::now(),
            header_digest: params.header_digest,
            data_digest: params.data_digest,
            immediate_data: params.immediate_data,
            initial_r2t: params.initial_r2t,
            max_burst_length: params.max_burst_length,
            first_burst_length: params.first_burst_length,
            max_recv_data_segment_length: params.max_recv_data_segment_length,
            max_send_data_segment_length: params.max_send_data_segment_length,
            chap_user: params.chap_user.clone(),
        },
        io: Default::default(),
        aborts: Default::default(),
    })
}
