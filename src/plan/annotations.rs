//! `placement.podAnnotations`: templates rendered for each node and attempt, so pods can
//! carry what cluster tooling needs (cost attribution, log routing, sidecar opt-outs) per
//! instance or phase.

use std::collections::BTreeMap;

use super::Node;
use crate::api::ImageBuildRunSpec;
use crate::template::{Context, TemplateError, TemplateSet};

const FIELD: &str = "spec.placement.podAnnotations";

/// The run's compiled pod-annotation templates.
pub struct PodAnnotations {
    set: TemplateSet,
    keys: Vec<String>,
    vars: Context,
}

impl PodAnnotations {
    /// Compiles the templates of `spec.placement.podAnnotations`.
    pub fn compile(spec: &ImageBuildRunSpec) -> Result<Self, TemplateError> {
        let mut set = TemplateSet::new();
        let mut keys = Vec::new();
        for (key, value) in &spec.placement.pod_annotations {
            set.add(&format!("{FIELD}.{key}"), value)?;
            keys.push(key.clone());
        }
        Ok(Self {
            set,
            keys,
            vars: Context::from_vars(&spec.vars),
        })
    }

    /// No annotations configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The annotations of `node`'s pod in attempt `attempt`; empty values are left out.
    pub fn render(
        &self,
        node: &Node,
        attempt: u32,
    ) -> Result<BTreeMap<String, String>, TemplateError> {
        let mut ctx = self.vars.clone();
        ctx.set("phase", node.phase.as_str());
        ctx.set_number("attempt", attempt);
        ctx.set("image", &node.image);
        match &node.instance_id {
            Some(id) => ctx.set_instance(id, node.upstream_image.as_deref()),
            None => {
                if let Some(upstream) = &node.upstream_image {
                    ctx.set("upstreamImage", upstream);
                    ctx.set("customTag", &crate::template::custom_tag(upstream));
                }
            }
        }
        let mut out = BTreeMap::new();
        for key in &self.keys {
            let value = self
                .set
                .render(&format!("{FIELD}.{key}"), &ctx, Some(node.subject()))?;
            let value = value.trim();
            if !value.is_empty() {
                out.insert(key.clone(), value.to_string());
            }
        }
        Ok(out)
    }
}
