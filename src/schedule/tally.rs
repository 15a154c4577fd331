//! How many of a run's nodes are in each kind of state, by phase, and which of them wait
//! for a retry's time: kept as states change, so that a reconcile reads the few nodes it
//! changed rather than count all of them again (20,001 at 10,000 instances, each
//! reconcile). The records keep the tally of their states; a reconcile's tally is theirs,
//! set right at the nodes its states differ from their records' (`controller::working`).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::NodeState;
use crate::api::PhaseCounts;
use crate::plan::{NodeId, Phase, Plan};

/// The counts of every phase, as the run's status gives them, and the nodes that wait for
/// a retry's time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    counts: [PhaseCounts; 4],
    retrying: BTreeSet<NodeId>,
}

impl Tally {
    /// The tally of `states`, indexed like `plan`'s nodes.
    pub fn of(plan: &Plan, states: &[NodeState]) -> Tally {
        let mut tally = Tally::default();
        for (id, (&phase, state)) in plan.phases().iter().zip(states).enumerate() {
            tally.add(phase, id, state);
        }
        tally
    }

    /// Node `id`, of phase `phase`, goes from state `old` to `new`.
    pub fn change(&mut self, phase: Phase, id: NodeId, old: &NodeState, new: &NodeState) {
        if old != new {
            self.remove(phase, id, old);
            self.add(phase, id, new);
        }
    }

    fn add(&mut self, phase: Phase, id: NodeId, state: &NodeState) {
        let c = &mut self.counts[index(phase)];
        c.total += 1;
        *count(c, state) += 1;
        if retry_at(state).is_some() {
            self.retrying.insert(id);
        }
    }

    fn remove(&mut self, phase: Phase, id: NodeId, state: &NodeState) {
        let c = &mut self.counts[index(phase)];
        c.total = c.total.saturating_sub(1);
        let n = count(c, state);
        *n = n.saturating_sub(1);
        if retry_at(state).is_some() {
            self.retrying.remove(&id);
        }
    }

    /// The counts of each phase: builder, bases, assemblies, post-assembly layers.
    pub fn counts(&self) -> [PhaseCounts; 4] {
        self.counts
    }

    /// Whether every node is final (built, skipped or failed for good).
    pub fn all_final(&self) -> bool {
        self.counts.iter().all(|c| c.pending + c.running == 0)
    }

    /// The earliest retry time among the waiting nodes, read from `states`: the states
    /// this tallies.
    pub fn next_wakeup(&self, states: &[NodeState]) -> Option<DateTime<Utc>> {
        self.retrying
            .iter()
            .filter_map(|&id| states.get(id).and_then(retry_at))
            .min()
    }
}

/// The index of `phase`'s counts.
pub fn index(phase: Phase) -> usize {
    match phase {
        Phase::Builder => 0,
        Phase::Base => 1,
        Phase::Assembly => 2,
        Phase::PostAssembly => 3,
    }
}

/// The count `state` is one of.
fn count<'a>(c: &'a mut PhaseCounts, state: &NodeState) -> &'a mut u32 {
    match state {
        NodeState::Waiting { .. } => &mut c.pending,
        NodeState::Running { .. } | NodeState::Finished { .. } => &mut c.running,
        NodeState::Succeeded => &mut c.succeeded,
        NodeState::Skipped(_) => &mut c.skipped,
        NodeState::Failed(_) => &mut c.failed,
    }
}

/// When a waiting node may be tried again, if it waits for a time.
fn retry_at(state: &NodeState) -> Option<DateTime<Utc>> {
    match state {
        NodeState::Waiting { not_before, .. } => *not_before,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;
    use crate::schedule::{Failure, FailureClass, SkipReason};

    /// Every kind of state, two of them retries at different times.
    fn states(now: DateTime<Utc>) -> Vec<NodeState> {
        let failure = || Box::new(Failure::new(FailureClass::BuildError, "no"));
        vec![
            NodeState::Succeeded,
            NodeState::Waiting {
                attempts: 1,
                not_before: Some(now + Duration::seconds(30)),
            },
            NodeState::Running { attempt: 1 },
            NodeState::Finished {
                attempt: 1,
                at: now,
                result: Err(failure()),
            },
            NodeState::Skipped(SkipReason::Exists),
            NodeState::Failed(failure()),
            NodeState::NEW,
            NodeState::Waiting {
                attempts: 2,
                not_before: Some(now + Duration::seconds(10)),
            },
        ]
    }

    #[test]
    fn a_tally_kept_through_changes_is_the_tally_of_the_states_it_ends_with() {
        let plan = crate::plan::fixture(&["a__a-1", "b__b-1", "c__c-1", "d__d-1"]);
        let now = Utc::now();
        let kinds = states(now);
        let mut states: Vec<NodeState> = (0..plan.nodes.len())
            .map(|i| kinds[i % kinds.len()].clone())
            .collect();
        let mut tally = Tally::of(&plan, &states);
        assert_eq!(tally.counts()[0].succeeded, 1);
        assert_eq!(
            tally.next_wakeup(&states),
            Some(now + Duration::seconds(10))
        );
        assert!(!tally.all_final());
        // Every node through every kind of state, in turn.
        for step in 1..=kinds.len() {
            for id in 0..states.len() {
                let new = kinds[(id + step) % kinds.len()].clone();
                tally.change(plan.phase(id), id, &states[id], &new);
                states[id] = new;
                assert_eq!(tally, Tally::of(&plan, &states));
            }
        }
        // All final: nothing open, no retry.
        for (id, state) in states.iter_mut().enumerate() {
            tally.change(plan.phase(id), id, state, &NodeState::Succeeded);
            *state = NodeState::Succeeded;
        }
        assert_eq!(tally, Tally::of(&plan, &states));
        assert!(tally.all_final());
        assert_eq!(tally.next_wakeup(&states), None);
        let total: u32 = tally.counts().iter().map(|c| c.total).sum();
        assert_eq!(total as usize, plan.nodes.len());
    }
}
