//! From the scheduler's actions to what a reconcile writes and creates, pure: the Jobs
//! of the `CreateJob` actions (a Job the spec cannot make turns its action into a failure
//! of that image), the records the actions make (written before they are carried out),
//! and which of those records the metrics count, in the metrics' plain values.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;

use crate::api::ImageBuildRun;
use crate::job::{JobError, JobInputs, JobTemplate, build_job};
use crate::manifest::{Harvest, Record, RecordStatus, Records};
use crate::metrics::{Counted, Outcome};
use crate::names::ANNOTATION_DISPATCHED_BY;
use crate::plan::{Node, NodeId, Phase, Plan, PodAnnotations};
use crate::schedule::{Action, Failure, FailureClass, NodeState, tally};

/// A Job to create, and what the metrics learn when it is.
pub struct NewJob {
    /// Its name.
    pub name: String,
    /// The attempt it makes.
    pub attempt: u32,
    /// The Job, as sent.
    pub job: serde_json::Value,
    /// Its image's phase.
    pub phase: Phase,
    /// How long its image waited for it (ready to created).
    pub waited: Duration,
}

/// What the run's Jobs are made with.
pub struct JobMaking<'a> {
    /// The run-level inputs.
    pub inputs: JobInputs<'a>,
    /// The dispatcher's identity (with leader election).
    pub identity: Option<&'a str>,
    /// When each node became ready.
    pub ready_since: &'a (dyn Fn(NodeId) -> DateTime<Utc> + Sync),
    /// Now.
    pub now: DateTime<Utc>,
}

/// The Jobs of the `CreateJob` actions. An action whose Job the spec cannot make (e.g. its
/// pod annotations fail to render for this attempt: `retry.attempts` was raised past what
/// the plan checked) becomes `MarkFailed` with `InvalidSpec`, so the image says why.
/// `compiled` is what the spec's Jobs are made with ([`Compiled::new`]).
pub fn jobs(
    plan: &Plan,
    actions: &mut [Action],
    making: &JobMaking<'_>,
    compiled: &mut Compiled,
) -> Vec<NewJob> {
    let mut out = Vec::new();
    for action in actions.iter_mut() {
        let Action::CreateJob { node: id, attempt } = *action else {
            continue;
        };
        let node = &plan.nodes[id];
        let made = compiled.job(&making.inputs, node, attempt);
        match made {
            Ok(mut job) => {
                if let Some(identity) = making.identity
                    && let Some(annotations) = job["metadata"]["annotations"].as_object_mut()
                {
                    annotations.insert(ANNOTATION_DISPATCHED_BY.into(), identity.into());
                }
                let waited = (making.now - (making.ready_since)(id))
                    .to_std()
                    .unwrap_or_default();
                out.push(NewJob {
                    name: node.job_name.clone(),
                    attempt,
                    job,
                    phase: node.phase,
                    waited,
                });
            }
            Err(message) => {
                *action = Action::MarkFailed {
                    node: id,
                    failure: Failure::new(
                        FailureClass::InvalidSpec,
                        format!("attempt {attempt}: {message}"),
                    ),
                };
            }
        }
    }
    out
}

/// What one generation of a spec makes its Jobs with, made once: its pod annotations
/// compiled (their templates' environment takes longer to make than a Job), or why they
/// cannot be, and each phase's Job template ([`JobTemplate`]) once a Job needs it.
pub struct Compiled {
    annotations: Result<PodAnnotations, String>,
    /// By phase: `Some(None)` if the spec does not define it.
    templates: [Option<Option<JobTemplate>>; 4],
}

impl Compiled {
    /// The pod annotations of `spec` compiled; no template made yet.
    pub fn new(spec: &crate::api::ImageBuildRunSpec) -> Compiled {
        Compiled {
            annotations: PodAnnotations::compile(spec).map_err(|e| e.to_string()),
            templates: Default::default(),
        }
    }

    /// The Job of `node`'s attempt `attempt` in the run of `inputs` (of the spec this
    /// was compiled from), as the JSON to send; why not, if the spec cannot make it.
    fn job(
        &mut self,
        inputs: &JobInputs<'_>,
        node: &Node,
        attempt: u32,
    ) -> Result<serde_json::Value, String> {
        let annotations = self.annotations.as_ref().map_err(String::clone)?;
        let pod = annotations
            .render(node, attempt)
            .map_err(|e| e.to_string())?;
        self.templates[tally::index(node.phase)]
            .get_or_insert_with(|| JobTemplate::new(inputs, node.phase))
            .as_ref()
            .ok_or_else(|| JobError::NoPhase(node.job_name.clone()))
            .and_then(|template| template.job(inputs, node, attempt, &pod))
            .map_err(|e| e.to_string())
    }
}

/// The Job of `node`'s attempt `attempt`, its pod annotations rendered; why not, if the
/// spec cannot make it.
pub fn make_job(
    annotations: &PodAnnotations,
    inputs: &JobInputs<'_>,
    node: &Node,
    attempt: u32,
) -> Result<Job, String> {
    let pod = annotations
        .render(node, attempt)
        .map_err(|e| e.to_string())?;
    build_job(inputs, node, attempt, &pod).map_err(|e| e.to_string())
}

/// What the actions record.
#[derive(Debug, Default)]
pub struct Recorded {
    /// The new records, by Job name.
    pub records: BTreeMap<String, Record>,
    /// Those that say something new (a retry harvested again from a Job not yet gone says
    /// nothing new), with their pods' pending time: what the metrics count.
    pub counted: Vec<(Record, Option<f64>)>,
}

/// The records `actions` make, given what is `known` (the manifest).
pub fn records(
    plan: &Plan,
    states: &[NodeState],
    outcomes: &BTreeMap<NodeId, Harvest>,
    actions: &[Action],
    known: &Records,
    now: DateTime<Utc>,
) -> Recorded {
    let mut out = Recorded::default();
    for action in actions {
        let Some((node, record)) = record_for(plan, states, outcomes, action, now) else {
            continue;
        };
        let job = &plan.nodes[node].job_name;
        let same = known
            .get(job)
            .is_some_and(|r| (r.status, r.attempt_count) == (record.status, record.attempt_count));
        if !same {
            let pending = outcomes.get(&node).and_then(|h| h.pod_pending);
            out.counted.push((record.clone(), pending));
        }
        out.records.insert(job.clone(), record);
    }
    out
}

/// The record an action writes, if it writes one.
fn record_for(
    plan: &Plan,
    states: &[NodeState],
    outcomes: &BTreeMap<NodeId, Harvest>,
    action: &Action,
    now: DateTime<Utc>,
) -> Option<(NodeId, Record)> {
    let attempt_of = |node: NodeId| match &states[node] {
        NodeState::Finished { attempt, .. } | NodeState::Running { attempt } => *attempt,
        NodeState::Waiting { attempts, .. } => *attempts,
        _ => 0,
    };
    let (node, record) = match action {
        Action::MarkSucceeded { node } => (
            *node,
            Record::built(&plan.nodes[*node], attempt_of(*node), now),
        ),
        Action::MarkFailed { node, failure } => (
            *node,
            Record::failed(&plan.nodes[*node], failure, attempt_of(*node), None, now),
        ),
        Action::RetryAt { node, at, failure } => (
            *node,
            Record::failed(
                &plan.nodes[*node],
                failure,
                attempt_of(*node),
                Some(*at),
                now,
            ),
        ),
        Action::MarkSkipped { node, reason } => {
            (*node, Record::skipped(&plan.nodes[*node], *reason, now))
        }
        Action::CreateJob { .. } | Action::DeleteJob { .. } => return None,
    };
    let record = match outcomes.get(&node) {
        Some(harvest) => record.with_job(harvest),
        None => record,
    };
    Some((node, record))
}

/// A record as the build counters take it.
pub fn counted(record: &Record, pod_pending: Option<f64>) -> Counted<'_> {
    let class = record.failure_class.as_deref().unwrap_or("BuildError");
    let outcome = match record.status {
        RecordStatus::Built => Outcome::Built,
        RecordStatus::Failed => Outcome::Failed { class },
        RecordStatus::Retrying => Outcome::Retried { class },
        RecordStatus::SkippedRemoteExists => Outcome::Skipped { not_needed: false },
        RecordStatus::SkippedNotNeeded => Outcome::Skipped { not_needed: true },
    };
    let seconds = match (record.started_at, record.finished_at) {
        (Some(start), Some(end)) => Some((end - start).num_milliseconds().max(0) as f64 / 1000.0),
        _ => None,
    };
    Counted {
        phase: record.phase.as_str(),
        outcome,
        ran: record.attempt_count > 0 && record.started_at.is_some(),
        seconds,
        pod_pending,
    }
}

/// A failed attempt is logged with its class and the last line of its error, so the
/// operator's log tells what went wrong without reading the manifest.
pub fn log_failure(run: &ImageBuildRun, record: &Record) {
    let class = record.failure_class.as_deref().unwrap_or_default();
    let error = record.error.as_deref().unwrap_or_default();
    let last = error.lines().last().unwrap_or_default();
    let image = record.image();
    match record.status {
        RecordStatus::Retrying => tracing::info!(
            run = %run.name_any(), image, attempt = record.attempt_count, class, error = last,
            "attempt failed; retrying"
        ),
        RecordStatus::Failed => tracing::info!(
            run = %run.name_any(), image, attempt = record.attempt_count, class, error = last,
            "image failed"
        ),
        _ => {}
    }
}

/// Deletes of every Job in flight (a cancelled run).
pub fn stop_all(states: &[NodeState]) -> Vec<Action> {
    states
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, NodeState::Running { .. }))
        .map(|(node, _)| Action::DeleteJob { node })
        .collect()
}

/// The states after [`stop_all`]'s deletes: the stopped images wait, not built.
pub fn stopped(states: &mut [NodeState]) {
    for state in states {
        if let NodeState::Running { attempt } = *state {
            *state = NodeState::Waiting {
                attempts: attempt.saturating_sub(1),
                not_before: None,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ImageBuildRunSpec;
    use crate::instances::RawInstance;
    use crate::schedule::SkipReason;

    fn spec(annotations: &str) -> ImageBuildRunSpec {
        serde_yaml_ng::from_str(&format!(
            r#"
instances: {{list: [a__a-1], upstreamImage: "r.io/up/{{{{ name }}}}:1"}}
builder: {{context: {{inline: "FROM scratch"}}, image: "r.io/b:1"}}
base: {{context: {{inline: "FROM scratch"}}, image: "r.io/base:{{{{ customTag }}}}"}}
assembly: {{context: {{inline: "FROM scratch"}}, image: "r.io/a:{{{{ instanceId | lower }}}}"}}
retry: {{attempts: 2}}
placement: {{podAnnotations: {annotations}}}
"#
        ))
        .unwrap()
    }

    fn plan(spec: &ImageBuildRunSpec) -> Plan {
        let raw = [RawInstance {
            id: "a__a-1".into(),
            image: None,
        }];
        crate::plan::build("run", spec, &raw).unwrap()
    }

    fn making(spec: &ImageBuildRunSpec) -> JobMaking<'_> {
        JobMaking {
            inputs: JobInputs {
                run_name: "run",
                namespace: "ns",
                run_uid: "uid",
                spec,
                build_timeout: Duration::from_secs(60),
            },
            identity: Some("operator-0"),
            ready_since: &|_| "2026-01-01T00:00:00Z".parse().unwrap(),
            now: "2026-01-01T00:00:07Z".parse().unwrap(),
        }
    }

    #[test]
    fn jobs_carry_their_dispatcher_and_wait_and_a_job_the_spec_cannot_make_fails_its_image() {
        // The plan checked attempts 1 and 2; a third (retry.attempts raised) fails.
        let spec = spec(r#"{example.com/try: "{% if attempt > 2 %}{{ nope }}{% endif %}x"}"#);
        let plan = plan(&spec);
        let mut actions = vec![
            Action::CreateJob {
                node: 0,
                attempt: 2,
            },
            Action::CreateJob {
                node: 1,
                attempt: 3,
            },
        ];
        let made = jobs(
            &plan,
            &mut actions,
            &making(&spec),
            &mut Compiled::new(&spec),
        );
        assert_eq!(made.len(), 1);
        let job: Job = serde_json::from_value(made[0].job.clone()).unwrap();
        // Named and numbered as the Job it sends.
        let attempt = super::super::observe::attempt_of(&job);
        assert_eq!((job.name_any(), attempt), (made[0].name.clone(), 2));
        assert_eq!(made[0].attempt, attempt);
        assert_eq!(
            job.metadata.annotations.as_ref().unwrap()[ANNOTATION_DISPATCHED_BY],
            "operator-0"
        );
        assert_eq!(made[0].waited, Duration::from_secs(7));
        match &actions[1] {
            Action::MarkFailed { node: 1, failure } => {
                assert_eq!(failure.class, FailureClass::InvalidSpec);
                assert!(
                    failure
                        .message
                        .starts_with("attempt 3: spec.placement.podAnnotations.example.com/try"),
                    "{}",
                    failure.message
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn records_say_what_the_actions_did_and_only_news_is_counted() {
        let spec = spec("{}");
        let plan = plan(&spec);
        let now: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let states = vec![
            NodeState::Finished {
                attempt: 1,
                at: now,
                result: Ok(()),
            },
            NodeState::Waiting {
                attempts: 1,
                not_before: None,
            },
            NodeState::Waiting {
                attempts: 0,
                not_before: None,
            },
        ];
        let failure = Failure::new(FailureClass::Evicted, "evicted");
        let actions = vec![
            Action::MarkSucceeded { node: 0 },
            Action::RetryAt {
                node: 1,
                at: now,
                failure: failure.clone(),
            },
            Action::MarkSkipped {
                node: 2,
                reason: SkipReason::Exists,
            },
            Action::DeleteJob { node: 0 },
        ];
        // The retry was recorded already (a Job harvested twice): not counted again.
        let mut known = BTreeMap::new();
        known.insert(
            plan.nodes[1].job_name.clone(),
            Record::failed(&plan.nodes[1], &failure, 1, Some(now), now),
        );
        let known = Records::test_of(&plan, &known);
        let out = records(&plan, &states, &BTreeMap::new(), &actions, &known, now);
        assert_eq!(out.records.len(), 3);
        assert_eq!(
            out.records[&plan.nodes[0].job_name].status,
            RecordStatus::Built
        );
        assert_eq!(
            out.records[&plan.nodes[1].job_name].status,
            RecordStatus::Retrying
        );
        let counted: Vec<RecordStatus> = out.counted.iter().map(|(r, _)| r.status).collect();
        assert_eq!(
            counted,
            [RecordStatus::Built, RecordStatus::SkippedRemoteExists]
        );
        let c = super::counted(&out.counted[1].0, None);
        assert_eq!(c.outcome, Outcome::Skipped { not_needed: false });
        assert!(!c.ran);
    }
}
