//! Failure classes and which of them are worth another attempt.

use crate::plan::Node;

/// A classified build failure.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// The class, which decides retries.
    pub class: FailureClass,
    /// The last lines of the error, for people.
    pub message: String,
}

/// Why a build failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureClass {
    /// The Dockerfile failed (non-zero exit that is none of the below).
    BuildError,
    /// The registry answered 429 `toomanyrequests`.
    RegistryThrottled,
    /// The registry or the network failed (5xx, connection reset).
    RegistryUnavailable,
    /// `no space left on device` in the build.
    DiskFull,
    /// The pod was evicted (ephemeral storage, disk pressure) or its node went away.
    Evicted,
    /// The build container ran out of memory.
    OomKilled,
    /// The build ran longer than `timeouts.build`.
    DeadlineExceeded,
    /// BuildKit itself crashed (`frontend grpc server closed unexpectedly`).
    ExecutorCrashed,
    /// BuildKit's daemon never started in the build pod (for example rootlesskit refused
    /// by the node): every build on that node and image would fail the same way.
    ExecutorStartFailed,
    /// The registry refused the credentials (401/403 on push or pull).
    RegistryAuthFailed,
    /// An image the build starts from does not exist (a `FROM` or build-arg image).
    ImageNotFound,
    /// The spec cannot make this image's build Job (a `placement.podAnnotations`
    /// template fails for this attempt).
    InvalidSpec,
    /// The pod could not be scheduled within `timeouts.pending`.
    Unschedulable,
    /// An input image failed.
    DependencyFailed,
    /// The run's deadline passed first.
    RunDeadlineExceeded,
}

impl FailureClass {
    /// Whether another attempt may succeed where this one failed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::RegistryThrottled
                | Self::RegistryUnavailable
                | Self::DiskFull
                | Self::Evicted
                | Self::DeadlineExceeded
                | Self::ExecutorCrashed
        )
    }

    /// PascalCase name for conditions, events and manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BuildError => "BuildError",
            Self::RegistryThrottled => "RegistryThrottled",
            Self::RegistryUnavailable => "RegistryUnavailable",
            Self::DiskFull => "DiskFull",
            Self::Evicted => "Evicted",
            Self::OomKilled => "OOMKilled",
            Self::DeadlineExceeded => "DeadlineExceeded",
            Self::ExecutorCrashed => "ExecutorCrashed",
            Self::ExecutorStartFailed => "ExecutorStartFailed",
            Self::RegistryAuthFailed => "RegistryAuthFailed",
            Self::ImageNotFound => "ImageNotFound",
            Self::InvalidSpec => "InvalidSpec",
            Self::Unschedulable => "Unschedulable",
            Self::DependencyFailed => "DependencyFailed",
            Self::RunDeadlineExceeded => "RunDeadlineExceeded",
        }
    }

    /// Every class, for exhaustive tests and documentation.
    pub const ALL: [FailureClass; 15] = [
        Self::BuildError,
        Self::RegistryThrottled,
        Self::RegistryUnavailable,
        Self::DiskFull,
        Self::Evicted,
        Self::OomKilled,
        Self::DeadlineExceeded,
        Self::ExecutorCrashed,
        Self::ExecutorStartFailed,
        Self::RegistryAuthFailed,
        Self::ImageNotFound,
        Self::InvalidSpec,
        Self::Unschedulable,
        Self::DependencyFailed,
        Self::RunDeadlineExceeded,
    ];
}

impl Failure {
    /// A failure of `class` with `message`.
    pub fn new(class: FailureClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }

    /// The failure of a node whose input `dep` failed.
    pub fn dependency(dep: &Node) -> Self {
        let what = dep.subject();
        Self::new(
            FailureClass::DependencyFailed,
            format!("{} {what} failed", dep.phase.as_str()),
        )
    }

    /// The failure of a node the run deadline cut off.
    pub fn run_deadline() -> Self {
        Self::new(
            FailureClass::RunDeadlineExceeded,
            "the run's timeouts.run passed before this image was built",
        )
    }
}
