//! The run's status from its node states: per-phase counts, the overall phase, progress
//! strings and conditions. Pure.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{FailureRecord, ImageBuildRunStatus, MAX_FAILURE_RECORDS, PhaseCounts, RunPhase};
use crate::manifest::{Record, RecordStatus, Records};
use crate::plan::{NodeId, Plan};
use crate::schedule::{NodeState, tally};

/// Counts of every phase.
pub fn counts(plan: &Plan, states: &[NodeState]) -> [PhaseCounts; 4] {
    crate::schedule::Tally::of(plan, states).counts()
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

/// Writes counts, progress strings and phase into `status`; `builder_retrying` says the
/// builder waits for another attempt.
pub fn fill(status: &mut ImageBuildRunStatus, counts: &[PhaseCounts; 4], builder_retrying: bool) {
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
    } else if builder_retrying {
        "Retrying".into()
    } else {
        "Pending".into()
    };
    status.progress.bases = done(&counts[1]);
    status.progress.assemblies = done(&counts[2]);
    status.phase = Some(run_phase(counts));
}

/// The most recent failures of the plan's images, newest first, at most
/// [`MAX_FAILURE_RECORDS`].
pub fn failures(records: &Records) -> Vec<FailureRecord> {
    let plan = records.plan();
    let mut failed: Vec<(NodeId, &Record)> = failed(records).collect();
    // Newest first; plan order among equals, so the list is stable.
    failed.sort_by_key(|&(id, r)| (std::cmp::Reverse(r.time), id));
    failed
        .into_iter()
        .take(MAX_FAILURE_RECORDS)
        .map(|(id, r)| {
            let node = &plan.nodes[id];
            FailureRecord {
                instance: node.subject().to_string(),
                phase: node.phase.as_str().to_string(),
                reason: r.failure_class.clone().unwrap_or_default(),
                message: last_line(r.error.as_deref().unwrap_or(""), 300),
                time: r.time,
            }
        })
        .collect()
}

/// The records of the plan's images that failed for good, with their nodes.
fn failed(records: &Records) -> impl Iterator<Item = (NodeId, &Record)> {
    records.planned_of(RecordStatus::Failed)
}

/// The last non-empty line of `text`, cut to at most `max` bytes on a character boundary,
/// keeping its end (where BuildKit says why: `...: exit code: 1`).
fn last_line(text: &str, max: usize) -> String {
    let line = text
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    crate::text::shorten(line, max)
}

/// The message of Stalled when `count` images already failed because their pods could
/// not be scheduled within `timeouts.pending` (their pods are gone, the problem is not);
/// `first` is the first of them.
fn unschedulable_failures(count: usize, first: &Record) -> String {
    format!(
        "{count} image(s) could not be scheduled within timeouts.pending; the scheduler said: {}",
        first.error.as_deref().unwrap_or("")
    )
}

/// What the status reads of the records, gathered once per change of them: a reconcile
/// reuses it until the manifest's records change (`Manifest::version`), rather than going
/// over every record for each of these on every reconcile.
#[derive(Clone, Debug, Default)]
pub struct RecordFacts {
    /// The most recent failures (see [`failures`]).
    pub failures: Vec<FailureRecord>,
    /// The Stalled message for images failed as unschedulable (for good, or waiting for a
    /// retry): how many, and what the scheduler said of the first.
    pub unschedulable: Option<String>,
    /// The attempts of each image of the plan that failed for good with a transient
    /// failure.
    transient_attempts: Vec<u32>,
    /// When each image finished (built, skipped or failed; not one waiting for a retry),
    /// in time order.
    finished: Vec<DateTime<Utc>>,
    /// Seconds of the built images' Jobs summed by phase, and their number.
    build_seconds: [(f64, u32); 4],
    /// The median of the built images' `duration_seconds` by phase (the metrics'
    /// `imagebuild_run_build_duration_median_seconds`).
    pub medians: [Option<f64>; 4],
}

impl RecordFacts {
    /// The facts of `records` (of the plan they hold).
    pub fn of(records: &Records) -> RecordFacts {
        // One pass over the records (20,000 of a few hundred bytes each at 10,000
        // instances: reading them is most of the cost), the failed ones apart.
        let unschedulable_class = Some(crate::schedule::FailureClass::Unschedulable.as_str());
        let mut finished: Vec<DateTime<Utc>> = Vec::with_capacity(records.len());
        let mut build_seconds = [(0f64, 0u32); 4];
        let mut durations: [Vec<u64>; 4] = Default::default();
        let mut unschedulable: Option<(usize, &Record)> = None;
        for r in records.values() {
            if r.status != RecordStatus::Retrying {
                finished.push(r.time);
            }
            if r.failure_class.as_deref() == unschedulable_class {
                unschedulable.get_or_insert((0, r)).0 += 1;
            }
            if r.status != RecordStatus::Built {
                continue;
            }
            durations[tally::index(r.phase)].extend(r.duration_seconds);
            let Some(start) = r.started_at else {
                continue;
            };
            let end = r.finished_at.unwrap_or(r.time);
            let (sum, n) = &mut build_seconds[tally::index(r.phase)];
            *sum += (end - start).num_milliseconds().max(0) as f64 / 1000.0;
            *n += 1;
        }
        finished.sort_unstable();
        RecordFacts {
            failures: failures(records),
            unschedulable: unschedulable.map(|(count, first)| unschedulable_failures(count, first)),
            transient_attempts: failed(records)
                .filter(|(_, r)| r.failure().class.is_transient())
                .map(|(_, r)| r.attempt_count)
                .collect(),
            finished,
            build_seconds,
            medians: durations.map(|mut d| crate::summary::median(&mut d)),
        }
    }

    /// Images of the plan that failed for good with a transient failure after `attempts`
    /// attempts (not those a run deadline cut short).
    pub fn retries_exhausted(&self, attempts: u32) -> u32 {
        self.transient_attempts
            .iter()
            .filter(|&&a| a >= attempts)
            .count() as u32
    }

    /// When the last image finished.
    pub fn last_progress_at(&self) -> Option<DateTime<Utc>> {
        self.finished.last().copied()
    }

    /// Images finished per hour over the last `window` (or since the run started, if
    /// that is shorter); `None` before anything finished.
    pub fn images_per_hour(
        &self,
        started: DateTime<Utc>,
        now: DateTime<Utc>,
        window: chrono::Duration,
    ) -> Option<f64> {
        let from = (now - window).max(started);
        let span = (now - from).num_milliseconds() as f64 / 3_600_000.0;
        let done = self.finished.len() - self.finished.partition_point(|t| *t <= from);
        (done > 0 && span > 0.0).then(|| (done as f64 / span * 10.0).round() / 10.0)
    }

    /// When the run should end: the images not yet final (pending or running in
    /// `counts`), each costing the mean observed build time of its phase (or of all
    /// phases, when its own has none yet), spread over `max_workers`. `None` before any
    /// build finished.
    pub fn estimated_completion(
        &self,
        counts: &[PhaseCounts; 4],
        max_workers: u32,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let total_n: u32 = self.build_seconds.iter().map(|(_, n)| n).sum();
        if total_n == 0 {
            return None;
        }
        let overall = self.build_seconds.iter().map(|(s, _)| s).sum::<f64>() / total_n as f64;
        let mean = |i: usize| match self.build_seconds[i] {
            (sum, n) if n > 0 => sum / n as f64,
            _ => overall,
        };
        let left: f64 = (0..4)
            .map(|i| f64::from(counts[i].pending + counts[i].running) * mean(i))
            .sum();
        let seconds = left / max_workers.max(1) as f64;
        chrono::Duration::try_milliseconds((seconds * 1000.0) as i64)
            .and_then(|left| now.checked_add_signed(left))
    }
}

/// Whether `new` differs from `old` in what users and tools wait on (phase, generation,
/// a condition's status or reason, the builder's state), as opposed to counts and
/// messages only.
pub fn significant(old: &ImageBuildRunStatus, new: &ImageBuildRunStatus) -> bool {
    let key = |s: &ImageBuildRunStatus| {
        let mut c: Vec<(String, String, String)> = s
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect();
        c.sort();
        (
            s.phase,
            s.observed_generation,
            c,
            s.progress.builder.clone(),
            s.last_retry.as_ref().map(|r| r.id),
        )
    };
    key(old) != key(new)
}

/// The status as a JSON merge patch (RFC 7386): all of it, with `null` for every field it
/// leaves out, so a field that went away is removed whatever the copy the operator read
/// held (a merge patch of the status alone would leave it).
pub fn patch_body(status: &ImageBuildRunStatus) -> serde_json::Value {
    static FIELDS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        let schema = schemars::schema_for!(ImageBuildRunStatus);
        schema
            .as_value()
            .get("properties")
            .and_then(|p| p.as_object())
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    });
    #[allow(
        clippy::expect_used,
        reason = "the status has string keys and derived Serialize only: it cannot fail"
    )]
    let mut body = serde_json::to_value(status).expect("a status serializes");
    if let Some(map) = body.as_object_mut() {
        for field in FIELDS.iter() {
            map.entry(field.clone()).or_insert(serde_json::Value::Null);
        }
    }
    body
}

/// The longest condition message, in bytes (the API allows 32,768): an error
/// that quotes a huge value is cut here, so the status write is never refused.
pub const MAX_CONDITION_MESSAGE: usize = 2048;

/// Sets condition `type_` in `conditions`, keeping its transition time when its status
/// does not change; its message is cut to [`MAX_CONDITION_MESSAGE`] bytes.
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
    let message = crate::text::truncate(message, MAX_CONDITION_MESSAGE);
    let time = Time(k8s_openapi::jiff::Timestamp::from_second(now.timestamp()).unwrap_or_default());
    let new = Condition {
        type_: type_.into(),
        status: status_str.into(),
        reason: reason.into(),
        message,
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
    use crate::plan::Phase;

    /// The plan of `n` instances `r__r-00`, `r__r-01`, ... with one base each.
    fn small_plan(n: usize) -> Plan {
        let ids: Vec<String> = (0..n).map(|i| format!("r__r-{i:02}")).collect();
        crate::plan::fixture(&ids.iter().map(String::as_str).collect::<Vec<_>>())
    }

    #[test]
    fn throughput_and_estimate_come_from_the_records() {
        let plan = small_plan(10);
        let now = Utc::now();
        let minutes = |m: i64| chrono::Duration::minutes(m);
        // The builder and 4 bases built, each in 2 minutes, the last 4 within the hour.
        let mut records = std::collections::BTreeMap::new();
        let mut states = vec![NodeState::NEW; plan.nodes.len()];
        for (i, node) in plan.nodes.iter().enumerate().take(5) {
            let end = now - minutes(10 * i as i64);
            let mut r = Record::built(node, 1, end);
            r.started_at = Some(end - minutes(2));
            r.duration_seconds = Some(100 + 10 * i as u64);
            records.insert(node.job_name.clone(), r);
            states[i] = NodeState::Succeeded;
        }
        // One waiting for a retry has not finished.
        let retrying = &plan.nodes[5];
        let failure = crate::schedule::Failure::new(
            crate::schedule::FailureClass::RegistryUnavailable,
            "push refused",
        );
        let mut again = Record::failed(retrying, &failure, 1, None, now);
        again.status = RecordStatus::Retrying;
        records.insert(retrying.job_name.clone(), again);
        // One failed for good after 3 attempts at a transient failure.
        let exhausted = &plan.nodes[6];
        let failed = Record::failed(exhausted, &failure, 3, None, now - minutes(60));
        records.insert(exhausted.job_name.clone(), failed);
        let facts = RecordFacts::of(&Records::test_of(&plan, &records));
        assert_eq!(facts.retries_exhausted(3), 1);
        assert_eq!(
            facts.retries_exhausted(4),
            0,
            "it had a fourth attempt to go"
        );
        assert_eq!(facts.failures.len(), 1);
        // The builder's 100 s; the bases' 110, 120, 130 and 140 s.
        assert_eq!(facts.medians, [Some(100.0), Some(125.0), None, None]);
        assert_eq!(facts.last_progress_at(), Some(now));
        let rate = facts.images_per_hour(now - minutes(120), now, minutes(30));
        assert_eq!(rate, Some(6.0), "3 images in the last 30 minutes");
        let rate = facts.images_per_hour(now - minutes(120), now, minutes(5));
        assert_eq!(rate, Some(12.0), "1 image in the last 5 minutes");
        let none = RecordFacts::of(&Records::default());
        assert_eq!(
            none.images_per_hour(now - minutes(120), now, minutes(5)),
            None
        );
        assert_eq!(none.last_progress_at(), None);
        // 6 bases and 10 assemblies left at 2 minutes each, 4 workers: 8 minutes.
        let counts = counts(&plan, &states);
        let eta = facts.estimated_completion(&counts, 4, now).unwrap();
        assert_eq!((eta - now).num_seconds(), 16 * 120 / 4);
        assert_eq!(none.estimated_completion(&counts, 4, now), None);
    }

    #[test]
    fn only_phase_generation_and_condition_changes_are_significant() {
        let now = Utc::now();
        let mut old = ImageBuildRunStatus {
            phase: Some(RunPhase::Building),
            ..Default::default()
        };
        set_condition(
            &mut old.conditions,
            "Ready",
            false,
            "Building",
            "0/5",
            Some(1),
            now,
        );
        let mut counts = old.clone();
        counts.assemblies.succeeded = 3;
        set_condition(
            &mut counts.conditions,
            "Ready",
            false,
            "Building",
            "3/5",
            Some(1),
            now,
        );
        assert!(!significant(&old, &counts), "counts and messages alone");
        let mut stalled = old.clone();
        set_condition(
            &mut stalled.conditions,
            "Stalled",
            true,
            "Unschedulable",
            "",
            Some(1),
            now,
        );
        assert!(significant(&old, &stalled));
        let mut done = old.clone();
        done.phase = Some(RunPhase::Succeeded);
        assert!(significant(&old, &done));
    }

    #[test]
    fn failures_are_newest_first_bounded_and_short() {
        use crate::schedule::{Failure, FailureClass};
        let plan = small_plan(30);
        let t0 = Utc::now();
        let mut records = std::collections::BTreeMap::new();
        for (i, node) in plan.nodes.iter().enumerate() {
            let at = t0 + chrono::Duration::seconds(i as i64);
            let record = if node.phase == Phase::Assembly {
                let message = format!("step 1\nERROR: {}\n\n", "x".repeat(i * 10));
                let failure = Failure::new(FailureClass::BuildError, message);
                Record::failed(node, &failure, 1, None, at)
            } else {
                Record::built(node, 1, at)
            };
            records.insert(node.job_name.clone(), record);
        }
        let list = failures(&Records::test_of(&plan, &records));
        assert_eq!(list.len(), MAX_FAILURE_RECORDS);
        assert_eq!(list[0].instance, "r__r-29", "newest first");
        assert!(list.windows(2).all(|w| w[0].time >= w[1].time));
        assert!(
            list.iter()
                .all(|f| f.phase == "assembly" && f.reason == "BuildError")
        );
        // The line's end stays: where BuildKit says why.
        assert!(
            list[0].message.starts_with("...xxx") && list[0].message.len() <= 303,
            "{:?}",
            list[0].message
        );
    }

    #[test]
    fn the_facts_count_unschedulable_images_and_finished_ones_in_one_pass() {
        use crate::schedule::{Failure, FailureClass};
        let plan = small_plan(6);
        let t0 = Utc::now();
        let unplaced = |text: &str| Failure::new(FailureClass::Unschedulable, text);
        let mut records = std::collections::BTreeMap::new();
        for (i, node) in plan.nodes.iter().enumerate() {
            let at = t0 + chrono::Duration::seconds(i as i64);
            let record = match i {
                // Failed for good, and waiting for a retry: both counted as unschedulable.
                1 => Record::failed(node, &unplaced("0/3 nodes: disk"), 1, None, at),
                2 => Record::failed(node, &unplaced("0/3 nodes: cpu"), 1, Some(at), at),
                3 => Record::failed(
                    node,
                    &Failure::new(FailureClass::BuildError, "x"),
                    1,
                    None,
                    at,
                ),
                _ => Record::built(node, 1, at),
            };
            records.insert(node.job_name.clone(), record);
        }
        let records = Records::test_of(&plan, &records);
        let facts = RecordFacts::of(&records);
        assert_eq!(
            facts.unschedulable.as_deref(),
            Some(
                "2 image(s) could not be scheduled within timeouts.pending; the scheduler said: 0/3 nodes: disk"
            )
        );
        // Every image but the one waiting for its retry has finished.
        assert_eq!(facts.finished.len(), plan.nodes.len() - 1);
        assert!(facts.finished.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(facts.failures.len(), 2);
        let none = RecordFacts::of(&Records::test_of(&plan, &Default::default()));
        assert_eq!(none.unschedulable, None);
    }

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

    #[test]
    fn the_patch_removes_what_the_status_leaves_out() {
        let status = ImageBuildRunStatus {
            phase: Some(RunPhase::Succeeded),
            ..Default::default()
        };
        let body = patch_body(&status);
        assert_eq!(body["phase"], "Succeeded");
        for field in [
            "estimatedCompletion",
            "failures",
            "manifests",
            "retriesExhausted",
        ] {
            assert!(body[field].is_null(), "{field}: {body}");
            assert!(body.as_object().unwrap().contains_key(field), "{field}");
        }
        assert_eq!(body["builder"]["total"], 0);
    }
}
