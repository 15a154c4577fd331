//! What the operator keeps of the Jobs and pods it watches: the fields its reconciles read
//! (`observe`, `job::result`, `apply`), nothing else. The stores hold every Job of every
//! run in flight and its pod; kept whole, a Job's pod template, a pod's spec and both
//! objects' managed fields are most of the operator's memory and none of what it reads.
//!
//! They are read from the watch's JSON straight into that shape ([`Lean`]): what is not
//! kept is skipped by the parser, never built. Parsing whole objects (the managed fields
//! above all, a tree of JSON values each) and then dropping most of them was a fifth of
//! the operator's CPU.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStatus, Pod, PodCondition, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// A Job or pod as the operator keeps it, read from the API server's JSON. The API
/// requests are `K`'s; the object is `K` with only the kept fields set.
#[derive(Clone, Debug)]
pub struct Lean<K>(pub K);

impl<K: kube::Resource> kube::Resource for Lean<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        self.0.meta()
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}

/// Metadata without what no reconcile reads: the managed fields, and (`annotations`
/// false) the annotations (a pod's are its Job's template's, read from the spec).
#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Meta {
    annotations: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    deletion_grace_period_seconds: Option<i64>,
    deletion_timestamp: Option<Time>,
    finalizers: Option<Vec<String>>,
    generate_name: Option<String>,
    generation: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    name: Option<String>,
    namespace: Option<String>,
    owner_references: Option<Vec<OwnerReference>>,
    resource_version: Option<String>,
    self_link: Option<String>,
    uid: Option<String>,
}

impl Meta {
    fn kept(self, annotations: bool) -> ObjectMeta {
        ObjectMeta {
            annotations: self.annotations.filter(|_| annotations),
            creation_timestamp: self.creation_timestamp,
            deletion_grace_period_seconds: self.deletion_grace_period_seconds,
            deletion_timestamp: self.deletion_timestamp,
            finalizers: self.finalizers,
            generate_name: self.generate_name,
            generation: self.generation,
            labels: self.labels,
            managed_fields: None,
            name: self.name,
            namespace: self.namespace,
            owner_references: self.owner_references,
            resource_version: self.resource_version,
            self_link: self.self_link,
            uid: self.uid,
        }
    }
}

/// A Job: its identity (name, labels, annotations, owner) and its status' conditions and
/// times; no spec.
#[derive(Default, Deserialize)]
#[serde(default)]
struct WireJob {
    metadata: Meta,
    status: Option<WireJobStatus>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct WireJobStatus {
    conditions: Option<Vec<JobCondition>>,
    start_time: Option<Time>,
    completion_time: Option<Time>,
}

impl<'de> Deserialize<'de> for Lean<Job> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = WireJob::deserialize(d)?;
        Ok(Lean(Job {
            metadata: wire.metadata.kept(true),
            spec: None,
            status: wire.status.map(|s| JobStatus {
                conditions: s.conditions,
                start_time: s.start_time,
                completion_time: s.completion_time,
                ..Default::default()
            }),
        }))
    }
}

/// A pod: its identity, node, and status (phase, reason, conditions, and each
/// container's state, which carries the build's report).
#[derive(Default, Deserialize)]
#[serde(default)]
struct WirePod {
    metadata: Meta,
    spec: Option<WirePodSpec>,
    status: Option<WirePodStatus>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct WirePodSpec {
    node_name: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct WirePodStatus {
    phase: Option<String>,
    reason: Option<String>,
    message: Option<String>,
    conditions: Option<Vec<PodCondition>>,
    container_statuses: Option<Vec<WireContainerStatus>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct WireContainerStatus {
    name: String,
    state: Option<ContainerState>,
}

impl<'de> Deserialize<'de> for Lean<Pod> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = WirePod::deserialize(d)?;
        Ok(Lean(Pod {
            metadata: wire.metadata.kept(false),
            spec: wire.spec.map(|s| PodSpec {
                node_name: s.node_name,
                ..Default::default()
            }),
            status: wire.status.map(|s| PodStatus {
                phase: s.phase,
                reason: s.reason,
                message: s.message,
                conditions: s.conditions,
                container_statuses: s.container_statuses.map(|statuses| {
                    statuses
                        .into_iter()
                        .map(|c| ContainerStatus {
                            name: c.name,
                            state: c.state,
                            ..Default::default()
                        })
                        .collect()
                }),
                ..Default::default()
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use chrono::Utc;
    use serde_json::json;

    use super::*;
    use crate::controller::observe::{LiveJob, observe};
    use crate::job::{JobInputs, build_job, outcome};

    fn plan() -> (crate::api::ImageBuildRunSpec, crate::plan::Plan) {
        let spec: crate::api::ImageBuildRunSpec = serde_yaml_ng::from_str(
            r#"
instances: {list: [a__a-1], upstreamImage: "r.io/up/{{ name }}:1"}
builder: {context: {inline: "FROM scratch"}, image: "r.io/b:1"}
base: {context: {inline: "FROM scratch"}, image: "r.io/base:{{ customTag }}"}
assembly: {context: {inline: "FROM scratch"}, image: "r.io/a:{{ instanceId | lower }}"}
placement: {podAnnotations: {"sim.imagebuild.dev/duration": "2s"}}
"#,
        )
        .unwrap();
        let instances = vec![crate::instances::RawInstance {
            id: "a__a-1".into(),
            image: None,
        }];
        let plan = crate::plan::build("run", &spec, &instances).unwrap();
        (spec, plan)
    }

    /// A Job of the run as the API server returns it (managed fields, template, status)
    /// and its pod, with the given job and pod status.
    fn whole(
        spec: &crate::api::ImageBuildRunSpec,
        plan: &crate::plan::Plan,
        status: serde_json::Value,
        pod_status: serde_json::Value,
    ) -> LiveJob {
        let inputs = JobInputs {
            run_name: "run",
            namespace: "ns",
            run_uid: "uid",
            spec,
            build_timeout: Duration::from_secs(60),
        };
        let mut job = build_job(&inputs, &plan.nodes[0], 2, &BTreeMap::new()).unwrap();
        let managed = json!([{"manager": "kube-controller-manager", "operation": "Update",
            "apiVersion": "batch/v1", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:status": {"f:conditions": {}, "f:ready": {}, "f:terminating": {}}}}]);
        job.metadata.managed_fields = Some(serde_json::from_value(managed.clone()).unwrap());
        job.status = Some(serde_json::from_value(status).unwrap());
        let template = job.spec.as_ref().unwrap().template.clone();
        let mut pod_value = json!({
            "metadata": {"name": "run-pod", "namespace": "ns", "managedFields": managed,
                         "creationTimestamp": "2026-01-01T00:00:00Z",
                         "annotations": {"sim.imagebuild.dev/duration": "2s"}},
            "status": pod_status,
        });
        pod_value["spec"] = serde_json::to_value(template.spec.unwrap()).unwrap();
        pod_value["spec"]["nodeName"] = json!("kwok-large-0");
        let pod: Pod = serde_json::from_value(pod_value).unwrap();
        LiveJob {
            job: Arc::new(job),
            pod: Some(Arc::new(pod)),
            listed: None,
        }
    }

    /// The Job and pod as the watch reads them, from their JSON.
    fn trimmed(live: &LiveJob) -> LiveJob {
        let job = serde_json::to_value(&*live.job).unwrap();
        let job: Lean<Job> = serde_json::from_value(job).unwrap();
        let pod: Option<Lean<Pod>> = live.pod.as_deref().map(|p| {
            let pod = serde_json::to_value(p).unwrap();
            serde_json::from_value(pod).unwrap()
        });
        LiveJob {
            job: Arc::new(job.0),
            pod: pod.map(|p| Arc::new(p.0)),
            listed: live.listed,
        }
    }

    fn size(live: &LiveJob) -> usize {
        serde_json::to_vec(&*live.job).unwrap().len()
            + serde_json::to_vec(&live.pod.as_deref()).unwrap().len()
    }

    #[test]
    fn a_trimmed_job_and_pod_tell_what_the_whole_ones_tell() {
        let (spec, plan) = plan();
        let report = r#"{"exitCode":0,"digest":"sha256:ff","buildSeconds":9,"pushSeconds":1,"errorTail":""}"#;
        let terminated = |code: i32, reason: &str, message: &str| {
            json!({"containerStatuses": [{"name": "build", "image": "moby/buildkit:rootless", "imageID": "sha256:aa",
                "ready": false, "restartCount": 0, "containerID": "containerd://abc",
                "lastState": {"terminated": {"exitCode": 1, "startedAt": "2026-01-01T00:00:00Z"}},
                "state": {"terminated": {"exitCode": code, "reason": reason, "message": message,
                          "startedAt": "2026-01-01T00:00:02Z", "finishedAt": "2026-01-01T00:00:09Z"}}}],
                "phase": if code == 0 { "Succeeded" } else { "Failed" },
                "podIP": "10.0.0.9", "podIPs": [{"ip": "10.0.0.9"}], "hostIP": "10.0.0.1", "qosClass": "Burstable"})
        };
        let cases = [
            // Built, with its report.
            whole(
                &spec,
                &plan,
                json!({"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:00:10Z",
                       "ready": 0, "terminating": 0, "succeeded": 1,
                       "conditions": [{"type": "Complete", "status": "True"}]}),
                terminated(0, "Completed", report),
            ),
            // Out of memory.
            whole(
                &spec,
                &plan,
                json!({"startTime": "2026-01-01T00:00:00Z", "failed": 1,
                       "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                       "lastTransitionTime": "2026-01-01T00:00:10Z"}]}),
                terminated(137, "OOMKilled", ""),
            ),
            // Evicted.
            whole(
                &spec,
                &plan,
                json!({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}),
                json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: ephemeral-storage."}),
            ),
            // Waiting for a node.
            whole(
                &spec,
                &plan,
                json!({"active": 1}),
                json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                    "reason": "Unschedulable", "message": "0/4 nodes are available",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
            ),
        ];
        let now = Utc::now();
        for live in &cases {
            let small = trimmed(live);
            // Every metadata field but the managed fields (and a pod's annotations).
            let mut meta = live.job.metadata.clone();
            meta.managed_fields = None;
            assert_eq!(small.job.metadata, meta);
            let mut meta = live.pod.as_deref().unwrap().metadata.clone();
            (meta.managed_fields, meta.annotations) = (None, None);
            assert_eq!(small.pod.as_deref().unwrap().metadata, meta);
            assert_eq!(
                small
                    .pod
                    .as_ref()
                    .unwrap()
                    .spec
                    .as_ref()
                    .unwrap()
                    .node_name
                    .as_deref(),
                Some("kwok-large-0")
            );
            assert!(
                size(&small) * 3 < size(live),
                "{} of {} bytes kept",
                size(&small),
                size(live)
            );
            assert_eq!(
                format!("{:?}", outcome(&live.job, live.pod.as_deref())),
                format!("{:?}", outcome(&small.job, small.pod.as_deref()))
            );
            let name = plan.nodes[0].job_name.clone();
            let seen = |l: &LiveJob| {
                let o = observe(
                    &plan,
                    &crate::manifest::Records::default(),
                    &BTreeMap::from([(name.clone(), l.clone())]),
                    &BTreeMap::new(),
                    Duration::from_secs(3600),
                    now,
                );
                format!("{:?} {:?} {:?}", o.states, o.outcomes, o.unschedulable)
            };
            assert_eq!(seen(live), seen(&small));
        }
    }
}
