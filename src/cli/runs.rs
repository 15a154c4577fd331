//! The commands that read or change one run through the API server, as the user's
//! kubeconfig allows: `cancel`, `suspend`, `resume` and `retry` patch the run's spec (the
//! operator does the rest); `get` reads it. API errors become [`CliError`]s that say what
//! was refused and why.

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use super::CliError;
use crate::api::{ImageBuildRun, RunPhase};
use crate::manifest::{Manifest, RecordStatus};

/// One run, by name, in a namespace (the kubeconfig's when none is given).
pub struct Target {
    /// The client, with the user's credentials.
    pub client: Client,
    /// The run's namespace.
    pub namespace: String,
    /// The run's name.
    pub name: String,
}

impl Target {
    /// `name` in `namespace`, else in the client's default namespace.
    pub fn new(client: Client, name: &str, namespace: Option<&str>) -> Target {
        let namespace = namespace.unwrap_or(client.default_namespace()).to_string();
        Target {
            client,
            namespace,
            name: name.to_string(),
        }
    }

    /// The runs of the namespace.
    pub fn api(&self) -> Api<ImageBuildRun> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Says what an API error means for this run: not found, not allowed, or the error.
    pub fn explain(&self, verb: &str, err: kube::Error) -> CliError {
        match err {
            kube::Error::Api(e) if e.code == 404 => CliError::NotFound {
                name: self.name.clone(),
                namespace: self.namespace.clone(),
            },
            kube::Error::Api(e) if e.code == 403 => CliError::Forbidden {
                verb: verb.to_string(),
                namespace: self.namespace.clone(),
                message: e.message.clone(),
            },
            kube::Error::Api(e) if e.code == 422 => CliError::Refused(e.message.clone()),
            other => CliError::Kube(other),
        }
    }

    /// The run.
    pub async fn get(&self) -> Result<ImageBuildRun, CliError> {
        self.api()
            .get(&self.name)
            .await
            .map_err(|e| self.explain("get ImageBuildRuns", e))
    }

    async fn patch(&self, body: serde_json::Value) -> Result<ImageBuildRun, CliError> {
        self.api()
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(body))
            .await
            .map_err(|e| self.explain("patch ImageBuildRuns", e))
    }
}

/// The run's phase, if the operator has set one.
pub fn phase(run: &ImageBuildRun) -> Option<RunPhase> {
    run.status.as_ref().and_then(|s| s.phase)
}

/// Whether the run ended with its current spec: a final phase the operator set after
/// seeing the latest change (a retry just asked for reopens an ended run).
pub fn has_ended(run: &ImageBuildRun) -> bool {
    let observed = run.status.as_ref().and_then(|s| s.observed_generation);
    is_final(phase(run)) && observed == run.metadata.generation
}

/// Whether `phase` is one a run ends in.
pub fn is_final(phase: Option<RunPhase>) -> bool {
    phase.is_some_and(RunPhase::is_final)
}

fn finished_already(target: &Target, run: &ImageBuildRun, what: &str) -> CliError {
    CliError::Finished {
        name: target.name.clone(),
        phase: phase(run).map(|p| format!("{p:?}")).unwrap_or_default(),
        what: what.to_string(),
    }
}

/// Cancels the run: no new builds, builds in flight stopped, every record kept.
pub async fn cancel(target: &Target) -> Result<String, CliError> {
    let run = target.get().await?;
    if run.spec.cancel {
        return Ok(format!("{} is already cancelled", target.name));
    }
    if is_final(phase(&run)) {
        return Err(finished_already(target, &run, "cancel"));
    }
    target.patch(json!({"spec": {"cancel": true}})).await?;
    Ok(format!(
        "{} cancelled: no new builds; builds in flight are stopped; its manifest stays",
        target.name
    ))
}

/// Suspends (`true`) or resumes the run.
pub async fn suspend(target: &Target, suspend: bool) -> Result<String, CliError> {
    let run = target.get().await?;
    let what = if suspend { "suspend" } else { "resume" };
    if is_final(phase(&run)) || run.spec.cancel {
        return Err(finished_already(target, &run, what));
    }
    if run.spec.suspend == suspend {
        return Ok(format!("{} is already {what}d", target.name));
    }
    target.patch(json!({"spec": {"suspend": suspend}})).await?;
    Ok(if suspend {
        format!(
            "{} suspended: no new builds; builds in flight finish",
            target.name
        )
    } else {
        format!("{} resumed", target.name)
    })
}

/// Asks the run to build its failed images again: all of them, or those of `instances`
/// (and the failed images they are built on).
pub async fn retry(target: &Target, instances: &[String]) -> Result<String, CliError> {
    let run = target.get().await?;
    if run.spec.cancel {
        return Err(finished_already(target, &run, "retry"));
    }
    let records = Manifest::read(&target.client, &run).await?;
    let failed: Vec<&crate::manifest::Record> = records
        .values()
        .filter(|r| r.status == RecordStatus::Failed)
        .collect();
    if !instances.is_empty() {
        let known: std::collections::BTreeSet<&str> = records
            .values()
            .filter_map(|r| r.instance_id.as_deref())
            .collect();
        let unknown: Vec<&str> = instances
            .iter()
            .map(String::as_str)
            .filter(|i| !known.contains(i))
            .collect();
        if !unknown.is_empty() {
            return Err(CliError::Usage(format!(
                "{} has no record of instance(s) {}",
                target.name,
                unknown.join(", ")
            )));
        }
    }
    if failed.is_empty() {
        return Err(CliError::Usage(format!(
            "{} has no failed image to retry",
            target.name
        )));
    }
    let last = run
        .spec
        .retry_request
        .as_ref()
        .map(|r| r.id)
        .max(
            run.status
                .as_ref()
                .and_then(|s| s.last_retry.as_ref())
                .map(|r| r.id),
        )
        .unwrap_or(0);
    let id = last
        .checked_add(1)
        .ok_or_else(|| CliError::Usage("the run's retry ids are used up".into()))?;
    let list = (!instances.is_empty()).then_some(instances);
    target
        .patch(json!({"spec": {"retryRequest": {"id": id, "instances": list}}}))
        .await?;
    let scope = match list {
        Some(l) => format!("the failed images of {} instance(s)", l.len()),
        None => format!("{} failed image(s)", failed.len()),
    };
    Ok(format!(
        "{}: retry request {id} sent for {scope}; `status.lastRetry` says when it is honoured",
        target.name
    ))
}
