//! The run's status from its node states: per-phase counts, the overall phase, progress
//! strings and conditions. Pure.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{ImageBuildRunStatus, PhaseCounts, RunPhase};
use crate::plan::{Phase, Plan};
use crate::schedule::NodeState;

/// Counts of every phase.
pub fn counts(plan: &Plan, states: &[NodeState]) -> [PhaseCounts; 4] {
    let mut out = [PhaseCounts::default(); 4];
    for (node, state) in plan.nodes.iter().zip(states) {
        let c = &mut out[index(node.phase)];
        c.total += 1;
        match state {
            NodeState::Waiting { .. } => c.pending += 1,
            NodeState::Running { .. } | NodeState::Finished { .. } => c.running += 1,
            NodeState::Succeeded => c.succeeded += 1,
            NodeState::Skipped(_) => c.skipped += 1,
            NodeState::Failed(_) => c.failed += 1,
        }
    }
    out
}

fn index(phase: Phase) -> usize {
    match phase {
        Phase::Builder => 0,
        Phase::Base => 1,
        Phase::Assembly => 2,
        Phase::PostAssembly => 3,
    }
}

/// The run's phase once every node is final, or `Building`.
pub fn run_phase(counts: &[PhaseCounts; 4]) -> RunPhase {
    let open: u32 = counts.iter().map(|c| c.pending + c.running).sum();
    let failed: u32 = counts.iter().map(|c| c.failed).sum();
    let assemblies = &counts[2];
    if open > 0 {
        RunPhase::Building
    } else if failed == 0 {
        RunPhase::Succeeded
    } else if assemblies.succeeded + assemblies.skipped == 0 && assemblies.total > 0 {
        RunPhase::Failed
    } else {
        RunPhase::PartiallySucceeded
    }
}

/// Writes counts, progress strings and phase into `status`.
pub fn fill(status: &mut ImageBuildRunStatus, counts: &[PhaseCounts; 4]) {
    status.builder = counts[0];
    status.bases = counts[1];
    status.assemblies = counts[2];
    status.post_assemblies = counts[3];
    status.failed_total = counts.iter().map(|c| c.failed).sum();
    let done = |c: &PhaseCounts| format!("{}/{}", c.succeeded + c.skipped, c.total);
    let b = &counts[0];
    status.progress.builder = if b.failed > 0 {
        "Failed".into()
    } else if b.succeeded > 0 {
        "Succeeded".into()
    } else if b.skipped > 0 {
        "Skipped".into()
    } else if b.running > 0 {
        "Running".into()
    } else {
        "Pending".into()
    };
    status.progress.bases = done(&counts[1]);
    status.progress.assemblies = done(&counts[2]);
    status.phase = Some(run_phase(counts));
}

/// Sets condition `type_` in `conditions`, keeping its transition time when its status
/// does not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    let status_str = if status { "True" } else { "False" };
    let time = Time(k8s_openapi::jiff::Timestamp::from_second(now.timestamp()).unwrap_or_default());
    let new = Condition {
        type_: type_.into(),
        status: status_str.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: time,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == status_str => {
            c.reason = new.reason;
            c.message = new.message;
            c.observed_generation = generation;
        }
        Some(c) => *c = new,
        None => conditions.push(new),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(total: u32, succeeded: u32, skipped: u32, failed: u32, running: u32) -> PhaseCounts {
        PhaseCounts {
            total,
            succeeded,
            skipped,
            failed,
            running,
            pending: total - succeeded - skipped - failed - running,
        }
    }

    #[test]
    fn the_run_phase_follows_the_counts() {
        let none = PhaseCounts::default();
        assert_eq!(
            run_phase(&[c(1, 1, 0, 0, 0), c(2, 1, 0, 0, 1), c(2, 0, 0, 0, 0), none]),
            RunPhase::Building
        );
        assert_eq!(
            run_phase(&[c(1, 1, 0, 0, 0), c(2, 1, 1, 0, 0), c(2, 2, 0, 0, 0), none]),
            RunPhase::Succeeded
        );
        assert_eq!(
            run_phase(&[c(1, 1, 0, 0, 0), c(2, 1, 0, 1, 0), c(2, 1, 0, 1, 0), none]),
            RunPhase::PartiallySucceeded
        );
        assert_eq!(
            run_phase(&[c(1, 0, 0, 1, 0), c(2, 0, 0, 2, 0), c(2, 0, 0, 2, 0), none]),
            RunPhase::Failed
        );
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let mut conditions = vec![];
        let t0 = DateTime::from_timestamp(1_000, 0).unwrap();
        let t1 = DateTime::from_timestamp(2_000, 0).unwrap();
        set_condition(
            &mut conditions,
            "Stalled",
            true,
            "Unschedulable",
            "a",
            Some(1),
            t0,
        );
        set_condition(
            &mut conditions,
            "Stalled",
            true,
            "Unschedulable",
            "b",
            Some(1),
            t1,
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time.0.as_second(), 1_000);
        assert_eq!(conditions[0].message, "b");
        set_condition(
            &mut conditions,
            "Stalled",
            false,
            "Scheduled",
            "",
            Some(1),
            t1,
        );
        assert_eq!(conditions[0].last_transition_time.0.as_second(), 2_000);
    }
}
