//! Property tests of the scheduler over random plans, registry contents, durations and
//! failures: the rules hold on every step of every trace, every decision kept up from the
//! one before is the one made whole, and every run ends.

mod common;

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use imagebuild_operator::plan::{Phase, Plan};
use imagebuild_operator::schedule::sim::{Attempt, Step, simulate};
use imagebuild_operator::schedule::{
    Action, FailureClass, NodeState, Policy, Registry, SkipReason, apply, backoff, decide,
};
use proptest::prelude::*;

/// Failure classes a build Job itself can end with.
const JOB_FAILURES: [FailureClass; 8] = [
    FailureClass::BuildError,
    FailureClass::RegistryThrottled,
    FailureClass::RegistryUnavailable,
    FailureClass::DiskFull,
    FailureClass::Evicted,
    FailureClass::OomKilled,
    FailureClass::DeadlineExceeded,
    FailureClass::ExecutorCrashed,
];

#[derive(Debug, Clone)]
struct Case {
    images: Vec<usize>,
    post: bool,
    exists: Vec<bool>,
    attempts: Vec<(u32, Option<usize>)>,
    policy: Policy,
}

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..30, 1usize..30, any::<bool>()).prop_flat_map(|(n, pool, post)| {
        let nodes = 1 + 3 * n;
        (
            prop::collection::vec(0..pool, n),
            prop::collection::vec(prop::bool::weighted(0.2), nodes),
            // (seconds, failure class index) for up to 4 attempts of every node.
            prop::collection::vec(
                (
                    1u32..400,
                    prop::option::weighted(0.25, 0..JOB_FAILURES.len()),
                ),
                nodes * 4,
            ),
            (
                1u32..8,
                1u32..5,
                1u64..60,
                any::<bool>(),
                prop::option::weighted(0.2, 60i64..3000),
            ),
        )
            .prop_map(
                move |(images, exists, attempts, (workers, tries, initial, force, deadline))| {
                    Case {
                        images,
                        post,
                        exists,
                        attempts,
                        policy: Policy {
                            max_workers: workers,
                            attempts: tries,
                            backoff_initial: Duration::from_secs(initial),
                            backoff_max: Duration::from_secs(initial * 4),
                            force_rebuild: force,
                            suspend: false,
                            deadline: deadline.map(|s| start() + chrono::Duration::seconds(s)),
                        },
                    }
                },
            )
    })
}

fn plan_of(case: &Case) -> Plan {
    let ids: Vec<String> = (0..case.images.len())
        .map(|i| format!("{}__r-{i}", if i % 3 == 0 { "p" } else { "q" }))
        .collect();
    let images: Vec<String> = case
        .images
        .iter()
        .map(|j| format!("docker.io/up/env-{j}:latest"))
        .collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let image_refs: Vec<Option<&str>> = images.iter().map(|s| Some(s.as_str())).collect();
    let post = if case.post {
        r#"postAssembly: {match: "^p__", context: {inline: "FROM x"}, image: "r.io/post:{{ instanceId | replace('__', '-') }}"}"#
    } else {
        "{}"
    };
    let spec = common::spec_with(post);
    common::plan_for(&spec, &common::raw(&id_refs, &image_refs))
}

fn is_done(s: &NodeState) -> bool {
    matches!(s, NodeState::Succeeded | NodeState::Skipped(_))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn rules_hold_on_every_trace(case in case()) {
        let plan = plan_of(&case);
        let n = plan.nodes.len();
        let registry: Vec<Registry> = (0..n)
            .map(|i| if case.exists[i % case.exists.len()] { Registry::Exists } else { Registry::Missing })
            .collect();
        let policy = &case.policy;
        let mut created = vec![0u32; n];
        let mut failed_at: Vec<Option<DateTime<Utc>>> = vec![None; n];
        let mut violations: Vec<String> = Vec::new();
        let observe = |step: &Step<'_>| {
            // The simulator keeps each decision up from the one before (`decide_from`).
            if step.actions != decide(&plan, &registry, step.before, policy, step.now) {
                violations.push(format!("at {} a decision kept up is not the whole one: {:?} {:?} on {:?}", step.now, step.actions, decide(&plan, &registry, step.before, policy, step.now), step.before));
            }
            let mut after = step.before.to_vec();
            for a in step.actions {
                apply(&mut after, a);
            }
            let running = after.iter().filter(|s| matches!(s, NodeState::Running { .. })).count();
            if running > policy.max_workers as usize {
                violations.push(format!("{running} in flight > maxWorkers {}", policy.max_workers));
            }
            let mut created_base = false;
            for a in step.actions {
                match a {
                    Action::CreateJob { node, attempt } => {
                        let node = *node;
                        created[node] += 1;
                        if *attempt != created[node] || *attempt > policy.attempts {
                            violations.push(format!("node {node} attempt {attempt} (created {})", created[node]));
                        }
                        if let Some(&dep) = plan.nodes[node].deps.iter().find(|&&d| !is_done(&after[d])) {
                            violations.push(format!("node {node} started before input {dep} was done"));
                        }
                        if registry[node] == Registry::Exists && !policy.force_rebuild {
                            violations.push(format!("node {node} built although its image exists"));
                        }
                        if policy.deadline.is_some_and(|d| step.now >= d) {
                            violations.push(format!("node {node} started after the deadline"));
                        }
                        if let Some(t) = failed_at[node] {
                            let wait = chrono::Duration::from_std(backoff(policy, created[node] - 1)).unwrap();
                            if step.now < t + wait {
                                violations.push(format!("node {node} retried before its backoff"));
                            }
                        }
                        created_base |= plan.nodes[node].phase == Phase::Base;
                    }
                    Action::RetryAt { node, .. } => {
                        if let NodeState::Finished { at, .. } = &step.before[*node] {
                            failed_at[*node] = Some(*at);
                        }
                    }
                    _ => {}
                }
            }
            // Assemblies before new bases: a base may start only if no assembly whose
            // inputs are done is left waiting.
            if created_base {
                for (id, node) in plan.nodes.iter().enumerate() {
                    let waiting_ready = matches!(&after[id], NodeState::Waiting { not_before, .. } if not_before.is_none_or(|t| step.now >= t))
                        && node.deps.iter().all(|&d| is_done(&after[d]));
                    if node.phase == Phase::Assembly && waiting_ready && registry[id] == Registry::Missing {
                        violations.push(format!("base started while assembly {id} was ready"));
                    }
                }
            }
        };
        let oracle = |node: usize, attempt: u32| {
            let (secs, fail) = case.attempts[(node * 4 + attempt as usize - 1) % case.attempts.len()];
            Attempt { seconds: f64::from(secs), failure: fail.map(|i| JOB_FAILURES[i]) }
        };
        let report = simulate(&plan, &registry, policy, start(), oracle, observe);
        prop_assert!(violations.is_empty(), "{:?}", &violations[..violations.len().min(5)]);
        let report = report.map_err(|e| TestCaseError::fail(e.to_string()))?;

        // Every node ends, and how it ends follows from its inputs.
        for (id, node) in plan.nodes.iter().enumerate() {
            let state = &report.states[id];
            prop_assert!(state.is_terminal(), "node {id} ended {state:?}");
            let exists_skip = registry[id] == Registry::Exists && !policy.force_rebuild;
            match state {
                NodeState::Skipped(SkipReason::Exists) => prop_assert!(exists_skip),
                NodeState::Skipped(SkipReason::NotNeeded) => {
                    prop_assert!(matches!(node.phase, Phase::Builder | Phase::Base), "final image {id} not built");
                    prop_assert!(plan.dependents(id).iter().all(|&d| !matches!(report.states[d], NodeState::Succeeded)));
                }
                NodeState::Failed(f) if f.class == FailureClass::DependencyFailed => {
                    prop_assert!(node.deps.iter().any(|&d| matches!(report.states[d], NodeState::Failed(_))),
                        "node {id} failed for a dependency but none failed");
                    prop_assert_eq!(created[id], 0);
                }
                NodeState::Failed(f) if f.class == FailureClass::RunDeadlineExceeded => {
                    prop_assert!(policy.deadline.is_some());
                }
                NodeState::Failed(f) => {
                    // A Job failure: permanent at once, or transient with every attempt used.
                    if f.class.is_transient() && policy.deadline.is_none() {
                        prop_assert_eq!(created[id], policy.attempts, "node {} gave up early", id);
                    }
                    if !f.class.is_transient() {
                        prop_assert!(created[id] >= 1);
                    }
                }
                _ => {}
            }
            // A failed input fails only its own dependents; an existing image is never lost.
            if exists_skip {
                prop_assert_eq!(state, &NodeState::Skipped(SkipReason::Exists));
            }
        }
        // With no deadline, every assembly whose inputs ended well is built or skipped.
        if policy.deadline.is_none() {
            for (id, node) in plan.nodes.iter().enumerate() {
                let inputs_ok = node.deps.iter().all(|&d| is_done(&report.states[d]));
                if node.phase == Phase::Assembly && inputs_ok {
                    prop_assert!(!matches!(&report.states[id], NodeState::Failed(f) if f.class == FailureClass::DependencyFailed));
                }
            }
        }
    }
}
