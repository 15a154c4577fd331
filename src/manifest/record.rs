//! The durable per-node record of a run, kept in the run's manifest (see `manifest`) under
//! the node's Job name. It is what a restarted operator rebuilds its view from: terminal
//! results, and the attempt count and backoff of nodes waiting for a retry.
//!
//! The field names are those of the build scripts' `manifest.jsonl` (`time`, `base_image`,
//! `tags`, `error`, `log_path`, `status`, `skip_reason`, `attempt_count`, `started_at`,
//! `finished_at`, `duration_seconds`, `build_seconds`), plus the operator's own (`phase`,
//! `instance_id`, `digest`, `node`, `failure_class`, `not_before`, `push_seconds`,
//! `cached_steps`), so tools that read the scripts' manifests read these too.
//! `docs/manifest.md` is the reference.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use smallvec::{SmallVec, smallvec};

use crate::job::{BuildReport, Outcome};
use crate::plan::{Node, Phase};
use crate::schedule::{Failure, FailureClass, NodeState, SkipReason};
use crate::text::shorten;

/// Longest error text kept in a record.
pub const MAX_MESSAGE: usize = 1024;

/// Where a node stands, as recorded.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum RecordStatus {
    /// Built and pushed.
    Built,
    /// Not built: the image is already in the registry.
    SkippedRemoteExists,
    /// Not built: a base whose every assembly is already in the registry.
    SkippedNotNeeded,
    /// Failed for good.
    Failed,
    /// A transient failure; another attempt follows (`not_before`).
    Retrying,
}

impl RecordStatus {
    /// The state a record of this status gives its node when the status alone says it
    /// (built or skipped); a failure or a retry needs the record's own fields.
    pub fn settled_state(self) -> Option<NodeState> {
        match self {
            Self::Built => Some(NodeState::Succeeded),
            Self::SkippedRemoteExists => Some(NodeState::Skipped(SkipReason::Exists)),
            Self::SkippedNotNeeded => Some(NodeState::Skipped(SkipReason::NotNeeded)),
            Self::Failed | Self::Retrying => None,
        }
    }

    /// Skipped, for either reason.
    pub fn is_skipped(self) -> bool {
        matches!(self, Self::SkippedRemoteExists | Self::SkippedNotNeeded)
    }
}

/// An image digest, `algorithm:hex`. A SHA-256 digest (nearly all) is kept as its 32
/// bytes, any other as its text; either way it reads and writes as the same text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Digest {
    /// `sha256:` and 64 lowercase hex digits.
    Sha256([u8; 32]),
    /// Any other text.
    Other(Box<str>),
}

impl Digest {
    const SHA256: &'static str = "sha256:";

    /// Whether it is the empty text.
    pub fn is_empty(&self) -> bool {
        matches!(self, Digest::Other(text) if text.is_empty())
    }
}

impl From<&str> for Digest {
    fn from(text: &str) -> Digest {
        let hex = text
            .strip_prefix(Digest::SHA256)
            .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        let mut bytes = [0u8; 32];
        match hex.map(|h| hex::decode_to_slice(h, &mut bytes)) {
            Some(Ok(())) => Digest::Sha256(bytes),
            _ => Digest::Other(text.into()),
        }
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Digest::Sha256(bytes) => write!(f, "{}{}", Digest::SHA256, hex::encode(bytes)),
            Digest::Other(text) => f.write_str(text),
        }
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        Ok(Digest::from(String::deserialize(d)?.as_str()))
    }
}

/// One node's record: one line of the manifest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Record {
    /// When the node reached this state (the record was written).
    pub time: DateTime<Utc>,
    /// builder, base, assembly or postAssembly.
    pub phase: Phase,
    /// The instance (assembly and post-assembly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<Arc<str>>,
    /// The upstream image it is built on (`BASE_IMAGE`): none for the builder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_image: Option<Arc<str>>,
    /// The image references pushed (or found, or to be pushed): one, kept in the record.
    pub tags: SmallVec<[Arc<str>; 1]>,
    /// The state.
    pub status: RecordStatus,
    /// Why it was skipped, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<String>,
    /// The failure class of the last failed attempt (a PascalCase reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_class: Option<String>,
    /// The last lines of the error of the last failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Attempts made (0 for a skipped image).
    pub attempt_count: u32,
    /// Earliest time of the next attempt (`retrying`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// Digest of the pushed image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// The Kubernetes node the last attempt ran on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Arc<str>>,
    /// The last attempt's build pod, `namespace/name`: where the cluster's log store keeps
    /// its log (the pod is deleted with its Job once the result is recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// When the last attempt's Job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When the last attempt's Job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Seconds from `started_at` to `finished_at`: the whole attempt, from the Job's start
    /// (scheduling, pulling, building and pushing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<u64>,
    /// Seconds the build took (the wrapper's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_seconds: Option<u64>,
    /// Seconds spent pushing (the wrapper's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_seconds: Option<u64>,
    /// Build steps BuildKit took from its cache, the registry cache included (the
    /// wrapper's report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_steps: Option<u64>,
}

/// What a finished Job told about its attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Harvest {
    /// How it ended.
    pub outcome: Outcome,
    /// When the Job started.
    pub started: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished: Option<DateTime<Utc>>,
    /// Its pod, `namespace/name`.
    pub pod: Option<String>,
    /// Seconds its pod waited from creation to its container starting.
    pub pod_pending: Option<f64>,
}

impl Record {
    fn new(node: &Node, status: RecordStatus, attempt: u32, at: DateTime<Utc>) -> Record {
        Record {
            time: at,
            phase: node.phase,
            instance_id: node.instance_id.clone(),
            base_image: node.upstream_image.clone(),
            tags: smallvec![node.image.clone()],
            status,
            skip_reason: None,
            failure_class: None,
            error: None,
            attempt_count: attempt,
            not_before: None,
            digest: None,
            node: None,
            log_path: None,
            started_at: None,
            finished_at: None,
            duration_seconds: None,
            build_seconds: None,
            push_seconds: None,
            cached_steps: None,
        }
    }

    /// A skipped node.
    pub fn skipped(node: &Node, reason: SkipReason, at: DateTime<Utc>) -> Record {
        let (status, why) = match reason {
            SkipReason::Exists => (
                RecordStatus::SkippedRemoteExists,
                "the image is already in the registry",
            ),
            SkipReason::NotNeeded => (
                RecordStatus::SkippedNotNeeded,
                "every image built on it is already in the registry",
            ),
        };
        let mut r = Record::new(node, status, 0, at);
        r.skip_reason = Some(why.into());
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
        r.error = Some(shorten(&printable(&failure.message), MAX_MESSAGE));
        r.not_before = not_before;
        r
    }

    /// A node built by attempt `attempt`.
    pub fn built(node: &Node, attempt: u32, at: DateTime<Utc>) -> Record {
        Record::new(node, RecordStatus::Built, attempt, at)
    }

    /// Adds what the finished Job told: where it ran, when, the report.
    pub fn with_job(mut self, harvest: &Harvest) -> Record {
        let (report, node): (Option<&BuildReport>, _) = match &harvest.outcome {
            Outcome::Succeeded { report, node } => (report.as_ref(), node),
            Outcome::Failed { node, .. } => (None, node),
        };
        self.node = node.as_deref().map(Arc::from);
        self.log_path = harvest.pod.clone();
        self.started_at = harvest.started;
        self.finished_at = harvest.finished;
        if let (Some(start), Some(end)) = (harvest.started, harvest.finished) {
            self.duration_seconds = Some((end - start).num_seconds().max(0) as u64);
        }
        if let Some(report) = report {
            self.digest = Some(Digest::from(report.digest.as_str())).filter(|d| !d.is_empty());
            self.build_seconds = Some(report.build_seconds);
            self.push_seconds = Some(report.push_seconds);
            self.cached_steps = Some(report.cached_steps);
        }
        self
    }

    /// The image reference (the first tag).
    pub fn image(&self) -> &str {
        self.tags.first().map_or("", |t| t)
    }

    /// The scheduler's view of this record.
    pub fn state(&self) -> NodeState {
        match self.status {
            RecordStatus::Failed => NodeState::Failed(Box::new(self.failure())),
            RecordStatus::Retrying => NodeState::Waiting {
                attempts: self.attempt_count,
                not_before: self.not_before,
            },
            settled => settled.settled_state().unwrap_or(NodeState::NEW),
        }
    }

    /// The recorded failure (BuildError if the class is unknown to this version).
    pub fn failure(&self) -> Failure {
        let class = self
            .failure_class
            .as_deref()
            .and_then(|c| FailureClass::ALL.into_iter().find(|k| k.as_str() == c))
            .unwrap_or(FailureClass::BuildError);
        Failure::new(class, self.error.clone().unwrap_or_default())
    }
}

/// `text` without control characters other than newlines and tabs (terminal colour codes,
/// carriage returns), which would also take six bytes each in JSON.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
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
    fn digests_read_and_write_as_the_same_text() {
        let sha = format!("sha256:{}", "0123456789abcdef".repeat(4));
        let cases = [
            sha.clone(),
            sha.to_uppercase(),
            sha.replace("sha256:", "sha256:0"),
            format!("sha512:{}", "ab".repeat(64)),
            "sha256:".to_string(),
            format!("{}g", &sha[..sha.len() - 1]),
            String::new(),
        ];
        for text in cases {
            let digest = Digest::from(text.as_str());
            assert_eq!(digest.to_string(), text);
            assert_eq!(digest.is_empty(), text.is_empty());
            let json = serde_json::to_string(&digest).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), digest);
        }
        // Only a SHA-256 digest in its canonical form is kept as bytes.
        assert!(matches!(Digest::from(sha.as_str()), Digest::Sha256(b) if b[0] == 0x01));
        assert!(matches!(
            Digest::from(&*sha.to_uppercase()),
            Digest::Other(_)
        ));
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
                NodeState::Failed(Box::new(f.clone())),
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
    fn records_speak_the_scripts_field_names() {
        let at = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let mut n = node();
        n.upstream_image = Some("docker.io/swebench/x:latest".into());
        let failure = Failure::new(FailureClass::BuildError, "exit code: 2");
        let harvest = Harvest {
            outcome: Outcome::Failed {
                failure: failure.clone(),
                node: Some("big-disk-1".into()),
            },
            started: Some(at),
            finished: Some(at + chrono::Duration::seconds(75)),
            pod: Some("ns/run-asm-a-a-1-0123456789-x1".into()),
            pod_pending: None,
        };
        let record = Record::failed(&n, &failure, 2, None, at).with_job(&harvest);
        let json = serde_json::to_value(&record).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        for key in [
            "time",
            "base_image",
            "tags",
            "error",
            "log_path",
            "status",
            "attempt_count",
            "started_at",
            "finished_at",
            "duration_seconds",
            "phase",
            "instance_id",
            "node",
            "failure_class",
        ] {
            assert!(keys.contains(&key), "{key} missing from {json}");
        }
        assert_eq!(json["status"], "failed");
        assert_eq!(json["duration_seconds"], 75);
        assert_eq!(json["tags"][0], "r.io/x:1");
        assert_eq!(json["base_image"], "docker.io/swebench/x:latest");
        let skipped = Record::skipped(&n, SkipReason::Exists, at);
        let json = serde_json::to_value(&skipped).unwrap();
        assert_eq!(json["status"], "skipped_remote_exists");
        assert_eq!(json["attempt_count"], 0);
        assert!(json["skip_reason"].as_str().unwrap().contains("registry"));
    }
}
