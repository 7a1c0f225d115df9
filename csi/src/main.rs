//! `ktgt-csi`: the CSI driver `csi.ktgt.io`. `controller` serves the Identity and Controller
//! services on `--endpoint unix://PATH`, making volumes as Targets in the pools it is given;
//! `node` serves the Identity and Node services on every node that mounts volumes.

use std::collections::BTreeMap;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ktgt_csi::controller::ControllerService;
use ktgt_csi::node::{NodeConfig, NodeService};
use ktgt_csi::pools::{Pool, Pools};
use ktgt_csi::proto::controller_server::ControllerServer;
use ktgt_csi::proto::identity_server::IdentityServer;
use ktgt_csi::proto::node_server::NodeServer;
use tracing::info;

#[derive(Parser, Debug)]
#[command(name = "ktgt-csi", version, about = "ktgt CSI driver (csi.ktgt.io)")]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The Identity and Controller services: volumes as Targets, access per node.
    Controller {
        /// The CSI endpoint, unix://PATH.
        #[arg(long, default_value = "unix:///csi/csi.sock")]
        endpoint: String,
        /// A storage pool (repeatable): name=NAME,node=NODE,path=DIR,capacity=QUANTITY, and
        /// optionally portal=ADDR:PORT (default: the Node's InternalIP, port 3260).
        #[arg(long = "pool", required = true)]
        pools: Vec<String>,
        /// The namespace of volumes' CHAP Secrets (StorageClass parameter chap).
        #[arg(long, default_value = "ktgt-system")]
        secret_namespace: String,
    },
    /// The Identity and Node services: iscsiadm login, mkfs when blank, mount, on this node.
    Node {
        /// The CSI endpoint, unix://PATH.
        #[arg(long, default_value = "unix:///csi/csi.sock")]
        endpoint: String,
        /// This node's Kubernetes name (its topology segment).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// open-iscsi's initiator name file: NodeGetInfo's node id.
        #[arg(long, default_value = "/etc/iscsi/initiatorname.iscsi")]
        initiator_name_file: std::path::PathBuf,
        /// The iscsiadm to run (e.g. a wrapper that enters the host's namespaces).
        #[arg(long, default_value = "iscsiadm")]
        iscsiadm: String,
        /// Seconds the kernel queues I/O while a session reconnects before failing it
        /// (node.session.timeo.replacement_timeout).
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=86400))]
        replacement_timeout: u32,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Controller {
            endpoint,
            pools,
            secret_namespace,
        } => rt.block_on(controller(endpoint, pools, secret_namespace)),
        Command::Node {
            endpoint,
            node_name,
            initiator_name_file,
            iscsiadm,
            replacement_timeout,
        } => {
            let mut cfg = NodeConfig::new(&node_name);
            cfg.initiator_file = initiator_name_file;
            cfg.iscsiadm = iscsiadm;
            cfg.replacement_timeout = replacement_timeout;
            rt.block_on(node(endpoint, cfg))
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("shutting down");
    })
}

async fn node(endpoint: String, cfg: NodeConfig) -> anyhow::Result<()> {
    if cfg.node_name.is_empty() {
        anyhow::bail!("--node-name (or NODE_NAME) is empty");
    }
    let path = ktgt_csi::endpoint::socket_path(&endpoint)?;
    let service = NodeService::new(cfg);
    let incoming = ktgt_csi::endpoint::bind(&path)?;
    info!(endpoint = %endpoint, driver = ktgt_csi::DRIVER_NAME, "serving the CSI node service");
    let shutdown = shutdown_signal()?;
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(service.clone()))
        .add_service(NodeServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving gRPC")?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Splits an optional `portal=` field off a `--pool` value.
fn split_portal(value: &str) -> (String, Option<String>) {
    let mut portal = None;
    let rest: Vec<&str> = value
        .split(',')
        .filter(|part| match part.trim().strip_prefix("portal=") {
            Some(p) => {
                portal = Some(p.trim().to_owned());
                false
            }
            None => true,
        })
        .collect();
    (rest.join(","), portal)
}

async fn controller(
    endpoint: String,
    pool_args: Vec<String>,
    secret_namespace: String,
) -> anyhow::Result<()> {
    let mut pools = Vec::new();
    let mut portals = BTreeMap::new();
    for value in &pool_args {
        let (rest, portal) = split_portal(value);
        let pool = Pool::parse(&rest).map_err(|mut e| {
            e.value = value.clone();
            e
        })?;
        if let Some(p) = portal {
            portals.insert(pool.name.clone(), p);
        }
        pools.push(pool);
    }
    let pools = Pools::new(pools)?;
    let path = ktgt_csi::endpoint::socket_path(&endpoint)?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (kubeconfig or in-cluster service account)")?;
    for p in pools.iter() {
        info!(pool = %p, "pool");
    }
    let service = ControllerService::new(client, pools, portals, secret_namespace);
    let incoming = ktgt_csi::endpoint::bind(&path)?;
    info!(endpoint = %endpoint, driver = ktgt_csi::DRIVER_NAME, "serving the CSI controller");
    let shutdown = shutdown_signal()?;
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(service.clone()))
        .add_service(ControllerServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving gRPC")?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portal_is_split_off_a_pool() {
        let (rest, portal) =
            split_portal("name=a,node=n,portal=127.0.0.1:3261,path=/p,capacity=1Gi");
        assert_eq!(rest, "name=a,node=n,path=/p,capacity=1Gi");
        assert_eq!(portal.as_deref(), Some("127.0.0.1:3261"));
        assert_eq!(split_portal("name=a").1, None);
    }
}
