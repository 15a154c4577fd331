//! A run's new Jobs, created in the background. A reconcile notes each Job as dispatched
//! (running, for the scheduler) and goes on without waiting for the API server's answers:
//! a create takes a round trip of the API server's own (over 100 ms when it is busy), and
//! a reconcile that waited for it would hold every event of the run, the end of another
//! Job among them, for that long.
//!
//! What a create that fails leaves is taken by the run's next reconcile
//! ([`Creates::collect`]), which the failure wakes: a Job the API server refuses as invalid
//! fails the run (sending it again would be refused again); any other failure (a 5xx, a
//! quota's 403, a timeout, a lost lease) makes its image ready again and is that
//! reconcile's error, retried with its backoff. A crash with creates in flight loses
//! nothing: the Jobs made are read from the cluster, the others are decided again. A Job
//! deleted while it may still be being created (a run cancelled, or past its deadline)
//! is deleted once the creates in flight are answered ([`Creates::settle`]): a delete
//! that came first would be answered 404, and the Job made after it would build on.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use tokio::sync::mpsc;

use super::actions::NewJob;
use super::apply::{API_CONCURRENCY, send};
use super::context::Error;
use super::observe::attempt_of;
use super::state::Dispatched;
use crate::metrics::Metrics;

/// A create that did not make its Job: the Job's name and attempt, and why.
struct Failed {
    name: String,
    attempt: u32,
    error: Error,
}

/// The run's creates in the background: their tasks, and where they send their failures.
pub struct Creates {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    send: mpsc::UnboundedSender<Failed>,
    failed: mpsc::UnboundedReceiver<Failed>,
}

impl Default for Creates {
    fn default() -> Creates {
        let (send, failed) = mpsc::unbounded_channel();
        Creates {
            tasks: Vec::new(),
            send,
            failed,
        }
    }
}

impl Creates {
    /// Notes each of `jobs` in `dispatched` and creates them in a task of its own,
    /// [`API_CONCURRENCY`] at a time. One that exists already (from before a restart) is
    /// made; each made tells `metrics` how long its image waited. `wake` is called once
    /// the task ends if any create failed.
    pub fn start(
        &mut self,
        api: &Api<Job>,
        jobs: Vec<NewJob>,
        metrics: &Arc<Metrics>,
        dispatched: &mut Dispatched,
        wake: impl FnOnce() + Send + 'static,
    ) {
        if jobs.is_empty() {
            return;
        }
        let now = Instant::now();
        for new in &jobs {
            dispatched.note(new.job.name_any(), attempt_of(&new.job), now);
        }
        let (api, metrics, send) = (api.clone(), metrics.clone(), self.send.clone());
        self.tasks.retain(|task| !task.is_finished());
        self.tasks.push(tokio::spawn(async move {
            let url = kube::core::Request::new(api.resource_url());
            let failures: Vec<Failed> = futures::stream::iter(jobs)
                .map(|new| create(&api, &url, new, &metrics))
                .buffer_unordered(API_CONCURRENCY)
                .filter_map(futures::future::ready)
                .collect()
                .await;
            if !failures.is_empty() {
                // The run's state may be gone (the run deleted): nothing then waits for them.
                for failed in failures {
                    let _ = send.send(failed);
                }
                wake();
            }
        }));
    }

    /// Waits for the creates in flight to be answered: a Job is deleted only once its
    /// create is, or the delete could come first (answered 404) and the Job be made after
    /// it, for a run cancelled or past its deadline.
    pub async fn settle(&mut self) {
        for task in self.tasks.drain(..) {
            // A task that panicked made what it made; the store shows it.
            let _ = task.await;
        }
    }

    /// Takes the failures of the creates since the last call: each failed Job is forgotten
    /// from `dispatched` (its image is ready again); the first refusal, else the first
    /// other error.
    pub fn collect(&mut self, dispatched: &mut Dispatched) -> Result<(), Error> {
        let mut first: Option<Error> = None;
        while let Ok(Failed {
            name,
            attempt,
            error,
        }) = self.failed.try_recv()
        {
            dispatched.forget_attempt(&name, attempt);
            let refusal = matches!(error, Error::JobRefused(_));
            if first.is_none() || (refusal && !matches!(first, Some(Error::JobRefused(_)))) {
                first = Some(error);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Creates `new`; why not, if it was not made.
async fn create(
    api: &Api<Job>,
    url: &kube::core::Request,
    new: NewJob,
    metrics: &Metrics,
) -> Option<Failed> {
    let (name, attempt) = (new.job.name_any(), attempt_of(&new.job));
    let result = match serde_json::to_vec(&new.job) {
        Ok(body) => send(api, url.create(&PostParams::default(), body)).await,
        Err(e) => Err(kube::Error::SerdeError(e)),
    };
    let error = match result {
        Ok(()) => {
            metrics.job_created(new.phase.as_str(), new.waited);
            return None;
        }
        // Made before a restart: it did not wait now.
        Err(kube::Error::Api(e)) if e.code == 409 => return None,
        // Refused as invalid: sending it again would be refused again.
        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
            Error::JobRefused(super::preflight::refusal(&e.message))
        }
        Err(e) => Error::Kube(e),
    };
    tracing::warn!(job = %name, error = %error, "a build Job could not be created");
    Some(Failed {
        name,
        attempt,
        error,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::json;

    use super::super::apply::tests::{api, respond, serve};
    use super::*;
    use crate::plan::Phase;

    fn new_job(name: &str, attempt: u32) -> NewJob {
        let job = json!({"metadata": {
            "name": name,
            "annotations": {crate::names::ANNOTATION_ATTEMPT: attempt.to_string()},
        }});
        NewJob {
            job: serde_json::from_value(job).unwrap(),
            phase: Phase::Assembly,
            waited: Duration::from_secs(3),
        }
    }

    async fn queue_waits(metrics: &Metrics) -> u64 {
        let text = metrics.gather().await;
        text.lines()
            .find(|l| l.starts_with("imagebuild_queue_wait_seconds_count{phase=\"assembly\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn jobs_run_from_their_dispatch_and_a_failed_create_is_undone_and_said() {
        let (jobs, handle) = api();
        let server = tokio::spawn(serve(handle, |_, name| match name {
            "made-before" => 409,
            "refused" => 422,
            "broken" => 500,
            _ => 201,
        }));
        let metrics = Arc::new(Metrics::new());
        let mut creates = Creates::default();
        let mut dispatched = Dispatched::default();
        let (woken, wake) = tokio::sync::oneshot::channel();
        let batch = ["new", "made-before", "broken"].map(|n| new_job(n, 2));
        creates.start(&jobs, batch.into(), &metrics, &mut dispatched, move || {
            let _ = woken.send(());
        });
        // Running from the moment they are dispatched, before any answer.
        let all = |d: &mut Dispatched| d.unseen(&BTreeMap::new(), Instant::now());
        let names = |d: &mut Dispatched| all(d).into_keys().collect::<Vec<_>>();
        assert_eq!(names(&mut dispatched), ["broken", "made-before", "new"]);
        wake.await.expect("a failed create wakes the run");
        // The broken one's image is ready again and the error is the reconcile's; the one
        // made before a restart is made, but only the new one waited now.
        let err = creates.collect(&mut dispatched).unwrap_err();
        assert!(matches!(err, Error::Kube(_)), "{err:?}");
        assert_eq!(
            all(&mut dispatched),
            BTreeMap::from([("made-before".to_string(), 2), ("new".to_string(), 2)])
        );
        assert_eq!(queue_waits(&metrics).await, 1);
        creates.collect(&mut dispatched).unwrap();

        // A refusal is the error even after another failure, and a refused Job is not
        // running; nothing wakes the run when every create is made.
        let (woken, wake) = tokio::sync::oneshot::channel();
        let batch = ["broken", "refused"].map(|n| new_job(n, 1));
        creates.start(&jobs, batch.into(), &metrics, &mut dispatched, move || {
            let _ = woken.send(());
        });
        wake.await.unwrap();
        let err = creates.collect(&mut dispatched).unwrap_err();
        assert!(
            matches!(&err, Error::JobRefused(m) if m.contains("refuses the build Jobs")),
            "{err:?}"
        );
        assert_eq!(names(&mut dispatched), ["made-before", "new"]);
        let (woken, wake) = tokio::sync::oneshot::channel();
        creates.start(
            &jobs,
            vec![new_job("other", 1)],
            &metrics,
            &mut dispatched,
            move || {
                let _ = woken.send(());
            },
        );
        assert!(wake.await.is_err(), "woken though every create was made");
        assert_eq!(queue_waits(&metrics).await, 2);
        creates.collect(&mut dispatched).unwrap();
        drop(jobs);
        assert_eq!(
            server.await.unwrap(),
            [
                "POST broken",
                "POST broken",
                "POST made-before",
                "POST new",
                "POST other",
                "POST refused"
            ]
        );
    }

    #[tokio::test]
    async fn settling_waits_for_the_creates_in_flight() {
        let (jobs, mut handle) = api();
        let metrics = Arc::new(Metrics::new());
        let mut creates = Creates::default();
        let mut dispatched = Dispatched::default();
        creates.start(
            &jobs,
            vec![new_job("slow", 1)],
            &metrics,
            &mut dispatched,
            || {},
        );
        let (_request, answer) = handle.next_request().await.unwrap();
        let mut settled = Box::pin(creates.settle());
        assert!(
            futures::poll!(&mut settled).is_pending(),
            "settled before the answer"
        );
        respond(answer, "slow", 201);
        settled.await;
        assert_eq!(queue_waits(&metrics).await, 1, "the create was answered");
        // Nothing in flight: settled at once.
        assert!(futures::poll!(Box::pin(creates.settle())).is_ready());
    }

    #[test]
    fn a_failure_forgets_only_the_attempt_that_failed() {
        // A later attempt of the same name, dispatched since, stays running.
        let mut dispatched = Dispatched::default();
        dispatched.note("a".into(), 3, Instant::now());
        let mut creates = Creates::default();
        let failed = |attempt| Failed {
            name: "a".into(),
            attempt,
            error: Error::JobRefused("x".into()),
        };
        creates.send.send(failed(2)).unwrap();
        assert!(creates.collect(&mut dispatched).is_err());
        let all = dispatched.unseen(&BTreeMap::new(), Instant::now());
        assert_eq!(all, BTreeMap::from([("a".to_string(), 3)]));
        creates.send.send(failed(3)).unwrap();
        assert!(creates.collect(&mut dispatched).is_err());
        assert!(
            dispatched
                .unseen(&BTreeMap::new(), Instant::now())
                .is_empty()
        );
    }
}
