//! Names every layer shares: the DNS-1123 label check, the labels and annotations the
//! operator puts on what it creates, the label value naming a run, and the hex digests
//! names are made from. A leaf: it uses nothing else of the crate.

use sha2::{Digest, Sha256};

/// Longest Kubernetes label value, and so longest Job name (a Job's name is copied into
/// its pods' labels).
pub const MAX_NAME: usize = 63;

/// Value of `app.kubernetes.io/managed-by` on everything the operator creates.
pub const MANAGER: &str = "imagebuild-operator";
/// Label: the run a Job belongs to (its name, hashed when longer than a label value).
pub const LABEL_RUN: &str = "imagebuild.dev/run";
/// Label: the uid of the run a Job belongs to; what the operator selects on.
pub const LABEL_RUN_UID: &str = "imagebuild.dev/run-uid";
/// Label: on the pod of a failed build kept for its log, the name of the build's Job
/// (the Job is gone; the pod belongs to the run, and goes with it).
pub const LABEL_KEPT_LOG: &str = "imagebuild.dev/kept-log";
/// Label: the node's phase.
pub const LABEL_PHASE: &str = "imagebuild.dev/phase";
/// Label: a short hash of the node's instance (or upstream image, or `builder`).
pub const LABEL_NODE: &str = "imagebuild.dev/node";
/// Annotation: the instance id of assembly and post-assembly nodes.
pub const ANNOTATION_INSTANCE: &str = "imagebuild.dev/instance-id";
/// Annotation: the 1-based attempt number.
pub const ANNOTATION_ATTEMPT: &str = "imagebuild.dev/attempt";
/// Annotation: the image reference the Job pushes.
pub const ANNOTATION_IMAGE: &str = "imagebuild.dev/image";
/// On a Job, the identity of the operator that created it (with leader election).
pub const ANNOTATION_DISPATCHED_BY: &str = "imagebuild.dev/dispatched-by";

/// Whether `name` is a valid DNS-1123 label.
pub fn is_dns1123_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A label value naming the run: the name itself when it fits (63 characters), else its
/// head and a hash.
pub fn run_label(run_name: &str) -> String {
    if is_dns1123_label(run_name) {
        return run_name.to_string();
    }
    let head: String = run_name.chars().take(52).collect();
    let head = head.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{head}-{}", &sha256_hex(run_name)[..10])
}

/// The name of an object of run `run`: `<run>-<suffix>`, or, where that would pass the 253
/// characters an object name may have, the run name cut short and a hash of it.
pub fn run_object(run: &str, suffix: &str) -> String {
    const MAX_OBJECT_NAME: usize = 253;
    let name = format!("{run}-{suffix}");
    if name.len() <= MAX_OBJECT_NAME {
        return name;
    }
    let hash = &sha256_hex(run)[..10];
    // The run name is a DNS subdomain: ASCII, so any byte index is a character boundary.
    let room = MAX_OBJECT_NAME.saturating_sub(format!("--{hash}-{suffix}").len());
    let head = run.get(..room).unwrap_or(run).trim_end_matches(['-', '.']);
    format!("{head}-{hash}-{suffix}")
}

/// The lower-case hex SHA-256 of `text`.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_label_is_the_name_when_it_fits_else_head_and_hash() {
        assert_eq!(run_label("swebench-verified"), "swebench-verified");
        let long = "r".repeat(80);
        let label = run_label(&long);
        assert!(is_dns1123_label(&label), "{label}");
        assert!(label.starts_with(&"r".repeat(52)));
        assert_ne!(
            run_label(&"r".repeat(81)),
            label,
            "the hash tells them apart"
        );
    }
}
