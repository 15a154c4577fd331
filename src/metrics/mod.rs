//! The operator's Prometheus metrics: per-run gauges and counters (labels `namespace` and
//! `run`, removed with the run), histograms by image phase, and the controller's own
//! health. `docs/metrics.md` documents every metric; `server` serves them with `/healthz`
//! and `/readyz`; `api` counts the requests of the Kubernetes client.
//!
//! Per-run gauges that mirror the status are set from the status the operator last
//! *wrote*, while a scrape is excluded (see [`Metrics::publishing`]), so a scrape always
//! agrees with the status the API server holds at that moment.

pub mod api;
pub mod server;

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::api::{ImageBuildRunStatus, PhaseCounts, RunPhase};
use crate::manifest::{Record, RecordStatus};
use crate::schedule::FailureClass;

/// Image phases, as the `phase` label spells them.
pub const PHASES: [&str; 4] = ["builder", "base", "assembly", "postAssembly"];
/// Image states of `imagebuild_run_images`, as the status counts them.
pub const STATES: [&str; 5] = ["pending", "running", "succeeded", "skipped", "failed"];
/// Results of `imagebuild_builds_total`.
pub const RESULTS: [&str; 3] = ["succeeded", "failed", "retried"];
/// Reasons of `imagebuild_skips_total`.
pub const SKIP_REASONS: [&str; 2] = ["remote_exists", "not_needed"];
/// Phases of a run (`imagebuild_run_status_phase`).
pub const RUN_PHASES: [RunPhase; 7] = [
    RunPhase::Pending,
    RunPhase::Resolving,
    RunPhase::Building,
    RunPhase::Succeeded,
    RunPhase::PartiallySucceeded,
    RunPhase::Failed,
    RunPhase::Cancelled,
];
/// Kinds of reconcile error (`imagebuild_reconcile_errors_total`).
pub const ERROR_KINDS: [&str; 2] = ["kube", "manifest"];

/// Longest a scrape waits for status writes in flight before it answers anyway.
const SCRAPE_WAIT: Duration = Duration::from_secs(1);

/// Seconds buckets of the build duration (from a minute to two hours and more).
const BUILD_BUCKETS: [f64; 14] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0, 7200.0,
];
/// Seconds buckets of the queue wait (a worker may free up only after hours).
const WAIT_BUCKETS: [f64; 12] = [
    0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
];
/// Seconds buckets of the pod pending time.
const PENDING_BUCKETS: [f64; 11] = [
    0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
];
/// Seconds buckets of one reconcile.
const RECONCILE_BUCKETS: [f64; 11] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// What the operator knows of a run's series, to remove them all with it.
#[derive(Default)]
struct RunSeries {
    uid: String,
    /// Registry status codes seen (the only open label set).
    codes: BTreeSet<String>,
    /// Whether its status gauges were set by this process.
    published: bool,
    /// Whether its medians were set by this process.
    medians: bool,
}

/// A run as the metrics know it: its series change only while it is tracked under this
/// uid, so a reconcile that outlives the run's deletion (or recreation) revives nothing.
#[derive(Clone, Copy, Debug)]
pub struct RunId<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its name.
    pub name: &'a str,
    /// Its uid.
    pub uid: &'a str,
}

/// Settings of a run that are not in its status, set on every reconcile.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RunSettings {
    /// `spec.suspend`.
    pub suspended: bool,
    /// `spec.maxWorkers`.
    pub max_workers: u32,
    /// When `timeouts.run` ends the run.
    pub deadline: Option<DateTime<Utc>>,
    /// Build pods the scheduler cannot place now.
    pub unschedulable: u32,
}

/// Every metric of the operator, in one registry.
pub struct Metrics {
    registry: Registry,
    run_images: IntGaugeVec,
    run_phase: IntGaugeVec,
    run_suspended: IntGaugeVec,
    run_started: GaugeVec,
    run_last_progress: GaugeVec,
    run_estimated_completion: GaugeVec,
    run_deadline: GaugeVec,
    run_jobs_in_flight: IntGaugeVec,
    run_max_workers: IntGaugeVec,
    run_unschedulable: IntGaugeVec,
    run_median: GaugeVec,
    builds: IntCounterVec,
    failures: IntCounterVec,
    retries: IntCounterVec,
    skips: IntCounterVec,
    registry_requests: IntCounterVec,
    build_duration: HistogramVec,
    queue_wait: HistogramVec,
    pod_pending: HistogramVec,
    reconcile_duration: Histogram,
    reconcile_errors: IntCounterVec,
    reconciles_in_flight: IntGauge,
    api_requests: IntCounterVec,
    ready: IntGauge,
    leader: IntGauge,
    runs: Mutex<HashMap<String, RunSeries>>,
    publishing: tokio::sync::RwLock<()>,
}

/// `namespace/name`, the key of a run.
fn key(ns: &str, run: &str) -> String {
    format!("{ns}/{run}")
}

fn phase_index(phase: &str) -> Option<usize> {
    PHASES.iter().position(|p| *p == phase)
}

/// The seconds of a record's attempt, from its Job's start to its end.
pub fn attempt_seconds(record: &Record) -> Option<f64> {
    let (start, end) = (record.started_at?, record.finished_at?);
    Some(((end - start).num_milliseconds().max(0) as f64) / 1000.0)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let run = ["namespace", "run"];
        let with = |extra: &[&'static str]| -> Vec<&'static str> {
            run.iter().chain(extra).copied().collect()
        };
        macro_rules! register {
            ($metric:expr) => {{
                let m = $metric.expect("metric definitions are valid");
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric names are unique");
                m
            }};
        }
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        let fgauge =
            |name: &str, help: &str, labels: &[&str]| GaugeVec::new(Opts::new(name, help), labels);
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                &["phase"],
            )
        };
        let metrics = Metrics {
            run_images: register!(gauge(
                "imagebuild_run_images",
                "Images of a run by image phase and state, as in the run's status.",
                &with(&["phase", "state"])
            )),
            run_phase: register!(gauge(
                "imagebuild_run_status_phase",
                "1 for the run's current phase (status.phase), 0 for the others.",
                &with(&["phase"])
            )),
            run_suspended: register!(gauge(
                "imagebuild_run_suspended",
                "1 while the run is suspended (spec.suspend).",
                &run
            )),
            run_started: register!(fgauge(
                "imagebuild_run_started_timestamp_seconds",
                "When the operator started working on the run (status.startedAt).",
                &run
            )),
            run_last_progress: register!(fgauge(
                "imagebuild_run_last_progress_timestamp_seconds",
                "When an image of the run last finished (status.lastProgressAt), or when the run started if none has.",
                &run
            )),
            run_estimated_completion: register!(fgauge(
                "imagebuild_run_estimated_completion_timestamp_seconds",
                "Projected end of the run (status.estimatedCompletion); absent when there is none.",
                &run
            )),
            run_deadline: register!(fgauge(
                "imagebuild_run_deadline_timestamp_seconds",
                "When timeouts.run ends the run.",
                &run
            )),
            run_jobs_in_flight: register!(gauge(
                "imagebuild_run_jobs_in_flight",
                "Build Jobs of the run in flight (the status' running images).",
                &run
            )),
            run_max_workers: register!(gauge(
                "imagebuild_run_max_workers",
                "Build Jobs the run may have in flight (spec.maxWorkers).",
                &run
            )),
            run_unschedulable: register!(gauge(
                "imagebuild_run_pods_unschedulable",
                "Build pods of the run the scheduler cannot place.",
                &run
            )),
            run_median: register!(fgauge(
                "imagebuild_run_build_duration_median_seconds",
                "Median Job duration of the run's built images, by image phase (the summary's duration median).",
                &with(&["phase"])
            )),
            builds: register!(counter(
                "imagebuild_builds_total",
                "Build attempts finished, by image phase and result (succeeded, failed for good, retried).",
                &with(&["phase", "result"])
            )),
            failures: register!(counter(
                "imagebuild_build_failures_total",
                "Failed images and attempts, retried or not, by failure class.",
                &with(&["class"])
            )),
            retries: register!(counter(
                "imagebuild_retries_total",
                "Retries scheduled, by the failure class of the attempt that failed.",
                &with(&["class"])
            )),
            skips: register!(counter(
                "imagebuild_skips_total",
                "Images not built, by image phase and reason (remote_exists, not_needed).",
                &with(&["phase", "reason"])
            )),
            registry_requests: register!(counter(
                "imagebuild_registry_requests_total",
                "Attempts of the operator's registry existence checks, by HTTP status code of the answer (network for none).",
                &with(&["code"])
            )),
            build_duration: register!(histogram(
                "imagebuild_build_duration_seconds",
                "Duration of the Jobs that built an image (start to end), by image phase.",
                &BUILD_BUCKETS
            )),
            queue_wait: register!(histogram(
                "imagebuild_queue_wait_seconds",
                "From an image being ready (inputs done, backoff over) to its Job being created, by image phase.",
                &WAIT_BUCKETS
            )),
            pod_pending: register!(histogram(
                "imagebuild_pod_pending_seconds",
                "From a build pod's creation to its container starting, by image phase.",
                &PENDING_BUCKETS
            )),
            reconcile_duration: register!(Histogram::with_opts(
                HistogramOpts::new(
                    "imagebuild_reconcile_duration_seconds",
                    "Duration of one reconcile of one run."
                )
                .buckets(RECONCILE_BUCKETS.to_vec())
            )),
            reconcile_errors: register!(counter(
                "imagebuild_reconcile_errors_total",
                "Reconciles that failed and were retried, by error kind.",
                &["kind"]
            )),
            reconciles_in_flight: register!(IntGauge::new(
                "imagebuild_reconciles_in_flight",
                "Reconciles running now."
            )),
            api_requests: register!(counter(
                "imagebuild_kubernetes_requests_total",
                "Requests to the Kubernetes API, by verb and HTTP status code (error for no answer).",
                &["verb", "code"]
            )),
            ready: register!(IntGauge::new(
                "imagebuild_ready",
                "1 while the operator is ready: watches synced (or standing by for the lease) and the API server reachable."
            )),
            leader: register!(IntGauge::new(
                "imagebuild_leader",
                "1 while this operator dispatches: it holds the lease, or leader election is off."
            )),
            runs: Mutex::new(HashMap::new()),
            publishing: tokio::sync::RwLock::new(()),
            registry: registry.clone(),
        };
        let info = register!(IntGaugeVec::new(
            Opts::new("imagebuild_build_info", "The operator's version."),
            &["version"]
        ));
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for kind in ERROR_KINDS {
            metrics.reconcile_errors.with_label_values(&[kind]);
        }
        for phase in PHASES {
            metrics.build_duration.with_label_values(&[phase]);
            metrics.queue_wait.with_label_values(&[phase]);
            metrics.pod_pending.with_label_values(&[phase]);
        }
        metrics
    }

    /// The text exposition of every metric. Waits up to a second for status writes in
    /// flight, so that the run gauges match the statuses the API server holds.
    pub async fn gather(&self) -> String {
        let _quiet = tokio::time::timeout(SCRAPE_WAIT, self.publishing.write())
            .await
            .ok();
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// Held while a status write and the gauges that mirror it happen; scrapes wait.
    pub async fn publishing(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.publishing.read().await
    }

    /// Makes sure the run's series exist (counters at zero, so that `increase()` sees
    /// their first step). A run recreated under the same name starts afresh.
    pub fn track(&self, ns: &str, run: &str, uid: &str) {
        let mut runs = self.runs.lock().unwrap();
        let entry = runs.entry(key(ns, run)).or_default();
        if entry.uid == uid {
            return;
        }
        if !entry.uid.is_empty() {
            self.remove_series(ns, run, entry);
        }
        *entry = RunSeries {
            uid: uid.to_string(),
            ..Default::default()
        };
        for phase in PHASES {
            for result in RESULTS {
                self.builds.with_label_values(&[ns, run, phase, result]);
            }
            for reason in SKIP_REASONS {
                self.skips.with_label_values(&[ns, run, phase, reason]);
            }
        }
        for class in FailureClass::ALL {
            self.failures.with_label_values(&[ns, run, class.as_str()]);
            if class.is_transient() {
                self.retries.with_label_values(&[ns, run, class.as_str()]);
            }
        }
        entry.codes.insert("429".into());
        self.registry_requests.with_label_values(&[ns, run, "429"]);
    }

    /// Removes every series of the run.
    pub fn forget(&self, ns: &str, run: &str) {
        if let Some(series) = self.runs.lock().unwrap().remove(&key(ns, run)) {
            self.remove_series(ns, run, &series);
        }
    }

    /// Removes the series of every run `keep` (given `namespace/name` and uid) rejects.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut runs = self.runs.lock().unwrap();
        let gone: Vec<String> = runs
            .iter()
            .filter(|(k, s)| !keep(k, &s.uid))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(series) = runs.remove(&k)
                && let Some((ns, run)) = k.split_once('/')
            {
                self.remove_series(ns, run, &series);
            }
        }
    }

    /// Runs with series.
    pub fn tracked(&self) -> usize {
        self.runs.lock().unwrap().len()
    }

    /// Runs `f` on the run's bookkeeping, holding it, if the run is tracked under its uid.
    fn with_live<R>(&self, run: &RunId, f: impl FnOnce(&mut RunSeries) -> R) -> Option<R> {
        let mut runs = self.runs.lock().unwrap();
        runs.get_mut(&key(run.namespace, run.name))
            .filter(|s| s.uid == run.uid)
            .map(f)
    }

    fn remove_series(&self, ns: &str, run: &str, series: &RunSeries) {
        let r = [ns, run];
        for v in [
            &self.run_suspended,
            &self.run_jobs_in_flight,
            &self.run_max_workers,
            &self.run_unschedulable,
        ] {
            let _ = v.remove_label_values(&r);
        }
        for v in [
            &self.run_started,
            &self.run_last_progress,
            &self.run_estimated_completion,
            &self.run_deadline,
        ] {
            let _ = v.remove_label_values(&r);
        }
        for phase in PHASES {
            let _ = self.run_median.remove_label_values(&[ns, run, phase]);
            for state in STATES {
                let _ = self
                    .run_images
                    .remove_label_values(&[ns, run, phase, state]);
            }
            for result in RESULTS {
                let _ = self.builds.remove_label_values(&[ns, run, phase, result]);
            }
            for reason in SKIP_REASONS {
                let _ = self.skips.remove_label_values(&[ns, run, phase, reason]);
            }
        }
        for phase in RUN_PHASES {
            let _ = self
                .run_phase
                .remove_label_values(&[ns, run, &format!("{phase:?}")]);
        }
        for class in FailureClass::ALL {
            let _ = self
                .failures
                .remove_label_values(&[ns, run, class.as_str()]);
            let _ = self.retries.remove_label_values(&[ns, run, class.as_str()]);
        }
        for code in &series.codes {
            let _ = self.registry_requests.remove_label_values(&[ns, run, code]);
        }
    }

    /// Whether the run's status gauges were set by this process (else they wait for the
    /// first write, or are taken from the status as read).
    pub fn published(&self, run: &RunId) -> bool {
        self.with_live(run, |s| s.published).unwrap_or(true)
    }

    /// Sets the gauges that mirror the status.
    pub fn set_status(&self, id: &RunId, status: &ImageBuildRunStatus) {
        self.with_live(id, |series| {
            series.published = true;
            self.status_gauges(id.namespace, id.name, status);
        });
    }

    fn status_gauges(&self, ns: &str, run: &str, status: &ImageBuildRunStatus) {
        let counts: [&PhaseCounts; 4] = [
            &status.builder,
            &status.bases,
            &status.assemblies,
            &status.post_assemblies,
        ];
        let mut running = 0;
        for (phase, c) in PHASES.iter().zip(counts) {
            for (state, n) in
                STATES
                    .iter()
                    .zip([c.pending, c.running, c.succeeded, c.skipped, c.failed])
            {
                self.run_images
                    .with_label_values(&[ns, run, phase, state])
                    .set(i64::from(n));
            }
            running += i64::from(c.running);
        }
        self.run_jobs_in_flight
            .with_label_values(&[ns, run])
            .set(running);
        let phase = status.phase.unwrap_or(RunPhase::Pending);
        for p in RUN_PHASES {
            self.run_phase
                .with_label_values(&[ns, run, &format!("{p:?}")])
                .set(i64::from(p == phase));
        }
        let seconds = |t: DateTime<Utc>| t.timestamp_millis() as f64 / 1000.0;
        let r = [ns, run];
        if let Some(started) = status.started_at {
            self.run_started.with_label_values(&r).set(seconds(started));
        }
        if let Some(t) = status.last_progress_at.or(status.started_at) {
            self.run_last_progress.with_label_values(&r).set(seconds(t));
        }
        match status.estimated_completion {
            Some(t) => self
                .run_estimated_completion
                .with_label_values(&r)
                .set(seconds(t)),
            None => {
                let _ = self.run_estimated_completion.remove_label_values(&r);
            }
        }
    }

    /// Whether the run's medians wait for their first computation in this process.
    pub fn medians_unset(&self, run: &RunId) -> bool {
        self.with_live(run, |s| !s.medians).unwrap_or(false)
    }

    /// Sets the median Job durations of the run's built images, by phase.
    pub fn set_medians<'a>(&self, id: &RunId, records: impl Iterator<Item = &'a Record>) {
        let (ns, run) = (id.namespace, id.name);
        self.with_live(id, |series| {
            series.medians = true;
            let mut durations: [Vec<u64>; 4] = Default::default();
            for record in records.filter(|r| r.status == RecordStatus::Built) {
                if let (Some(i), Some(d)) = (phase_index(&record.phase), record.duration_seconds) {
                    durations[i].push(d);
                }
            }
            for (phase, values) in PHASES.iter().zip(durations) {
                match crate::summary::stats(values) {
                    Some(stats) => self
                        .run_median
                        .with_label_values(&[ns, run, phase])
                        .set(stats.median),
                    None => {
                        let _ = self.run_median.remove_label_values(&[ns, run, phase]);
                    }
                }
            }
        });
    }

    /// Sets the gauges of the run's settings and pods.
    pub fn set_settings(&self, id: &RunId, settings: &RunSettings) {
        let r = [id.namespace, id.name];
        self.with_live(id, |_| {
            self.run_suspended
                .with_label_values(&r)
                .set(i64::from(settings.suspended));
            self.run_max_workers
                .with_label_values(&r)
                .set(i64::from(settings.max_workers));
            self.run_unschedulable
                .with_label_values(&r)
                .set(i64::from(settings.unschedulable));
            match settings.deadline {
                Some(t) => self
                    .run_deadline
                    .with_label_values(&r)
                    .set(t.timestamp_millis() as f64 / 1000.0),
                None => {
                    let _ = self.run_deadline.remove_label_values(&r);
                }
            }
        });
    }

    /// Counts a record the run just wrote; `pod_pending` is its pod's wait to start.
    pub fn record(&self, id: &RunId, record: &Record, pod_pending: Option<f64>) {
        let phase = record.phase.as_str();
        if phase_index(phase).is_none() {
            return;
        }
        self.with_live(id, |_| {
            self.count(id.namespace, id.name, record, pod_pending)
        });
    }

    fn count(&self, ns: &str, run: &str, record: &Record, pod_pending: Option<f64>) {
        let phase = record.phase.as_str();
        let class = record.failure_class.as_deref().unwrap_or("BuildError");
        let result = match record.status {
            RecordStatus::Built => "succeeded",
            RecordStatus::Failed => "failed",
            RecordStatus::Retrying => "retried",
            RecordStatus::SkippedRemoteExists | RecordStatus::SkippedNotNeeded => {
                let reason = if record.status == RecordStatus::SkippedRemoteExists {
                    "remote_exists"
                } else {
                    "not_needed"
                };
                self.skips
                    .with_label_values(&[ns, run, phase, reason])
                    .inc();
                return;
            }
        };
        if record.status != RecordStatus::Built {
            self.failures.with_label_values(&[ns, run, class]).inc();
        }
        if record.status == RecordStatus::Retrying {
            self.retries.with_label_values(&[ns, run, class]).inc();
        }
        // An image that failed without a Job (an input failed, the run's deadline
        // passed) is a failure but not a build.
        if record.attempt_count == 0 || record.started_at.is_none() {
            return;
        }
        self.builds
            .with_label_values(&[ns, run, phase, result])
            .inc();
        if record.status == RecordStatus::Built
            && let Some(seconds) = attempt_seconds(record)
        {
            self.build_duration
                .with_label_values(&[phase])
                .observe(seconds);
        }
        if let Some(seconds) = pod_pending {
            self.pod_pending
                .with_label_values(&[phase])
                .observe(seconds);
        }
    }

    /// Observes the wait of an image whose Job was just created.
    pub fn job_created(&self, phase: &str, waited: Duration) {
        if phase_index(phase).is_some() {
            self.queue_wait
                .with_label_values(&[phase])
                .observe(waited.as_secs_f64());
        }
    }

    /// Counts one registry request of the run's checks.
    pub fn registry_request(&self, id: &RunId, code: &str) {
        self.with_live(id, |series| {
            series.codes.insert(code.to_string());
            self.registry_requests
                .with_label_values(&[id.namespace, id.name, code])
                .inc();
        });
    }

    /// Observes one reconcile.
    pub fn reconciled(&self, took: Duration) {
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, kind: &str) {
        self.reconcile_errors.with_label_values(&[kind]).inc();
    }

    /// The gauge of reconciles running.
    pub fn reconciles_in_flight(&self) -> &IntGauge {
        &self.reconciles_in_flight
    }

    /// Counts one request to the Kubernetes API.
    pub fn api_request(&self, verb: &str, code: &str) {
        self.api_requests.with_label_values(&[verb, code]).inc();
    }

    /// Sets the readiness gauge.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Sets the leader gauge.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::PhaseCounts;

    fn series(text: &str, run: &str) -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&format!("run=\"{run}\"")))
            .map(str::to_string)
            .collect()
    }

    fn value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn record(phase: &str, status: RecordStatus, attempts: u32, class: Option<&str>) -> Record {
        let t0: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        Record {
            time: t0,
            phase: phase.into(),
            instance_id: None,
            base_image: None,
            tags: vec!["r/x:1".into()],
            status,
            skip_reason: None,
            failure_class: class.map(str::to_string),
            error: None,
            attempt_count: attempts,
            not_before: None,
            digest: None,
            node: None,
            log_path: None,
            started_at: (attempts > 0).then_some(t0),
            finished_at: (attempts > 0).then(|| t0 + chrono::Duration::seconds(42)),
            duration_seconds: (attempts > 0).then_some(42),
            build_seconds: None,
            push_seconds: None,
            cached_steps: None,
        }
    }

    #[tokio::test]
    async fn status_gauges_mirror_the_status_and_vanish_with_the_run() {
        let m = Metrics::new();
        m.track("ns", "r1", "u1");
        m.track("ns", "r2", "u2");
        let status = ImageBuildRunStatus {
            phase: Some(RunPhase::Building),
            bases: PhaseCounts {
                total: 10,
                pending: 3,
                running: 2,
                succeeded: 4,
                skipped: 1,
                failed: 0,
            },
            assemblies: PhaseCounts {
                total: 5,
                running: 1,
                pending: 4,
                ..Default::default()
            },
            started_at: Some("2026-01-01T00:00:00Z".parse().unwrap()),
            ..Default::default()
        };
        let built = record("base", RecordStatus::Built, 1, None);
        let r1 = RunId {
            namespace: "ns",
            name: "r1",
            uid: "u1",
        };
        let r2 = RunId {
            name: "r2",
            uid: "u2",
            ..r1
        };
        m.set_status(&r1, &status);
        m.set_medians(&r1, [&built].into_iter());
        assert!(m.published(&r1) && !m.published(&r2));
        let text = m.gather().await;
        let v = |p: &str| value(&text, p);
        assert_eq!(
            v(r#"imagebuild_run_images{namespace="ns",phase="base",run="r1",state="pending"}"#),
            Some(3.0)
        );
        assert_eq!(
            v(r#"imagebuild_run_jobs_in_flight{namespace="ns",run="r1"}"#),
            Some(3.0)
        );
        assert_eq!(
            v(r#"imagebuild_run_status_phase{namespace="ns",phase="Building",run="r1"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"imagebuild_run_status_phase{namespace="ns",phase="Succeeded",run="r1"}"#),
            Some(0.0)
        );
        // No image finished: the last progress is the start.
        assert_eq!(
            v(r#"imagebuild_run_last_progress_timestamp_seconds{namespace="ns",run="r1"}"#),
            Some(1_767_225_600.0)
        );
        assert_eq!(
            v(
                r#"imagebuild_run_build_duration_median_seconds{namespace="ns",phase="base",run="r1"}"#
            ),
            Some(42.0)
        );
        assert!(!text.contains("imagebuild_run_estimated_completion_timestamp_seconds{"));
        // Counters start at zero.
        assert_eq!(
            v(r#"imagebuild_builds_total{namespace="ns",phase="base",result="failed",run="r2"}"#),
            Some(0.0)
        );

        m.forget("ns", "r1");
        // A reconcile that outlived the deletion revives nothing.
        m.set_status(&r1, &status);
        m.set_settings(&r1, &RunSettings::default());
        m.set_medians(&r1, [&built].into_iter());
        m.record(&r1, &built, Some(1.0));
        m.registry_request(&r1, "404");
        let text = m.gather().await;
        assert_eq!(series(&text, "r1"), Vec::<String>::new());
        assert!(!series(&text, "r2").is_empty());
        m.retain(|_, _| false);
        assert_eq!(series(&m.gather().await, "r2"), Vec::<String>::new());
        assert_eq!(m.tracked(), 0);
    }

    #[tokio::test]
    async fn a_recreated_run_starts_from_zero() {
        let m = Metrics::new();
        m.track("ns", "r", "old");
        let old = RunId {
            namespace: "ns",
            name: "r",
            uid: "old",
        };
        m.record(&old, &record("base", RecordStatus::Built, 1, None), None);
        m.track("ns", "r", "old");
        let p =
            r#"imagebuild_builds_total{namespace="ns",phase="base",result="succeeded",run="r"}"#;
        assert_eq!(value(&m.gather().await, p), Some(1.0));
        m.track("ns", "r", "new");
        assert_eq!(value(&m.gather().await, p), Some(0.0));
        // The old run's late reconcile does not count into the new one.
        m.record(&old, &record("base", RecordStatus::Built, 1, None), None);
        assert_eq!(value(&m.gather().await, p), Some(0.0));
    }

    #[tokio::test]
    async fn records_count_builds_failures_retries_and_skips() {
        let m = Metrics::new();
        m.track("ns", "r", "u");
        let records = [
            record("assembly", RecordStatus::Built, 1, None),
            record("assembly", RecordStatus::Retrying, 1, Some("Evicted")),
            record("assembly", RecordStatus::Failed, 2, Some("Evicted")),
            // An input failed: a failure, not a build.
            record(
                "assembly",
                RecordStatus::Failed,
                0,
                Some("DependencyFailed"),
            ),
            record("base", RecordStatus::SkippedRemoteExists, 0, None),
        ];
        let id = RunId {
            namespace: "ns",
            name: "r",
            uid: "u",
        };
        for r in &records {
            m.record(&id, r, Some(1.5));
        }
        m.job_created("assembly", Duration::from_secs(7));
        m.registry_request(&id, "404");
        m.registry_request(
            &RunId {
                namespace: "gone",
                ..id
            },
            "404",
        );
        let text = m.gather().await;
        let v = |p: &str| value(&text, p);
        let builds = |result: &str| {
            v(&format!(
                r#"imagebuild_builds_total{{namespace="ns",phase="assembly",result="{result}",run="r"}}"#
            ))
        };
        assert_eq!(
            (builds("succeeded"), builds("failed"), builds("retried")),
            (Some(1.0), Some(1.0), Some(1.0))
        );
        assert_eq!(
            v(r#"imagebuild_build_failures_total{class="Evicted",namespace="ns",run="r"}"#),
            Some(2.0)
        );
        assert_eq!(
            v(
                r#"imagebuild_build_failures_total{class="DependencyFailed",namespace="ns",run="r"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            v(r#"imagebuild_retries_total{class="Evicted",namespace="ns",run="r"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(
                r#"imagebuild_skips_total{namespace="ns",phase="base",reason="remote_exists",run="r"}"#
            ),
            Some(1.0)
        );
        // Three attempts ran: three pod waits; one built, one duration.
        assert_eq!(
            v(r#"imagebuild_build_duration_seconds_count{phase="assembly"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"imagebuild_build_duration_seconds_sum{phase="assembly"}"#),
            Some(42.0)
        );
        assert_eq!(
            v(r#"imagebuild_pod_pending_seconds_count{phase="assembly"}"#),
            Some(3.0)
        );
        assert_eq!(
            v(r#"imagebuild_queue_wait_seconds_sum{phase="assembly"}"#),
            Some(7.0)
        );
        assert_eq!(
            v(r#"imagebuild_registry_requests_total{code="404",namespace="ns",run="r"}"#),
            Some(1.0)
        );
        assert!(!text.contains(r#"namespace="gone""#));
        m.forget("ns", "r");
        assert_eq!(series(&m.gather().await, "r"), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_scrape_waits_for_a_status_write_in_flight() {
        let m = std::sync::Arc::new(Metrics::new());
        let guard = m.publishing().await;
        let scrape = tokio::spawn({
            let m = m.clone();
            async move { m.gather().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!scrape.is_finished(), "the scrape did not wait");
        drop(guard);
        assert!(scrape.await.unwrap().contains("imagebuild_ready"));
    }
}
