//! The release artefacts agree with the crate: the chart's appVersion is the crate's
//! version (the image tag the chart defaults to), the Dockerfile builds with at least the
//! crate's rust-version and ships the operator binary as a non-root user, and the image
//! build sees only what it needs.

fn cargo_field(key: &str) -> String {
    let manifest = std::fs::read_to_string("Cargo.toml").unwrap();
    manifest
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or_else(|| panic!("Cargo.toml has no {key}"))
        .to_string()
}

#[test]
fn the_charts_app_version_is_the_crates() {
    let chart = std::fs::read_to_string("charts/imagebuild-operator/Chart.yaml").unwrap();
    let chart: serde_yaml_ng::Value = serde_yaml_ng::from_str(&chart).unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(cargo_field("version").as_str())
    );
}

#[test]
fn the_dockerfile_builds_the_operator_and_runs_it_unprivileged() {
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    let rust = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM docker.io/library/rust:"))
        .and_then(|rest| rest.split('-').next())
        .expect("a rust build stage");
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        version(rust) >= version(&cargo_field("rust-version")),
        "the build stage's Rust {rust} is older than the crate's rust-version"
    );
    assert!(dockerfile.contains("--bin imagebuild-operator"));
    assert!(dockerfile.contains("USER 65532:65532"));
    let last_from = dockerfile
        .lines()
        .rfind(|l| l.starts_with("FROM "))
        .unwrap();
    assert!(
        last_from.contains("distroless") && last_from.contains("nonroot"),
        "{last_from}"
    );
    // The chart runs it as that user, read-only.
    let values = std::fs::read_to_string("charts/imagebuild-operator/values.yaml").unwrap();
    assert!(values.contains("runAsUser: 65532") && values.contains("readOnlyRootFilesystem: true"));

    let ignore = std::fs::read_to_string(".dockerignore").unwrap();
    let kept: Vec<&str> = ignore.lines().filter_map(|l| l.strip_prefix('!')).collect();
    assert!(
        ignore.lines().any(|l| l == "*"),
        "everything else is ignored"
    );
    for copied in dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
    {
        for source in copied.split_whitespace().rev().skip(1) {
            let source = source.trim_end_matches('/');
            assert!(
                kept.iter().any(|k| k.trim_end_matches('/') == source),
                "{source} is copied but .dockerignore leaves it out"
            );
        }
    }
}

#[test]
fn the_default_executor_is_the_buildkit_version_the_local_environment_tests() {
    let pins = std::fs::read_to_string("e2e/versions.env").unwrap();
    let buildkit = pins
        .lines()
        .find_map(|l| l.strip_prefix("BUILDKIT_VERSION="))
        .expect("BUILDKIT_VERSION pinned");
    assert_eq!(
        imagebuild_operator::api::ExecutorSpec::default().image,
        format!("docker.io/moby/buildkit:{buildkit}-rootless")
    );
}
