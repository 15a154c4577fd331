//! Resolving a run's instances into its plan. The work (reading the instance source,
//! selecting, planning) runs in a task of its own and hands its result back through a
//! channel; [`Resolution::step`] takes it when it is there and says what the run waits
//! for meanwhile. A source that cannot be read now (a ConfigMap not there yet, a 5xx from
//! the datasets server) is tried again with backoff; a spec that cannot be planned fails
//! the run for good.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::{Client, ResourceExt};
use tokio::sync::oneshot;

use crate::api::ImageBuildRun;
use crate::plan::{self, Plan};

/// First wait before reading a source again; doubled per failure up to [`RETRY_MAX`].
const RETRY_INITIAL: Duration = Duration::from_secs(2);
/// Longest wait between two reads of a source that failed.
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Why a resolution failed.
#[derive(Clone, Debug, PartialEq)]
pub enum ResolveError {
    /// The source could not be read now; it may be later.
    Source(String),
    /// The spec and its instances cannot make a plan.
    Plan(String),
}

/// Where the run's plan stands.
#[derive(Debug, Default)]
pub enum Resolution {
    /// Nothing started yet.
    #[default]
    Idle,
    /// A resolution runs; its result arrives on `result`.
    Running {
        /// Where the task sends its result.
        result: oneshot::Receiver<Result<Plan, ResolveError>>,
        /// Attempts before this one.
        failures: u32,
        /// Why the last one failed: still what the run says while this one runs.
        last_error: Option<String>,
    },
    /// The source could not be read; try again at `at`.
    Waiting {
        /// Why.
        error: String,
        /// Failed attempts so far.
        failures: u32,
        /// When to try again.
        at: Instant,
    },
    /// The plan.
    Ready(Arc<Plan>),
    /// The spec cannot be planned: the run fails.
    Failed(String),
}

/// What the reconcile does with the run's plan now.
#[derive(Debug)]
pub enum Step {
    /// Go on with it.
    Ready(Arc<Plan>),
    /// Wait (resolving, or waiting to read the source again, with the last error) and
    /// look again after `wait`.
    Pending {
        /// The last failure, while waiting to try again.
        error: Option<String>,
        /// When to look again.
        wait: Duration,
    },
    /// Fail the run with this message.
    Failed(String),
}

impl Resolution {
    /// Takes a finished result and starts a resolution when one is due (`start` spawns
    /// it and returns where its result will arrive); then says what the run does now.
    pub fn step(
        &mut self,
        now: Instant,
        start: impl FnOnce() -> oneshot::Receiver<Result<Plan, ResolveError>>,
    ) -> Step {
        if let Resolution::Running {
            result, failures, ..
        } = self
        {
            let failures = *failures;
            match result.try_recv() {
                Ok(Ok(plan)) => *self = Resolution::Ready(Arc::new(plan)),
                Ok(Err(ResolveError::Plan(message))) => *self = Resolution::Failed(message),
                Ok(Err(ResolveError::Source(error))) => self.wait(error, failures + 1, now),
                Err(oneshot::error::TryRecvError::Empty) => {}
                // The task ended without an answer (it panicked): try again.
                Err(oneshot::error::TryRecvError::Closed) => {
                    self.wait("resolving ended without a result".into(), failures + 1, now)
                }
            }
        }
        match self {
            Resolution::Idle => {
                *self = Resolution::Running {
                    result: start(),
                    failures: 0,
                    last_error: None,
                };
            }
            Resolution::Waiting {
                failures,
                at,
                error,
            } if now >= *at => {
                *self = Resolution::Running {
                    result: start(),
                    failures: *failures,
                    last_error: Some(std::mem::take(error)),
                };
            }
            _ => {}
        }
        match self {
            Resolution::Ready(plan) => Step::Ready(plan.clone()),
            Resolution::Failed(message) => Step::Failed(message.clone()),
            Resolution::Running { last_error, .. } => Step::Pending {
                error: last_error.clone(),
                wait: Duration::from_secs(1),
            },
            Resolution::Idle => Step::Pending {
                error: None,
                wait: Duration::from_secs(1),
            },
            Resolution::Waiting { error, at, .. } => Step::Pending {
                error: Some(error.clone()),
                wait: at.saturating_duration_since(now),
            },
        }
    }

    fn wait(&mut self, error: String, failures: u32, now: Instant) {
        *self = Resolution::Waiting {
            error,
            failures,
            at: now + backoff(failures),
        };
    }
}

/// The wait after `failures` failed reads of the source.
pub fn backoff(failures: u32) -> Duration {
    RETRY_INITIAL
        .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1)))
        .min(RETRY_MAX)
}

/// Starts resolving `run` in a task of its own; its result arrives on the receiver,
/// and then `done` is called (it wakes the run).
pub fn spawn(
    run: Arc<ImageBuildRun>,
    client: Client,
    done: impl FnOnce() + Send + 'static,
) -> oneshot::Receiver<Result<Plan, ResolveError>> {
    let (send, receive) = oneshot::channel();
    tokio::spawn(async move {
        let resolved = resolve(&run, &client).await;
        // What reading and planning freed goes back to the system, not kept as the peak.
        crate::memory::give_back();
        // The reconcile may be gone by now; nothing to tell then.
        if send.send(resolved).is_ok() {
            done();
        }
    });
    receive
}

/// The run's plan: its instances read from their source, selected as the spec says
/// (sorted, de-duplicated, `select` and `limit`: the plan command's view), and planned.
async fn resolve(run: &ImageBuildRun, client: &Client) -> Result<Plan, ResolveError> {
    let ns = run.namespace().unwrap_or_default();
    let source = &run.spec.instances;
    let raw = crate::instances::fetch(source, &ns, Some(client))
        .await
        .map_err(|e| ResolveError::Source(e.to_string()))?;
    let instances =
        crate::instances::select(raw, source).map_err(|e| ResolveError::Plan(e.to_string()))?;
    plan::build(&run.name_any(), &run.spec, &instances)
        .map_err(|e| ResolveError::Plan(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(
        result: Result<Plan, ResolveError>,
    ) -> oneshot::Receiver<Result<Plan, ResolveError>> {
        let (send, receive) = oneshot::channel();
        send.send(result).unwrap();
        receive
    }

    fn pending(step: &Step) -> Option<(Option<String>, Duration)> {
        match step {
            Step::Pending { error, wait } => Some((error.clone(), *wait)),
            _ => None,
        }
    }

    fn empty_plan() -> Plan {
        Plan::default()
    }

    #[test]
    fn a_source_that_fails_is_read_again_with_backoff_until_it_answers() {
        let t0 = Instant::now();
        let mut r = Resolution::default();
        let mut starts = 0;
        let step = r.step(t0, || {
            starts += 1;
            answered(Err(ResolveError::Source(
                "configmaps \"ids\" not found".into(),
            )))
        });
        assert_eq!(starts, 1);
        assert_eq!(pending(&step), Some((None, Duration::from_secs(1))));
        // Its answer: wait 2 s, and say why.
        let step = r.step(t0, || unreachable!());
        assert_eq!(
            pending(&step),
            Some((
                Some("configmaps \"ids\" not found".into()),
                Duration::from_secs(2)
            ))
        );
        // Not before the backoff is over; then again, and 4 s after a second failure.
        r.step(t0 + Duration::from_secs(1), || unreachable!());
        let (tx, rx) = oneshot::channel();
        let step = r.step(t0 + Duration::from_secs(2), || {
            starts += 1;
            rx
        });
        assert_eq!(starts, 2);
        // While the source is read again (a slow source can take its time), the run still
        // says why the last read failed.
        assert_eq!(
            pending(&step),
            Some((
                Some("configmaps \"ids\" not found".into()),
                Duration::from_secs(1)
            ))
        );
        tx.send(Err(ResolveError::Source("still missing".into())))
            .unwrap();
        let step = r.step(t0 + Duration::from_secs(2), || unreachable!());
        assert_eq!(
            pending(&step),
            Some((Some("still missing".into()), Duration::from_secs(4)))
        );
        // The ConfigMap is there now: the plan.
        r.step(t0 + Duration::from_secs(6), || answered(Ok(empty_plan())));
        let step = r.step(t0 + Duration::from_secs(6), || unreachable!());
        assert!(matches!(step, Step::Ready(_)), "{step:?}");
    }

    #[test]
    fn a_spec_that_cannot_be_planned_fails_for_good() {
        let mut r = Resolution::default();
        r.step(Instant::now(), || {
            answered(Err(ResolveError::Plan("spec.base.image: bad".into())))
        });
        let step = r.step(Instant::now(), || unreachable!());
        assert!(
            matches!(&step, Step::Failed(m) if m == "spec.base.image: bad"),
            "{step:?}"
        );
    }

    #[test]
    fn a_resolution_that_ended_without_an_answer_is_retried() {
        let mut r = Resolution::default();
        r.step(Instant::now(), || oneshot::channel().1);
        let step = r.step(Instant::now(), || unreachable!());
        assert!(
            matches!(&step, Step::Pending { error: Some(e), .. } if e.contains("without a result")),
            "{step:?}"
        );
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(40), RETRY_MAX);
    }
}
