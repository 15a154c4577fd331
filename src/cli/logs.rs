//! `logs`: the full build logs of a run's failed builds, read from the pods the operator
//! keeps for them (`--kept-failed-pods`, labelled `imagebuild.dev/kept-log=<job>`, owned
//! by the run). Where no pod was kept (the cap reached, the node lost, no pod ran), the
//! last lines the manifest recorded stand in, and the output says so.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, LogParams};
use kube::{Api, ResourceExt};

use super::CliError;
use super::runs::Target;
use crate::manifest::{Manifest, Record, RecordStatus};
use crate::names::{ANNOTATION_ATTEMPT, LABEL_KEPT_LOG, LABEL_RUN_UID};
use crate::schedule::FailureClass;

/// Whose logs.
pub enum Which {
    /// Every image that failed for good.
    Failed,
    /// The images of one instance (and the failed images it is built on).
    Instance(String),
}

/// The records `which` selects, by Job name, in plan order of phase.
fn select<'a>(
    records: &'a BTreeMap<String, Record>,
    which: &Which,
) -> Vec<(&'a String, &'a Record)> {
    let mut chosen: Vec<(&String, &Record)> = match which {
        Which::Failed => records
            .iter()
            .filter(|(_, r)| r.status == RecordStatus::Failed)
            .collect(),
        Which::Instance(id) => {
            let own: Vec<(&String, &Record)> = records
                .iter()
                .filter(|(_, r)| r.instance_id.as_deref() == Some(id.as_str()))
                .collect();
            // The base (and so on) an image of the instance is built on, if it failed.
            let inputs: Vec<&str> = own
                .iter()
                .filter_map(|(_, r)| r.base_image.as_deref())
                .collect();
            let failed_inputs = records.iter().filter(|(_, r)| {
                r.status == RecordStatus::Failed
                    && r.instance_id.is_none()
                    && r.tags.iter().any(|t| inputs.contains(&&**t))
            });
            failed_inputs.chain(own).collect()
        }
    };
    let order = |phase: &str| match phase {
        "builder" => 0,
        "base" => 1,
        "assembly" => 2,
        _ => 3,
    };
    chosen.sort_by_key(|(job, r)| (order(r.phase.as_str()), (*job).clone()));
    chosen
}

fn subject(record: &Record) -> &str {
    record
        .instance_id
        .as_deref()
        .or(record.base_image.as_deref())
        .unwrap_or("builder")
}

fn attempt(pod: &Pod) -> u32 {
    pod.annotations()
        .get(ANNOTATION_ATTEMPT)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0)
}

/// The logs of the builds `which` selects, each under a header line.
pub async fn logs(target: &Target, which: &Which) -> Result<String, CliError> {
    let run = target.get().await?;
    let records = Manifest::read(&target.client, &run).await?;
    let chosen = select(&records, which);
    if chosen.is_empty() {
        return Err(CliError::Usage(match which {
            Which::Failed => format!("{} has no failed image", target.name),
            Which::Instance(id) => format!("{} has no record of instance {id}", target.name),
        }));
    }
    let pods: Api<Pod> = Api::namespaced(target.client.clone(), &target.namespace);
    let selector = format!(
        "{LABEL_RUN_UID}={},{LABEL_KEPT_LOG}",
        run.uid().unwrap_or_default()
    );
    let kept = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| target.explain("list pods", e))?;
    let mut by_job: BTreeMap<String, Vec<Pod>> = BTreeMap::new();
    for pod in kept.items {
        if let Some(job) = pod.labels().get(LABEL_KEPT_LOG).cloned() {
            by_job.entry(job).or_default().push(pod);
        }
    }
    let mut out = String::new();
    for (job, record) in chosen {
        let header = format!(
            "==> {} {} ({:?}, {}) <==",
            record.phase.as_str(),
            subject(record),
            record.status,
            record.failure_class.as_deref().unwrap_or("no failure")
        );
        out.push_str(&header);
        out.push('\n');
        let mut attempts = by_job.remove(job).unwrap_or_default();
        attempts.sort_by_key(attempt);
        if attempts.is_empty() {
            let why = if record.failure_class.as_deref()
                == Some(FailureClass::DependencyFailed.as_str())
            {
                "not built: an image it is built on failed (its log is above, or ask for it)"
            } else {
                "no log kept (no pod ran, its node was lost, or the run's cap of kept pods was reached); the manifest's last lines"
            };
            out.push_str(&format!(
                "[{why}]\n{}\n",
                record.error.as_deref().unwrap_or("")
            ));
            continue;
        }
        for pod in attempts {
            let name = pod.name_any();
            let container = pod
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .map(|c| c.name.clone());
            out.push_str(&format!("--- attempt {} (pod {name}) ---\n", attempt(&pod)));
            let params = LogParams {
                container,
                ..LogParams::default()
            };
            match pods.logs(&name, &params).await {
                Ok(text) => out.push_str(&text),
                Err(kube::Error::Api(e)) if e.code == 403 => {
                    return Err(target.explain("get pods/log", kube::Error::Api(e)));
                }
                Err(e) => out.push_str(&format!(
                    "[the pod's log cannot be read: {e}]\n{}\n",
                    record.error.as_deref().unwrap_or("")
                )),
            }
            if !out.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    Ok(out)
}
