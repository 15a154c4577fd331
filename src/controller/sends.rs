//! A run's Job creates and deletes, sent in the background. A reconcile notes each new Job
//! as dispatched (running, for the scheduler) and each Job it deletes as deleted, and goes
//! on without waiting for the API server's answers: a request takes a round trip of the
//! API server's own (over 100 ms when it is busy), and a reconcile that waited for it
//! would hold every event of the run, the end of another Job among them, for that long.
//!
//! One reconcile's requests go in one task, its deletes first: a retry's Job is created
//! once the Job of the same name is deleted (a delete that fails leaves the retry unsent).
//! A delete names the Job's uid when the store shows it, so it never takes a newer Job of
//! the same name. Across reconciles, [`RunState::send`](super::state::RunState::send)
//! waits for the requests in flight ([`Sends::settle`]) before it deletes a Job whose
//! create may still be in flight (a run cancelled, or past its deadline: a delete that
//! came first would be answered 404, and the Job made after it would build on), or
//! creates one whose name's delete may be.
//!
//! What a request that fails leaves is taken by the run's next reconcile
//! ([`Sends::collect`]), which the failure wakes: a Job the API server refuses as invalid
//! fails the run (sending it again would be refused again); any other failure (a 5xx, a
//! quota's 403, a timeout, a lost lease) makes a create's image ready again, or a deleted
//! Job one to delete again, and is that reconcile's error, retried with its backoff. The
//! reconcile that would write a run's final status (no reconcile follows it) settles the
//! requests first and takes their failures itself. A crash with requests in flight loses
//! nothing: the Jobs made and not yet deleted are read from the cluster, and the rest is
//! decided again.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::mpsc;

use super::actions::NewJob;
use super::apply::{API_CONCURRENCY, delete, send};
use super::context::Error;
use super::state::{Deleted, Dispatched};
use crate::metrics::Metrics;

/// A request that did not do what it was sent for.
enum Failed {
    /// Job `name`'s create for `attempt`, and why.
    Create {
        name: String,
        attempt: u32,
        error: Error,
    },
    /// Job `name`'s create for `attempt`, not sent: the delete of the Job of its name
    /// failed.
    Unsent { name: String, attempt: u32 },
    /// Job `name`'s delete, and why.
    Delete { name: String, error: Error },
}

/// A Job to delete: its name, and its uid if the store shows it.
pub type Doomed = (String, Option<String>);

/// One reconcile's requests in flight: their task, and the Jobs it deletes.
struct Task {
    handle: tokio::task::JoinHandle<()>,
    deletes: HashSet<String>,
}

/// The run's requests in the background: their tasks, and where they send their failures.
pub struct Sends {
    tasks: Vec<Task>,
    send: mpsc::UnboundedSender<Failed>,
    failed: mpsc::UnboundedReceiver<Failed>,
}

impl Default for Sends {
    fn default() -> Sends {
        let (send, failed) = mpsc::unbounded_channel();
        Sends {
            tasks: Vec::new(),
            send,
            failed,
        }
    }
}

impl Sends {
    /// Notes each of `jobs` in `dispatched`, then in a task of its own deletes `deletes`
    /// and creates `jobs`, [`API_CONCURRENCY`] requests at a time. A Job that exists
    /// already (from before a restart) is made; each made tells `metrics` how long its
    /// image waited. `wake` is called once the task ends if any request failed.
    pub fn start(
        &mut self,
        api: &Api<Job>,
        deletes: Vec<Doomed>,
        jobs: Vec<NewJob>,
        metrics: &Arc<Metrics>,
        dispatched: &mut Dispatched,
        wake: impl FnOnce() + Send + 'static,
    ) {
        if jobs.is_empty() && deletes.is_empty() {
            return;
        }
        let now = Instant::now();
        for new in &jobs {
            dispatched.note(new.name.clone(), new.attempt, now);
        }
        let (api, metrics, send) = (api.clone(), metrics.clone(), self.send.clone());
        let names = deletes.iter().map(|(name, _)| name.clone()).collect();
        self.tasks.retain(|task| !task.handle.is_finished());
        let handle = tokio::spawn(async move {
            let url = kube::core::Request::new(api.resource_url());
            let mut failures: Vec<Failed> = futures::stream::iter(deletes)
                .map(|(name, uid)| {
                    let (api, url) = (&api, &url);
                    async move {
                        let error = delete(api, url, &name, uid.as_deref()).await.err()?;
                        tracing::warn!(job = %name, error = %error, "a finished build Job could not be deleted");
                        Some(Failed::Delete {
                            name,
                            error: error.into(),
                        })
                    }
                })
                .buffer_unordered(API_CONCURRENCY)
                .filter_map(futures::future::ready)
                .collect()
                .await;
            let kept: HashSet<String> = failures
                .iter()
                .filter_map(|f| match f {
                    Failed::Delete { name, .. } => Some(name.clone()),
                    _ => None,
                })
                .collect();
            let (unsent, jobs): (Vec<_>, Vec<_>) =
                jobs.into_iter().partition(|new| kept.contains(&new.name));
            failures.extend(unsent.into_iter().map(|new| Failed::Unsent {
                name: new.name,
                attempt: new.attempt,
            }));
            let creates = futures::stream::iter(jobs)
                .map(|new| create(&api, &url, new, &metrics))
                .buffer_unordered(API_CONCURRENCY)
                .filter_map(futures::future::ready);
            failures.extend(creates.collect::<Vec<_>>().await);
            if !failures.is_empty() {
                // The run's state may be gone (the run deleted): nothing then waits for them.
                for failed in failures {
                    let _ = send.send(failed);
                }
                wake();
            }
        });
        self.tasks.push(Task {
            handle,
            deletes: names,
        });
    }

    /// Whether a delete of Job `name` may be in flight.
    pub fn deleting(&self, name: &str) -> bool {
        self.tasks
            .iter()
            .any(|task| !task.handle.is_finished() && task.deletes.contains(name))
    }

    /// Waits for the requests in flight to be answered.
    pub async fn settle(&mut self) {
        for task in self.tasks.drain(..) {
            // A task that panicked did what it did; the store shows it.
            let _ = task.handle.await;
        }
    }

    /// Takes the failures of the requests since the last call: each Job whose create
    /// failed is forgotten from `dispatched` (its image is ready again), each whose delete
    /// failed from `deleted` (it is deleted again); the first refusal, else the first
    /// other error.
    pub fn collect(
        &mut self,
        dispatched: &mut Dispatched,
        deleted: &mut Deleted,
    ) -> Result<(), Error> {
        let mut first: Option<Error> = None;
        while let Ok(failed) = self.failed.try_recv() {
            let error = match failed {
                Failed::Create {
                    name,
                    attempt,
                    error,
                } => {
                    dispatched.forget_attempt(&name, attempt);
                    error
                }
                Failed::Unsent { name, attempt } => {
                    dispatched.forget_attempt(&name, attempt);
                    continue;
                }
                Failed::Delete { name, error } => {
                    deleted.forget(&name);
                    error
                }
            };
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
    let (name, attempt) = (new.name, new.attempt);
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
    Some(Failed::Create {
        name,
        attempt,
        error,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::json;

    use super::super::apply::tests::{api, respond, serve};
    use super::*;
    use crate::plan::Phase;

    pub(in crate::controller) fn new_job(name: &str, attempt: u32) -> NewJob {
        let job = json!({"metadata": {
            "name": name,
            "annotations": {crate::names::ANNOTATION_ATTEMPT: attempt.to_string()},
        }});
        NewJob {
            name: name.into(),
            attempt,
            job,
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
        let mut sends = Sends::default();
        let mut dispatched = Dispatched::default();
        let (woken, wake) = tokio::sync::oneshot::channel();
        let batch = ["new", "made-before", "broken"].map(|n| new_job(n, 2));
        sends.start(
            &jobs,
            vec![],
            batch.into(),
            &metrics,
            &mut dispatched,
            move || {
                let _ = woken.send(());
            },
        );
        // Running from the moment they are dispatched, before any answer.
        let all = |d: &mut Dispatched| d.unseen(&BTreeMap::new(), Instant::now());
        let names = |d: &mut Dispatched| all(d).into_keys().collect::<Vec<_>>();
        assert_eq!(names(&mut dispatched), ["broken", "made-before", "new"]);
        wake.await.expect("a failed create wakes the run");
        // The broken one's image is ready again and the error is the reconcile's; the one
        // made before a restart is made, but only the new one waited now.
        let err = sends
            .collect(&mut dispatched, &mut Deleted::default())
            .unwrap_err();
        assert!(matches!(err, Error::Kube(_)), "{err:?}");
        assert_eq!(
            all(&mut dispatched),
            BTreeMap::from([("made-before".to_string(), 2), ("new".to_string(), 2)])
        );
        assert_eq!(queue_waits(&metrics).await, 1);
        sends
            .collect(&mut dispatched, &mut Deleted::default())
            .unwrap();

        // A refusal is the error even after another failure, and a refused Job is not
        // running; nothing wakes the run when every create is made.
        let (woken, wake) = tokio::sync::oneshot::channel();
        let batch = ["broken", "refused"].map(|n| new_job(n, 1));
        sends.start(
            &jobs,
            vec![],
            batch.into(),
            &metrics,
            &mut dispatched,
            move || {
                let _ = woken.send(());
            },
        );
        wake.await.unwrap();
        let err = sends
            .collect(&mut dispatched, &mut Deleted::default())
            .unwrap_err();
        assert!(
            matches!(&err, Error::JobRefused(m) if m.contains("refuses the build Jobs")),
            "{err:?}"
        );
        assert_eq!(names(&mut dispatched), ["made-before", "new"]);
        let (woken, wake) = tokio::sync::oneshot::channel();
        sends.start(
            &jobs,
            vec![],
            vec![new_job("other", 1)],
            &metrics,
            &mut dispatched,
            move || {
                let _ = woken.send(());
            },
        );
        assert!(wake.await.is_err(), "woken though every create was made");
        assert_eq!(queue_waits(&metrics).await, 2);
        sends
            .collect(&mut dispatched, &mut Deleted::default())
            .unwrap();
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
        let mut sends = Sends::default();
        let mut dispatched = Dispatched::default();
        sends.start(
            &jobs,
            vec![],
            vec![new_job("slow", 1)],
            &metrics,
            &mut dispatched,
            || {},
        );
        let (_request, answer) = handle.next_request().await.unwrap();
        let mut settled = Box::pin(sends.settle());
        assert!(
            futures::poll!(&mut settled).is_pending(),
            "settled before the answer"
        );
        respond(answer, "slow", 201);
        settled.await;
        assert_eq!(queue_waits(&metrics).await, 1, "the create was answered");
        // Nothing in flight: settled at once.
        assert!(futures::poll!(Box::pin(sends.settle())).is_ready());
    }

    #[tokio::test]
    async fn a_retry_is_created_once_the_job_of_its_name_is_deleted() {
        let (jobs, mut handle) = api();
        let metrics = Arc::new(Metrics::new());
        let mut sends = Sends::default();
        let mut dispatched = Dispatched::default();
        let doomed = vec![("old".to_string(), Some("u1".to_string()))];
        let batch = vec![new_job("old", 2), new_job("free", 1)];
        sends.start(&jobs, doomed, batch, &metrics, &mut dispatched, || {});
        assert!(sends.deleting("old") && !sends.deleting("free"));
        // The delete goes first, alone, and takes the Job the store showed only.
        let (request, answer) = handle.next_request().await.unwrap();
        assert_eq!(request.method(), "DELETE");
        assert!(
            request.uri().path().ends_with("/jobs/old"),
            "{}",
            request.uri()
        );
        let body = request.into_body().collect_bytes().await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["preconditions"]["uid"], "u1", "{body}");
        let early = tokio::time::timeout(Duration::from_millis(200), handle.next_request());
        assert!(
            early.await.is_err(),
            "a create went before the delete's answer"
        );
        respond(answer, "old", 200);
        for _ in 0..2 {
            let (request, answer) = handle.next_request().await.unwrap();
            assert_eq!(request.method(), "POST");
            respond(answer, "", 201);
        }
        sends.settle().await;
        assert!(!sends.deleting("old"));
        assert_eq!(queue_waits(&metrics).await, 2);
    }

    #[tokio::test]
    async fn a_failed_delete_leaves_its_retry_unsent_and_is_deleted_again() {
        let (jobs, handle) = api();
        let server = tokio::spawn(serve(handle, |method, name| match (method, name) {
            ("DELETE", "old") => 500,
            ("DELETE", _) => 404,
            _ => 201,
        }));
        let metrics = Arc::new(Metrics::new());
        let mut sends = Sends::default();
        let mut dispatched = Dispatched::default();
        let mut deleted = Deleted::default();
        let live = BTreeMap::from(["old", "gone"].map(|name| {
            let mut job = Job::default();
            job.metadata.name = Some(name.into());
            job.metadata.uid = Some(format!("uid-{name}"));
            let live = super::super::observe::LiveJob {
                job: Arc::new(job),
                pod: None,
                listed: None,
            };
            (name.to_string(), live)
        }));
        let names = ["old", "gone"].map(String::from);
        deleted.note(&names, &live, Instant::now());
        let doomed = names.iter().map(|n| (n.clone(), None)).collect();
        let batch = vec![new_job("old", 2), new_job("gone", 3), new_job("free", 1)];
        let (woken, wake) = tokio::sync::oneshot::channel();
        sends.start(&jobs, doomed, batch, &metrics, &mut dispatched, move || {
            let _ = woken.send(());
        });
        wake.await.expect("a failed delete wakes the run");
        // The delete's error is the reconcile's; its Job is to delete again, and the retry
        // of its name is not running. One already gone is fine, and its retry made.
        let err = sends.collect(&mut dispatched, &mut deleted).unwrap_err();
        assert!(matches!(err, Error::Kube(_)), "{err:?}");
        let running = dispatched.unseen(&BTreeMap::new(), Instant::now());
        assert_eq!(
            running,
            BTreeMap::from([("free".to_string(), 1), ("gone".to_string(), 3)])
        );
        let asked = names.to_vec();
        assert_eq!(
            deleted.left_to_delete(&asked, &live, Instant::now()),
            ["old"]
        );
        drop(jobs);
        assert_eq!(
            server.await.unwrap(),
            ["DELETE gone", "DELETE old", "POST free", "POST gone"]
        );
    }

    #[test]
    fn a_failure_forgets_only_the_attempt_that_failed() {
        // A later attempt of the same name, dispatched since, stays running.
        let mut dispatched = Dispatched::default();
        dispatched.note("a".into(), 3, Instant::now());
        let mut sends = Sends::default();
        let failed = |attempt| Failed::Create {
            name: "a".into(),
            attempt,
            error: Error::JobRefused("x".into()),
        };
        sends.send.send(failed(2)).unwrap();
        assert!(
            sends
                .collect(&mut dispatched, &mut Deleted::default())
                .is_err()
        );
        let all = dispatched.unseen(&BTreeMap::new(), Instant::now());
        assert_eq!(all, BTreeMap::from([("a".to_string(), 3)]));
        sends.send.send(failed(3)).unwrap();
        assert!(
            sends
                .collect(&mut dispatched, &mut Deleted::default())
                .is_err()
        );
        assert!(
            dispatched
                .unseen(&BTreeMap::new(), Instant::now())
                .is_empty()
        );
    }
}
