//! The build pods no node has taken yet, listed every few seconds. The pod watch follows
//! only pods that ended (most of a pod's events are its progress, which no reconcile
//! reads); a pod waiting for a node matters only when the scheduler cannot place it (the
//! run's `Stalled` condition, and its pending timeout), which a look every few seconds
//! tells well enough.
//!
//! A list is a few seconds old when a reconcile reads it, so each pod comes with the time
//! of its list: a pod fails its pending timeout only if a list taken after that timeout
//! still showed it unplaced (`observe`), never because an old list did.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Resource, ResourceExt};

use super::context::Wakes;
use super::observe;
use super::runstore::RunStore;
use super::trim::Lean;
use crate::names::{LABEL_RUN_UID, MANAGER};

/// How often the pods waiting for a node are listed.
pub const LIST_INTERVAL: Duration = Duration::from_secs(5);

/// The pods no node has taken.
const UNPLACED: &str = "status.phase=Pending,spec.nodeName=";

/// Pods by namespace and run uid.
type ByRun = HashMap<(String, String), Vec<Arc<Pod>>>;

/// The last list.
#[derive(Default)]
struct Listed {
    /// When it was asked for: what it shows is at least that recent.
    at: Option<DateTime<Utc>>,
    pods: ByRun,
}

/// The last list of the pods waiting for a node (cheap to clone; every clone reads the
/// same list). Empty until the first list is in.
#[derive(Clone, Default)]
pub struct Unplaced(Arc<RwLock<Listed>>);

impl Unplaced {
    /// Calls `each` with every pod of run `uid` in `ns` in the last list, and the time of
    /// that list.
    pub fn for_run(&self, ns: &str, uid: &str, mut each: impl FnMut(&Arc<Pod>, DateTime<Utc>)) {
        let listed = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(at) = listed.at else {
            return;
        };
        let key = (ns.to_string(), uid.to_string());
        for pod in listed.pods.get(&key).into_iter().flatten() {
            each(pod, at);
        }
    }

    /// Replaces the list with `pods`, asked for at `at`.
    pub(super) fn replace(&self, at: DateTime<Utc>, pods: Vec<Arc<Pod>>) {
        let mut by_run = ByRun::new();
        for pod in pods {
            let meta = pod.meta();
            let run = meta.labels.as_ref().and_then(|l| l.get(LABEL_RUN_UID));
            if let (Some(ns), Some(run)) = (meta.namespace.clone(), run.cloned()) {
                by_run.entry((ns, run)).or_default().push(pod);
            }
        }
        let mut listed = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *listed = Listed {
            at: Some(at),
            pods: by_run,
        };
    }
}

/// Lists the operator's pods waiting for a node in `ns` (or all namespaces) every
/// [`LIST_INTERVAL`], into `unplaced`, until the process ends; after each list wakes
/// every run with a pod the scheduler cannot place (its pending timeout is looked at
/// then), and every run that had one at the list before (its `Stalled` condition may
/// clear). A list that fails keeps the last one (older, so it fails no pod sooner), and
/// the next look tries again.
pub async fn list_every(
    client: kube::Client,
    ns: Option<String>,
    unplaced: Unplaced,
    jobs: RunStore<Job>,
    wakes: Wakes,
) {
    let api: Api<Lean<Pod>> = match &ns {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let params = ListParams::default()
        .labels(&format!("app.kubernetes.io/managed-by={MANAGER}"))
        .fields(UNPLACED);
    let mut told = BTreeSet::new();
    let mut tick = tokio::time::interval(LIST_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let at = Utc::now();
        let pods: Vec<Arc<Pod>> = match api.list(&params).await {
            Ok(list) => list.items.into_iter().map(|p| Arc::new(p.0)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "the pods waiting for a node could not be listed");
                continue;
            }
        };
        // The list in before the wakes: a woken reconcile reads this one.
        let waiting = waiting_runs(&pods, &jobs);
        unplaced.replace(at, pods);
        for (ns, run) in told.union(&waiting) {
            wakes.wake(ns, run);
        }
        told = waiting;
    }
}

/// The runs (namespace, name) with a pod the scheduler cannot place, through each pod's
/// Job (the Job's name is the pod's label; the run is the Job's owner).
fn waiting_runs(pods: &[Arc<Pod>], jobs: &RunStore<Job>) -> BTreeSet<(String, String)> {
    pods.iter()
        .filter(|pod| observe::unschedulable(pod).is_some())
        .filter_map(|pod| {
            let ns = pod.metadata.namespace.as_deref()?;
            let job = jobs.get(ns, pod.labels().get("batch.kubernetes.io/job-name")?)?;
            let owner = job
                .owner_references()
                .iter()
                .find(|o| o.controller == Some(true))?;
            Some((ns.to_string(), owner.name.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;
    use serde_json::json;

    use super::*;
    use crate::controller::runstore;

    fn pod(name: &str, run_uid: &str, job: &str, scheduled: &str) -> Arc<Pod> {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns",
                "labels": {LABEL_RUN_UID: run_uid, "batch.kubernetes.io/job-name": job}},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled",
                "status": scheduled, "reason": "Unschedulable", "message": "0/4 nodes",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
        }))
        .unwrap()
    }

    fn job(name: &str, run: &str) -> Arc<Job> {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns",
            "labels": {LABEL_RUN_UID: format!("{run}-uid")},
            "ownerReferences": [{"apiVersion": "imagebuild.dev/v1alpha1",
                "kind": "ImageBuildRun", "name": run, "uid": format!("{run}-uid"),
                "controller": true}]}}))
        .unwrap()
    }

    #[test]
    fn the_pods_are_read_by_run_with_the_time_of_their_list() {
        let unplaced = Unplaced::default();
        let seen = |unplaced: &Unplaced, uid: &str| {
            let mut seen = Vec::new();
            unplaced.for_run("ns", uid, |p, at| seen.push((p.name_any(), at)));
            seen
        };
        assert_eq!(
            seen(&unplaced, "a-uid"),
            [],
            "nothing before the first list"
        );
        let at = Utc::now();
        unplaced.replace(
            at,
            vec![
                pod("a1", "a-uid", "ja1", "False"),
                pod("b1", "b-uid", "jb1", "False"),
                pod("a2", "a-uid", "ja2", "True"),
            ],
        );
        assert_eq!(
            seen(&unplaced, "a-uid"),
            [("a1".to_string(), at), ("a2".to_string(), at)]
        );
        assert_eq!(seen(&unplaced, "b-uid"), [("b1".to_string(), at)]);
        // The next list replaces the last one whole.
        let later = at + chrono::Duration::seconds(5);
        unplaced.replace(later, vec![pod("b1", "b-uid", "jb1", "False")]);
        assert_eq!(seen(&unplaced, "a-uid"), []);
        assert_eq!(seen(&unplaced, "b-uid"), [("b1".to_string(), later)]);
    }

    #[test]
    fn the_runs_woken_are_those_whose_pods_the_scheduler_cannot_place() {
        let (jobs, mut writer) = runstore::store::<Job>();
        for (name, run) in [("ja1", "a"), ("ja2", "a"), ("jb1", "b"), ("jc1", "c")] {
            writer.apply(&Event::Apply(job(name, run)));
        }
        let pods = [
            // Two of run a's: one wake.
            pod("a1", "a-uid", "ja1", "False"),
            pod("a2", "a-uid", "ja2", "False"),
            // Not yet looked at by the scheduler (or placed since): nothing to tell.
            pod("b1", "b-uid", "jb1", "True"),
            // A pod whose Job the store does not have (deleted): no run to wake.
            pod("d1", "d-uid", "jd1", "False"),
            pod("c1", "c-uid", "jc1", "False"),
        ];
        let runs: Vec<_> = waiting_runs(&pods, &jobs).into_iter().collect();
        let run = |name: &str| ("ns".to_string(), name.to_string());
        assert_eq!(runs, [run("a"), run("c")]);
    }
}
