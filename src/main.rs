//! The `imagebuild-operator` command: `plan` prints the build plan of an ImageBuildRun file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use imagebuild_operator::cli::{self, Format};

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
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
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
            match result.await {
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
    }
}
