//! The spec of an `ImageBuildRun`: where instances come from, the three phases, and how the
//! run is executed (workers, retries, timeouts, placement, executor).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{ImageBuildRunStatus, PhaseSpec, PostAssemblySpec};

/// A Go-style duration such as `30s`, `15m`, `2000s`, `10h` or `1h30m`: at most four parts
/// of at most five digits each, so no value the pattern admits overflows (the CEL rules on
/// each field bound it further).
pub const DURATION_PATTERN: &str = r"^([0-9]{1,5}(ms|s|m|h)){1,4}$";

/// A resource quantity (`2`, `500m`, `8Gi`, `1.5`): a number, as an integer or a string
/// that is a Kubernetes quantity, greater than zero.
const QUANTITY_RULE: &str =
    "isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))";

/// Builds one container image per benchmark instance in three phases: one shared builder
/// image, one base image per upstream task image, and one assembly image per instance.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "imagebuild.dev",
    version = "v1alpha1",
    kind = "ImageBuildRun",
    plural = "imagebuildruns",
    shortname = "ibr",
    category = "imagebuild",
    namespaced,
    status = "ImageBuildRunStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Builder","type":"string","jsonPath":".status.progress.builder"}"#,
    printcolumn = r#"{"name":"Bases","type":"string","jsonPath":".status.progress.bases"}"#,
    printcolumn = r#"{"name":"Assemblies","type":"string","jsonPath":".status.progress.assemblies"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.failedTotal"}"#,
    printcolumn = r#"{"name":"ETA","type":"string","jsonPath":".status.estimatedCompletion"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
// Everything but maxWorkers, suspend, retry and timeouts is fixed at creation: a changed
// instance list or template would silently mix two runs' images in one manifest.
#[x_kube(validation = Rule::new("!has(oldSelf.cancel) || !oldSelf.cancel || (has(self.cancel) && self.cancel)").message("cancel cannot be undone: create a new ImageBuildRun"))]
#[x_kube(validation = Rule::new("!has(oldSelf.cancel) || !oldSelf.cancel || (has(self.retryRequest) == has(oldSelf.retryRequest) && (!has(self.retryRequest) || self.retryRequest == oldSelf.retryRequest))").message("a cancelled run cannot be retried: create a new ImageBuildRun"))]
#[x_kube(validation = Rule::new("self.instances == oldSelf.instances").message("instances is immutable: create a new ImageBuildRun"))]
#[x_kube(validation = Rule::new("self.builder == oldSelf.builder").message("builder is immutable: create a new ImageBuildRun"))]
#[x_kube(validation = Rule::new("self.base == oldSelf.base").message("base is immutable: create a new ImageBuildRun"))]
#[x_kube(validation = Rule::new("self.assembly == oldSelf.assembly").message("assembly is immutable: create a new ImageBuildRun"))]
#[x_kube(validation = Rule::new("has(self.vars) == has(oldSelf.vars) && (!has(self.vars) || self.vars == oldSelf.vars)").message("vars is immutable: create a new ImageBuildRun"))]
#[x_kube(validation = Rule::new("has(self.postAssembly) == has(oldSelf.postAssembly) && (!has(self.postAssembly) || self.postAssembly == oldSelf.postAssembly)").message("postAssembly is immutable: create a new ImageBuildRun"))]
#[x_kube(validation = Rule::new("has(self.registry) == has(oldSelf.registry) && (!has(self.registry) || self.registry == oldSelf.registry)").message("registry is immutable: create a new ImageBuildRun"))]
#[x_kube(validation = Rule::new("has(self.placement) == has(oldSelf.placement) && (!has(self.placement) || self.placement == oldSelf.placement)").message("placement is immutable: create a new ImageBuildRun"))]
#[x_kube(validation = Rule::new("has(self.executor) == has(oldSelf.executor) && (!has(self.executor) || self.executor == oldSelf.executor)").message("executor is immutable: create a new ImageBuildRun"))]
#[x_kube(validation = Rule::new("has(self.forceRebuild) == has(oldSelf.forceRebuild) && (!has(self.forceRebuild) || self.forceRebuild == oldSelf.forceRebuild)").message("forceRebuild is immutable: create a new ImageBuildRun"))]
pub struct ImageBuildRunSpec {
    /// Where the list of benchmark instances comes from, and how each maps to its
    /// upstream environment image.
    pub instances: InstanceSource,

    /// Free key/values available to every template, e.g. `sdkSha` and `dockerfileHash`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "string", "maxLength": 1024}
    ))]
    pub vars: BTreeMap<String, String>,

    /// The one shared builder image (for example the agent server build stage).
    pub builder: PhaseSpec,

    /// One base image per unique upstream image, shared by the instances that use it.
    pub base: PhaseSpec,

    /// One thin image per instance on top of its base and the builder.
    pub assembly: PhaseSpec,

    /// An optional extra layer on the assembly image of instances matching a pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_assembly: Option<PostAssemblySpec>,

    /// Registry credentials used to push images and to check which images already exist.
    #[serde(default)]
    pub registry: RegistrySpec,

    /// Build Jobs of this run in flight at once, all phases together. May be changed at
    /// any time; it takes effect at the next dispatch.
    #[serde(default = "default_max_workers")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_workers: u32,

    /// How transient failures (registry throttling, evictions, node loss) are retried.
    #[serde(default)]
    pub retry: RetrySpec,

    /// Time limits for one build, for a pod waiting to be scheduled, and for the whole run.
    #[serde(default)]
    pub timeouts: TimeoutsSpec,

    /// Where build pods run and what they request. Builds need a lot of local disk.
    #[serde(default)]
    pub placement: PlacementSpec,

    /// The BuildKit image and mode that run each build.
    #[serde(default)]
    pub executor: ExecutorSpec,

    /// Build every image even when it already exists in the registry.
    #[serde(default)]
    pub force_rebuild: bool,

    /// Stop dispatching new builds; builds already running finish. Set back to false to
    /// resume.
    #[serde(default)]
    pub suspend: bool,

    /// Stop the run: no new builds, running builds' Jobs deleted, phase `Cancelled`.
    /// Every record stays in the manifest. Cannot be undone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,

    /// Ask the run to build failed images again, without a new run: set `id` above the
    /// last request's (`status.lastRetry.id`). Each id is honoured once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_request: Option<RetryRequest>,
}

/// A request to build failed images again. The failed images (all of them, or those of
/// `instances` and the failed images they depend on) get one more attempt each, numbered
/// after their last one; the manifest keeps their history.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryRequest {
    /// The request's number: a request is honoured once, when its id differs from the
    /// last one honoured (`status.lastRetry.id`).
    #[schemars(range(min = 1))]
    pub id: u32,

    /// Instance ids whose failed images to build again; none: every failed image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(min = 1, max = 253)))]
    pub instances: Vec<String>,
}

/// The instance list: exactly one of `list`, `configMap` or `huggingFace`, then `select`
/// and `limit`. Instances are de-duplicated by id (a duplicate is an error) and sorted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.list) ? 1 : 0) + (has(self.configMap) ? 1 : 0) + (has(self.huggingFace) ? 1 : 0) == 1"
).message("instances must set exactly one of list, configMap or huggingFace"))]
pub struct InstanceSource {
    /// Instance ids written inline, e.g. `django__django-11099`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 20000), inner(length(min = 1, max = 253)))]
    pub list: Option<Vec<String>>,

    /// A ConfigMap key holding one instance id a line, or JSON lines with `id` and
    /// optionally `image` (the upstream image). Blank lines and `#` comments are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<super::ConfigMapKeyRef>,

    /// A Hugging Face dataset read through the datasets-server rows API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<HuggingFaceSource>,

    /// Build only these instance ids. Each must exist in the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 20000), inner(length(min = 1, max = 253)))]
    pub select: Option<Vec<String>>,

    /// Build only the first N instances after sorting by id (applied after `select`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub limit: Option<u32>,

    /// Template of the upstream environment image of an instance, used when the source
    /// gives none, e.g.
    /// `docker.io/swebench/sweb.eval.x86_64.{{ repo | lower }}_1776_{{ name | lower }}:latest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub upstream_image: Option<String>,
}

/// A dataset on the Hugging Face hub.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceSource {
    /// Dataset name, e.g. `princeton-nlp/SWE-bench_Verified`.
    #[schemars(
        length(min = 1, max = 256),
        pattern(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
    )]
    pub dataset: String,

    /// Split to read, e.g. `test`.
    #[schemars(length(min = 1, max = 128))]
    pub split: String,

    /// Dataset configuration (subset). When empty, the one configuration that has
    /// `split` is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub config: Option<String>,

    /// Column holding the instance id.
    #[serde(default = "default_id_field")]
    #[schemars(length(min = 1, max = 128))]
    pub id_field: String,

    /// Column holding the upstream image (e.g. SWE-smith's `image_name`). When empty,
    /// `instances.upstreamImage` computes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub image_field: Option<String>,

    /// Base URL of the datasets-server API (for a mirror).
    #[serde(default = "default_hf_endpoint")]
    #[schemars(pattern(r"^https?://\S+$"))]
    pub endpoint: String,
}

/// Registry access.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySpec {
    /// A Secret of type `kubernetes.io/dockerconfigjson` in the run's namespace with push
    /// credentials for every registry the images go to. Also used for existence checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_secret_ref: Option<SecretRef>,

    /// Talk plain HTTP to the registry (for a registry on a private network only).
    #[serde(default)]
    pub insecure: bool,
}

/// A reference to a Secret in the run's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Retry policy for transient failures. Build errors are never retried.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Total attempts per image, the first included.
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 1, max = 20))]
    pub attempts: u32,

    /// Exponential backoff between attempts.
    #[serde(default)]
    pub backoff: RetryBackoff,
}

/// Exponential backoff: `initial`, doubled after each failed attempt, capped at `max`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.initial) <= duration(self.max)").message("initial must not be longer than max"))]
pub struct RetryBackoff {
    /// Wait before the second attempt (above zero, at most 24h).
    #[serde(default = "default_backoff_initial")]
    #[schemars(length(max = 32), pattern(DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s') && duration(self) <= duration('24h')").message("must be longer than 0s and at most 24h"))]
    pub initial: String,

    /// Longest wait between attempts (above zero, at most 24h).
    #[serde(default = "default_backoff_max")]
    #[schemars(length(max = 32), pattern(DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s') && duration(self) <= duration('24h')").message("must be longer than 0s and at most 24h"))]
    pub max: String,
}

/// Time limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsSpec {
    /// Longest one build (one Job attempt) may run, push included (1s to 168h).
    #[serde(default = "default_build_timeout")]
    #[schemars(length(max = 32), pattern(DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('168h')").message("must be at least 1s and at most 168h"))]
    pub build: String,

    /// Longest a build pod may wait to be scheduled before the run reports it as stalled
    /// (above zero, at most 168h).
    #[serde(default = "default_pending_timeout")]
    #[schemars(length(max = 32), pattern(DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s') && duration(self) <= duration('168h')").message("must be longer than 0s and at most 168h"))]
    pub pending: String,

    /// Longest the whole run may take; what remains then fails with `RunDeadlineExceeded`
    /// (above zero, at most 720h).
    #[serde(default = "default_run_timeout")]
    #[schemars(length(max = 32), pattern(DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s') && duration(self) <= duration('720h')").message("must be longer than 0s and at most 720h"))]
    pub run: String,
}

/// Where build pods run and the resources they request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Labels a node must have, e.g. `imagebuild.dev/disk: large`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 32,
        "additionalProperties" = {"type": "string", "maxLength": 63}
    ))]
    pub node_selector: BTreeMap<String, String>,

    /// Taints the build pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,

    /// Node and pod affinity of the build pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Local disk each build pod requests and is limited to (BuildKit's state and the
    /// image layers). Without it pods are evicted under disk pressure.
    #[serde(default = "default_ephemeral_storage")]
    #[x_kube(validation = Rule::new(QUANTITY_RULE).message("must be a quantity above zero, e.g. 2, 500m or 8Gi"))]
    pub ephemeral_storage: Quantity,

    /// CPU each build pod requests.
    #[serde(default = "default_cpu")]
    #[x_kube(validation = Rule::new(QUANTITY_RULE).message("must be a quantity above zero, e.g. 2, 500m or 8Gi"))]
    pub cpu: Quantity,

    /// Memory each build pod requests and is limited to.
    #[serde(default = "default_memory")]
    #[x_kube(validation = Rule::new(QUANTITY_RULE).message("must be a quantity above zero, e.g. 2, 500m or 8Gi"))]
    pub memory: Quantity,

    /// Annotations added to every build pod. Values are templates: besides `spec.vars`
    /// they see `phase`, `attempt` (1-based number), `image`, and where the node has them
    /// `instanceId`, `repo`, `name`, `upstreamImage` and `customTag`. An annotation whose
    /// value renders empty is left out.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 32,
        "additionalProperties" = {"type": "string", "maxLength": 4096}
    ))]
    pub pod_annotations: BTreeMap<String, String>,
}

/// The program that runs each build.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecutorSpec {
    /// BuildKit image with `buildkitd`, `buildctl` and a POSIX shell, and `rootlesskit` for
    /// the rootless mode (BuildKit's own images have them); pin a version.
    #[serde(default = "default_executor_image")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,

    /// `rootless` (default, no privileges beyond unconfined seccomp/AppArmor) or
    /// `privileged`.
    #[serde(default)]
    pub mode: ExecutorMode,
}

/// How BuildKit runs inside the build pod.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorMode {
    /// Rootless BuildKit (user namespaces), no privileged container.
    #[default]
    Rootless,
    /// BuildKit as root in a privileged container.
    Privileged,
}

fn default_max_workers() -> u32 {
    16
}
fn default_attempts() -> u32 {
    3
}
fn default_backoff_initial() -> String {
    "30s".into()
}
fn default_backoff_max() -> String {
    "10m".into()
}
fn default_build_timeout() -> String {
    "2000s".into()
}
fn default_pending_timeout() -> String {
    "15m".into()
}
fn default_run_timeout() -> String {
    "10h".into()
}
fn default_id_field() -> String {
    "instance_id".into()
}
fn default_hf_endpoint() -> String {
    "https://datasets-server.huggingface.co".into()
}
fn default_ephemeral_storage() -> Quantity {
    Quantity("60Gi".into())
}
fn default_cpu() -> Quantity {
    Quantity("2".into())
}
fn default_memory() -> Quantity {
    Quantity("8Gi".into())
}
fn default_executor_image() -> String {
    "docker.io/moby/buildkit:v0.34.2-rootless".into()
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            backoff: RetryBackoff::default(),
        }
    }
}

impl Default for RetryBackoff {
    fn default() -> Self {
        Self {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
        }
    }
}

impl Default for TimeoutsSpec {
    fn default() -> Self {
        Self {
            build: default_build_timeout(),
            pending: default_pending_timeout(),
            run: default_run_timeout(),
        }
    }
}

impl Default for PlacementSpec {
    fn default() -> Self {
        Self {
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            ephemeral_storage: default_ephemeral_storage(),
            cpu: default_cpu(),
            memory: default_memory(),
            pod_annotations: BTreeMap::new(),
        }
    }
}

impl Default for ExecutorSpec {
    fn default() -> Self {
        Self {
            image: default_executor_image(),
            mode: ExecutorMode::default(),
        }
    }
}
