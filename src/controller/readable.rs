//! The second line behind the CRD's schema: a run as watched is its metadata and either the
//! `ImageBuildRun` it reads as or why it does not (a value the schema of an older CRD
//! let through, an edit by hand to etcd). The watch never fails on one object, so an
//! unreadable run is skipped, named in the log, a Warning Event and a gauge, and every
//! other run is reconciled, before a restart and after it.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::NamespaceResourceScope;
use serde::{Deserialize, Deserializer};

use super::context::Ctx;
use crate::api::ImageBuildRun;

/// A watched `ImageBuildRun`: readable or not.
#[derive(Clone, Debug)]
pub struct Watched {
    /// Its metadata (always readable: the API server writes it).
    pub metadata: ObjectMeta,
    /// The run, or why it does not read as one.
    pub run: Result<Arc<ImageBuildRun>, String>,
}

impl<'de> Deserialize<'de> for Watched {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let metadata = value
            .get("metadata")
            .cloned()
            .map(ObjectMeta::deserialize)
            .transpose()
            .map_err(serde::de::Error::custom)?
            .unwrap_or_default();
        let run = ImageBuildRun::deserialize(value)
            .map(Arc::new)
            .map_err(|e| crate::text::truncate(&e.to_string(), 512));
        Ok(Watched { metadata, run })
    }
}

impl Resource for Watched {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        ImageBuildRun::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        ImageBuildRun::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        ImageBuildRun::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        ImageBuildRun::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The runs that do not read, by `namespace/name`, behind the gauge.
#[derive(Default)]
pub struct Unreadable(Mutex<HashSet<String>>);

impl Unreadable {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes whether run `key` reads; the number that do not.
    pub fn note(&self, key: &str, readable: bool) -> usize {
        let mut set = self.set();
        if readable {
            set.remove(key);
        } else {
            set.insert(key.to_string());
        }
        set.len()
    }

    /// Forgets the runs `live` rejects; the number left.
    pub fn retain(&self, live: impl Fn(&str) -> bool) -> usize {
        let mut set = self.set();
        set.retain(|key| live(key));
        set.len()
    }
}

/// Reports a run that does not read: the log, a Warning Event on it, the gauge. It is
/// then left alone until it changes.
pub async fn report(ctx: &Ctx, watched: &Watched, why: &str) {
    let ns = watched.metadata.namespace.clone().unwrap_or_default();
    let name = watched.metadata.name.clone().unwrap_or_default();
    let count = ctx.unreadable.note(&format!("{ns}/{name}"), false);
    ctx.metrics.set_unreadable_runs(count);
    tracing::error!(namespace = %ns, run = %name, error = %why, "the run does not read as an ImageBuildRun; skipped");
    let event = super::events::warning(
        "Unreadable",
        "Read",
        format!("the operator cannot read this run and skips it: {why}"),
    );
    if let Err(e) = ctx.recorder.publish(&event, &watched.object_ref(&())).await {
        tracing::warn!(run = %name, error = %e, "publishing an Event failed");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A run with a value its Rust type cannot hold still deserializes, with its metadata
    /// and the reason; a good one reads as the run.
    #[test]
    fn unreadable_runs_deserialize_with_the_reason() {
        let good = json!({
            "apiVersion": "imagebuild.dev/v1alpha1", "kind": "ImageBuildRun",
            "metadata": {"name": "ok", "namespace": "ns", "uid": "u1"},
            "spec": serde_yaml_ng::from_str::<serde_json::Value>(include_str!("../../examples/kind-tiny-run.yaml"))
                .unwrap()["spec"].clone(),
        });
        let watched: Watched = serde_json::from_value(good.clone()).unwrap();
        assert_eq!(watched.metadata.name.as_deref(), Some("ok"));
        assert!(watched.run.is_ok(), "{:?}", watched.run);

        let mut bad = good;
        bad["metadata"]["name"] = json!("bad");
        bad["spec"]["maxWorkers"] = json!(1u64 << 40);
        let watched: Watched = serde_json::from_value(bad).unwrap();
        assert_eq!(watched.metadata.name.as_deref(), Some("bad"));
        let why = watched.run.unwrap_err();
        assert!(why.contains("1099511627776"), "{why}");
    }

    #[test]
    fn the_unreadable_set_counts_and_forgets() {
        let set = Unreadable::default();
        assert_eq!(set.note("ns/a", false), 1);
        assert_eq!(set.note("ns/b", false), 2);
        assert_eq!(set.note("ns/a", true), 1);
        assert_eq!(set.retain(|k| k != "ns/b"), 0);
    }
}
