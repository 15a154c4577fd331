//! Carrying out a decision against the API server: the run's Jobs read from the
//! operator's stores, Jobs deleted (finished, stale) and created, a bounded number of
//! requests at a time.

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};

use super::actions::NewJob;
use super::context::{Ctx, Error};
use super::observe::LiveJob;
use crate::metrics::Metrics;
use crate::names::LABEL_RUN_UID;

/// API requests a reconcile has in flight at once.
const API_CONCURRENCY: usize = 16;

/// The run's Jobs (and their pods) from the stores, by name.
pub fn live_jobs(ctx: &Ctx, ns: &str, uid: &str) -> BTreeMap<String, LiveJob> {
    let ours = |meta: &kube::api::ObjectMeta| {
        meta.namespace.as_deref() == Some(ns)
            && meta
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_RUN_UID))
                .map(String::as_str)
                == Some(uid)
    };
    let mut pods: HashMap<String, Pod> = HashMap::new();
    for pod in ctx.pods.iter().flat_map(|s| s.state()) {
        if !ours(&pod.metadata) {
            continue;
        }
        if let Some(job) = pod.labels().get("batch.kubernetes.io/job-name") {
            pods.insert(job.clone(), (*pod).clone());
        }
    }
    let mut jobs = BTreeMap::new();
    for job in ctx.jobs.iter().flat_map(|s| s.state()) {
        if !ours(&job.metadata) || job.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = job.name_any();
        let pod = pods.remove(&name);
        jobs.insert(
            name,
            LiveJob {
                job: (*job).clone(),
                pod,
            },
        );
    }
    jobs
}

/// Deletes the Jobs `names` (one already gone is fine).
pub async fn delete_jobs(api: &Api<Job>, names: Vec<String>) -> Result<(), Error> {
    all_ok(names.into_iter().map(|name| {
        let api = api.clone();
        async move {
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
    }))
    .await
}

/// Creates `jobs` (one that exists already, from before a restart, is fine) and tells
/// the metrics how long each image waited.
pub async fn create_jobs(
    api: &Api<Job>,
    jobs: Vec<NewJob>,
    metrics: &Metrics,
) -> Result<(), Error> {
    all_ok(jobs.into_iter().map(|new| {
        let api = api.clone();
        async move {
            match api.create(&PostParams::default(), &new.job).await {
                Ok(_) => {
                    metrics.job_created(new.phase.as_str(), new.waited);
                    Ok(())
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
    }))
    .await
}

/// Runs `requests`, [`API_CONCURRENCY`] at a time, until all are done; the first error.
async fn all_ok<F>(requests: impl Iterator<Item = F>) -> Result<(), Error>
where
    F: std::future::Future<Output = Result<(), Error>>,
{
    let mut results = futures::stream::iter(requests).buffer_unordered(API_CONCURRENCY);
    let mut first = Ok(());
    while let Some(result) = results.next().await {
        if first.is_ok() {
            first = result;
        }
    }
    first
}
