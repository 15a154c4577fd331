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
pub mod frontier;
pub mod sim;
pub mod tally;

use std::time::Duration;

use chrono::{DateTime, Utc};

pub use failure::{Failure, FailureClass};
pub use fair::fair_shares;
pub use frontier::{Frontier, decide_from};
pub use tally::Tally;

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
        /// Success, or the classified failure (boxed: a node's state is read by every pass
        /// over the nodes, and most are not failures).
        result: Result<(), Box<Failure>>,
    },
    /// Built and pushed.
    Succeeded,
    /// Not built.
    Skipped(SkipReason),
    /// Failed for good (boxed, as above).
    Failed(Box<Failure>),
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

impl Action {
    /// The node the action is of.
    pub fn node(&self) -> NodeId {
        match self {
            Action::CreateJob { node, .. }
            | Action::DeleteJob { node }
            | Action::RetryAt { node, .. }
            | Action::MarkSucceeded { node }
            | Action::MarkFailed { node, .. }
            | Action::MarkSkipped { node, .. } => *node,
        }
    }
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

fn priority(plan: &Plan, node: NodeId) -> Priority {
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

    // One pass over the states decides the nodes not waiting and gathers those waiting
    // for the passes below, which read no state but theirs. At 20,000 nodes the states
    // are most of what a decision reads, and the events between two reconciles leave them
    // out of the cache.
    let mut actions = Vec::new();
    let mut done = vec![false; n];
    let mut failed = vec![false; n];
    let mut in_flight = 0u32;
    let mut waiting: Vec<NodeId> = Vec::new();
    for (id, state) in states.iter().enumerate() {
        match state {
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
            } => match finished(
                policy,
                past_deadline,
                id,
                *attempt,
                *at,
                result,
                &mut actions,
            ) {
                End::Built => done[id] = true,
                End::Retry => {}
                End::Failed => failed[id] = true,
            },
            NodeState::Waiting { .. } => waiting.push(id),
        }
    }

    // Demand flows backwards: final images are wanted unless they exist; an input is
    // wanted while some waiting dependent is.
    let mut demand = vec![Demand::NotNeeded; n];
    for &id in waiting.iter().rev() {
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

    // The waiting nodes forward, in plan order (a topological order), so a failure
    // reaches every dependent in this one pass; the nodes not waiting are all decided.
    let decided = actions.len();
    // The ready nodes first in priority order, kept as they come: thousands can be ready in
    // a large run, a few slots free.
    let mut ready = Ready::new(if policy.suspend {
        0
    } else {
        policy.max_workers as usize
    });
    for &id in &waiting {
        let deps = plan.inputs(id);
        if skip_existing(id) {
            actions.push(Action::MarkSkipped {
                node: id,
                reason: SkipReason::Exists,
            });
            done[id] = true;
        } else if past_deadline {
            // Everything left at the deadline fails for that reason, including nodes whose
            // inputs fail for it in this same pass.
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
            && let NodeState::Waiting {
                attempts,
                not_before,
            } = &states[id]
            && not_before.is_none_or(|t| now >= t)
        {
            ready.push(priority(plan, id), attempts + 1);
        }
    }
    if decided > 0 && actions.len() > decided {
        // In plan order, as one pass over every node would give them (sorted stably: a
        // node's own actions keep their order).
        actions.sort_by_key(Action::node);
    }

    if !policy.suspend {
        let slots = policy.max_workers.saturating_sub(in_flight) as usize;
        for ((_, _, node), attempt) in ready.first(slots) {
            actions.push(Action::CreateJob { node, attempt });
        }
    }
    actions
}

/// How a node whose Job ended goes on.
enum End {
    Built,
    Retry,
    Failed,
}

/// The actions for node `id`, whose Job of `attempt` ended at `at` with `result`: the Job
/// deleted, and the node built, retried after its backoff (a transient failure with
/// attempts left before the deadline), or failed.
fn finished(
    policy: &Policy,
    past_deadline: bool,
    id: NodeId,
    attempt: u32,
    at: DateTime<Utc>,
    result: &Result<(), Box<Failure>>,
    actions: &mut Vec<Action>,
) -> End {
    actions.push(Action::DeleteJob { node: id });
    match result {
        Ok(()) => {
            actions.push(Action::MarkSucceeded { node: id });
            End::Built
        }
        Err(f) if f.class.is_transient() && attempt < policy.attempts && !past_deadline => {
            let wait = chrono::Duration::from_std(backoff(policy, attempt)).unwrap_or_default();
            actions.push(Action::RetryAt {
                node: id,
                at: at
                    .checked_add_signed(wait)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC),
                failure: Failure::clone(f),
            });
            End::Retry
        }
        Err(f) => {
            actions.push(Action::MarkFailed {
                node: id,
                failure: Failure::clone(f),
            });
            End::Failed
        }
    }
}

/// A node's priority: the lowest goes first.
type Priority = (u8, std::cmp::Reverse<usize>, NodeId);

/// The ready nodes of one pass first in priority order, with the attempt each would make:
/// at most `cap` of them (the most that can be dispatched), the worst on top of the heap,
/// so that a node worse than all it holds costs one comparison.
struct Ready {
    cap: usize,
    best: std::collections::BinaryHeap<(Priority, u32)>,
}

impl Ready {
    fn new(cap: usize) -> Ready {
        Ready {
            cap,
            best: std::collections::BinaryHeap::with_capacity(cap.min(1024) + 1),
        }
    }

    fn push(&mut self, priority: Priority, attempt: u32) {
        if self.best.len() < self.cap {
            self.best.push((priority, attempt));
        } else if let Some(mut worst) = self.best.peek_mut()
            && priority < worst.0
        {
            *worst = (priority, attempt);
        }
    }

    /// The `slots` first in priority order, in that order.
    fn first(self, slots: usize) -> Vec<(Priority, u32)> {
        let mut first = self.best.into_sorted_vec();
        first.truncate(slots);
        first
    }
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
        Action::MarkFailed { node, failure } => {
            states[*node] = NodeState::Failed(Box::new(failure.clone()))
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;

    #[test]
    fn the_ready_nodes_kept_are_the_first_in_priority_order_whatever_their_arrival() {
        let mut ready = Ready::new(4);
        let arrivals = [7, 3, 9, 1, 8, 2, 6, 0, 5, 4];
        for id in arrivals {
            // Among equal ranks, more dependents first; then the lower node.
            ready.push((2, Reverse(id % 3), id), id as u32);
        }
        let first: Vec<NodeId> = ready.first(3).iter().map(|((_, _, id), _)| *id).collect();
        assert_eq!(first, [2, 5, 8]);
        // No room: nothing kept.
        let mut none = Ready::new(0);
        none.push((0, Reverse(0), 1), 1);
        assert!(none.first(0).is_empty());
    }

    #[test]
    fn the_free_slots_go_to_the_first_ready_nodes_in_priority_order() {
        let plan = crate::plan::fixture(&["a__a-1", "b__b-2", "c__c-3", "d__d-4", "e__e-5"]);
        let n = plan.nodes.len();
        let bases: Vec<NodeId> = (0..n).filter(|&id| plan.phase(id) == Phase::Base).collect();
        assert_eq!(bases.len(), 5);
        let mut states = vec![NodeState::NEW; n];
        let builder = (0..n).find(|&id| plan.phase(id) == Phase::Builder).unwrap();
        states[builder] = NodeState::Succeeded;
        states[bases[1]] = NodeState::Running { attempt: 1 };
        let policy = Policy {
            max_workers: 3,
            attempts: 3,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(1),
            force_rebuild: false,
            suspend: false,
            deadline: None,
        };
        let registry = vec![Registry::Missing; n];
        let created: Vec<NodeId> = decide(&plan, &registry, &states, &policy, Utc::now())
            .into_iter()
            .filter_map(|a| match a {
                Action::CreateJob { node, attempt: 1 } => Some(node),
                _ => None,
            })
            .collect();
        // Two slots free (one base in flight): the two first bases not in flight.
        assert_eq!(created, [bases[0], bases[2]]);
        let suspended = Policy {
            suspend: true,
            ..policy
        };
        assert!(decide(&plan, &registry, &states, &suspended, Utc::now()).is_empty());
    }
}
