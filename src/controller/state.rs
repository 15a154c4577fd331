//! What the operator keeps in memory about each run between reconciles: where its plan
//! stands, what the registry said, the manifest as last read or written, and the status
//! it last wrote. Rebuilt from the cluster after a restart.
//!
//! Each run's state has a lock of its own, held by its reconcile (kube-runtime never
//! reconciles one run twice at once), so runs never wait for each other; the table's lock
//! is held only to find an entry. Background work sends its results back through
//! channels kept in the state (see `resolve` and `presence`) rather than reaching into
//! the table, and a run the table no longer holds is simply started afresh.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::observe::{LiveJob, attempt_of};
use super::presence::Presence;
use super::resolve::Resolution;
use super::sends::{Doomed, Sends};
use crate::api::ImageBuildRunStatus;
use crate::manifest::Manifest;

/// One run's state.
#[derive(Default)]
pub struct RunState {
    /// The run's uid: a run recreated under the same name starts afresh.
    pub uid: String,
    /// Where its plan stands.
    pub resolution: Resolution,
    /// What the registry said of its images (made with the plan).
    pub presence: Option<Presence>,
    /// The manifest as last read or written; taken out while a reconcile works on it,
    /// and dropped (so read again) when a reconcile fails.
    pub manifest: Option<Manifest>,
    /// The status this process last wrote, and when: the base for the next write's
    /// Events and for coalescing writes (the watch may not have delivered it yet).
    pub written: Option<(ImageBuildRunStatus, Instant)>,
    /// The status write in flight, if one is (`publish::send`).
    pub status_send: Option<super::publish::StatusSend>,
    /// The generation whose spec was found valid, and the settings read from it.
    pub validated: Option<(i64, crate::validate::Settings)>,
    /// The generation whose Jobs' making was compiled (pod annotations, Job templates),
    /// and what came of it.
    pub compiled: Option<(Option<i64>, super::actions::Compiled)>,
    /// The generation whose Jobs the API server accepted in a dry run (`preflight`).
    pub preflight: Option<Option<i64>>,
    /// The retry request whose records this process wrote, and what it did: a status
    /// write that failed after them says so again, not "0 reopened".
    pub retry: Option<crate::api::RetryStatus>,
    /// The Jobs this process created (or is creating) that its store may not show yet.
    pub dispatched: Dispatched,
    /// The creates and deletes in flight, and the failures of those that ended.
    pub sends: Sends,
    /// The Jobs this process deleted that its store may still show.
    pub deleted: Deleted,
    /// When this process last wrote (began writing) the run's records.
    pub manifest_written: Option<Instant>,
    /// The write of the run's records in flight, if one is.
    pub writing: Option<super::writing::Writing>,
    /// Its node states as the last reconcile left them.
    pub working: super::working::Working,
    /// What the status reads of the records, and the manifest version it was read from.
    pub facts: Option<(u64, crate::controller::status::RecordFacts)>,
}

/// How long a Job created is taken as running without the store showing it. Past that
/// (it was deleted before the watch saw it, or the watch is down), its node is read from
/// the store and the records again, and a create of a Job that exists is answered 409.
const UNSEEN_FOR_AT_MOST: Duration = Duration::from_secs(60);

/// The Jobs this process created or is creating, by name: the attempt and when it was
/// dispatched, until the store shows that attempt's Job (see [`super::observe::observe`]).
#[derive(Default)]
pub struct Dispatched(BTreeMap<String, (u32, Instant)>);

impl Dispatched {
    /// Job `name` was created (or found made) for `attempt`.
    pub fn note(&mut self, name: String, attempt: u32, now: Instant) {
        self.0.insert(name, (attempt, now));
    }

    /// Whether Job `name` is noted (dispatched, not yet shown by the store).
    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// Job `name` was deleted.
    pub fn forget(&mut self, name: &str) {
        self.0.remove(name);
    }

    /// Job `name`'s create for `attempt` failed (a later attempt noted since stays).
    pub fn forget_attempt(&mut self, name: &str, attempt: u32) {
        if self.0.get(name).is_some_and(|(noted, _)| *noted == attempt) {
            self.0.remove(name);
        }
    }

    /// Drops the Jobs the store shows (at their attempt or a later one) and those unseen
    /// for [`UNSEEN_FOR_AT_MOST`]; the attempts of the others, by name.
    pub fn unseen(
        &mut self,
        live: &BTreeMap<String, LiveJob>,
        now: Instant,
    ) -> BTreeMap<String, u32> {
        self.0.retain(|name, (attempt, at)| {
            now.saturating_duration_since(*at) < UNSEEN_FOR_AT_MOST
                && live.get(name).is_none_or(|l| attempt_of(&l.job) < *attempt)
        });
        self.0
            .iter()
            .map(|(name, (attempt, _))| (name.clone(), *attempt))
            .collect()
    }
}

/// How long a Job deleted is not deleted again while the store still shows it.
const DELETED_FOR_AT_MOST: Duration = Duration::from_secs(30);

/// The Jobs this process deleted, by name: the uid the store showed and when, while the
/// store still shows that Job. A store lags its watch (by seconds when the API server is
/// busy); without this, every reconcile in between would delete the same Jobs again, and
/// the requests would load the API server further. Past [`DELETED_FOR_AT_MOST`] a Job
/// still shown is deleted again.
#[derive(Default)]
pub struct Deleted(BTreeMap<String, (String, Instant)>);

impl Deleted {
    /// Jobs `names` were deleted: each as the store shows it now, if it does.
    pub fn note(&mut self, names: &[String], live: &BTreeMap<String, LiveJob>, now: Instant) {
        for name in names {
            if let Some(uid) = live.get(name).and_then(|l| l.job.metadata.uid.clone()) {
                self.0.insert(name.clone(), (uid, now));
            }
        }
    }

    /// Job `name`'s delete failed: it is deleted again when asked.
    pub fn forget(&mut self, name: &str) {
        self.0.remove(name);
    }

    /// Drops the Jobs the store no longer shows (or shows as another object of the same
    /// name) and those deleted more than [`DELETED_FOR_AT_MOST`] ago; of `names`, those
    /// left to delete.
    pub fn left_to_delete(
        &mut self,
        names: &[String],
        live: &BTreeMap<String, LiveJob>,
        now: Instant,
    ) -> Vec<String> {
        self.0.retain(|name, (uid, at)| {
            now.saturating_duration_since(*at) < DELETED_FOR_AT_MOST
                && live
                    .get(name)
                    .is_some_and(|l| l.job.metadata.uid.as_ref() == Some(uid))
        });
        names
            .iter()
            .filter(|name| !self.0.contains_key(*name))
            .cloned()
            .collect()
    }
}

impl RunState {
    /// Deletes `deletes` (but those this process deleted already that the store still
    /// shows, see [`Deleted`]) and then creates `jobs`, in the background (see
    /// [`Sends::start`]); first waits for the requests in flight if one of `deletes` may
    /// still be being created, or one of `jobs` deleted.
    pub async fn send(
        &mut self,
        api: &kube::Api<k8s_openapi::api::batch::v1::Job>,
        deletes: &[String],
        jobs: Vec<super::actions::NewJob>,
        live: &BTreeMap<String, LiveJob>,
        metrics: &Arc<crate::metrics::Metrics>,
        wake: impl FnOnce() + Send + 'static,
    ) {
        if deletes.iter().any(|name| self.dispatched.has(name))
            || jobs.iter().any(|new| self.sends.deleting(&new.name))
        {
            self.sends.settle().await;
        }
        for name in deletes {
            self.dispatched.forget(name);
        }
        let now = Instant::now();
        let deletes = self.deleted.left_to_delete(deletes, live, now);
        self.deleted.note(&deletes, live, now);
        let deletes: Vec<Doomed> = deletes
            .into_iter()
            .map(|name| {
                let uid = live.get(&name).and_then(|l| l.job.metadata.uid.clone());
                (name, uid)
            })
            .collect();
        self.sends
            .start(api, deletes, jobs, metrics, &mut self.dispatched, wake);
    }

    /// The failures of the requests since the last call (see [`Sends::collect`]).
    pub fn failed_sends(&mut self) -> Result<(), super::context::Error> {
        self.sends.collect(&mut self.dispatched, &mut self.deleted)
    }

    /// Resets the state if it is not of the run with `uid`.
    pub fn for_uid(&mut self, uid: &str) {
        if self.uid != uid {
            *self = RunState {
                uid: uid.to_string(),
                ..Default::default()
            };
        }
    }
}

/// Every run's state, by `namespace/name`.
#[derive(Default)]
pub struct RunTable(Mutex<HashMap<String, Arc<tokio::sync::Mutex<RunState>>>>);

impl RunTable {
    /// A panic elsewhere while the table was held leaves it as it was; the other runs go
    /// on with it.
    fn table(&self) -> MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<RunState>>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state of run `key` (a fresh one for a run not seen before). Its holder
    /// compares the uid: a run recreated under the same name starts afresh (see
    /// [`RunState::for_uid`]).
    pub fn get(&self, key: &str) -> Arc<tokio::sync::Mutex<RunState>> {
        self.table().entry(key.to_string()).or_default().clone()
    }

    /// Forgets run `key`.
    pub fn remove(&self, key: &str) {
        self.table().remove(key);
    }

    /// Forgets every run `live` (given `namespace/name` and uid) rejects; their keys.
    /// A run whose reconcile holds its state now is kept until the next time.
    pub fn retain(&self, live: impl Fn(&str, &str) -> bool) -> Vec<String> {
        let mut gone = Vec::new();
        self.table().retain(|key, state| {
            let keep = match state.try_lock() {
                Ok(s) => s.uid.is_empty() || live(key, &s.uid),
                Err(_) => true,
            };
            if !keep {
                gone.push(key.clone());
            }
            keep
        });
        gone
    }

    /// Runs held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Whether no run is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.table().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_run_removed_while_its_reconcile_works_is_not_lost_to_it() {
        let table = RunTable::default();
        let state = table.get("ns/r");
        let mut held = state.lock().await;
        held.for_uid("u1");
        // The prune finds it busy and keeps it; a deletion removes it outright, and the
        // reconcile goes on with the state it holds.
        assert!(table.retain(|_, _| false).is_empty());
        assert_eq!(table.len(), 1);
        table.remove("ns/r");
        assert!(table.is_empty());
        held.written = None;
        drop(held);
        // The next reconcile starts afresh.
        assert_eq!(table.get("ns/r").lock().await.uid, "");
    }

    #[tokio::test]
    async fn a_recreated_run_starts_afresh_and_gone_runs_are_forgotten() {
        let table = RunTable::default();
        {
            let state = table.get("ns/r");
            let mut s = state.lock().await;
            s.for_uid("u1");
            s.written = Some((Default::default(), Instant::now()));
        }
        {
            let state = table.get("ns/r");
            let mut s = state.lock().await;
            s.for_uid("u1");
            assert!(s.written.is_some(), "the same run keeps its state");
            s.for_uid("u2");
            assert!(s.written.is_none(), "a recreated run starts afresh");
        }
        table.get("ns/other").lock().await.for_uid("u3");
        let gone = table.retain(|key, _| key == "ns/other");
        assert_eq!(gone, vec!["ns/r".to_string()]);
        assert_eq!(table.len(), 1);
    }

    #[tokio::test]
    async fn a_job_is_neither_deleted_while_being_created_nor_created_while_being_deleted() {
        use super::super::apply::tests::{api, respond};
        use super::super::sends::tests::new_job;
        let (jobs, mut handle) = api();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let live = BTreeMap::new();
        let mut state = RunState::default();
        state
            .send(&jobs, &[], vec![new_job("a", 1)], &live, &metrics, || {})
            .await;
        let (_, create_a) = handle.next_request().await.unwrap();
        // Deleting "a" (cancelled) waits for its create's answer.
        let (a, c) = (["a".to_string()], ["c".to_string()]);
        let mut delete_a = Box::pin(state.send(&jobs, &a, vec![], &live, &metrics, || {}));
        assert!(futures::poll!(&mut delete_a).is_pending());
        respond(create_a, "a", 201);
        delete_a.await;
        let (request, delete) = handle.next_request().await.unwrap();
        assert_eq!(request.method(), "DELETE");
        // Creating "a" again (a retry) waits for that delete's answer.
        let retry = vec![new_job("a", 2)];
        let mut create = Box::pin(state.send(&jobs, &[], retry, &live, &metrics, || {}));
        assert!(futures::poll!(&mut create).is_pending());
        respond(delete, "a", 200);
        create.await;
        let (request, created) = handle.next_request().await.unwrap();
        assert_eq!(request.method(), "POST");
        respond(created, "a", 201);
        // Neither in flight: sent at once.
        let other = vec![new_job("b", 1)];
        let send = state.send(&jobs, &c, other, &live, &metrics, || {});
        assert!(futures::poll!(Box::pin(send)).is_ready());
    }

    #[test]
    fn a_deleted_job_the_store_still_shows_is_not_deleted_again() {
        let job = |name: &str, uid: &str| {
            let mut job = k8s_openapi::api::batch::v1::Job::default();
            job.metadata.name = Some(name.into());
            job.metadata.uid = Some(uid.into());
            let live = LiveJob {
                job: Arc::new(job),
                pod: None,
                listed: None,
            };
            (name.to_string(), live)
        };
        let names = |ns: &[&str]| ns.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let t0 = Instant::now();
        let mut live = BTreeMap::from([job("a", "u1"), job("b", "u2"), job("c", "u3")]);
        let mut deleted = Deleted::default();
        assert_eq!(
            deleted.left_to_delete(&names(&["a", "b"]), &live, t0),
            ["a", "b"]
        );
        // "d" is not in the store: nothing to tell it by, it is deleted again if asked.
        deleted.note(&names(&["a", "b", "d"]), &live, t0);
        let later = t0 + Duration::from_secs(1);
        let asked = names(&["a", "b", "c", "d"]);
        assert_eq!(deleted.left_to_delete(&asked, &live, later), ["c", "d"]);
        // The store drops "a"; "b" is a new Job of the same name (a retry's).
        live.remove("a");
        live.extend([job("a", "u4")]);
        live.insert("b".into(), job("b", "u5").1);
        assert_eq!(deleted.left_to_delete(&asked, &live, later), asked);
        // Shown long after its deletion: deleted again.
        deleted.note(&names(&["c"]), &live, later);
        assert_eq!(
            deleted.left_to_delete(&names(&["c"]), &live, later),
            Vec::<String>::new()
        );
        let past = later + DELETED_FOR_AT_MOST;
        assert_eq!(deleted.left_to_delete(&names(&["c"]), &live, past), ["c"]);
    }
}
