//! `ktgt-operator`: keeps every InitiatorGroup's status true to the Node list (see
//! `ktgt_operator::initiator_group`). Several replicas may run; a Lease elects the one that
//! writes.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use ktgt_operator::api::DEFAULT_INITIATOR_NAME_PREFIX;
use ktgt_operator::initiator_group::{self, Context, CONTROLLER};
use ktgt_operator::lease::{self, LeaseConfig, LeaseLock};
use ktgt_operator::telemetry::{self, Readiness, ReconcileMetrics, TelemetryServer};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

/// The readiness check: the API server answered a leader-election round.
const READY_API: &str = "api-server";

#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Prefix of initiator names for the NodeName strategy when a group names none.
    #[arg(long, default_value = DEFAULT_INITIATOR_NAME_PREFIX)]
    initiator_name_prefix: String,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "ktgt-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the Pod's, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ktgt-system")]
    lease_namespace: String,
    /// This replica's identity in the Lease (default: the Pod name, from POD_NAME).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format: human (default) or json (one JSON object a line), as the agent's flag.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Same as --log-format json (the operator's first spelling, kept for existing args).
    #[arg(long, hide = true)]
    log_json: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json || args.log_format == LogFormat::Json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API server")?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "ktgt-operator".to_owned());
        format!("{host}-{}", std::process::id())
    });

    let mut registry = telemetry::registry();
    let metrics = ReconcileMetrics::register(&mut registry);
    let readiness = Readiness::new(&[READY_API]);
    let shutdown = CancellationToken::new();
    let server = TelemetryServer::bind(args.metrics_addr, registry, readiness.clone())
        .await
        .context("binding the metrics address")?;
    let server_task = tokio::spawn(server.serve(shutdown.clone()));

    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        });
    }

    let lock = LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &args.lease_namespace),
        &args.lease_name,
        &identity,
        LeaseConfig::default(),
    );
    let on_attempt = {
        let readiness = readiness.clone();
        move |answered: bool| {
            if answered {
                readiness.set(READY_API, true);
            }
        }
    };
    tracing::info!(%identity, lease = %args.lease_name, "waiting for leadership");
    let Some((lost, renewer)) = lease::run_leader(lock, shutdown.clone(), on_attempt).await else {
        server_task.await.ok();
        return Ok(());
    };

    let ctx = Arc::new(
        Context::new(client, &args.initiator_name_prefix).with_observer(Box::new(
            move |elapsed, error| metrics.record(CONTROLLER, elapsed, error),
        )),
    );
    let stop = {
        let shutdown = shutdown.clone();
        let lost = lost.clone();
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = lost.cancelled() => {}
            }
        }
    };
    initiator_group::run(ctx, stop).await;

    // Stop renewing (the renewer releases the Lease) and the HTTP server.
    shutdown.cancel();
    renewer.await.ok();
    server_task.await.ok();
    if lost.is_cancelled() {
        // Another replica may lead now; exit so the Pod restarts as a follower.
        anyhow::bail!("leadership lost");
    }
    Ok(())
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler; Ctrl-C only");
            tokio::signal::ctrl_c().await.ok();
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
