//! A discrete-event simulator that drives the scheduler the way the reconciler does (each
//! decision kept up from the one before, [`decide_from`]), with Job durations and failures
//! from an oracle. Property tests check the scheduler's rules on its traces; the benchmark
//! measures makespans with it. No clock, no cluster.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{
    Action, Failure, FailureClass, NodeState, Policy, Registry, apply, decide_from, next_wakeup,
};
use crate::plan::{NodeId, Phase, Plan};

/// What one attempt of a node does in the simulation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attempt {
    /// How long its Job runs, in seconds.
    pub seconds: f64,
    /// How it fails, if it does.
    pub failure: Option<FailureClass>,
}

/// One decision as the simulator saw it.
pub struct Step<'a> {
    /// Simulated time of the decision.
    pub now: DateTime<Utc>,
    /// Node states the decision was made on.
    pub before: &'a [NodeState],
    /// What the scheduler decided.
    pub actions: &'a [Action],
}

/// The result of a simulated run.
#[derive(Debug)]
pub struct Report {
    /// Simulated seconds from start to the last node's final state.
    pub makespan_seconds: f64,
    /// Final state of every node.
    pub states: Vec<NodeState>,
    /// Decisions made.
    pub decisions: u64,
    /// Decisions kept up from the one before rather than made whole (see
    /// [`super::frontier`]).
    pub kept_up: u64,
    /// Wall-clock time spent deciding.
    pub decide_time: Duration,
    /// Jobs created, retries included.
    pub jobs_created: u64,
}

/// Why a simulation did not finish.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SimError {
    /// Nodes remain, nothing runs and nothing is scheduled to wake up.
    #[error("stuck at {seconds}s with {remaining} nodes unfinished and nothing running")]
    Stuck {
        /// Simulated seconds elapsed.
        seconds: f64,
        /// Nodes not in a final state.
        remaining: usize,
    },
    /// More decisions than any run of this size could need.
    #[error("no end after {0} decisions")]
    NoEnd(u64),
}

/// A Job in flight: (finish time, node, attempt, failure it ends with).
type InFlight = (DateTime<Utc>, NodeId, u32, Option<FailureClass>);

fn millis(seconds: f64) -> chrono::Duration {
    chrono::Duration::milliseconds((seconds * 1000.0).round() as i64)
}

/// Runs `plan` to the end. `oracle(node, attempt)` says what each Job does; `observe` sees
/// every decision before its actions are applied.
pub fn simulate(
    plan: &Plan,
    registry: &[Registry],
    policy: &Policy,
    start: DateTime<Utc>,
    mut oracle: impl FnMut(NodeId, u32) -> Attempt,
    mut observe: impl FnMut(&Step<'_>),
) -> Result<Report, SimError> {
    let n = plan.nodes.len();
    let mut states = vec![NodeState::NEW; n];
    let mut running: BinaryHeap<Reverse<InFlight>> = BinaryHeap::new();
    let (mut now, mut decisions, mut jobs_created, mut kept_up) = (start, 0u64, 0u64, 0u64);
    let mut decide_time = Duration::ZERO;
    let limit = 64 * (n as u64 + 1) * u64::from(policy.attempts.max(1));
    // The last decision's frontier, and the nodes changed since (`None` before the first).
    let mut frontier = None;
    let mut changed: Option<Vec<NodeId>> = None;
    loop {
        let clock = Instant::now();
        let (actions, kept) = decide_from(
            frontier.take(),
            changed.as_deref(),
            plan,
            registry,
            &states,
            policy,
            now,
        );
        decide_time += clock.elapsed();
        decisions += 1;
        kept_up += u64::from(kept.as_ref().is_some_and(|f| f.kept_up()));
        frontier = kept;
        observe(&Step {
            now,
            before: &states,
            actions: &actions,
        });
        let changed = changed.insert(actions.iter().map(Action::node).collect());
        for action in &actions {
            apply(&mut states, action);
            if let Action::CreateJob { node, attempt } = action {
                jobs_created += 1;
                let outcome = oracle(*node, *attempt);
                running.push(Reverse((
                    now + millis(outcome.seconds.max(0.0)),
                    *node,
                    *attempt,
                    outcome.failure,
                )));
            }
        }
        let remaining = states.iter().filter(|s| !s.is_terminal()).count();
        if remaining == 0 {
            break;
        }
        if decisions > limit {
            return Err(SimError::NoEnd(decisions));
        }
        let wakeups = [
            running.peek().map(|Reverse((t, ..))| *t),
            next_wakeup(&states).filter(|t| *t > now),
            policy.deadline.filter(|t| *t > now),
        ];
        let Some(next) = wakeups.into_iter().flatten().min() else {
            let seconds = (now - start).num_milliseconds() as f64 / 1000.0;
            return Err(SimError::Stuck { seconds, remaining });
        };
        now = next;
        while let Some(Reverse((at, node, attempt, failure))) = running.peek().cloned() {
            if at > now {
                break;
            }
            running.pop();
            // The deadline may have failed the node while its Job ran.
            if matches!(states[node], NodeState::Running { .. }) {
                let result = match failure {
                    None => Ok(()),
                    Some(class) => Err(Box::new(Failure::new(
                        class,
                        format!("simulated {}", class.as_str()),
                    ))),
                };
                states[node] = NodeState::Finished {
                    attempt,
                    at,
                    result,
                };
                changed.push(node);
            }
        }
    }
    Ok(Report {
        makespan_seconds: (now - start).num_milliseconds() as f64 / 1000.0,
        states,
        decisions,
        kept_up,
        decide_time,
        jobs_created,
    })
}

/// Makespan of the phase-barrier schedule the scripts use today: the builder, then every
/// base, then every assembly, each phase with `workers` greedy workers.
pub fn barrier_makespan(plan: &Plan, seconds: &[f64], workers: u32) -> f64 {
    let mut phase_start = 0.0;
    for phase in [
        Phase::Builder,
        Phase::Base,
        Phase::Assembly,
        Phase::PostAssembly,
    ] {
        let mut free: BinaryHeap<Reverse<u64>> = (0..workers.max(1)).map(|_| Reverse(0)).collect();
        let mut end = 0u64;
        for (id, node) in plan.nodes.iter().enumerate() {
            if node.phase != phase {
                continue;
            }
            let Reverse(at) = free.pop().unwrap_or(Reverse(0));
            let finish = at + (seconds[id] * 1000.0) as u64;
            end = end.max(finish);
            free.push(Reverse(finish));
        }
        phase_start += end as f64 / 1000.0;
    }
    phase_start
}

/// A lower bound of any schedule's makespan: the longer of the critical path and the total
/// work spread over `workers`.
pub fn lower_bound(plan: &Plan, seconds: &[f64], workers: u32) -> f64 {
    let mut finish = vec![0.0f64; plan.nodes.len()];
    for (id, node) in plan.nodes.iter().enumerate() {
        let ready = node.deps.iter().map(|&d| finish[d]).fold(0.0, f64::max);
        finish[id] = ready + seconds[id];
    }
    let critical = finish.iter().copied().fold(0.0, f64::max);
    let total: f64 = seconds.iter().sum();
    critical.max(total / f64::from(workers.max(1)))
}
