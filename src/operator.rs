//! The operator's lifetime (`imagebuild-operator run`): its options, the API client (every
//! request counted, writes fenced by the lease), the metrics endpoint, readiness, standing
//! by for the lease, and the controller.
//!
//! Start: the metrics endpoint binds first (a port in use fails at once), then the client;
//! a candidate with leader election serves `/readyz` as ready while it stands by, and runs
//! the controller once it holds the lease.
//!
//! Stop, on SIGTERM or Ctrl-C, in this order: a candidate standing by leaves at once;
//! otherwise the controller stops taking work and lets the reconciles in flight finish;
//! the lease is released (so another candidate leads without waiting for it to run out);
//! readiness checks stop; the metrics endpoint stops last, so the end can be scraped.
//! Losing the lease stops the same way (the fence already refuses every write), and
//! [`run`] returns [`Exit::LostLease`]: the process restarts as a candidate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::leader::{Fence, FenceLayer, Leadership, LeaseConfig};
use crate::metrics::Metrics;
use crate::metrics::api::CountRequests;
use crate::metrics::server::{self, Health};

/// How the operator runs (`imagebuild-operator run`).
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// Namespace to watch (repeat for several); all namespaces when none is given.
    #[arg(
        long = "namespace",
        short = 'n',
        env = "IMAGEBUILD_NAMESPACES",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,
    /// Runs reconciled at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: u16,
    /// Registry requests in flight per run.
    #[arg(long, default_value_t = 16)]
    pub registry_concurrency: usize,
    /// How long a run's registry checks may go without any answer before the run says the
    /// registry does not answer (condition Degraded) and checks again later.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub registry_stall_timeout: Duration,
    /// Build Jobs in flight across all runs together, shared fairly between the runs
    /// that have work (each run still keeps its own maxWorkers). Unlimited if unset.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), env = "IMAGEBUILD_MAX_TOTAL_WORKERS")]
    pub max_total_workers: Option<u32>,
    /// Pods of failed builds kept per run, for their full logs (`kubectl imagebuild logs`),
    /// until the run is deleted; 0 keeps none.
    #[arg(long, default_value_t = 100, env = "IMAGEBUILD_KEPT_FAILED_PODS")]
    pub kept_failed_pods: u32,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "IMAGEBUILD_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Address of /metrics, /healthz and /readyz (port 0: any free port, logged).
    #[arg(long, default_value = "0.0.0.0:8080", env = "IMAGEBUILD_METRICS_ADDR")]
    pub metrics_address: String,
    /// Run only while holding a Lease (for more than one replica).
    #[arg(long, env = "IMAGEBUILD_LEADER_ELECTION")]
    pub leader_election: bool,
    /// The Lease's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// The Lease's name.
    #[arg(long, default_value = "imagebuild-operator")]
    pub lease_name: String,
    /// Seconds a lease lasts unless renewed; it is renewed 5 s (or a third of it,
    /// if less) before it ends.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..))]
    pub lease_duration: u64,
    /// This candidate's identity (default: the pod's name, else host and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

/// Log formats.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// How the operator ended when it did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Exit {
    /// It could not start.
    #[error("{0}")]
    Start(String),
    /// It lost the lease.
    #[error("lost the lease")]
    LostLease,
    /// The metrics endpoint failed.
    #[error("the metrics endpoint failed: {0}")]
    Endpoint(String),
}

/// Runs the operator until SIGTERM or Ctrl-C (or a lost lease).
pub async fn run(options: Options) -> Result<(), Exit> {
    init_logging(options.log_format);
    let listener = server::bind(&options.metrics_address)
        .await
        .map_err(|e| Exit::Start(e.to_string()))?;
    let metrics = Arc::new(Metrics::new());
    let fence = Fence::new(options.leader_election);
    let client = counted_client(&metrics, &fence).await?;
    // One shutdown signal for every part: standing by, the controllers.
    let (stopping, shutdown) = tokio::sync::watch::channel(false);
    let signals = stopping.clone();
    tokio::spawn(async move {
        terminated().await;
        tracing::info!("shutting down");
        let _ = signals.send(true);
    });
    tracing::info!(namespaces = ?options.namespaces, concurrency = options.concurrency, max_total_workers = ?options.max_total_workers, "starting");
    let health = Arc::new(Health::default());
    let (stop_endpoint, endpoint_stopped) = tokio::sync::oneshot::channel::<()>();
    let endpoint = tokio::spawn(server::serve(
        listener,
        metrics.clone(),
        health.clone(),
        async {
            let _ = endpoint_stopped.await;
        },
    ));
    let readiness = tokio::spawn(server::watch_readiness(
        client.clone(),
        health.clone(),
        metrics.clone(),
    ));
    let lease = options.leader_election.then(|| LeaseConfig {
        namespace: options.lease_namespace.clone(),
        name: options.lease_name.clone(),
        identity: options.identity.clone().unwrap_or_else(default_identity),
        duration: options.lease_duration,
        grace: (options.lease_duration / 3).clamp(1, 5),
    });
    let lost = Arc::new(AtomicBool::new(false));
    let mut keeper = None;
    if let Some(lease) = &lease {
        health.set_standby(true);
        metrics.set_leader(false);
        // The lease is renewed on a client of its own, which the fence spares.
        let renewer = plain_client().await?;
        let mut standing_by = shutdown.clone();
        let leadership = tokio::select! {
            l = Leadership::acquire(renewer, lease, fence.clone()) => l,
            _ = standing_by.wait_for(|stop| *stop) => {
                tracing::info!("stopped while standing by");
                readiness.abort();
                let _ = stop_endpoint.send(());
                return ended(endpoint.await);
            }
        };
        let mut leadership = leadership.map_err(|e| Exit::Start(e.to_string()))?;
        health.set_standby(false);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (metrics, stopping, lost) = (metrics.clone(), stopping.clone(), lost.clone());
        keeper = Some((
            release,
            tokio::spawn(async move {
                tokio::select! {
                    _ = leadership.lost() => {
                        // The fence already refuses every write; stop as on SIGTERM.
                        metrics.set_leader(false);
                        tracing::error!("lost the lease: stopping");
                        lost.store(true, Ordering::SeqCst);
                        let _ = stopping.send(true);
                    }
                    _ = released => {
                        metrics.set_leader(false);
                        leadership.release().await;
                    }
                }
            }),
        ));
    }
    metrics.set_leader(true);
    let controller_options = crate::controller::Options {
        namespaces: options.namespaces.clone(),
        concurrency: options.concurrency,
        registry_concurrency: options.registry_concurrency,
        registry_stall: options.registry_stall_timeout,
        max_total_workers: options.max_total_workers,
        kept_failed_pods: options.kept_failed_pods,
        fence: fence.clone(),
        identity: lease.as_ref().map(|l| l.identity.clone()),
    };
    crate::controller::run(client, controller_options, metrics, health, shutdown).await;
    if let Some((release, task)) = keeper {
        let _ = release.send(());
        let _ = task.await;
    }
    readiness.abort();
    let _ = stop_endpoint.send(());
    ended(endpoint.await)?;
    if lost.load(Ordering::SeqCst) {
        return Err(Exit::LostLease);
    }
    Ok(())
}

fn ended(endpoint: Result<Result<(), std::io::Error>, tokio::task::JoinError>) -> Result<(), Exit> {
    match endpoint {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(Exit::Endpoint(err.to_string())),
        Err(err) => Err(Exit::Endpoint(format!("it panicked: {err}"))),
    }
}

/// What every request of the operator says it comes from: the API server names the
/// operator's writes after it (their managedFields entries, the field manager it infers
/// from the agent's name) and its audit log shows it.
pub const USER_AGENT: &str = concat!("imagebuild-operator/", env!("CARGO_PKG_VERSION"));

fn unreachable(e: impl std::fmt::Display) -> Exit {
    Exit::Start(format!("cannot reach the Kubernetes API: {e}"))
}

/// The client's configuration from the kubeconfig or the pod's service account, every
/// request sent with [`USER_AGENT`].
async fn config() -> Result<kube::Config, Exit> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = kube::Config::infer().await.map_err(unreachable)?;
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    Ok(config)
}

/// A client from the kubeconfig or the pod's service account.
pub async fn plain_client() -> Result<kube::Client, Exit> {
    kube::Client::try_from(config().await?).map_err(unreachable)
}

/// Like [`plain_client`], with every request counted in `metrics`, and writes refused
/// past `fence`.
async fn counted_client(metrics: &Arc<Metrics>, fence: &Arc<Fence>) -> Result<kube::Client, Exit> {
    let builder = kube::client::ClientBuilder::try_from(config().await?).map_err(unreachable)?;
    Ok(builder
        .with_layer(&CountRequests(metrics.clone()))
        .with_layer(&FenceLayer(fence.clone()))
        .build())
}

/// This candidate's identity without a pod name: host and process id.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "imagebuild-operator".into());
    format!("{host}-{}", std::process::id())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal (and never with NO_COLOR), not in log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
