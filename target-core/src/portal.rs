//! Network portals: listen sockets, the accept loop, the connection cap and graceful shutdown.

use std::net::SocketAddr;
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

/// A set of bound listen sockets serving one target table.
pub struct Portal {
    listeners: Vec<TcpListener>,
    table: Arc<TargetTable>,
    options: Arc<SessionOptions>,
    max_connections: usize,
    /// Where connections run; `None`: on the runtime that runs [`Portal::serve`].
    workers: Option<Arc<Workers>>,
}

impl Portal {
    /// Binds every address in `addrs` (IPv4 or IPv6). Fails naming the address that could not
    /// be bound.
    pub async fn bind(
        addrs: &[SocketAddr],
        table: Arc<TargetTable>,
        options: SessionOptions,
        max_connections: usize,
    ) -> std::io::Result<Portal> {
        let mut listeners = Vec::with_capacity(addrs.len());
        for a in addrs {
            let l = TcpListener::bind(a)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
            listeners.push(l);
        }
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
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets sessions finish their
    /// in-flight commands (bounded by the session drain timeout) and returns.
    pub async fn serve(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let ctx = ConnectionContext {
            table: self.table.clone(),
            options: self.options.clone(),
            shutdown: shutdown.clone(),
        };
        for l in self.listeners {
            if let Ok(a) = l.local_addr() {
                info!(portal = %a, "listening");
            }
            let ctx = ctx.clone();
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
