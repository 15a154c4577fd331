//! [`decide`] kept up from one decision to the next. A decision reads every node: at
//! 20,001 nodes that is most of a reconcile, where between two reconciles a few nodes
//! changed (the Jobs that ended, those made). The frontier is what a decision found of
//! the waiting nodes, the ready ones in priority order above all; the next decision reads
//! only the nodes that changed since, and its dependents and inputs, and takes the first
//! ready ones from it.
//!
//! It holds while the decisions are quiet: the registry known of every node and unchanged,
//! the same policy terms, no deadline passed, and no waiting node for [`decide`] to skip or
//! fail. Then a waiting node has an action only once a node it depends on fails, which
//! the frontier does not follow: a change to a failure, or any other change it does not
//! follow (a node done going back to waiting, as a retry of failed images does), and
//! every decision with another policy or registry, is made whole by [`decide`], and the
//! frontier made again from it. Debug builds check each decision kept up against the whole
//! one.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Action, NodeState, Policy, Priority, Registry, decide, finished, priority};
use crate::plan::{NodeId, Phase, Plan};

/// What a decision reads of a node's state, but for a waiting node's attempts and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Waiting,
    Running,
    /// Its Job ended well: built in this decision, its dependents may start in it.
    Built,
    /// Its Job ended with a failure it is retried for.
    Ended,
    Done,
    Failed,
}

impl Kind {
    fn of(state: &NodeState) -> Kind {
        match state {
            NodeState::Waiting { .. } => Kind::Waiting,
            NodeState::Running { .. } => Kind::Running,
            NodeState::Finished { result: Ok(()), .. } => Kind::Built,
            NodeState::Finished { .. } => Kind::Ended,
            NodeState::Succeeded | NodeState::Skipped(_) => Kind::Done,
            NodeState::Failed(_) => Kind::Failed,
        }
    }

    /// Done, or done in this decision.
    fn is_done(self) -> bool {
        matches!(self, Kind::Done | Kind::Built)
    }

    fn is_finished(self) -> bool {
        matches!(self, Kind::Built | Kind::Ended)
    }
}

/// The policy's terms the frontier holds for: all but the workers and `suspend`, which
/// each decision reads anew.
#[derive(Clone, Debug, PartialEq)]
struct Terms {
    attempts: u32,
    backoff_initial: Duration,
    backoff_max: Duration,
    force_rebuild: bool,
    deadline: Option<DateTime<Utc>>,
}

impl Terms {
    fn of(policy: &Policy) -> Terms {
        Terms {
            attempts: policy.attempts,
            backoff_initial: policy.backoff_initial,
            backoff_max: policy.backoff_max,
            force_rebuild: policy.force_rebuild,
            deadline: policy.deadline,
        }
    }
}

/// What the last decision found: each node's kind, the nodes in flight, and the waiting
/// nodes whose inputs are done and whose image is needed (a retry's time not read), in
/// priority order.
#[derive(Debug)]
pub struct Frontier {
    registry: Vec<Registry>,
    terms: Terms,
    kinds: Vec<Kind>,
    running: u32,
    finished: u32,
    ready: BTreeSet<Priority>,
    /// Whether the last decision kept it up (rather than made it anew).
    kept_up: bool,
}

/// Decides as [`decide`] does. With the frontier of the last decision and the nodes whose
/// states changed since (`changed`, in any order, repeats allowed), only those are read;
/// without, or when the frontier does not hold for these states, the decision is made
/// whole. Returns the actions and the frontier of these states (before the actions), for
/// the next decision.
pub fn decide_from(
    frontier: Option<Frontier>,
    changed: Option<&[NodeId]>,
    plan: &Plan,
    registry: &[Registry],
    states: &[NodeState],
    policy: &Policy,
    now: DateTime<Utc>,
) -> (Vec<Action>, Option<Frontier>) {
    if let (Some(mut frontier), Some(changed)) = (frontier, changed)
        && let Some(actions) = frontier.decide(plan, registry, states, policy, now, changed)
    {
        debug_assert_eq!(
            actions,
            decide(plan, registry, states, policy, now),
            "a decision kept up differs from the whole one"
        );
        frontier.kept_up = true;
        return (actions, Some(frontier));
    }
    let actions = decide(plan, registry, states, policy, now);
    let frontier = Frontier::new(plan, registry, states, policy, now, &actions);
    (actions, frontier)
}

impl Frontier {
    /// Whether the decision that gave this frontier kept it up from the one before (read
    /// only the nodes changed since) rather than made it whole.
    pub fn kept_up(&self) -> bool {
        self.kept_up
    }

    /// The frontier of `states`, decided whole into `actions`; `None` unless that decision
    /// was quiet.
    fn new(
        plan: &Plan,
        registry: &[Registry],
        states: &[NodeState],
        policy: &Policy,
        now: DateTime<Utc>,
        actions: &[Action],
    ) -> Option<Frontier> {
        let past_deadline = policy.deadline.is_some_and(|d| now >= d);
        let waiting_acted = actions.iter().any(|a| {
            !matches!(a, Action::CreateJob { .. })
                && matches!(states[a.node()], NodeState::Waiting { .. })
        });
        if past_deadline
            || waiting_acted
            || registry.len() != states.len()
            || registry.contains(&Registry::Unknown)
        {
            return None;
        }
        let kinds: Vec<Kind> = states.iter().map(Kind::of).collect();
        let count = |is: fn(&Kind) -> bool| kinds.iter().filter(|k| is(k)).count() as u32;
        let mut frontier = Frontier {
            registry: registry.to_vec(),
            terms: Terms::of(policy),
            running: count(|k| *k == Kind::Running),
            finished: count(|k| k.is_finished()),
            kinds,
            ready: BTreeSet::new(),
            kept_up: false,
        };
        let ready: Vec<Priority> = (0..states.len())
            .filter(|&id| frontier.is_ready(plan, id))
            .map(|id| priority(plan, id))
            .collect();
        frontier.ready = BTreeSet::from_iter(ready);
        Some(frontier)
    }

    /// The decision on `states`, which differ from the frontier's at `changed`, the
    /// frontier brought up to them first; `None` if it does not hold for them (the
    /// frontier is then of no further use).
    fn decide(
        &mut self,
        plan: &Plan,
        registry: &[Registry],
        states: &[NodeState],
        policy: &Policy,
        now: DateTime<Utc>,
        changed: &[NodeId],
    ) -> Option<Vec<Action>> {
        if self.kinds.len() != plan.nodes.len()
            || states.len() != self.kinds.len()
            || self.terms != Terms::of(policy)
            || policy.deadline.is_some_and(|d| now >= d)
            || self.registry != registry
        {
            return None;
        }
        let mut changed = changed.to_vec();
        changed.sort_unstable();
        changed.dedup();
        // The kinds first, then whether each node that may have become ready (or stopped
        // being) is: a changed node, the dependents of one done, the inputs of one (whose
        // need is their dependents').
        let mut again = Vec::new();
        let mut finished_now = 0;
        for &id in &changed {
            let state = states.get(id)?;
            let (was, is) = (self.kinds[id], Kind::of(state));
            if !follows(was, state, policy) {
                return None;
            }
            finished_now += u32::from(is.is_finished());
            if was == is {
                continue;
            }
            self.running -= u32::from(was == Kind::Running);
            self.running += u32::from(is == Kind::Running);
            self.finished -= u32::from(was.is_finished());
            self.finished += u32::from(is.is_finished());
            self.kinds[id] = is;
            again.push(id);
            if is.is_done() != was.is_done() {
                again.extend_from_slice(plan.dependents(id));
            }
            again.extend_from_slice(plan.inputs(id));
        }
        // A node whose Job had ended at the last decision was acted on, so changed: one
        // that is not means the changes are not all there.
        if finished_now != self.finished {
            return None;
        }
        again.sort_unstable();
        again.dedup();
        for id in again {
            // A node waiting again (a retry) whose dependents went on without it, or one
            // whose dependents went so, is skipped by a whole decision.
            if self.kinds[id] == Kind::Waiting && !self.quiet(plan, id) {
                return None;
            }
            let key = priority(plan, id);
            if self.is_ready(plan, id) {
                self.ready.insert(key);
            } else {
                self.ready.remove(&key);
            }
        }

        let mut actions = Vec::new();
        for &id in &changed {
            if let NodeState::Finished {
                attempt,
                at,
                result,
            } = &states[id]
            {
                finished(policy, false, id, *attempt, *at, result, &mut actions);
            }
        }
        if !policy.suspend {
            let slots = policy.max_workers.saturating_sub(self.running) as usize;
            let due = self
                .ready
                .iter()
                .filter_map(|&(_, _, id)| match &states[id] {
                    NodeState::Waiting {
                        attempts,
                        not_before,
                    } if not_before.is_none_or(|t| now >= t) => Some(Action::CreateJob {
                        node: id,
                        attempt: attempts + 1,
                    }),
                    _ => None,
                });
            actions.extend(due.take(slots));
        }
        Some(actions)
    }

    /// Whether `id` waits with its inputs done and its image needed.
    fn is_ready(&self, plan: &Plan, id: NodeId) -> bool {
        self.kinds[id] == Kind::Waiting
            && plan.inputs(id).iter().all(|&d| self.kinds[d].is_done())
            && self.needed(plan, id)
    }

    /// Whether [`decide`] leaves a waiting node be (to wait, or to start): no input of it
    /// failed, and its image is needed.
    fn quiet(&self, plan: &Plan, id: NodeId) -> bool {
        !plan
            .inputs(id)
            .iter()
            .any(|&d| self.kinds[d] == Kind::Failed)
            && self.needed(plan, id)
    }

    /// Whether a waiting node's image is needed: a final image unless it exists (and is
    /// not rebuilt); an input while a waiting dependent's is.
    fn needed(&self, plan: &Plan, id: NodeId) -> bool {
        match plan.phase(id) {
            Phase::Assembly | Phase::PostAssembly => {
                self.terms.force_rebuild || self.registry[id] != Registry::Exists
            }
            Phase::Builder | Phase::Base => {
                (self.terms.force_rebuild || self.registry[id] != Registry::Exists)
                    && plan
                        .dependents(id)
                        .iter()
                        .any(|&d| self.kinds[d] == Kind::Waiting && self.needed(plan, d))
            }
        }
    }
}

/// Whether the frontier follows a node's change from `was` to `state`: one done or failed
/// stays so but for a retry of failed images; only a whole decision skips or fails a node
/// (a Job that fails for good fails its dependents in the same decision).
fn follows(was: Kind, state: &NodeState, policy: &Policy) -> bool {
    match state {
        NodeState::Waiting { .. } | NodeState::Running { .. } => {
            !matches!(was, Kind::Done | Kind::Failed)
        }
        NodeState::Finished {
            attempt, result, ..
        } => {
            !matches!(was, Kind::Done | Kind::Failed)
                && result
                    .as_ref()
                    .err()
                    .is_none_or(|f| f.class.is_transient() && *attempt < policy.attempts)
        }
        NodeState::Succeeded => was != Kind::Failed,
        NodeState::Skipped(_) => was.is_done(),
        NodeState::Failed(_) => was == Kind::Failed,
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::schedule::sim::{Attempt, simulate};
    use crate::schedule::{FailureClass, SkipReason};

    fn policy(workers: u32) -> Policy {
        Policy {
            max_workers: workers,
            attempts: 3,
            backoff_initial: Duration::from_secs(5),
            backoff_max: Duration::from_secs(20),
            force_rebuild: false,
            suspend: false,
            deadline: None,
        }
    }

    fn start() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    /// A plan of `n` instances, each with its own base.
    fn plan(n: usize) -> Plan {
        let ids: Vec<String> = (0..n).map(|i| format!("r__r-{i}")).collect();
        crate::plan::fixture(&ids.iter().map(String::as_str).collect::<Vec<_>>())
    }

    #[test]
    fn a_quiet_run_is_decided_from_its_frontier_after_the_first_decision() {
        let plan = plan(40);
        let registry = vec![Registry::Missing; plan.nodes.len()];
        let ok = |_, _| Attempt {
            seconds: 10.0,
            failure: None,
        };
        let report = simulate(&plan, &registry, &policy(4), start(), ok, |_| {}).unwrap();
        assert!(report.states.iter().all(|s| *s == NodeState::Succeeded));
        // Only the first decision reads every node (debug builds check every other
        // against the whole decision).
        assert_eq!(report.kept_up, report.decisions - 1, "{report:?}");
    }

    #[test]
    fn a_failure_for_good_or_a_registry_answer_makes_a_decision_whole_and_the_next_kept_up() {
        let plan = plan(30);
        let n = plan.nodes.len();
        // One image exists: the first decision skips it, so its frontier is made anew by
        // the next one.
        let bases: Vec<NodeId> = (0..n).filter(|&id| plan.phase(id) == Phase::Base).collect();
        let (flaky, bad) = (bases[0], bases[1]);
        let mut registry = vec![Registry::Missing; n];
        let exists = plan.dependents(bases[2])[0];
        registry[exists] = Registry::Exists;
        let oracle = |node, attempt| Attempt {
            seconds: 10.0,
            failure: if node == bad {
                Some(FailureClass::BuildError)
            } else if node == flaky && attempt == 1 {
                Some(FailureClass::RegistryThrottled)
            } else {
                None
            },
        };
        let report = simulate(&plan, &registry, &policy(4), start(), oracle, |_| {}).unwrap();
        assert_eq!(
            report.states[exists],
            NodeState::Skipped(SkipReason::Exists)
        );
        assert!(
            matches!(&report.states[bad], NodeState::Failed(f) if f.class == FailureClass::BuildError)
        );
        assert_eq!(report.states[flaky], NodeState::Succeeded);
        let dependent = plan.dependents(bad)[0];
        assert!(
            matches!(&report.states[dependent], NodeState::Failed(f) if f.class == FailureClass::DependencyFailed)
        );
        // Made whole: the first (it skips two images), the one the failure came to (it
        // fails the dependent too), and the one after it (its frontier made anew). Every
        // other is kept up, the retry's included.
        assert_eq!(report.kept_up, report.decisions - 3, "{report:?}");
    }

    #[test]
    fn a_frontier_is_not_kept_with_the_registry_unknown_past_the_deadline_or_with_changes_missing()
    {
        let plan = plan(3);
        let n = plan.nodes.len();
        let states = vec![NodeState::NEW; n];
        let now = start();
        let unknown = vec![Registry::Unknown; n];
        let (_, frontier) = decide_from(None, None, &plan, &unknown, &states, &policy(2), now);
        assert!(frontier.is_none());
        let registry = vec![Registry::Missing; n];
        let (actions, frontier) =
            decide_from(None, None, &plan, &registry, &states, &policy(2), now);
        let frontier = frontier.unwrap();
        assert!(!frontier.kept_up());
        let mut after = states.clone();
        for a in &actions {
            crate::schedule::apply(&mut after, a);
        }
        let touched: Vec<NodeId> = actions.iter().map(Action::node).collect();
        let past = Policy {
            deadline: Some(now),
            ..policy(2)
        };
        let (_, none) = decide_from(
            Some(frontier),
            Some(&touched),
            &plan,
            &registry,
            &after,
            &past,
            now,
        );
        assert!(none.is_none());
        // The builder's Job ended, and the decision on it acted: the next changes must
        // name it, or the decision is made whole.
        let builder = touched[0];
        after[builder] = NodeState::Finished {
            attempt: 1,
            at: now,
            result: Ok(()),
        };
        let (actions, frontier) =
            decide_from(None, None, &plan, &registry, &after, &policy(2), now);
        assert!(actions.contains(&Action::MarkSucceeded { node: builder }));
        for a in &actions {
            crate::schedule::apply(&mut after, a);
        }
        let (_, frontier) = decide_from(
            frontier,
            Some(&[]),
            &plan,
            &registry,
            &after,
            &policy(2),
            now,
        );
        assert!(!frontier.unwrap().kept_up());
    }
}
