//! The durable per-node record of a run, kept in the run's manifest (see `manifest`) under
//! the node's Job name. It is what a restarted operator rebuilds its view from: terminal
//! results, and the attempt count and backoff of nodes waiting for a retry.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::job::{BuildReport, Outcome};
use crate::plan::Node;
use crate::schedule::{Failure, FailureClass, NodeState, SkipReason};

/// Longest error text kept in a record.
pub const MAX_MESSAGE: usize = 1024;

/// Where a node stands, as recorded.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RecordStatus {
    /// Built and pushed.
    Built,
    /// Not built (exists, or not needed).
    Skipped,
    /// Failed for good.
    Failed,
    /// A transient failure; another attempt follows.
    Retrying,
}

/// One node's record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// builder, base, assembly or postAssembly.
    pub phase: String,
    /// The instance (assembly and post-assembly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The image reference.
    pub image: String,
    /// The state.
    pub status: RecordStatus,
    /// Why it was skipped: `Exists` or `NotNeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<String>,
    /// The failure class of the last failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_class: Option<String>,
    /// The last lines of the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Attempts made (0 for a skipped image).
    pub attempt: u32,
    /// Earliest time of the next attempt (`retrying`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// Digest of the pushed image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The Kubernetes node the last attempt ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When the last attempt's Job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When the node reached this state.
    pub finished_at: DateTime<Utc>,
    /// Seconds the build took (wrapper report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_seconds: Option<u64>,
    /// Seconds spent pushing (wrapper report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_seconds: Option<u64>,
}

impl Record {
    fn new(node: &Node, status: RecordStatus, attempt: u32, at: DateTime<Utc>) -> Record {
        Record {
            phase: node.phase.as_str().into(),
            instance_id: node.instance_id.clone(),
            image: node.image.clone(),
            status,
            skip_reason: None,
            failure_class: None,
            message: None,
            attempt,
            not_before: None,
            digest: None,
            node: None,
            started_at: None,
            finished_at: at,
            build_seconds: None,
            push_seconds: None,
        }
    }

    /// A skipped node.
    pub fn skipped(node: &Node, reason: SkipReason, at: DateTime<Utc>) -> Record {
        let mut r = Record::new(node, RecordStatus::Skipped, 0, at);
        r.skip_reason = Some(match reason {
            SkipReason::Exists => "Exists".into(),
            SkipReason::NotNeeded => "NotNeeded".into(),
        });
        r
    }

    /// A node failed for good, or waiting to retry (`not_before`).
    pub fn failed(
        node: &Node,
        failure: &Failure,
        attempt: u32,
        not_before: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    ) -> Record {
        let status = if not_before.is_some() {
            RecordStatus::Retrying
        } else {
            RecordStatus::Failed
        };
        let mut r = Record::new(node, status, attempt, at);
        r.failure_class = Some(failure.class.as_str().into());
        r.message = Some(shorten(&failure.message, MAX_MESSAGE));
        r.not_before = not_before;
        r
    }

    /// A node built by attempt `attempt`.
    pub fn built(node: &Node, attempt: u32, at: DateTime<Utc>) -> Record {
        Record::new(node, RecordStatus::Built, attempt, at)
    }

    /// Adds what the finished Job told: where it ran, when it started, the report.
    pub fn with_job(mut self, outcome: &Outcome, started_at: Option<DateTime<Utc>>) -> Record {
        let (report, node): (Option<&BuildReport>, _) = match outcome {
            Outcome::Succeeded { report, node } => (report.as_ref(), node),
            Outcome::Failed { node, .. } => (None, node),
        };
        self.node = node.clone();
        self.started_at = started_at;
        if let Some(report) = report {
            self.digest = Some(report.digest.clone()).filter(|d| !d.is_empty());
            self.build_seconds = Some(report.build_seconds);
            self.push_seconds = Some(report.push_seconds);
        }
        self
    }

    /// The scheduler's view of this record.
    pub fn state(&self) -> NodeState {
        match self.status {
            RecordStatus::Built => NodeState::Succeeded,
            RecordStatus::Skipped => NodeState::Skipped(match self.skip_reason.as_deref() {
                Some("NotNeeded") => SkipReason::NotNeeded,
                _ => SkipReason::Exists,
            }),
            RecordStatus::Failed => NodeState::Failed(self.failure()),
            RecordStatus::Retrying => NodeState::Waiting {
                attempts: self.attempt,
                not_before: self.not_before,
            },
        }
    }

    /// The recorded failure (BuildError if the class is unknown to this version).
    pub fn failure(&self) -> Failure {
        let class = self
            .failure_class
            .as_deref()
            .and_then(|c| FailureClass::ALL.into_iter().find(|k| k.as_str() == c))
            .unwrap_or(FailureClass::BuildError);
        Failure::new(class, self.message.clone().unwrap_or_default())
    }
}

/// `text` cut to at most `max` bytes (on a character boundary), keeping the end, where
/// build errors are.
pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max + 3;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// `text` cut to at most `max` bytes (plus `...`) on a character boundary, keeping its
/// start; [`shorten`] keeps the end instead.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Phase;

    fn node() -> Node {
        Node {
            phase: Phase::Assembly,
            instance_id: Some("a__a-1".into()),
            upstream_image: None,
            image: "r.io/x:1".into(),
            build_args: Default::default(),
            git_revision: None,
            cache_ref: None,
            job_name: "run-asm-a-a-1-0123456789".into(),
            deps: vec![],
        }
    }

    #[test]
    fn records_round_trip_to_scheduler_states() {
        let now = Utc::now();
        let f = Failure::new(FailureClass::DiskFull, "no space left on device");
        let cases = [
            (Record::built(&node(), 1, now), NodeState::Succeeded),
            (
                Record::skipped(&node(), SkipReason::NotNeeded, now),
                NodeState::Skipped(SkipReason::NotNeeded),
            ),
            (
                Record::failed(&node(), &f, 3, None, now),
                NodeState::Failed(f.clone()),
            ),
            (
                Record::failed(&node(), &f, 1, Some(now), now),
                NodeState::Waiting {
                    attempts: 1,
                    not_before: Some(now),
                },
            ),
        ];
        for (record, state) in cases {
            let json = serde_json::to_string(&record).unwrap();
            let back: Record = serde_json::from_str(&json).unwrap();
            assert_eq!(back.state(), state, "{json}");
        }
    }

    #[test]
    fn long_messages_keep_their_end() {
        let text = format!("{}THE END", "x".repeat(2000));
        let short = shorten(&text, 100);
        assert_eq!(short.len(), 100);
        assert!(short.ends_with("THE END") && short.starts_with("..."));
    }
}
