//! The build Job of one plan node: BuildKit (rootless by default) running the dockerfile
//! frontend behind a small wrapper that reports the result in the termination message.
//! Pure code: `build_job` turns a node and its run into the Job object to create.

mod buildctl;
mod result;

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde_json::{Value, json};

pub use buildctl::{CONTEXT_DIR, METADATA_FILE, PhaseBuild, WORK_DIR, buildctl_args};
pub use result::{BuildReport, Outcome, STAGE_START, classify_text, outcome};

use crate::api::{ExecutorMode, ImageBuildRunSpec};
use crate::names::{
    ANNOTATION_ATTEMPT, ANNOTATION_IMAGE, ANNOTATION_INSTANCE, LABEL_NODE, LABEL_PHASE, LABEL_RUN,
    LABEL_RUN_UID, MANAGER, run_label, sha256_hex,
};
use crate::plan::{Node, Phase};

/// The wrapper script the build container runs (`sh /imagebuild/build.sh <buildctl
/// args>`), from the run's wrapper ConfigMap ([`wrapper_config_map`]).
pub const WRAPPER: &str = include_str!("wrapper.sh");

/// Where the build container finds the wrapper ConfigMap's files.
pub const WRAPPER_DIR: &str = "/imagebuild";

/// The wrapper's key in its ConfigMap, and its file in [`WRAPPER_DIR`].
pub const WRAPPER_KEY: &str = "build.sh";

/// The name of the wrapper ConfigMap of the run of `inputs`: `<run>-wrapper-<hash>`, the
/// hash of the run's uid and [`WRAPPER`], so a run re-created under the same name never
/// finds the one of the run before (which the garbage collector deletes), and an operator
/// of another version makes one of its own while the pods of the one before keep the
/// script they started with. The script is mounted, not put in the Job's command: it is
/// 6 KB, which every watch event of every build Job and pod would carry (for the API
/// server to store and send, and the operator to parse).
pub fn wrapper_config_map(inputs: &JobInputs<'_>) -> String {
    let hash = &sha256_hex(&format!("{}\0{}", inputs.run_uid, *WRAPPER_HASH))[..10];
    crate::names::run_object(inputs.run_name, &format!("wrapper-{hash}"))
}

/// The script's hash, taken once: every Job built names the ConfigMap.
static WRAPPER_HASH: LazyLock<String> = LazyLock::new(|| sha256_hex(WRAPPER));

/// Run `inputs`' wrapper ConfigMap ([`wrapper_config_map`]), owned by the run.
pub fn wrapper_object(inputs: &JobInputs<'_>) -> ConfigMap {
    let labels = [
        ("app.kubernetes.io/managed-by", MANAGER.to_string()),
        ("app.kubernetes.io/name", "imagebuild".into()),
        (LABEL_RUN, run_label(inputs.run_name)),
        (LABEL_RUN_UID, inputs.run_uid.into()),
        ("app.kubernetes.io/component", "wrapper".into()),
    ];
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(wrapper_config_map(inputs)),
            namespace: Some(inputs.namespace.into()),
            labels: Some(labels.map(|(k, v)| (k.to_string(), v)).into()),
            owner_references: Some(vec![owner(inputs)]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(WRAPPER_KEY.into(), WRAPPER.into())])),
        ..ConfigMap::default()
    }
}

/// The owner reference to the run of `inputs`, which takes its objects when deleted.
fn owner(inputs: &JobInputs<'_>) -> OwnerReference {
    OwnerReference {
        api_version: "imagebuild.dev/v1alpha1".into(),
        kind: "ImageBuildRun".into(),
        name: inputs.run_name.into(),
        uid: inputs.run_uid.into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The registry hosts of the images a node pushes (its image and cache), sorted, once each.
pub fn http_registries(node: &Node) -> Vec<String> {
    let mut hosts: Vec<String> = std::iter::once(&node.image)
        .map(|image| &**image)
        .chain(node.cache_ref.as_deref())
        .filter_map(|image| crate::reference::parse(image).ok())
        .map(|r| r.registry().to_string())
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Where a docker config JSON push Secret is mounted, read-only.
const DOCKER_CONFIG_DIR: &str = "/home/user/.docker";

/// The run-level inputs of a build Job.
#[derive(Clone, Copy, Debug)]
pub struct JobInputs<'a> {
    /// The run's name.
    pub run_name: &'a str,
    /// The run's namespace, where its Jobs go.
    pub namespace: &'a str,
    /// The run's uid (owner reference, selector label).
    pub run_uid: &'a str,
    /// The run's spec.
    pub spec: &'a ImageBuildRunSpec,
    /// `timeouts.build`: the Job's active deadline.
    pub build_timeout: Duration,
}

/// Why a node has no Job.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JobError {
    /// A post-assembly node of a spec without `postAssembly` (a plan/spec mismatch).
    #[error("node {0} belongs to a phase the spec does not define")]
    NoPhase(String),
    /// The Job assembled from the spec is not a valid Job object.
    #[error("the build Job of node {node} is malformed: {reason}")]
    Malformed {
        /// The node.
        node: String,
        /// Why the object does not read as a Job.
        reason: String,
    },
}

/// A short, stable hash of what a node is built for.
pub fn node_label(node: &Node) -> String {
    sha256_hex(&format!("{}\0{}", node.phase.as_str(), node.subject()))[..16].to_string()
}

/// Most bytes of one build step's output BuildKit passes on (16 MiB).
const STEP_LOG_MAX_SIZE: &str = "16777216";
/// Most bytes a second of one build step's output (100 MiB/s: no clipping in practice).
const STEP_LOG_MAX_SPEED: &str = "104857600";

/// The Job that builds `node` (attempt `attempt`, 1-based). `pod_annotations` are added to
/// the pod (e.g. the run's rendered `placement.podAnnotations`).
pub fn build_job(
    inputs: &JobInputs<'_>,
    node: &Node,
    attempt: u32,
    pod_annotations: &BTreeMap<String, String>,
) -> Result<Job, JobError> {
    let job = job_value(inputs, node, attempt, pod_annotations)?;
    serde_json::from_value(job).map_err(|e| JobError::Malformed {
        node: node.job_name.clone(),
        reason: e.to_string(),
    })
}

/// [`build_job`]'s Job as the JSON sent to the API server, not read back into a `Job`:
/// what a dispatch creates (the first Job of each phase is read as a `Job`, and sent in
/// a dry run, before any: `controller::preflight`).
pub fn job_value(
    inputs: &JobInputs<'_>,
    node: &Node,
    attempt: u32,
    pod_annotations: &BTreeMap<String, String>,
) -> Result<Value, JobError> {
    JobTemplate::new(inputs, node.phase)
        .ok_or_else(|| JobError::NoPhase(node.job_name.clone()))?
        .job(inputs, node, attempt, pod_annotations)
}

/// What the build Jobs of one phase of a run share: a Job is a copy of this with its
/// node's own fields set ([`JobTemplate::job`]). Made once per phase and generation of the
/// spec (`controller::actions`): building each Job whole took tens of microseconds, most
/// of them on what every Job of the phase says alike.
#[derive(Clone, Debug)]
pub struct JobTemplate {
    /// The Job, its node's fields empty: its name, node label, annotations and command.
    job: Value,
    /// Where the node's plain-HTTP registries go in the build container's environment,
    /// if the run's registry is insecure.
    http_registries_at: Option<usize>,
}

impl JobTemplate {
    /// The template of `phase`'s Jobs in the run of `inputs`; `None` if the spec does not
    /// define the phase.
    pub fn new(inputs: &JobInputs<'_>, phase: Phase) -> Option<JobTemplate> {
        let spec = inputs.spec;
        let build = PhaseBuild::of(spec, phase)?;
        let labels = json!({
            "app.kubernetes.io/managed-by": MANAGER,
            "app.kubernetes.io/name": "imagebuild",
            LABEL_RUN: run_label(inputs.run_name),
            LABEL_RUN_UID: inputs.run_uid,
            LABEL_PHASE: phase.as_str(),
        });
        let rootless = spec.executor.mode == ExecutorMode::Rootless;
        let (mode, state_dir) = if rootless {
            ("rootless", "/home/user/.local/share/buildkit")
        } else {
            ("privileged", "/var/lib/buildkit")
        };
        let mut env = vec![
            json!({"name": "IMAGEBUILD_EXECUTOR_MODE", "value": mode}),
            json!({"name": "IMAGEBUILD_BUILDKIT_ROOT", "value": state_dir}),
            // BuildKit clips a step's output at 2 MiB, and at 200 KiB/s: a pip or conda
            // failure needs its whole log (the kubelet rotates container logs past 10 MiB).
            json!({"name": "BUILDKIT_STEP_LOG_MAX_SIZE", "value": STEP_LOG_MAX_SIZE}),
            json!({"name": "BUILDKIT_STEP_LOG_MAX_SPEED", "value": STEP_LOG_MAX_SPEED}),
        ];
        let mut mounts = vec![
            json!({"name": "work", "mountPath": WORK_DIR}),
            json!({"name": "buildkit", "mountPath": state_dir}),
            json!({"name": "wrapper", "mountPath": WRAPPER_DIR, "readOnly": true}),
        ];
        let mut volumes = vec![
            json!({"name": "work", "emptyDir": {}}),
            json!({"name": "buildkit", "emptyDir": {"sizeLimit": spec.placement.ephemeral_storage}}),
            json!({"name": "wrapper", "configMap": {
                "name": wrapper_config_map(inputs),
                "items": [{"key": WRAPPER_KEY, "path": WRAPPER_KEY}]}}),
        ];
        if rootless {
            // BuildKit's rootless mode cannot create its own process sandbox in a pod.
            env.push(
                json!({"name": "BUILDKITD_FLAGS", "value": "--oci-worker-no-process-sandbox"}),
            );
        }
        if let Some(inline) = &build.context.inline {
            env.push(json!({"name": "IMAGEBUILD_DOCKERFILE", "value": inline}));
        }
        // The run's own registry, to pull the images it built (a base, the builder) over
        // plain HTTP too; upstream images keep HTTPS. Its hosts are each node's.
        let http_registries_at = spec.registry.insecure.then_some(env.len());
        if let Some(cm) = &build.context.config_map {
            mounts.push(json!({"name": "context", "mountPath": CONTEXT_DIR, "readOnly": true}));
            volumes.push(json!({"name": "context", "configMap": {
                "name": cm.name, "items": [{"key": cm.key, "path": "Dockerfile"}]}}));
        }
        if let Some(secret) = &spec.registry.push_secret_ref {
            env.push(json!({"name": "DOCKER_CONFIG", "value": DOCKER_CONFIG_DIR}));
            mounts.push(
                json!({"name": "docker-config", "mountPath": DOCKER_CONFIG_DIR, "readOnly": true}),
            );
            volumes.push(json!({"name": "docker-config", "secret": {
                "secretName": secret.name,
                "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}}));
        }
        let security = if rootless {
            // What rootlesskit needs: its own user namespace, so no seccomp or AppArmor
            // confinement, and a non-root user; nothing privileged.
            json!({
                "runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": true,
                "seccompProfile": {"type": "Unconfined"},
                "appArmorProfile": {"type": "Unconfined"},
            })
        } else {
            json!({"privileged": true})
        };
        let placement = &spec.placement;
        let mut pod_spec = json!({
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "containers": [{
                "name": "build",
                "image": spec.executor.image,
                "command": [],
                "env": env,
                "resources": {
                    "requests": {
                        "cpu": placement.cpu,
                        "memory": placement.memory,
                        "ephemeral-storage": placement.ephemeral_storage,
                    },
                    "limits": {
                        "memory": placement.memory,
                        "ephemeral-storage": placement.ephemeral_storage,
                    },
                },
                "securityContext": security,
                "volumeMounts": mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }],
            "volumes": volumes,
        });
        if !placement.node_selector.is_empty() {
            pod_spec["nodeSelector"] = json!(placement.node_selector);
        }
        if !placement.tolerations.is_empty() {
            pod_spec["tolerations"] = json!(placement.tolerations);
        }
        if let Some(affinity) = &placement.affinity {
            pod_spec["affinity"] = json!(affinity);
        }
        let job: Value = json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": "",
                "namespace": inputs.namespace,
                "labels": labels,
                "annotations": {},
                "ownerReferences": [owner(inputs)],
            },
            "spec": {
                // The operator decides retries: one pod per Job.
                "backoffLimit": 0,
                // An int64 on the wire; validation bounds it to a week.
                "activeDeadlineSeconds": inputs.build_timeout.as_secs().clamp(1, i64::MAX as u64),
                "template": {
                    "metadata": {"labels": labels, "annotations": {}},
                    "spec": pod_spec,
                },
            },
        });
        Some(JobTemplate {
            job,
            http_registries_at,
        })
    }

    /// The Job that builds `node` (of this template's phase) in attempt `attempt`, with
    /// `pod_annotations` on its pod.
    pub fn job(
        &self,
        inputs: &JobInputs<'_>,
        node: &Node,
        attempt: u32,
        pod_annotations: &BTreeMap<String, String>,
    ) -> Result<Value, JobError> {
        let build = PhaseBuild::of(inputs.spec, node.phase)
            .ok_or_else(|| JobError::NoPhase(node.job_name.clone()))?;
        let mut annotations = serde_json::Map::new();
        annotations.insert(ANNOTATION_ATTEMPT.into(), attempt.to_string().into());
        annotations.insert(ANNOTATION_IMAGE.into(), node.image.to_string().into());
        if let Some(id) = &node.instance_id {
            annotations.insert(ANNOTATION_INSTANCE.into(), id.to_string().into());
        }
        let mut on_pod = annotations.clone();
        for (k, v) in pod_annotations {
            on_pod.insert(k.clone(), v.clone().into());
        }
        // The wrapper starts buildkitd (through rootlesskit in rootless mode) for this one
        // build, runs buildctl with these arguments, and stops it after.
        let mut command = vec!["sh".to_string(), format!("{WRAPPER_DIR}/{WRAPPER_KEY}")];
        command.extend(buildctl_args(&build, node));
        let label = node_label(node);

        let mut job = self.job.clone();
        let malformed = || JobError::Malformed {
            node: node.job_name.clone(),
            reason: "its template lacks a field".into(),
        };
        let meta = job.get_mut("metadata").ok_or_else(malformed)?;
        meta["name"] = node.job_name.clone().into();
        object(meta, "labels")
            .ok_or_else(malformed)?
            .insert(LABEL_NODE.into(), label.clone().into());
        meta["annotations"] = annotations.into();
        let pod = job.pointer_mut("/spec/template").ok_or_else(malformed)?;
        let pod_meta = pod.get_mut("metadata").ok_or_else(malformed)?;
        object(pod_meta, "labels")
            .ok_or_else(malformed)?
            .insert(LABEL_NODE.into(), label.into());
        pod_meta["annotations"] = on_pod.into();
        let container = pod
            .pointer_mut("/spec/containers/0")
            .ok_or_else(malformed)?;
        container["command"] = command.into();
        if let Some(at) = self.http_registries_at {
            let hosts = http_registries(node);
            let env = container
                .get_mut("env")
                .and_then(Value::as_array_mut)
                .filter(|env| at <= env.len())
                .ok_or_else(malformed)?;
            if !hosts.is_empty() {
                env.insert(
                    at,
                    json!({"name": "IMAGEBUILD_HTTP_REGISTRIES", "value": hosts.join(" ")}),
                );
            }
        }
        Ok(job)
    }
}

/// The object at `key` of `value`, if it is one.
fn object<'a>(value: &'a mut Value, key: &str) -> Option<&'a mut serde_json::Map<String, Value>> {
    value.get_mut(key).and_then(Value::as_object_mut)
}
