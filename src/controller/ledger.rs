//! The worker ledger behind `--max-total-workers`: what each run has in flight and would
//! start on its own limit (its demand), and each run's decision within its fair share of
//! the cap (`schedule::fair_shares`). Pure: the reconcile holds it for one decision, so
//! two runs reconciled at once never take the same free slot.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::plan::Plan;
use crate::schedule::{self, Action, NodeState, Policy, Registry};

/// Every run's usage, by `namespace/name`.
#[derive(Default)]
pub struct Ledger(BTreeMap<String, Usage>);

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Usage {
    in_flight: u32,
    demand: u32,
}

/// What one decision needs to know of its run.
pub struct Decision<'a> {
    /// The run's plan.
    pub plan: &'a Plan,
    /// What the registry said of each node.
    pub registry: &'a [Registry],
    /// Each node's state.
    pub states: &'a [NodeState],
    /// Now.
    pub now: DateTime<Utc>,
}

impl Ledger {
    /// Decides for run `key` within its fair share of `cap`, lowering `policy.max_workers`
    /// to it, and books what the run will then have in flight (so a run reconciled next
    /// sees these Jobs before the stores do).
    pub fn decide(
        &mut self,
        key: &str,
        cap: u32,
        d: &Decision<'_>,
        policy: &mut Policy,
    ) -> Vec<Action> {
        let creates = |actions: &[Action]| {
            actions
                .iter()
                .filter(|a| matches!(a, Action::CreateJob { .. }))
                .count() as u32
        };
        let running = d
            .states
            .iter()
            .filter(|s| matches!(s, NodeState::Running { .. }))
            .count() as u32;
        // What the run would start on its own limit is what it asks of the fleet.
        let wanted = schedule::decide(d.plan, d.registry, d.states, policy, d.now);
        let demand = running + creates(&wanted);
        self.0.insert(
            key.to_string(),
            Usage {
                in_flight: running,
                demand,
            },
        );
        let demands: Vec<u32> = self.0.values().map(|u| u.demand).collect();
        let shares = schedule::fair_shares(cap, &demands);
        let mine = self
            .0
            .keys()
            .position(|k| k == key)
            .and_then(|i| shares.get(i).copied())
            .unwrap_or(0);
        let total: u32 = self.0.values().map(|u| u.in_flight).sum();
        let free = cap.saturating_sub(total);
        policy.max_workers = policy.max_workers.min(mine).min(running + free);
        let actions = if policy.max_workers >= demand {
            wanted
        } else {
            schedule::decide(d.plan, d.registry, d.states, policy, d.now)
        };
        if let Some(usage) = self.0.get_mut(key) {
            usage.in_flight = running + creates(&actions);
        }
        actions
    }

    /// Drops run `key` (finished or gone).
    pub fn remove(&mut self, key: &str) {
        self.0.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::api::ImageBuildRunSpec;
    use crate::instances::RawInstance;

    fn plan(n: usize) -> Plan {
        let spec: ImageBuildRunSpec = serde_yaml_ng::from_str(
            r#"
instances: {list: [a__a-1], upstreamImage: "r.io/up/{{ name }}:1"}
builder: {context: {inline: "FROM scratch"}, image: "r.io/b:1"}
base: {context: {inline: "FROM scratch"}, image: "r.io/base:{{ customTag }}"}
assembly: {context: {inline: "FROM scratch"}, image: "r.io/a:{{ instanceId | lower }}"}
"#,
        )
        .unwrap();
        let instances: Vec<RawInstance> = (0..n)
            .map(|i| RawInstance {
                id: format!("r__r-{i}"),
                image: None,
            })
            .collect();
        crate::plan::build("run", &spec, &instances).unwrap()
    }

    fn policy(max_workers: u32) -> Policy {
        Policy {
            max_workers,
            attempts: 1,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(1),
            force_rebuild: false,
            suspend: false,
            deadline: None,
        }
    }

    #[test]
    fn two_runs_split_the_cap_and_never_take_the_same_slot() {
        // Two runs, each with ten bases ready (the builder exists), each allowed ten.
        let p = plan(10);
        let n = p.nodes.len();
        let mut registry = vec![Registry::Missing; n];
        registry[0] = Registry::Exists;
        let mut states = vec![
            NodeState::Waiting {
                attempts: 0,
                not_before: None
            };
            n
        ];
        states[0] = NodeState::Skipped(crate::schedule::SkipReason::Exists);
        let now = Utc::now();
        let d = Decision {
            plan: &p,
            registry: &registry,
            states: &states,
            now,
        };
        let mut ledger = Ledger::default();
        let creates = |actions: &[Action]| {
            actions
                .iter()
                .filter(|a| matches!(a, Action::CreateJob { .. }))
                .count()
        };
        // The first run alone takes what the cap allows; the second finds nothing free.
        let first = ledger.decide("ns/a", 4, &d, &mut policy(10));
        assert_eq!(creates(&first), 4);
        let second = ledger.decide("ns/b", 4, &d, &mut policy(10));
        assert_eq!(creates(&second), 0, "no slot is taken twice");
        // Once the first run's Jobs run, its share is 2: it starts nothing more, and when
        // two of them finish the other run gets the freed slots.
        let mut running = states.clone();
        for s in running.iter_mut().skip(1).take(4) {
            *s = NodeState::Running { attempt: 1 };
        }
        let d_first = Decision {
            states: &running,
            ..d
        };
        assert_eq!(
            creates(&ledger.decide("ns/a", 4, &d_first, &mut policy(10))),
            0
        );
        for s in running.iter_mut().skip(1).take(2) {
            *s = NodeState::Succeeded;
        }
        let d_first = Decision {
            states: &running,
            ..d
        };
        assert_eq!(
            creates(&ledger.decide("ns/a", 4, &d_first, &mut policy(10))),
            0
        );
        assert_eq!(creates(&ledger.decide("ns/b", 4, &d, &mut policy(10))), 2);
        ledger.remove("ns/a");
        assert_eq!(creates(&ledger.decide("ns/b", 4, &d, &mut policy(10))), 4);
    }
}
