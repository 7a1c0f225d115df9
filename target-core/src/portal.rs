//! Network portals: listen sockets, the accept loop, the connection cap and graceful shutdown.
//!
//! Each listen address is a network portal in a target portal group (RFC 7143 §4.1: "a set of
//! network portals within an iSCSI node that collectively supports the capability of
//! coordinating a session with connections that span these portals"), named by its TPGT.
//! Every target is served on every portal group; one portal group is one SCSI target port
//! (its relative target port identifier and its ALUA target port group are the TPGT, see
//! `scsi::alua`), so an initiator with a session through each group has two paths to each LU.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::session::{serve_connection, ConnectionContext, SessionOptions};
use crate::table::{EndReason, TargetTable};
use crate::workers::Workers;

/// A listen address and the target portal group it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetworkPortal {
    pub addr: SocketAddr,
    /// The target portal group tag (1 to 65535).
    pub tpgt: u16,
}

impl NetworkPortal {
    /// The portal in portal group 1, the group of a portal given without a tag.
    pub fn new(addr: SocketAddr) -> NetworkPortal {
        NetworkPortal { addr, tpgt: 1 }
    }
}

/// `ADDR,TPGT` as SendTargets writes a TargetAddress (RFC 7143 §13.8).
impl fmt::Display for NetworkPortal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.addr, self.tpgt)
    }
}

/// Why a portal given as text is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortalError {
    #[error("{0:?}: not an address (IPv4 ADDR:PORT or [IPv6]:PORT, then optionally ,TPGT)")]
    Address(String),
    #[error("{0:?}: the portal group tag must be a number from 1 to 65535")]
    Tag(String),
    #[error(
        "{0}: portal group tag 0 is not used: a portal group is a SCSI target port whose \
         relative target port identifier is its tag, and SPC-4 §7.8.6.5 reserves identifier 0"
    )]
    TagZero(SocketAddr),
    #[error("{0} is given twice (as {1} and {2})")]
    Duplicate(SocketAddr, NetworkPortal, NetworkPortal),
}

/// `ADDR` (portal group 1) or `ADDR,TPGT`.
impl FromStr for NetworkPortal {
    type Err = PortalError;
    fn from_str(s: &str) -> Result<NetworkPortal, PortalError> {
        let (addr, tag) = match s.rsplit_once(',') {
            Some((a, t)) => (a, Some(t)),
            None => (s, None),
        };
        let addr: SocketAddr = addr
            .trim()
            .parse()
            .map_err(|_| PortalError::Address(s.to_string()))?;
        let tpgt = match tag {
            None => 1,
            Some(t) => t
                .trim()
                .parse::<u16>()
                .map_err(|_| PortalError::Tag(s.to_string()))?,
        };
        if tpgt == 0 {
            return Err(PortalError::TagZero(addr));
        }
        Ok(NetworkPortal { addr, tpgt })
    }
}

/// Refuses a set of portals that names one address twice or uses tag 0.
pub fn check_portals(portals: &[NetworkPortal]) -> Result<(), PortalError> {
    for (i, p) in portals.iter().enumerate() {
        if p.tpgt == 0 {
            return Err(PortalError::TagZero(p.addr));
        }
        if let Some(q) = portals[..i].iter().find(|q| q.addr == p.addr) {
            return Err(PortalError::Duplicate(p.addr, *q, *p));
        }
    }
    Ok(())
}

/// A set of bound listen sockets serving one target table.
pub struct Portal {
    listeners: Vec<(TcpListener, u16)>,
    table: Arc<TargetTable>,
    options: Arc<SessionOptions>,
    max_connections: usize,
    /// Where connections run; `None`: on the runtime that runs [`Portal::serve`].
    workers: Option<Arc<Workers>>,
}

impl Portal {
    /// Binds every address in `addrs` (IPv4 or IPv6), all in portal group 1. Fails naming
    /// the address that could not be bound.
    pub async fn bind(
        addrs: &[SocketAddr],
        table: Arc<TargetTable>,
        options: SessionOptions,
        max_connections: usize,
    ) -> std::io::Result<Portal> {
        let portals: Vec<NetworkPortal> = addrs.iter().copied().map(NetworkPortal::new).collect();
        Portal::bind_portals(&portals, table, options, max_connections).await
    }

    /// Binds every portal, each in its portal group, and tells `table` which portal groups
    /// (SCSI target ports) its LUs are reached through. Fails naming the portal that could
    /// not be bound, or the first problem [`check_portals`] finds.
    pub async fn bind_portals(
        portals: &[NetworkPortal],
        table: Arc<TargetTable>,
        options: SessionOptions,
        max_connections: usize,
    ) -> std::io::Result<Portal> {
        check_portals(portals)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut listeners = Vec::with_capacity(portals.len());
        for p in portals {
            let a = p.addr;
            let l = TcpListener::bind(a)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
            listeners.push((l, p.tpgt));
        }
        let mut groups: Vec<u16> = portals.iter().map(|p| p.tpgt).collect();
        groups.sort_unstable();
        groups.dedup();
        table.set_port_groups(&groups);
        Ok(Portal {
            listeners,
            table,
            options: Arc::new(options),
            max_connections: max_connections.max(1),
            workers: None,
        })
    }

    /// Runs each accepted connection on one of `workers`' threads (see [`crate::workers`])
    /// instead of on the runtime that runs [`Portal::serve`].
    pub fn with_workers(mut self, workers: Arc<Workers>) -> Portal {
        self.workers = Some(workers);
        self
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.portals().iter().map(|p| p.addr).collect()
    }

    /// The portals actually bound (addresses with the port chosen for port 0), with their tags.
    pub fn portals(&self) -> Vec<NetworkPortal> {
        self.listeners
            .iter()
            .filter_map(|(l, tpgt)| {
                l.local_addr()
                    .ok()
                    .map(|addr| NetworkPortal { addr, tpgt: *tpgt })
            })
            .collect()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets sessions finish their
    /// in-flight commands (bounded by the session drain timeout) and returns.
    pub async fn serve(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let portals: Arc<[NetworkPortal]> = self.portals().into();
        for (l, tpgt) in self.listeners {
            if let Ok(a) = l.local_addr() {
                info!(portal = %a, tpgt, "listening");
            }
            let ctx = ConnectionContext {
                table: self.table.clone(),
                options: self.options.clone(),
                shutdown: shutdown.clone(),
                tpgt,
                portals: portals.clone(),
            };
            let tracker2 = tracker.clone();
            let permits = permits.clone();
            let shutdown = shutdown.clone();
            let workers = self.workers.clone();
            tracker.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        r = l.accept() => r,
                        _ = shutdown.cancelled() => break,
                    };
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            error!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        warn!(%peer, "connection limit reached; refusing connection");
                        drop(stream);
                        continue;
                    };
                    let ctx = ctx.clone();
                    let Some(workers) = &workers else {
                        tracker2.spawn(async move {
                            serve_connection(stream, peer, ctx).await;
                            drop(permit);
                        });
                        continue;
                    };
                    // The CPU whose receive processing handled the connection's packets
                    // (the initiator's CPU on loopback), for placement near it.
                    let cpu = crate::workers::incoming_cpu(&stream);
                    // The socket leaves this runtime's reactor and joins the worker's.
                    let std_stream = match stream.into_std() {
                        Ok(s) => s,
                        Err(e) => {
                            warn!(%peer, error = %e, "cannot hand the connection over; closing");
                            continue;
                        }
                    };
                    workers.spawn_near(cpu, tracker2.track_future(async move {
                        match tokio::net::TcpStream::from_std(std_stream) {
                            Ok(stream) => serve_connection(stream, peer, ctx).await,
                            Err(e) => {
                                warn!(%peer, error = %e, "cannot register the connection; closing")
                            }
                        }
                        drop(permit);
                    }));
                }
            });
        }
        shutdown.cancelled().await;
        self.table.end_all_sessions(EndReason::Shutdown);
        tracker.close();
        let limit = self.options.drain_timeout + Duration::from_secs(5);
        if tokio::time::timeout(limit, tracker.wait()).await.is_err() {
            warn!("sessions did not finish within {limit:?}; exiting anyway");
        }
    }
}
