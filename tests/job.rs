//! The build Job: the exact buildctl argument list and the whole Job object (golden files
//! under tests/golden/, rewritten with `UPDATE_GOLDEN=1 cargo test --test job`), and the
//! wrapper script run for real with a stand-in for buildctl.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use imagebuild_operator::api::ImageBuildRunSpec;
use imagebuild_operator::job::{self, BuildReport, JobInputs, PhaseBuild, buildctl_args};
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
        for arg in buildctl_args(&build, node, spec.registry.insecure) {
            out.push_str(&arg);
            out.push('\n');
        }
    }
    golden("buildctl-args.txt", &out);

    // The facts the golden file must show, stated once more so a bad regeneration fails.
    let asm = node(&plan, Phase::Assembly, Some("django__django-11333"));
    let args = buildctl_args(&PhaseBuild::of(spec, Phase::Assembly).unwrap(), asm, false);
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
    let args = buildctl_args(
        &PhaseBuild::of(spec, Phase::Builder).unwrap(),
        builder,
        false,
    );
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
    let mut value = serde_json::to_value(&job).unwrap();
    // The wrapper script is pinned by its own file; keep the golden Job readable.
    let command = &mut value["spec"]["template"]["spec"]["containers"][0]["command"];
    assert_eq!(command[2], job::WRAPPER);
    command[2] = "<src/job/wrapper.sh>".into();
    golden(
        "job-assembly.yaml",
        &serde_yaml_ng::to_string(&value).unwrap(),
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

/// Runs the wrapper with a stand-in `buildctl` that prints `output`, writes BuildKit's
/// metadata file when it succeeds, and exits with `code`. Returns the exit status and the
/// termination message.
fn run_wrapper(output: &str, code: i32, inline: Option<&str>) -> (i32, String, PathBuf) {
    let dir = scratch(&code.to_string());
    let fake = dir.join("buildctl");
    let metadata = if code == 0 {
        format!(
            "printf '{{\\n  \"containerimage.digest\": \"sha256:abc123\",\\n  \"image.name\": \"x\"\\n}}\\n' > {}/metadata.json\n",
            dir.display()
        )
    } else {
        String::new()
    };
    std::fs::write(
        &fake,
        format!("#!/bin/sh\ncat <<'OUT'\n{output}\nOUT\n{metadata}exit {code}\n"),
    )
    .unwrap();
    let status = wrapper(&dir, &fake)
        .arg("build")
        .envs(inline.map(|d| ("IMAGEBUILD_DOCKERFILE", d)))
        .output()
        .unwrap();
    let message = std::fs::read_to_string(dir.join("result")).unwrap();
    (status.status.code().unwrap(), message, dir)
}

/// A fresh scratch directory for one wrapper run.
fn scratch(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "imagebuild-wrapper-{kind}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The wrapper, as the build pod runs it, around `sh program`, working in `dir`.
fn wrapper(dir: &Path, program: &Path) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(job::WRAPPER)
        .arg("imagebuild-build")
        .arg("sh")
        .arg(program)
        .env("IMAGEBUILD_WORK_DIR", dir)
        .env("IMAGEBUILD_TERMINATION_LOG", dir.join("result"));
    command
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn wrapper_reports_a_successful_build() {
    let log = "#12 pushing layers\n#12 pushing layers 2.5s done\n#13 pushing manifest 1.0s done";
    let (code, message, dir) = run_wrapper(log, 0, Some("FROM scratch"));
    assert_eq!(code, 0);
    let report = BuildReport::parse(&message).expect(&message);
    assert_eq!(report.exit_code, 0);
    assert_eq!(report.digest, "sha256:abc123");
    assert_eq!(report.push_seconds, 2);
    assert_eq!(report.error_tail, "");
    assert_eq!(
        std::fs::read_to_string(dir.join("context/Dockerfile")).unwrap(),
        "FROM scratch\n"
    );
}

#[test]
fn wrapper_reports_a_failed_build_with_its_output_tail() {
    let mut log = String::new();
    for i in 0..100 {
        log.push_str(&format!("#5 step {i}\n"));
    }
    log.push_str("ERROR: \"quoted\" back\\slash\ttab: no space left on device");
    let (code, message, _) = run_wrapper(&log, 1, None);
    assert_eq!(code, 1);
    assert!(
        message.len() < 4096,
        "termination messages are cut at 4 KiB: {}",
        message.len()
    );
    let report = BuildReport::parse(&message).expect(&message);
    assert_eq!(report.exit_code, 1);
    assert_eq!(report.digest, "");
    assert!(
        report
            .error_tail
            .ends_with("ERROR: \"quoted\" back\\slash tab: no space left on device\n"),
        "{:?}",
        report.error_tail
    );
    assert!(
        !report.error_tail.contains("step 10\n"),
        "only the tail is kept"
    );
    assert_eq!(
        job::classify_text(&report.error_tail),
        Some(imagebuild_operator::schedule::FailureClass::DiskFull)
    );
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
    let a = job::PodAnnotations::compile(&spec).unwrap();
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
fn the_wrapper_gives_buildkitd_the_http_registries() {
    let dir = scratch("http");
    // A stand-in for buildctl-daemonless.sh: shows the flags buildkitd would get.
    let fake = dir.join("daemonless");
    std::fs::write(&fake, "#!/bin/sh\necho \"flags:$BUILDKITD_FLAGS\"\n").unwrap();
    let out = wrapper(&dir, &fake)
        .env("BUILDKITD_FLAGS", "--oci-worker-no-process-sandbox")
        .env(
            "IMAGEBUILD_HTTP_REGISTRIES",
            "kind-registry:5000 localhost:5001",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let config = dir.join("buildkitd.toml");
    assert!(
        stdout.contains(&format!(
            "flags:--oci-worker-no-process-sandbox --config={}",
            config.display()
        )),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "[registry.\"kind-registry:5000\"]\n  http = true\n  insecure = true\n\
         [registry.\"localhost:5001\"]\n  http = true\n  insecure = true\n"
    );
}
