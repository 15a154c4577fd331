//! One reconcile of one run: read the world (run, records, Jobs and pods from the stores),
//! let the scheduler decide, apply its actions, write the status. Slow work (resolving
//! instances, registry checks) runs in background tasks whose results land in the run's
//! in-memory cache; reconcile never waits on them and looks again shortly while they run.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::events;
use super::observe::{LiveJob, observe, ready_since};
use super::status;
use crate::api::{ImageBuildRun, ImageBuildRunStatus, RunPhase};
use crate::job::{JobInputs, build_job};
use crate::manifest::Record;
use crate::manifest::{Manifest, ManifestError};
use crate::metrics::{Metrics, RunId, RunSettings};
use crate::names::{ANNOTATION_DISPATCHED_BY, LABEL_RUN_UID, MANAGER};
use crate::plan::{self, Plan, PodAnnotations};
use crate::registry::{DockerConfig, Presence, RegistryChecker};
use crate::schedule::{self, Action, NodeState, Policy, Registry};
use crate::validate::{self, Settings};

/// Wait before checking again images a failed registry check left unknown.
const RECHECK: Duration = Duration::from_secs(30);

/// The recent window `imagesPerHour` is measured over.
const THROUGHPUT_WINDOW: chrono::Duration = chrono::Duration::minutes(15);

/// Shortest interval between two status writes of one run that only update counts and
/// messages (a phase or condition change is written at once).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The manifest could not be read or written.
    #[error("manifest: {0}")]
    Manifest(#[from] ManifestError),
}

impl Error {
    /// A short, stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Manifest(_) => "manifest",
        }
    }
}

/// Operator-wide settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Registry requests in flight per run.
    pub registry_concurrency: usize,
    /// Build Jobs in flight across all runs (`--max-total-workers`), shared fairly.
    pub max_total_workers: Option<u32>,
    /// With leader election: writes only while the lease is held.
    pub fence: Arc<crate::leader::Fence>,
    /// The dispatcher's identity, for the `imagebuild.dev/dispatched-by` annotation.
    pub identity: Option<String>,
}

impl Config {
    /// Whether this operator may write: always without leader election; with it, only
    /// while it holds the lease. The client refuses writes past that too; checking here
    /// first saves a reconcile that would fail halfway.
    pub fn may_write(&self) -> bool {
        self.fence.may_write()
    }
}

/// What each run has in flight and could use, for sharing `max_total_workers`.
#[derive(Default)]
struct Fleet(BTreeMap<String, Usage>);

#[derive(Clone, Copy, Default)]
struct Usage {
    in_flight: u32,
    demand: u32,
}

/// What the operator keeps in memory about a run (rebuilt after a restart).
#[derive(Default)]
struct RunCache {
    uid: String,
    plan: PlanSlot,
    registry: Vec<Registry>,
    registry_error: Option<String>,
    checks_started: bool,
    /// Earliest time to check again the images a failed check left unknown.
    recheck_at: Option<std::time::Instant>,
    /// The manifest as last read or written; taken out while a reconcile works on it,
    /// and dropped (so read again) when a reconcile fails.
    manifest: Option<Manifest>,
}

#[derive(Default)]
enum PlanSlot {
    #[default]
    None,
    Resolving,
    Ready(Arc<Plan>),
    Failed(String),
}

/// Shared by every reconcile.
pub struct Ctx {
    /// The API client.
    pub client: Client,
    /// Jobs the operator manages.
    pub jobs: Vec<Store<Job>>,
    /// Their pods.
    pub pods: Vec<Store<Pod>>,
    /// Settings.
    pub config: Config,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
    runs: Mutex<HashMap<String, RunCache>>,
    fleet: Mutex<Fleet>,
    /// When each run's status was last written.
    status_written: Mutex<HashMap<String, std::time::Instant>>,
}

impl Ctx {
    /// A context over the given stores.
    pub fn new(
        client: Client,
        jobs: Vec<Store<Job>>,
        pods: Vec<Store<Pod>>,
        config: Config,
        metrics: Arc<Metrics>,
    ) -> Ctx {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Ctx {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            jobs,
            pods,
            config,
            metrics,
            runs: Mutex::new(HashMap::new()),
            fleet: Mutex::new(Fleet::default()),
            status_written: Mutex::new(HashMap::new()),
        }
    }
}

impl Ctx {
    /// Forgets every run `live` (given `namespace/name` and uid) rejects: their caches
    /// and their metrics. Runs deleted without the operator seeing a deletion end here.
    pub fn retain(&self, live: impl Fn(&str, &str) -> bool) {
        let mut gone = Vec::new();
        self.runs.lock().unwrap().retain(|key, cache| {
            let keep = cache.uid.is_empty() || live(key, &cache.uid);
            if !keep {
                gone.push(key.clone());
            }
            keep
        });
        let known = |key: &str| !gone.iter().any(|g| g == key);
        self.fleet.lock().unwrap().0.retain(|key, _| known(key));
        self.status_written
            .lock()
            .unwrap()
            .retain(|key, _| known(key));
        self.metrics.retain(live);
    }
}

impl Fleet {
    /// Decides for run `key` within its fair share of `cap`, and books what it will then
    /// have in flight (so a run reconciled next sees these Jobs before the stores do).
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        key: &str,
        cap: u32,
        plan: &Plan,
        registry: &[Registry],
        states: &[NodeState],
        policy: &mut Policy,
        now: DateTime<Utc>,
    ) -> Vec<Action> {
        let creates = |actions: &[Action]| {
            actions
                .iter()
                .filter(|a| matches!(a, Action::CreateJob { .. }))
                .count() as u32
        };
        let running = states
            .iter()
            .filter(|s| matches!(s, NodeState::Running { .. }))
            .count() as u32;
        // What the run would start on its own limit is what it asks of the fleet.
        let wanted = schedule::decide(plan, registry, states, policy, now);
        let demand = running + creates(&wanted);
        self.0.insert(
            key.to_string(),
            Usage {
                in_flight: running,
                demand,
            },
        );
        let demands: Vec<u32> = self.0.values().map(|u| u.demand).collect();
        let shares = schedule::fair_shares(cap, &demands);
        let mine = self
            .0
            .keys()
            .position(|k| k == key)
            .map_or(0, |i| shares[i]);
        let total: u32 = self.0.values().map(|u| u.in_flight).sum();
        let free = cap.saturating_sub(total);
        policy.max_workers = policy.max_workers.min(mine).min(running + free);
        let actions = if policy.max_workers >= demand {
            wanted
        } else {
            schedule::decide(plan, registry, states, policy, now)
        };
        if let Some(usage) = self.0.get_mut(key) {
            usage.in_flight = running + creates(&actions);
        }
        actions
    }
}

/// Reconciles one run.
pub async fn reconcile(run: Arc<ImageBuildRun>, ctx: Arc<Ctx>) -> Result<Requeue, Error> {
    let name = run.name_any();
    let ns = run.namespace().unwrap_or_default();
    let uid = run.uid().unwrap_or_default();
    let now = Utc::now();
    let key = format!("{ns}/{name}");
    if !ctx.config.may_write() {
        return Ok(Requeue::await_change());
    }
    if run.metadata.deletion_timestamp.is_some() {
        ctx.runs.lock().unwrap().remove(&key);
        ctx.fleet.lock().unwrap().0.remove(&key);
        ctx.status_written.lock().unwrap().remove(&key);
        ctx.metrics.forget(&ns, &name);
        return Ok(Requeue::await_change());
    }
    ctx.metrics.track(&ns, &name, &uid);
    let id = RunId {
        namespace: &ns,
        name: &name,
        uid: &uid,
    };
    let old = run.status.clone().unwrap_or_default();
    if !ctx.metrics.published(&id) {
        // First look at the run in this process: its gauges start from its status.
        let _publishing = ctx.metrics.publishing().await;
        ctx.metrics.set_status(&id, &old);
    }
    let mut status = old.clone();
    status.observed_generation = run.metadata.generation;
    status.started_at.get_or_insert(now);

    let settings = match validate::validate(&run.spec) {
        Ok(s) => s,
        Err(e) => {
            fail_run(
                &mut status,
                "InvalidSpec",
                &e.to_string(),
                run.metadata.generation,
                now,
            );
            write_status(&ctx, &run, &old, &status).await?;
            return Ok(Requeue::await_change());
        }
    };

    let plan = match plan_of(&run, &ctx) {
        PlanState::Ready(plan) => plan,
        PlanState::Resolving => {
            status.phase = Some(RunPhase::Resolving);
            let generation = run.metadata.generation;
            status::set_condition(
                &mut status.conditions,
                "Progressing",
                true,
                "Resolving",
                "resolving instances and planning images",
                generation,
                now,
            );
            write_status(&ctx, &run, &old, &status).await?;
            // The resolution runs in the background; look again shortly.
            return Ok(Requeue::requeue(Duration::from_secs(1)));
        }
        PlanState::Failed(message) => {
            fail_run(
                &mut status,
                "PlanFailed",
                &message,
                run.metadata.generation,
                now,
            );
            write_status(&ctx, &run, &old, &status).await?;
            return Ok(Requeue::await_change());
        }
    };

    if let Some(message) = crate::manifest::too_many(plan.nodes.len()) {
        fail_run(
            &mut status,
            "TooManyImages",
            &message,
            run.metadata.generation,
            now,
        );
        write_status(&ctx, &run, &old, &status).await?;
        return Ok(Requeue::await_change());
    }
    let cached = ctx
        .runs
        .lock()
        .unwrap()
        .get_mut(&key)
        .and_then(|c| c.manifest.take());
    let mut manifest = match cached {
        Some(m) => m,
        None => Manifest::load(&ctx.client, &run, &plan).await?,
    };
    let jobs = live_jobs(&ctx, &ns, &uid);
    let observed = observe(
        &plan,
        manifest.records(),
        &jobs,
        settings.pending_timeout,
        now,
    );
    let (registry, registry_error) = registry_view(&run, &ctx, &plan, &observed.states).await;

    let mut policy = policy(&run, &settings, &status);
    let actions = match ctx.config.max_total_workers {
        None => schedule::decide(&plan, &registry, &observed.states, &policy, now),
        Some(cap) => {
            let mut fleet = ctx.fleet.lock().unwrap();
            fleet.decide(
                &key,
                cap,
                &plan,
                &registry,
                &observed.states,
                &mut policy,
                now,
            )
        }
    };
    let run_settings = RunSettings {
        suspended: run.spec.suspend,
        max_workers: settings.max_workers,
        deadline: policy.deadline,
        unschedulable: observed.unschedulable.len() as u32,
    };
    ctx.metrics.set_settings(&id, &run_settings);
    let mut states = observed.states.clone();

    // Record first, then act: a crash in between leaves the Job, which is harvested again.
    let mut new_records = BTreeMap::new();
    // What the metrics count: records that say something new (a retry harvested again
    // from a Job not yet gone says nothing new), with their pods' pending time.
    let mut counted: Vec<(Record, Option<f64>)> = Vec::new();
    for action in &actions {
        if let Some((node, record)) = record_for(&plan, &states, &observed.outcomes, action, now) {
            let job = &plan.nodes[node].job_name;
            let known = manifest.records().get(job).is_some_and(|r| {
                (r.status, r.attempt_count) == (record.status, record.attempt_count)
            });
            if !known {
                let pending = observed.outcomes.get(&node).and_then(|h| h.pod_pending);
                counted.push((record.clone(), pending));
            }
            new_records.insert(job.clone(), record);
        }
    }
    let progressed = !new_records.is_empty();
    if !ctx.config.may_write() {
        return Ok(Requeue::await_change());
    }
    if progressed {
        manifest.write(&ctx.client, &run, new_records).await?;
        for (record, pending) in &counted {
            ctx.metrics.record(&id, record, *pending);
        }
    }
    if progressed || ctx.metrics.medians_unset(&id) {
        ctx.metrics.set_medians(&id, manifest.records().values());
    }

    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let inputs = JobInputs {
        run_name: &name,
        namespace: &ns,
        run_uid: &uid,
        spec: &run.spec,
        build_timeout: settings.build_timeout,
    };
    let creates = actions
        .iter()
        .any(|a| matches!(a, Action::CreateJob { .. }));
    let annotations = creates
        .then(|| PodAnnotations::compile(&run.spec).ok())
        .flatten();
    // Deletes first, so a Job is gone before one of the same name is created; each batch
    // concurrently, as a run may start or finish a hundred Jobs in one pass.
    let deletes: Vec<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::DeleteJob { node } => Some(plan.nodes[*node].job_name.clone()),
            _ => None,
        })
        .chain(observed.stale_jobs.iter().cloned())
        .collect();
    all_ok(deletes.into_iter().map(|name| {
        let jobs = jobs_api.clone();
        async move { delete_job(&jobs, &name).await }
    }))
    .await?;
    let mut creates = Vec::new();
    let run_started = status.started_at.unwrap_or(now);
    for action in &actions {
        if let Action::CreateJob { node, attempt } = action {
            let ready = ready_since(&plan, manifest.records(), *node, run_started);
            let node = &plan.nodes[*node];
            // The plan rendered every node and attempt, so this does not fail.
            let pod_annotations = annotations
                .as_ref()
                .and_then(|a| a.render(node, *attempt).ok())
                .unwrap_or_default();
            let mut job = build_job(&inputs, node, *attempt, &pod_annotations)
                .expect("every planned phase is in the spec");
            if let Some(identity) = &ctx.config.identity {
                job.metadata
                    .annotations
                    .get_or_insert_default()
                    .insert(ANNOTATION_DISPATCHED_BY.into(), identity.clone());
            }
            creates.push((job, node.phase, (now - ready).to_std().unwrap_or_default()));
        }
    }
    if !ctx.config.may_write() {
        return Ok(Requeue::await_change());
    }
    all_ok(creates.into_iter().map(|(job, phase, waited)| {
        let jobs = jobs_api.clone();
        let metrics = ctx.metrics.clone();
        async move {
            match jobs.create(&PostParams::default(), &job).await {
                Ok(_) => {
                    metrics.job_created(phase.as_str(), waited);
                    Ok(())
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(Error::from(e)),
            }
        }
    }))
    .await?;
    for action in &actions {
        schedule::apply(&mut states, action);
    }

    let counts = status::counts(&plan, &states);
    let builder_retrying = matches!(states[0], NodeState::Waiting { attempts, .. } if attempts > 0);
    status::fill(&mut status, &counts, builder_retrying);
    // From the manifest, so they survive restarts and deferred writes alike.
    let records = manifest.records();
    status.failures = status::failures(&plan, |name| records.get(name));
    status.retries_exhausted =
        status::retries_exhausted(&plan, |name| records.get(name), run.spec.retry.attempts);
    status.manifests = manifest.names(&name);
    let all_records = || records.values();
    status.last_progress_at = all_records()
        .filter(|r| r.status != crate::manifest::RecordStatus::Retrying)
        .map(|r| r.time)
        .max();
    let started = status.started_at.unwrap_or(now);
    // Both drift with the clock alone; small drifts keep the written value, so an idle
    // run is not rewritten every reconcile.
    let rate = status::images_per_hour(all_records(), started, now, THROUGHPUT_WINDOW);
    status.images_per_hour = match (old.images_per_hour, rate) {
        (Some(o), Some(n)) if (n - o).abs() <= 0.05 * o => Some(o),
        _ => rate,
    };
    let eta = status::estimated_completion(&plan, &states, all_records(), policy.max_workers, now);
    status.estimated_completion = match (old.estimated_completion, eta) {
        // A finished run has nothing left to estimate.
        _ if status.phase != Some(RunPhase::Building) => None,
        (Some(o), Some(n)) if (n - o).abs() < chrono::Duration::seconds(60) => Some(o),
        _ => eta,
    };
    let pending_limit =
        chrono::Duration::from_std(settings.pending_timeout).unwrap_or(chrono::Duration::MAX);
    let stalled = observed
        .unschedulable
        .iter()
        .find(|u| now - u.since >= pending_limit)
        .map(|u| u.message.clone())
        .or_else(|| status::unschedulable_failures(all_records()));
    let phase = status.phase.unwrap_or(RunPhase::Building);
    let final_phase = phase != RunPhase::Building;
    let progress = summary(&counts);
    let (why, progressing) = match (final_phase, run.spec.suspend) {
        (true, _) => (format!("{phase:?}"), false),
        (false, true) => ("Suspended".to_string(), false),
        (false, false) => ("Building".to_string(), true),
    };
    let conditions: [(&str, bool, &str, &str); 4] = [
        ("Ready", phase == RunPhase::Succeeded, &why, &progress),
        ("Progressing", progressing, &why, &progress),
        match &registry_error {
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
        let generation = run.metadata.generation;
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
    if final_phase {
        status.completed_at.get_or_insert(now);
    }
    let deferred = write_status_coalesced(&ctx, &run, &old, &status).await?;
    if let Some(cache) = ctx.runs.lock().unwrap().get_mut(&key) {
        cache.manifest = Some(manifest);
    }

    if final_phase {
        ctx.fleet.lock().unwrap().0.remove(&key);
        return Ok(Requeue::await_change());
    }
    // Wake for the next retry, or to watch pending pods and the run deadline.
    let mut wait = Duration::from_secs(30);
    for at in schedule::next_wakeup(&states)
        .into_iter()
        .chain(policy.deadline)
    {
        wait = wait.min((at - now).to_std().unwrap_or_default() + Duration::from_millis(100));
    }
    if !observed.unschedulable.is_empty() {
        wait = wait.min(Duration::from_secs(5));
    }
    if let Some(deferred) = deferred {
        // A change waits for its write.
        wait = wait.min(deferred);
    }
    let checking = registry
        .iter()
        .zip(&states)
        .any(|(r, s)| *r == Registry::Unknown && !s.is_terminal());
    if checking && registry_error.is_none() {
        // Registry checks run in the background; their answers unblock dispatch.
        wait = wait.min(Duration::from_secs(1));
    }
    Ok(Requeue::requeue(wait))
}

fn summary(counts: &[crate::api::PhaseCounts; 4]) -> String {
    let [b, base, asm, post] = counts;
    let done = |c: &crate::api::PhaseCounts| c.succeeded + c.skipped;
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

fn fail_run(
    status: &mut ImageBuildRunStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    status.phase = Some(RunPhase::Failed);
    status.completed_at.get_or_insert(now);
    status::set_condition(
        &mut status.conditions,
        "Ready",
        false,
        reason,
        message,
        generation,
        now,
    );
    status::set_condition(
        &mut status.conditions,
        "Progressing",
        false,
        reason,
        message,
        generation,
        now,
    );
}

/// Like [`write_status`], but a change of counts or messages alone is written at most once
/// per [`STATUS_INTERVAL`]; returns how long a deferred write waits.
async fn write_status_coalesced(
    ctx: &Ctx,
    run: &ImageBuildRun,
    old: &ImageBuildRunStatus,
    new: &ImageBuildRunStatus,
) -> Result<Option<Duration>, Error> {
    if old == new {
        return Ok(None);
    }
    let key = format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any());
    if !status::significant(old, new) {
        let last = ctx.status_written.lock().unwrap().get(&key).copied();
        if let Some(wait) = last.and_then(|t| STATUS_INTERVAL.checked_sub(t.elapsed())) {
            return Ok(Some(wait));
        }
    }
    write_status(ctx, run, old, new).await?;
    Ok(None)
}

/// Patches the status if it changed, then publishes the Events of the change (an Event
/// that fails to publish is logged, not retried: the status already says it).
async fn write_status(
    ctx: &Ctx,
    run: &ImageBuildRun,
    old: &ImageBuildRunStatus,
    new: &ImageBuildRunStatus,
) -> Result<(), Error> {
    if old == new || !ctx.config.may_write() {
        return Ok(());
    }
    let runs: Api<ImageBuildRun> =
        Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let patch = json!({"status": status::patch_body(new)});
    {
        // The gauges change with the status, never seen apart by a scrape.
        let _publishing = ctx.metrics.publishing().await;
        runs.patch_status(
            &run.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        let (ns, name, uid) = (
            run.namespace().unwrap_or_default(),
            run.name_any(),
            run.uid().unwrap_or_default(),
        );
        let id = RunId {
            namespace: &ns,
            name: &name,
            uid: &uid,
        };
        ctx.metrics.set_status(&id, new);
    }
    let key = format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any());
    ctx.status_written
        .lock()
        .unwrap()
        .insert(key, std::time::Instant::now());
    let reference = run.object_ref(&());
    for event in events::transitions(old, new) {
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(run = %run.name_any(), reason = %event.reason, error = %e, "publishing an Event failed");
        }
    }
    Ok(())
}

enum PlanState {
    Ready(Arc<Plan>),
    Resolving,
    Failed(String),
}

/// The run's plan, or the state of its resolution (started here when needed).
fn plan_of(run: &Arc<ImageBuildRun>, ctx: &Arc<Ctx>) -> PlanState {
    let key = format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any());
    let uid = run.uid().unwrap_or_default();
    let mut runs = ctx.runs.lock().unwrap();
    let cache = runs.entry(key).or_default();
    if cache.uid != uid {
        *cache = RunCache {
            uid: uid.clone(),
            ..Default::default()
        };
    }
    match &cache.plan {
        PlanSlot::Ready(plan) => return PlanState::Ready(plan.clone()),
        PlanSlot::Failed(message) => return PlanState::Failed(message.clone()),
        PlanSlot::Resolving => return PlanState::Resolving,
        PlanSlot::None => {}
    }
    cache.plan = PlanSlot::Resolving;
    let (run, ctx) = (run.clone(), ctx.clone());
    tokio::spawn(async move {
        let ns = run.namespace().unwrap_or_default();
        let name = run.name_any();
        let result = async {
            let source = &run.spec.instances;
            let raw = crate::instances::fetch(source, &ns, Some(&ctx.client))
                .await
                .map_err(|e| e.to_string())?;
            // Sorted, de-duplicated, `select` and `limit` applied: the plan command's view.
            let instances = crate::instances::select(raw, source).map_err(|e| e.to_string())?;
            plan::build(&name, &run.spec, &instances).map_err(|e| e.to_string())
        }
        .await;
        {
            let mut runs = ctx.runs.lock().unwrap();
            if let Some(cache) = runs
                .get_mut(&format!("{ns}/{name}"))
                .filter(|c| c.uid == uid)
            {
                cache.plan = match result {
                    Ok(plan) => {
                        // A forced rebuild builds every image whatever the registry holds:
                        // nothing to ask it.
                        let known = if run.spec.force_rebuild {
                            Registry::Missing
                        } else {
                            Registry::Unknown
                        };
                        cache.registry = vec![known; plan.nodes.len()];
                        PlanSlot::Ready(Arc::new(plan))
                    }
                    Err(message) => PlanSlot::Failed(message),
                };
            }
        }
    });
    PlanState::Resolving
}

/// What the registry said so far; starts the checks of nodes not yet final.
async fn registry_view(
    run: &Arc<ImageBuildRun>,
    ctx: &Arc<Ctx>,
    plan: &Arc<Plan>,
    states: &[NodeState],
) -> (Vec<Registry>, Option<String>) {
    let key = format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any());
    let start = {
        let mut runs = ctx.runs.lock().unwrap();
        let cache = runs
            .get_mut(&key)
            .expect("the plan put the run in the cache");
        let due = cache
            .recheck_at
            .is_none_or(|t| std::time::Instant::now() >= t);
        let todo: Vec<usize> = (0..plan.nodes.len())
            .filter(|&i| !states[i].is_terminal() && cache.registry[i] == Registry::Unknown)
            .collect();
        if cache.checks_started || !due || todo.is_empty() {
            None
        } else {
            cache.checks_started = true;
            cache.recheck_at = None;
            Some(todo)
        }
    };
    if let Some(todo) = start {
        let checker = match checker_for(run, ctx).await {
            Ok(c) => c,
            Err(message) => {
                let mut runs = ctx.runs.lock().unwrap();
                let cache = runs.get_mut(&key).expect("cached");
                cache.registry_error = Some(message);
                cache.checks_started = false;
                cache.recheck_at = Some(std::time::Instant::now() + RECHECK);
                return (cache.registry.clone(), cache.registry_error.clone());
            }
        };
        let (ctx, plan, key) = (ctx.clone(), plan.clone(), key.clone());
        tokio::spawn(async move {
            let checks = todo.into_iter().map(|i| {
                let checker = checker.clone();
                let image = plan.nodes[i].image.clone();
                async move { (i, checker.check(&image).await) }
            });
            let mut results = futures::stream::iter(checks).buffer_unordered(64);
            while let Some((i, result)) = results.next().await {
                {
                    let mut runs = ctx.runs.lock().unwrap();
                    let Some(cache) = runs.get_mut(&key) else {
                        return;
                    };
                    match result {
                        Ok(Presence::Exists(_)) => cache.registry[i] = Registry::Exists,
                        Ok(Presence::Missing) => cache.registry[i] = Registry::Missing,
                        Err(e) => {
                            tracing::warn!(image = %plan.nodes[i].image, error = %e, "registry check failed");
                            cache.registry_error = Some(e.to_string());
                        }
                    }
                }
            }
            {
                let mut runs = ctx.runs.lock().unwrap();
                if let Some(cache) = runs.get_mut(&key) {
                    cache.checks_started = false;
                    if cache.registry.contains(&Registry::Unknown) {
                        cache.recheck_at = Some(std::time::Instant::now() + RECHECK);
                    } else {
                        cache.registry_error = None;
                    }
                }
            }
        });
    }
    let runs = ctx.runs.lock().unwrap();
    let cache = runs.get(&key).expect("cached");
    (cache.registry.clone(), cache.registry_error.clone())
}

/// A registry checker with the run's push credentials.
async fn checker_for(run: &ImageBuildRun, ctx: &Ctx) -> Result<RegistryChecker, String> {
    let ns = run.namespace().unwrap_or_default();
    let config = match &run.spec.registry.push_secret_ref {
        None => DockerConfig::default(),
        Some(secret) => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            let s = secrets
                .get(&secret.name)
                .await
                .map_err(|e| format!("reading push Secret {}: {e}", secret.name))?;
            let data = s
                .data
                .as_ref()
                .and_then(|d| d.get(".dockerconfigjson"))
                .ok_or_else(|| {
                    format!("push Secret {} has no .dockerconfigjson key", secret.name)
                })?;
            DockerConfig::parse(&data.0).map_err(|e| format!("push Secret {}: {e}", secret.name))?
        }
    };
    let metrics = ctx.metrics.clone();
    let (name, uid) = (run.name_any(), run.uid().unwrap_or_default());
    Ok(RegistryChecker::new(
        config,
        run.spec.registry.insecure,
        ctx.config.registry_concurrency,
    )
    .with_observer(Arc::new(move |code| {
        let id = RunId {
            namespace: &ns,
            name: &name,
            uid: &uid,
        };
        metrics.registry_request(&id, code)
    })))
}

fn policy(run: &ImageBuildRun, settings: &Settings, status: &ImageBuildRunStatus) -> Policy {
    let deadline = status.started_at.map(|t| {
        t + chrono::Duration::from_std(settings.run_timeout).unwrap_or(chrono::Duration::MAX)
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

/// The run's Jobs (and their pods) from the stores, by name.
fn live_jobs(ctx: &Ctx, ns: &str, uid: &str) -> BTreeMap<String, LiveJob> {
    let mut pods: HashMap<String, Pod> = HashMap::new();
    for store in &ctx.pods {
        for pod in store.state() {
            if pod.namespace().as_deref() != Some(ns)
                || pod.labels().get(LABEL_RUN_UID).map(String::as_str) != Some(uid)
            {
                continue;
            }
            if let Some(job) = pod.labels().get("batch.kubernetes.io/job-name") {
                pods.insert(job.clone(), (*pod).clone());
            }
        }
    }
    let mut jobs = BTreeMap::new();
    for store in &ctx.jobs {
        for job in store.state() {
            if job.namespace().as_deref() != Some(ns)
                || job.labels().get(LABEL_RUN_UID).map(String::as_str) != Some(uid)
            {
                continue;
            }
            if job.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let name = job.name_any();
            let pod = pods.remove(&name);
            jobs.insert(
                name,
                LiveJob {
                    job: (*job).clone(),
                    pod,
                },
            );
        }
    }
    jobs
}

/// API requests a reconcile has in flight at once.
const API_CONCURRENCY: usize = 16;

/// Runs `requests`, [`API_CONCURRENCY`] at a time, until all are done; the first error.
async fn all_ok<F>(requests: impl Iterator<Item = F>) -> Result<(), Error>
where
    F: std::future::Future<Output = Result<(), Error>>,
{
    let mut results = futures::stream::iter(requests).buffer_unordered(API_CONCURRENCY);
    let mut first = Ok(());
    while let Some(result) = results.next().await {
        if first.is_ok() {
            first = result;
        }
    }
    first
}

async fn delete_job(jobs: &Api<Job>, name: &str) -> Result<(), Error> {
    match jobs.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The record an action writes, if it writes one.
fn record_for(
    plan: &Plan,
    states: &[NodeState],
    outcomes: &BTreeMap<usize, crate::manifest::Harvest>,
    action: &Action,
    now: DateTime<Utc>,
) -> Option<(usize, Record)> {
    let attempt_of = |node: usize| match &states[node] {
        NodeState::Finished { attempt, .. } | NodeState::Running { attempt } => *attempt,
        NodeState::Waiting { attempts, .. } => *attempts,
        _ => 0,
    };
    let with_job = |node: usize, record: Record| match outcomes.get(&node) {
        Some(harvest) => record.with_job(harvest),
        None => record,
    };
    let (node, record) = match action {
        Action::MarkSucceeded { node } => (
            *node,
            Record::built(&plan.nodes[*node], attempt_of(*node), now),
        ),
        Action::MarkFailed { node, failure } => (
            *node,
            Record::failed(&plan.nodes[*node], failure, attempt_of(*node), None, now),
        ),
        Action::RetryAt { node, at, failure } => (
            *node,
            Record::failed(
                &plan.nodes[*node],
                failure,
                attempt_of(*node),
                Some(*at),
                now,
            ),
        ),
        Action::MarkSkipped { node, reason } => {
            (*node, Record::skipped(&plan.nodes[*node], *reason, now))
        }
        Action::CreateJob { .. } | Action::DeleteJob { .. } => return None,
    };
    Some((node, with_job(node, record)))
}

/// A failed reconcile is logged, counted and retried after 5 s.
pub fn error_policy(run: Arc<ImageBuildRun>, err: &Error, ctx: Arc<Ctx>) -> Requeue {
    tracing::warn!(run = %run.name_any(), error = %err, kind = err.kind(), "reconcile failed");
    ctx.metrics.reconcile_failed(err.kind());
    Requeue::requeue(Duration::from_secs(5))
}
