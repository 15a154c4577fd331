//! The counters and histograms of images' results. The controller tells each new result
//! in plain values ([`Counted`]); how its records map to them is the controller's business.

use std::time::Duration;

use super::{Metrics, RunId, phase_index};

/// How an image's attempt (or the image) ended, as the counters tell it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome<'a> {
    /// Built and pushed.
    Built,
    /// Failed for good, with its failure class.
    Failed {
        /// The class (a PascalCase reason).
        class: &'a str,
    },
    /// Failed, and retried later, with the failure's class.
    Retried {
        /// The class (a PascalCase reason).
        class: &'a str,
    },
    /// Skipped: the image exists, or (`not_needed`) every image built on it does.
    Skipped {
        /// Skipped because nothing needs it rather than because it exists.
        not_needed: bool,
    },
}

/// One new result of an image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Counted<'a> {
    /// Its phase: `builder`, `base`, `assembly` or `postAssembly`.
    pub phase: &'a str,
    /// How it ended.
    pub outcome: Outcome<'a>,
    /// Whether a build Job ran for it (an image whose input failed fails without one).
    pub ran: bool,
    /// Seconds its Job ran, from start to end.
    pub seconds: Option<f64>,
    /// Seconds its pod waited to start.
    pub pod_pending: Option<f64>,
}

impl Metrics {
    /// Counts a result the run just recorded.
    pub fn count(&self, id: &RunId, image: &Counted) {
        if phase_index(image.phase).is_none() {
            return;
        }
        self.with_live(id, |_| self.count_in(id.namespace, id.name, image));
    }

    fn count_in(&self, ns: &str, run: &str, image: &Counted) {
        let phase = image.phase;
        let result = match image.outcome {
            Outcome::Built => "succeeded",
            Outcome::Failed { class } => {
                self.failures.with_label_values(&[ns, run, class]).inc();
                "failed"
            }
            Outcome::Retried { class } => {
                self.failures.with_label_values(&[ns, run, class]).inc();
                self.retries.with_label_values(&[ns, run, class]).inc();
                "retried"
            }
            Outcome::Skipped { not_needed } => {
                let reason = if not_needed {
                    "not_needed"
                } else {
                    "remote_exists"
                };
                self.skips
                    .with_label_values(&[ns, run, phase, reason])
                    .inc();
                return;
            }
        };
        // An image that failed without a Job (an input failed, the run's deadline
        // passed) is a failure but not a build.
        if !image.ran {
            return;
        }
        self.builds
            .with_label_values(&[ns, run, phase, result])
            .inc();
        if let (Outcome::Built, Some(seconds)) = (image.outcome, image.seconds) {
            self.build_duration
                .with_label_values(&[phase])
                .observe(seconds);
        }
        if let Some(seconds) = image.pod_pending {
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
}
