//! The executor's command line: `buildctl build ...` with the dockerfile frontend, produced
//! by one pure function so that golden tests pin it.

use crate::api::{BuildContext, CacheMode, ImageBuildRunSpec};
use crate::plan::{Node, Phase};

/// Where the build pod keeps its scratch files (an emptyDir).
pub const WORK_DIR: &str = "/work";
/// The Dockerfile-only context: a ConfigMap mounted here, or the inline text written here.
pub const CONTEXT_DIR: &str = "/work/context";
/// BuildKit's metadata file, read by the wrapper for the image digest.
pub const METADATA_FILE: &str = "/work/metadata.json";

/// The build settings of the phase a node belongs to.
#[derive(Clone, Copy, Debug)]
pub struct PhaseBuild<'a> {
    /// Where the context comes from.
    pub context: &'a BuildContext,
    /// Dockerfile path inside the context.
    pub dockerfile: &'a str,
    /// Stage to build.
    pub target: Option<&'a str>,
    /// Layer-cache mode.
    pub cache: CacheMode,
    /// Target platform.
    pub platform: &'a str,
}

impl<'a> PhaseBuild<'a> {
    /// The settings of `phase` in `spec`; `None` for a post-assembly phase the spec lacks.
    pub fn of(spec: &'a ImageBuildRunSpec, phase: Phase) -> Option<PhaseBuild<'a>> {
        let phase_spec = match phase {
            Phase::Builder => &spec.builder,
            Phase::Base => &spec.base,
            Phase::Assembly => &spec.assembly,
            Phase::PostAssembly => {
                let post = spec.post_assembly.as_ref()?;
                return Some(PhaseBuild {
                    context: &post.context,
                    dockerfile: &post.dockerfile,
                    target: None,
                    cache: CacheMode::Off,
                    platform: &post.platform,
                });
            }
        };
        Some(PhaseBuild {
            context: &phase_spec.context,
            dockerfile: &phase_spec.dockerfile,
            target: phase_spec.target.as_deref().filter(|t| !t.is_empty()),
            cache: phase_spec.cache,
            platform: &phase_spec.platform,
        })
    }
}

/// The arguments of `buildctl` (after `--addr`, which the wrapper adds) that build `node`
/// and push it.
///
/// No attestation is requested, so BuildKit attaches no provenance to the image. Plain-HTTP
/// registries (`spec.registry.insecure`) are not named here: the wrapper declares them to
/// buildkitd (`http = true`), which then speaks plain HTTP to them for pulls, pushes and
/// the cache alike. BuildKit's own `registry.insecure=true` would try HTTPS first on every
/// connection, and each refused attempt left the registry side of it in TIME_WAIT, where
/// a later connection from the same port stalled for up to 30 s.
pub fn buildctl_args(build: &PhaseBuild<'_>, node: &Node) -> Vec<String> {
    let mut args: Vec<String> = ["build", "--progress=plain", "--frontend=dockerfile.v0"]
        .map(String::from)
        .to_vec();
    let mut opt = |key: &str, value: &str| {
        args.push("--opt".into());
        args.push(format!("{key}={value}"));
    };
    match &build.context.git {
        Some(git) => {
            let revision = node.git_revision.as_deref().unwrap_or(&git.revision);
            let mut context = format!("{}#{revision}", git.url);
            if let Some(sub) = git.sub_path.as_deref().filter(|s| !s.is_empty()) {
                context.push(':');
                context.push_str(sub);
            }
            opt("context", &context);
            opt("filename", build.dockerfile);
        }
        None => opt("filename", "Dockerfile"),
    }
    if let Some(target) = build.target {
        opt("target", target);
    }
    opt("platform", build.platform);
    for (key, value) in &node.build_args {
        opt(&format!("build-arg:{key}"), value);
    }
    if build.context.git.is_none() {
        for name in ["context", "dockerfile"] {
            args.push("--local".into());
            args.push(format!("{name}={CONTEXT_DIR}"));
        }
    }
    args.push("--output".into());
    args.push(format!("type=image,name={},push=true", node.image));
    if let (Some(mode), Some(cache_ref)) = (cache_mode(build.cache), node.cache_ref.as_deref()) {
        args.push("--import-cache".into());
        args.push(format!("type=registry,ref={cache_ref}"));
        args.push("--export-cache".into());
        args.push(format!("type=registry,ref={cache_ref},mode={mode}"));
    }
    args.push("--metadata-file".into());
    args.push(METADATA_FILE.into());
    args
}

fn cache_mode(mode: CacheMode) -> Option<&'static str> {
    match mode {
        CacheMode::Off => None,
        CacheMode::Min => Some("min"),
        CacheMode::Max => Some("max"),
    }
}
