//! Carrying out a decision against the API server: the run's Jobs read from the
//! operator's stores, Jobs deleted (finished, stale) and created, a bounded number of
//! requests at a time.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, ResourceExt};

use super::context::{Ctx, Error};
use super::observe::LiveJob;
use crate::api::ImageBuildRun;
use crate::names::LABEL_KEPT_LOG;
use crate::plan::Plan;
use crate::schedule::{Action, NodeState};

/// API requests a reconcile has in flight at once.
pub(super) const API_CONCURRENCY: usize = 16;

/// The run's Jobs (and their pods) from the stores, by name: a pod that ended (the
/// watch's) over one waiting for a node (the last list's, which may be older).
pub fn live_jobs(ctx: &Ctx, ns: &str, uid: &str) -> BTreeMap<String, LiveJob> {
    // Gathered in the stores' name order, then built in one pass (`from_iter` sorts, and
    // a sorted list is one run), rather than a search down the tree per Job.
    let mut gathered = Vec::new();
    for store in &ctx.jobs {
        store.for_run(ns, uid, |name, job| {
            if job.metadata.deletion_timestamp.is_none() {
                let live = LiveJob {
                    job: job.clone(),
                    pod: None,
                    listed: None,
                };
                gathered.push((name.to_string(), live));
            }
        });
    }
    let mut jobs = BTreeMap::from_iter(gathered);
    for unplaced in &ctx.unplaced {
        unplaced.for_run(ns, uid, |pod, at| attach(&mut jobs, pod, Some(at)));
    }
    for store in &ctx.pods {
        store.for_run(ns, uid, |_, pod| attach(&mut jobs, pod, None));
    }
    jobs
}

/// Gives `pod` to its Job, found by name, if that Job owns it: the pod of an earlier Job
/// of the name (a retry's) may still be in the store.
fn attach(
    jobs: &mut BTreeMap<String, LiveJob>,
    pod: &Arc<Pod>,
    listed: Option<chrono::DateTime<chrono::Utc>>,
) {
    let job = pod.labels().get("batch.kubernetes.io/job-name");
    let Some(live) = job.and_then(|name| jobs.get_mut(name)) else {
        return;
    };
    let owner = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true));
    if owner.is_none_or(|o| live.job.metadata.uid.as_ref() == Some(&o.uid)) {
        live.pod = Some(pod.clone());
        live.listed = listed;
    }
}

/// The run's pods kept for their logs, from the store.
fn kept_pods(ctx: &Ctx, ns: &str, uid: &str) -> usize {
    let mut kept = 0;
    for store in &ctx.pods {
        store.for_run(ns, uid, |_, pod| {
            kept += usize::from(pod.labels().contains_key(LABEL_KEPT_LOG));
        });
    }
    kept
}

/// The `(job, pod)` of each failed build whose Job `actions` delete.
pub fn failed_pods(
    plan: &Plan,
    actions: &[Action],
    states: &[NodeState],
    live: &BTreeMap<String, LiveJob>,
) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::DeleteJob { node } => Some(*node),
            _ => None,
        })
        .filter(|&node| matches!(states[node], NodeState::Finished { result: Err(_), .. }))
        .filter_map(|node| {
            let job = &plan.nodes[node].job_name;
            let pod = live.get(job)?.pod.as_ref()?.metadata.name.clone()?;
            Some((job.clone(), pod))
        })
        .collect()
}

/// Keeps the pods `(job, pod)` of failed builds past their Jobs, for their logs, as far as
/// the run's room (`--kept-failed-pods`) goes: each leaves its Job (no Job label or owner,
/// so neither the Job's deletion nor a Job of the same name takes it) and belongs to the
/// run, which takes it when deleted. Best effort: a pod that cannot be kept goes with its
/// Job, and the build's record still has its last lines.
pub async fn keep_pods(ctx: &Ctx, run: &ImageBuildRun, pods: Vec<(String, String)>) {
    if pods.is_empty() {
        return;
    }
    let (ns, uid) = (
        run.namespace().unwrap_or_default(),
        run.uid().unwrap_or_default(),
    );
    let room = (ctx.config.kept_failed_pods as usize).saturating_sub(kept_pods(ctx, &ns, &uid));
    let Some(owner) = kube::Resource::owner_ref(run, &()) else {
        return;
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let requests = pods.into_iter().take(room).map(|(job, pod)| {
        let api = api.clone();
        let owner = owner.clone();
        async move {
            let body = serde_json::json!({"metadata": {
                "labels": {
                    LABEL_KEPT_LOG: job,
                    "job-name": null,
                    "batch.kubernetes.io/job-name": null,
                    "controller-uid": null,
                    "batch.kubernetes.io/controller-uid": null,
                },
                "ownerReferences": [owner],
            }});
            if let Err(e) = api
                .patch(&pod, &PatchParams::default(), &Patch::Merge(body))
                .await
            {
                tracing::warn!(%pod, error = %e, "the pod of a failed build could not be kept for its log");
            }
            Ok(())
        }
    });
    let _ = all_ok(requests).await;
}

/// Sends a create or delete of a Job and reads only its status: the Job the API server
/// echoes back (several KiB, twice for every image) is skipped by the parser, not built.
pub(super) async fn send(
    api: &Api<Job>,
    request: Result<http::Request<Vec<u8>>, kube::core::request::Error>,
) -> Result<(), kube::Error> {
    let request = request.map_err(kube::Error::BuildRequest)?;
    let client = api.clone().into_client();
    client
        .request::<serde::de::IgnoredAny>(request)
        .await
        .map(drop)
}

/// Deletes the Jobs `names` (one already gone is fine).
pub async fn delete_jobs(api: &Api<Job>, names: Vec<String>) -> Result<(), Error> {
    let url = kube::core::Request::new(api.resource_url());
    let requests = names.into_iter().map(|name| {
        let (api, url) = (api, &url);
        async move { Ok(delete(api, url, &name, None).await?) }
    });
    all_ok(requests).await
}

/// Deletes Job `name`, and if `uid` is given that Job only: a newer Job of the same name
/// (a retry's) is left alone. One already gone is fine.
pub(super) async fn delete(
    api: &Api<Job>,
    url: &kube::core::Request,
    name: &str,
    uid: Option<&str>,
) -> Result<(), kube::Error> {
    let mut params = DeleteParams::background();
    if let Some(uid) = uid {
        params = params.preconditions(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        });
    }
    match send(api, url.delete(name, &params)).await {
        // Gone, or (its uid not the one given) gone and replaced.
        Err(kube::Error::Api(e)) if e.code == 404 || (e.code == 409 && uid.is_some()) => Ok(()),
        result => result,
    }
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

#[cfg(test)]
pub(super) mod tests {
    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::json;

    use super::*;
    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    pub(in crate::controller) fn api() -> (Api<Job>, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (
            Api::namespaced(kube::Client::new(service, "ns"), "ns"),
            handle,
        )
    }

    /// Answers a request about Job `name` with status `code`: the Job, or a Status.
    pub(in crate::controller) fn respond(
        send: tower_test::mock::SendResponse<Response<Body>>,
        name: &str,
        code: u16,
    ) {
        let body = if code < 300 {
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}})
        } else {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": "no", "reason": "x", "code": code})
        };
        send.send_response(
            Response::builder()
                .status(StatusCode::from_u16(code).unwrap())
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }

    /// Answers every request with the status `answer` gives for its method and Job name;
    /// the requests seen, as "METHOD name".
    pub(in crate::controller) async fn serve(
        mut handle: Handle,
        answer: impl Fn(&str, &str) -> u16,
    ) -> Vec<String> {
        let mut seen = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().to_string();
            let name = match request.uri().path().rsplit_once("/jobs") {
                Some((_, "")) => {
                    let body = request.into_body().collect_bytes().await.unwrap();
                    let job: Job = serde_json::from_slice(&body).unwrap();
                    job.name_any()
                }
                Some((_, rest)) => rest.trim_start_matches('/').to_string(),
                None => panic!("not a Job request: {}", request.uri()),
            };
            respond(send, &name, answer(&method, &name));
            seen.push(format!("{method} {name}"));
        }
        seen.sort();
        seen
    }

    #[tokio::test]
    async fn a_job_reads_its_own_pod_not_an_earlier_jobs_of_its_name() {
        use crate::controller::runstore;
        use crate::names::LABEL_RUN_UID;
        use kube::runtime::watcher;
        let meta = |name: &str, uid: &str, owner: Option<&str>, job: &str| {
            let mut labels = json!({LABEL_RUN_UID: "run-uid"});
            if !job.is_empty() {
                labels["batch.kubernetes.io/job-name"] = json!(job);
            }
            let owners: Vec<_> = owner
                .map(|uid| {
                    json!({"apiVersion": "batch/v1", "kind": "Job", "name": job,
                                   "uid": uid, "controller": true})
                })
                .into_iter()
                .collect();
            json!({"name": name, "namespace": "ns", "uid": uid, "labels": labels,
                   "ownerReferences": owners})
        };
        let job: std::sync::Arc<Job> =
            serde_json::from_value(json!({"metadata": meta("j", "new", None, "")})).unwrap();
        let pod = |name: &str, owner: &str| -> std::sync::Arc<Pod> {
            serde_json::from_value(json!({"metadata": meta(name, name, Some(owner), "j")})).unwrap()
        };
        // Both orders of the store: the earlier Job's pod is never taken.
        for pods in [
            [pod("old-pod", "old"), pod("new-pod", "new")],
            [pod("new-pod", "new"), pod("old-pod", "old")],
        ] {
            let (jobs, mut jobs_writer) = runstore::store::<Job>();
            jobs_writer.apply(&watcher::Event::Apply(job.clone()));
            let (pod_store, mut pods_writer) = runstore::store::<Pod>();
            for pod in pods {
                pods_writer.apply(&watcher::Event::Apply(pod));
            }
            let (ctx, _handle) =
                crate::controller::context::tests::ctx(vec![jobs], vec![pod_store]);
            let live = live_jobs(&ctx, "ns", "run-uid");
            let pod = live["j"].pod.as_ref().map(|p| p.name_any());
            assert_eq!(pod.as_deref(), Some("new-pod"));
        }
    }

    #[tokio::test]
    async fn a_pod_that_ended_stands_over_its_listing_as_waiting() {
        use crate::controller::runstore;
        use crate::controller::unplaced::Unplaced;
        use crate::names::LABEL_RUN_UID;
        use kube::runtime::watcher;
        let object = |name: &str, phase: &str| {
            json!({"metadata": {"name": name, "namespace": "ns", "uid": name,
                "labels": {LABEL_RUN_UID: "run-uid", "batch.kubernetes.io/job-name": name}},
                "status": {"phase": phase}})
        };
        let (jobs, mut jobs_writer) = runstore::store::<Job>();
        for name in ["waiting", "ended"] {
            let job = serde_json::from_value(object(name, "")).unwrap();
            jobs_writer.apply(&watcher::Event::Apply(Arc::new(job)));
        }
        let pod = |name: &str, phase: &str| -> Arc<Pod> {
            Arc::new(serde_json::from_value(object(name, phase)).unwrap())
        };
        // The list (older) has both pods waiting; the watch has since told one's end.
        let unplaced = Unplaced::default();
        let at = chrono::Utc::now();
        unplaced.replace(at, vec![pod("waiting", "Pending"), pod("ended", "Pending")]);
        let (pods, mut pods_writer) = runstore::store::<Pod>();
        pods_writer.apply(&watcher::Event::Apply(pod("ended", "Failed")));
        let (mut ctx, _handle) = crate::controller::context::tests::ctx(vec![jobs], vec![pods]);
        ctx.unplaced = vec![unplaced];
        let live = live_jobs(&ctx, "ns", "run-uid");
        let seen = |name: &str| {
            let live = &live[name];
            let phase = live
                .pod
                .as_ref()
                .and_then(|p| p.status.as_ref()?.phase.clone());
            (phase.unwrap_or_default(), live.listed)
        };
        assert_eq!(seen("waiting"), ("Pending".into(), Some(at)));
        assert_eq!(seen("ended"), ("Failed".into(), None));
    }

    #[tokio::test]
    async fn a_job_gone_or_there_already_is_fine_and_other_errors_are_not() {
        // Deleting: one already gone (404) is fine; every delete is sent even after a 500,
        // and the 500 is the result.
        let (jobs, handle) = api();
        let server = tokio::spawn(serve(handle, |_, name| match name {
            "gone" => 404,
            "broken" => 500,
            _ => 200,
        }));
        let names = ["a", "gone", "b"].map(String::from).to_vec();
        delete_jobs(&jobs, names).await.unwrap();
        let err = delete_jobs(&jobs, vec!["broken".into(), "c".into()]).await;
        assert!(err.is_err());
        drop(jobs);
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            [
                "DELETE a",
                "DELETE b",
                "DELETE broken",
                "DELETE c",
                "DELETE gone"
            ]
        );
    }
}
