//! What the operator keeps of the Jobs and pods it watches: the fields its reconciles read
//! (`observe`, `job::result`, `apply`), nothing else. The stores hold every Job of every
//! run in flight and its pod; kept whole, a Job's pod template, a pod's spec and both
//! objects' managed fields are most of the operator's memory and none of what it reads.
//! Applied to each object as it arrives, before the store takes it.

use k8s_openapi::api::batch::v1::{Job, JobStatus};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodSpec, PodStatus};
use kube::api::ObjectMeta;

/// Metadata without what no reconcile reads (managed fields, and the pod annotations: a
/// pod's annotations are its Job's template's, read from the spec).
fn meta(meta: &mut ObjectMeta, annotations: bool) {
    meta.managed_fields = None;
    if !annotations {
        meta.annotations = None;
    }
}

/// Trims a Job to its identity (name, labels, annotations, owner) and its status'
/// conditions and times.
pub fn job(job: &mut Job) {
    meta(&mut job.metadata, true);
    job.spec = None;
    job.status = job.status.take().map(|s| JobStatus {
        conditions: s.conditions,
        start_time: s.start_time,
        completion_time: s.completion_time,
        ..Default::default()
    });
}

/// Trims a pod to its identity, node, and status (phase, reason, conditions, and each
/// container's state, which carries the build's report).
pub fn pod(pod: &mut Pod) {
    meta(&mut pod.metadata, false);
    pod.spec = pod.spec.take().map(|s| PodSpec {
        node_name: s.node_name,
        ..Default::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus {
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
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
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
        LiveJob {
            job,
            pod: Some(serde_json::from_value(pod_value).unwrap()),
        }
    }

    fn trimmed(live: &LiveJob) -> LiveJob {
        let mut t = live.clone();
        job(&mut t.job);
        if let Some(p) = t.pod.as_mut() {
            pod(p);
        }
        t
    }

    fn size(live: &LiveJob) -> usize {
        serde_json::to_vec(&live.job).unwrap().len() + serde_json::to_vec(&live.pod).unwrap().len()
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
            assert!(
                size(&small) * 3 < size(live),
                "{} of {} bytes kept",
                size(&small),
                size(live)
            );
            assert_eq!(
                format!("{:?}", outcome(&live.job, live.pod.as_ref())),
                format!("{:?}", outcome(&small.job, small.pod.as_ref()))
            );
            let name = plan.nodes[0].job_name.clone();
            let seen = |l: &LiveJob| {
                let o = observe(
                    &plan,
                    &BTreeMap::new(),
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
