//! Rendering one phase's templates (image, build args, cache ref, git revision) and the
//! checks on what they render: a valid tagged reference, unique within its phase.

use std::collections::{BTreeMap, HashMap};

use super::PlanError;
use crate::api::{BuildContext, PhaseSpec};
use crate::template::{Context, TemplateError, TemplateSet};

/// The templated parts of one phase, borrowed from the spec.
pub(super) struct Fields<'a> {
    pub(super) prefix: &'static str,
    pub(super) image: &'a str,
    pub(super) build_args: &'a BTreeMap<String, String>,
    pub(super) cache_ref: Option<&'a str>,
    pub(super) context: &'a BuildContext,
}

impl<'a> Fields<'a> {
    pub(super) fn of(prefix: &'static str, phase: &'a PhaseSpec) -> Self {
        Self {
            prefix,
            image: &phase.image,
            build_args: &phase.build_args,
            cache_ref: phase.cache_ref.as_deref(),
            context: &phase.context,
        }
    }

    pub(super) fn add(&self, set: &mut TemplateSet) -> Result<(), TemplateError> {
        set.add(&format!("{}.image", self.prefix), self.image)?;
        for (key, value) in self.build_args {
            set.add(&format!("{}.buildArgs.{key}", self.prefix), value)?;
        }
        if let Some(cache_ref) = self.cache_ref {
            set.add(&format!("{}.cacheRef", self.prefix), cache_ref)?;
        }
        if let Some(git) = &self.context.git {
            set.add(
                &format!("{}.context.git.revision", self.prefix),
                &git.revision,
            )?;
        }
        Ok(())
    }

    pub(super) fn render(
        &self,
        set: &TemplateSet,
        ctx: &Context,
        owner: Option<&str>,
    ) -> Result<Rendered, PlanError> {
        let field = |name: &str| format!("{}.{name}", self.prefix);
        let image = set.render(&field("image"), ctx, owner)?;
        check_reference(&field("image"), &image, owner)?;
        let mut build_args = Vec::with_capacity(self.build_args.len());
        for key in self.build_args.keys() {
            build_args.push((
                key.clone(),
                set.render(&field(&format!("buildArgs.{key}")), ctx, owner)?,
            ));
        }
        let cache_ref = match self.cache_ref {
            Some(_) => {
                let cache_ref = set.render(&field("cacheRef"), ctx, owner)?;
                check_cache_reference(&field("cacheRef"), &cache_ref, owner)?;
                Some(cache_ref)
            }
            None => None,
        };
        let git_revision = match &self.context.git {
            Some(_) => {
                let revision = set.render(&field("context.git.revision"), ctx, owner)?;
                check_revision(&field("context.git.revision"), &revision, owner)?;
                Some(revision)
            }
            None => None,
        };
        Ok(Rendered {
            image,
            build_args,
            cache_ref,
            git_revision,
        })
    }
}

pub(super) struct Rendered {
    pub(super) image: String,
    pub(super) build_args: Vec<(String, String)>,
    pub(super) cache_ref: Option<String>,
    pub(super) git_revision: Option<String>,
}

pub(super) fn check_reference(
    field: &str,
    reference: &str,
    owner: Option<&str>,
) -> Result<(), PlanError> {
    let invalid = |reason: String| PlanError::InvalidReference {
        field: field.to_string(),
        instance: owner.map(str::to_string),
        reference: crate::text::truncate(reference, 256),
        reason,
    };
    let parsed = crate::reference::parse(reference).map_err(|e| invalid(e.to_string()))?;
    if parsed.tag().is_none() || parsed.digest().is_some() {
        return Err(invalid("a pushed image needs a tag and no digest".into()));
    }
    Ok(())
}

/// A cache reference goes into BuildKit's comma-separated cache options: it must be an
/// image reference (which has no `,`, `=` or space), or it could add options of its own.
fn check_cache_reference(
    field: &str,
    reference: &str,
    owner: Option<&str>,
) -> Result<(), PlanError> {
    crate::reference::parse(reference)
        .map(|_| ())
        .map_err(|e| PlanError::InvalidReference {
            field: field.to_string(),
            instance: owner.map(str::to_string),
            reference: crate::text::truncate(reference, 256),
            reason: e.to_string(),
        })
}

/// A git revision (a commit, branch or tag) goes after the `#` of the context URL: git's
/// own rules for ref names, which leave out whitespace, `:`, `#`, `,` and the like.
fn check_revision(field: &str, revision: &str, owner: Option<&str>) -> Result<(), PlanError> {
    let allowed =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | '+' | '@');
    if revision.is_empty()
        || revision.len() > 256
        || !revision.chars().all(allowed)
        || revision.contains("..")
        || revision.starts_with(['-', '/'])
    {
        return Err(PlanError::Spec(crate::validate::SpecError {
            field: field.to_string(),
            message: format!(
                "`{}` is not a git revision (a commit, branch or tag: letters, digits, `.`, `_`, `-`, `/`){}",
                crate::text::truncate(revision, 128),
                owner
                    .map(|o| format!(" (instance {o})"))
                    .unwrap_or_default()
            ),
        }));
    }
    Ok(())
}

/// Which owner rendered each image so far, to reject two nodes pushing one tag.
#[derive(Default)]
pub(super) struct ImageOwners(HashMap<String, String>);

impl ImageOwners {
    pub(super) fn claim(&mut self, field: &str, image: &str, owner: &str) -> Result<(), PlanError> {
        match self.0.insert(image.to_string(), owner.to_string()) {
            Some(first) => Err(PlanError::DuplicateImage {
                field: field.to_string(),
                image: image.to_string(),
                first,
                second: owner.to_string(),
            }),
            None => Ok(()),
        }
    }
}
