//! `ktgt-agent`: the node agent. `standalone` serves the targets a YAML file describes;
//! `kubernetes` serves the Targets of one node, configured from the Kubernetes API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ktgt_agent::config;
use ktgt_operator::api::SecretReference;
use target_core::lun::Engine;
use target_core::portal::{NetworkPortal, Portal};
use target_core::session::SessionOptions;
use target_core::table::TargetTable;
use target_core::workers::Workers;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "ktgt-agent",
    version,
    about = "ktgt node agent: a native iSCSI target"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// Where connection threads run (`--conn-affinity`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum AffinityArg {
    /// Threads float; the kernel's scheduler places them.
    None,
    /// Thread i pinned to the i-th CPU the agent may use; a new connection goes, among the
    /// least-loaded threads, to the one pinned to the CPU its packets arrive on.
    Pinned,
    /// A thread serving one connection pins itself to the CPU that connection's packets
    /// arrive on (checked every 100 ms of traffic, one thread per CPU), and floats otherwise.
    Follow,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum EngineArg {
    /// io_uring when the kernel allows it, else the thread pool.
    Auto,
    /// io_uring only; fail if unavailable.
    Uring,
    /// Portable thread pool with pread/pwrite.
    Threadpool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the targets described by a YAML file of tgtd.unstable.cloud/v1alpha1 objects.
    /// SIGHUP re-reads the file and applies the difference; SIGTERM/SIGINT stop gracefully.
    Standalone {
        /// The YAML file (Target, InitiatorGroup, InitiatorGroupBinding, Secret objects).
        /// Without it, the embedded default (deploy/examples/standalone.yaml) is served.
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Address of an HTTP server for /healthz, /readyz and /metrics (the same series as
        /// Kubernetes mode). Off unless set.
        #[arg(long)]
        metrics_addr: Option<SocketAddr>,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Show what the running agent serves and to whom: portals, targets with their LUNs, ACL
    /// and CHAP account names, and every session (identity, negotiated parameters, age,
    /// commands in flight, reads and writes). Asks the agent over its admin socket.
    Ls {
        /// The agent's admin socket (its --admin-socket).
        #[arg(long, default_value = ktgt_agent::admin::DEFAULT_SOCKET)]
        admin_socket: PathBuf,
        /// Print the tree as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration file and exit: prints the targets it describes or the errors.
    Check {
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Serve the Targets whose spec.nodeName is this node, from the Kubernetes API (kubeconfig,
    /// or the in-cluster service account). Reports status and Events on each Target.
    /// SIGTERM/SIGINT stop gracefully (Targets keep their finalizer: this node still owns them).
    Kubernetes {
        /// This node's name, as Targets name it in spec.nodeName. Defaults to $NODE_NAME.
        #[arg(long)]
        node_name: Option<String>,
        /// Address of the /healthz, /readyz and /metrics HTTP server (not 9100: node-exporter
        /// usually holds that port on the host network).
        #[arg(long, default_value = "0.0.0.0:9810")]
        metrics_addr: SocketAddr,
        /// Directory of the CSI driver's volume files: when a Target annotated
        /// csi.ktgt.io/delete-backing-store=true is deleted, its LUN files under this
        /// directory are deleted with it (never files elsewhere). Empty: never.
        #[arg(long, default_value = "/var/lib/ktgt/csi")]
        csi_volume_dir: PathBuf,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Unix socket `ktgt-agent ls` asks (root-only, mode 0600) [default: /run/ktgt/admin.sock];
    /// empty: none. A socket that cannot be made is an error when given here, a warning at the
    /// default.
    // clap's PathBuf parser refuses an empty value; the OsString one takes it (`""`: none).
    #[arg(long, value_parser = admin_socket_path)]
    admin_socket: Option<PathBuf>,
    /// Address to listen on, in target portal group 1, or ADDR,TPGT in portal group TPGT
    /// (repeatable; IPv4 ADDR:PORT or [IPv6]:PORT). Every target is served on every portal;
    /// each portal group is a SCSI target port and an ALUA target port group, so an initiator
    /// logged in through two groups has two paths (docs/design/portals.md).
    #[arg(long = "listen", short = 'l', default_value = "127.0.0.1:3260")]
    listen: Vec<NetworkPortal>,
    /// Require CHAP on discovery sessions, with the account in this Secret
    /// ([NAMESPACE/]NAME, namespace "default" if omitted; keys username and password, or
    /// kubelet's discovery.sendtargets.auth.username and .password). Standalone: a Secret in
    /// the configuration file; Kubernetes: read from the API. Unset: discovery takes no
    /// authentication (SendTargets still lists only the targets the asker may log in to).
    #[arg(long, value_name = "[NAMESPACE/]NAME", value_parser = secret_reference)]
    discovery_chap_secret: Option<SecretReference>,
    /// The target's own account for mutual CHAP on discovery sessions (keys username and
    /// password). Without it, the discovery.sendtargets.auth.username_in and .password_in
    /// keys of --discovery-chap-secret are used when present.
    #[arg(long, value_name = "[NAMESPACE/]NAME", value_parser = secret_reference,
          requires = "discovery_chap_secret")]
    discovery_chap_mutual_secret: Option<SecretReference>,
    /// Commands an initiator may have outstanding per session.
    #[arg(long, default_value_t = 128)]
    queue_depth: u32,
    /// Most concurrent connections.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// I/O engine for file and block stores.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    engine: EngineArg,
    /// Seconds without traffic before the target pings an initiator (NOP-In).
    #[arg(long, default_value_t = 10)]
    nop_interval: u64,
    /// Seconds without traffic before the connection is dropped.
    #[arg(long, default_value_t = 30)]
    nop_timeout: u64,
    /// Microseconds an idle connection polls its socket for the next command before it
    /// sleeps; 0 turns polling off. At most 1000 (a polling connection watches nothing
    /// else, shutdown included, for that long).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=1000))]
    busy_poll_us: u64,
    /// Threads that serve connections, each session on one of them for its whole life
    /// (default: one per CPU); 0 serves them on the agent's shared runtime instead.
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=1024))]
    conn_threads: Option<u16>,
    /// Where connection threads run: follow (default: a thread serving one connection pins
    /// itself to the CPU that connection's packets arrive on, SO_INCOMING_CPU, one thread
    /// per CPU, and floats otherwise), none (the scheduler places them) or pinned (one per
    /// CPU, connections placed by their incoming CPU).
    #[arg(long, value_enum, default_value_t = AffinityArg::Follow)]
    conn_affinity: AffinityArg,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour codes only on a terminal: log files and journald get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ktgt")
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Standalone {
            config,
            metrics_addr,
            serve,
        } => {
            let source = config.map(Source::File).unwrap_or(Source::Embedded);
            let workers = serve.workers()?;
            let r = rt.block_on(standalone(source, metrics_addr, serve, workers.clone()));
            // The threads stop (and are joined) here, after the stores were flushed.
            drop(workers);
            r
        }
        Command::Kubernetes {
            node_name,
            metrics_addr,
            csi_volume_dir,
            serve,
        } => {
            let node = match node_name.or_else(|| std::env::var("NODE_NAME").ok()) {
                Some(n) if !n.is_empty() => n,
                _ => anyhow::bail!("--node-name (or $NODE_NAME) is required"),
            };
            let workers = serve.workers()?;
            let volume_dir = (!csi_volume_dir.as_os_str().is_empty()).then_some(csi_volume_dir);
            let r = rt.block_on(kubernetes(
                node,
                metrics_addr,
                volume_dir,
                serve,
                workers.clone(),
            ));
            drop(workers);
            r
        }
        Command::Ls { admin_socket, json } => {
            let tree = rt.block_on(ktgt_agent::admin::fetch(&admin_socket))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tree)?);
            } else {
                print!("{}", ktgt_agent::admin::render(&tree));
            }
            Ok(())
        }
        Command::Check { config } => {
            let desired = load(&Source::File(config.clone()), None)?;
            print!("{}", describe(&desired));
            println!(
                "{}: valid, {} target(s)",
                config.display(),
                desired.targets.len()
            );
            Ok(())
        }
    }
}

/// The embedded default configuration: one demo target (see the README).
const EMBEDDED_DEFAULT: &str = include_str!("../../deploy/examples/standalone.yaml");

/// Where the configuration comes from.
#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    Embedded,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Embedded => f.write_str("embedded default (deploy/examples/standalone.yaml)"),
        }
    }
}

/// Loads and fully validates the configuration: nothing starts half-configured.
fn load(
    source: &Source,
    discovery: Option<&config::DiscoveryChap>,
) -> anyhow::Result<target_core::config::DesiredState> {
    match source {
        // load_file also checks the backing stores.
        Source::File(path) => Ok(config::load_file_with(path, discovery)?),
        Source::Embedded => {
            let desired = config::parse_str_with(EMBEDDED_DEFAULT, "embedded default", discovery)?;
            let problems = config::check_backing_stores(&desired);
            if let Some(first) = problems.first() {
                anyhow::bail!("embedded default: {first}");
            }
            Ok(desired)
        }
    }
}

impl ServeArgs {
    /// `--discovery-chap-secret` and `--discovery-chap-mutual-secret`.
    fn discovery_chap(&self) -> Option<config::DiscoveryChap> {
        self.discovery_chap_secret
            .clone()
            .map(|secret_ref| config::DiscoveryChap {
                secret_ref,
                mutual_secret_ref: self.discovery_chap_mutual_secret.clone(),
            })
    }

    fn engine(&self) -> Engine {
        match self.engine {
            EngineArg::Auto => Engine::Auto,
            EngineArg::Uring => Engine::Uring,
            EngineArg::Threadpool => Engine::ThreadPool,
        }
    }

    /// The connection threads, started before the async runtime (see
    /// [`target_core::workers`]); `None` with `--conn-threads 0`.
    fn workers(&self) -> anyhow::Result<Option<Arc<Workers>>> {
        let n = self.conn_threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            usize::from,
        );
        if n == 0 {
            return Ok(None);
        }
        let w = match self.conn_affinity {
            AffinityArg::None => Workers::start(n),
            AffinityArg::Pinned => Workers::start_pinned(n),
            AffinityArg::Follow => Workers::start_following(n),
        }
        .context("starting the connection threads")?;
        Ok(Some(Arc::new(w)))
    }

    /// Serves the admin socket (`ktgt-agent ls`) until `shutdown`, unless `--admin-socket ""`
    /// or another agent holds it (a warning: `ls` then shows that one).
    async fn start_admin(
        &self,
        table: &Arc<TargetTable>,
        portals: Vec<NetworkPortal>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
        use ktgt_agent::admin::{AdminServer, DEFAULT_SOCKET};
        let path = self
            .admin_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        if path.as_os_str().is_empty() {
            return Ok(None);
        }
        let bound = match AdminServer::bind(&path).await {
            Ok(b) => b,
            Err(e) if self.admin_socket.is_none() => {
                warn!(path = %path.display(), error = %e,
                    "no admin socket (`ktgt-agent ls` cannot ask this agent); pass --admin-socket");
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("--admin-socket {}", path.display())),
        };
        match bound {
            Some(server) => Ok(Some(tokio::spawn(server.serve(
                table.clone(),
                portals,
                shutdown.clone(),
            )))),
            None => {
                warn!(path = %path.display(),
                    "another agent listens on the admin socket; serving none (`ktgt-agent ls` shows that agent; pass --admin-socket)");
                Ok(None)
            }
        }
    }

    fn session_options(&self) -> SessionOptions {
        SessionOptions {
            queue_depth: self.queue_depth.max(1),
            nop_interval: Duration::from_secs(self.nop_interval.max(1)),
            nop_timeout: Duration::from_secs(self.nop_timeout.max(2)),
            busy_poll: Duration::from_micros(self.busy_poll_us),
            ..SessionOptions::default()
        }
    }
}

async fn standalone(
    source: Source,
    metrics_addr: Option<SocketAddr>,
    args: ServeArgs,
    workers: Option<Arc<Workers>>,
) -> anyhow::Result<()> {
    use ktgt_operator::telemetry::{self, Readiness, TelemetryServer};
    let discovery = args.discovery_chap();
    let desired = load(&source, discovery.as_ref())
        .with_context(|| format!("invalid configuration: {source}"))?;
    warn_shared_backing_stores(&desired);
    let table = TargetTable::new();
    table.set_engine(args.engine());
    let report = table.apply(&desired).await;
    report.log();
    if !report.errors.is_empty() {
        anyhow::bail!(
            "some LUNs could not be opened (see above); refusing to start half-configured"
        );
    }
    let options = args.session_options();
    let mut portal =
        Portal::bind_portals(&args.listen, table.clone(), options, args.max_connections).await?;
    if let Some(w) = workers {
        portal = portal.with_workers(w);
    }
    let shutdown = CancellationToken::new();
    let telemetry_task = match metrics_addr {
        Some(addr) => {
            let mut registry = telemetry::registry();
            registry.register_collector(Box::new(ktgt_agent::metrics::AgentCollector::new(
                table.clone(),
            )));
            let readiness = Readiness::new(&[ktgt_agent::kube::READY_PORTAL]);
            readiness.set(ktgt_agent::kube::READY_PORTAL, true);
            let server = TelemetryServer::bind(addr, registry, readiness)
                .await
                .with_context(|| format!("--metrics-addr {addr}"))?;
            info!(addr = %server.local_addr()?, "serving /healthz, /readyz and /metrics");
            Some(tokio::spawn(server.serve(shutdown.clone())))
        }
        None => None,
    };
    let admin = args
        .start_admin(&table, portal.portals(), &shutdown)
        .await?;
    let serve = tokio::spawn(portal.serve(shutdown.clone()));
    info!(config = %source, targets = desired.targets.len(), "ktgt-agent ready");

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&source, discovery.as_ref(), &table).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("shutting down: no new connections; finishing in-flight commands");
    shutdown.cancel();
    let _ = serve.await;
    if let Some(a) = admin {
        let _ = a.await;
    }
    if let Some(t) = telemetry_task {
        let _ = t.await;
    }
    table.flush_all().await;
    info!("stores flushed; exiting");
    Ok(())
}

/// Logs a warning for each backing store that several LUNs share.
fn warn_shared_backing_stores(desired: &target_core::config::DesiredState) {
    for shared in config::shared_backing_stores(desired) {
        warn!("{shared}");
    }
}

/// SIGHUP: re-read the file; apply it only if it is entirely valid.
async fn reload(
    source: &Source,
    discovery: Option<&config::DiscoveryChap>,
    table: &Arc<TargetTable>,
) {
    info!(config = %source, "SIGHUP: reloading configuration");
    match load(source, discovery) {
        Ok(desired) => {
            warn_shared_backing_stores(&desired);
            let report = table.apply(&desired).await;
            report.log();
        }
        Err(e) => warn!("configuration not reloaded, keeping the current one: {e:#}"),
    }
}

/// Cluster mode: the portal, the telemetry server and the Target controller, until
/// SIGTERM/SIGINT.
async fn kubernetes(
    node: String,
    metrics_addr: SocketAddr,
    volume_dir: Option<PathBuf>,
    args: ServeArgs,
    workers: Option<Arc<Workers>>,
) -> anyhow::Result<()> {
    use ktgt_agent::kube as cluster;
    use ktgt_operator::telemetry::{self, Readiness, ReconcileMetrics, TelemetryServer};

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (kubeconfig or in-cluster service account)")?;
    let table = TargetTable::new();
    table.set_engine(args.engine());

    let mut registry = telemetry::registry();
    let metrics = ReconcileMetrics::register(&mut registry);
    registry.register_collector(Box::new(ktgt_agent::metrics::AgentCollector::new(
        table.clone(),
    )));
    let readiness = Readiness::new(&[cluster::READY_INITIAL_SYNC, cluster::READY_PORTAL]);
    let server = TelemetryServer::bind(metrics_addr, registry, readiness.clone()).await?;
    info!(addr = %server.local_addr()?, "serving /healthz, /readyz and /metrics");
    let shutdown = CancellationToken::new();
    let telemetry_task = tokio::spawn(server.serve(shutdown.clone()));

    let mut portal = Portal::bind_portals(
        &args.listen,
        table.clone(),
        args.session_options(),
        args.max_connections,
    )
    .await?;
    if let Some(w) = workers {
        portal = portal.with_workers(w);
    }
    readiness.set(cluster::READY_PORTAL, true);
    let admin = args
        .start_admin(&table, portal.portals(), &shutdown)
        .await?;
    let serve = tokio::spawn(portal.serve(shutdown.clone()));
    let controller = tokio::spawn(cluster::run(
        client,
        node.clone(),
        table.clone(),
        metrics,
        readiness,
        shutdown.clone(),
        cluster::Options {
            volume_dir,
            discovery: args.discovery_chap(),
        },
    ));
    info!(node = %node, listen = ?args.listen, "ktgt-agent (kubernetes) started");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("shutting down: no new connections; finishing in-flight commands");
    shutdown.cancel();
    let _ = serve.await;
    let _ = controller.await;
    let _ = telemetry_task.await;
    if let Some(a) = admin {
        let _ = a.await;
    }
    table.flush_all().await;
    info!("stores flushed; exiting");
    Ok(())
}

/// What `ktgt-agent check` prints: each target with its LUNs, who may log in and CHAP
/// account names (never secrets), then warnings: a target nobody may log in to, a backing
/// store two LUNs share.
fn describe(desired: &target_core::config::DesiredState) -> String {
    use std::fmt::Write as _;
    use target_core::config::{AddressRule, Backing};
    let mut out = String::new();
    let mut warnings = Vec::new();
    for (iqn, t) in &desired.targets {
        let _ = writeln!(out, "target {iqn}: {} LUN(s)", t.luns.len());
        for (n, l) in &t.luns {
            let store = match &l.backing {
                Backing::Memory { size } => format!("memory, {size} bytes"),
                Backing::Path(p) => match l.create_size {
                    Some(size) => format!("{} ({size} bytes if created)", p.display()),
                    None => p.display().to_string(),
                },
            };
            let flags = [(l.read_only, ", read-only"), (l.direct, ", direct")]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, f)| *f)
                .collect::<String>();
            let _ = writeln!(
                out,
                "  lun {n}: {store}, {}-byte blocks{flags}",
                l.block_size
            );
        }
        for g in &t.acl.grants {
            let who = if g.initiators.is_empty() {
                "any initiator".to_owned()
            } else {
                g.initiators.join(", ")
            };
            let from: Vec<String> = g
                .addresses
                .iter()
                .map(|a| match a {
                    AddressRule::All => "any address".to_owned(),
                    AddressRule::Net(n) => n.to_string(),
                })
                .collect();
            let from = if from.is_empty() {
                "any address".to_owned()
            } else {
                from.join(", ")
            };
            let _ = writeln!(out, "  acl: {who} from {from} [{}]", g.source);
        }
        if t.acl.admits_nobody() {
            let _ = writeln!(out, "  acl: nobody");
            warnings.push(format!(
                "target {iqn} admits nobody: no InitiatorGroupBinding binds a group with initiators or addresses to it"
            ));
        }
        if !t.chap.incoming.is_empty() {
            let users: Vec<&str> = t.chap.incoming.iter().map(|c| c.user.as_str()).collect();
            let mutual = t
                .chap
                .outgoing
                .as_ref()
                .map(|c| format!("; mutual as {}", c.user))
                .unwrap_or_default();
            let _ = writeln!(out, "  chap: {}{mutual}", users.join(", "));
        }
    }
    warnings.extend(
        config::shared_backing_stores(desired)
            .iter()
            .map(ToString::to_string),
    );
    for w in warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

/// `[NAMESPACE/]NAME` of a Secret.
fn secret_reference(s: &str) -> Result<SecretReference, String> {
    let (namespace, name) = match s.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, s),
    };
    let valid = |v: &str| {
        !v.is_empty()
            && v.len() <= 253
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !valid(name) || namespace.is_some_and(|ns| !valid(ns)) {
        return Err(format!(
            "{s:?}: expected [NAMESPACE/]NAME of a Secret (lowercase letters, digits, '-' and '.')"
        ));
    }
    Ok(SecretReference {
        name: name.to_owned(),
        namespace: namespace.map(str::to_owned),
    })
}

/// `--admin-socket` as given, the empty value included (clap's PathBuf parser refuses it).
fn admin_socket_path(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}
