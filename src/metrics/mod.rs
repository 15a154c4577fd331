//! The operator's Prometheus metrics: per-run gauges and counters (labels `namespace` and
//! `run`, removed with the run), histograms by image phase, and the controller's own
//! health. `docs/metrics.md` documents every metric; `server` serves them with `/healthz`
//! and `/readyz`; `api` counts the requests of the Kubernetes client.
//!
//! Per-run gauges that mirror the status are set from the status the operator last
//! *wrote*, right after the write; a scrape waits until no write is between its API call
//! and its gauges, and renders again if one started meanwhile (see
//! [`Metrics::status_write`]), so a scrape agrees with the statuses the API server holds.
//! Nothing is locked across an API call. `runs` owns the per-run series, `builds` the
//! counters the controller feeds with plain values.

pub mod api;
mod builds;
mod runs;
pub mod server;

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use builds::{Counted, Outcome};

use crate::api::RunPhase;

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
    unreadable_runs: IntGauge,
    api_requests: IntCounterVec,
    api_request_duration: HistogramVec,
    ready: IntGauge,
    leader: IntGauge,
    runs: Mutex<HashMap<String, RunSeries>>,
    /// Status writes begun and ended (see [`Metrics::status_write`]).
    writes_begun: AtomicU64,
    writes_ended: AtomicU64,
    /// When the API server last answered a request (below 500), in milliseconds since
    /// `born`, plus one (0: never); see [`Metrics::api_answered_within`].
    answered: AtomicU64,
    born: tokio::time::Instant,
}

/// A status write in flight (see [`Metrics::status_write`]); ends when dropped.
pub struct StatusWrite<'a>(&'a Metrics);

impl Drop for StatusWrite<'_> {
    fn drop(&mut self) {
        self.0.writes_ended.fetch_add(1, Ordering::SeqCst);
    }
}

/// `namespace/name`, the key of a run.
fn key(ns: &str, run: &str) -> String {
    format!("{ns}/{run}")
}

fn phase_index(phase: &str) -> Option<usize> {
    PHASES.iter().position(|p| *p == phase)
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
            unreadable_runs: register!(IntGauge::new(
                "imagebuild_runs_unreadable",
                "ImageBuildRuns the operator cannot read and skips (each named in its log and in a Warning Event)."
            )),
            api_requests: register!(counter(
                "imagebuild_kubernetes_requests_total",
                "Requests to the Kubernetes API, by verb and HTTP status code (error for no answer).",
                &["verb", "code"]
            )),
            api_request_duration: register!(HistogramVec::new(
                HistogramOpts::new(
                    "imagebuild_kubernetes_request_duration_seconds",
                    "From sending a request to the Kubernetes API to its answer's headers, by verb (watches not included)."
                )
                .buckets(RECONCILE_BUCKETS.to_vec()),
                &["verb"]
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
            writes_begun: AtomicU64::new(0),
            writes_ended: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            born: tokio::time::Instant::now(),
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

    /// The text exposition of every metric. Waits (at most a second) until no status
    /// write is in flight, and renders again if one began while it rendered, so that the
    /// run gauges match the statuses the API server holds.
    pub async fn gather(&self) -> String {
        let deadline = tokio::time::Instant::now() + SCRAPE_WAIT;
        loop {
            let begun = self.writes_begun.load(Ordering::SeqCst);
            if begun == self.writes_ended.load(Ordering::SeqCst) {
                let text = self.encode();
                if self.writes_begun.load(Ordering::SeqCst) == begun {
                    return text;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return self.encode();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn encode(&self) -> String {
        let mut out = Vec::new();
        // Encoding into memory fails only on a metric of no known type, which the
        // registry never holds; say so rather than panic.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            return format!("# encoding the metrics failed: {e}\n");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Marks a status write in flight, from before its API call until the guard drops
    /// after the gauges that mirror it are set (or the call failed). Writers never wait;
    /// a scrape waits for them.
    pub fn status_write(&self) -> StatusWrite<'_> {
        self.writes_begun.fetch_add(1, Ordering::SeqCst);
        StatusWrite(self)
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

    /// Sets how many runs cannot be read.
    pub fn set_unreadable_runs(&self, count: usize) {
        self.unreadable_runs
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Counts one request to the Kubernetes API.
    pub fn api_request(&self, verb: &str, code: &str) {
        self.api_requests.with_label_values(&[verb, code]).inc();
    }

    /// The API server answered a request with a status below 500.
    pub fn api_answered(&self) {
        let ms = self.born.elapsed().as_millis() as u64 + 1;
        self.answered.fetch_max(ms, Ordering::Relaxed);
    }

    /// Whether the API server answered a request (any status below 500) within `window`:
    /// the readiness check asks it only when nothing else did.
    pub fn api_answered_within(&self, window: Duration) -> bool {
        let answered = self.answered.load(Ordering::Relaxed);
        let now = self.born.elapsed().as_millis() as u64 + 1;
        answered > 0 && now.saturating_sub(answered) < window.as_millis() as u64
    }

    /// Observes how long a request (not a watch) took to answer.
    pub fn api_request_took(&self, verb: &str, took: Duration) {
        self.api_request_duration
            .with_label_values(&[verb])
            .observe(took.as_secs_f64());
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
    use crate::api::{ImageBuildRunStatus, PhaseCounts};

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

    /// A result with a Job of 42 s (or none, `ran` false).
    fn counted(phase: &'static str, outcome: Outcome<'static>, ran: bool) -> Counted<'static> {
        Counted {
            phase,
            outcome,
            ran,
            seconds: ran.then_some(42.0),
            pod_pending: None,
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
        let built = counted("base", Outcome::Built, true);
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
        m.set_medians(&r1, &[None, Some(42.0), None, None]);
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
        m.set_medians(&r1, &[None, Some(42.0), None, None]);
        m.count(&r1, &built);
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
        m.count(&old, &counted("base", Outcome::Built, true));
        m.track("ns", "r", "old");
        let p =
            r#"imagebuild_builds_total{namespace="ns",phase="base",result="succeeded",run="r"}"#;
        assert_eq!(value(&m.gather().await, p), Some(1.0));
        m.track("ns", "r", "new");
        assert_eq!(value(&m.gather().await, p), Some(0.0));
        // The old run's late reconcile does not count into the new one.
        m.count(&old, &counted("base", Outcome::Built, true));
        assert_eq!(value(&m.gather().await, p), Some(0.0));
    }

    #[tokio::test]
    async fn records_count_builds_failures_retries_and_skips() {
        let m = Metrics::new();
        m.track("ns", "r", "u");
        let evicted = Outcome::Retried { class: "Evicted" };
        let records = [
            counted("assembly", Outcome::Built, true),
            counted("assembly", evicted, true),
            counted("assembly", Outcome::Failed { class: "Evicted" }, true),
            // An input failed: a failure, not a build.
            counted(
                "assembly",
                Outcome::Failed {
                    class: "DependencyFailed",
                },
                false,
            ),
            counted("base", Outcome::Skipped { not_needed: false }, false),
        ];
        let id = RunId {
            namespace: "ns",
            name: "r",
            uid: "u",
        };
        for r in &records {
            m.count(
                &id,
                &Counted {
                    pod_pending: r.ran.then_some(1.5),
                    ..*r
                },
            );
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
        let guard = m.status_write();
        let scrape = tokio::spawn({
            let m = m.clone();
            async move { m.gather().await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!scrape.is_finished(), "the scrape did not wait");
        drop(guard);
        assert!(scrape.await.unwrap().contains("imagebuild_ready"));
        // A write that never ends holds a scrape back a second at most.
        let _stuck = m.status_write();
        let started = std::time::Instant::now();
        assert!(m.gather().await.contains("imagebuild_ready"));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
