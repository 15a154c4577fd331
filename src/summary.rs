//! The `summary` command's report: what the build scripts' summary showed, derived from a
//! run's manifest (and its status, for the planned totals and the wall clock). Pure: the
//! caller reads the run and its manifest.
//!
//! The JSON form is stable: `schema_version` changes when a field changes meaning or goes
//! away (fields may be added). `docs/manifest.md` documents it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::api::{ImageBuildRunStatus, PhaseCounts, RunPhase};
use crate::manifest::{Record, RecordStatus};

/// The version of the JSON form.
pub const SCHEMA_VERSION: u32 = 1;
/// Builds listed under `slowest`.
pub const SLOWEST: usize = 10;
/// The phases, in the order they are reported.
pub const PHASES: [&str; 4] = ["builder", "base", "assembly", "postAssembly"];

/// A run's summary.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Summary {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The run.
    pub run: String,
    /// Its namespace.
    pub namespace: String,
    /// Its phase, when the operator has set one.
    pub phase: Option<RunPhase>,
    /// When the operator started the run.
    pub started_at: Option<DateTime<Utc>>,
    /// When the run ended (none while it runs).
    pub completed_at: Option<DateTime<Utc>>,
    /// From `started_at` to `completed_at`, or to now while the run goes on.
    pub wall_clock_seconds: Option<u64>,
    /// The recorded attempts' `duration_seconds` added up: the worker time the images took.
    pub image_seconds: u64,
    /// Counts over every phase.
    pub totals: Totals,
    /// Counts and timings of each phase that has images, in build order.
    pub phases: Vec<PhaseSummary>,
    /// The longest builds (by `build_seconds`), longest first.
    pub slowest: Vec<Build>,
    /// Every image that failed for good, in phase order, then by subject.
    pub failed: Vec<FailedBuild>,
    /// Skipped images by manifest status (`skipped_remote_exists`, `skipped_not_needed`).
    pub skip_reasons: BTreeMap<String, u32>,
}

/// Image counts.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Images planned (from the status; the records, when the status has no counts).
    pub images: u32,
    /// Built and pushed.
    pub built: u32,
    /// Not built: in the registry already, or not needed.
    pub skipped: u32,
    /// Failed for good.
    pub failed: u32,
    /// Took more than one attempt, whatever the end (`attempt_count` > 1).
    pub retried: u32,
    /// Not finished: waiting, running, or waiting to retry.
    pub pending: u32,
}

/// One phase.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct PhaseSummary {
    /// builder, base, assembly or postAssembly.
    pub phase: String,
    /// Its counts.
    pub totals: Totals,
    /// Statistics of the built images' `build_seconds` (none reported: absent).
    pub build_seconds: Option<Stats>,
    /// Statistics of the built images' `duration_seconds`.
    pub duration_seconds: Option<Stats>,
}

/// Order statistics of a set of seconds.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// How many values.
    pub count: u32,
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The 95th percentile, nearest rank.
    pub p95: u64,
    /// The largest.
    pub max: u64,
    /// The sum.
    pub total: u64,
}

/// A built image.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Build {
    /// Its phase.
    pub phase: String,
    /// Its instance, upstream image (a base) or `builder`.
    pub subject: String,
    /// The image.
    pub image: String,
    /// Seconds the build took.
    pub build_seconds: u64,
    /// Seconds the Job took.
    pub duration_seconds: Option<u64>,
    /// Attempts.
    pub attempt_count: u32,
}

/// An image that failed for good.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct FailedBuild {
    /// Its phase.
    pub phase: String,
    /// Its instance, upstream image (a base) or `builder`.
    pub subject: String,
    /// The image.
    pub image: String,
    /// The failure class (a PascalCase reason).
    pub failure_class: String,
    /// Attempts made.
    pub attempt_count: u32,
    /// The end of the error, as recorded.
    pub error: String,
}

/// What an image was built for, as people name it.
pub fn subject(record: &Record) -> &str {
    record
        .instance_id
        .as_deref()
        .or(record.base_image.as_deref())
        .unwrap_or("builder")
}

/// The median of `values` (of the middle two when their number is even), reordering
/// them; `None` when empty. The same as [`stats`]' without a sort.
pub fn median(values: &mut [u64]) -> Option<f64> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let (below, &mut mid, _) = values.select_nth_unstable(n / 2);
    if n % 2 == 1 {
        return Some(mid as f64);
    }
    let under = below.iter().copied().max().unwrap_or(mid);
    Some((under as f64 + mid as f64) / 2.0)
}

/// The order statistics of `values`; `None` when empty.
pub fn stats(mut values: Vec<u64>) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2] as f64
    } else {
        (values[n / 2 - 1] as f64 + values[n / 2] as f64) / 2.0
    };
    let rank = (n * 95).div_ceil(100);
    Some(Stats {
        count: n as u32,
        median,
        p95: values[rank.max(1) - 1],
        max: values[n - 1],
        total: values.iter().fold(0u64, |a, &v| a.saturating_add(v)),
    })
}

/// Summarises the run from its `records` (by Job name) and its status.
pub fn summarize<'a>(
    run: &str,
    namespace: &str,
    status: Option<&ImageBuildRunStatus>,
    records: impl IntoIterator<Item = &'a Record>,
    now: DateTime<Utc>,
) -> Summary {
    let records: Vec<&Record> = records.into_iter().collect();
    let planned = |phase: &str| -> Option<u32> {
        let s = status?;
        let counts: &PhaseCounts = match phase {
            "builder" => &s.builder,
            "base" => &s.bases,
            "assembly" => &s.assemblies,
            _ => &s.post_assemblies,
        };
        (counts.total > 0).then_some(counts.total)
    };
    let mut phases = Vec::new();
    for phase in PHASES {
        let mine: Vec<&Record> = records
            .iter()
            .copied()
            .filter(|r| r.phase.as_str() == phase)
            .collect();
        let totals = totals(&mine, planned(phase));
        if totals.images == 0 {
            continue;
        }
        let built = || mine.iter().filter(|r| r.status == RecordStatus::Built);
        phases.push(PhaseSummary {
            phase: phase.into(),
            totals,
            build_seconds: stats(built().filter_map(|r| r.build_seconds).collect()),
            duration_seconds: stats(built().filter_map(|r| r.duration_seconds).collect()),
        });
    }
    let mut all = Totals::default();
    for p in &phases {
        all.images += p.totals.images;
        all.built += p.totals.built;
        all.skipped += p.totals.skipped;
        all.failed += p.totals.failed;
        all.retried += p.totals.retried;
        all.pending += p.totals.pending;
    }

    let mut slowest: Vec<Build> = records
        .iter()
        .filter(|r| r.status == RecordStatus::Built)
        .filter_map(|r| {
            Some(Build {
                phase: r.phase.as_str().into(),
                subject: subject(r).into(),
                image: r.image().into(),
                build_seconds: r.build_seconds?,
                duration_seconds: r.duration_seconds,
                attempt_count: r.attempt_count,
            })
        })
        .collect();
    slowest.sort_by(|a, b| {
        b.build_seconds
            .cmp(&a.build_seconds)
            .then_with(|| a.subject.cmp(&b.subject))
    });
    slowest.truncate(SLOWEST);

    let phase_rank = |p: &str| PHASES.iter().position(|q| *q == p).unwrap_or(PHASES.len());
    let mut failed: Vec<FailedBuild> = records
        .iter()
        .filter(|r| r.status == RecordStatus::Failed)
        .map(|r| FailedBuild {
            phase: r.phase.as_str().into(),
            subject: subject(r).into(),
            image: r.image().into(),
            failure_class: r.failure_class.clone().unwrap_or_default(),
            attempt_count: r.attempt_count,
            error: r.error.clone().unwrap_or_default(),
        })
        .collect();
    failed.sort_by(|a, b| {
        (phase_rank(&a.phase), &a.subject).cmp(&(phase_rank(&b.phase), &b.subject))
    });

    let mut skip_reasons = BTreeMap::new();
    for r in records.iter().filter(|r| r.status.is_skipped()) {
        #[allow(
            clippy::expect_used,
            reason = "a unit enum with derived Serialize: serializing it cannot fail"
        )]
        let key = serde_json::to_value(r.status).expect("a status serializes");
        *skip_reasons
            .entry(key.as_str().unwrap_or_default().to_string())
            .or_insert(0) += 1;
    }

    let started_at = status.and_then(|s| s.started_at);
    let completed_at = status.and_then(|s| s.completed_at);
    let wall_clock_seconds =
        started_at.map(|s| (completed_at.unwrap_or(now) - s).num_seconds().max(0) as u64);
    Summary {
        schema_version: SCHEMA_VERSION,
        run: run.into(),
        namespace: namespace.into(),
        phase: status.and_then(|s| s.phase),
        started_at,
        completed_at,
        wall_clock_seconds,
        image_seconds: records
            .iter()
            .filter_map(|r| r.duration_seconds)
            .fold(0u64, |a, v| a.saturating_add(v)),
        totals: all,
        phases,
        slowest,
        failed,
        skip_reasons,
    }
}

fn totals(records: &[&Record], planned: Option<u32>) -> Totals {
    let count = |status: RecordStatus| records.iter().filter(|r| r.status == status).count() as u32;
    let built = count(RecordStatus::Built);
    let skipped = count(RecordStatus::SkippedRemoteExists) + count(RecordStatus::SkippedNotNeeded);
    let failed = count(RecordStatus::Failed);
    let images = planned.unwrap_or(records.len() as u32);
    Totals {
        images,
        built,
        skipped,
        failed,
        retried: records.iter().filter(|r| r.attempt_count > 1).count() as u32,
        pending: images.saturating_sub(built + skipped + failed),
    }
}

impl Summary {
    /// The summary as Markdown, for people and CI job summaries.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let phase = self.phase.map(|p| format!(" ({p:?})")).unwrap_or_default();
        let _ = writeln!(
            out,
            "# ImageBuildRun {}/{}{phase}\n",
            self.namespace, self.run
        );
        let t = &self.totals;
        let _ = writeln!(
            out,
            "{} images: {} built, {} skipped, {} failed, {} retried, {} pending.\n",
            t.images, t.built, t.skipped, t.failed, t.retried, t.pending
        );
        let _ = writeln!(
            out,
            "Wall clock: {}. Cumulative image time: {}.\n",
            self.wall_clock_seconds.map_or("-".into(), duration),
            duration(self.image_seconds)
        );
        let _ = writeln!(
            out,
            "| phase | images | built | skipped | failed | retried | pending | build s median | p95 | max |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for p in &self.phases {
            let t = &p.totals;
            let (median, p95, max) = match &p.build_seconds {
                Some(s) => (
                    format!("{}", s.median),
                    s.p95.to_string(),
                    s.max.to_string(),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {median} | {p95} | {max} |",
                p.phase, t.images, t.built, t.skipped, t.failed, t.retried, t.pending
            );
        }
        if !self.slowest.is_empty() {
            let _ = writeln!(out, "\n## Slowest builds\n");
            let _ = writeln!(out, "| phase | image for | build s | attempts |");
            let _ = writeln!(out, "|---|---|---:|---:|");
            for b in &self.slowest {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    b.phase,
                    cell(&b.subject),
                    b.build_seconds,
                    b.attempt_count
                );
            }
        }
        if !self.failed.is_empty() {
            let _ = writeln!(out, "\n## Failed builds\n");
            let _ = writeln!(out, "| phase | image for | reason | attempts | error |");
            let _ = writeln!(out, "|---|---|---|---:|---|");
            for f in &self.failed {
                let last = f.error.lines().rev().find(|l| !l.trim().is_empty());
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} |",
                    f.phase,
                    cell(&f.subject),
                    f.failure_class,
                    f.attempt_count,
                    cell(last.unwrap_or("").trim())
                );
            }
        }
        if !self.skip_reasons.is_empty() {
            let _ = writeln!(out, "\n## Skipped\n");
            for (reason, n) in &self.skip_reasons {
                let _ = writeln!(out, "- {reason}: {n}");
            }
        }
        out
    }
}

/// `s` as a Markdown table cell: pipes escaped, at most 200 bytes.
fn cell(s: &str) -> String {
    crate::text::truncate(s, 200).replace('|', "\\|")
}

/// `3725` as `1h 2m 5s`.
fn duration(seconds: u64) -> String {
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m {s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Node, Phase};
    use crate::schedule::{Failure, FailureClass, SkipReason};

    fn node(phase: Phase, id: &str) -> Node {
        Node {
            phase,
            instance_id: (phase == Phase::Assembly).then(|| id.into()),
            upstream_image: (phase != Phase::Builder).then(|| format!("up/{id}").into()),
            image: format!("r.io/{}:{id}", phase.as_str()).into(),
            build_args: Default::default(),
            git_revision: None,
            cache_ref: None,
            job_name: format!("j-{id}"),
            deps: vec![],
        }
    }

    fn built(phase: Phase, id: &str, seconds: u64, attempts: u32) -> Record {
        let mut r = Record::built(&node(phase, id), attempts, Utc::now());
        r.build_seconds = Some(seconds);
        r.duration_seconds = Some(seconds + 2);
        r
    }

    #[test]
    fn stats_are_order_statistics() {
        assert_eq!(stats(vec![]), None);
        let s = stats(vec![5, 1, 3]).unwrap();
        assert_eq!(
            (s.count, s.median, s.p95, s.max, s.total),
            (3, 3.0, 5, 5, 9)
        );
        let s = stats(vec![4, 1, 3, 2]).unwrap();
        assert_eq!((s.median, s.p95), (2.5, 4));
        let s = stats((1..=100).collect()).unwrap();
        assert_eq!((s.median, s.p95, s.max), (50.5, 95, 100));
        let s = stats((1..=20).collect()).unwrap();
        assert_eq!(s.p95, 19);
        // Reported seconds come from pods: no overflow, whatever they say.
        let s = stats(vec![u64::MAX, u64::MAX]).unwrap();
        assert_eq!((s.median, s.total), (u64::MAX as f64, u64::MAX));
    }

    #[test]
    fn median_without_a_sort_is_the_stats_median() {
        assert_eq!(median(&mut []), None);
        let cases: [Vec<u64>; 6] = [
            vec![7],
            vec![9, 1],
            vec![5, 1, 3],
            vec![4, 1, 3, 2],
            vec![3, 3, 1, 3, 8, 0],
            (0..101).map(|i| (i * 37) % 101).collect(),
        ];
        for values in cases {
            let expected = stats(values.clone()).map(|s| s.median);
            assert_eq!(median(&mut values.clone()), expected, "{values:?}");
        }
        assert_eq!(median(&mut [4, 1, 3, 2]), Some(2.5));
    }

    #[test]
    fn a_summary_counts_and_times_each_phase() {
        let failure = Failure::new(FailureClass::BuildError, "step 3\nERROR: exit code: 2\n");
        let mut records = vec![
            built(Phase::Builder, "b", 100, 1),
            built(Phase::Base, "x", 40, 1),
            Record::skipped(&node(Phase::Base, "y"), SkipReason::Exists, Utc::now()),
            Record::skipped(&node(Phase::Base, "z"), SkipReason::NotNeeded, Utc::now()),
            built(Phase::Assembly, "a1", 10, 1),
            built(Phase::Assembly, "a2", 30, 2),
            built(Phase::Assembly, "a3", 20, 1),
            Record::failed(&node(Phase::Assembly, "a4"), &failure, 3, None, Utc::now()),
        ];
        records[7].duration_seconds = Some(7);
        let started = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let status = ImageBuildRunStatus {
            phase: Some(RunPhase::Building),
            started_at: Some(started),
            assemblies: PhaseCounts {
                total: 6,
                ..Default::default()
            },
            ..Default::default()
        };
        let now = started + chrono::Duration::seconds(3725);
        let s = summarize("r", "ns", Some(&status), &records, now);
        assert_eq!(s.wall_clock_seconds, Some(3725));
        assert_eq!(s.image_seconds, 102 + 42 + 12 + 32 + 22 + 7);
        let asm = &s.phases[2];
        assert_eq!(asm.phase, "assembly");
        assert_eq!(
            asm.totals,
            Totals {
                images: 6,
                built: 3,
                skipped: 0,
                failed: 1,
                retried: 2,
                pending: 2
            }
        );
        let b = asm.build_seconds.unwrap();
        assert_eq!((b.count, b.median, b.p95, b.max), (3, 20.0, 30, 30));
        assert_eq!(s.totals.images, 1 + 3 + 6);
        assert_eq!(s.totals.skipped, 2);
        assert_eq!(
            s.slowest
                .iter()
                .map(|b| b.build_seconds)
                .collect::<Vec<_>>(),
            [100, 40, 30, 20, 10]
        );
        assert_eq!(s.failed.len(), 1);
        assert_eq!(
            (
                s.failed[0].subject.as_str(),
                s.failed[0].failure_class.as_str()
            ),
            ("a4", "BuildError")
        );
        assert_eq!(
            s.skip_reasons,
            BTreeMap::from([
                ("skipped_not_needed".into(), 1),
                ("skipped_remote_exists".into(), 1)
            ])
        );
        let md = s.markdown();
        assert!(md.contains("10 images: 5 built, 2 skipped, 1 failed, 2 retried, 2 pending."));
        assert!(md.contains("Wall clock: 1h 2m 5s."), "{md}");
        assert!(
            md.contains("| assembly | 6 | 3 | 0 | 1 | 2 | 2 | 20 | 30 | 30 |"),
            "{md}"
        );
        assert!(md.contains("| assembly | a4 | BuildError | 3 | ERROR: exit code: 2 |"));
    }

    #[test]
    fn the_json_form_keeps_its_field_names() {
        let s = summarize(
            "r",
            "ns",
            None,
            &[built(Phase::Builder, "b", 9, 1)],
            Utc::now(),
        );
        let json = serde_json::to_value(&s).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "completed_at",
                "failed",
                "image_seconds",
                "namespace",
                "phase",
                "phases",
                "run",
                "schema_version",
                "skip_reasons",
                "slowest",
                "started_at",
                "totals",
                "wall_clock_seconds"
            ]
        );
        assert_eq!(json["phases"][0]["build_seconds"]["median"], 9.0);
        assert_eq!(json["totals"]["images"], 1);
    }
}
