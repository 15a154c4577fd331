//! A run's node states kept from one reconcile to the next: a reconcile starts from its
//! records' states, reads the nodes with a Job over them, and applies its actions. Made
//! anew for each reconcile, that is a copy of every node's state (20,001 at 10,000
//! instances) where a few changed. Kept instead, only the nodes the last reconcile
//! changed, and those whose records changed since, are set back to their records' states.
//! The last decision's frontier is kept with them: the next decision reads only the nodes
//! set back and those read from a Job (`schedule::frontier`).

use crate::manifest::Manifest;
use crate::plan::NodeId;
use crate::schedule::{Action, Frontier, NodeState, Tally};

/// The states a reconcile left, and which of them may not be their records'.
#[derive(Default)]
pub struct Working {
    /// Every node's state; empty while a reconcile has them (or after one that failed).
    states: Vec<NodeState>,
    /// The nodes whose state may differ from their record's.
    touched: Vec<NodeId>,
    /// The manifest version whose changes are in `states` (see
    /// [`Manifest::take_changes`]); `None`: nothing to go on.
    synced: Option<u64>,
    /// The frontier of the last decision on the states kept, given back with them.
    frontier: Option<Frontier>,
    /// The nodes the last take set back to their records' states (`None` if it made
    /// them whole).
    reset: Option<Vec<NodeId>>,
}

impl Working {
    /// Every node's state as `manifest`'s records give it, for a reconcile to work on
    /// (and give back with [`Working::keep`]).
    pub fn take(&mut self, manifest: &mut Manifest) -> Vec<NodeState> {
        let (since, changed) = manifest.take_changes();
        let base = manifest.records().states();
        let mut states = std::mem::take(&mut self.states);
        if self.synced != Some(since) || states.len() != base.len() {
            // Another manifest (read again), or states not given back: made whole.
            states = base.to_vec();
            self.frontier = None;
            self.reset = None;
        } else {
            let mut reset = std::mem::take(&mut self.touched);
            reset.extend(changed);
            for &id in &reset {
                states[id] = base[id].clone();
            }
            self.reset = Some(reset);
        }
        self.touched.clear();
        self.synced = Some(manifest.version());
        states
    }

    /// The last decision's frontier and the nodes the take set back since (to which the
    /// nodes then read from a Job add); taken, to be given back with [`Working::keep`].
    /// `None` if the take made the states whole, or no frontier was given back.
    pub fn since_decided(&mut self) -> Option<(Frontier, Vec<NodeId>)> {
        let frontier = self.frontier.take()?;
        Some((frontier, self.reset.take()?))
    }

    /// Keeps `states` for the next reconcile: the records' states taken, changed at the
    /// nodes `overlaid` (the nodes with a Job) and those the `actions` applied to them
    /// name. The records changed meanwhile are known to the manifest. `frontier` is the
    /// decision's on the states before the actions.
    pub fn keep(
        &mut self,
        states: Vec<NodeState>,
        overlaid: &[NodeId],
        actions: &[Action],
        frontier: Option<Frontier>,
    ) {
        self.touched.clear();
        self.touched.extend_from_slice(overlaid);
        self.touched.extend(actions.iter().map(Action::node));
        self.states = states;
        self.frontier = frontier;
    }

    /// The tally of `states`, the states taken from `manifest` changed at the nodes
    /// `overlaid` and those the `actions` applied to them name: the records' tally, set
    /// right at those nodes and at those whose records changed since the take. `None` if
    /// `manifest` is not the one they were taken from, or has changes it no longer holds
    /// (taken since): then only a count of every node says.
    pub fn tally(
        &self,
        manifest: &Manifest,
        states: &[NodeState],
        overlaid: &[NodeId],
        actions: &[Action],
    ) -> Option<Tally> {
        let (since, changed) = manifest.changes();
        let records = manifest.records();
        let base = records.states();
        if self.synced != Some(since) || base.len() != states.len() {
            return None;
        }
        let mut nodes: Vec<NodeId> = overlaid
            .iter()
            .copied()
            .chain(actions.iter().map(Action::node))
            .chain(changed.iter().copied())
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        let mut tally = records.tally().clone();
        let plan = records.plan();
        for id in nodes {
            tally.change(plan.phase(id), id, &base[id], &states[id]);
        }
        Some(tally)
    }

    /// Forgets the states (a change that named no node in particular): the next
    /// reconcile makes them whole again.
    pub fn forget(&mut self) {
        *self = Working::default();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use chrono::Utc;
    use serde_json::json;

    use super::*;
    use crate::api::ImageBuildRun;
    use crate::manifest::Record;
    use crate::plan::Plan;
    use crate::schedule::{Failure, FailureClass};

    fn run() -> ImageBuildRun {
        serde_json::from_value(json!({
            "apiVersion": "imagebuild.dev/v1alpha1",
            "kind": "ImageBuildRun",
            "metadata": {"name": "run", "namespace": "ns", "uid": "u1"},
            "spec": {
                "instances": {"list": ["a__a-1"]},
                "builder": {"context": {"inline": "FROM scratch"}, "image": "r.io/b:1"},
                "base": {"context": {"inline": "FROM scratch"}, "image": "r.io/base:1"},
                "assembly": {"context": {"inline": "FROM scratch"}, "image": "r.io/a:1"},
            },
        }))
        .unwrap()
    }

    fn built(plan: &Plan, ids: &[NodeId]) -> BTreeMap<String, Record> {
        ids.iter()
            .map(|&id| {
                let node = &plan.nodes[id];
                (node.job_name.clone(), Record::built(node, 1, Utc::now()))
            })
            .collect()
    }

    #[test]
    fn each_reconcile_starts_from_the_records_states_whatever_the_one_before_changed() {
        let ids: Vec<String> = (0..6).map(|i| format!("r__r-{i}")).collect();
        let plan = Arc::new(crate::plan::fixture(
            &ids.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        let run = run();
        let mut manifest = Manifest::from_shards(plan.clone(), vec![]);
        manifest.stage(&run, built(&plan, &[0])).unwrap();
        let records = |m: &Manifest| m.records().states().to_vec();
        let mut working = Working::default();

        // First: made whole from the records.
        let mut states = working.take(&mut manifest);
        assert_eq!(states, records(&manifest));
        // The reconcile reads node 2 from its Job, and its actions change 3 and 4; a
        // write of its records (node 5) is answered meanwhile.
        states[2] = NodeState::Running { attempt: 1 };
        let actions = [
            Action::CreateJob {
                node: 3,
                attempt: 1,
            },
            Action::MarkFailed {
                node: 4,
                failure: Failure::new(FailureClass::BuildError, "exit 1"),
            },
        ];
        for action in &actions {
            crate::schedule::apply(&mut states, action);
        }
        manifest.stage(&run, built(&plan, &[5])).unwrap();
        // Its tally: the records' (node 5 built), set right at the nodes it changed.
        let tally = working.tally(&manifest, &states, &[2], &actions);
        assert_eq!(tally, Some(Tally::of(&plan, &states)));
        assert_eq!(tally.unwrap().counts()[1].running, 2);
        // Not of another manifest.
        let other = Manifest::from_shards(plan.clone(), vec![]);
        assert_eq!(working.tally(&other, &states, &[2], &actions), None);
        working.keep(states, &[2], &actions, None);

        // Next: the records' states again, node 5 built.
        let states = working.take(&mut manifest);
        assert_eq!(states, records(&manifest));
        assert_eq!(states[5], NodeState::Succeeded);
        assert_eq!(states[3], NodeState::NEW);

        // Not given back (a reconcile that failed): made whole again.
        manifest.stage(&run, built(&plan, &[1])).unwrap();
        let states = working.take(&mut manifest);
        assert_eq!(states, records(&manifest));

        // Kept from another manifest (read again): made whole from the new one.
        let mut broken = states;
        broken[0] = NodeState::Running { attempt: 9 };
        working.keep(broken, &[], &[], None);
        let mut again = Manifest::from_shards(plan.clone(), vec![]);
        again.stage(&run, built(&plan, &[3])).unwrap();
        let states = working.take(&mut again);
        assert_eq!(states, records(&again));
        assert_eq!(states[0], NodeState::NEW);

        // Forgotten (a cancel): made whole.
        let mut cancelled = states;
        cancelled[1] = NodeState::Running { attempt: 2 };
        working.keep(cancelled, &[], &[], None);
        working.forget();
        assert_eq!(working.take(&mut again), records(&again));
    }

    #[test]
    fn the_frontier_comes_back_with_every_node_set_back_since_its_decision() {
        let ids: Vec<String> = (0..4).map(|i| format!("r__r-{i}")).collect();
        let plan = Arc::new(crate::plan::fixture(
            &ids.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        let run = run();
        let mut manifest = Manifest::from_shards(plan.clone(), vec![]);
        let mut working = Working::default();
        let policy = crate::schedule::Policy {
            max_workers: 2,
            attempts: 3,
            backoff_initial: std::time::Duration::from_secs(1),
            backoff_max: std::time::Duration::from_secs(1),
            force_rebuild: false,
            suspend: false,
            deadline: None,
        };
        let registry = vec![crate::schedule::Registry::Missing; plan.nodes.len()];
        let decide = |frontier, changed: Option<&[NodeId]>, states: &[NodeState]| {
            crate::schedule::decide_from(
                frontier,
                changed,
                &plan,
                &registry,
                states,
                &policy,
                Utc::now(),
            )
        };

        // Made whole: no frontier to keep up from.
        let mut states = working.take(&mut manifest);
        assert!(working.since_decided().is_none());
        let (actions, frontier) = decide(None, None, &states);
        assert!(frontier.is_some());
        let made: Vec<NodeId> = actions.iter().map(Action::node).collect();
        for action in &actions {
            crate::schedule::apply(&mut states, action);
        }
        // Node 1 read from its Job; node 0's record written meanwhile.
        working.keep(states, &[1], &actions, frontier);
        manifest.stage(&run, built(&plan, &[0])).unwrap();

        let states = working.take(&mut manifest);
        let (frontier, mut changed) = working.since_decided().unwrap();
        changed.sort_unstable();
        changed.dedup();
        let mut expected: Vec<NodeId> = made.iter().copied().chain([0, 1]).collect();
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(changed, expected);
        // Taken once: a second ask, or a reconcile that gives no frontier back, has none.
        assert!(working.since_decided().is_none());
        working.keep(states, &[], &[], None);
        let _ = working.take(&mut manifest);
        assert!(working.since_decided().is_none());
        drop(frontier);

        // States made whole again (another manifest): the frontier does not come back.
        let states = working.take(&mut manifest);
        let (_, frontier) = decide(None, None, &states);
        working.keep(states, &[], &[], frontier);
        let mut other = Manifest::from_shards(plan.clone(), vec![]);
        let _ = working.take(&mut other);
        assert!(working.since_decided().is_none());
    }
}
