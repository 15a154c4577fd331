//! One reconcile of one run, as the pipeline it is:
//!
//! 1. **observe**: the run's records (its manifest), Jobs and pods, in the scheduler's terms;
//! 2. **resolve**: its plan, resolved in the background (`resolve`);
//! 3. **check presence**: what the registry says of its images, checked in the background
//!    (`presence`);
//! 4. **decide**: the scheduler's actions, within the run's share of the workers (`ledger`);
//! 5. **apply**: new Jobs whose names are free dispatched, the records the actions make
//!    written, then the finished Jobs deleted and the retries dispatched (`actions`,
//!    `apply`; the creates and deletes sent in the background, `sends`, and the records
//!    too, `writing`: their Jobs are deleted once the write is answered): a crash in
//!    between leaves a Job that is harvested again, never a lost result;
//! 6. **publish**: the status, its gauges and Events (`publish`; sent in the background
//!    but for a final status).
//!
//! A run whose final status is of its current spec is left alone: a restart or a new
//! leader changes nothing of it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::controller::Action as Requeue;
use kube::{Api, ResourceExt};

use super::actions::{self, JobMaking};
use super::apply;
use super::context::{Ctx, Error};
use super::ledger::Decision;
use super::observe::{self, LiveJob, ready_since};
use super::preflight::{self, Verdict};
use super::presence::{self, Presence};
use super::publish::{self, Derivation};
use super::resolve::{self, Step};
use super::retry;
use super::status::RecordFacts;
use super::writing::{Harvested, Writing, answered, count};
use crate::api::{ImageBuildRun, ImageBuildRunStatus, RunPhase};
use crate::job::JobInputs;
use crate::manifest::{self, Manifest};
use crate::metrics::{RunId, RunSettings};
use crate::schedule::{self, Action, Policy, Tally};
use crate::validate::{self, Settings};

/// The least time between two manifest writes of a run (see the apply step).
const MANIFEST_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Reconciles one run.
pub async fn reconcile(run: Arc<ImageBuildRun>, ctx: Arc<Ctx>) -> Result<Requeue, Error> {
    let (ns, name, uid) = (
        run.namespace().unwrap_or_default(),
        run.name_any(),
        run.uid().unwrap_or_default(),
    );
    let key = format!("{ns}/{name}");
    if !ctx.config.may_write() {
        return Ok(Requeue::await_change());
    }
    if run.metadata.deletion_timestamp.is_some() {
        ctx.forget(&key);
        ctx.metrics.forget(&ns, &name);
        return Ok(Requeue::await_change());
    }
    ctx.metrics.track(&ns, &name, &uid);
    let id = RunId {
        namespace: &ns,
        name: &name,
        uid: &uid,
    };
    if !ctx.metrics.published(&id) {
        // First look at the run in this process: its gauges start from its status.
        let _write = ctx.metrics.status_write();
        ctx.metrics
            .set_status(&id, &run.status.clone().unwrap_or_default());
    }
    let state = ctx.runs.get(&key);
    let mut state = state.lock().await;
    state.for_uid(&uid);
    let generation = run.metadata.generation;
    let old = publish::current(&run, &state);
    if finished(&old, generation) {
        ctx.ledger().remove(&key);
        return Ok(Requeue::await_change());
    }
    let now = Utc::now();
    let mut status = old.clone();
    status.observed_generation = generation;
    status.started_at.get_or_insert(now);

    // A spec is read once per generation (the spec is all it reads).
    let validated = match (generation, &state.validated) {
        (Some(g), Some((at, settings))) if *at == g => Ok(*settings),
        _ => validate::validate(&run.spec),
    };
    let settings = match validated {
        Ok(s) => {
            state.validated = generation.map(|g| (g, s));
            s
        }
        Err(e) if is_final(&old) => {
            // A finished run keeps its outcome: an invalid edit of a mutable field changes
            // nothing of what was built (the CRD's rules refuse such edits; an object
            // stored under an older CRD can still have one).
            tracing::warn!(run = %key, error = %e, "a finished run's spec was edited to an invalid value; its outcome stands");
            return Ok(Requeue::await_change());
        }
        Err(e) => {
            publish::fail(&mut status, "InvalidSpec", &e.to_string(), generation, now);
            publish::write(&ctx, &run, &mut state, &status, false).await?;
            return Ok(Requeue::await_change());
        }
    };

    // The resolution wakes the run when it ends (the requeue below is the fallback).
    let step = state.resolution.step(Instant::now(), || {
        resolve::spawn(run.clone(), ctx.client.clone(), ctx.wakes.waker(&ns, &name))
    });
    let plan = match step {
        Step::Ready(plan) => plan,
        // Cancelled before its plan: any Job of it (from before a restart) goes.
        Step::Pending { .. } if run.spec.cancel => {
            let live = apply::live_jobs(&ctx, &ns, &uid);
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
            apply::delete_jobs(&jobs, live.into_keys().collect()).await?;
            publish::cancelled(&mut status, generation, now);
            publish::write(&ctx, &run, &mut state, &status, false).await?;
            return Ok(Requeue::await_change());
        }
        Step::Pending { error, wait } => {
            publish::resolving(&mut status, error.as_deref(), generation, now);
            publish::write(&ctx, &run, &mut state, &status, false).await?;
            return Ok(Requeue::requeue(wait.max(Duration::from_millis(100))));
        }
        Step::Failed(message) => {
            publish::fail(&mut status, "PlanFailed", &message, generation, now);
            publish::write(&ctx, &run, &mut state, &status, false).await?;
            return Ok(Requeue::await_change());
        }
    };
    if let Some(message) = manifest::too_many(plan.nodes.len()) {
        publish::fail(&mut status, "TooManyImages", &message, generation, now);
        publish::write(&ctx, &run, &mut state, &status, false).await?;
        return Ok(Requeue::await_change());
    }

    // Before the first Job of this generation: would the API server take its Jobs? Then
    // the script they mount.
    let inputs = JobInputs {
        run_name: &name,
        namespace: &ns,
        run_uid: &uid,
        spec: &run.spec,
        build_timeout: settings.build_timeout,
    };
    if state.preflight != Some(generation) {
        match preflight::check(&ctx.client, &plan, &inputs, settings.attempts).await? {
            Verdict::Accepted => state.preflight = Some(generation),
            Verdict::Refused(message) => {
                publish::fail(&mut status, "InvalidSpec", &message, generation, now);
                publish::write(&ctx, &run, &mut state, &status, false).await?;
                return Ok(Requeue::await_change());
            }
        }
    }

    // The creates and deletes of earlier reconciles that failed: their images are ready
    // again, their Jobs to delete again. A refusal past the dry run (a pod annotation
    // rendered for one instance only, say) fails the run rather than retry it; any other
    // failure is this reconcile's.
    match state.failed_sends() {
        Err(Error::JobRefused(message)) => {
            publish::fail(&mut status, "InvalidSpec", &message, generation, now);
            publish::write(&ctx, &run, &mut state, &status, false).await?;
            return Ok(Requeue::await_change());
        }
        result => result?,
    }

    // Observe.
    // Records are kept by plan position: a manifest is used with the plan it was loaded
    // for only.
    // What the run's last write of records in the background left, once answered: its
    // Jobs go below (`writing`).
    let mut harvested = Harvested::default();
    let kept = state
        .manifest
        .take()
        .filter(|m| Arc::ptr_eq(m.plan(), &plan));
    let mut manifest = match kept {
        Some(m) => m,
        None => {
            // A manifest read while a write is in flight could miss its records.
            if let Some(writing) = state.writing.take() {
                answered(writing, None, &mut harvested, &ctx, &id, &run).await?;
            }
            Manifest::load(&ctx.client, &run, &plan).await?
        }
    };
    // A retry request not yet honoured: its records first, then the status that says so.
    let retry_request = run
        .spec
        .retry_request
        .as_ref()
        .filter(|r| !run.spec.cancel && old.last_retry.as_ref().map(|l| l.id) != Some(r.id));
    // A write answered is taken now; one in flight is waited for only if the records are
    // written here and now (a retry request's).
    if let Some(writing) = state
        .writing
        .take_if(|w| retry_request.is_some() || w.answered())
    {
        answered(
            writing,
            Some(&mut manifest),
            &mut harvested,
            &ctx,
            &id,
            &run,
        )
        .await?;
    }
    if let Some(request) = retry_request {
        let honoured = match state.retry.take().filter(|r| r.id == request.id) {
            // Its records were written by an earlier pass whose status write failed.
            Some(done) => done,
            None => {
                let (reopened, honoured) = retry::reopen(&plan, manifest.records(), request, now);
                tracing::info!(run = %key, "{}", honoured.message);
                if !reopened.is_empty() {
                    manifest.write(&ctx.client, &run, reopened).await?;
                }
                honoured
            }
        };
        state.retry = Some(honoured.clone());
        status.last_retry = Some(honoured);
    }
    let live = apply::live_jobs(&ctx, &ns, &uid);
    let unseen = state.dispatched.unseen(&live, Instant::now());
    // A Job whose record is being written, or was just written (it is deleted below), is
    // read from its record, not harvested again.
    let unrecorded: BTreeMap<String, LiveJob>;
    let seen = match (&state.writing, harvested.jobs.is_empty()) {
        (None, true) => &live,
        (writing, _) => {
            unrecorded = live
                .iter()
                .filter(|&(name, _)| {
                    !harvested.jobs.contains(name)
                        && !writing.as_ref().is_some_and(|w| w.holds(name))
                })
                .map(|(name, job)| (name.clone(), job.clone()))
                .collect();
            &unrecorded
        }
    };
    // The records' states, kept from the reconcile before (`working`), read over.
    let states = state.working.take(&mut manifest);
    let mut observed = observe::over(&plan, states, seen, &unseen, settings.pending_timeout, now);

    // Check presence.
    let presence = state
        .presence
        .get_or_insert_with(|| Presence::new(plan.nodes.len(), run.spec.force_rebuild));
    presence.collect(
        &plan,
        &observed.states,
        Instant::now(),
        ctx.config.registry_stall,
    );
    let todo = presence.due(&plan, &observed.states, Instant::now());
    if !todo.is_empty() {
        match presence::checker_for(&run, &ctx).await {
            Ok(checker) => {
                let done = ctx.wakes.waker(&ns, &name);
                presence.start(checker, &plan, todo, Instant::now(), done);
            }
            Err(message) => presence.not_started(message, Instant::now()),
        }
    }
    let registry = presence.known().to_vec();
    let registry_error = presence.error().map(str::to_string);
    let checking = presence.checking();

    // Decide.
    let cancelling = run.spec.cancel;
    let mut policy = policy(&run, &settings, &status);
    policy.suspend |= cancelling;
    // Kept up from the last decision where it can be: only the nodes set back to their
    // records since, and those read from a Job, changed.
    let (frontier, changed) = match state.working.since_decided() {
        Some((frontier, mut changed)) => {
            changed.extend_from_slice(&observed.overlaid);
            (Some(frontier), Some(changed))
        }
        None => (None, None),
    };
    let (mut actions, frontier) = match ctx.config.max_total_workers {
        None => schedule::decide_from(
            frontier,
            changed.as_deref(),
            &plan,
            &registry,
            &observed.states,
            &policy,
            now,
        ),
        Some(cap) => {
            let decision = Decision {
                plan: &plan,
                registry: &registry,
                states: &observed.states,
                now,
            };
            (ctx.ledger().decide(&key, cap, &decision, &mut policy), None)
        }
    };
    ctx.metrics.set_settings(
        &id,
        &RunSettings {
            suspended: run.spec.suspend,
            max_workers: settings.max_workers,
            deadline: policy.deadline,
            unschedulable: observed.unschedulable.len() as u32,
        },
    );

    // Apply: the Jobs are made first (one the spec cannot make fails its image), those
    // with free names dispatched, the records written, then the Jobs deleted and the rest
    // dispatched. A Job dispatched runs from then on; its create, like a delete, goes in
    // the background (`sends`).
    let run_started = status.started_at.unwrap_or(now);
    let making = JobMaking {
        inputs,
        identity: ctx.config.identity.as_deref(),
        ready_since: &|node| ready_since(&plan, manifest.records(), node, run_started),
        now,
    };
    if cancelling {
        // Cancelled: nothing new; every Job in flight goes (a finished one is harvested
        // first, by the actions decided above).
        actions.extend(actions::stop_all(&observed.states));
    }
    if let Some(writing) = &state.writing {
        // No Job is made under the name of one whose record is being written: that Job
        // is deleted first, once the write is answered.
        actions.retain(|a| {
            !matches!(a, Action::CreateJob { node, .. } if writing.holds(&plan.nodes[*node].job_name))
        });
    }
    let creates = actions
        .iter()
        .any(|a| matches!(a, Action::CreateJob { .. }));
    let new_jobs = if creates {
        // Compiled once per generation of the spec.
        if state
            .compiled
            .as_ref()
            .is_some_and(|(at, _)| *at != generation)
        {
            state.compiled = None;
        }
        let (_, compiled) = state
            .compiled
            .get_or_insert_with(|| (generation, actions::Compiled::new(&run.spec)));
        actions::jobs(&plan, &mut actions, &making, compiled)
    } else {
        Vec::new()
    };
    let recorded = actions::records(
        &plan,
        &observed.states,
        &observed.outcomes,
        &actions,
        manifest.records(),
        now,
    );
    if !ctx.config.may_write() {
        state.manifest = Some(manifest);
        return Ok(Requeue::await_change());
    }
    // The pods of failed builds, read before the states move on.
    let failed = apply::failed_pods(&plan, &actions, &observed.states, &live);
    let mut states = std::mem::take(&mut observed.states);
    for action in &actions {
        schedule::apply(&mut states, action);
    }
    if cancelling {
        actions::stopped(&mut states);
    }
    // What the states count, from the records' tally and the nodes this reconcile changed
    // (counted whole after a cancel, which changed every node in flight).
    let tally = match cancelling {
        false => state
            .working
            .tally(&manifest, &states, &observed.overlaid, &actions),
        true => None,
    }
    .unwrap_or_else(|| Tally::of(&plan, &states));
    debug_assert_eq!(tally, Tally::of(&plan, &states));
    // Records are written at most once a second per run, and one write at a time: the
    // finished Jobs they harvest stay until then (a Job is deleted only once its record is
    // written) and are read again by the next reconcile, which writes them all in one go.
    // A write goes in the background (`writing`), but for a run that ends with it, or is
    // cancelled: that write, and one still in flight, are answered here.
    let ending = tally.all_final();
    let now_or_never = ending || cancelling;
    if now_or_never && let Some(writing) = state.writing.take() {
        answered(
            writing,
            Some(&mut manifest),
            &mut harvested,
            &ctx,
            &id,
            &run,
        )
        .await?;
    }
    let hold = !recorded.records.is_empty()
        && !now_or_never
        && (state.writing.is_some()
            || state
                .manifest_written
                .is_some_and(|at| at.elapsed() < MANIFEST_WRITE_INTERVAL));
    let progressed = !recorded.records.is_empty() && !hold;
    let in_background = progressed && !now_or_never;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    // The Jobs to delete now: those harvested by records written (or held) later wait.
    let deferred = |name: &String| (hold || in_background) && recorded.records.contains_key(name);
    let (waiting, mut deletes): (Vec<String>, Vec<String>) = actions
        .iter()
        .filter_map(|a| match a {
            Action::DeleteJob { node } => Some(plan.nodes[*node].job_name.clone()),
            _ => None,
        })
        .chain(observed.stale_jobs.iter().cloned())
        .partition(|name| deferred(name));
    deletes.extend(std::mem::take(&mut harvested.jobs));
    // The Jobs whose names are free are dispatched before the records are written: a freed
    // slot is taken again without waiting for the write (a crash between the two loses
    // nothing: the finished Jobs are deleted only once their records are written, and are
    // read again). A Job of the same name as one being deleted (a retry) is sent after
    // that deletion; one of the same name as a Job whose deletion waits for its record
    // waits too (it is decided again).
    let (late, early): (Vec<_>, Vec<_>) = new_jobs
        .into_iter()
        .filter(|new| !deferred(&new.name))
        .partition(|new| deletes.contains(&new.name));
    let wake = || ctx.wakes.waker(&ns, &name);
    state
        .send(&jobs, &[], early, &live, &ctx.metrics, wake())
        .await;
    // The pods of failed builds stay for their logs (up to the cap), then their Jobs go.
    let mut keep = std::mem::take(&mut harvested.failed);
    if progressed {
        let counted = recorded.counted;
        if in_background {
            let staged = manifest.stage(&run, recorded.records)?;
            let write = Harvested {
                jobs: waiting.into_iter().collect(),
                counted,
                failed,
            };
            state.writing = Some(Writing::start(
                ctx.client.clone(),
                run.clone(),
                staged,
                write,
                wake(),
            ));
        } else {
            manifest.write(&ctx.client, &run, recorded.records).await?;
            count(&ctx, &id, &run, &counted);
            keep.extend(failed);
        }
        state.manifest_written = Some(Instant::now());
    }
    if progressed || ctx.metrics.medians_unset(&id) {
        let facts = facts(&mut state.facts, &manifest);
        ctx.metrics.set_medians(&id, &facts.medians);
    }
    apply::keep_pods(&ctx, &run, keep).await;
    if !ctx.config.may_write() {
        state.manifest = Some(manifest);
        return Ok(Requeue::await_change());
    }
    state
        .send(&jobs, &deletes, late, &live, &ctx.metrics, wake())
        .await;

    // Publish.
    let facts = facts(&mut state.facts, &manifest);
    publish::derive(
        &mut status,
        &Derivation {
            states: &states,
            counts: tally.counts(),
            facts,
            manifests: manifest.names(&name),
            attempts: run.spec.retry.attempts,
            suspended: run.spec.suspend,
            cancelled: cancelling,
            registry_error: registry_error.as_deref(),
            unschedulable: &observed.unschedulable,
            pending_timeout: settings.pending_timeout,
            workers: policy.max_workers,
            generation,
            now,
        },
    );
    let next_retry = tally.next_wakeup(&states);
    // The states are kept for the next reconcile; one that cancels the run changed
    // every node in flight, and the next makes them anew.
    match cancelling {
        false => state
            .working
            .keep(states, &observed.overlaid, &actions, frontier),
        true => state.working.forget(),
    }
    if is_final(&status) {
        // A run that ends is not reconciled again: its last deletes are answered first,
        // and one that failed is this reconcile's error (its Job deleted again next
        // time), not a Job left behind.
        state.sends.settle().await;
        state.failed_sends()?;
    }
    // A final status is written before the reconcile ends (none follows it); any other
    // goes in the background.
    let deferred = match is_final(&status) {
        true => publish::write(&ctx, &run, &mut state, &status, true).await?,
        false => publish::send(&ctx, &run, &mut state, &status, wake()).await?,
    };
    if is_final(&status) {
        // Nothing reads the records of a finished run again unless its spec changes (a
        // retry request): the manifest is read again then.
        state.manifest = None;
        state.facts = None;
    } else {
        state.manifest = Some(manifest);
    }
    if status.phase != Some(RunPhase::Building) {
        ctx.ledger().remove(&key);
        return Ok(Requeue::await_change());
    }
    // Wake for the next retry, or the run deadline. (A pod the scheduler cannot place
    // wakes its run at each list of the pods waiting for a node: `unplaced`.)
    let mut wait = Duration::from_secs(30);
    if let Some(at) = state.manifest_written.filter(|_| hold) {
        wait = wait
            .min(MANIFEST_WRITE_INTERVAL.saturating_sub(at.elapsed()) + Duration::from_millis(10));
    }
    for at in next_retry.into_iter().chain(policy.deadline) {
        wait = wait.min((at - now).to_std().unwrap_or_default() + Duration::from_millis(100));
    }
    if let Some(deferred) = deferred {
        // A change waits for its write.
        wait = wait.min(deferred);
    }
    if checking {
        // Registry checks run in the background; their answers unblock dispatch.
        wait = wait.min(Duration::from_secs(1));
    }
    Ok(Requeue::requeue(wait))
}

/// Whether the run ended with its current spec (its final status observed this
/// generation): nothing is left to do until the spec changes.
fn finished(status: &ImageBuildRunStatus, generation: Option<i64>) -> bool {
    is_final(status) && status.observed_generation == generation
}

/// Whether the run is in a final phase (of whatever generation).
fn is_final(status: &ImageBuildRunStatus) -> bool {
    status.phase.is_some_and(RunPhase::is_final)
}

fn policy(run: &ImageBuildRun, settings: &Settings, status: &ImageBuildRunStatus) -> Policy {
    // Past what a timestamp can hold there is no deadline (validation bounds it far below).
    // A retry request gives the run its whole time again.
    let since = match (status.started_at, &status.last_retry) {
        (Some(started), Some(retry)) => Some(started.max(retry.at)),
        (started, _) => started,
    };
    let deadline = since.and_then(|t| {
        chrono::Duration::from_std(settings.run_timeout)
            .ok()
            .and_then(|d| t.checked_add_signed(d))
    });
    Policy {
        max_workers: settings.max_workers,
        attempts: settings.attempts,
        backoff_initial: settings.backoff_initial,
        backoff_max: settings.backoff_max,
        force_rebuild: run.spec.force_rebuild,
        suspend: run.spec.suspend,
        deadline,
    }
}

/// What the status and metrics read of the manifest's records: gathered again only once
/// they changed (`kept` holds the last gathered, with the manifest version it is of).
fn facts<'a>(kept: &'a mut Option<(u64, RecordFacts)>, manifest: &Manifest) -> &'a RecordFacts {
    let version = manifest.version();
    if kept.as_ref().is_some_and(|(v, _)| *v != version) {
        *kept = None;
    }
    &kept
        .get_or_insert_with(|| (version, RecordFacts::of(manifest.records())))
        .1
}

/// After a panic in `run`'s reconcile: the run fails with the panic as its condition (a
/// panic is a bug; retrying would panic again) and its records stand.
pub async fn panicked(
    run: Arc<ImageBuildRun>,
    ctx: Arc<Ctx>,
    message: &str,
) -> Result<Requeue, Error> {
    let key = format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any());
    let state = ctx.runs.get(&key);
    let mut state = state.lock().await;
    state.for_uid(&run.uid().unwrap_or_default());
    // What the panic left half-done is read again from the cluster next time.
    state.manifest = None;
    let mut status = publish::current(&run, &state);
    let now = Utc::now();
    status.observed_generation = run.metadata.generation;
    status.started_at.get_or_insert(now);
    publish::fail(
        &mut status,
        "InternalError",
        &format!("the operator failed on this run (a bug: please report it): {message}"),
        run.metadata.generation,
        now,
    );
    publish::write(&ctx, &run, &mut state, &status, false).await?;
    ctx.ledger().remove(&key);
    Ok(Requeue::await_change())
}

/// A failed reconcile is logged, counted and tried again in 5 s.
pub fn error_policy(run: Arc<ImageBuildRun>, err: &Error, ctx: Arc<Ctx>) -> Requeue {
    tracing::warn!(run = %run.name_any(), error = %err, kind = err.kind(), "reconcile failed");
    ctx.metrics.reconcile_failed(err.kind());
    Requeue::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_final_status_of_the_current_generation_is_finished() {
        let status = |phase, generation| ImageBuildRunStatus {
            phase: Some(phase),
            observed_generation: generation,
            ..Default::default()
        };
        assert!(finished(&status(RunPhase::Succeeded, Some(1)), Some(1)));
        assert!(finished(&status(RunPhase::Failed, Some(3)), Some(3)));
        // The spec changed since (maxWorkers, retry, timeouts): the run resumes.
        assert!(!finished(
            &status(RunPhase::PartiallySucceeded, Some(1)),
            Some(2)
        ));
        assert!(!finished(&status(RunPhase::Building, Some(1)), Some(1)));
        assert!(!finished(&ImageBuildRunStatus::default(), Some(1)));
    }
}
