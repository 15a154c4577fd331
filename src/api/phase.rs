//! Per-phase build settings shared by the builder, base, assembly and post-assembly phases.

use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// How one phase's images are built: where the build context comes from, which Dockerfile
/// and target, the build arguments, the image reference to push, and the layer cache.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseSpec {
    /// Where the build context comes from: a git repository, or a Dockerfile alone.
    pub context: BuildContext,

    /// Path of the Dockerfile inside the context. Ignored for Dockerfile-only contexts.
    #[serde(default = "default_dockerfile")]
    #[schemars(length(min = 1, max = 512))]
    pub dockerfile: String,

    /// Dockerfile stage to build (`docker build --target`). Empty builds the last stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub target: Option<String>,

    /// Build arguments (`--build-arg KEY=VALUE`). Values are templates: see `image`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "string", "maxLength": 4096}
    ))]
    pub build_args: BTreeMap<String, String>,

    /// Image reference to push, as a template, e.g.
    /// `ghcr.io/openhands/eval-base:{{ dockerfileHash }}-{{ customTag }}`.
    /// Variables: instanceId, repo, name, upstreamImage, customTag, builder.image,
    /// base.image (assembly and post-assembly), assembly.image (post-assembly) and every
    /// key of spec.vars. Filters: short (first 7 characters), lower, sha256. An unknown
    /// variable is an error, never an empty string.
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,

    /// Layer cache export: `off` (default), `min` (final layers) or `max` (all layers).
    /// Export only where the cache is shared (the builder): per-instance caches never hit.
    #[serde(default)]
    pub cache: CacheMode,

    /// Registry reference the cache is imported from and exported to (template). Required
    /// when `cache` is not `off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub cache_ref: Option<String>,

    /// Target platform of the image.
    #[serde(default = "default_platform")]
    #[schemars(pattern(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$"))]
    pub platform: String,
}

/// The build context of a phase: exactly one of `git`, `configMap` or `inline`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.git) ? 1 : 0) + (has(self.configMap) ? 1 : 0) + (has(self.inline) ? 1 : 0) == 1"
).message("context must set exactly one of git, configMap or inline"))]
pub struct BuildContext {
    /// A git repository at a fixed revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitContext>,

    /// A Dockerfile stored under a key of a ConfigMap in the run's namespace; the context
    /// holds that Dockerfile only (enough for Dockerfiles without COPY from the context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKeyRef>,

    /// Dockerfile text written inline; the context holds that Dockerfile only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub inline: Option<String>,
}

/// A git repository used as build context.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitContext {
    /// Repository URL, e.g. `https://github.com/OpenHands/software-agent-sdk.git`.
    #[schemars(length(min = 1, max = 2048), pattern(r"^(https?|ssh|git)://\S+$"))]
    pub url: String,

    /// Commit, tag or branch to build (template, e.g. `{{ sdkSha }}`). Pin a commit for
    /// reproducible images.
    #[schemars(length(min = 1, max = 256))]
    pub revision: String,

    /// Directory inside the repository used as the context root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), pattern(r"^[^/].*$"))]
    pub sub_path: Option<String>,
}

/// A key of a ConfigMap in the run's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the ConfigMap's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Which layers a build exports to the registry cache.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// No cache import or export.
    #[default]
    Off,
    /// Export the layers of the final image only.
    Min,
    /// Export every intermediate layer too.
    Max,
}

/// An extra layer built on top of the assembly image of matching instances (for example a
/// dependency pin one repository family needs).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostAssemblySpec {
    /// Regular expression matched against the instance id, e.g. `^sphinx-doc__`.
    #[serde(rename = "match")]
    #[schemars(length(min = 1, max = 1024))]
    pub match_: String,

    /// Where the layer's Dockerfile comes from; usually `inline` or `configMap`.
    pub context: BuildContext,

    /// Path of the Dockerfile inside the context.
    #[serde(default = "default_dockerfile")]
    #[schemars(length(min = 1, max = 512))]
    pub dockerfile: String,

    /// Build arguments (templates; `assembly.image` names the image to build on).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 64,
        "additionalProperties" = {"type": "string", "maxLength": 4096}
    ))]
    pub build_args: BTreeMap<String, String>,

    /// Image reference to push (template). Defaults to `{{ assembly.image }}`: the layer
    /// replaces the assembly image in place, so consumers keep the same tag.
    #[serde(default = "default_post_image")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,

    /// Target platform of the image.
    #[serde(default = "default_platform")]
    #[schemars(pattern(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$"))]
    pub platform: String,
}

fn default_dockerfile() -> String {
    "Dockerfile".into()
}

fn default_platform() -> String {
    "linux/amd64".into()
}

fn default_post_image() -> String {
    "{{ assembly.image }}".into()
}
