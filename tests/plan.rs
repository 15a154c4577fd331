//! The build plan from the examples and from bad input: tags byte-for-byte as the harness
//! computes them, deterministic Job names, and a precise error for every invalid run.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;

use imagebuild_operator::cli::{load_run, plan_run};
use imagebuild_operator::instances::{self, InstanceError};
use imagebuild_operator::names::is_dns1123_label;
use imagebuild_operator::plan::{self, Phase, PlanError};

use common::{SWEBENCH_IDS as IDS, block_on};

fn swebench_plan() -> (Vec<String>, plan::Plan) {
    let ids: Vec<String> = std::fs::read_to_string(IDS)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    (ids, common::swebench().1)
}

#[test]
fn swebench_verified_resolves_to_the_official_images_and_tags() {
    let (ids, plan) = swebench_plan();
    assert_eq!(ids.len(), 500);
    assert_eq!(plan.count(Phase::Builder), 1);
    assert_eq!(plan.count(Phase::Base), 500);
    assert_eq!(plan.count(Phase::Assembly), 500);
    let sphinx = ids
        .iter()
        .filter(|id| id.starts_with("sphinx-doc__"))
        .count();
    assert_eq!(plan.count(Phase::PostAssembly), sphinx);
    // Every node is found by its Job's name, and no other name finds one.
    for (id, node) in plan.nodes.iter().enumerate() {
        assert_eq!(plan.node_of(&node.job_name), Some(id), "{}", node.job_name);
        assert_eq!(plan.node_of(&format!("{}x", node.job_name)), None);
    }
    assert_eq!(plan.node_of(""), None);
    assert_eq!(
        &*plan.nodes[0].image,
        "ghcr.io/openhands/eval-builder:43376f1"
    );

    let assemblies: Vec<&plan::Node> = plan
        .nodes
        .iter()
        .filter(|n| n.phase == Phase::Assembly)
        .collect();
    for (id, node) in ids.iter().zip(&assemblies) {
        // The harness: sweb.eval.x86_64.{instance_id with __ -> _1776_}, lower-cased.
        let custom = format!(
            "sweb.eval.x86_64.{}",
            id.replace("__", "_1776_").to_lowercase()
        );
        assert_eq!(node.instance_id.as_deref(), Some(id.as_str()));
        assert_eq!(
            node.upstream_image.as_deref(),
            Some(format!("docker.io/swebench/{custom}:latest").as_str())
        );
        assert_eq!(
            &*node.image,
            format!("ghcr.io/openhands/eval-agent-server:43376f1-93c33d0-{custom}-source-minimal")
        );
        let base = &plan.nodes[node.deps[1]];
        assert_eq!(
            &*base.image,
            format!("ghcr.io/openhands/eval-base:93c33d0-{custom}")
        );
        assert_eq!(node.build_arg("BASE_IMAGE").unwrap(), &*base.image);
        assert_eq!(
            node.build_arg("BUILDER_IMAGE").unwrap(),
            "ghcr.io/openhands/eval-builder:43376f1"
        );
        assert_eq!(
            base.build_arg("BASE_IMAGE").unwrap(),
            format!("docker.io/swebench/{custom}:latest")
        );
    }
    // The examples of domain.md, literally.
    let django = assemblies
        .iter()
        .find(|n| n.instance_id.as_deref() == Some("django__django-11333"))
        .unwrap();
    assert_eq!(
        &*django.image,
        "ghcr.io/openhands/eval-agent-server:43376f1-93c33d0-sweb.eval.x86_64.django_1776_django-11333-source-minimal"
    );
    assert_eq!(
        &*plan.nodes[django.deps[1]].image,
        "ghcr.io/openhands/eval-base:93c33d0-sweb.eval.x86_64.django_1776_django-11333"
    );

    let names: HashSet<&str> = plan.nodes.iter().map(|n| n.job_name.as_str()).collect();
    assert_eq!(names.len(), plan.nodes.len(), "Job names are unique");
    assert!(names.iter().all(|n| is_dns1123_label(n)));
}

#[test]
fn the_packed_graph_is_the_nodes_own() {
    let (_, plan) = swebench_plan();
    let n = plan.nodes.len();
    let mut dependents = vec![Vec::new(); n];
    for (id, node) in plan.nodes.iter().enumerate() {
        assert_eq!(plan.phase(id), node.phase);
        assert_eq!(plan.inputs(id), node.deps.as_slice());
        for &dep in &node.deps {
            dependents[dep].push(id);
        }
    }
    assert_eq!(plan.phases().len(), n);
    for (id, expected) in dependents.iter().enumerate() {
        assert_eq!(
            plan.dependents(id),
            expected.as_slice(),
            "dependents of {id}"
        );
    }
    // The shape is the real one: the builder feeds every base, bases feed several
    // assemblies, post-assembly layers sit on assemblies.
    assert!(plan.dependents(0).len() > 1);
    assert!((0..n).any(|id| plan.phase(id) == Phase::PostAssembly && !plan.inputs(id).is_empty()));
    assert_eq!(
        (0..n).map(|id| plan.inputs(id).len()).sum::<usize>(),
        (0..n).map(|id| plan.dependents(id).len()).sum::<usize>()
    );
}

#[test]
fn post_assembly_layers_replace_the_assembly_in_place() {
    let (_, plan) = swebench_plan();
    for post in plan.nodes.iter().filter(|n| n.phase == Phase::PostAssembly) {
        let assembly = &plan.nodes[post.deps[0]];
        assert!(
            post.instance_id
                .as_deref()
                .unwrap()
                .starts_with("sphinx-doc__")
        );
        assert_eq!(post.image, assembly.image);
        assert_eq!(post.build_arg("ASSEMBLY_IMAGE").unwrap(), &*assembly.image);
    }
}

#[test]
fn swegym_uses_its_own_upstream_rule() {
    let run = load_run("examples/swegym-run.yaml".as_ref()).unwrap();
    let plan = block_on(plan_run(
        &run,
        Some(&PathBuf::from("examples/swegym-ids.txt")),
    ))
    .unwrap();
    let upstream: Vec<&str> = plan
        .nodes
        .iter()
        .filter(|n| n.phase == Phase::Assembly)
        .map(|n| n.upstream_image.as_deref().unwrap())
        .collect();
    assert_eq!(
        upstream,
        [
            "docker.io/xingyaoww/sweb.eval.x86_64.astropy_s_astropy-12907:latest",
            "docker.io/xingyaoww/sweb.eval.x86_64.django_s_django-11099:latest",
            "docker.io/xingyaoww/sweb.eval.x86_64.getmoto_s_moto-5752:latest",
        ]
    );
}

#[test]
fn instances_sharing_an_upstream_image_share_one_base() {
    let spec = common::spec_with("{}");
    let raw = common::raw(
        &["a__x-1", "b__y-2", "c__z-3"],
        &[Some("docker.io/u/env:1"), Some("docker.io/u/env:1"), None],
    );
    let plan = common::plan_for(&spec, &raw);
    assert_eq!(plan.count(Phase::Base), 2);
    let assemblies: Vec<&plan::Node> = plan
        .nodes
        .iter()
        .filter(|n| n.phase == Phase::Assembly)
        .collect();
    assert_eq!(
        assemblies[0].deps, assemblies[1].deps,
        "a and b wait on the same base"
    );
    assert_ne!(assemblies[0].deps, assemblies[2].deps);
    assert_eq!(
        assemblies[2].upstream_image.as_deref(),
        Some("docker.io/up/c_1776_z-3:latest")
    );
    assert!(
        assemblies.iter().all(|a| a.deps[0] == 0),
        "every assembly waits on the builder"
    );
}

#[test]
fn job_names_do_not_depend_on_order_or_subset() {
    let spec = common::spec_with("{}");
    let all = instances::select(
        common::raw(&["c__c-3", "a__a-1", "b__b-2"], &[]),
        &spec.instances,
    )
    .unwrap();
    let some = instances::select(common::raw(&["b__b-2"], &[]), &spec.instances).unwrap();
    let (p1, p2) = (
        common::plan_for(&spec, &all),
        common::plan_for(&spec, &some),
    );
    let name = |p: &plan::Plan, id: &str| {
        p.nodes
            .iter()
            .find(|n| n.instance_id.as_deref() == Some(id))
            .unwrap()
            .job_name
            .clone()
    };
    assert_eq!(name(&p1, "b__b-2"), name(&p2, "b__b-2"));
    assert_eq!(p1.nodes[0].job_name, p2.nodes[0].job_name);
}

fn plan_error(patch: &str, ids: &[&str]) -> String {
    let spec = common::spec_with(patch);
    let raw = common::raw(ids, &[]);
    match instances::select(raw, &spec.instances) {
        Err(e) => e.to_string(),
        Ok(selected) => plan::build("run", &spec, &selected)
            .expect_err("plan must fail")
            .to_string(),
    }
}

#[test]
fn bad_input_gets_a_precise_error() {
    assert_eq!(
        plan_error(
            "{instances: {list: [], upstreamImage: 'x/y:1'}}",
            &["a__a-1"]
        ),
        "spec.instances.list: must name at least one instance"
    );
    assert_eq!(
        plan_error("{}", &[]),
        "the instance list is empty (the source has no instances)"
    );
    assert_eq!(
        plan_error("{}", &["a__a-1", "b__b-2", "a__a-1"]),
        "duplicate instance ids: a__a-1"
    );
    assert_eq!(
        plan_error(
            "{builder: {context: {inline: x}, image: 'r.io/b:{{ sdkSah }}'}}",
            &["a__a-1"]
        ),
        "spec.builder.image: unknown variable `sdkSah`"
    );
    assert_eq!(
        plan_error(
            "{assembly: {context: {inline: x}, image: 'r.io/a:{{ repo }}-{{ nope }}'}}",
            &["a__a-1"]
        ),
        "spec.assembly.image: unknown variable `nope` (instance a__a-1)"
    );
    let err = plan_error(
        "{assembly: {context: {inline: x}, image: 'r.io/A:{{ instanceId }}'}}",
        &["a__a-1"],
    );
    assert!(
        err.starts_with("spec.assembly.image: `r.io/A:a__a-1` is not a valid image reference"),
        "{err}"
    );
    assert!(err.ends_with("(instance a__a-1)"), "{err}");
    let err = plan_error(
        "{assembly: {context: {inline: x}, image: 'r.io/a:{{ instanceId }}!'}}",
        &["a__a-1"],
    );
    assert!(err.contains("is not a valid image reference"), "{err}");
    assert_eq!(
        plan_error("{maxWorkers: 0}", &["a__a-1"]),
        "spec.maxWorkers: must be 1..1000, got 0"
    );
    assert_eq!(
        plan_error(
            "{instances: {list: [a], limit: 5, upstreamImage: 'x/y:1'}}",
            &["a__a-1", "b__b-2"]
        ),
        "instances.limit is 5 but only 2 instances are selected"
    );
    assert_eq!(
        plan_error(
            "{instances: {list: [a], select: [a__a-1, zz__z-9], upstreamImage: 'x/y:1'}}",
            &["a__a-1"]
        ),
        "instances.select names ids not in the source: zz__z-9"
    );
    assert_eq!(
        plan_error("{instances: {list: [a]}}", &["a__a-1"]),
        "instance a__a-1 has no upstream image: set spec.instances.upstreamImage or give the image in the source"
    );
    assert_eq!(
        plan_error("{vars: {instanceId: x}}", &["a__a-1"]),
        "spec.vars.instanceId: shadows a built-in template variable"
    );
    assert_eq!(
        plan_error(
            "{retry: {attempts: 3, backoff: {initial: 10m, max: 1m}}}",
            &["a__a-1"]
        ),
        "spec.retry.backoff: initial must not be longer than max"
    );
    let err = plan_error(
        "{base: {context: {inline: x}, image: 'r.io/base:same'}}",
        &["a__a-1", "b__b-2"],
    );
    assert!(
        err.starts_with("spec.base.image renders `r.io/base:same` for both"),
        "{err}"
    );
}

#[test]
fn selection_errors_have_kinds() {
    let spec = common::spec_with("{}");
    let err = instances::select(vec![], &spec.instances).unwrap_err();
    assert!(matches!(err, InstanceError::Empty(_)));
    assert_eq!(err.kind(), "EmptyInstanceList");
    let bad = plan::build(
        "run",
        &common::spec_with("{maxWorkers: 0}"),
        &common::raw(&["a__a-1"], &[]),
    );
    assert_eq!(bad.unwrap_err().kind(), "InvalidSpec");
    assert!(matches!(
        plan::build(
            "run",
            &common::spec_with("{instances: {list: [a]}}"),
            &common::raw(&["a__a-1"], &[])
        ),
        Err(PlanError::MissingUpstreamImage(_))
    ));
}

/// Runs `imagebuild-operator plan` with `args`.
fn plan_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_imagebuild-operator"))
        .arg("plan")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_exits_non_zero_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("ibr-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ids = dir.join("ids.txt");
    std::fs::write(&ids, "django__django-11099\ndjango__django-11099\n").unwrap();
    let out = plan_cli(&[
        "-f",
        "examples/swebench-run.yaml",
        "--instances-file",
        ids.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: duplicate instance ids: django__django-11099"
    );

    let out = plan_cli(&["-f", "Cargo.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: Cargo.toml: "));

    let out = plan_cli(&[
        "-f",
        "examples/swebench-run.yaml",
        "--instances-file",
        IDS,
        "-o",
        "json",
    ]);
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = doc["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1 + 500 + 500 + 44);
    let asm = nodes
        .iter()
        .find(|n| n["instanceId"] == "django__django-11099" && n["phase"] == "assembly")
        .unwrap();
    assert_eq!(asm["dependencies"].as_array().unwrap().len(), 2);
    assert!(
        asm["jobName"]
            .as_str()
            .unwrap()
            .starts_with("swebench-verified-asm-django-django-11099-")
    );
}
