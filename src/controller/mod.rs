//! The controller: reconciles ImageBuildRuns into build Jobs. `reconcile` is the pipeline
//! (observe, resolve, check presence, decide, apply, publish); each step is a module of
//! its own, most of them pure (`observe`, `resolve`, `presence`, `ledger`, `actions`,
//! `status`, `events`, the derivation in `publish`); `state` holds what the operator
//! keeps of each run between reconciles; this module runs the watches and the loop.

mod actions;
mod apply;
pub mod context;
pub mod events;
mod ledger;
pub mod observe;
mod preflight;
mod presence;
mod publish;
mod readable;
pub mod reconcile;
mod resolve;
mod retry;
pub mod runstore;
mod sends;
mod state;
pub mod status;
mod triggers;
mod trim;
mod unplaced;
mod working;
mod writing;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, predicates, watcher};
use kube::{Api, Client};

use crate::metrics::Metrics;
use crate::metrics::server::Health;
use crate::names::MANAGER;
use readable::Watched;
use runstore::RunStore;
use triggers::JobTriggers;
use trim::Lean;

/// How often caches and metrics of deleted runs are dropped.
const PRUNE_INTERVAL: Duration = Duration::from_secs(5);

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Namespaces to watch; empty watches all.
    pub namespaces: Vec<String>,
    /// Runs reconciled at once.
    pub concurrency: u16,
    /// Registry requests in flight per run.
    pub registry_concurrency: usize,
    /// How long a run's registry checks may go without an answer before it says so.
    pub registry_stall: Duration,
    /// Build Jobs in flight across all runs, shared fairly between them.
    pub max_total_workers: Option<u32>,
    /// Pods of failed builds kept per run for their logs.
    pub kept_failed_pods: u32,
    /// With leader election: writes only while the lease is held.
    pub fence: Arc<crate::leader::Fence>,
    /// Who dispatches (the leader's identity), noted on every Job it creates.
    pub identity: Option<String>,
}

/// Watches only what the operator made.
fn managed() -> watcher::Config {
    watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"))
}

/// The pods the pod watch follows: those that ended. A pod's creation, placement and
/// start (three of its seven events) are progress no reconcile reads; the pods waiting
/// for a node are listed apart (`unplaced`).
const ENDED_PODS: &str = "status.phase!=Pending,status.phase!=Running";

/// Starts a watch of the `K` objects `config` selects in `ns` (or all namespaces), each
/// object read as its [`Lean`] form (only the kept fields); returns its store (kept by
/// run), and hands each event, once the store has it, to `then` (the store and `then`
/// share each object). Runs until the process ends, or until `then` returns false.
fn reflect<K, F, Fut>(
    client: &Client,
    ns: Option<&str>,
    config: watcher::Config,
    mut then: F,
) -> RunStore<K>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    Lean<K>: serde::de::DeserializeOwned,
    F: FnMut(watcher::Event<Arc<K>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let api: Api<Lean<K>> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (reader, mut writer) = runstore::store();
    let stream = watcher(api, config)
        .default_backoff()
        .map_ok(unwrap_lean)
        .inspect_ok(move |event| writer.apply(event));
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            // An error is retried by the backoff; the watch resumes.
            if let Ok(event) = event
                && !then(event).await
            {
                return;
            }
        }
    });
    reader
}

/// The watch's event with the kept object itself, shared.
fn unwrap_lean<K>(event: watcher::Event<Lean<K>>) -> watcher::Event<Arc<K>> {
    use watcher::Event;
    match event {
        Event::Apply(o) => Event::Apply(Arc::new(o.0)),
        Event::Delete(o) => Event::Delete(Arc::new(o.0)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(Arc::new(o.0)),
        Event::InitDone => Event::InitDone,
    }
}

/// Runs the controller until `shutdown` turns true (SIGTERM or Ctrl-C); returns after
/// in-flight reconciles end. `health` learns when the watches have synced.
pub async fn run(
    client: Client,
    options: Options,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let scopes: Vec<Option<String>> = if options.namespaces.is_empty() {
        vec![None]
    } else {
        options.namespaces.iter().cloned().map(Some).collect()
    };
    let mut job_stores = Vec::new();
    let mut pod_stores = Vec::new();
    let mut job_triggers = Vec::new();
    for scope in &scopes {
        // One watch of Jobs: the store the reconciles read, then the controller's trigger.
        // Unbounded, as the watch must never wait for the controller: the stores must be
        // ready before the controller starts, and a full channel would stop the first list
        // short of that. Once running, the controller drains the channel as events come
        // (it keeps one wake per run); before, it holds at most one event per ended Job
        // listed.
        let (tx, rx) = mpsc::unbounded();
        let mut triggers = JobTriggers::default();
        let wake = move |event| {
            let sent = triggers
                .wakes(event)
                .is_none_or(|job| tx.unbounded_send(Ok(Arc::unwrap_or_clone(job))).is_ok());
            std::future::ready(sent)
        };
        job_stores.push(reflect(&client, scope.as_deref(), managed(), wake));
        // The pods that ended, which wake nothing: their Jobs' ends do.
        let ended = managed().fields(ENDED_PODS);
        let pods = reflect(&client, scope.as_deref(), ended, |_| {
            std::future::ready(true)
        });
        pod_stores.push(pods);
        job_triggers.push(rx);
    }
    for store in &job_stores {
        let _ = store.wait_until_ready().await;
    }
    for store in &pod_stores {
        let _ = store.wait_until_ready().await;
    }
    let (wake_senders, wake_receivers): (Vec<_>, Vec<_>) = scopes
        .iter()
        .map(|scope| {
            let (tx, rx) = mpsc::unbounded();
            ((scope.clone(), tx), rx)
        })
        .unzip();
    let mut ctx = context::Ctx::new(
        client.clone(),
        job_stores,
        pod_stores,
        context::Config {
            registry_concurrency: options.registry_concurrency,
            registry_stall: options.registry_stall,
            max_total_workers: options.max_total_workers,
            kept_failed_pods: options.kept_failed_pods,
            fence: options.fence.clone(),
            identity: options.identity.clone(),
        },
        metrics.clone(),
    );
    ctx.wakes = context::Wakes::new(wake_senders);
    ctx.unplaced = scopes
        .iter()
        .map(|_| unplaced::Unplaced::default())
        .collect();
    for ((scope, unplaced), jobs) in scopes.iter().zip(&ctx.unplaced).zip(&ctx.jobs) {
        tokio::spawn(unplaced::list_every(
            client.clone(),
            scope.clone(),
            unplaced.clone(),
            jobs.clone(),
            ctx.wakes.clone(),
        ));
    }
    let ctx = Arc::new(ctx);
    let mut run_stores = Vec::new();
    let triggers = job_triggers.into_iter().zip(wake_receivers);
    let controllers = scopes
        .into_iter()
        .zip(triggers)
        .map(|(scope, (jobs, wakes))| {
            let runs: Api<Watched> = match &scope {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            // A run is reconciled when its spec changes (its generation), not when its status
            // does: the status is this operator's own write, and each write woke a reconcile.
            let (reader, writer) = reflector::store();
            let specs = watcher(runs, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .applied_objects()
                .predicate_filter(predicates::generation, Default::default());
            let controller = Controller::for_stream(specs, reader);
            run_stores.push(controller.store());
            controller
                .owns_stream::<Job>(jobs)
                .reconcile_on(wakes)
                .with_config(
                    kube::runtime::controller::Config::default().concurrency(options.concurrency),
                )
                .graceful_shutdown_on({
                    let mut shutdown = shutdown.clone();
                    async move {
                        let _ = shutdown.wait_for(|stop| *stop).await;
                    }
                })
                .run(guarded, error_policy, ctx.clone())
                .for_each(|result| async move {
                    match result {
                        Ok((run, _)) => tracing::debug!(run = %run, "reconciled"),
                        Err(err) => tracing::debug!(error = %err, "reconcile error"),
                    }
                })
        });
    let controllers: Vec<_> = controllers.collect();
    tokio::spawn(prune(ctx.clone(), run_stores, health));
    futures::future::join_all(controllers).await;
    tracing::info!("controller stopped");
}

/// [`reconcile::reconcile`] of a run that reads, timed and counted, with a panic caught:
/// a run that does not read is reported and skipped (`readable`); a panic becomes the
/// run's condition (`reconcile::panicked`), never the end of the process.
async fn guarded(
    watched: Arc<Watched>,
    ctx: Arc<context::Ctx>,
) -> Result<kube::runtime::controller::Action, context::Error> {
    let key = format!(
        "{}/{}",
        watched.metadata.namespace.as_deref().unwrap_or_default(),
        watched.metadata.name.as_deref().unwrap_or_default()
    );
    let run = match &watched.run {
        Ok(run) => run.clone(),
        Err(why) => {
            readable::report(&ctx, &watched, why).await;
            return Ok(kube::runtime::controller::Action::await_change());
        }
    };
    let unreadable = ctx.unreadable.note(&key, true);
    ctx.metrics.set_unreadable_runs(unreadable);
    match catch_panic(timed(run.clone(), ctx.clone())).await {
        Ok(result) => result,
        Err(message) => {
            tracing::error!(run = %key, panic = %message, "a reconcile panicked; the run fails with the panic as its condition");
            ctx.metrics.reconcile_failed("panic");
            reconcile::panicked(run, ctx, &message).await
        }
    }
}

/// Runs `future`; a panic in it is returned as its message.
async fn catch_panic<T>(future: impl std::future::Future<Output = T>) -> Result<T, String> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .map_err(|payload| {
            payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into())
        })
}

/// A failed reconcile is logged, counted and tried again.
fn error_policy(
    watched: Arc<Watched>,
    err: &context::Error,
    ctx: Arc<context::Ctx>,
) -> kube::runtime::controller::Action {
    match &watched.run {
        Ok(run) => reconcile::error_policy(run.clone(), err, ctx),
        Err(_) => kube::runtime::controller::Action::await_change(),
    }
}

/// [`reconcile::reconcile`], timed and counted.
async fn timed(
    run: Arc<crate::api::ImageBuildRun>,
    ctx: Arc<context::Ctx>,
) -> Result<kube::runtime::controller::Action, context::Error> {
    /// Counts a reconcile in flight until dropped, however the reconcile ends.
    struct InFlight(prometheus::IntGauge);
    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    let start = Instant::now();
    let gauge = ctx.metrics.reconciles_in_flight().clone();
    gauge.inc();
    let _in_flight = InFlight(gauge);
    let result = reconcile::reconcile(run, ctx.clone()).await;
    ctx.metrics.reconciled(start.elapsed());
    result
}

/// Once the run watches have synced, says so to `health`, then drops the caches and
/// metrics of runs that are gone every [`PRUNE_INTERVAL`] (a deletion without finalizers
/// reaches no reconcile).
async fn prune(ctx: Arc<context::Ctx>, stores: Vec<Store<Watched>>, health: Arc<Health>) {
    for store in &stores {
        // The controller waits on the same store, and the store wakes only one waiter:
        // look again every second rather than wait to be woken.
        loop {
            match tokio::time::timeout(Duration::from_secs(1), store.wait_until_ready()).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "the run watch ended before it synced");
                    return;
                }
                Err(_) => continue,
            }
        }
    }
    health.set_synced();
    tracing::info!("watches synced");
    // Said at once, not at the next readiness check.
    ctx.metrics.set_ready(health.ready());
    loop {
        let live: HashSet<(String, String)> = stores
            .iter()
            .flat_map(|s| s.state())
            .map(|run| {
                let ns = run.metadata.namespace.clone().unwrap_or_default();
                let name = run.metadata.name.clone().unwrap_or_default();
                (
                    format!("{ns}/{name}"),
                    run.metadata.uid.clone().unwrap_or_default(),
                )
            })
            .collect();
        ctx.retain(|key, uid| live.contains(&(key.to_string(), uid.to_string())));
        let keys: HashSet<&String> = live.iter().map(|(key, _)| key).collect();
        let unreadable = ctx.unreadable.retain(|key| keys.contains(&key.to_string()));
        ctx.metrics.set_unreadable_runs(unreadable);
        tokio::time::sleep(PRUNE_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_caught_with_its_message() {
        let limit: Option<u32> = std::hint::black_box(None);
        let caught = catch_panic(async move { limit.unwrap() }).await;
        let message = caught.unwrap_err();
        assert!(message.contains("None"), "{message}");
        let formatted = catch_panic(async { panic!("deadline {} overflows", 7) }).await;
        assert_eq!(formatted.unwrap_err(), "deadline 7 overflows");
        assert_eq!(catch_panic(async { 5 }).await, Ok(5));
    }
}
