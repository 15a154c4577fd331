//! Reading a finished build Job: the wrapper's JSON result from the termination message,
//! and the failure class from the pod and the Job.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use serde::Deserialize;

use crate::schedule::{Failure, FailureClass};

/// What the wrapper (`wrapper.sh`) wrote to the termination message.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildReport {
    /// The build command's exit code.
    pub exit_code: i32,
    /// What ran last: `start` (buildkitd, which did not start) or `build`.
    #[serde(default)]
    pub stage: String,
    /// Digest of the pushed image (empty when the build failed).
    #[serde(default)]
    pub digest: String,
    /// Seconds the whole build took, push included.
    #[serde(default)]
    pub build_seconds: u64,
    /// Seconds spent pushing layers.
    #[serde(default)]
    pub push_seconds: u64,
    /// Build steps BuildKit found in its cache (the registry cache included).
    #[serde(default)]
    pub cached_steps: u64,
    /// The last lines of the output of a failed build.
    #[serde(default)]
    pub error_tail: String,
}

/// The report's `stage` when buildkitd did not start.
pub const STAGE_START: &str = "start";

impl BuildReport {
    /// The report in a termination message; `None` if the wrapper wrote none (the pod was
    /// killed first, or the message holds the log tail instead).
    pub fn parse(message: &str) -> Option<BuildReport> {
        message
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str(line.trim()).ok())
    }
}

/// How a finished Job ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Built and pushed.
    Succeeded {
        /// The wrapper's report, when the pod was still there to read it.
        report: Option<BuildReport>,
        /// The node the pod ran on.
        node: Option<String>,
    },
    /// Failed, classified.
    Failed {
        /// The class and the last lines of the error.
        failure: Failure,
        /// The node the pod ran on.
        node: Option<String>,
    },
}

/// The outcome of `job` (with its pod, if it still exists), or `None` while it runs.
pub fn outcome(job: &Job, pod: Option<&Pod>) -> Option<Outcome> {
    let node = pod
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.node_name.clone());
    let conditions = job.status.as_ref()?.conditions.as_deref().unwrap_or(&[]);
    let is = |type_: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == "True")
    };
    if is("Complete").is_some() {
        let report =
            terminated(pod).and_then(|t| t.message.as_deref().and_then(BuildReport::parse));
        return Some(Outcome::Succeeded { report, node });
    }
    let failed = is("Failed")?;
    let failure = if failed.reason.as_deref() == Some("DeadlineExceeded") {
        Failure::new(
            FailureClass::DeadlineExceeded,
            failed.message.clone().unwrap_or_default(),
        )
    } else {
        classify_pod(pod)
    };
    Some(Outcome::Failed { failure, node })
}

fn terminated(pod: Option<&Pod>) -> Option<&ContainerStateTerminated> {
    let statuses = pod?.status.as_ref()?.container_statuses.as_ref()?;
    statuses.first()?.state.as_ref()?.terminated.as_ref()
}

/// The wrapper's last line when the build was stopped by SIGTERM (`src/job/wrapper.sh`).
const STOPPED_BY_SIGNAL: &str = "the build was stopped by a signal";

/// The failure of a Job whose pod failed (the Job's own deadline is handled by the caller).
fn classify_pod(pod: Option<&Pod>) -> Failure {
    let Some(pod) = pod else {
        // Its node was lost (the pod garbage collector deletes the pods of a node that is
        // gone) or somebody deleted it: the build never finished, so another attempt may.
        return Failure::new(
            FailureClass::Evicted,
            "the build pod was gone before its result was read (its node lost, or the pod deleted)",
        );
    };
    let status = pod.status.as_ref();
    let pod_reason = status.and_then(|s| s.reason.as_deref()).unwrap_or("");
    let pod_message = status.and_then(|s| s.message.as_deref()).unwrap_or("");
    let disrupted = status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True");
    if pod_reason == "Evicted" {
        return Failure::new(FailureClass::Evicted, pod_message);
    }
    let term = terminated(Some(pod));
    if term.and_then(|t| t.reason.as_deref()) == Some("OOMKilled") {
        return Failure::new(
            FailureClass::OomKilled,
            "the build container ran out of memory",
        );
    }
    let message = term.and_then(|t| t.message.as_deref()).unwrap_or("");
    let (text, exit_code) = match BuildReport::parse(message) {
        Some(report) if report.stage == STAGE_START => {
            return Failure::new(FailureClass::ExecutorStartFailed, report.error_tail);
        }
        Some(report) => (report.error_tail, Some(report.exit_code)),
        None => (message.to_string(), term.map(|t| t.exit_code)),
    };
    if let Some(class) = classify_text(&text) {
        return Failure::new(class, text);
    }
    if pod.metadata.deletion_timestamp.is_some() || text.contains(STOPPED_BY_SIGNAL) {
        // Stopped from outside before it ended (the Job's own deadline is handled by the
        // caller): a pod deleted by hand, a node shut down. Another attempt may finish.
        return Failure::new(
            FailureClass::Evicted,
            format!("the build pod was deleted or stopped before the build ended\n{text}"),
        );
    }
    if let Some(c) = disrupted {
        // Preempted, node drained or gone: the build never had a fair chance.
        let why = c
            .message
            .clone()
            .unwrap_or_else(|| c.reason.clone().unwrap_or_default());
        return Failure::new(FailureClass::Evicted, why);
    }
    let text = if text.trim().is_empty() {
        format!("the build exited with code {}", exit_code.unwrap_or(-1))
    } else {
        text
    };
    Failure::new(FailureClass::BuildError, text)
}

/// Known transient causes in a build's output, most specific first.
const PATTERNS: &[(FailureClass, &[&str])] = &[
    (FailureClass::DiskFull, &["no space left on device"]),
    (
        FailureClass::RegistryThrottled,
        &[
            "toomanyrequests",
            "429 too many requests",
            "rate limit exceeded",
        ],
    ),
    (
        FailureClass::ExecutorCrashed,
        &[
            "frontend grpc server closed unexpectedly",
            "buildkitd has crashed",
            "failed to dial gRPC",
            // The wrapper's line when the daemon died during the build.
            "buildkitd exited during the build",
        ],
    ),
    (
        FailureClass::RegistryUnavailable,
        &[
            "500 internal server error",
            "502 bad gateway",
            "503 service unavailable",
            "504 gateway timeout",
            "connection reset by peer",
            "i/o timeout",
            "tls handshake timeout",
            "unexpected eof",
        ],
    ),
];

/// Permanent causes as BuildKit names them in a failed build's final error line
/// (`error: failed to solve: ...`). Only that line is read for them: a build step may
/// print anything before it.
const FINAL_LINE_PATTERNS: &[(FailureClass, &[&str])] = &[
    (
        FailureClass::RegistryAuthFailed,
        &[
            "401 unauthorized",
            "403 forbidden",
            "failed to authorize",
            "authentication required",
        ],
    ),
    (
        FailureClass::ImageNotFound,
        &["failed to resolve source metadata for"],
    ),
];

/// The class a build output points to, if it names a known cause: one that BuildKit's
/// final error line names, else a transient one anywhere in the output.
pub fn classify_text(text: &str) -> Option<FailureClass> {
    let lower = text.to_ascii_lowercase();
    let matches = |text: &str, needles: &[&str]| needles.iter().any(|n| text.contains(n));
    let final_line = lower
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("error:"));
    if let Some(line) = final_line {
        let found = FINAL_LINE_PATTERNS
            .iter()
            .find(|(class, needles)| {
                // A source that resolves but fails otherwise (a 5xx, a timeout) is not a
                // missing image.
                matches(line, needles)
                    && (*class != FailureClass::ImageNotFound || line.ends_with("not found"))
            })
            .map(|(class, _)| *class);
        if found.is_some() {
            return found;
        }
    }
    PATTERNS
        .iter()
        .find(|(_, needles)| {
            needles
                .iter()
                .any(|n| lower.contains(&n.to_ascii_lowercase()))
        })
        .map(|(class, _)| *class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_is_read_from_the_last_json_line() {
        let message = "some log\n{\"exitCode\":0,\"digest\":\"sha256:ab\",\"buildSeconds\":12,\"pushSeconds\":3,\"errorTail\":\"\"}\n";
        let report = BuildReport::parse(message).unwrap();
        assert_eq!(report.digest, "sha256:ab");
        assert_eq!((report.build_seconds, report.push_seconds), (12, 3));
        assert_eq!(BuildReport::parse("plain log tail"), None);
    }

    fn failed_pod(message: &str, deleted: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "p",
                "deletionTimestamp": deleted.then_some("2026-12-02T00:00:00Z"),
            },
            "status": {"phase": "Failed", "containerStatuses": [{
                "name": "build", "image": "b", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 143, "reason": "Error", "message": message}},
            }]},
        }))
        .unwrap()
    }

    #[test]
    fn a_build_stopped_from_outside_is_retried_and_a_failed_one_is_not() {
        let stopped = "#5 RUN sleep 600\nthe build was stopped by a signal\n";
        let failure = classify_pod(Some(&failed_pod(stopped, false)));
        assert_eq!(failure.class, FailureClass::Evicted, "{failure:?}");
        let failure = classify_pod(Some(&failed_pod("exit code: 137", true)));
        assert_eq!(failure.class, FailureClass::Evicted, "a pod being deleted");
        let failure = classify_pod(Some(&failed_pod("RUN make: exit code: 2", false)));
        assert_eq!(failure.class, FailureClass::BuildError);
    }

    #[test]
    fn output_text_names_the_transient_class() {
        let cases = [
            (
                "ERROR: write /var/lib: no space left on device",
                Some(FailureClass::DiskFull),
            ),
            (
                "failed to push: 429 Too Many Requests",
                Some(FailureClass::RegistryThrottled),
            ),
            (
                "toomanyrequests: You have reached your pull rate limit",
                Some(FailureClass::RegistryThrottled),
            ),
            (
                "unexpected status from HEAD request: 503 Service Unavailable",
                Some(FailureClass::RegistryUnavailable),
            ),
            (
                "read tcp: connection reset by peer",
                Some(FailureClass::RegistryUnavailable),
            ),
            (
                "error: frontend grpc server closed unexpectedly",
                Some(FailureClass::ExecutorCrashed),
            ),
            ("RUN pip install foo: exit code: 1", None),
        ];
        for (text, class) in cases {
            assert_eq!(classify_text(text), class, "{text}");
        }
    }
}
