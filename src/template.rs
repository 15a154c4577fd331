//! Tag, image and build-argument templates: a strict minijinja environment (an unknown
//! variable is an error, never an empty string) with the filters users need for tags.

use std::collections::{BTreeMap, HashSet};

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use sha2::{Digest, Sha256};

/// Variables every template may use; `spec.vars` keys must not shadow them.
pub const BUILTIN_VARIABLES: &[&str] = &[
    "instanceId",
    "repo",
    "name",
    "upstreamImage",
    "customTag",
    "builder",
    "base",
    "assembly",
    "phase",
    "attempt",
    "image",
];

/// What one render may spend: minijinja's fuel (about one unit an instruction, and one a
/// 64 bytes it allocates), so a loop or a blow-up ends in an error, not a pinned worker.
pub const FUEL: u64 = 100_000;

/// The longest text a template may render (an image reference, a build argument, an
/// annotation value): longer output is an error, never a Job the API server refuses.
pub const MAX_OUTPUT: usize = 16 * 1024;

/// A template that failed to parse or to render, with the field and instance it belongs to.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {problem}{}", instance.as_ref().map(|i| format!(" (instance {i})")).unwrap_or_default())]
pub struct TemplateError {
    /// The spec field holding the template, e.g. `spec.base.image`.
    pub field: String,
    /// The instance being rendered, when the failure is specific to one.
    pub instance: Option<String>,
    /// What went wrong.
    pub problem: TemplateProblem,
}

/// The kinds of template failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateProblem {
    /// The template text does not parse.
    #[error("template does not parse: {0}")]
    Syntax(String),
    /// The template names a variable that has no value here.
    #[error("unknown variable `{0}`")]
    UnknownVariable(String),
    /// Rendering failed for another reason (a filter on the wrong type, ...).
    #[error("template failed: {0}")]
    Render(String),
}

/// The compiled templates of one run, keyed by the spec field they come from.
pub struct TemplateSet {
    env: Environment<'static>,
}

impl Default for TemplateSet {
    fn default() -> Self {
        Self::new()
    }
}

impl TemplateSet {
    /// An empty set with strict undefined handling and the `short` and `sha256` filters
    /// (`lower`, `upper`, `replace`, `trim` and the other minijinja built-ins are there too).
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(64);
        env.add_filter("short", short);
        env.add_filter("sha256", |s: &str| {
            hex::encode(Sha256::digest(s.as_bytes()))
        });
        Self { env }
    }

    /// Compiles the template of `field`.
    pub fn add(&mut self, field: &str, source: &str) -> Result<(), TemplateError> {
        self.env
            .add_template_owned(field.to_string(), source.to_string())
            .map_err(|err| TemplateError {
                field: field.to_string(),
                instance: None,
                problem: TemplateProblem::Syntax(detail(&err)),
            })
    }

    /// Renders the template of `field` (added before) with `context`.
    pub fn render(
        &self,
        field: &str,
        context: &Context,
        instance: Option<&str>,
    ) -> Result<String, TemplateError> {
        let fail = |problem| TemplateError {
            field: field.to_string(),
            instance: instance.map(str::to_string),
            problem,
        };
        let template = self
            .env
            .get_template(field)
            .map_err(|err| fail(TemplateProblem::Render(detail(&err))))?;
        let rendered = template.render(&context.0);
        let rendered = rendered.map_err(|err| {
            if err.kind() == ErrorKind::UndefinedError {
                let names = template.undeclared_variables(true);
                if let Some(name) = first_missing(&names, context) {
                    return fail(TemplateProblem::UnknownVariable(name));
                }
            }
            fail(TemplateProblem::Render(detail(&err)))
        })?;
        if rendered.len() > MAX_OUTPUT {
            return Err(fail(TemplateProblem::Render(format!(
                "renders {} bytes; at most {MAX_OUTPUT} are allowed",
                rendered.len()
            ))));
        }
        Ok(rendered)
    }
}

/// The variables one render sees.
#[derive(Debug, Clone, Default)]
pub struct Context(BTreeMap<String, Value>);

impl Context {
    /// A context holding `vars` (the run's `spec.vars`).
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Self {
        Self(
            vars.iter()
                .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                .collect(),
        )
    }

    /// Sets a top-level variable.
    pub fn set(&mut self, name: &str, value: &str) {
        self.0.insert(name.to_string(), Value::from(value));
    }

    /// Sets a top-level number variable.
    pub fn set_number(&mut self, name: &str, value: u32) {
        self.0.insert(name.to_string(), Value::from(value));
    }

    /// Sets `<phase>.image`, e.g. `builder.image`.
    pub fn set_image(&mut self, phase: &str, image: &str) {
        self.0
            .insert(phase.to_string(), Value::from_pairs([("image", image)]));
    }

    /// Sets the variables derived from an instance id and its upstream image.
    pub fn set_instance(&mut self, instance_id: &str, upstream_image: Option<&str>) {
        self.set("instanceId", instance_id);
        if let Some((repo, name)) = instance_id.split_once("__") {
            self.set("repo", repo);
            self.set("name", name);
        }
        if let Some(image) = upstream_image {
            self.set("upstreamImage", image);
            self.set("customTag", &custom_tag(image));
        }
    }

    fn has(&self, dotted: &str) -> bool {
        let mut parts = dotted.split('.');
        let Some(first) = parts.next().and_then(|p| self.0.get(p)) else {
            return false;
        };
        let mut value = first.clone();
        for part in parts {
            match value.get_attr(part) {
                Ok(v) if !v.is_undefined() => value = v,
                _ => return false,
            }
        }
        true
    }
}

/// The last path segment of an image reference without its tag or digest:
/// `docker.io/swebench/sweb.eval.x86_64.django_1776_django-11333:latest` ->
/// `sweb.eval.x86_64.django_1776_django-11333`.
pub fn custom_tag(image: &str) -> String {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last).to_string()
}

fn short(value: &str, len: Option<usize>) -> String {
    value.chars().take(len.unwrap_or(7)).collect()
}

/// The first name the template uses that the context lacks (sorted, so errors are stable).
fn first_missing(names: &HashSet<String>, context: &Context) -> Option<String> {
    let mut names: Vec<&String> = names.iter().collect();
    names.sort();
    names.into_iter().find(|n| !context.has(n)).cloned()
}

fn detail(err: &minijinja::Error) -> String {
    match err.detail() {
        Some(detail) => format!("{} ({detail})", err.kind()),
        None => err.kind().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, ctx: &Context) -> Result<String, TemplateError> {
        let mut set = TemplateSet::new();
        set.add("spec.base.image", source)?;
        set.render("spec.base.image", ctx, Some("django__django-11099"))
    }

    fn ctx() -> Context {
        let vars = BTreeMap::from([("sdkSha".to_string(), "43376f18aa".to_string())]);
        let mut ctx = Context::from_vars(&vars);
        ctx.set_instance(
            "Django__Django-11099",
            Some("docker.io/swebench/sweb.eval.x86_64.django_1776_django-11099:latest"),
        );
        ctx.set_image("builder", "ghcr.io/o/eval-builder:43376f1");
        ctx
    }

    /// Loops, recursion and blow-ups end in an error naming the field, quickly, and no
    /// template reaches the process or the file system.
    #[test]
    fn hostile_templates_end_in_errors() {
        let cases = [
            // A loop that never ends within the fuel.
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            // Recursion through a macro.
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            // Output blow-up by repetition, within minijinja's own repeat limit.
            "{{ 'x' * 1000000 }}",
            // Doubling in a loop.
            "{% set s = namespace(v='x') %}{% for i in range(64) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
            // No sandbox escape: there is no loader, no include and no Python attribute walk.
            "{% include '/etc/passwd' %}",
            "{{ ''.__class__ }}",
            "{{ self.__init__ }}",
            "{{ cycler.__init__.__globals__ }}",
            "{{ repo | nosuchfilter }}",
            "{{ nosuchvariable }}",
        ];
        for source in cases {
            let started = std::time::Instant::now();
            let err = render(source, &ctx()).expect_err(source);
            assert_eq!(err.field, "spec.base.image", "{source}: {err}");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{source} ran {:?}",
                started.elapsed()
            );
        }
        // A long but legitimate render is fine up to the limit.
        assert_eq!(
            render("{{ 'x' * 16384 }}", &ctx()).unwrap().len(),
            MAX_OUTPUT
        );
        let err = render("{{ 'x' * 16385 }}", &ctx()).unwrap_err();
        assert!(err.to_string().contains("at most 16384"), "{err}");
    }

    #[test]
    fn builtins_and_filters() {
        let out = render(
            "{{ sdkSha | short }}-{{ repo | lower }}_{{ name | lower }}-{{ customTag }}-{{ builder.image }}",
            &ctx(),
        )
        .unwrap();
        assert_eq!(
            out,
            "43376f1-django_django-11099-sweb.eval.x86_64.django_1776_django-11099-ghcr.io/o/eval-builder:43376f1"
        );
        assert_eq!(render("{{ sdkSha | short(3) }}", &ctx()).unwrap(), "433");
        assert_eq!(
            render("{{ 'abc' | sha256 | short }}", &ctx()).unwrap(),
            "ba7816b",
            "sha256 of abc starts ba7816bf"
        );
    }

    #[test]
    fn unknown_variable_names_field_variable_and_instance() {
        let err = render("x-{{ sdkSah }}", &ctx()).unwrap_err();
        assert_eq!(
            err.problem,
            TemplateProblem::UnknownVariable("sdkSah".into())
        );
        assert_eq!(
            err.to_string(),
            "spec.base.image: unknown variable `sdkSah` (instance django__django-11099)"
        );
        let err = render("{{ base.image }}", &ctx()).unwrap_err();
        assert_eq!(
            err.problem,
            TemplateProblem::UnknownVariable("base.image".into())
        );
        let err = render("{{ builder.digest }}", &ctx()).unwrap_err();
        assert_eq!(
            err.problem,
            TemplateProblem::UnknownVariable("builder.digest".into())
        );
    }

    #[test]
    fn repo_and_name_need_a_double_underscore() {
        let mut ctx = Context::default();
        ctx.set_instance("plainid", None);
        let err = render("{{ repo }}", &ctx).unwrap_err();
        assert_eq!(err.problem, TemplateProblem::UnknownVariable("repo".into()));
        let err = render("{{ upstreamImage }}", &ctx).unwrap_err();
        assert_eq!(
            err.problem,
            TemplateProblem::UnknownVariable("upstreamImage".into())
        );
    }

    #[test]
    fn syntax_error_names_field() {
        let mut set = TemplateSet::new();
        let err = set.add("spec.assembly.image", "{{ oops").unwrap_err();
        assert_eq!(err.field, "spec.assembly.image");
        assert!(matches!(err.problem, TemplateProblem::Syntax(_)), "{err}");
    }

    #[test]
    fn custom_tag_strips_registry_path_tag_and_digest() {
        assert_eq!(
            custom_tag("docker.io/swebench/sweb.eval.x86_64.a_1776_b-1:latest"),
            "sweb.eval.x86_64.a_1776_b-1"
        );
        assert_eq!(custom_tag("localhost:5000/img"), "img");
        assert_eq!(custom_tag("r.io/x/img@sha256:abc"), "img");
        assert_eq!(custom_tag("img:v1"), "img");
    }
}
