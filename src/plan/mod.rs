//! The build plan: instances -> one builder, one base per unique upstream image, one
//! assembly per instance (and an optional post-assembly layer), each node with its final
//! image reference, build arguments, dependencies and deterministic Job name. Pure code.

mod annotations;
mod graph;
mod names;
mod render;

use graph::Graph;
use render::{Fields, ImageOwners, Rendered, check_reference};

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use regex::Regex;
use serde::{Deserialize, Serialize};

pub use annotations::PodAnnotations;
pub use names::job_name;

use crate::api::ImageBuildRunSpec;
use crate::instances::RawInstance;
use crate::template::{Context, TemplateError, TemplateSet};
use crate::validate::{self, SpecError};

/// Index of a node in [`Plan::nodes`].
pub type NodeId = usize;

/// The four kinds of image a run builds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// The shared builder image.
    Builder,
    /// One image per unique upstream image.
    Base,
    /// One image per instance.
    Assembly,
    /// The extra layer of matching instances.
    PostAssembly,
}

impl Phase {
    /// The name used in labels, manifests and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Builder => "builder",
            Self::Base => "base",
            Self::Assembly => "assembly",
            Self::PostAssembly => "postAssembly",
        }
    }

    /// The short form used in Job names.
    pub fn abbrev(self) -> &'static str {
        match self {
            Self::Builder => "bld",
            Self::Base => "base",
            Self::Assembly => "asm",
            Self::PostAssembly => "post",
        }
    }
}

/// One image to build.
#[derive(Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// Which phase the image belongs to.
    pub phase: Phase,
    /// Instance id (assembly and post-assembly nodes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<Arc<str>>,
    /// The upstream image the node is built from (base, assembly, post-assembly).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_image: Option<Arc<str>>,
    /// The image reference pushed. These three are shared with the nodes' records (see
    /// `manifest::Records`), and a base's upstream image with its assemblies.
    pub image: Arc<str>,
    /// Rendered build arguments, by name (a list: a map of one or two would take a
    /// B-tree node of eleven, 0.5 KiB per image).
    #[serde(serialize_with = "as_map")]
    pub build_args: Vec<(String, String)>,
    /// Rendered git revision, for git contexts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_revision: Option<String>,
    /// Rendered cache reference, when the phase exports a cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_ref: Option<String>,
    /// The deterministic Job name.
    pub job_name: String,
    /// Nodes that must be built (or exist) first.
    #[serde(skip)]
    pub deps: Vec<NodeId>,
}

impl Node {
    /// The rendered build argument `name`.
    pub fn build_arg(&self, name: &str) -> Option<&str> {
        self.build_args
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// What the node is built for: its instance, else its upstream image (a base), else
    /// `builder`.
    pub fn subject(&self) -> &str {
        self.instance_id
            .as_deref()
            .or(self.upstream_image.as_deref())
            .unwrap_or("builder")
    }
}

fn as_map<S: serde::Serializer>(pairs: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

/// Every image of a run and the edges between them. Dependencies always come earlier in
/// `nodes`, so plan order is a topological order.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// The nodes: builder first, then bases, assemblies and post-assembly layers.
    pub nodes: Vec<Node>,
    /// The nodes by their Job's name (the manifest's and the Jobs' key), to find a node by
    /// its Job's name without a second copy of every name.
    by_job: JobIndex,
    /// What a reconcile reads of every node, packed: each node's phase, inputs and
    /// dependents. Its passes over the whole plan (the scheduler's, the status counts)
    /// then read a few contiguous arrays, not a 176-byte `Node` and its own `deps` list
    /// per node, which at 20,000 nodes missed the cache on nearly every one.
    graph: Graph,
}

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A spec value is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A template failed to parse or render.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// A rendered image reference is not a valid `registry/repository:tag`.
    #[error("{field}: `{reference}` is not a valid image reference with a tag: {reason}{}", instance_suffix(.instance))]
    InvalidReference {
        /// The field the reference was rendered from.
        field: String,
        /// The instance (or upstream image) it was rendered for.
        instance: Option<String>,
        /// The rendered text.
        reference: String,
        /// What the parser said.
        reason: String,
    },
    /// An instance has no upstream image from its source and there is no template.
    #[error(
        "instance {0} has no upstream image: set spec.instances.upstreamImage or give the image in the source"
    )]
    MissingUpstreamImage(String),
    /// Two nodes would push the same image.
    #[error(
        "{field} renders `{image}` for both {first} and {second}: every image must be distinct"
    )]
    DuplicateImage {
        /// The template field.
        field: String,
        /// The image both render.
        image: String,
        /// The first owner.
        first: String,
        /// The second owner.
        second: String,
    },
}

impl PlanError {
    /// Short stable label for condition reasons and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Spec(_) => "InvalidSpec",
            Self::Template(_) => "TemplateError",
            Self::InvalidReference { .. } => "InvalidImageReference",
            Self::MissingUpstreamImage(_) => "MissingUpstreamImage",
            Self::DuplicateImage { .. } => "DuplicateImage",
        }
    }
}

fn instance_suffix(instance: &Option<String>) -> String {
    instance
        .as_ref()
        .map(|i| format!(" (instance {i})"))
        .unwrap_or_default()
}

/// Builds the plan of run `run` for the selected `instances` (sorted, as `instances::select`
/// returns them).
pub fn build(
    run: &str,
    spec: &ImageBuildRunSpec,
    instances: &[RawInstance],
) -> Result<Plan, PlanError> {
    validate::validate(spec)?;
    let phases = [
        Fields::of("spec.builder", &spec.builder),
        Fields::of("spec.base", &spec.base),
        Fields::of("spec.assembly", &spec.assembly),
    ];
    let post = spec.post_assembly.as_ref().map(|p| {
        let fields = Fields {
            prefix: "spec.postAssembly",
            image: &p.image,
            build_args: &p.build_args,
            cache_ref: None,
            context: &p.context,
        };
        (fields, p)
    });
    let mut set = TemplateSet::new();
    for fields in phases.iter().chain(post.as_ref().map(|(f, _)| f)) {
        fields.add(&mut set)?;
    }
    const UPSTREAM: &str = "spec.instances.upstreamImage";
    if let Some(upstream) = &spec.instances.upstream_image {
        set.add(UPSTREAM, upstream)?;
    }
    let vars = Context::from_vars(&spec.vars);
    let mut nodes = Vec::with_capacity(2 * instances.len() + 1);

    let builder = phases[0].render(&set, &vars, None)?;
    nodes.push(node(
        run,
        Phase::Builder,
        "builder",
        None,
        None,
        builder,
        vec![],
    ));

    // Upstream image of every instance, then one base per distinct upstream image.
    let mut upstreams = Vec::with_capacity(instances.len());
    for instance in instances {
        let upstream: Arc<str> = match (&instance.image, &spec.instances.upstream_image) {
            (Some(image), _) => image.as_str().into(),
            (None, Some(_)) => {
                let mut ctx = vars.clone();
                ctx.set_instance(&instance.id, None);
                set.render(UPSTREAM, &ctx, Some(&instance.id))?.into()
            }
            (None, None) => return Err(PlanError::MissingUpstreamImage(instance.id.clone())),
        };
        check_reference(UPSTREAM, &upstream, Some(&instance.id))?;
        upstreams.push(upstream);
    }
    let mut base_of: BTreeMap<&Arc<str>, NodeId> = upstreams.iter().map(|u| (u, 0)).collect();
    let mut images = ImageOwners::default();
    for (upstream, id) in base_of.iter_mut() {
        let mut ctx = vars.clone();
        ctx.set("upstreamImage", upstream);
        ctx.set("customTag", &crate::template::custom_tag(upstream));
        let rendered = phases[1].render(&set, &ctx, Some(upstream))?;
        images.claim("spec.base.image", &rendered.image, upstream)?;
        *id = nodes.len();
        nodes.push(node(
            run,
            Phase::Base,
            upstream,
            None,
            Some((*upstream).clone()),
            rendered,
            vec![],
        ));
    }

    let builder_image = nodes[0].image.clone();
    let post_match = match &post {
        Some((_, p)) => Some(Regex::new(&p.match_).map_err(|e| SpecError {
            field: "spec.postAssembly.match".into(),
            message: e.to_string(),
        })?),
        None => None,
    };
    // An assembly's template context, made again for its post-assembly layer (kept for
    // every instance, the contexts were most of the plan's memory while it was built).
    let assembly_context = |instance: &str, upstream: &str, base: &str| {
        let mut ctx = vars.clone();
        ctx.set_instance(instance, Some(upstream));
        ctx.set_image("builder", &builder_image);
        ctx.set_image("base", base);
        ctx
    };
    let mut assemblies = Vec::with_capacity(instances.len());
    for (instance, upstream) in instances.iter().zip(&upstreams) {
        let base = base_of[upstream];
        let ctx = assembly_context(&instance.id, upstream, &nodes[base].image);
        let rendered = phases[2].render(&set, &ctx, Some(&instance.id))?;
        images.claim("spec.assembly.image", &rendered.image, &instance.id)?;
        assemblies.push((nodes.len(), base));
        let id = Some(Arc::from(instance.id.as_str()));
        nodes.push(node(
            run,
            Phase::Assembly,
            &instance.id,
            id,
            Some(upstream.clone()),
            rendered,
            vec![0, base],
        ));
    }

    if let (Some((fields, _)), Some(pattern)) = (&post, &post_match) {
        for (assembly, base) in assemblies {
            let (instance, upstream) = (
                nodes[assembly].instance_id.clone(),
                nodes[assembly].upstream_image.clone(),
            );
            let Some(instance) = instance.filter(|i| pattern.is_match(i)) else {
                continue;
            };
            let mut ctx = assembly_context(
                &instance,
                upstream.as_deref().unwrap_or_default(),
                &nodes[base].image,
            );
            ctx.set_image("assembly", &nodes[assembly].image);
            let rendered = fields.render(&set, &ctx, Some(&instance))?;
            nodes.push(node(
                run,
                Phase::PostAssembly,
                &instance.clone(),
                Some(instance),
                upstream,
                rendered,
                vec![assembly],
            ));
        }
    }

    // Pod annotations render per attempt; render every one now so a template that fails
    // for some node fails the plan rather than that node's Job.
    let annotations = PodAnnotations::compile(spec)?;
    if !annotations.is_empty() {
        for node in &nodes {
            for attempt in 1..=spec.retry.attempts {
                annotations.render(node, attempt)?;
            }
        }
    }

    let by_job = JobIndex::of(&nodes);
    Ok(Plan {
        graph: Graph::of(&nodes),
        nodes,
        by_job,
    })
}

fn node(
    run: &str,
    phase: Phase,
    key: &str,
    instance_id: Option<Arc<str>>,
    upstream_image: Option<Arc<str>>,
    rendered: Rendered,
    deps: Vec<NodeId>,
) -> Node {
    Node {
        phase,
        instance_id,
        upstream_image,
        image: rendered.image.into(),
        build_args: rendered.build_args,
        git_revision: rendered.git_revision,
        cache_ref: rendered.cache_ref,
        job_name: job_name(run, phase.abbrev(), &crate::template::custom_tag(key), key),
        deps,
    }
}

/// A hash index of the nodes by Job name that keeps only their positions: one probe and
/// one name compare per lookup (a reconcile looks up every Job in flight), where a binary
/// search over 20,000 names read fifteen `Node`s, a cache miss each.
#[derive(Clone, Default)]
struct JobIndex {
    table: hashbrown::HashTable<NodeId>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl JobIndex {
    fn of(nodes: &[Node]) -> JobIndex {
        let mut index = JobIndex::default();
        index.table.reserve(nodes.len(), |_| 0);
        for (id, node) in nodes.iter().enumerate() {
            let hash = index.hasher.hash_one(node.job_name.as_str());
            index.table.insert_unique(hash, id, |&other| {
                index.hasher.hash_one(nodes[other].job_name.as_str())
            });
        }
        index
    }

    fn find(&self, nodes: &[Node], job: &str) -> Option<NodeId> {
        let hash = self.hasher.hash_one(job);
        self.table
            .find(hash, |&id| nodes[id].job_name == job)
            .copied()
    }
}

impl std::fmt::Debug for JobIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobIndex({} names)", self.table.len())
    }
}

impl Plan {
    /// The node whose Job (and record) is named `job`.
    pub fn node_of(&self, job: &str) -> Option<NodeId> {
        self.by_job.find(&self.nodes, job)
    }

    /// Number of nodes of `phase`.
    pub fn count(&self, phase: Phase) -> usize {
        self.graph.phases.iter().filter(|&&p| p == phase).count()
    }

    /// Node `id`'s phase (`nodes[id].phase`).
    pub fn phase(&self, id: NodeId) -> Phase {
        self.graph.phases[id]
    }

    /// Every node's phase, in plan order.
    pub fn phases(&self) -> &[Phase] {
        &self.graph.phases
    }

    /// The nodes node `id` is built from (`nodes[id].deps`).
    pub fn inputs(&self, id: NodeId) -> &[NodeId] {
        self.graph.inputs(id)
    }

    /// The nodes built from node `id`, in plan order.
    pub fn dependents(&self, id: NodeId) -> &[NodeId] {
        self.graph.dependents(id)
    }
}

/// A plan for unit tests: builder `r.io/b:1`, a base per upstream image and an assembly
/// per instance `ids` (`repo__name`).
#[cfg(test)]
pub fn fixture(ids: &[&str]) -> Plan {
    let spec: crate::api::ImageBuildRunSpec = serde_yaml_ng::from_str(
        r#"
instances: {list: [x], upstreamImage: "docker.io/up/{{ repo }}_1776_{{ name }}:latest"}
builder: {context: {inline: "FROM scratch"}, image: "r.io/b:1"}
base: {context: {inline: "FROM scratch"}, image: "r.io/base:{{ customTag }}"}
assembly: {context: {inline: "FROM scratch"}, image: "r.io/a:{{ instanceId | lower }}"}
"#,
    )
    .unwrap();
    let raw: Vec<_> = ids
        .iter()
        .map(|id| crate::instances::RawInstance {
            id: id.to_string(),
            image: None,
        })
        .collect();
    build("run", &spec, &raw).unwrap()
}
