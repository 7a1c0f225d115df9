//! Health, readiness and Prometheus metrics over HTTP, shared by `ktgt-agent kubernetes` and
//! `ktgt-operator`.
//!
//! # Endpoints
//! - `GET /healthz`: 200 while the process serves HTTP at all (a liveness probe).
//! - `GET /readyz`: 200 once every readiness check registered with [`Readiness::new`] has been
//!   marked done (for the agent: initial sync applied, portal listening), else 503 listing the
//!   pending checks.
//! - `GET /metrics`: the [`Registry`] in the OpenMetrics text format.
//!
//! # Design
//! A three-route server does not need a router: this is a plain hyper 1 `http1` connection
//! per accepted socket (hyper, hyper-util and http-body-util are already in the tree through
//! kube's client, so the server adds no dependency). Metrics use `prometheus-client`: the
//! binaries register their families at start-up, and read-on-scrape values (sessions, per-LUN
//! counters) as [`prometheus_client::collector::Collector`]s.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Content type of `/metrics` (OpenMetrics text, which Prometheus scrapes natively).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Prefix of every metric name.
pub const METRICS_PREFIX: &str = "ktgt";

/// A fresh registry whose metric names start with `ktgt_`.
pub fn registry() -> Registry {
    Registry::with_prefix(METRICS_PREFIX)
}

// ---------------------------------------------------------------------------------------------
// Readiness

/// Named readiness checks; ready when all are done. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct Readiness {
    checks: Arc<[(&'static str, AtomicBool)]>,
}

impl Readiness {
    /// Checks named `names`, all pending. With no names the process is ready at once.
    pub fn new(names: &[&'static str]) -> Readiness {
        Readiness {
            checks: names.iter().map(|&n| (n, AtomicBool::new(false))).collect(),
        }
    }

    /// Marks check `name` done (or pending again with `done = false`). Unknown names are
    /// ignored.
    pub fn set(&self, name: &str, done: bool) {
        for (n, flag) in self.checks.iter() {
            if *n == name {
                flag.store(done, Ordering::Release);
            }
        }
    }

    /// The checks still pending; empty when ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|(_, f)| !f.load(Ordering::Acquire))
            .map(|(n, _)| *n)
            .collect()
    }

    /// Whether every check is done.
    pub fn is_ready(&self) -> bool {
        self.pending().is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// Reconcile metrics

/// Labels of the reconcile counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// The controller (`target`, `initiatorgroup`).
    pub controller: String,
}

/// Labels of the reconcile error counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    /// A stable CamelCase label of the error (each crate's error enums provide it).
    pub reason: String,
}

/// Outcome label of a reconcile.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    Success,
    Error,
}

/// Labels of the reconcile duration histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub controller: String,
    pub outcome: Outcome,
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// `ktgt_reconciles_total`, `ktgt_reconcile_errors_total` and
/// `ktgt_reconcile_duration_seconds`. Cheap to clone (the families are shared).
#[derive(Debug, Clone)]
pub struct ReconcileMetrics {
    reconciles: Family<ControllerLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<DurationLabels, Histogram, fn() -> Histogram>,
}

impl ReconcileMetrics {
    /// Creates the families and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> ReconcileMetrics {
        let metrics = ReconcileMetrics {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
        };
        registry.register(
            "reconciles",
            "Reconciliations run, by controller",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by controller and error reason",
            metrics.errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconciliation took, by controller and outcome",
            metrics.duration.clone(),
        );
        metrics
    }

    /// Records one reconciliation of `controller` that took `elapsed` and failed with
    /// `error_reason`, if any.
    pub fn record(&self, controller: &str, elapsed: Duration, error_reason: Option<&str>) {
        let controller = controller.to_owned();
        self.reconciles
            .get_or_create(&ControllerLabels {
                controller: controller.clone(),
            })
            .inc();
        let outcome = match error_reason {
            None => Outcome::Success,
            Some(reason) => {
                self.errors
                    .get_or_create(&ErrorLabels {
                        controller: controller.clone(),
                        reason: reason.to_owned(),
                    })
                    .inc();
                Outcome::Error
            }
        };
        self.duration
            .get_or_create(&DurationLabels {
                controller,
                outcome,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Reconciles counted for `controller` (tests).
    pub fn reconciles(&self, controller: &str) -> u64 {
        self.reconciles
            .get(&ControllerLabels {
                controller: controller.to_owned(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// Errors counted for `controller` and `reason` (tests).
    pub fn errors(&self, controller: &str, reason: &str) -> u64 {
        self.errors
            .get(&ErrorLabels {
                controller: controller.to_owned(),
                reason: reason.to_owned(),
            })
            .map(|c| c.get())
            .unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// Errors of the telemetry server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    #[error("binding the metrics address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The bound HTTP server; [`TelemetryServer::serve`] runs it.
#[derive(Debug)]
pub struct TelemetryServer {
    listener: TcpListener,
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    registry: Registry,
    readiness: Readiness,
}

impl TelemetryServer {
    /// Binds `addr` (port 0 picks a free port; see [`TelemetryServer::local_addr`]).
    ///
    /// # Errors
    /// [`TelemetryError::Bind`] when the address cannot be bound.
    pub async fn bind(
        addr: SocketAddr,
        registry: Registry,
        readiness: Readiness,
    ) -> Result<TelemetryServer, TelemetryError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| TelemetryError::Bind { addr, source })?;
        Ok(TelemetryServer {
            listener,
            state: Arc::new(State {
                registry,
                readiness,
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then waits for open requests to finish (each
    /// connection is closed after its current request).
    pub async fn serve(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = self.state.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(state.handle(&req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    res = conn.as_mut() => {
                        if let Err(e) = res {
                            tracing::debug!(error = %e, "metrics server: connection error");
                        }
                    }
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
        tracker.close();
        tracker.wait().await;
    }
}

impl State {
    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned());
        }
        match req.uri().path() {
            "/healthz" | "/livez" => text(StatusCode::OK, "ok\n".to_owned()),
            "/readyz" => {
                let pending = self.readiness.pending();
                if pending.is_empty() {
                    text(StatusCode::OK, "ok\n".to_owned())
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {}\n", pending.join(", ")),
                    )
                }
            }
            "/metrics" => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => {
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        resp.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(METRICS_CONTENT_TYPE),
                        );
                        resp
                    }
                    Err(_) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "encoding metrics failed\n".to_owned(),
                    ),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One HTTP/1.0-style GET over a fresh connection; returns (status, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let status = buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }

    #[test]
    fn readiness_needs_every_check() {
        let r = Readiness::new(&["sync", "portal"]);
        assert_eq!(r.pending(), vec!["sync", "portal"]);
        r.set("portal", true);
        r.set("unknown", true);
        assert!(!r.is_ready());
        r.set("sync", true);
        assert!(r.is_ready());
        r.set("sync", false);
        assert_eq!(r.pending(), vec!["sync"]);
        assert!(Readiness::new(&[]).is_ready());
    }

    #[test]
    fn reconcile_metrics_count_by_controller_and_reason() {
        let mut registry = registry();
        let m = ReconcileMetrics::register(&mut registry);
        m.record("target", Duration::from_millis(3), None);
        m.record("target", Duration::from_millis(3), Some("ApiError"));
        m.record("initiatorgroup", Duration::from_millis(3), None);
        assert_eq!(m.reconciles("target"), 2);
        assert_eq!(m.errors("target", "ApiError"), 1);
        assert_eq!(m.errors("target", "Other"), 0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"ktgt_reconciles_total{controller="target"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"ktgt_reconcile_errors_total{controller="target",reason="ApiError"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"ktgt_reconcile_duration_seconds_count{controller="target",outcome="Error"} 1"#
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let mut reg = registry();
        let m = ReconcileMetrics::register(&mut reg);
        m.record("target", Duration::from_millis(1), None);
        let readiness = Readiness::new(&["initial sync", "portal"]);
        let server = TelemetryServer::bind("127.0.0.1:0".parse().unwrap(), reg, readiness.clone())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.serve(shutdown.clone()));

        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("initial sync, portal"), "{body}");
        readiness.set("initial sync", true);
        readiness.set("portal", true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("ktgt_reconciles_total"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert_eq!(get(addr, "/nope").await.0, 404);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("server stops on shutdown")
            .unwrap();
    }
}
