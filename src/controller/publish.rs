//! The run's status: derived from its plan, node states and records (pure), and written
//! with the gauges that mirror it and the Events its change warrants. Only changes users
//! and tools wait on are written at once; counts and messages alone at most once a
//! second per run. Events are told against the status this process last wrote, not the
//! watch's copy, which may not have caught up with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::Recorder;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::context::{Ctx, Error};
use super::events;
use super::observe::Unschedulable;
use super::state::RunState;
use super::status::{self, RecordFacts};
use crate::api::{ImageBuildRun, ImageBuildRunStatus, PhaseCounts, RunPhase};
use crate::metrics::{Metrics, RunId};
use crate::schedule::NodeState;

/// The recent window `imagesPerHour` is measured over.
const THROUGHPUT_WINDOW: chrono::Duration = chrono::Duration::minutes(15);

/// Shortest interval between two status writes of one run that only update counts and
/// messages (a phase or condition change is written at once).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// What the status of a building run is derived from.
pub struct Derivation<'a> {
    /// Every node's state, after this reconcile's actions.
    pub states: &'a [NodeState],
    /// What `states` count, by phase.
    pub counts: [PhaseCounts; 4],
    /// What the status reads of the manifest's records.
    pub facts: &'a RecordFacts,
    /// The manifest's shards, as the status names them.
    pub manifests: Vec<String>,
    /// `retry.attempts`.
    pub attempts: u32,
    /// `suspend`.
    pub suspended: bool,
    /// The run is cancelled (`spec.cancel`): a run not yet final ends `Cancelled`.
    pub cancelled: bool,
    /// Why the registry could not say, if it could not.
    pub registry_error: Option<&'a str>,
    /// Pods the scheduler cannot place, and how long they may wait.
    pub unschedulable: &'a [Unschedulable],
    /// `timeouts.pending`.
    pub pending_timeout: Duration,
    /// Jobs the run may have in flight now (its share of the cap).
    pub workers: u32,
    /// The run's generation.
    pub generation: Option<i64>,
    /// Now.
    pub now: DateTime<Utc>,
}

/// Derives `status` (a copy of the last one, whose smoothed values it keeps when they
/// drift by clock alone) from `d`.
pub fn derive(status: &mut ImageBuildRunStatus, d: &Derivation<'_>) {
    let old = status.clone();
    let counts = d.counts;
    let builder_retrying = matches!(
        d.states.first(),
        Some(NodeState::Waiting { attempts, .. }) if *attempts > 0
    );
    status::fill(status, &counts, builder_retrying);
    let facts = d.facts;
    status.failures = facts.failures.clone();
    status.retries_exhausted = facts.retries_exhausted(d.attempts);
    status.manifests = d.manifests.clone();
    status.last_progress_at = facts.last_progress_at();
    let now = d.now;
    let started = status.started_at.unwrap_or(now);
    // Both drift with the clock alone; small drifts keep the written value, so an idle
    // run is not rewritten every reconcile.
    let rate = facts.images_per_hour(started, now, THROUGHPUT_WINDOW);
    status.images_per_hour = match (old.images_per_hour, rate) {
        (Some(o), Some(n)) if (n - o).abs() <= 0.05 * o => Some(o),
        _ => rate,
    };
    let eta = facts.estimated_completion(&counts, d.workers, now);
    status.estimated_completion = match (old.estimated_completion, eta) {
        // A finished run has nothing left to estimate.
        _ if status.phase != Some(RunPhase::Building) => None,
        (Some(o), Some(n)) if (n - o).abs() < chrono::Duration::seconds(60) => Some(o),
        _ => eta,
    };
    let pending_limit =
        chrono::Duration::from_std(d.pending_timeout).unwrap_or(chrono::Duration::MAX);
    let stalled = d
        .unschedulable
        .iter()
        .find(|u| u.seen - u.since >= pending_limit)
        .map(|u| u.message.clone())
        .or_else(|| facts.unschedulable.clone());
    if d.cancelled && status.phase == Some(RunPhase::Building) {
        status.phase = Some(RunPhase::Cancelled);
    }
    let phase = status.phase.unwrap_or(RunPhase::Building);
    let final_phase = phase != RunPhase::Building;
    let progress = summary(&counts);
    let (why, progressing) = match (final_phase, d.suspended) {
        (true, _) => (format!("{phase:?}"), false),
        (false, true) => ("Suspended".to_string(), false),
        (false, false) => ("Building".to_string(), true),
    };
    let conditions: [(&str, bool, &str, &str); 5] = [
        ("Ready", phase == RunPhase::Succeeded, &why, &progress),
        ("Complete", final_phase, &why, &progress),
        ("Progressing", progressing, &why, &progress),
        match d.registry_error {
            Some(err) => ("Degraded", true, "RegistryError", err),
            None => ("Degraded", false, "AsExpected", ""),
        },
        match &stalled {
            // Kept after the run ends: it says why the run failed.
            Some(message) => ("Stalled", true, "Unschedulable", message),
            None => ("Stalled", false, "AsExpected", ""),
        },
    ];
    for (type_, value, reason, message) in conditions {
        status::set_condition(
            &mut status.conditions,
            type_,
            value,
            reason,
            message,
            d.generation,
            now,
        );
    }
    // A run that resumed (its spec changed) is not complete any more.
    status.completed_at = if final_phase {
        old.completed_at.or(Some(now))
    } else {
        None
    };
}

/// The run waits for its plan; `error` says why, when reading its source failed.
pub fn resolving(
    status: &mut ImageBuildRunStatus,
    error: Option<&str>,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    status.phase = Some(RunPhase::Resolving);
    status.completed_at = None;
    let (reason, message) = match error {
        None => (
            "Resolving",
            "resolving instances and planning images".to_string(),
        ),
        Some(e) => (
            "SourceUnavailable",
            format!("reading the instance source failed; trying again: {e}"),
        ),
    };
    status::set_condition(
        &mut status.conditions,
        "Progressing",
        true,
        reason,
        &message,
        generation,
        now,
    );
}

/// Ends a run that was cancelled before its plan was made: `Cancelled`, nothing built.
pub fn cancelled(status: &mut ImageBuildRunStatus, generation: Option<i64>, now: DateTime<Utc>) {
    let message = "cancelled before its plan was made";
    end(
        status,
        RunPhase::Cancelled,
        "Cancelled",
        message,
        generation,
        now,
    );
}

/// The run fails for good (its spec is invalid, or it cannot be planned).
pub fn fail(
    status: &mut ImageBuildRunStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    end(status, RunPhase::Failed, reason, message, generation, now);
}

/// Ends the run in `phase` without a derivation: not Ready, not Progressing, Complete.
fn end(
    status: &mut ImageBuildRunStatus,
    phase: RunPhase,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    status.phase = Some(phase);
    status.completed_at.get_or_insert(now);
    for (type_, value) in [("Ready", false), ("Progressing", false), ("Complete", true)] {
        status::set_condition(
            &mut status.conditions,
            type_,
            value,
            reason,
            message,
            generation,
            now,
        );
    }
}

fn summary(counts: &[PhaseCounts; 4]) -> String {
    let [b, base, asm, post] = counts;
    let done = |c: &PhaseCounts| c.succeeded + c.skipped;
    let mut text = format!(
        "builder {}/{}, bases {}/{}, assemblies {}/{}",
        done(b),
        b.total,
        done(base),
        base.total,
        done(asm),
        asm.total
    );
    if post.total > 0 {
        text.push_str(&format!(", post-assembly {}/{}", done(post), post.total));
    }
    let failed: u32 = counts.iter().map(|c| c.failed).sum();
    if failed > 0 {
        text.push_str(&format!("; {failed} failed"));
    }
    text
}

/// The status the run has now, as far as this process knows: the one it last wrote, else
/// the one read.
pub fn current(run: &ImageBuildRun, state: &RunState) -> ImageBuildRunStatus {
    match &state.written {
        Some((status, _)) => status.clone(),
        None => run.status.clone().unwrap_or_default(),
    }
}

/// Whether a status is to be written: the status it replaces, or nothing to write now
/// (and how long a change that waits for its turn waits).
enum Due {
    Now(Box<ImageBuildRunStatus>),
    Not(Option<Duration>),
}

/// Whether `new` is to be written: if it differs from the current status; with
/// `coalesce`, a change of counts or messages alone waits until a second has passed since
/// the last write.
fn due(
    ctx: &Ctx,
    run: &ImageBuildRun,
    state: &RunState,
    new: &ImageBuildRunStatus,
    coalesce: bool,
) -> Due {
    let old = current(run, state);
    if &old == new || !ctx.config.may_write() {
        return Due::Not(None);
    }
    if coalesce
        && !status::significant(&old, new)
        && let Some((_, at)) = &state.written
        && let Some(wait) = STATUS_INTERVAL.checked_sub(at.elapsed())
    {
        return Due::Not(Some(wait));
    }
    Due::Now(Box::new(old))
}

/// Writes `new` if it differs from the current status (after the answer of a write sent
/// before, see [`send`]); with `coalesce`, a change of counts or messages alone waits
/// until a second has passed since the last write, and the wait is returned.
pub async fn write(
    ctx: &Ctx,
    run: &ImageBuildRun,
    state: &mut RunState,
    new: &ImageBuildRunStatus,
    coalesce: bool,
) -> Result<Option<Duration>, Error> {
    settle(state).await?;
    let old = match due(ctx, run, state, new, coalesce) {
        Due::Now(old) => old,
        Due::Not(wait) => return Ok(wait),
    };
    patch(&ctx.client, &ctx.metrics, &ctx.recorder, run, &old, new).await?;
    state.written = Some((new.clone(), Instant::now()));
    Ok(None)
}

/// A status write sent in the background, and the status this process took as written
/// before it.
pub struct StatusSend {
    previous: Option<(ImageBuildRunStatus, Instant)>,
    handle: tokio::task::JoinHandle<Result<(), kube::Error>>,
}

/// How long a status due waits while the write before it is in flight (and is tried
/// again then): a run's writes land in the order made.
const BEHIND_A_WRITE: Duration = Duration::from_millis(50);

/// As [`write`] with `coalesce`, but the write goes in a task of its own: the status is
/// taken as written from now on, and a reconcile does not hold the run's events for the
/// API server's answer. `wake` is called if the write fails. The answer is taken by the
/// next write, or the next send once it has come: a failure is then its error (the
/// status written before is the current one again). A status due while the write before
/// it is in flight is not sent: the wait to try again is returned.
pub async fn send(
    ctx: &Ctx,
    run: &Arc<ImageBuildRun>,
    state: &mut RunState,
    new: &ImageBuildRunStatus,
    wake: impl FnOnce() + Send + 'static,
) -> Result<Option<Duration>, Error> {
    if state
        .status_send
        .as_ref()
        .is_none_or(|s| s.handle.is_finished())
    {
        settle(state).await?;
    }
    let old = match due(ctx, run, state, new, true) {
        Due::Now(old) => old,
        Due::Not(wait) => return Ok(wait),
    };
    if state.status_send.is_some() {
        return Ok(Some(BEHIND_A_WRITE));
    }
    let previous = state.written.replace((new.clone(), Instant::now()));
    let (client, metrics, recorder) = (
        ctx.client.clone(),
        ctx.metrics.clone(),
        ctx.recorder.clone(),
    );
    let (run, new) = (run.clone(), new.clone());
    let handle = tokio::spawn(async move {
        let sent = patch(&client, &metrics, &recorder, &run, &old, &new).await;
        if sent.is_err() {
            wake();
        }
        sent
    });
    state.status_send = Some(StatusSend { previous, handle });
    Ok(None)
}

/// Waits for the answer of the status write in flight, if one is; its failure is the
/// answer, and the status taken as written is the one before it again.
async fn settle(state: &mut RunState) -> Result<(), Error> {
    let Some(send) = state.status_send.take() else {
        return Ok(());
    };
    let error = match send.handle.await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e,
        Err(e) => kube::Error::Service(Box::new(e)),
    };
    state.written = send.previous;
    Err(error.into())
}

/// Patches the run's status from `old` to `new`, sets the gauges that mirror it, and
/// publishes the Events the change warrants.
async fn patch(
    client: &kube::Client,
    metrics: &Metrics,
    recorder: &Recorder,
    run: &ImageBuildRun,
    old: &ImageBuildRunStatus,
    new: &ImageBuildRunStatus,
) -> Result<(), kube::Error> {
    let (ns, name, uid) = (
        run.namespace().unwrap_or_default(),
        run.name_any(),
        run.uid().unwrap_or_default(),
    );
    let runs: Api<ImageBuildRun> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"status": status::patch_body(new)});
    {
        // The gauges change with the status, never seen apart by a scrape.
        let _write = metrics.status_write();
        runs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        let id = RunId {
            namespace: &ns,
            name: &name,
            uid: &uid,
        };
        metrics.set_status(&id, new);
    }
    let reference = run.object_ref(&());
    for event in events::transitions(old, new) {
        // The status already says it: an Event that fails to publish is logged, not
        // retried.
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(run = %name, reason = %event.reason, error = %e, "publishing an Event failed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::Response;
    use kube::client::Body;

    use super::*;
    use crate::controller::context::tests::Handle;

    fn run(phase: RunPhase) -> ImageBuildRun {
        let mut run: ImageBuildRun = serde_json::from_value(json!({
            "apiVersion": "imagebuild.dev/v1alpha1",
            "kind": "ImageBuildRun",
            "metadata": {"name": "r", "namespace": "ns", "uid": "u1", "generation": 1},
            "spec": serde_yaml_ng::from_str::<serde_json::Value>(r#"
instances: {list: [a__a-1], upstreamImage: "r.io/up/{{ name }}:1"}
builder: {context: {inline: "FROM scratch"}, image: "r.io/b:1"}
base: {context: {inline: "FROM scratch"}, image: "r.io/base:{{ customTag }}"}
assembly: {context: {inline: "FROM scratch"}, image: "r.io/a:{{ instanceId | lower }}"}
"#).unwrap(),
        }))
        .unwrap();
        run.status = Some(ImageBuildRunStatus {
            phase: Some(phase),
            ..Default::default()
        });
        run
    }

    fn ctx() -> (Ctx, Handle) {
        crate::controller::context::tests::ctx(vec![], vec![])
    }

    #[test]
    fn stalled_says_a_pod_waited_too_long_only_as_of_when_it_was_seen_waiting() {
        let run = run(RunPhase::Building);
        let raw = [crate::instances::RawInstance {
            id: "a__a-1".into(),
            image: None,
        }];
        let plan = crate::plan::build("r", &run.spec, &raw).unwrap();
        let states = vec![NodeState::Running { attempt: 1 }; plan.nodes.len()];
        let facts = RecordFacts::default();
        let now = Utc::now();
        let since = now - chrono::Duration::seconds(20);
        let stalled = |seen_after: i64| {
            let unschedulable = [Unschedulable {
                node: 0,
                message: "0/4 nodes are available".into(),
                since,
                seen: since + chrono::Duration::seconds(seen_after),
            }];
            let mut status = run.status.clone().unwrap();
            derive(
                &mut status,
                &Derivation {
                    states: &states,
                    counts: super::status::counts(&plan, &states),
                    facts: &facts,
                    manifests: vec![],
                    attempts: 1,
                    suspended: false,
                    cancelled: false,
                    registry_error: None,
                    unschedulable: &unschedulable,
                    pending_timeout: Duration::from_secs(15),
                    workers: 1,
                    generation: Some(1),
                    now,
                },
            );
            let stalled = status.conditions.iter().find(|c| c.type_ == "Stalled");
            stalled.map(|c| (c.status.clone(), c.message.clone()))
        };
        // Waiting 20 s by now, but last seen waiting 10 s in: not yet too long.
        assert_eq!(stalled(10), Some(("False".into(), String::new())));
        // Seen still waiting past the timeout: the scheduler's message says why.
        let message = "0/4 nodes are available".to_string();
        assert_eq!(stalled(15), Some(("True".into(), message)));
    }

    /// Answers the next request with `body` after checking its method and path; the
    /// request's body.
    async fn answer(
        handle: &mut Handle,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let (request, send) = handle.next_request().await.expect("a request");
        assert_eq!(request.method().as_str(), method);
        assert_eq!(request.uri().path(), path);
        let bytes = request.into_body().collect_bytes().await.unwrap();
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
        serde_json::from_slice(&bytes).unwrap_or_default()
    }

    async fn no_request(handle: &mut Handle) {
        let next = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
        assert!(
            next.is_err(),
            "an unexpected request: {:?}",
            next.map(|r| r.map(|(r, _)| r.uri().clone()))
        );
    }

    #[tokio::test]
    async fn a_write_patches_the_status_tells_its_events_and_later_ones_compare_with_it() {
        let (ctx, mut handle) = ctx();
        let run = run(RunPhase::Building);
        let mut state = RunState::default();
        let mut done = run.status.clone().unwrap();
        done.phase = Some(RunPhase::Succeeded);
        let writing = {
            let run = run.clone();
            let done = done.clone();
            async move {
                let wait = write(&ctx, &run, &mut state, &done, true).await.unwrap();
                (ctx, state, wait)
            }
        };
        let server = async {
            let patch = answer(
                &mut handle,
                "PATCH",
                "/apis/imagebuild.dev/v1alpha1/namespaces/ns/imagebuildruns/r/status",
                serde_json::to_value(&run).unwrap(),
            )
            .await;
            assert_eq!(patch["status"]["phase"], "Succeeded");
            // Fields the status leaves out are removed (null), whatever the old copy held.
            assert!(patch["status"]["estimatedCompletion"].is_null());
            let event = answer(
                &mut handle,
                "POST",
                "/apis/events.k8s.io/v1/namespaces/ns/events",
                json!({}),
            )
            .await;
            assert_eq!(event["reason"], "Completed");
            assert_eq!(event["regarding"]["name"], "r");
        };
        let ((ctx, mut state, wait), ()) = tokio::join!(writing, server);
        assert_eq!(wait, None);
        assert_eq!(
            state.written.as_ref().map(|(s, _)| s.phase),
            Some(Some(RunPhase::Succeeded))
        );

        // The watch still says Building; the next write compares with what was written:
        // the same status is no request and no Event, and a change of counts alone within
        // a second waits.
        write(&ctx, &run, &mut state, &done, true).await.unwrap();
        no_request(&mut handle).await;
        let mut counted = done.clone();
        counted.failed_total = 1;
        let wait = write(&ctx, &run, &mut state, &counted, true).await.unwrap();
        assert!(wait.is_some_and(|w| w <= STATUS_INTERVAL), "{wait:?}");
        no_request(&mut handle).await;
    }

    #[tokio::test]
    async fn a_status_sent_is_taken_as_written_at_once_and_its_failure_undone_and_told() {
        let (ctx, mut handle) = ctx();
        let run = Arc::new(run(RunPhase::Building));
        let mut state = RunState::default();
        let mut done = run.status.clone().unwrap();
        done.phase = Some(RunPhase::Succeeded);
        let (woken, mut wakes) = tokio::sync::mpsc::unbounded_channel();
        // Sent without waiting: no request is answered yet.
        let wait = send(&ctx, &run, &mut state, &done, move || {
            let _ = woken.send(());
        })
        .await
        .unwrap();
        assert_eq!(wait, None);
        assert_eq!(current(&run, &state).phase, Some(RunPhase::Succeeded));
        // Another status due while it is in flight waits its turn, without waiting for it.
        let mut then = done.clone();
        then.phase = Some(RunPhase::Failed);
        let wait = send(&ctx, &run, &mut state, &then, || {}).await.unwrap();
        assert_eq!(wait, Some(BEHIND_A_WRITE));
        assert_eq!(current(&run, &state).phase, Some(RunPhase::Succeeded));
        // The API server fails it: the run is woken, and the next write says so and
        // takes the status read as current again.
        let (request, answer_with) = handle.next_request().await.expect("the patch");
        assert_eq!(request.method().as_str(), "PATCH");
        let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "down", "reason": "InternalError", "code": 500});
        answer_with.send_response(
            Response::builder()
                .status(500)
                .body(Body::from(serde_json::to_vec(&status).unwrap()))
                .unwrap(),
        );
        tokio::time::timeout(Duration::from_secs(5), wakes.recv())
            .await
            .expect("woken")
            .expect("a wake");
        let failed = write(&ctx, &run, &mut state, &done, true).await;
        assert!(failed.is_err(), "{failed:?}");
        assert_eq!(current(&run, &state).phase, Some(RunPhase::Building));
        // Written again, in order: the patch, then its Event.
        let writing = async {
            let wait = write(&ctx, &run, &mut state, &done, true).await.unwrap();
            (wait, state)
        };
        let server = async {
            let patch = answer(
                &mut handle,
                "PATCH",
                "/apis/imagebuild.dev/v1alpha1/namespaces/ns/imagebuildruns/r/status",
                serde_json::to_value(&*run).unwrap(),
            )
            .await;
            assert_eq!(patch["status"]["phase"], "Succeeded");
            answer(
                &mut handle,
                "POST",
                "/apis/events.k8s.io/v1/namespaces/ns/events",
                json!({}),
            )
            .await;
        };
        let ((wait, state), ()) = tokio::join!(writing, server);
        assert_eq!(wait, None);
        assert_eq!(current(&run, &state).phase, Some(RunPhase::Succeeded));
    }
}
