//! The release artefacts agree with the crate: the chart's version and appVersion are the
//! crate's version (the image tag the chart defaults to), the Dockerfile builds with at least
//! the crate's rust-version and ships the operator binary as a non-root user, and the image
//! build sees only what it needs. The release workflow publishes what the chart, the krew
//! manifest and docs/install.md name: the image the chart defaults to, the chart in an OCI
//! registry, and the kubectl plugin's archives, one for each platform of the krew manifest.

use std::collections::BTreeSet;

use serde_yaml_ng::Value;

const RELEASE_WORKFLOW: &str = ".github/workflows/release.yml";
const KREW_MANIFEST: &str = "plugins/krew/imagebuild.yaml";
const CHART: &str = "charts/imagebuild-operator";
/// The kubectl plugin: a bin of this crate, the command in its archives.
const PLUGIN: &str = "kubectl-imagebuild";

fn cargo_field(key: &str) -> String {
    let manifest = std::fs::read_to_string("Cargo.toml").unwrap();
    manifest
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or_else(|| panic!("Cargo.toml has no {key}"))
        .to_string()
}

/// The names of the crate's `[[bin]]` targets.
fn cargo_bins() -> Vec<String> {
    let manifest = std::fs::read_to_string("Cargo.toml").unwrap();
    let mut bins = vec![];
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(name) = line.strip_prefix("name = \"") {
            bins.push(name.trim_end_matches('"').to_string());
        }
    }
    bins
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value:?}"))
}

#[test]
fn the_charts_version_and_app_version_are_the_crates() {
    let chart = yaml(&format!("{CHART}/Chart.yaml"));
    let version = cargo_field("version");
    assert_eq!(chart["version"].as_str(), Some(version.as_str()));
    assert_eq!(chart["appVersion"].as_str(), Some(version.as_str()));
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

/// The release workflow, with what the tests below ask of it.
struct Release(Value);

impl Release {
    fn load() -> Self {
        Release(yaml(RELEASE_WORKFLOW))
    }

    /// A workflow-level `env` value.
    fn env(&self, key: &str) -> &str {
        str_of(&self.0["env"][key], &format!("env.{key}"))
    }

    fn jobs(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0["jobs"]
            .as_mapping()
            .expect("jobs")
            .iter()
            .map(|(name, job)| (name.as_str().unwrap(), job))
    }

    fn job(&self, name: &str) -> &Value {
        let job = &self.0["jobs"][name];
        assert!(job.is_mapping(), "{RELEASE_WORKFLOW} has no job {name}");
        job
    }
}

fn steps(job: &Value) -> &[Value] {
    job["steps"].as_sequence().expect("steps")
}

/// The steps that use `action` (any version).
fn uses<'a>(job: &'a Value, action: &str) -> Vec<&'a Value> {
    steps(job)
        .iter()
        .filter(|s| {
            s["uses"]
                .as_str()
                .and_then(|u| u.split_once('@'))
                .is_some_and(|(name, _)| name == action)
        })
        .collect()
}

/// Every `run` script of a job, one after the other.
fn scripts(job: &Value) -> String {
    steps(job)
        .iter()
        .filter_map(|s| s["run"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

fn needs(job: &Value) -> Vec<&str> {
    match &job["needs"] {
        Value::String(one) => vec![one.as_str()],
        Value::Sequence(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    }
}

fn can_write(job: &Value, scope: &str) -> bool {
    job["permissions"][scope].as_str() == Some("write")
}

/// The archive of the kubectl plugin for a Rust target triple, as the release names it.
fn plugin_archive(target: &str) -> String {
    format!("{PLUGIN}-{target}.tar.gz")
}

/// The krew (GOOS-style) os and arch of a Rust target triple.
fn krew_platform(target: &str) -> (&'static str, &'static str) {
    let arch = match target.split('-').next().unwrap() {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("{target}: no krew arch for {other}"),
    };
    let os = if target.contains("-linux-") {
        "linux"
    } else if target.ends_with("-apple-darwin") {
        "darwin"
    } else if target.contains("-windows-") {
        "windows"
    } else {
        panic!("{target}: no krew os")
    };
    (os, arch)
}

/// The jobs that build the kubectl plugin, and the targets each builds, from its matrix.
fn plugin_builds(release: &Release) -> Vec<(&str, &Value, Vec<&str>)> {
    release
        .jobs()
        .filter(|(_, job)| scripts(job).contains(&format!("--bin {PLUGIN}")))
        .map(|(name, job)| {
            let targets = job["strategy"]["matrix"]["include"]
                .as_sequence()
                .unwrap_or_else(|| panic!("job {name} has no matrix.include"))
                .iter()
                .map(|row| str_of(&row["target"], "matrix target"))
                .collect();
            (name, job, targets)
        })
        .collect()
}

/// Every target the release builds the plugin for.
fn plugin_targets(release: &Release) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for (name, _, targets) in plugin_builds(release) {
        for target in targets {
            assert!(
                all.insert(target.to_string()),
                "{target} built twice ({name})"
            );
        }
    }
    all
}

#[test]
fn the_release_workflow_runs_on_version_tags_and_checks_the_version_everywhere() {
    let release = Release::load();
    let on = &release.0["on"];
    assert!(on.is_mapping(), "`on` read as {on:?}");
    let tags: Vec<&str> = on["push"]["tags"]
        .as_sequence()
        .expect("on.push.tags")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(tags, ["v*"]);
    assert!(on.get("workflow_dispatch").is_some());
    assert_eq!(release.env("CHART"), CHART);
    assert_eq!(release.env("KREW_MANIFEST"), KREW_MANIFEST);

    // One job reads the version from Cargo.toml and checks the tag, the chart and the krew
    // manifest against it; every other job waits for it.
    let version = release.job("version");
    let script = scripts(version);
    for check in [
        "cargo metadata",
        r#"check "the tag" "$GITHUB_REF_NAME" "v$version""#,
        r#"yq '.version' "$CHART/Chart.yaml")" "$version""#,
        r#"yq '.appVersion' "$CHART/Chart.yaml")" "$version""#,
        r#"yq '.spec.version' "$KREW_MANIFEST")" "v$version""#,
        r#"yq '.image.repository' "$CHART/values.yaml")" "$IMAGE""#,
    ] {
        assert!(script.contains(check), "the version job lacks {check}");
    }
    for (name, job) in release.jobs().filter(|(name, _)| *name != "version") {
        assert!(
            needs(job).contains(&"version"),
            "job {name} does not wait for the checks"
        );
    }
    // Actions pinned to a major version, as in ci.yml.
    for (name, job) in release.jobs() {
        for step in steps(job) {
            if let Some(action) = step["uses"].as_str() {
                let (_, pin) = action.split_once('@').expect("a version");
                let major = pin
                    .strip_prefix('v')
                    .is_some_and(|m| m.parse::<u32>().is_ok());
                assert!(
                    major || pin == "stable",
                    "job {name}: {action} is not pinned to a major"
                );
            }
        }
    }
}

#[test]
fn the_release_workflow_pushes_the_image_the_chart_defaults_to() {
    let release = Release::load();
    let values = yaml(&format!("{CHART}/values.yaml"));
    let image = release.env("IMAGE");
    assert_eq!(values["image"]["repository"].as_str(), Some(image));
    // The chart's default tag is its appVersion, the crate's version: the tag pushed.
    assert_eq!(values["image"]["tag"].as_str(), Some(""));

    let job = release.job("image");
    assert!(can_write(job, "packages"));
    for action in ["docker/setup-qemu-action", "docker/setup-buildx-action"] {
        assert_eq!(uses(job, action).len(), 1, "{action}");
    }
    let login = uses(job, "docker/login-action");
    assert_eq!(login.len(), 1);
    assert_eq!(
        login[0]["with"]["registry"].as_str(),
        image.split('/').next()
    );
    assert_eq!(
        login[0]["with"]["password"].as_str(),
        Some("${{ secrets.GITHUB_TOKEN }}")
    );
    let build = uses(job, "docker/build-push-action");
    assert_eq!(build.len(), 1);
    let with = &build[0]["with"];
    assert_eq!(
        with["tags"].as_str(),
        Some("${{ env.IMAGE }}:${{ needs.version.outputs.version }}")
    );
    assert_eq!(
        with["push"].as_str(),
        Some("${{ needs.version.outputs.publish == 'true' }}")
    );
    let platforms: BTreeSet<&str> = str_of(&with["platforms"], "platforms")
        .split(',')
        .map(str::trim)
        .collect();
    assert_eq!(platforms, BTreeSet::from(["linux/amd64", "linux/arm64"]));
}

#[test]
fn the_release_workflow_pushes_the_chart_to_an_oci_registry() {
    let release = Release::load();
    let registry = release.env("CHART_REGISTRY");
    let host = registry
        .strip_prefix("oci://")
        .unwrap_or_else(|| panic!("{registry} is not an OCI registry"))
        .split('/')
        .next()
        .unwrap();
    // The same registry as the image: one token logs in to both.
    assert_eq!(Some(host), release.env("IMAGE").split('/').next());

    let job = release.job("chart");
    assert!(can_write(job, "packages"));
    let script = scripts(job);
    for command in [
        r#"helm package "$CHART""#,
        r#"helm registry login "${registry%%/*}""#,
        r#"helm push dist/imagebuild-operator-*.tgz "$CHART_REGISTRY""#,
    ] {
        assert!(script.contains(command), "the chart job lacks {command}");
    }
    let chart = yaml(&format!("{CHART}/Chart.yaml"));
    assert_eq!(chart["name"].as_str(), Some("imagebuild-operator"));

    // docs/install.md installs what is pushed.
    let docs = std::fs::read_to_string("docs/install.md").unwrap();
    let reference = format!("{registry}/{}", str_of(&chart["name"], "chart name"));
    assert!(
        docs.contains(&reference),
        "docs/install.md never names {reference}"
    );
}

#[test]
fn the_release_workflow_builds_the_kubectl_plugin_and_releases_its_archives() {
    let release = Release::load();
    let builds = plugin_builds(&release);
    assert!(!builds.is_empty(), "no job builds --bin {PLUGIN}");
    assert!(
        cargo_bins().iter().any(|b| b == PLUGIN),
        "Cargo.toml has no bin {PLUGIN}: {:?}",
        cargo_bins()
    );
    for (name, job, targets) in &builds {
        let script = scripts(job);
        assert!(
            script.contains(&format!(
                r#"cargo build --release --locked --no-default-features --bin {PLUGIN} --target "${{{{ matrix.target }}}}""#
            )),
            "job {name}: {script}"
        );
        // The archive is named from the target as plugin_archive does, and holds the
        // files the krew manifest installs.
        let asset = str_of(&job["env"]["ASSET"], "ASSET");
        for target in targets {
            assert_eq!(
                format!("{}.tar.gz", asset.replace("${{ matrix.target }}", target)),
                plugin_archive(target)
            );
        }
        for line in [
            &format!(r#"cp "target/${{{{ matrix.target }}}}/release/{PLUGIN}" README.md stage/"#),
            r#"tar -czf "dist/$ASSET.tar.gz""#,
            &format!("-C stage {PLUGIN} README.md"),
            r#""$ASSET.tar.gz" > "$ASSET.tar.gz.sha256""#,
        ] {
            assert!(script.contains(line), "job {name} lacks {line}");
        }
        let upload = uses(job, "actions/upload-artifact");
        assert_eq!(upload.len(), 1);
        assert_eq!(upload[0]["with"]["path"].as_str(), Some("dist/"));
    }
    let targets = plugin_targets(&release);
    for target in [
        "x86_64-unknown-linux-gnu",
        "aarch64-unknown-linux-gnu",
        "x86_64-apple-darwin",
        "aarch64-apple-darwin",
    ] {
        assert!(targets.contains(target), "no archive for {target}");
    }

    // The release waits for everything and attaches the archives, their sums, the filled
    // krew manifest and the chart.
    let job = release.job("release");
    assert!(can_write(job, "contents"));
    let waits = needs(job);
    for (name, _, _) in &builds {
        assert!(waits.contains(name), "the release does not wait for {name}");
    }
    assert!(waits.contains(&"image") && waits.contains(&"chart"));
    let publish = uses(job, "softprops/action-gh-release");
    assert_eq!(publish.len(), 1);
    let files: Vec<&str> = str_of(&publish[0]["with"]["files"], "files")
        .lines()
        .collect();
    for file in [
        format!("dist/{PLUGIN}-*.tar.gz"),
        format!("dist/{PLUGIN}-*.tar.gz.sha256"),
        "dist/imagebuild.yaml".to_string(),
        "dist/imagebuild-operator-*.tgz".to_string(),
    ] {
        assert!(files.contains(&file.as_str()), "the release lacks {file}");
    }
    let script = scripts(job);
    // It fills the placeholders of the krew manifest, and installs one archive with it.
    assert!(script.contains(r#"cp "$KREW_MANIFEST" dist/imagebuild.yaml"#));
    assert!(script.contains(r#"sed -i "s|@SHA256:$asset@|$sum|" dist/imagebuild.yaml"#));
    assert!(script.contains(&format!(
        "--archive dist/{}",
        plugin_archive("x86_64-unknown-linux-gnu")
    )));
}

#[test]
fn the_krew_manifest_installs_the_released_archives() {
    let manifest = yaml(KREW_MANIFEST);
    let version = format!("v{}", cargo_field("version"));
    assert_eq!(
        manifest["apiVersion"].as_str(),
        Some("krew.googlecontainertools.github.com/v1alpha2")
    );
    assert_eq!(manifest["kind"].as_str(), Some("Plugin"));
    // krew names the plugin after the file, and the command after the plugin.
    let name = str_of(&manifest["metadata"]["name"], "metadata.name");
    assert!(KREW_MANIFEST.ends_with(&format!("/{name}.yaml")));
    assert_eq!(format!("kubectl-{name}"), PLUGIN);
    let spec = &manifest["spec"];
    assert_eq!(spec["version"].as_str(), Some(version.as_str()));
    let homepage = str_of(&spec["homepage"], "homepage");
    assert_eq!(
        homepage,
        "https://github.com/imagebuild-operator/imagebuild-operator"
    );
    let short = str_of(&spec["shortDescription"], "shortDescription");
    assert!(!short.is_empty() && !short.contains('\n'));
    let description = str_of(&spec["description"], "description");
    for command in [
        "status [--watch]",
        "wait",
        "plan",
        "summary",
        "logs",
        "retry",
        "cancel",
        "suspend",
        "resume",
    ] {
        assert!(
            description
                .lines()
                .any(|l| l.trim_start().starts_with(command)),
            "the description does not list {command}"
        );
    }

    let targets = plugin_targets(&Release::load());
    let mut covered = BTreeSet::new();
    for platform in spec["platforms"].as_sequence().expect("platforms") {
        let labels = &platform["selector"]["matchLabels"];
        let os = str_of(&labels["os"], "os");
        let arch = str_of(&labels["arch"], "arch");
        let target = targets
            .iter()
            .find(|t| krew_platform(t) == (os, arch))
            .unwrap_or_else(|| panic!("the release builds nothing for {os}/{arch}"));
        assert!(covered.insert(target.clone()), "{os}/{arch} twice");
        let archive = plugin_archive(target);
        assert_eq!(
            platform["uri"].as_str(),
            Some(format!("{homepage}/releases/download/{version}/{archive}").as_str())
        );
        // Filled by the release with the archive's sum.
        assert_eq!(
            platform["sha256"].as_str(),
            Some(format!("@SHA256:{archive}@").as_str())
        );
        assert_eq!(platform["bin"].as_str(), Some(PLUGIN));
        let files: Vec<(&str, &str)> = platform["files"]
            .as_sequence()
            .expect("files")
            .iter()
            .map(|f| (str_of(&f["from"], "from"), str_of(&f["to"], "to")))
            .collect();
        assert_eq!(files, [(PLUGIN, "."), ("README.md", ".")]);
    }
    assert_eq!(
        covered, targets,
        "archives released without a krew platform"
    );

    // docs/install.md offers the same archives.
    let docs = std::fs::read_to_string("docs/install.md").unwrap();
    for target in &targets {
        assert!(
            docs.contains(target.as_str()),
            "docs/install.md never names {target}"
        );
    }
    for part in [
        format!("{homepage}/releases/download/v$VERSION/imagebuild.yaml"),
        format!("{homepage}/releases/download/v$VERSION/{PLUGIN}-$TARGET.tar.gz"),
    ] {
        assert!(docs.contains(&part), "docs/install.md never names {part}");
    }
}
