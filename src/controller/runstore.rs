//! The operator's Jobs and pods as its watches last told them, kept by run: a reconcile
//! reads its own run's objects (a map lookup), not a scan of every run's with a label
//! compare per object. Fed by a watch's events as `kube`'s reflector store is (a relist
//! is gathered aside and swapped in whole at its end); readable once the first list is in.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use kube::Resource;
use kube::runtime::watcher::Event;
use tokio::sync::watch;

use crate::names::LABEL_RUN_UID;

/// Objects by name within their run.
type ByName<K> = BTreeMap<String, Arc<K>>;

/// One namespace's objects: by run uid (`""` for an object without the label), and the
/// run of each name (to move or drop an object whose label changed).
struct Namespace<K> {
    runs: HashMap<String, ByName<K>>,
    run_of: HashMap<String, String>,
}

impl<K> Default for Namespace<K> {
    fn default() -> Self {
        Namespace {
            runs: HashMap::new(),
            run_of: HashMap::new(),
        }
    }
}

/// Every object, by namespace.
struct Objects<K>(HashMap<String, Namespace<K>>);

impl<K> Default for Objects<K> {
    fn default() -> Self {
        Objects(HashMap::new())
    }
}

impl<K: Resource> Objects<K> {
    fn insert(&mut self, object: Arc<K>) {
        let meta = object.meta();
        let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
            return;
        };
        let run = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_RUN_UID))
            .map_or("", String::as_str);
        let namespace = match self.0.get_mut(ns) {
            Some(namespace) => namespace,
            None => self.0.entry(ns.to_string()).or_default(),
        };
        // The common case, an object changed in its run: replaced in place, nothing
        // allocated.
        if namespace.run_of.get(name).map(String::as_str) == Some(run)
            && let Some(slot) = namespace.runs.get_mut(run).and_then(|r| r.get_mut(name))
        {
            *slot = object;
            return;
        }
        let (name, run) = (name.to_string(), run.to_string());
        if let Some(earlier) = namespace.run_of.insert(name.clone(), run.clone()) {
            remove_from(&mut namespace.runs, &earlier, &name);
        }
        namespace.runs.entry(run).or_default().insert(name, object);
    }

    fn remove(&mut self, object: &K) {
        let meta = object.meta();
        let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
            return;
        };
        let Some(namespace) = self.0.get_mut(ns) else {
            return;
        };
        if let Some(run) = namespace.run_of.remove(name) {
            remove_from(&mut namespace.runs, &run, name);
        }
        if namespace.run_of.is_empty() {
            self.0.remove(ns);
        }
    }
}

/// Drops `name` from run `run`, and the run's map once empty.
fn remove_from<K>(runs: &mut HashMap<String, ByName<K>>, run: &str, name: &str) {
    if let Some(objects) = runs.get_mut(run) {
        objects.remove(name);
        if objects.is_empty() {
            runs.remove(run);
        }
    }
}

/// Reads the objects (cheap to clone; every clone reads the same store).
pub struct RunStore<K> {
    objects: Arc<RwLock<Objects<K>>>,
    ready: watch::Receiver<bool>,
}

impl<K> Clone for RunStore<K> {
    fn clone(&self) -> Self {
        RunStore {
            objects: self.objects.clone(),
            ready: self.ready.clone(),
        }
    }
}

/// Feeds the store from a watch's events.
pub struct Writer<K> {
    objects: Arc<RwLock<Objects<K>>>,
    /// A relist under way: its objects, swapped in at its end.
    relist: Option<Objects<K>>,
    ready: watch::Sender<bool>,
}

/// An empty store and what feeds it.
pub fn store<K>() -> (RunStore<K>, Writer<K>) {
    let objects = Arc::new(RwLock::new(Objects::default()));
    let (ready, seen) = watch::channel(false);
    let reader = RunStore {
        objects: objects.clone(),
        ready: seen,
    };
    let writer = Writer {
        objects,
        relist: None,
        ready,
    };
    (reader, writer)
}

impl<K: Resource> Writer<K> {
    /// Takes in one event of the watch: the store shares its object, never copies it.
    pub fn apply(&mut self, event: &Event<Arc<K>>) {
        match event {
            Event::Apply(object) => write(&self.objects).insert(object.clone()),
            Event::Delete(object) => write(&self.objects).remove(object),
            Event::Init => self.relist = Some(Objects::default()),
            Event::InitApply(object) => {
                self.relist
                    .get_or_insert_with(Objects::default)
                    .insert(object.clone());
            }
            Event::InitDone => {
                *write(&self.objects) = self.relist.take().unwrap_or_default();
                self.ready.send_replace(true);
            }
        }
    }
}

impl<K> RunStore<K> {
    /// Waits for the first list to be in (at once if it is; never, if the watch ended
    /// before).
    pub async fn wait_until_ready(&self) {
        let _ = self.ready.clone().wait_for(|ready| *ready).await;
    }

    /// The object `name` in `ns`.
    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<K>> {
        let objects = read(&self.objects);
        let namespace = objects.0.get(ns)?;
        let run = namespace.run_of.get(name)?;
        namespace.runs.get(run)?.get(name).cloned()
    }

    /// Calls `each` with every object of run `uid` in `ns`, in name order, under the
    /// store's read lock (`each` must not wait).
    pub fn for_run(&self, ns: &str, uid: &str, mut each: impl FnMut(&str, &Arc<K>)) {
        let objects = read(&self.objects);
        let run = objects.0.get(ns).and_then(|n| n.runs.get(uid));
        for (name, object) in run.into_iter().flatten() {
            each(name, object);
        }
    }
}

/// The lock for reading; a panic of a writer while it held it leaves the objects as
/// they were, which are still read.
fn read<K>(lock: &RwLock<Objects<K>>) -> RwLockReadGuard<'_, Objects<K>> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<K>(lock: &RwLock<Objects<K>>) -> RwLockWriteGuard<'_, Objects<K>> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::batch::v1::Job;
    use kube::api::ObjectMeta;

    use super::*;

    fn job(ns: &str, name: &str, run: Option<&str>, generation: i64) -> Arc<Job> {
        let labels = run.map(|uid| BTreeMap::from([(LABEL_RUN_UID.to_string(), uid.to_string())]));
        Arc::new(Job {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels,
                generation: Some(generation),
                ..ObjectMeta::default()
            },
            ..Job::default()
        })
    }

    fn of_run(store: &RunStore<Job>, ns: &str, uid: &str) -> Vec<(String, i64)> {
        let mut seen = Vec::new();
        store.for_run(ns, uid, |name, job| {
            seen.push((name.to_string(), job.metadata.generation.unwrap_or(0)));
        });
        seen
    }

    #[test]
    fn each_run_reads_its_own_objects_of_its_namespace() {
        let (store, mut writer) = store();
        for object in [
            job("a", "j2", Some("r1"), 1),
            job("a", "j1", Some("r1"), 1),
            job("a", "k", Some("r2"), 1),
            job("b", "j3", Some("r1"), 1),
            job("a", "bare", None, 1),
        ] {
            writer.apply(&Event::Apply(object));
        }
        assert_eq!(
            of_run(&store, "a", "r1"),
            [("j1".into(), 1), ("j2".into(), 1)]
        );
        assert_eq!(of_run(&store, "a", "r2"), [("k".into(), 1)]);
        assert_eq!(of_run(&store, "b", "r1"), [("j3".into(), 1)]);
        assert_eq!(of_run(&store, "c", "r1"), []);
        assert_eq!(of_run(&store, "a", ""), [("bare".into(), 1)]);
        assert!(store.get("a", "bare").is_some());
        assert!(store.get("b", "j1").is_none());
    }

    #[test]
    fn a_change_replaces_moves_or_drops_the_object() {
        let (store, mut writer) = store();
        writer.apply(&Event::Apply(job("a", "j", Some("r1"), 1)));
        writer.apply(&Event::Apply(job("a", "j", Some("r1"), 2)));
        assert_eq!(of_run(&store, "a", "r1"), [("j".into(), 2)]);
        // Its run label changed: it leaves the run it was in.
        writer.apply(&Event::Apply(job("a", "j", Some("r2"), 3)));
        assert_eq!(of_run(&store, "a", "r1"), []);
        assert_eq!(of_run(&store, "a", "r2"), [("j".into(), 3)]);
        // Deleted, as the watch last told it (whatever its label then).
        writer.apply(&Event::Delete(job("a", "j", None, 4)));
        assert_eq!(of_run(&store, "a", "r2"), []);
        assert!(store.get("a", "j").is_none());
        assert!(read(&store.objects).0.is_empty(), "empty maps are dropped");
    }

    #[tokio::test]
    async fn a_relist_replaces_everything_at_its_end_and_the_first_makes_it_ready() {
        let (store, mut writer) = store();
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.wait_until_ready().await }
        });
        writer.apply(&Event::Init);
        writer.apply(&Event::InitApply(job("a", "j1", Some("r"), 1)));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "ready before the first list ends");
        assert_eq!(of_run(&store, "a", "r"), [], "not in before the list ends");
        writer.apply(&Event::InitDone);
        waiting.await.unwrap();
        assert_eq!(of_run(&store, "a", "r"), [("j1".into(), 1)]);
        // A relist after the watch broke: what it lists replaces what was, at its end.
        writer.apply(&Event::Init);
        writer.apply(&Event::InitApply(job("a", "j2", Some("r"), 1)));
        assert_eq!(of_run(&store, "a", "r"), [("j1".into(), 1)]);
        writer.apply(&Event::InitDone);
        assert_eq!(of_run(&store, "a", "r"), [("j2".into(), 1)]);
    }
}
