//! Reading the world into the scheduler's terms: every node's state from the run's
//! records and its live Jobs (with their pods). Pure: the reconciler gathers the inputs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;

use crate::job::{Outcome, outcome};
use crate::manifest::{Harvest, Records};
use crate::names::ANNOTATION_ATTEMPT;
use crate::plan::{NodeId, Plan};
use crate::schedule::{Failure, FailureClass, NodeState};

/// A Job of the run and its pod, if the pod exists.
#[derive(Clone, Debug)]
pub struct LiveJob {
    /// The Job, as the store holds it (shared, not copied for each reconcile).
    pub job: Arc<Job>,
    /// Its (only) pod.
    pub pod: Option<Arc<Pod>>,
    /// When the pod was last listed as waiting for a node, if that list is where it
    /// comes from: the pod is as it was then. `None` for a pod the watch told.
    pub listed: Option<DateTime<Utc>>,
}

/// A pod the scheduler cannot place.
#[derive(Clone, Debug, PartialEq)]
pub struct Unschedulable {
    /// The node whose build it is.
    pub node: NodeId,
    /// The scheduler's message.
    pub message: String,
    /// Since when.
    pub since: DateTime<Utc>,
    /// When it was seen so (the time of the list it comes from, or now).
    pub seen: DateTime<Utc>,
}

/// The world in the scheduler's terms.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Every node's state, indexed like `plan.nodes`.
    pub states: Vec<NodeState>,
    /// What each finished Job told.
    pub outcomes: BTreeMap<NodeId, Harvest>,
    /// Jobs with nothing left to tell (their node is recorded as final, or not in the
    /// plan): to delete.
    pub stale_jobs: Vec<String>,
    /// Pods waiting for a node, however long.
    pub unschedulable: Vec<Unschedulable>,
    /// The nodes whose state was read from a Job (or a Job just made), not a record.
    pub overlaid: Vec<NodeId>,
}

/// Builds the states. A Job unschedulable for longer than `pending_timeout` counts as
/// failed with `Unschedulable`. `dispatched` holds the attempt of each Job this process
/// created (by name): until the store shows that attempt's Job, its node is running it.
/// A store lags its watch, and a reconcile can start between two of its events: without
/// this, a Job just created would look not yet made, and its slot free (to another run
/// sharing `--max-total-workers`, or to a lower attempt's finished Job).
pub fn observe(
    plan: &Plan,
    records: &Records,
    jobs: &BTreeMap<String, LiveJob>,
    dispatched: &BTreeMap<String, u32>,
    pending_timeout: Duration,
    now: DateTime<Utc>,
) -> Observed {
    let mut states = records.states().to_vec();
    // (Records of no plan, as in a test, say nothing of any node.)
    states.resize(plan.nodes.len(), NodeState::NEW);
    over(plan, states, jobs, dispatched, pending_timeout, now)
}

/// [`observe`], over `states`: every node's state as its record gives it (a reconcile's
/// are kept from the one before, `working`). Only the nodes with a Job, or a Job just
/// made, are read here: few (the builds in flight), each found by the plan's index,
/// sorted by node and merged.
pub fn over(
    plan: &Plan,
    states: Vec<NodeState>,
    jobs: &BTreeMap<String, LiveJob>,
    dispatched: &BTreeMap<String, u32>,
    pending_timeout: Duration,
    now: DateTime<Utc>,
) -> Observed {
    let mut observed = Observed {
        states,
        ..Default::default()
    };
    let mut unknown = Vec::new();
    let mut live_of: Vec<(NodeId, &LiveJob)> = Vec::with_capacity(jobs.len());
    for (name, live) in jobs {
        match plan.node_of(name) {
            Some(id) => live_of.push((id, live)),
            None => unknown.push(name.clone()),
        }
    }
    live_of.sort_unstable_by_key(|&(id, _)| id);
    let mut made: Vec<(NodeId, u32)> = dispatched
        .iter()
        .filter_map(|(name, &attempt)| Some((plan.node_of(name)?, attempt)))
        .collect();
    made.sort_unstable_by_key(|&(id, _)| id);
    let mut live_of = live_of.into_iter().peekable();
    let mut made = made.into_iter().peekable();
    loop {
        let id = match (live_of.peek(), made.peek()) {
            (Some(&(a, _)), Some(&(b, _))) => a.min(b),
            (Some(&(a, _)), None) => a,
            (None, Some(&(b, _))) => b,
            (None, None) => break,
        };
        let live = live_of.next_if(|&(at, _)| at == id).map(|(_, live)| live);
        let made = made
            .next_if(|&(at, _)| at == id)
            .map(|(_, attempt)| attempt);
        let Some(slot) = observed.states.get_mut(id) else {
            continue;
        };
        let unseen = made.filter(|&attempt| live.is_none_or(|l| attempt_of(&l.job) < attempt));
        let state = match (slot.is_terminal(), live, unseen) {
            (true, live, _) => {
                if live.is_some() {
                    observed.stale_jobs.push(plan.nodes[id].job_name.clone());
                }
                continue;
            }
            (false, _, Some(attempt)) => NodeState::Running { attempt },
            (false, Some(live), None) => job_state(id, live, pending_timeout, now, &mut observed),
            (false, None, None) => continue,
        };
        observed.states[id] = state;
        observed.overlaid.push(id);
    }
    // Jobs of no node of the plan (an older plan's) go too.
    observed.stale_jobs.extend(unknown);
    observed
}

fn job_state(
    id: NodeId,
    live: &LiveJob,
    pending_timeout: Duration,
    now: DateTime<Utc>,
    observed: &mut Observed,
) -> NodeState {
    let attempt = attempt_of(&live.job);
    let started = live
        .job
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|t| to_chrono(&t.0));
    if let Some(outcome) = outcome(&live.job, live.pod.as_deref()) {
        let result = match &outcome {
            Outcome::Succeeded { .. } => Ok(()),
            Outcome::Failed { failure, .. } => Err(Box::new(failure.clone())),
        };
        let finished = finished_at(&live.job);
        observed
            .outcomes
            .insert(id, harvest(live, outcome, started, finished));
        return NodeState::Finished {
            attempt,
            at: finished.unwrap_or(now),
            result,
        };
    }
    if let Some((message, since)) = live.pod.as_deref().and_then(unschedulable) {
        // Waited out as of when the pod was seen so: a list taken before the timeout
        // says nothing of the time since (the pod may have been placed meanwhile).
        let seen = live.listed.unwrap_or(now);
        observed.unschedulable.push(Unschedulable {
            node: id,
            message: message.clone(),
            since,
            seen,
        });
        let limit = chrono::Duration::from_std(pending_timeout).unwrap_or(chrono::Duration::MAX);
        if seen - since >= limit {
            let failure = Failure::new(FailureClass::Unschedulable, message);
            let outcome = Outcome::Failed {
                failure: failure.clone(),
                node: None,
            };
            observed
                .outcomes
                .insert(id, harvest(live, outcome, started, Some(now)));
            return NodeState::Finished {
                attempt,
                at: now,
                result: Err(Box::new(failure)),
            };
        }
    }
    NodeState::Running { attempt }
}

/// The attempt a Job was created for (its annotation; 1 if missing).
pub fn attempt_of(job: &Job) -> u32 {
    job.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_ATTEMPT))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1)
}

fn harvest(
    live: &LiveJob,
    outcome: Outcome,
    started: Option<DateTime<Utc>>,
    finished: Option<DateTime<Utc>>,
) -> Harvest {
    let pod = live.pod.as_deref().map(|p| {
        let ns = p.metadata.namespace.as_deref().unwrap_or_default();
        format!("{ns}/{}", p.metadata.name.as_deref().unwrap_or_default())
    });
    Harvest {
        outcome,
        started,
        finished,
        pod,
        pod_pending: live.pod.as_deref().and_then(pod_pending),
    }
}

/// Seconds from a pod's creation to its first container starting (running or already
/// terminated); `None` if it never started.
pub fn pod_pending(pod: &Pod) -> Option<f64> {
    let created = to_chrono(&pod.metadata.creation_timestamp.as_ref()?.0);
    let started = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .filter_map(|c| {
            let state = c.state.as_ref()?;
            let at = match (&state.running, &state.terminated) {
                (Some(r), _) => r.started_at.as_ref(),
                (None, Some(t)) => t.started_at.as_ref(),
                _ => None,
            }?;
            Some(to_chrono(&at.0))
        })
        .min()?;
    Some(((started - created).num_milliseconds().max(0) as f64) / 1000.0)
}

/// When node `id` became ready to build: the latest of the run's start, its inputs'
/// records, and the end of its backoff if it waits for a retry.
pub fn ready_since(
    plan: &Plan,
    records: &Records,
    id: NodeId,
    run_started: DateTime<Utc>,
) -> DateTime<Utc> {
    let node = &plan.nodes[id];
    let inputs = node
        .deps
        .iter()
        .filter_map(|&d| records.node(d))
        .map(|r| r.time);
    let backoff = records.node(id).and_then(|r| r.not_before);
    inputs
        .chain(backoff)
        .fold(run_started, |latest, t| latest.max(t))
}

fn finished_at(job: &Job) -> Option<DateTime<Utc>> {
    let status = job.status.as_ref()?;
    if let Some(t) = &status.completion_time {
        return Some(to_chrono(&t.0));
    }
    status
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Failed" && c.status == "True")
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| to_chrono(&t.0))
}

/// The scheduler's message and since when, for a pod it cannot place.
pub fn unschedulable(pod: &Pod) -> Option<(String, DateTime<Utc>)> {
    let status = pod.status.as_ref()?;
    let cond = status
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
    if cond.reason.as_deref() != Some("Unschedulable") {
        return None;
    }
    let since = cond
        .last_transition_time
        .as_ref()
        .map(|t| to_chrono(&t.0))
        .or_else(|| {
            pod.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| to_chrono(&t.0))
        })?;
    Some((cond.message.clone().unwrap_or_default(), since))
}

/// k8s-openapi's timestamps (jiff) as chrono's.
pub fn to_chrono(t: &k8s_openapi::jiff::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond() as u32).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instances::RawInstance;
    use crate::job::{BuildReport, JobInputs, build_job};
    use crate::manifest::Record;
    use serde_json::json;

    const SPEC: &str = r#"
instances: {list: [a__a-1], upstreamImage: "docker.io/up/{{ repo }}_1776_{{ name }}:latest"}
builder: {context: {inline: "FROM scratch"}, image: "r.io/builder:1"}
base: {context: {inline: "FROM scratch"}, image: "r.io/base:{{ customTag }}"}
assembly: {context: {inline: "FROM scratch"}, image: "r.io/asm:{{ instanceId }}"}
"#;

    fn plan() -> (crate::api::ImageBuildRunSpec, Plan) {
        let spec: crate::api::ImageBuildRunSpec = serde_yaml_ng::from_str(SPEC).unwrap();
        let raw = [RawInstance {
            id: "a__a-1".into(),
            image: None,
        }];
        let plan = crate::plan::build("run", &spec, &raw).unwrap();
        (spec, plan)
    }

    /// The Job of node `id` with `status`, and a pod with `pod_status`.
    fn live(
        spec: &crate::api::ImageBuildRunSpec,
        plan: &Plan,
        id: NodeId,
        status: serde_json::Value,
        pod_status: serde_json::Value,
    ) -> LiveJob {
        let inputs = JobInputs {
            run_name: "run",
            namespace: "ns",
            run_uid: "uid",
            spec,
            build_timeout: Duration::from_secs(60),
        };
        let mut job = build_job(&inputs, &plan.nodes[id], 2, &BTreeMap::new()).unwrap();
        job.status = Some(serde_json::from_value(status).unwrap());
        let pod: Pod = serde_json::from_value(
            json!({"spec": {"nodeName": "kwok-large-0", "containers": []}, "status": pod_status}),
        )
        .unwrap();
        LiveJob {
            job: Arc::new(job),
            pod: Some(Arc::new(pod)),
            listed: None,
        }
    }

    #[test]
    fn nodes_without_jobs_or_records_are_new() {
        let (_, plan) = plan();
        let o = observe(
            &plan,
            &Records::default(),
            &BTreeMap::new(),
            &BTreeMap::new(),
            Duration::from_secs(60),
            Utc::now(),
        );
        assert_eq!(o.states, vec![NodeState::NEW; plan.nodes.len()]);
        assert!(o.stale_jobs.is_empty() && o.outcomes.is_empty());
    }

    #[test]
    fn a_recorded_node_wins_over_its_leftover_job() {
        let (spec, plan) = plan();
        let name = plan.nodes[0].job_name.clone();
        let records =
            BTreeMap::from([(name.clone(), Record::built(&plan.nodes[0], 1, Utc::now()))]);
        let jobs = BTreeMap::from([
            (name.clone(), live(&spec, &plan, 0, json!({}), json!({}))),
            (
                "not-in-plan".to_string(),
                live(&spec, &plan, 1, json!({}), json!({})),
            ),
        ]);
        let o = observe(
            &plan,
            &Records::test_of(&plan, &records),
            &jobs,
            &BTreeMap::new(),
            Duration::from_secs(60),
            Utc::now(),
        );
        assert_eq!(o.states[0], NodeState::Succeeded);
        assert_eq!(o.stale_jobs, vec![name, "not-in-plan".to_string()]);
    }

    #[test]
    fn a_complete_job_is_finished_with_its_report() {
        let (spec, plan) = plan();
        let report = r#"{"exitCode":0,"digest":"sha256:ff","buildSeconds":9,"pushSeconds":1,"errorTail":""}"#;
        let job = live(
            &spec,
            &plan,
            0,
            json!({"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:00:10Z",
                   "conditions": [{"type": "Complete", "status": "True"}]}),
            json!({"containerStatuses": [{"name": "build", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                   "state": {"terminated": {"exitCode": 0, "message": report}}}]}),
        );
        let jobs = BTreeMap::from([(plan.nodes[0].job_name.clone(), job)]);
        let o = observe(
            &plan,
            &Records::default(),
            &jobs,
            &BTreeMap::new(),
            Duration::from_secs(60),
            Utc::now(),
        );
        let at = DateTime::parse_from_rfc3339("2026-01-01T00:00:10Z")
            .unwrap()
            .to_utc();
        assert_eq!(
            o.states[0],
            NodeState::Finished {
                attempt: 2,
                at,
                result: Ok(())
            }
        );
        let Harvest {
            outcome, started, ..
        } = &o.outcomes[&0];
        assert_eq!(started.unwrap().to_rfc3339(), "2026-01-01T00:00:00+00:00");
        let Outcome::Succeeded {
            report: Some(BuildReport { digest, .. }),
            node,
        } = outcome
        else {
            panic!("{outcome:?}");
        };
        assert_eq!(
            (digest.as_str(), node.as_deref()),
            ("sha256:ff", Some("kwok-large-0"))
        );
    }

    #[test]
    fn each_node_reads_its_own_job_whatever_the_names_order() {
        let (spec, plan) = plan();
        assert_eq!(plan.nodes.len(), 3);
        let done = json!({"completionTime": "2026-01-01T00:00:10Z",
                          "conditions": [{"type": "Complete", "status": "True"}]});
        // Node 2's Job running, node 0's complete, node 1's just created.
        let jobs = BTreeMap::from([
            (
                plan.nodes[2].job_name.clone(),
                live(&spec, &plan, 2, json!({}), json!({})),
            ),
            (
                plan.nodes[0].job_name.clone(),
                live(&spec, &plan, 0, done, json!({})),
            ),
        ]);
        let dispatched = BTreeMap::from([(plan.nodes[1].job_name.clone(), 1)]);
        let o = observe(
            &plan,
            &Records::default(),
            &jobs,
            &dispatched,
            Duration::from_secs(60),
            Utc::now(),
        );
        assert!(
            matches!(
                o.states[0],
                NodeState::Finished {
                    attempt: 2,
                    result: Ok(()),
                    ..
                }
            ),
            "{:?}",
            o.states[0]
        );
        assert_eq!(o.states[1], NodeState::Running { attempt: 1 });
        assert_eq!(o.states[2], NodeState::Running { attempt: 2 });
        assert_eq!(o.outcomes.keys().collect::<Vec<_>>(), vec![&0]);
    }

    #[test]
    fn a_job_created_but_not_yet_in_the_store_is_running() {
        let (spec, plan) = plan();
        let name = plan.nodes[0].job_name.clone();
        let observe_with = |jobs: &BTreeMap<String, LiveJob>, attempt: u32| {
            let dispatched = BTreeMap::from([(name.clone(), attempt)]);
            observe(
                &plan,
                &Records::default(),
                jobs,
                &dispatched,
                Duration::from_secs(60),
                Utc::now(),
            )
        };
        // Not in the store at all.
        let o = observe_with(&BTreeMap::new(), 1);
        assert_eq!(o.states[0], NodeState::Running { attempt: 1 });
        assert_eq!(o.states[1], NodeState::NEW, "only the created Job's node");
        // The store still has the failed attempt 2 when attempt 3 was created: nothing is
        // harvested twice, and the slot is taken.
        let failed = BTreeMap::from([(
            name.clone(),
            live(
                &spec,
                &plan,
                0,
                json!({"conditions": [{"type": "Failed", "status": "True"}]}),
                json!({}),
            ),
        )]);
        let o = observe_with(&failed, 3);
        assert_eq!(o.states[0], NodeState::Running { attempt: 3 });
        assert!(o.outcomes.is_empty());
        // Once the store has the attempt created, the Job tells.
        let o = observe_with(&failed, 2);
        assert!(
            matches!(
                o.states[0],
                NodeState::Finished {
                    attempt: 2,
                    result: Err(_),
                    ..
                }
            ),
            "{:?}",
            o.states[0]
        );
    }

    #[test]
    fn an_unschedulable_pod_fails_its_node_after_the_pending_timeout() {
        let (spec, plan) = plan();
        let since = Utc::now() - chrono::Duration::minutes(20);
        let pod_status = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/4 nodes are available", "lastTransitionTime": since.to_rfc3339()}]});
        let jobs = BTreeMap::from([(
            plan.nodes[0].job_name.clone(),
            live(&spec, &plan, 0, json!({}), pod_status),
        )]);
        let o = observe(
            &plan,
            &Records::default(),
            &jobs,
            &BTreeMap::new(),
            Duration::from_secs(3600),
            Utc::now(),
        );
        assert_eq!(o.states[0], NodeState::Running { attempt: 2 });
        assert_eq!(o.unschedulable[0].message, "0/4 nodes are available");
        let o = observe(
            &plan,
            &Records::default(),
            &jobs,
            &BTreeMap::new(),
            Duration::from_secs(900),
            Utc::now(),
        );
        let NodeState::Finished { result: Err(f), .. } = &o.states[0] else {
            panic!("{:?}", o.states[0]);
        };
        assert_eq!(f.class, FailureClass::Unschedulable);
        assert_eq!(f.message, "0/4 nodes are available");
    }

    #[test]
    fn a_listed_pod_fails_its_node_only_if_its_list_came_after_the_pending_timeout() {
        let (spec, plan) = plan();
        let now = Utc::now();
        let since = now - chrono::Duration::seconds(20);
        let pod_status = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/4 nodes are available", "lastTransitionTime": since.to_rfc3339()}]});
        let observed = |listed: chrono::Duration| {
            let mut live = live(&spec, &plan, 0, json!({}), pod_status.clone());
            live.listed = Some(since + listed);
            let jobs = BTreeMap::from([(plan.nodes[0].job_name.clone(), live)]);
            let timeout = Duration::from_secs(15);
            observe(
                &plan,
                &Records::default(),
                &jobs,
                &BTreeMap::new(),
                timeout,
                now,
            )
        };
        // Listed 10 s after it was found unplaceable: 20 s ago, but the list says nothing
        // of the last 10 s (it may have been placed since).
        let early = observed(chrono::Duration::seconds(10));
        assert_eq!(early.states[0], NodeState::Running { attempt: 2 });
        assert_eq!(early.unschedulable.len(), 1, "still told as waiting");
        // A list past the timeout still showed it unplaced: it failed.
        let late = observed(chrono::Duration::seconds(15));
        let NodeState::Finished { result: Err(f), .. } = &late.states[0] else {
            panic!("{:?}", late.states[0]);
        };
        assert_eq!(f.class, FailureClass::Unschedulable);
    }

    #[test]
    fn pod_pending_is_creation_to_container_start() {
        let pod = |status: serde_json::Value| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"},
                "status": status
            }))
            .unwrap()
        };
        let running = pod(
            json!({"containerStatuses": [{"name": "b", "image": "i", "ready": true,
            "restartCount": 0, "state": {"running": {"startedAt": "2026-01-01T00:00:07Z"}}}]}),
        );
        assert_eq!(pod_pending(&running), Some(7.0));
        let done = pod(
            json!({"containerStatuses": [{"name": "b", "image": "i", "ready": false,
            "restartCount": 0, "state": {"terminated": {"exitCode": 0,
            "startedAt": "2026-01-01T00:01:00Z"}}}]}),
        );
        assert_eq!(pod_pending(&done), Some(60.0));
        assert_eq!(pod_pending(&pod(json!({"phase": "Pending"}))), None);
    }

    #[test]
    fn an_image_is_ready_when_its_inputs_are_recorded_and_its_backoff_is_over() {
        let (_, plan) = plan();
        let t0: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let at = |s: i64| t0 + chrono::Duration::seconds(s);
        let asm = plan.nodes.len() - 1;
        assert!(!plan.nodes[asm].deps.is_empty());
        // Nothing recorded: ready since the run started.
        assert_eq!(ready_since(&plan, &Records::default(), asm, t0), t0);
        let mut records = BTreeMap::new();
        for (i, &d) in plan.nodes[asm].deps.iter().enumerate() {
            let node = &plan.nodes[d];
            records.insert(
                node.job_name.clone(),
                Record::built(node, 1, at(10 * (i as i64 + 1))),
            );
        }
        let last_input = at(10 * plan.nodes[asm].deps.len() as i64);
        assert_eq!(
            ready_since(&plan, &Records::test_of(&plan, &records), asm, t0),
            last_input
        );
        let failure = Failure::new(FailureClass::Evicted, "evicted");
        let node = &plan.nodes[asm];
        records.insert(
            node.job_name.clone(),
            Record::failed(node, &failure, 1, Some(at(500)), at(100)),
        );
        assert_eq!(
            ready_since(&plan, &Records::test_of(&plan, &records), asm, t0),
            at(500)
        );
    }
}
