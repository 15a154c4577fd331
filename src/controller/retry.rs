//! What a retry request (`spec.retryRequest`) does: the failed images it names (every
//! failed image, or those of the requested instances and the failed images they depend
//! on) are recorded as waiting for one more attempt, numbered after their last one. The
//! failure that ended them stays in the record until the new attempt ends. Pure: the
//! reconcile writes the records before the status that says the request was honoured,
//! so a crash in between honours it again and finds nothing left to reopen.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use crate::api::{RetryRequest, RetryStatus};
use crate::manifest::{Record, RecordStatus, Records};
use crate::plan::Plan;

/// Unknown instances named in the status message at most.
const MAX_UNKNOWN_NAMED: usize = 10;

/// The records that reopen the images `request` asks for, and what to say of it.
pub fn reopen(
    plan: &Plan,
    records: &Records,
    request: &RetryRequest,
    now: DateTime<Utc>,
) -> (BTreeMap<String, Record>, RetryStatus) {
    let wanted: Option<BTreeSet<&str>> = (!request.instances.is_empty())
        .then(|| request.instances.iter().map(String::as_str).collect());
    // The nodes asked for, and everything they are built on.
    let mut chosen = vec![wanted.is_none(); plan.nodes.len()];
    let mut known = BTreeSet::new();
    if let Some(wanted) = &wanted {
        for (id, node) in plan.nodes.iter().enumerate().rev() {
            let asked = node
                .instance_id
                .as_deref()
                .is_some_and(|i| wanted.contains(i));
            if asked {
                known.insert(node.instance_id.as_deref().unwrap_or_default());
            }
            if asked || chosen[id] {
                chosen[id] = true;
                for &dep in &node.deps {
                    chosen[dep] = true;
                }
            }
        }
    }
    let mut reopened = BTreeMap::new();
    for (node, _) in plan.nodes.iter().zip(&chosen).filter(|(_, c)| **c) {
        let Some(record) = records.get(&node.job_name) else {
            continue;
        };
        if record.status != RecordStatus::Failed {
            continue;
        }
        let mut again = record.clone();
        again.status = RecordStatus::Retrying;
        again.not_before = None;
        again.time = now;
        reopened.insert(node.job_name.clone(), again);
    }
    let unknown: Vec<&str> = wanted
        .iter()
        .flatten()
        .filter(|i| !known.contains(*i))
        .copied()
        .collect();
    let mut message = format!(
        "request {}: {} failed image(s) given another attempt",
        request.id,
        reopened.len()
    );
    if !unknown.is_empty() {
        let named: Vec<&str> = unknown.iter().take(MAX_UNKNOWN_NAMED).copied().collect();
        message.push_str(&format!(
            "; {} requested instance(s) not in the run: {}{}",
            unknown.len(),
            named.join(", "),
            if unknown.len() > named.len() {
                ", ..."
            } else {
                ""
            }
        ));
    }
    let status = RetryStatus {
        id: request.id,
        at: now,
        reopened: reopened.len() as u32,
        message: crate::text::truncate(&message, 1024),
    };
    (reopened, status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{Failure, FailureClass, NodeState};

    fn plan() -> Plan {
        crate::plan::fixture(&["a__a-1", "a__a-2", "b__b-1"])
    }

    fn failed(plan: &Plan, subject: &str, class: FailureClass, attempt: u32) -> (String, Record) {
        let node = plan.nodes.iter().find(|n| n.subject() == subject).unwrap();
        let failure = Failure {
            class,
            message: "boom".into(),
        };
        let at = DateTime::<Utc>::UNIX_EPOCH;
        (
            node.job_name.clone(),
            Record::failed(node, &failure, attempt, None, at),
        )
    }

    fn request(id: u32, instances: &[&str]) -> RetryRequest {
        RetryRequest {
            id,
            instances: instances.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn every_failed_image_gets_one_more_attempt_numbered_after_its_last() {
        let plan = plan();
        let mut records: BTreeMap<String, Record> = [
            failed(&plan, "a__a-1", FailureClass::BuildError, 1),
            failed(&plan, "a__a-2", FailureClass::RegistryThrottled, 3),
        ]
        .into();
        let built = plan.nodes.iter().find(|n| n.subject() == "b__b-1").unwrap();
        records.insert(
            built.job_name.clone(),
            Record::built(built, 1, DateTime::<Utc>::UNIX_EPOCH),
        );
        let now = Utc::now();
        let (reopened, status) = reopen(
            &plan,
            &Records::test_of(&plan, &records),
            &request(1, &[]),
            now,
        );
        assert_eq!(reopened.len(), 2);
        assert_eq!(status.reopened, 2);
        assert_eq!(status.id, 1);
        for (name, record) in &reopened {
            let before = &records[name];
            assert_eq!(record.status, RecordStatus::Retrying);
            assert_eq!(record.time, now);
            assert_eq!(
                record.state(),
                NodeState::Waiting {
                    attempts: before.attempt_count,
                    not_before: None
                },
                "the next attempt is numbered after the last one"
            );
            assert_eq!(record.failure_class, before.failure_class, "history kept");
        }
    }

    #[test]
    fn named_instances_reopen_with_the_failed_images_they_depend_on_only() {
        let plan = plan();
        let base_of_a = plan
            .nodes
            .iter()
            .find(|n| n.subject() == "docker.io/up/a_1776_a-1:latest")
            .map(|n| n.upstream_image.clone().unwrap())
            .unwrap();
        let records: BTreeMap<String, Record> = [
            failed(&plan, &base_of_a, FailureClass::BuildError, 1),
            failed(&plan, "a__a-1", FailureClass::DependencyFailed, 0),
            failed(&plan, "a__a-2", FailureClass::DependencyFailed, 0),
            failed(&plan, "b__b-1", FailureClass::BuildError, 1),
        ]
        .into();
        let (reopened, status) = reopen(
            &plan,
            &Records::test_of(&plan, &records),
            &request(2, &["a__a-1"]),
            Utc::now(),
        );
        let subjects: BTreeSet<&str> = plan
            .nodes
            .iter()
            .filter(|n| reopened.contains_key(&n.job_name))
            .map(|n| n.subject())
            .collect();
        assert_eq!(
            subjects,
            BTreeSet::from([&*base_of_a, "a__a-1"]),
            "the instance and the base it is built on; not its sibling, not b"
        );
        assert_eq!(status.reopened, 2);
        assert!(
            !status.message.contains("not in the run"),
            "{}",
            status.message
        );
    }

    #[test]
    fn unknown_instances_are_named_and_nothing_else_is_touched() {
        let plan = plan();
        let records: BTreeMap<String, Record> =
            [failed(&plan, "b__b-1", FailureClass::BuildError, 1)].into();
        let (reopened, status) = reopen(
            &plan,
            &Records::test_of(&plan, &records),
            &request(3, &["nope", "zz"]),
            Utc::now(),
        );
        assert!(reopened.is_empty());
        assert_eq!(status.reopened, 0);
        assert!(
            status
                .message
                .ends_with("2 requested instance(s) not in the run: nope, zz"),
            "{}",
            status.message
        );
    }
}
