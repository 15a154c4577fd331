//! Shared fixtures for the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

pub mod cluster;
pub mod oci;

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
