//! The build Job: the exact buildctl argument list and the whole Job object (golden files
//! under tests/golden/, rewritten with `UPDATE_GOLDEN=1 cargo test --test job`). The
//! wrapper script the Job runs (from the run's wrapper ConfigMap) is tested in
//! `tests/wrapper.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use imagebuild_operator::api::ImageBuildRunSpec;
use imagebuild_operator::job::{self, JobInputs, PhaseBuild, buildctl_args};
use imagebuild_operator::plan::{Phase, Plan};

mod common;

use common::swebench;

fn node<'a>(
    plan: &'a Plan,
    phase: Phase,
    instance: Option<&str>,
) -> &'a imagebuild_operator::plan::Node {
    plan.nodes
        .iter()
        .find(|n| n.phase == phase && (instance.is_none() || n.instance_id.as_deref() == instance))
        .unwrap()
}

/// Compares `actual` with the golden file, or rewrites it under UPDATE_GOLDEN=1.
fn golden(name: &str, actual: &str) {
    let path = Path::new("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing: run UPDATE_GOLDEN=1 cargo test --test job",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from the output; if the change is intended, run UPDATE_GOLDEN=1 cargo test --test job\n--- got:\n{actual}",
        path.display()
    );
}

#[test]
fn buildctl_arguments_for_each_phase() {
    let (run, plan) = swebench();
    let spec = &run.spec;
    let mut out = String::new();
    for (phase, instance) in [
        (Phase::Builder, None),
        (Phase::Base, Some("django__django-11333")),
        (Phase::Assembly, Some("django__django-11333")),
        (Phase::PostAssembly, Some("sphinx-doc__sphinx-10323")),
    ] {
        let node = if phase == Phase::Base {
            // The base of the instance's upstream image.
            let asm = node(&plan, Phase::Assembly, instance);
            &plan.nodes[asm
                .deps
                .iter()
                .copied()
                .find(|d| plan.nodes[*d].phase == Phase::Base)
                .unwrap()]
        } else {
            node(&plan, phase, instance)
        };
        let build = PhaseBuild::of(spec, phase).unwrap();
        out.push_str(&format!("# {}\n", phase.as_str()));
        for arg in buildctl_args(&build, node) {
            out.push_str(&arg);
            out.push('\n');
        }
    }
    golden("buildctl-args.txt", &out);

    // The facts the golden file must show, stated once more so a bad regeneration fails.
    let asm = node(&plan, Phase::Assembly, Some("django__django-11333"));
    let args = buildctl_args(&PhaseBuild::of(spec, Phase::Assembly).unwrap(), asm);
    let output = args.iter().position(|a| a == "--output").unwrap();
    assert_eq!(
        args[output + 1],
        format!("type=image,name={},push=true", asm.image)
    );
    assert!(
        args.iter().all(|a| !a.contains("attest")),
        "no attestation requested"
    );
    let builder = node(&plan, Phase::Builder, None);
    let args = buildctl_args(&PhaseBuild::of(spec, Phase::Builder).unwrap(), builder);
    assert!(
        args.contains(
            &"type=registry,ref=ghcr.io/openhands/eval-cache:builder,mode=max".to_string()
        )
    );
    let context = "context=https://github.com/OpenHands/software-agent-sdk.git#43376f1";
    assert!(args.contains(&context.to_string()), "{args:?}");
}

/// The Job inputs of the SWE-bench example run.
fn swebench_inputs(spec: &ImageBuildRunSpec) -> JobInputs<'_> {
    JobInputs {
        run_name: "swebench-verified",
        namespace: "imagebuild",
        run_uid: "00000000-0000-4000-8000-000000000001",
        spec,
        build_timeout: Duration::from_secs(2000),
    }
}

#[test]
fn the_assembly_job_object() {
    let (run, plan) = swebench();
    let asm = node(&plan, Phase::Assembly, Some("django__django-11333"));
    let inputs = swebench_inputs(&run.spec);
    let annotations = BTreeMap::from([("example.com/team".to_string(), "evals".to_string())]);
    let job = job::build_job(&inputs, asm, 2, &annotations).unwrap();
    golden(
        "job-assembly.yaml",
        &serde_yaml_ng::to_string(&job).unwrap(),
    );

    let spec = job.spec.as_ref().unwrap();
    assert_eq!(spec.backoff_limit, Some(0));
    assert_eq!(spec.active_deadline_seconds, Some(2000));
    let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("ImageBuildRun", Some(true))
    );
    let pod = spec.template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    let limits = container
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap();
    assert!(limits.contains_key("ephemeral-storage"));
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, None, "rootless needs no privilege");
    assert_eq!(security.run_as_non_root, Some(true));
}

#[test]
fn pod_annotations_render_per_node_and_attempt_and_drop_empty_values() {
    let spec = common::spec_with(
        r#"
instances: {list: [django__django-11333], upstreamImage: "docker.io/up/{{ repo }}_1776_{{ name }}:latest"}
vars: {sdkSha: 0123456789abcdef, team: evals}
placement:
  podAnnotations:
    example.com/team: "{{ team }}-{{ phase }}"
    example.com/first-try: "{% if attempt == 1 %}yes{% endif %}"
    example.com/repo: "{% if instanceId is defined %}{{ repo }}{% endif %}"
"#,
    );
    let plan = common::plan_for(&spec, &common::raw(&["django__django-11333"], &[]));
    let a = imagebuild_operator::plan::PodAnnotations::compile(&spec).unwrap();
    let asm = node(&plan, Phase::Assembly, None);
    let first = a.render(asm, 1).unwrap();
    assert_eq!(first["example.com/team"], "evals-assembly");
    assert_eq!(first["example.com/first-try"], "yes");
    assert_eq!(first["example.com/repo"], "django");
    let second = a.render(asm, 2).unwrap();
    assert!(!second.contains_key("example.com/first-try"), "{second:?}");
    let base = a.render(node(&plan, Phase::Base, None), 1).unwrap();
    assert_eq!(base["example.com/team"], "evals-base");
    assert!(!base.contains_key("example.com/repo"), "{base:?}");

    // And they reach the pod template, next to the operator's own annotations.
    let inputs = JobInputs {
        run_name: "r",
        namespace: "ns",
        run_uid: "uid",
        spec: &spec,
        build_timeout: Duration::from_secs(60),
    };
    let job = job::build_job(&inputs, asm, 2, &second).unwrap();
    let pod = job
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap();
    assert_eq!(pod["example.com/team"], "evals-assembly");
    assert_eq!(pod["imagebuild.dev/attempt"], "2");
}

#[test]
fn pod_annotation_errors_name_the_field() {
    let spec =
        common::spec_with(r#"placement: {podAnnotations: {example.com/x: "{{ instanceId }}"}}"#);
    // The plan renders every node's annotations, so the run fails before any Job.
    let err =
        imagebuild_operator::plan::build("run", &spec, &common::raw(&["a__a-1"], &[])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.placement.podAnnotations.example.com/x: unknown variable `instanceId` (instance builder)"
    );
    for (key, message) in [
        ("imagebuild.dev/attempt", "reserved"),
        ("Example.com/x", "DNS subdomain"),
        ("example.com/-x", "name part"),
    ] {
        let spec = common::spec_with(&format!("placement: {{podAnnotations: {{{key}: v}}}}"));
        let e = imagebuild_operator::validate::validate(&spec).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("spec.placement.podAnnotations.{key}: "))
                && e.to_string().contains(message),
            "{e}"
        );
    }
}

#[test]
fn an_insecure_registry_is_spoken_to_over_http_for_the_runs_own_images_only() {
    let (mut run, plan) = swebench();
    run.spec.registry.insecure = true;
    let base = node(&plan, Phase::Base, None);
    let inputs = swebench_inputs(&run.spec);
    let job = job::build_job(&inputs, base, 1, &BTreeMap::new()).unwrap();
    let env =
        serde_json::to_value(&job).unwrap()["spec"]["template"]["spec"]["containers"][0]["env"]
            .clone();
    let http = env
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "IMAGEBUILD_HTTP_REGISTRIES")
        .expect("the registry hosts for BuildKit");
    // The base is pushed to ghcr.io; its upstream (docker.io) keeps HTTPS.
    assert_eq!(http["value"], "ghcr.io");
    assert_eq!(job::http_registries(base), vec!["ghcr.io".to_string()]);
    // Declared to buildkitd only: buildctl's own `registry.insecure` would try HTTPS
    // first on every connection.
    let command = job
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .command
        .clone()
        .unwrap();
    // After `sh /imagebuild/build.sh`: buildctl's arguments.
    let args = &command[2..];
    assert!(args.iter().all(|a| !a.contains("insecure")), "{args:?}");

    let mut secure = run.spec.clone();
    secure.registry.insecure = false;
    let inputs = JobInputs {
        spec: &secure,
        ..inputs
    };
    let job = job::build_job(&inputs, base, 1, &BTreeMap::new()).unwrap();
    let env =
        serde_json::to_value(&job).unwrap()["spec"]["template"]["spec"]["containers"][0]["env"]
            .to_string();
    assert!(!env.contains("IMAGEBUILD_HTTP_REGISTRIES"), "{env}");
}

#[test]
fn the_build_pod_runs_the_wrapper_from_the_runs_configmap() {
    let (run, plan) = swebench();
    let inputs = swebench_inputs(&run.spec);
    let wrapper = job::wrapper_object(&inputs);
    let name = wrapper.metadata.name.clone().unwrap();
    assert!(name.starts_with("swebench-verified-wrapper-"), "{name}");
    assert_eq!(wrapper.metadata.namespace.as_deref(), Some("imagebuild"));
    let owner = &wrapper.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("ImageBuildRun", inputs.run_uid)
    );
    let data = wrapper.data.as_ref().unwrap();
    assert_eq!(
        data.get(job::WRAPPER_KEY).map(String::as_str),
        Some(job::WRAPPER)
    );

    // Every build pod mounts it and runs the script from it.
    for node in &plan.nodes {
        let job = job::build_job(&inputs, node, 1, &BTreeMap::new()).unwrap();
        let pod = job.spec.unwrap().template.spec.unwrap();
        let volume = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "wrapper")
            .unwrap();
        assert_eq!(volume.config_map.unwrap().name, name);
        let container = &pod.containers[0];
        let command = container.command.as_ref().unwrap();
        assert_eq!(command[..2], ["sh", "/imagebuild/build.sh"]);
        let mounts = container.volume_mounts.as_ref().unwrap();
        let mount = mounts.iter().find(|m| m.name == "wrapper").unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (job::WRAPPER_DIR, Some(true))
        );
    }

    // Another run of the name (deleted and applied again) has a ConfigMap of its own; one
    // whose name would be too long is cut short with a hash.
    let again = JobInputs {
        run_uid: "00000000-0000-4000-8000-000000000002",
        ..inputs
    };
    assert_ne!(job::wrapper_config_map(&again), name);
    let long = "r".repeat(253);
    let long = JobInputs {
        run_name: &long,
        ..inputs
    };
    let cut = job::wrapper_config_map(&long);
    assert!(
        cut.len() <= 253 && cut.starts_with(&"r".repeat(200)),
        "{cut}"
    );
    assert!(cut.contains("-wrapper-"), "{cut}");
}

#[test]
fn one_template_makes_every_job_of_its_phase_as_one_made_for_each_would() {
    use imagebuild_operator::names::{ANNOTATION_ATTEMPT, ANNOTATION_IMAGE, LABEL_NODE};
    let (mut run, plan) = swebench();
    // The plain-HTTP registries are the one field put in the middle of a list.
    run.spec.registry.insecure = true;
    let inputs = swebench_inputs(&run.spec);
    let annotations = BTreeMap::from([("example.com/team".to_string(), "evals".to_string())]);
    for phase in [Phase::Builder, Phase::Base, Phase::Assembly] {
        let template = job::JobTemplate::new(&inputs, phase).unwrap();
        let nodes: Vec<_> = plan.nodes.iter().filter(|n| n.phase == phase).collect();
        assert!(!nodes.is_empty());
        for (i, node) in nodes.iter().enumerate() {
            let attempt = 1 + i as u32 % 3;
            let job = template.job(&inputs, node, attempt, &annotations).unwrap();
            let fresh = job::job_value(&inputs, node, attempt, &annotations).unwrap();
            assert_eq!(job, fresh, "{}", node.job_name);
            // The node's own fields, on the Job and on its pod.
            assert_eq!(job["metadata"]["name"], node.job_name.as_str());
            for meta in [&job["metadata"], &job["spec"]["template"]["metadata"]] {
                assert_eq!(meta["labels"][LABEL_NODE], job::node_label(node).as_str());
                assert_eq!(meta["annotations"][ANNOTATION_IMAGE], &*node.image);
                assert_eq!(
                    meta["annotations"][ANNOTATION_ATTEMPT],
                    attempt.to_string().as_str()
                );
            }
            let pod = &job["spec"]["template"];
            assert_eq!(pod["metadata"]["annotations"]["example.com/team"], "evals");
            let container = &pod["spec"]["containers"][0];
            let build = PhaseBuild::of(&run.spec, phase).unwrap();
            let args: Vec<_> = container["command"].as_array().unwrap()[2..]
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            assert_eq!(args, buildctl_args(&build, node));
            let http: Vec<_> = container["env"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["name"] == "IMAGEBUILD_HTTP_REGISTRIES")
                .map(|e| e["value"].as_str().unwrap().to_string())
                .collect();
            let hosts = job::http_registries(node);
            let expected: Vec<String> = match hosts.is_empty() {
                true => vec![],
                false => vec![hosts.join(" ")],
            };
            assert_eq!(http, expected);
        }
    }
}
