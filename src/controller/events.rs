//! Kubernetes Events of a run: derived from the change between the status before and after
//! a reconcile, so they are emitted once per transition, never once per image (per-image
//! detail lives in the records). Pure: `transitions` returns what to publish.

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
    // Problems that appear while the run goes on: once when the condition turns True.
    for type_ in ["Stalled", "Degraded"] {
        let was = condition(old, type_).is_some_and(|c| c.status == "True");
        if let Some(c) = condition(new, type_).filter(|c| c.status == "True" && !was) {
            events.push(warning(&c.reason, "Observe", c.message.clone()));
        }
    }
    events
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

fn warning(reason: &str, action: &str, note: String) -> Event {
    event(EventType::Warning, reason, action, note)
}

fn event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    // The Events API caps the note at 1 KiB.
    let note = super::records::truncate(&note, 1000);
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

    #[test]
    fn long_notes_are_cut_to_the_api_limit() {
        let e = event(EventType::Warning, "X", "Y", "é".repeat(800));
        assert!(e.note.unwrap().len() <= 1003);
    }
}
