//! `kubectl imagebuild`: the kubectl plugin for ImageBuildRuns. It acts with the user's
//! kubeconfig and RBAC (`KUBECONFIG`, `--context`, `-n`).
//!
//! Exit status: 0 done (for `wait` and `summary`: the run Succeeded); 1 the run did not
//! succeed (`wait`, `summary`); 2 an error (no such run, no permission, a timeout, a
//! request that makes no sense for the run).

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use imagebuild_operator::cli::runs::{self, Target};
use imagebuild_operator::cli::{self, Answer, CliError, SummaryFormat, logs, watch};

#[derive(Parser)]
#[command(
    name = "kubectl-imagebuild",
    bin_name = "kubectl imagebuild",
    version,
    about = "Follow, wait for, retry, cancel and report on ImageBuildRuns"
)]
struct Args {
    /// The namespace of the run (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig context to use (default: the current one).
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a run's progress per image phase; with --watch, follow it until it ends.
    Status {
        /// The ImageBuildRun.
        run: String,
        /// Follow the run with live progress bars (a line per change when not a terminal).
        #[arg(short, long)]
        watch: bool,
    },
    /// Wait until a run ends: exit 0 if it Succeeded, 1 with its failures otherwise.
    Wait {
        /// The ImageBuildRun.
        run: String,
        /// Give up after this long (exit 2), e.g. 30m or 6h.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Resolve a run file's instances and print its build plan (nothing is sent).
    Plan(cli::PlanArgs),
    /// Report on a run from its manifest; exit 1 unless it Succeeded.
    Summary {
        /// The ImageBuildRun.
        run: String,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = SummaryFormat::Markdown)]
        format: SummaryFormat,
    },
    /// Print the full build logs of a run's failed images, or of one instance's images.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["failed", "instance"])))]
    Logs {
        /// The ImageBuildRun.
        run: String,
        /// Every image that failed for good.
        #[arg(long)]
        failed: bool,
        /// The images of this instance (and the failed images it is built on).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Build a run's failed images again (all of them, or those of some instances).
    Retry {
        /// The ImageBuildRun.
        run: String,
        /// Every failed image (the default).
        #[arg(long, conflicts_with = "instance")]
        failed: bool,
        /// Only this instance's failed images (and the failed images it is built on).
        #[arg(long)]
        instance: Vec<String>,
    },
    /// Stop a run for good: no new builds, builds in flight stopped, records kept.
    Cancel {
        /// The ImageBuildRun.
        run: String,
    },
    /// Stop dispatching new builds; builds in flight finish.
    Suspend {
        /// The ImageBuildRun.
        run: String,
    },
    /// Dispatch builds again after `suspend`.
    Resume {
        /// The ImageBuildRun.
        run: String,
    },
}

async fn client(context: Option<String>) -> Result<kube::Client, CliError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let options = kube::config::KubeConfigOptions {
        context,
        ..Default::default()
    };
    let config = match options.context {
        Some(_) => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| e.to_string()),
        None => kube::Config::infer().await.map_err(|e| e.to_string()),
    }
    .map_err(|e| CliError::Client(format!("no Kubernetes configuration: {e}")))?;
    kube::Client::try_from(config).map_err(|e| CliError::Client(e.to_string()))
}

async fn execute(args: Args) -> Result<Answer, CliError> {
    let done = |text: String| Answer { text, ok: true };
    let namespace = args.namespace.as_deref();
    let target = |client, run: &str| Target::new(client, run, namespace);
    Ok(match args.command {
        Command::Plan(args) => done(args.run().await?),
        Command::Status { run, watch } => {
            let target = target(client(args.context).await?, &run);
            done(watch::status(&target, watch).await?)
        }
        Command::Wait { run, timeout } => {
            let target = target(client(args.context).await?, &run);
            let waited = watch::wait(&target, timeout).await?;
            Answer {
                text: waited.text,
                ok: waited.succeeded,
            }
        }
        Command::Summary { run, format } => {
            cli::summary(client(args.context).await?, &run, namespace, format).await?
        }
        Command::Retry {
            run,
            failed: _,
            instance,
        } => {
            let target = target(client(args.context).await?, &run);
            done(runs::retry(&target, &instance).await?)
        }
        Command::Logs {
            run,
            failed: _,
            instance,
        } => {
            let which = match instance {
                Some(id) => logs::Which::Instance(id),
                None => logs::Which::Failed,
            };
            done(logs::logs(&target(client(args.context).await?, &run), &which).await?)
        }
        Command::Cancel { run } => {
            done(runs::cancel(&target(client(args.context).await?, &run)).await?)
        }
        Command::Suspend { run } => {
            done(runs::suspend(&target(client(args.context).await?, &run), true).await?)
        }
        Command::Resume { run } => {
            done(runs::suspend(&target(client(args.context).await?, &run), false).await?)
        }
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    match execute(Args::parse()).await {
        Ok(answer) => {
            println!("{}", answer.text);
            if answer.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
    }
}
