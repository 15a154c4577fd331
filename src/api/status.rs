//! The status of an `ImageBuildRun`: small and always current. Per-image detail lives in
//! the manifest ConfigMaps named here, so the object stays small at 10,000 instances.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Most recent failures kept in the status; the manifest has all of them.
pub const MAX_FAILURE_RECORDS: usize = 20;
/// Most manifest shards a run may have (the `maxItems` of `status.manifests`).
pub const MAX_MANIFESTS: usize = 256;

/// Observed state of an ImageBuildRun.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageBuildRunStatus {
    /// Where the run is: Pending, Resolving, Building, Succeeded, PartiallySucceeded,
    /// Failed or Cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RunPhase>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Counts for the builder image.
    #[serde(default)]
    pub builder: PhaseCounts,

    /// Counts for the base images.
    #[serde(default)]
    pub bases: PhaseCounts,

    /// Counts for the assembly images.
    #[serde(default)]
    pub assemblies: PhaseCounts,

    /// Counts for the post-assembly layers.
    #[serde(default)]
    pub post_assemblies: PhaseCounts,

    /// One-line progress strings shown by `kubectl get ibr`.
    #[serde(default)]
    pub progress: Progress,

    /// Ready, Progressing, Stalled and Degraded, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub conditions: Vec<Condition>,

    /// When the operator started working on the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,

    /// When an image last finished (built, skipped or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_at: Option<DateTime<Utc>>,

    /// When the run reached a final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,

    /// Projected end of the run, from observed build durations and maxWorkers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_completion: Option<DateTime<Utc>>,

    /// Images finished per hour over the recent window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_per_hour: Option<f64>,

    /// Most recent failures, newest first (at most 20). The manifest lists them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub failures: Vec<FailureRecord>,

    /// Number of images that failed, all phases together.
    #[serde(default)]
    pub failed_total: u32,

    /// Of those, the images whose failure was transient (throttling, eviction, a crashed
    /// build daemon...) but which used up every attempt `retry.attempts` allows.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries_exhausted: u32,

    /// Names of the ConfigMaps that hold the per-image manifest, in shard order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub manifests: Vec<String>,

    /// The last retry request honoured (`spec.retryRequest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_retry: Option<RetryStatus>,
}

/// What a retry request did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryStatus {
    /// The request's id.
    pub id: u32,
    /// When the operator honoured it; the run's deadline (`timeouts.run`) counts from here.
    pub at: DateTime<Utc>,
    /// Failed images given another attempt.
    pub reopened: u32,
    /// What was done, and the requested instances the run does not have.
    #[schemars(length(max = 1024))]
    pub message: String,
}

/// Where a run is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum RunPhase {
    /// Accepted, not started.
    Pending,
    /// Reading the instance list and checking the registry.
    Resolving,
    /// Build Jobs are being dispatched.
    Building,
    /// Every image was built or already existed.
    Succeeded,
    /// Some images failed; the others were built or existed.
    PartiallySucceeded,
    /// The run could not produce any assembly image, or its spec is invalid.
    Failed,
    /// The run was stopped before it finished.
    Cancelled,
}

impl RunPhase {
    /// Whether the run has ended in this phase (until its spec changes).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunPhase::Succeeded
                | RunPhase::PartiallySucceeded
                | RunPhase::Failed
                | RunPhase::Cancelled
        )
    }
}

/// Image counts of one phase. `total` = skipped + pending + running + succeeded + failed.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct PhaseCounts {
    /// Images planned in this phase.
    pub total: u32,
    /// Images not built because they already exist or are no longer needed.
    pub skipped: u32,
    /// Images waiting for their inputs, a worker or a retry.
    pub pending: u32,
    /// Images with a build Job in flight.
    pub running: u32,
    /// Images built and pushed.
    pub succeeded: u32,
    /// Images that failed for good.
    pub failed: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Printer-column strings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// State of the builder image: Pending, Running, Retrying (waiting for another
    /// attempt), Succeeded, Skipped or Failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub builder: String,
    /// Bases done (built or skipped) out of total, e.g. `120/500`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bases: String,
    /// Assemblies done out of total.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub assemblies: String,
}

/// One failed image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureRecord {
    /// Instance id, or the upstream image for a base, or `builder`.
    pub instance: String,
    /// builder, base, assembly or postAssembly.
    pub phase: String,
    /// Failure class in PascalCase, e.g. `BuildError`, `DiskFull`, `DependencyFailed`.
    pub reason: String,
    /// Last line of the error, shortened.
    #[schemars(length(max = 512))]
    pub message: String,
    /// When the image failed.
    pub time: DateTime<Utc>,
}
