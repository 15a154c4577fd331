//! Deterministic Job names: DNS-1123 labels of at most 63 characters derived only from the
//! run name, the phase and the node's key, so a restarted operator finds the same Jobs
//! whatever order the instances arrive in.

use sha2::{Digest, Sha256};

use crate::names::MAX_NAME;

const HASH_LEN: usize = 10;
const RUN_PART_MAX: usize = 20;

/// The Job name of a node: `<run>-<phase>-<slug>-<hash>`. The slug is for people; the hash
/// over the full (run, phase, key) keeps names distinct whatever truncation cuts.
pub fn job_name(run: &str, phase_abbrev: &str, slug: &str, key: &str) -> String {
    let mut hasher = Sha256::new();
    for part in [run, phase_abbrev, key] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let hash = hex::encode(hasher.finalize());
    let run_part = truncate(&sanitize(run), RUN_PART_MAX);
    let prefix = format!("{run_part}-{phase_abbrev}");
    let room = MAX_NAME - prefix.len() - HASH_LEN - 2;
    let slug = keep_tail(&sanitize(slug), room);
    let name = if slug.is_empty() {
        format!("{prefix}-{}", &hash[..HASH_LEN])
    } else {
        format!("{prefix}-{slug}-{}", &hash[..HASH_LEN])
    };
    // A run name that sanitizes to nothing still yields a valid label.
    name.trim_start_matches('-').to_string()
}

/// Lower-case alphanumerics and single dashes, no dash at either end.
fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

fn truncate(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string()
}

/// Keeps the end of `text`, where keys differ (`...django-11099`).
fn keep_tail(text: &str, max: usize) -> String {
    let skip = text.chars().count().saturating_sub(max);
    text.chars()
        .skip(skip)
        .collect::<String>()
        .trim_start_matches('-')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::is_dns1123_label;
    use proptest::prelude::*;

    #[test]
    fn readable_and_stable() {
        let name = job_name(
            "swebench-verified",
            "asm",
            "django__django-11099",
            "django__django-11099",
        );
        assert!(
            name.starts_with("swebench-verified-asm-django-django-11099-"),
            "{name}"
        );
        assert_eq!(
            name,
            job_name(
                "swebench-verified",
                "asm",
                "django__django-11099",
                "django__django-11099"
            )
        );
        assert_ne!(
            name,
            job_name(
                "swebench-verified",
                "asm",
                "django__django-11098",
                "django__django-11098"
            )
        );
        assert_ne!(
            name,
            job_name(
                "swebench-verified",
                "base",
                "django__django-11099",
                "django__django-11099"
            )
        );
    }

    #[test]
    fn long_keys_differ_after_truncation() {
        let a = "sweb.eval.x86_64.scikit-learn_1776_scikit-learn-very-long-suffix-aaaaaaaaaaaaa-1";
        let b = "sweb.eval.x86_64.scikit-learn_1776_scikit-learn-very-long-suffix-aaaaaaaaaaaaa-2";
        let (na, nb) = (job_name("run", "base", a, a), job_name("run", "base", b, b));
        assert_ne!(na, nb);
        assert!(na.len() <= MAX_NAME && nb.len() <= MAX_NAME);
    }

    proptest! {
        #[test]
        fn always_a_dns_label(run in "[a-z0-9][a-z0-9.-]{0,80}", key in ".{0,200}", phase in "(bld|base|asm|post)") {
            let name = job_name(&run, &phase, &key, &key);
            prop_assert!(is_dns1123_label(&name), "{name}");
        }
    }
}
