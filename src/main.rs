//! The `imagebuild-operator` command: `run` is the operator (`operator::run`); `plan` prints
//! the build plan of an ImageBuildRun file; `summary` reports on a run from its manifest
//! (as `kubectl imagebuild plan` and `summary` do).

// Data never panics the operator: every unwrap, expect or panic outside tests carries a
// written reason next to it (see clippy.toml for tests).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use imagebuild_operator::cli::{self, SummaryFormat};
use imagebuild_operator::operator;

#[derive(Parser)]
#[command(
    version,
    about = "Builds a benchmark's container image fleet as Kubernetes Jobs"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator: reconcile ImageBuildRuns into build Jobs until SIGTERM.
    Run(operator::Options),
    /// Resolve a run's instances and print its build plan.
    Plan(cli::PlanArgs),
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

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: imagebuild_operator::memory::Allocator =
    imagebuild_operator::memory::Allocator {};

fn main() -> ExitCode {
    imagebuild_operator::memory::tune();
    // One thread: the operator's work per event is small (a few percent of a core at
    // 10,000 instances), and one thread spares the wakes and hand-offs between threads
    // of a multi-threaded runtime (docs/architecture.md, "The runtime: one thread").
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(start()),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn start() -> ExitCode {
    let result = match Args::parse().command {
        Command::Run(options) => {
            return match operator::run(options).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Plan(args) => args.run().await,
        Command::Summary {
            run,
            namespace,
            format,
        } => match operator::plain_client().await {
            Ok(client) => match cli::summary(client, &run, namespace.as_deref(), format).await {
                // A run that did not succeed: the report, and a failing exit status.
                Ok(answer) if !answer.ok => {
                    println!("{}", answer.text);
                    return ExitCode::FAILURE;
                }
                other => other.map(|a| a.text),
            },
            Err(err) => Err(cli::CliError::Client(err.to_string())),
        },
    };
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        // As the kubectl plugin: 1 says the run did not succeed, 2 that the command failed.
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
    }
}
