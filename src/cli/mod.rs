//! The commands besides the operator, shared by `imagebuild-operator` and the kubectl
//! plugin `kubectl-imagebuild`: `plan` resolves a run's instances, builds its plan and
//! prints it, as text for people or as JSON (every node) for tools; `summary` reads a run
//! and its manifest from the cluster and reports on it (see `summary`); `runs` changes a
//! run (cancel, suspend, resume, retry); `watch` follows one (status, wait); `logs`
//! prints the full logs of its failed builds.

pub mod logs;
pub mod runs;
pub mod watch;

use std::path::{Path, PathBuf};

use kube::ResourceExt;
use serde::Serialize;

use crate::api::ImageBuildRun;
use crate::instances::{self, InstanceError};
use crate::manifest::{Manifest, ManifestError};
use crate::plan::{self, Phase, Plan, PlanError};

/// Why the plan command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The run file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The instance list could not be resolved.
    #[error(transparent)]
    Instances(#[from] InstanceError),
    /// The plan could not be made.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The cluster could not be reached or refused a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The run does not exist.
    #[error("ImageBuildRun {name} not found in namespace {namespace}")]
    NotFound {
        /// The run.
        name: String,
        /// Its namespace.
        namespace: String,
    },
    /// The run's manifest could not be read.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// No client for the cluster (no kubeconfig, no service account).
    #[error("{0}")]
    Client(String),
    /// The user's credentials do not allow the request.
    #[error("no permission to {verb} in namespace {namespace}: {message}")]
    Forbidden {
        /// What was refused.
        verb: String,
        /// Where.
        namespace: String,
        /// The API server's words.
        message: String,
    },
    /// The API server refused the change (a schema rule).
    #[error("refused: {0}")]
    Refused(String),
    /// The run ended: what was asked makes no sense any more.
    #[error("cannot {what} {name}: it has ended ({phase})")]
    Finished {
        /// The run.
        name: String,
        /// Its phase.
        phase: String,
        /// What was asked.
        what: String,
    },
    /// The request makes no sense for this run.
    #[error("{0}")]
    Usage(String),
    /// The run did not end in time.
    #[error("{0}")]
    Timeout(String),
}

/// A command's answer: what to print, and whether it is a success (the exit status).
pub struct Answer {
    /// What to print.
    pub text: String,
    /// The command succeeded: for `summary` and `wait`, the run Succeeded.
    pub ok: bool,
}

/// Output format of `summary`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SummaryFormat {
    /// Markdown, for people and CI job summaries.
    Markdown,
    /// The stable JSON form (`docs/manifest.md`).
    Json,
}

/// Reads run `name` (in `namespace`, else the client's default namespace) and its
/// manifest, and renders its summary; `ok` only when the run Succeeded.
pub async fn summary(
    client: kube::Client,
    name: &str,
    namespace: Option<&str>,
    format: SummaryFormat,
) -> Result<Answer, CliError> {
    let target = runs::Target::new(client, name, namespace);
    let run = target.get().await?;
    let report = report(&target.client, &run, &target.namespace).await?;
    #[allow(
        clippy::expect_used,
        reason = "a report has string keys and no custom Serialize: serializing it cannot fail"
    )]
    let text = match format {
        SummaryFormat::Markdown => report.markdown(),
        SummaryFormat::Json => serde_json::to_string_pretty(&report).expect("a summary serializes"),
    };
    Ok(Answer {
        text,
        ok: runs::phase(&run) == Some(crate::api::RunPhase::Succeeded),
    })
}

/// The summary of `run` from its manifest.
pub async fn report(
    client: &kube::Client,
    run: &ImageBuildRun,
    namespace: &str,
) -> Result<crate::summary::Summary, CliError> {
    let records = Manifest::read(client, run).await?;
    Ok(crate::summary::summarize(
        &run.name_any(),
        namespace,
        run.status.as_ref(),
        records.values(),
        chrono::Utc::now(),
    ))
}

/// The `plan` command's arguments (both binaries have it).
#[derive(clap::Args)]
pub struct PlanArgs {
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
}

impl PlanArgs {
    /// Loads the run, resolves its instances, plans it and renders the plan.
    pub async fn run(self) -> Result<String, CliError> {
        let run = load_run(&self.file)?;
        let plan = plan_run(&run, self.instances_file.as_ref()).await?;
        Ok(render(&run, &plan, self.output, self.show))
    }
}

/// Output format of `plan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A summary for people.
    Text,
    /// Every node, as JSON.
    Json,
}

/// Reads an ImageBuildRun from a YAML file.
pub fn load_run(path: &Path) -> Result<ImageBuildRun, CliError> {
    let fail = |message: String| CliError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let value: serde_json::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| fail(e.to_string()))?;
    if value["kind"] != "ImageBuildRun" {
        return Err(fail(format!(
            "expected kind ImageBuildRun, got {}",
            value["kind"]
        )));
    }
    serde_json::from_value(value).map_err(|e| fail(format!("not a valid ImageBuildRun: {e}")))
}

/// Resolves the instances of `run` (from `instances_file` when given) and builds its plan.
pub async fn plan_run(
    run: &ImageBuildRun,
    instances_file: Option<&PathBuf>,
) -> Result<Plan, CliError> {
    let raw = match instances_file {
        Some(path) => instances::from_file(path)?,
        None => {
            // Only a ConfigMap source reads the cluster; the others must work without one.
            let client = match run.spec.instances.config_map {
                Some(_) => kube::Client::try_default().await.ok(),
                None => None,
            };
            let namespace = run.namespace().unwrap_or_else(|| "default".into());
            instances::fetch(&run.spec.instances, &namespace, client.as_ref()).await?
        }
    };
    let selected = instances::select(raw, &run.spec.instances)?;
    Ok(plan::build(&run.name_any(), &run.spec, &selected)?)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonNode<'a> {
    #[serde(flatten)]
    node: &'a plan::Node,
    dependencies: Vec<&'a str>,
}

/// Renders `plan` in `format`; text shows the first `show` nodes.
pub fn render(run: &ImageBuildRun, plan: &Plan, format: Format, show: usize) -> String {
    match format {
        Format::Json => {
            let nodes: Vec<JsonNode<'_>> = plan
                .nodes
                .iter()
                .map(|node| JsonNode {
                    node,
                    dependencies: node
                        .deps
                        .iter()
                        .map(|&d| plan.nodes[d].job_name.as_str())
                        .collect(),
                })
                .collect();
            let doc = serde_json::json!({ "run": run.name_any(), "nodes": nodes });
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        }
        Format::Text => {
            let mut out = format!(
                "ImageBuildRun {}: maxWorkers {}\n",
                run.name_any(),
                run.spec.max_workers
            );
            for (label, phase) in [
                ("builder", Phase::Builder),
                ("bases", Phase::Base),
                ("assemblies", Phase::Assembly),
                ("post-assembly layers", Phase::PostAssembly),
            ] {
                out.push_str(&format!("  {:<21} {}\n", label, plan.count(phase)));
            }
            out.push_str(&format!(
                "first {} of {} nodes:\n",
                show.min(plan.nodes.len()),
                plan.nodes.len()
            ));
            for node in plan.nodes.iter().take(show) {
                out.push_str(&format!(
                    "  {:<12} {:<63} {}\n",
                    node.phase.as_str(),
                    node.job_name,
                    node.image
                ));
            }
            out
        }
    }
}
