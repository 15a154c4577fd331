//! The `ImageBuildRun` custom resource (`imagebuild.dev/v1alpha1`): spec, status and the
//! schema rules the API server enforces. Field docs here are what `kubectl explain` shows.

mod phase;
mod spec;
mod status;

pub use phase::{
    BuildContext, CacheMode, ConfigMapKeyRef, GitContext, PhaseSpec, PostAssemblySpec,
};
pub use spec::{
    ExecutorMode, ExecutorSpec, HuggingFaceSource, ImageBuildRun, ImageBuildRunSpec,
    InstanceSource, PlacementSpec, RegistrySpec, RetryBackoff, RetryRequest, RetrySpec, SecretRef,
    TimeoutsSpec,
};
pub use status::{
    FailureRecord, ImageBuildRunStatus, MAX_FAILURE_RECORDS, MAX_MANIFESTS, PhaseCounts, Progress,
    RetryStatus, RunPhase,
};

/// API group of every resource the operator serves.
pub const GROUP: &str = "imagebuild.dev";
