//! Kubernetes Events of a run: derived from the change between the status before and after
//! a reconcile, so they are emitted once per transition, never once per image (per-image
//! detail lives in the manifest). Counts of failures are reported when they reach 1, 10,
//! 100, 1000... so a run of any size emits a handful. Pure: `transitions` returns what to
//! publish.

use kube::runtime::events::{Event, EventType};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::api::{ImageBuildRunStatus, RunPhase};

/// The Events a status change warrants, in order.
pub fn transitions(old: &ImageBuildRunStatus, new: &ImageBuildRunStatus) -> Vec<Event> {
    let mut events = Vec::new();
    if old.phase != new.phase {
        match new.phase {
            Some(RunPhase::Building) => {
                events.push(normal("Resolved", "Plan", ready_message(new)));
            }
            Some(RunPhase::Succeeded) => {
                events.push(normal("Completed", "Finish", ready_message(new)));
            }
            Some(RunPhase::Cancelled) => {
                events.push(normal("Cancelled", "Cancel", ready_message(new)));
            }
            Some(phase @ (RunPhase::PartiallySucceeded | RunPhase::Failed)) => {
                let reason = condition(new, "Ready")
                    .map(|c| c.reason.clone())
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| format!("{phase:?}"));
                events.push(warning(&reason, "Finish", ready_message(new)));
            }
            _ => {}
        }
    }
    if let Some(retry) = &new.last_retry
        && old.last_retry.as_ref().map(|r| r.id) != Some(retry.id)
    {
        events.push(normal("RetryRequested", "Retry", retry.message.clone()));
    }
    let (was, is) = (old.progress.builder.as_str(), new.progress.builder.as_str());
    if was != is {
        // Not "Failed": a builder can fail without running (the run's deadline passed).
        let started = |s: &str| matches!(s, "Running" | "Retrying" | "Succeeded");
        if started(is) && !started(was) {
            events.push(normal(
                "BuilderStarted",
                "Build",
                "the builder image is being built".into(),
            ));
        }
        match is {
            "Succeeded" => events.push(normal(
                "BuilderSucceeded",
                "Build",
                "the builder image was built and pushed; bases and assemblies follow".into(),
            )),
            "Skipped" => events.push(normal(
                "BuilderSkipped",
                "Build",
                "the builder image is already in the registry".into(),
            )),
            _ => {}
        }
    }
    if let Some(n) = crossed(old.failed_total, new.failed_total) {
        let latest = new
            .failures
            .first()
            .map(|f| {
                format!(
                    " (latest: {} {}: {}: {})",
                    f.phase, f.instance, f.reason, f.message
                )
            })
            .unwrap_or_default();
        events.push(warning(
            "ImagesFailed",
            "Build",
            format!("{n} image(s) failed so far{latest}; every failure is in the run's manifest"),
        ));
    }
    if let Some(n) = crossed(old.retries_exhausted, new.retries_exhausted) {
        events.push(warning(
            "RetriesExhausted",
            "Retry",
            format!(
                "{n} image(s) failed with a transient error after every attempt retry.attempts allows"
            ),
        ));
    }
    // Problems that appear while the run goes on: once when the condition turns True.
    for type_ in ["Stalled", "Degraded"] {
        let was = condition(old, type_).is_some_and(|c| c.status == "True");
        if let Some(c) = condition(new, type_).filter(|c| c.status == "True" && !was) {
            events.push(warning(&c.reason, "Observe", c.message.clone()));
        }
    }
    events
}

/// `new` if a power of ten (1, 10, 100...) lies in `old+1..=new`.
fn crossed(old: u32, new: u32) -> Option<u32> {
    let mut step = 1u32;
    while step <= new {
        if step > old {
            return Some(new);
        }
        step = step.checked_mul(10)?;
    }
    None
}

fn condition<'a>(status: &'a ImageBuildRunStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

fn ready_message(status: &ImageBuildRunStatus) -> String {
    condition(status, "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

fn normal(reason: &str, action: &str, note: String) -> Event {
    event(EventType::Normal, reason, action, note)
}

pub(super) fn warning(reason: &str, action: &str, note: String) -> Event {
    event(EventType::Warning, reason, action, note)
}

fn event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    // The Events API caps the note at 1 KiB.
    let note = crate::text::truncate(&note, 1000);
    Event {
        type_,
        reason: reason.to_string(),
        note: (!note.is_empty()).then_some(note),
        action: action.to_string(),
        secondary: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::status::set_condition;

    fn status(phase: RunPhase, conditions: &[(&str, bool, &str, &str)]) -> ImageBuildRunStatus {
        let mut s = ImageBuildRunStatus {
            phase: Some(phase),
            ..Default::default()
        };
        for (t, v, r, m) in conditions {
            set_condition(&mut s.conditions, t, *v, r, m, Some(1), chrono::Utc::now());
        }
        s
    }

    #[test]
    fn one_event_per_transition() {
        let resolving = status(RunPhase::Resolving, &[]);
        let building = status(
            RunPhase::Building,
            &[("Ready", false, "Building", "builder 0/1")],
        );
        let e = transitions(&resolving, &building);
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].reason.as_str(), e[0].type_),
            ("Resolved", EventType::Normal)
        );
        assert!(transitions(&building, &building).is_empty());

        let stalled = status(
            RunPhase::Building,
            &[
                ("Ready", false, "Building", "builder 0/1"),
                ("Stalled", true, "Unschedulable", "0/4 nodes are available"),
            ],
        );
        let e = transitions(&building, &stalled);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].type_, EventType::Warning);
        assert_eq!(e[0].reason, "Unschedulable");
        assert_eq!(e[0].note.as_deref(), Some("0/4 nodes are available"));
        assert!(
            transitions(&stalled, &stalled).is_empty(),
            "not again while it lasts"
        );

        let partial = status(
            RunPhase::PartiallySucceeded,
            &[("Ready", false, "PartiallySucceeded", "3 failed")],
        );
        let e = transitions(&stalled, &partial);
        assert_eq!(
            (e[0].reason.as_str(), e[0].type_),
            ("PartiallySucceeded", EventType::Warning)
        );
    }

    fn reasons(old: &ImageBuildRunStatus, new: &ImageBuildRunStatus) -> Vec<String> {
        transitions(old, new)
            .into_iter()
            .map(|e| e.reason)
            .collect()
    }

    #[test]
    fn the_builder_is_announced_once_per_state() {
        let at = |builder: &str| {
            let mut s = status(RunPhase::Building, &[]);
            s.progress.builder = builder.into();
            s
        };
        let (pending, running, retrying) = (at("Pending"), at("Running"), at("Retrying"));
        assert_eq!(reasons(&pending, &running), ["BuilderStarted"]);
        assert!(
            reasons(&running, &retrying).is_empty(),
            "a retry is not a start"
        );
        assert!(reasons(&retrying, &running).is_empty());
        assert_eq!(reasons(&running, &at("Succeeded")), ["BuilderSucceeded"]);
        // Built between two status writes: both.
        assert_eq!(
            reasons(&pending, &at("Succeeded")),
            ["BuilderStarted", "BuilderSucceeded"]
        );
        assert_eq!(reasons(&pending, &at("Skipped")), ["BuilderSkipped"]);
        assert!(
            reasons(&pending, &at("Failed")).is_empty(),
            "the run's Event says it"
        );
        assert!(reasons(&pending, &pending).is_empty());
    }

    #[test]
    fn failures_are_counted_at_powers_of_ten() {
        assert_eq!(crossed(0, 1), Some(1));
        assert_eq!(crossed(1, 9), None);
        assert_eq!(crossed(5, 12), Some(12));
        assert_eq!(crossed(10, 99), None);
        assert_eq!(crossed(99, 100), Some(100));
        assert_eq!(crossed(0, 0), None);
        assert_eq!(crossed(1_000_000_000, u32::MAX), None);
        // A 10,000-image run failing every image: five Events, not 10,000.
        let events = (0..10_000u32)
            .filter(|&n| crossed(n, n + 1).is_some())
            .count();
        assert_eq!(events, 5);

        let mut old = status(RunPhase::Building, &[]);
        let mut new = old.clone();
        new.failed_total = 3;
        new.retries_exhausted = 1;
        new.failures.push(crate::api::FailureRecord {
            instance: "django__django-1".into(),
            phase: "assembly".into(),
            reason: "RegistryThrottled".into(),
            message: "429 Too Many Requests".into(),
            time: chrono::Utc::now(),
        });
        let e = transitions(&old, &new);
        assert_eq!(
            e.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(),
            ["ImagesFailed", "RetriesExhausted"]
        );
        assert!(e.iter().all(|e| e.type_ == EventType::Warning));
        let note = e[0].note.as_deref().unwrap();
        assert!(
            note.starts_with(
                "3 image(s) failed so far (latest: assembly django__django-1: RegistryThrottled"
            ),
            "{note}"
        );
        old = new.clone();
        new.failed_total = 9;
        assert!(transitions(&old, &new).is_empty());
    }

    #[test]
    fn long_notes_are_cut_to_the_api_limit() {
        let e = event(EventType::Warning, "X", "Y", "é".repeat(800));
        assert!(e.note.unwrap().len() <= 1003);
    }
}
