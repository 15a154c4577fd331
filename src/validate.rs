//! Checks of a run's spec that the CRD schema cannot express (or that must also hold for
//! specs read from a file, which never pass the API server), and the parsed settings.

use std::time::Duration;

use regex::Regex;

use crate::api::{CacheMode, ImageBuildRunSpec, PhaseSpec};
use crate::template::BUILTIN_VARIABLES;
use crate::text::truncate;

/// A spec value that is out of range or malformed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The offending field, e.g. `spec.maxWorkers`.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// The run's execution settings with durations parsed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Build Jobs in flight at once.
    pub max_workers: u32,
    /// Total attempts per image.
    pub attempts: u32,
    /// Wait before the second attempt.
    pub backoff_initial: Duration,
    /// Longest wait between attempts.
    pub backoff_max: Duration,
    /// Longest one build may run.
    pub build_timeout: Duration,
    /// Longest a pod may wait to be scheduled.
    pub pending_timeout: Duration,
    /// Longest the whole run may take.
    pub run_timeout: Duration,
}

/// The bounds of the duration fields, as the CRD's rules have them: every deadline and
/// backoff the operator computes from them fits its types with room to spare.
const BACKOFF_LIMIT: Duration = Duration::from_secs(24 * 3600);
const BUILD_LIMIT: Duration = Duration::from_secs(168 * 3600);
const PENDING_LIMIT: Duration = Duration::from_secs(168 * 3600);
const RUN_LIMIT: Duration = Duration::from_secs(720 * 3600);

/// Validates everything in the spec that does not need the instance list.
pub fn validate(spec: &ImageBuildRunSpec) -> Result<Settings, SpecError> {
    if !(1..=1000).contains(&spec.max_workers) {
        return Err(err(
            "spec.maxWorkers",
            format!("must be 1..1000, got {}", spec.max_workers),
        ));
    }
    if !(1..=20).contains(&spec.retry.attempts) {
        return Err(err(
            "spec.retry.attempts",
            format!("must be 1..20, got {}", spec.retry.attempts),
        ));
    }
    let settings = Settings {
        max_workers: spec.max_workers,
        attempts: spec.retry.attempts,
        backoff_initial: bounded(
            "spec.retry.backoff.initial",
            &spec.retry.backoff.initial,
            BACKOFF_LIMIT,
        )?,
        backoff_max: bounded(
            "spec.retry.backoff.max",
            &spec.retry.backoff.max,
            BACKOFF_LIMIT,
        )?,
        build_timeout: bounded("spec.timeouts.build", &spec.timeouts.build, BUILD_LIMIT)?,
        pending_timeout: bounded(
            "spec.timeouts.pending",
            &spec.timeouts.pending,
            PENDING_LIMIT,
        )?,
        run_timeout: bounded("spec.timeouts.run", &spec.timeouts.run, RUN_LIMIT)?,
    };
    if settings.build_timeout < Duration::from_secs(1) {
        return Err(err("spec.timeouts.build", "must be at least 1s"));
    }
    if spec.instances.limit.is_some_and(|n| n > 1_000_000) {
        return Err(err("spec.instances.limit", "must be at most 1000000"));
    }
    let placement = &spec.placement;
    for (field, value) in [
        (
            "spec.placement.ephemeralStorage",
            &placement.ephemeral_storage,
        ),
        ("spec.placement.cpu", &placement.cpu),
        ("spec.placement.memory", &placement.memory),
    ] {
        quantity(field, &value.0)?;
    }
    executor_image(&spec.executor.image)?;
    if settings.backoff_initial > settings.backoff_max {
        return Err(err(
            "spec.retry.backoff",
            "initial must not be longer than max",
        ));
    }
    for key in spec.vars.keys() {
        if BUILTIN_VARIABLES.contains(&key.as_str()) {
            return Err(err(
                &format!("spec.vars.{key}"),
                "shadows a built-in template variable",
            ));
        }
        if !is_identifier(key) {
            return Err(err(
                &format!("spec.vars.{key}"),
                "must be an identifier (letters, digits, _; not starting with a digit) so templates can name it",
            ));
        }
    }
    for (name, phase) in [
        ("builder", &spec.builder),
        ("base", &spec.base),
        ("assembly", &spec.assembly),
    ] {
        phase_spec(name, phase)?;
    }
    if let Some(post) = &spec.post_assembly {
        Regex::new(&post.match_).map_err(|e| {
            err(
                "spec.postAssembly.match",
                format!("not a regular expression: {e}"),
            )
        })?;
    }
    for key in spec.placement.pod_annotations.keys() {
        if let Err(problem) = annotation_key(key) {
            return Err(err(
                &format!("spec.placement.podAnnotations.{key}"),
                problem,
            ));
        }
    }
    if spec.instances.list.as_ref().is_some_and(Vec::is_empty) {
        return Err(err(
            "spec.instances.list",
            "must name at least one instance",
        ));
    }
    Ok(settings)
}

fn phase_spec(name: &str, phase: &PhaseSpec) -> Result<(), SpecError> {
    let context = &phase.context;
    let sources = [
        context.git.is_some(),
        context.config_map.is_some(),
        context.inline.is_some(),
    ];
    if sources.iter().filter(|set| **set).count() != 1 {
        return Err(err(
            &format!("spec.{name}.context"),
            "must set exactly one of git, configMap or inline",
        ));
    }
    if phase.cache != CacheMode::Off && phase.cache_ref.is_none() {
        return Err(err(
            &format!("spec.{name}.cacheRef"),
            "is required when cache is min or max",
        ));
    }
    Ok(())
}

/// A duration of at most `limit`.
fn bounded(field: &str, text: &str, limit: Duration) -> Result<Duration, SpecError> {
    let parsed = duration(field, text)?;
    if parsed > limit {
        return Err(err(
            field,
            format!(
                "`{}` is longer than the {} allowed",
                truncate(text, 64),
                humantime::format_duration(limit)
            ),
        ));
    }
    Ok(parsed)
}

/// A Kubernetes resource quantity above zero (`2`, `500m`, `1.5`, `8Gi`, `1e3`).
fn quantity(field: &str, text: &str) -> Result<(), SpecError> {
    static QUANTITY: std::sync::LazyLock<Option<Regex>> = std::sync::LazyLock::new(|| {
        Regex::new(r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
            .ok()
    });
    let matches = QUANTITY.as_ref().is_some_and(|re| re.is_match(text));
    let positive = text.chars().any(|c| matches!(c, '1'..='9'))
        && !text
            .trim_start_matches(['+', '0', '.'])
            .starts_with(|c: char| !c.is_ascii_digit());
    if text.len() > 64 || !matches || !positive {
        return Err(err(
            field,
            format!(
                "`{}` is not a quantity above zero like 2, 500m or 8Gi",
                truncate(text, 64)
            ),
        ));
    }
    Ok(())
}

/// The executor image: a pullable reference (the kubelet refuses anything else only when
/// the pod starts, where it would fail every build alike).
fn executor_image(image: &str) -> Result<(), SpecError> {
    crate::reference::parse(image).map(|_| ()).map_err(|e| {
        err(
            "spec.executor.image",
            format!("`{}` is not an image reference: {e}", truncate(image, 128)),
        )
    })
}

fn duration(field: &str, text: &str) -> Result<Duration, SpecError> {
    let parsed = humantime::parse_duration(text).map_err(|e| {
        err(
            field,
            format!(
                "`{}` is not a duration like 30s, 15m or 1h30m: {e}",
                truncate(text, 64)
            ),
        )
    })?;
    if parsed.is_zero() {
        return Err(err(field, "must be longer than zero"));
    }
    Ok(parsed)
}

/// Checks an annotation key as the API server does (an optional DNS-subdomain prefix and
/// `/`, then a name of at most 63 characters), and keeps the operator's own prefix.
fn annotation_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err("the name part must be 1-63 characters: letters, digits, '-', '_' or '.', starting and ending with a letter or digit".into());
    }
    if let Some(prefix) = prefix {
        let prefix_ok = (1..=253).contains(&prefix.len())
            && prefix.split('.').all(crate::names::is_dns1123_label);
        if !prefix_ok {
            return Err(
                "the prefix must be a DNS subdomain (lower-case labels separated by dots)".into(),
            );
        }
        if prefix == "imagebuild.dev" {
            return Err(
                "the imagebuild.dev prefix is reserved for the operator's own annotations".into(),
            );
        }
    }
    Ok(())
}

fn is_identifier(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_go_style() {
        assert_eq!(duration("f", "1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(duration("f", "2000s").unwrap(), Duration::from_secs(2000));
        let e = duration("spec.timeouts.run", "10 hours please").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("spec.timeouts.run: `10 hours please` is not a duration"),
            "{e}"
        );
        assert!(duration("f", "0s").is_err());
        // Far past any bound, and past what the types hold: an error, never a panic.
        for text in [
            "99999h99999h99999h99999h",
            "18446744073709551615s",
            "9999999999999999999999h",
        ] {
            let e = bounded("spec.timeouts.run", text, RUN_LIMIT).unwrap_err();
            assert_eq!(e.field, "spec.timeouts.run", "{text}: {e}");
        }
        assert_eq!(
            bounded("f", "720h", RUN_LIMIT).unwrap(),
            Duration::from_secs(720 * 3600)
        );
        assert!(bounded("f", "720h1s", RUN_LIMIT).is_err());
    }

    #[test]
    fn quantities() {
        for ok in ["2", "500m", "1.5", "8Gi", "60Gi", "1e3", "0.5", "+1", ".5"] {
            quantity("q", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "", "0", "0Gi", "-1", "2 Gi", "8GB", "lots", "1.2.3", "0.0", "1Zi", "Gi",
        ] {
            let e = quantity("spec.placement.cpu", bad).unwrap_err();
            assert_eq!(e.field, "spec.placement.cpu", "{bad}");
        }
    }

    #[test]
    fn messages_quote_values_shortened() {
        let long = "9".repeat(10_000) + "h";
        let e = duration("spec.timeouts.run", &long).unwrap_err();
        assert!(e.to_string().len() < 400, "{}", e.to_string().len());
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("sdkSha"));
        assert!(is_identifier("_x1"));
        assert!(!is_identifier("sdk-sha"));
        assert!(!is_identifier("1x"));
    }
}
