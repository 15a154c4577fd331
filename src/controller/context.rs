//! What every reconcile shares: the API client, the stores of the operator's Jobs and
//! pods, the operator-wide settings, the metrics, the Event recorder, the runs' in-memory
//! state and the worker ledger; and the reconcile's error type.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;

use super::readable::Watched;
use super::runstore::RunStore;

use super::ledger::Ledger;
use super::state::RunTable;
use crate::manifest::ManifestError;
use crate::metrics::Metrics;
use crate::names::MANAGER;

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The manifest could not be read or written.
    #[error("manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// The API server refused a build Job as invalid: the spec makes Jobs it never takes.
    #[error("{0}")]
    JobRefused(String),
}

impl Error {
    /// A short, stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Manifest(_) => "manifest",
            Self::JobRefused(_) => "job_refused",
        }
    }
}

/// Operator-wide settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Registry requests in flight per run.
    pub registry_concurrency: usize,
    /// How long registry checks may go without any answer before the run says the
    /// registry does not answer (`Degraded`) and checks again later.
    pub registry_stall: Duration,
    /// Build Jobs in flight across all runs (`--max-total-workers`), shared fairly.
    pub max_total_workers: Option<u32>,
    /// Pods of failed builds kept per run for their logs (`--kept-failed-pods`).
    pub kept_failed_pods: u32,
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

/// Shared by every reconcile.
pub struct Ctx {
    /// The API client.
    pub client: Client,
    /// Jobs the operator manages, by run.
    pub jobs: Vec<RunStore<Job>>,
    /// Their pods that ended, by run.
    pub pods: Vec<RunStore<Pod>>,
    /// Their pods waiting for a node, as last listed.
    pub(super) unplaced: Vec<super::unplaced::Unplaced>,
    /// Settings.
    pub config: Config,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    pub(super) recorder: Recorder,
    pub(super) runs: RunTable,
    pub(super) unreadable: super::readable::Unreadable,
    /// Wakes a run from background work.
    pub(super) wakes: Wakes,
    ledger: Mutex<Ledger>,
}

/// Wakes a run's reconcile from background work (a round of registry checks that
/// ended), through the controller of the run's namespace, rather than leave the answers
/// to the next timed look.
#[derive(Clone, Default)]
pub struct Wakes(Vec<(Option<String>, UnboundedSender<ObjectRef<Watched>>)>);

impl Wakes {
    /// Over the controllers' channels, by the namespace each watches (`None`: all).
    pub fn new(channels: Vec<(Option<String>, UnboundedSender<ObjectRef<Watched>>)>) -> Wakes {
        Wakes(channels)
    }

    /// Wakes run `name` in `ns` (nothing if no controller watches it, or it stopped).
    pub fn wake(&self, ns: &str, name: &str) {
        if let Some((_, tx)) = self
            .0
            .iter()
            .find(|(scope, _)| scope.as_deref().is_none_or(|s| s == ns))
        {
            let _ = tx.unbounded_send(ObjectRef::new(name).within(ns));
        }
    }

    /// What wakes run `name` in `ns`, for a background task to call when it is done.
    pub fn waker(&self, ns: &str, name: &str) -> impl Fn() + Send + Sync + 'static {
        let (wakes, ns, name) = (self.clone(), ns.to_string(), name.to_string());
        move || wakes.wake(&ns, &name)
    }
}

impl Ctx {
    /// A context over the given stores.
    pub fn new(
        client: Client,
        jobs: Vec<RunStore<Job>>,
        pods: Vec<RunStore<Pod>>,
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
            unplaced: Vec::new(),
            config,
            metrics,
            runs: RunTable::default(),
            unreadable: Default::default(),
            wakes: Wakes::default(),
            ledger: Mutex::new(Ledger::default()),
        }
    }

    /// The worker ledger. A panic elsewhere while it was held leaves it as it was; the
    /// other runs go on with it.
    pub(super) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets every run `live` (given `namespace/name` and uid) rejects: its state, its
    /// place in the ledger and its metrics. Runs deleted without the operator seeing a
    /// deletion end here.
    pub fn retain(&self, live: impl Fn(&str, &str) -> bool) {
        let gone = self.runs.retain(&live);
        let mut ledger = self.ledger();
        for key in &gone {
            ledger.remove(key);
        }
        drop(ledger);
        self.metrics.retain(live);
    }

    /// Forgets run `key` (`namespace/name`) at once: it is being deleted.
    pub(super) fn forget(&self, key: &str) {
        self.runs.remove(key);
        self.ledger().remove(key);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    /// The other end of a test context's API client.
    pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    /// A context over `jobs` and `pods` with default settings; its API requests go to the
    /// handle.
    pub fn ctx(jobs: Vec<RunStore<Job>>, pods: Vec<RunStore<Pod>>) -> (Ctx, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let config = Config {
            registry_concurrency: 1,
            registry_stall: Duration::from_secs(30),
            kept_failed_pods: 0,
            max_total_workers: None,
            fence: crate::leader::Fence::new(false),
            identity: None,
        };
        let client = Client::new(service, "ns");
        let ctx = Ctx::new(client, jobs, pods, config, Arc::new(Metrics::new()));
        (ctx, handle)
    }
}
