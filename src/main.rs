//! The `imagebuild-operator` command: `run` is the operator; `plan` prints the build plan
//! of an ImageBuildRun file; `summary` reports on a run from its manifest.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use imagebuild_operator::cli::{self, Format, SummaryFormat};
use imagebuild_operator::leader::{Fence, FenceLayer, Leadership, LeaseConfig};
use imagebuild_operator::metrics::Metrics;
use imagebuild_operator::metrics::api::CountRequests;
use imagebuild_operator::metrics::server::{self, Health};

#[derive(Parser)]
#[command(
    version,
    about = "Builds a benchmark's container image fleet as Kubernetes Jobs"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator: reconcile ImageBuildRuns into build Jobs until SIGTERM.
    Run {
        /// Namespace to watch (repeat for several); all namespaces when none is given.
        #[arg(
            long = "namespace",
            short = 'n',
            env = "IMAGEBUILD_NAMESPACES",
            value_delimiter = ','
        )]
        namespaces: Vec<String>,
        /// Runs reconciled at once.
        #[arg(long, default_value_t = 4)]
        concurrency: u16,
        /// Registry requests in flight per run.
        #[arg(long, default_value_t = 16)]
        registry_concurrency: usize,
        /// Build Jobs in flight across all runs together, shared fairly between the runs
        /// that have work (each run still keeps its own maxWorkers). Unlimited if unset.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..), env = "IMAGEBUILD_MAX_TOTAL_WORKERS")]
        max_total_workers: Option<u32>,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "IMAGEBUILD_LOG_FORMAT")]
        log_format: LogFormat,
        /// Address of /metrics, /healthz and /readyz (port 0: any free port, logged).
        #[arg(long, default_value = "0.0.0.0:8080", env = "IMAGEBUILD_METRICS_ADDR")]
        metrics_address: String,
        /// Run only while holding a Lease (for more than one replica).
        #[arg(long, env = "IMAGEBUILD_LEADER_ELECTION")]
        leader_election: bool,
        /// The Lease's namespace.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// The Lease's name.
        #[arg(long, default_value = "imagebuild-operator")]
        lease_name: String,
        /// Seconds a lease lasts unless renewed; it is renewed 5 s (or a third of it,
        /// if less) before it ends.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..))]
        lease_duration: u64,
        /// This candidate's identity (default: the pod's name, else host and pid).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
    },
    /// Resolve a run's instances and print its build plan.
    Plan {
        /// The ImageBuildRun YAML file.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Read instance ids (or JSON lines) from this file instead of the run's source.
        #[arg(long)]
        instances_file: Option<PathBuf>,
        /// Output format: a text summary, or every node as JSON.
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Text)]
        output: Format,
        /// Nodes listed in the text summary.
        #[arg(long, default_value_t = 10)]
        show: usize,
    },
    /// Report on a run from its manifest: totals, wall clock, build times per phase,
    /// slowest and failed builds, skip reasons.
    Summary {
        /// The ImageBuildRun.
        run: String,
        /// Its namespace (default: the kubeconfig's).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = SummaryFormat::Markdown)]
        format: SummaryFormat,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Run {
            namespaces,
            concurrency,
            registry_concurrency,
            max_total_workers,
            log_format,
            metrics_address,
            leader_election,
            lease_namespace,
            lease_name,
            lease_duration,
            identity,
        } => {
            init_logging(log_format);
            let listener = match server::bind(&metrics_address).await {
                Ok(l) => l,
                Err(err) => {
                    tracing::error!("{err}");
                    return ExitCode::FAILURE;
                }
            };
            let metrics = Arc::new(Metrics::new());
            let fence = Fence::new(leader_election);
            let Some(client) = counted_client(&metrics, &fence).await else {
                return ExitCode::FAILURE;
            };
            // One shutdown signal for every part: standing by, the controllers.
            let (stopping, shutdown) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                terminated().await;
                tracing::info!("shutting down");
                let _ = stopping.send(true);
            });
            tracing::info!(?namespaces, concurrency, ?max_total_workers, "starting");
            let health = Arc::new(Health::default());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let endpoint = tokio::spawn(server::serve(
                listener,
                metrics.clone(),
                health.clone(),
                async {
                    let _ = stopped.await;
                },
            ));
            let readiness = tokio::spawn(server::watch_readiness(
                client.clone(),
                health.clone(),
                metrics.clone(),
            ));
            let lease = leader_election.then(|| LeaseConfig {
                namespace: lease_namespace,
                name: lease_name,
                identity: identity.unwrap_or_else(default_identity),
                duration: lease_duration,
                grace: (lease_duration / 3).clamp(1, 5),
            });
            let options = imagebuild_operator::controller::Options {
                namespaces,
                concurrency,
                registry_concurrency,
                max_total_workers,
                fence: fence.clone(),
                identity: lease.as_ref().map(|l| l.identity.clone()),
            };
            let mut keeper = None;
            if let Some(lease) = &lease {
                health.set_standby(true);
                metrics.set_leader(false);
                // The lease is renewed on a client of its own, which the fence spares.
                let Some(renewer) = self::client().await else {
                    return ExitCode::FAILURE;
                };
                let mut stopping = shutdown.clone();
                let leadership = tokio::select! {
                    l = Leadership::acquire(renewer, lease, fence.clone()) => l,
                    _ = stopping.wait_for(|stop| *stop) => {
                        tracing::info!("stopped while standing by");
                        readiness.abort();
                        let _ = stop.send(());
                        let _ = endpoint.await;
                        return ExitCode::SUCCESS;
                    }
                };
                let mut leadership = match leadership {
                    Ok(l) => l,
                    Err(err) => {
                        tracing::error!("{err}");
                        return ExitCode::FAILURE;
                    }
                };
                health.set_standby(false);
                let (release, released) = tokio::sync::oneshot::channel::<()>();
                let metrics = metrics.clone();
                keeper = Some((
                    release,
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = leadership.lost() => {
                                // The fence already refuses every write; the process
                                // restarts as a candidate.
                                metrics.set_leader(false);
                                tracing::error!("lost the lease: exiting");
                                std::process::exit(1);
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
            imagebuild_operator::controller::run(client, options, metrics, health, shutdown).await;
            if let Some((release, task)) = keeper {
                let _ = release.send(());
                let _ = task.await;
            }
            readiness.abort();
            let _ = stop.send(());
            match endpoint.await {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(err)) => {
                    tracing::error!(error = %err, "the metrics endpoint failed");
                    ExitCode::FAILURE
                }
                Err(err) => {
                    tracing::error!(error = %err, "the metrics endpoint panicked");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Plan {
            file,
            instances_file,
            output,
            show,
        } => {
            let result = async {
                let run = cli::load_run(&file)?;
                let plan = cli::plan_run(&run, instances_file.as_ref()).await?;
                Ok::<_, cli::CliError>(cli::render(&run, &plan, output, show))
            };
            print(result.await)
        }
        Command::Summary {
            run,
            namespace,
            format,
        } => {
            let Some(client) = client().await else {
                return ExitCode::FAILURE;
            };
            print(cli::summary(client, &run, namespace.as_deref(), format).await)
        }
    }
}

/// A client from the kubeconfig or the pod's service account; `None` (said on stderr)
/// if there is none.
async fn client() -> Option<kube::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match kube::Client::try_default().await {
        Ok(c) => Some(c),
        Err(err) => {
            eprintln!("error: cannot reach the Kubernetes API: {err}");
            None
        }
    }
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

/// Like [`client`], with every request counted in `metrics`, and writes refused past
/// `fence`.
async fn counted_client(metrics: &Arc<Metrics>, fence: &Arc<Fence>) -> Option<kube::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let built = async {
        let config = kube::Config::infer().await.map_err(|e| e.to_string())?;
        let builder = kube::client::ClientBuilder::try_from(config).map_err(|e| e.to_string())?;
        Ok::<_, String>(
            builder
                .with_layer(&CountRequests(metrics.clone()))
                .with_layer(&FenceLayer(fence.clone()))
                .build(),
        )
    };
    match built.await {
        Ok(c) => Some(c),
        Err(err) => {
            eprintln!("error: cannot reach the Kubernetes API: {err}");
            None
        }
    }
}

fn print(result: Result<String, cli::CliError>) -> ExitCode {
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
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
