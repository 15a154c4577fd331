//! The series of each run: created when the run is first seen (counters at zero),
//! changed only while the run is tracked under its uid, removed with it; the gauges that
//! mirror its status and settings.

use chrono::{DateTime, Utc};

use super::{
    Metrics, PHASES, RESULTS, RUN_PHASES, RunId, RunSeries, RunSettings, SKIP_REASONS, STATES, key,
};
use crate::api::{ImageBuildRunStatus, PhaseCounts, RunPhase};
use crate::schedule::FailureClass;

impl Metrics {
    /// The table of runs' series. A panic elsewhere while it was held leaves series that
    /// are still whole (each change is one call), so a poisoned lock is taken as it is.
    fn runs(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, RunSeries>> {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes sure the run's series exist (counters at zero, so that `increase()` sees
    /// their first step). A run recreated under the same name starts afresh.
    pub fn track(&self, ns: &str, run: &str, uid: &str) {
        let mut runs = self.runs();
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
        // The answers every run sees (exists, missing) and the one alerts watch.
        for code in ["200", "404", "429"] {
            entry.codes.insert(code.into());
            self.registry_requests.with_label_values(&[ns, run, code]);
        }
    }

    /// Removes every series of the run.
    pub fn forget(&self, ns: &str, run: &str) {
        if let Some(series) = self.runs().remove(&key(ns, run)) {
            self.remove_series(ns, run, &series);
        }
    }

    /// Removes the series of every run `keep` (given `namespace/name` and uid) rejects.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut runs = self.runs();
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
        self.runs().len()
    }

    /// Runs `f` on the run's bookkeeping, holding it, if the run is tracked under its uid.
    pub(super) fn with_live<R>(
        &self,
        run: &RunId,
        f: impl FnOnce(&mut RunSeries) -> R,
    ) -> Option<R> {
        let mut runs = self.runs();
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

    /// Sets the median Job durations (seconds) of the run's built images, by phase (in
    /// [`PHASES`] order; none for a phase with no image built).
    pub fn set_medians(&self, id: &RunId, medians: &[Option<f64>; 4]) {
        let (ns, run) = (id.namespace, id.name);
        self.with_live(id, |series| {
            series.medians = true;
            for (phase, median) in PHASES.iter().zip(medians) {
                match median {
                    Some(median) => self
                        .run_median
                        .with_label_values(&[ns, run, phase])
                        .set(*median),
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

    /// Counts one registry request of the run's checks.
    pub fn registry_request(&self, id: &RunId, code: &str) {
        self.with_live(id, |series| {
            series.codes.insert(code.to_string());
            self.registry_requests
                .with_label_values(&[id.namespace, id.name, code])
                .inc();
        });
    }
}
