//! The scheduler: a pure state machine `decide(plan, states, policy, now) -> actions`.
//! It never talks to the cluster; the reconciler (and the simulator in `sim`) feed it the
//! observed state of every node and apply the actions it returns with [`apply`].
//!
//! Rules: at most `max_workers` Jobs in flight; a node starts only when its inputs are built
//! or skipped; the builder first, then assemblies before new bases (finish what is started,
//! free disk early); a failed input fails only its own dependents (`DependencyFailed`);
//! transient failures retry with exponential backoff up to `attempts`.

mod failure;
mod fair;
pub mod sim;

use std::time::Duration;

use chrono::{DateTime, Utc};

pub use failure::{Failure, FailureClass};
pub use fair::fair_shares;

use crate::plan::{NodeId, Phase, Plan};

/// What the registry said about a node's image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registry {
    /// Not checked yet: the node is not dispatched before it is.
    Unknown,
    /// The image is in the registry.
    Exists,
    /// The image is not in the registry.
    Missing,
}

/// Why a node was not built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Its image already exists in the registry.
    Exists,
    /// Nothing that depends on it needs building.
    NotNeeded,
}

/// The observed state of one node.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeState {
    /// Not started, or waiting for a retry. `attempts` have been made so far.
    Waiting {
        /// Attempts made so far.
        attempts: u32,
        /// Earliest time of the next attempt (after a transient failure).
        not_before: Option<DateTime<Utc>>,
    },
    /// A Job of attempt `attempt` is in flight.
    Running {
        /// 1-based attempt number.
        attempt: u32,
    },
    /// The Job of `attempt` ended; its outcome is not recorded yet.
    Finished {
        /// 1-based attempt number.
        attempt: u32,
        /// When it ended.
        at: DateTime<Utc>,
        /// Success, or the classified failure.
        result: Result<(), Failure>,
    },
    /// Built and pushed.
    Succeeded,
    /// Not built.
    Skipped(SkipReason),
    /// Failed for good.
    Failed(Failure),
}

impl NodeState {
    /// A node that has not been attempted yet.
    pub const NEW: NodeState = NodeState::Waiting {
        attempts: 0,
        not_before: None,
    };

    /// Whether the node reached a final state.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Succeeded | Self::Skipped(_) | Self::Failed(_))
    }
}

/// The run-level inputs of a decision.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Jobs in flight at most.
    pub max_workers: u32,
    /// Total attempts per node.
    pub attempts: u32,
    /// Backoff before the second attempt; doubled each time after.
    pub backoff_initial: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// Build even images that exist.
    pub force_rebuild: bool,
    /// Dispatch nothing new.
    pub suspend: bool,
    /// When the run must end; what remains then fails.
    pub deadline: Option<DateTime<Utc>>,
}

/// One thing to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create the node's Job for `attempt`.
    CreateJob {
        /// The node.
        node: NodeId,
        /// 1-based attempt number.
        attempt: u32,
    },
    /// Delete the node's Job (finished, or cut off by the deadline).
    DeleteJob {
        /// The node.
        node: NodeId,
    },
    /// Record a transient failure and try again at `at`.
    RetryAt {
        /// The node.
        node: NodeId,
        /// Earliest time of the next attempt.
        at: DateTime<Utc>,
        /// The failure of the attempt that just ended.
        failure: Failure,
    },
    /// Record the node as built.
    MarkSucceeded {
        /// The node.
        node: NodeId,
    },
    /// Record the node as failed for good.
    MarkFailed {
        /// The node.
        node: NodeId,
        /// Why.
        failure: Failure,
    },
    /// Record the node as not built.
    MarkSkipped {
        /// The node.
        node: NodeId,
        /// Why.
        reason: SkipReason,
    },
}

/// Whether a node's image will be needed, from the registry and its dependents.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Demand {
    Needed,
    Undecided,
    NotNeeded,
}

/// The backoff after failed attempt `attempt` (1-based): initial * 2^(attempt-1), capped.
pub fn backoff(policy: &Policy, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    policy
        .backoff_initial
        .saturating_mul(factor)
        .min(policy.backoff_max)
}

fn priority(plan: &Plan, node: NodeId) -> (u8, std::cmp::Reverse<usize>, NodeId) {
    let rank = match plan.phase(node) {
        Phase::Builder => 0,
        Phase::PostAssembly => 1,
        Phase::Assembly => 2,
        Phase::Base => 3,
    };
    // Among bases, the one most instances wait on goes first.
    (rank, std::cmp::Reverse(plan.dependents(node).len()), node)
}

/// Decides what to do now. `registry` and `states` are indexed like `plan.nodes`.
pub fn decide(
    plan: &Plan,
    registry: &[Registry],
    states: &[NodeState],
    policy: &Policy,
    now: DateTime<Utc>,
) -> Vec<Action> {
    let n = plan.nodes.len();
    let past_deadline = policy.deadline.is_some_and(|d| now >= d);
    let skip_existing = |id: NodeId| registry[id] == Registry::Exists && !policy.force_rebuild;

    // Demand flows backwards: final images are wanted unless they exist; an input is
    // wanted while some waiting dependent is.
    let mut demand = vec![Demand::NotNeeded; n];
    for id in (0..n).rev() {
        if !matches!(states[id], NodeState::Waiting { .. }) {
            continue;
        }
        demand[id] = if skip_existing(id) {
            Demand::NotNeeded
        } else if matches!(plan.phase(id), Phase::Assembly | Phase::PostAssembly) {
            if registry[id] == Registry::Unknown {
                Demand::Undecided
            } else {
                Demand::Needed
            }
        } else {
            let wanted = plan.dependents(id).iter().map(|&d| demand[d]);
            wanted.fold(Demand::NotNeeded, |acc, d| match (acc, d) {
                (Demand::Needed, _) | (_, Demand::Needed) => Demand::Needed,
                (Demand::Undecided, _) | (_, Demand::Undecided) => Demand::Undecided,
                _ => Demand::NotNeeded,
            })
        };
    }

    // Forward in plan order (a topological order), so a failure reaches every dependent in
    // this one pass.
    let mut actions = Vec::new();
    let mut done = vec![false; n];
    let mut failed = vec![false; n];
    let mut in_flight = 0u32;
    let mut ready = Vec::new();
    for id in 0..n {
        match &states[id] {
            NodeState::Succeeded | NodeState::Skipped(_) => done[id] = true,
            NodeState::Failed(_) => failed[id] = true,
            NodeState::Running { .. } if past_deadline => {
                actions.push(Action::DeleteJob { node: id });
                actions.push(Action::MarkFailed {
                    node: id,
                    failure: Failure::run_deadline(),
                });
                failed[id] = true;
            }
            NodeState::Running { .. } => in_flight += 1,
            NodeState::Finished {
                attempt,
                at,
                result,
            } => {
                actions.push(Action::DeleteJob { node: id });
                match result {
                    Ok(()) => {
                        actions.push(Action::MarkSucceeded { node: id });
                        done[id] = true;
                    }
                    Err(f)
                        if f.class.is_transient()
                            && *attempt < policy.attempts
                            && !past_deadline =>
                    {
                        let wait = chrono::Duration::from_std(backoff(policy, *attempt))
                            .unwrap_or_default();
                        actions.push(Action::RetryAt {
                            node: id,
                            at: at
                                .checked_add_signed(wait)
                                .unwrap_or(DateTime::<Utc>::MAX_UTC),
                            failure: f.clone(),
                        });
                    }
                    Err(f) => {
                        actions.push(Action::MarkFailed {
                            node: id,
                            failure: f.clone(),
                        });
                        failed[id] = true;
                    }
                }
            }
            NodeState::Waiting {
                attempts,
                not_before,
            } => {
                let deps = plan.inputs(id);
                if skip_existing(id) {
                    actions.push(Action::MarkSkipped {
                        node: id,
                        reason: SkipReason::Exists,
                    });
                    done[id] = true;
                } else if past_deadline {
                    // Everything left at the deadline fails for that reason, including
                    // nodes whose inputs fail for it in this same pass.
                    actions.push(Action::MarkFailed {
                        node: id,
                        failure: Failure::run_deadline(),
                    });
                    failed[id] = true;
                } else if let Some(&dep) = deps.iter().find(|&&d| failed[d]) {
                    let failure = Failure::dependency(&plan.nodes[dep]);
                    actions.push(Action::MarkFailed { node: id, failure });
                    failed[id] = true;
                } else if demand[id] == Demand::NotNeeded {
                    actions.push(Action::MarkSkipped {
                        node: id,
                        reason: SkipReason::NotNeeded,
                    });
                    done[id] = true;
                } else if demand[id] == Demand::Needed
                    && registry[id] != Registry::Unknown
                    && deps.iter().all(|&d| done[d])
                    && not_before.is_none_or(|t| now >= t)
                {
                    ready.push((id, attempts + 1));
                }
            }
        }
    }

    if !policy.suspend {
        let slots = policy.max_workers.saturating_sub(in_flight) as usize;
        // Only the `slots` first in priority order are wanted: selected in linear time,
        // then sorted (thousands can be ready in a large run, a few slots free). Each
        // node's priority is read once, not at every comparison.
        let mut ready: Vec<_> = ready
            .into_iter()
            .map(|(id, attempt)| (priority(plan, id), attempt))
            .collect();
        if slots < ready.len() {
            ready.select_nth_unstable(slots);
            ready.truncate(slots);
        }
        ready.sort_unstable();
        for ((_, _, node), attempt) in ready {
            actions.push(Action::CreateJob { node, attempt });
        }
    }
    actions
}

/// The state change an action records. The reconciler persists the same change.
pub fn apply(states: &mut [NodeState], action: &Action) {
    match action {
        Action::CreateJob { node, attempt } => {
            states[*node] = NodeState::Running { attempt: *attempt }
        }
        Action::DeleteJob { .. } => {}
        Action::RetryAt { node, at, .. } => {
            let attempts = match &states[*node] {
                NodeState::Finished { attempt, .. } | NodeState::Running { attempt } => *attempt,
                NodeState::Waiting { attempts, .. } => *attempts,
                _ => 0,
            };
            states[*node] = NodeState::Waiting {
                attempts,
                not_before: Some(*at),
            };
        }
        Action::MarkSucceeded { node } => states[*node] = NodeState::Succeeded,
        Action::MarkFailed { node, failure } => states[*node] = NodeState::Failed(failure.clone()),
        Action::MarkSkipped { node, reason } => states[*node] = NodeState::Skipped(*reason),
    }
}

/// The earliest retry time among waiting nodes, for the caller's requeue timer.
pub fn next_wakeup(states: &[NodeState]) -> Option<DateTime<Utc>> {
    states
        .iter()
        .filter_map(|s| match s {
            NodeState::Waiting { not_before, .. } => *not_before,
            _ => None,
        })
        .min()
}
