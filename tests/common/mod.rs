//! Shared fixtures for the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

pub mod cluster;
pub mod oci;
pub mod prometheus;
pub mod real;
pub mod runs;

use std::process::Command;

use imagebuild_operator::api::ImageBuildRunSpec;
use imagebuild_operator::instances::RawInstance;
use imagebuild_operator::plan::{self, Plan};

/// A minimal valid spec: inline instances, Dockerfile-only contexts, simple tags.
pub const MINIMAL: &str = r#"
instances:
  list: [a__a-1]
  upstreamImage: "docker.io/up/{{ repo }}_1776_{{ name }}:latest"
vars: {sdkSha: 0123456789abcdef}
builder:
  context: {inline: "FROM scratch"}
  image: "r.io/eval-builder:{{ sdkSha | short }}"
base:
  context: {inline: "FROM scratch"}
  image: "r.io/eval-base:{{ customTag }}"
  buildArgs: {BASE_IMAGE: "{{ upstreamImage }}"}
assembly:
  context: {inline: "FROM scratch"}
  image: "r.io/eval-agent:{{ sdkSha | short }}-{{ instanceId }}"
  buildArgs: {BASE_IMAGE: "{{ base.image }}", BUILDER_IMAGE: "{{ builder.image }}"}
"#;

/// The minimal spec, with YAML `patch` merged over it (top-level keys replaced).
pub fn spec_with(patch: &str) -> ImageBuildRunSpec {
    let mut base: serde_json::Value = serde_yaml_ng::from_str(MINIMAL).unwrap();
    let patch: serde_json::Value = serde_yaml_ng::from_str(patch).unwrap();
    if let Some(map) = patch.as_object() {
        for (k, v) in map {
            base[k] = v.clone();
        }
    }
    serde_json::from_value(base).unwrap()
}

/// Instances `ids`, each with the upstream image `images[i]` when given.
pub fn raw(ids: &[&str], images: &[Option<&str>]) -> Vec<RawInstance> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| RawInstance {
            id: id.to_string(),
            image: images.get(i).copied().flatten().map(str::to_string),
        })
        .collect()
}

/// A plan of the minimal spec for `instances`.
pub fn plan_for(spec: &ImageBuildRunSpec, instances: &[RawInstance]) -> Plan {
    plan::build("run", spec, instances).expect("valid plan")
}

/// The 500 SWE-bench Verified instance ids.
pub const SWEBENCH_IDS: &str = "tests/fixtures/swebench-verified-ids.txt";

/// Runs a future to completion on a fresh runtime (for synchronous tests).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The example SWE-bench run and its plan over the fixture ids.
pub fn swebench() -> (imagebuild_operator::api::ImageBuildRun, Plan) {
    use imagebuild_operator::cli::{load_run, plan_run};
    let run = load_run("examples/swebench-run.yaml".as_ref()).unwrap();
    let ids = std::path::PathBuf::from(SWEBENCH_IDS);
    let plan = block_on(plan_run(&run, Some(&ids))).unwrap();
    (run, plan)
}

/// Runs `program` with `args`; its stdout, or a panic with its stderr.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}): run the suite with `e2e/cluster test`, which installs it")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
