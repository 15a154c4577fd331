//! Real builds on the local environment's real node: BuildKit in the project's executor
//! images, rootless and privileged, builds a SWE-bench-shaped run (a multi-stage builder
//! from a git repository at a revision, bases on upstream images only the local registry
//! has, assemblies in the OpenHands pattern, a post-assembly layer), pushes every image,
//! and each assembly runs as a pod that shows files from the builder, its base and its
//! upstream image. Also: the builder's registry cache, a re-apply that builds nothing, and
//! real failures classified from real BuildKit output.
//!
//! Needs `e2e/cluster up` (with its real node); run with `e2e/cluster test`. The tests
//! take turns: the node has two cores.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::cluster::{LogsOnFailure, Operator, TestNamespace, apply_crd, eventually};
use common::real::{DOCKERFILE, RealNode, RealRun, reports, watch_termination_messages};
use common::runs::{delete_run, records, watch_jobs_pushing};
use common::tool;
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use imagebuild_operator::instances::RawInstance;
use imagebuild_operator::manifest::{Record, RecordStatus};
use imagebuild_operator::plan::{Phase, Plan};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::ResourceExt;
use kube::api::PostParams;
use oci_client::secrets::RegistryAuth;

/// One test on the real node at a time.
static REAL_NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A test's namespace, operator, fixture repository and images, in `registry`.
struct Fixture {
    real: RealNode,
    ns: TestNamespace,
    _logs: LogsOnFailure,
    _operator: Operator,
    registry: String,
    auth: RegistryAuth,
    /// The fixture repository on the git server, and its commit.
    git_url: String,
    revision: String,
    /// Instance id -> its upstream image.
    upstream: BTreeMap<String, String>,
}

/// An upstream image of the fixture: its instance ids and the marker files it carries.
struct Upstream<'a> {
    ids: &'a [&'a str],
    markers: &'a [&'a str],
    /// Pushed (false: the image is missing, as a failure test wants).
    pushed: bool,
}

const fn up<'a>(ids: &'a [&'a str]) -> Upstream<'a> {
    Upstream {
        ids,
        markers: &[],
        pushed: true,
    }
}

/// The upstream images of the SWE-bench-shaped fixture: three, one shared by two
/// instances, one for the sphinx-doc instance that gets the post-assembly layer.
const SWEBENCH: &[Upstream<'static>] = &[
    up(&["astropy__astropy-12907"]),
    up(&["django__django-11099", "django__django-11133"]),
    up(&["sphinx-doc__sphinx-10323"]),
];

impl Fixture {
    async fn new(prefix: &str, authenticated: bool, upstreams: &[Upstream<'_>]) -> Fixture {
        let (env, real) = RealNode::get();
        let logs = env.logs_on_failure();
        let client = env.client().await;
        apply_crd(&client).await;
        let ns = TestNamespace::create(&client, prefix).await;
        let (registry, auth) = if authenticated {
            (real.auth_registry.clone(), real.auth())
        } else {
            (real.registry.clone(), RegistryAuth::Anonymous)
        };
        let git_url = format!("{}/{}.git", real.git, ns.name);
        let revision = real.git_repo(
            &ns.name,
            &[
                ("docker/Dockerfile", DOCKERFILE),
                ("agent/server.py", "print('agent server')\n"),
            ],
        );
        // Everything a build pulls is in the run's registry: busybox, the upstream images.
        real.push_image(&format!("{registry}/{}/busybox:e2e", ns.name), &[], &auth)
            .await;
        let mut upstream = BTreeMap::new();
        let mut lines = String::new();
        for u in upstreams {
            let (repo, name) = u.ids[0].split_once("__").unwrap();
            let image = format!(
                "{registry}/{}/swebench/sweb.eval.x86_64.{repo}_1776_{name}:latest",
                ns.name
            );
            if u.pushed {
                let text = format!("{image}\n");
                let mut files = vec![("upstream.txt", text.as_str())];
                files.extend(u.markers.iter().map(|m| (*m, "")));
                real.push_image(&image, &files, &auth).await;
            }
            for id in u.ids {
                upstream.insert(id.to_string(), image.clone());
                lines.push_str(&serde_json::json!({"id": id, "image": image}).to_string());
                lines.push('\n');
            }
        }
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "instances"},
            "data": {"instances.jsonl": lines},
        }))
        .unwrap();
        ns.api::<ConfigMap>()
            .create(&PostParams::default(), &cm)
            .await
            .unwrap();
        let operator = Operator::start(&ns.name);
        Fixture {
            real,
            ns,
            _logs: logs,
            _operator: operator,
            registry,
            auth,
            git_url,
            revision,
            upstream,
        }
    }

    /// A run of the fixture with the given executor.
    fn run<'a>(&'a self, name: &'a str, executor: &'a str, mode: &'a str) -> RealRun<'a> {
        RealRun {
            name,
            registry: &self.registry,
            prefix: &self.ns.name,
            executor,
            mode,
            git: &self.git_url,
            revision: &self.revision,
            instances: "instances",
            push_secret: None,
            builder_sleep: 0,
            max_workers: 3,
            build_timeout: "300s",
            attempts: 2,
        }
    }

    /// The plan the operator works from, computed here.
    fn plan(&self, run: &ImageBuildRun) -> Plan {
        let raw: Vec<RawInstance> = self
            .upstream
            .iter()
            .map(|(id, image)| RawInstance {
                id: id.clone(),
                image: Some(image.clone()),
            })
            .collect();
        let instances = imagebuild_operator::instances::select(raw, &run.spec.instances).unwrap();
        imagebuild_operator::plan::build(&run.name_any(), &run.spec, &instances).unwrap()
    }
}

/// Creates `run`, waits for it to end and checks it ended in `phase`; the run and how
/// long it took.
async fn run_to(fx: &Fixture, run: &ImageBuildRun, phase: RunPhase) -> (ImageBuildRun, Duration) {
    let runs = fx.ns.api::<ImageBuildRun>();
    let started = Instant::now();
    runs.create(&PostParams::default(), run).await.unwrap();
    let name = run.name_any();
    let done = eventually(
        Duration::from_secs(600),
        &format!("run {name} to end"),
        || async {
            let run = runs.get(&name).await.ok()?;
            let phase = run.status.as_ref()?.phase?;
            use RunPhase::*;
            matches!(phase, Succeeded | PartiallySucceeded | Failed | Cancelled).then_some(run)
        },
    )
    .await;
    let status = done.status.as_ref().unwrap();
    assert_eq!(status.phase, Some(phase), "run {name}: {status:#?}");
    (done, started.elapsed())
}

/// Builds the SWE-bench-shaped run for real and checks every image: built once on the
/// real node, in the registry under its exact tag with the digest the manifest records,
/// reported through the termination message of a real pod, and runnable: each assembly
/// prints a file from the builder, one from its base and one from its upstream image.
async fn builds_every_image(fx: &Fixture, run: &ImageBuildRun) -> BTreeMap<String, Record> {
    let messages = watch_termination_messages(fx.ns.api::<Pod>());
    let (done, took) = run_to(fx, run, RunPhase::Succeeded).await;
    let status = done.status.unwrap();
    println!(
        "{}: {} images built for real in {:.0} s ({:?})",
        run.name_any(),
        status.builder.succeeded
            + status.bases.succeeded
            + status.assemblies.succeeded
            + status.post_assemblies.succeeded,
        took.as_secs_f64(),
        run.spec.executor.mode
    );
    assert_eq!((status.builder.total, status.builder.succeeded), (1, 1));
    assert_eq!((status.bases.total, status.bases.succeeded), (3, 3));
    assert_eq!(
        (status.assemblies.total, status.assemblies.succeeded),
        (4, 4)
    );
    assert_eq!(
        (
            status.post_assemblies.total,
            status.post_assemblies.succeeded
        ),
        (1, 1)
    );
    assert_eq!(status.failed_total, 0);

    let plan = fx.plan(run);
    let records = records(&fx.ns.api::<ConfigMap>(), &run.name_any()).await;
    assert_eq!(records.len(), plan.nodes.len(), "{records:?}");
    // The post layer replaces its assembly's tag: the registry serves the layer's image.
    let replaced: BTreeMap<&str, &str> = plan
        .nodes
        .iter()
        .filter(|n| n.phase == Phase::PostAssembly)
        .map(|n| (&*n.image, n.job_name.as_str()))
        .collect();
    let reports = reports(&messages);
    for node in &plan.nodes {
        let record = &records[&node.job_name];
        println!(
            "  {:<12} {:>3} s build, {:>3} s push, {:>3} s from Job start to end  {}",
            record.phase.as_str(),
            record.build_seconds.unwrap_or_default(),
            record.push_seconds.unwrap_or_default(),
            record.duration_seconds.unwrap_or_default(),
            node.image
        );
        assert_eq!(
            (record.status, record.attempt_count),
            (RecordStatus::Built, 1),
            "{record:?}"
        );
        assert_eq!(record.image(), &*node.image);
        assert_eq!(record.node.as_deref(), Some(fx.real.node.as_str()));
        let digest = record
            .digest
            .as_ref()
            .expect("a digest from the build")
            .to_string();
        let served_by = match (node.phase, replaced.get(&*node.image)) {
            (Phase::Assembly, Some(post)) => &records[*post],
            _ => record,
        };
        assert_eq!(
            fx.real.digest(&node.image, &fx.auth).await,
            served_by.digest.as_ref().map(ToString::to_string),
            "{} in the registry",
            node.image
        );
        // The wrapper's report, as the real pod's termination message carried it.
        let pod = record
            .log_path
            .as_deref()
            .unwrap()
            .split('/')
            .nth(1)
            .unwrap();
        let report = reports
            .get(pod)
            .unwrap_or_else(|| panic!("no termination message seen for {pod}"));
        assert_eq!((report.exit_code, report.stage.as_str()), (0, "build"));
        assert_eq!(report.digest, digest);
        assert_eq!(Some(report.build_seconds), record.build_seconds);
        assert_eq!(Some(report.push_seconds), record.push_seconds);
        assert!(report.build_seconds >= report.push_seconds, "{report:?}");
    }

    // Each assembly image, run as a pod on the real node.
    let pods = fx.ns.api::<Pod>();
    for (i, node) in plan
        .nodes
        .iter()
        .filter(|n| n.phase == Phase::Assembly)
        .enumerate()
    {
        let id = node.instance_id.as_deref().unwrap();
        let upstream = &fx.upstream[id];
        let post = replaced.contains_key(&*node.image);
        let script = format!(
            "cat /agent-server/from-builder.txt /base.txt /upstream.txt{} && ls /agent-server",
            if post { " /post-assembly.txt" } else { "" }
        );
        let out = fx
            .real
            .run_pod(
                &pods,
                &format!("{}-check-{i}", run.name_any()),
                &node.image,
                &script,
                run.spec
                    .registry
                    .push_secret_ref
                    .as_ref()
                    .map(|s| s.name.as_str()),
            )
            .await;
        let mut want = format!("from the builder\nbase of {upstream}\n{upstream}\n");
        if post {
            want.push_str("docutils<0.21\n");
        }
        want.push_str("from-builder.txt\nserver.py\n");
        assert_eq!(out, want, "{id}");
    }
    records
}

/// The builder's record in `records`.
fn builder(records: &BTreeMap<String, Record>) -> &Record {
    records
        .values()
        .find(|r| r.phase == Phase::Builder)
        .unwrap()
}

#[tokio::test]
async fn a_rootless_run_builds_pushes_and_runs_every_image_then_reuses_its_cache() {
    let _turn = REAL_NODE.lock().await;
    let fx = Fixture::new("e2e-real-rootless", true, SWEBENCH).await;
    fx.real
        .push_secret(&fx.ns.api::<Secret>(), "push", None)
        .await;
    let spec = RealRun {
        push_secret: Some("push"),
        builder_sleep: 8,
        ..fx.run("fleet", &fx.real.executor_rootless, "rootless")
    };
    let run = spec.resource();
    let first = builds_every_image(&fx, &run).await;

    // The builder again, forced, with the cache the first build exported to the registry.
    let mut again = spec.resource();
    again.metadata.name = Some("fleet-cached".into());
    again.spec.force_rebuild = true;
    again.spec.instances.select = Some(vec!["astropy__astropy-12907".into()]);
    let (_, took) = run_to(&fx, &again, RunPhase::Succeeded).await;
    let cached = records(&fx.ns.api::<ConfigMap>(), "fleet-cached").await;
    let (cold, warm) = (builder(&first), builder(&cached));
    println!(
        "builder: {} s with an empty cache ({} steps cached), {} s importing the registry cache ({} steps cached); the forced 3-image run took {:.0} s",
        cold.build_seconds.unwrap(),
        cold.cached_steps.unwrap(),
        warm.build_seconds.unwrap(),
        warm.cached_steps.unwrap(),
        took.as_secs_f64()
    );
    assert_eq!(cold.cached_steps, Some(0), "{cold:?}");
    assert!(warm.cached_steps.unwrap() >= 3, "{warm:?}");
    assert!(
        warm.build_seconds.unwrap() < cold.build_seconds.unwrap(),
        "the cached build was not faster: {warm:?} {cold:?}"
    );

    // The first run applied again: every image is in the registry, nothing is built.
    delete_run(&fx.ns.api::<ImageBuildRun>(), "fleet").await;
    let jobs = watch_jobs_pushing(fx.ns.api::<Job>(), false);
    let (done, _) = run_to(&fx, &run, RunPhase::Succeeded).await;
    let status = done.status.unwrap();
    assert_eq!(
        (
            status.builder.skipped,
            status.bases.skipped,
            status.assemblies.skipped
        ),
        (1, 3, 4)
    );
    let again = records(&fx.ns.api::<ConfigMap>(), "fleet").await;
    assert!(
        again
            .values()
            .all(|r| r.status.is_skipped() && r.attempt_count == 0),
        "{again:?}"
    );
    assert_eq!(jobs.lock().unwrap().jobs.len(), 0, "a Job was created");
    fx.ns.delete().await;
}

#[tokio::test]
async fn a_privileged_run_builds_pushes_and_runs_every_image() {
    let _turn = REAL_NODE.lock().await;
    let fx = Fixture::new("e2e-real-privileged", false, SWEBENCH).await;
    let run = fx.run("fleet", &fx.real.executor, "privileged").resource();
    builds_every_image(&fx, &run).await;
    fx.ns.delete().await;
}

#[tokio::test]
async fn real_build_failures_are_classified_from_buildkit_output() {
    let _turn = REAL_NODE.lock().await;
    let upstreams = [
        up(&["ok__ok-1"]),
        Upstream {
            ids: &["fails__fails-1"],
            markers: &["fail-build"],
            pushed: true,
        },
        Upstream {
            ids: &["missing__missing-1"],
            markers: &[],
            pushed: false,
        },
        Upstream {
            ids: &["slow__slow-1"],
            markers: &["slow"],
            pushed: true,
        },
    ];
    let fx = Fixture::new("e2e-real-failures", false, &upstreams).await;
    let spec = RealRun {
        build_timeout: "25s",
        ..fx.run("failures", &fx.real.executor_rootless, "rootless")
    };
    let run = spec.resource();
    let (done, took) = run_to(&fx, &run, RunPhase::PartiallySucceeded).await;
    println!("failures run: {:.0} s", took.as_secs_f64());
    let status = done.status.unwrap();
    for f in &status.failures {
        println!("  {} {} {}: {}", f.phase, f.instance, f.reason, f.message);
    }
    let plan = fx.plan(&run);
    let records = records(&fx.ns.api::<ConfigMap>(), "failures").await;
    let base = |id: &str| &records[&common::runs::job_of(&plan, Phase::Base, id)];
    let assembly = |id: &str| &records[&common::runs::job_of(&plan, Phase::Assembly, id)];
    let missing = &fx.upstream["missing__missing-1"];

    assert_eq!(assembly("ok__ok-1").status, RecordStatus::Built);
    // A RUN that exits 1: a build error, one attempt, BuildKit's own last lines kept.
    let failed = base("fails__fails-1");
    assert_eq!(
        (
            failed.status,
            failed.failure_class.as_deref(),
            failed.attempt_count
        ),
        (RecordStatus::Failed, Some("BuildError"), 1),
        "{failed:?}"
    );
    let error = failed.error.as_deref().unwrap();
    assert!(error.contains("this base cannot be built"), "{error}");
    assert!(
        error
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .contains("exit code: 1"),
        "{error}"
    );
    // An upstream image that does not exist: says which.
    let lost = base("missing__missing-1");
    assert_eq!(
        (lost.failure_class.as_deref(), lost.attempt_count),
        (Some("ImageNotFound"), 1),
        "{lost:?}"
    );
    assert!(
        lost.error.as_deref().unwrap().contains(missing.as_str()),
        "{lost:?}"
    );
    // Longer than timeouts.build: the deadline, retried as the policy says (two attempts).
    let slow = base("slow__slow-1");
    assert_eq!(
        (
            slow.status,
            slow.failure_class.as_deref(),
            slow.attempt_count
        ),
        (RecordStatus::Failed, Some("DeadlineExceeded"), 2),
        "{slow:?}"
    );
    assert_eq!(status.retries_exhausted, 1);
    for id in ["fails__fails-1", "missing__missing-1", "slow__slow-1"] {
        assert_eq!(
            assembly(id).failure_class.as_deref(),
            Some("DependencyFailed"),
            "{id}"
        );
    }
    // The status names each failure with the line that says why.
    let in_status = |reason: &str| {
        status
            .failures
            .iter()
            .find(|f| f.phase == "base" && f.reason == reason)
            .unwrap_or_else(|| panic!("a base failing with {reason} in {:?}", status.failures))
            .message
            .clone()
    };
    assert!(in_status("BuildError").contains("exit code: 1"));
    assert!(in_status("ImageNotFound").contains(missing.as_str()));
    assert!(in_status("DeadlineExceeded").contains("deadline"));

    // The failed base's whole log (20,000 lines, about 2 MB) outlives its Job: its pod is
    // kept for it, and the plugin prints it from the first line to the last.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-imagebuild"))
        .args(["logs", "failures", "--failed", "-n", &fx.ns.name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = text.find("pip log line 0: ").expect("the log's first line");
    let last = text
        .find("pip log line 19999: ")
        .expect("the log's last line");
    assert!(first < last);
    assert!(text.contains("this base cannot be built"));
    assert!(
        !text.contains("output clipped"),
        "BuildKit clipped the step's output"
    );
    // Every line (BuildKit repeats the step's last lines under its error, too).
    let numbers: std::collections::BTreeSet<u32> = regex::Regex::new(r"pip log line ([0-9]+): ")
        .unwrap()
        .captures_iter(&text)
        .map(|c| c[1].parse().unwrap())
        .collect();
    let lines = numbers.len();
    assert_eq!(numbers, (0..20_000).collect(), "every line of the step");
    println!(
        "logs --failed: {} bytes, {lines} lines of the failed base's RUN",
        text.len()
    );
    assert!(text.len() >= 1_000_000);
    fx.ns.delete().await;
}

#[tokio::test]
async fn a_push_refused_for_wrong_credentials_fails_with_auth() {
    let _turn = REAL_NODE.lock().await;
    let fx = Fixture::new("e2e-real-auth", true, &[up(&["ok__ok-1"])]).await;
    fx.real
        .push_secret(&fx.ns.api::<Secret>(), "wrong", Some("not-the-password"))
        .await;
    let spec = RealRun {
        push_secret: Some("wrong"),
        ..fx.run("refused", &fx.real.executor, "privileged")
    };
    let mut run = spec.resource();
    // Nothing to pull (the credentials would fail that first): only the push is refused.
    // Forced, so the operator does not ask the registry first either.
    run.spec.builder.context =
        serde_json::from_value(serde_json::json!({"inline": "FROM scratch\nLABEL e2e=auth\n"}))
            .unwrap();
    run.spec.builder.target = None;
    run.spec.force_rebuild = true;
    let (done, _) = run_to(&fx, &run, RunPhase::Failed).await;
    let records = records(&fx.ns.api::<ConfigMap>(), "refused").await;
    let b = builder(&records);
    assert_eq!(
        (b.failure_class.as_deref(), b.attempt_count),
        (Some("RegistryAuthFailed"), 1),
        "{b:?}"
    );
    let error = b.error.as_deref().unwrap().to_ascii_lowercase();
    println!("refused push: {}", error.trim_end().lines().last().unwrap());
    assert!(
        error.contains("401") || error.contains("unauthorized"),
        "{error}"
    );
    let failure = &done.status.unwrap().failures;
    assert!(
        failure.iter().any(|f| f.reason == "RegistryAuthFailed"),
        "{failure:?}"
    );
    fx.ns.delete().await;
}

#[tokio::test]
async fn an_executor_whose_daemon_cannot_start_fails_with_the_cause() {
    let _turn = REAL_NODE.lock().await;
    let fx = Fixture::new("e2e-real-nostart", false, &[up(&["ok__ok-1"])]).await;
    // Debian's setuid newuidmap: this node refuses it the user namespace mapping.
    let run = fx
        .run("nostart", &fx.real.executor_setuid, "rootless")
        .resource();
    let (done, _) = run_to(&fx, &run, RunPhase::Failed).await;
    let records = records(&fx.ns.api::<ConfigMap>(), "nostart").await;
    let b = builder(&records);
    assert_eq!(
        (b.failure_class.as_deref(), b.attempt_count),
        (Some("ExecutorStartFailed"), 1),
        "{b:?}"
    );
    let error = b.error.as_deref().unwrap();
    let last = error.trim_end().lines().last().unwrap();
    println!("executor that cannot start: {last}");
    assert!(last.starts_with("buildkitd did not start"), "{error}");
    assert!(last.contains("newuidmap"), "{error}");
    let status = done.status.unwrap();
    let failure = status
        .failures
        .iter()
        .find(|f| f.phase == "builder")
        .unwrap();
    assert_eq!(failure.reason, "ExecutorStartFailed");
    assert!(failure.message.contains("newuidmap"), "{failure:?}");
    fx.ns.delete().await;
}

#[tokio::test]
async fn the_real_node_is_ready_tainted_and_its_pods_reach_only_this_machine() {
    let (env, real) = RealNode::get();
    let _logs = env.logs_on_failure();
    let client = env.client().await;
    let node = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .get(&real.node)
        .await
        .unwrap();
    let labels = node.labels();
    assert_eq!(labels["imagebuild.dev/disk"], "large");
    assert_eq!(labels["imagebuild.dev/real"], "true");
    let taints = node
        .spec
        .as_ref()
        .unwrap()
        .taints
        .clone()
        .unwrap_or_default();
    assert!(
        taints
            .iter()
            .any(|t| t.key == "imagebuild.dev/real" && t.effect == "NoSchedule"),
        "{taints:?}"
    );
    let status = node.status.unwrap();
    let ready = status.conditions.unwrap_or_default();
    assert!(
        ready
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        "{ready:?}"
    );
    let info = status.node_info.unwrap();
    let pins = std::fs::read_to_string("e2e/versions.env").unwrap();
    let pin = |key: &str| {
        pins.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap()
            .to_string()
    };
    assert_eq!(info.kubelet_version, pin("KUBERNETES_VERSION"));
    let containerd = pin("DEBIAN_CONTAINERD");
    let upstream = containerd.split('~').next().unwrap();
    assert_eq!(
        info.container_runtime_version,
        format!("containerd://{upstream}")
    );
    // `e2e/cluster status` says so too.
    let out = std::process::Command::new("e2e/cluster")
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("kubelet") && l.contains("running, healthy")),
        "{text}"
    );

    // A pod there: on the bridge with one on-link route and no default route, it reaches
    // the registry at its pod address; its log comes through the API server.
    let ns = TestNamespace::create(&client, "e2e-real-node").await;
    let script = format!(
        "ip route; wget -q -O /dev/null http://{}/v2/ && ip neigh && echo registry reached",
        real.registry
    );
    let out = real
        .run_pod(&ns.api::<Pod>(), "probe", &real.busybox, &script, None)
        .await;
    // The host's side of the bridge has a MAC address of its own, set, not taken from a
    // port: it stays what running pods resolved while other pods come and go (a bridge
    // that took its lowest port's address changed it, and pods' frames went nowhere
    // until their ARP entries expired). The pod came and went; the address is the same.
    let node_ip = real.registry.rsplit_once(':').unwrap().0;
    let shown = tool("ip", &["-o", "addr", "show", "to", node_ip]);
    let bridge = shown
        .split_whitespace()
        .nth(1)
        .expect("the bridge")
        .to_string();
    let sys = |f: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{bridge}/{f}"))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(sys("addr_assign_type"), "3", "the bridge's address is set");
    let mac = sys("address");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{node_ip} ")) && l.contains(&mac)),
        "the pod resolved {node_ip} to the bridge's {mac}:\n{out}"
    );
    let routes: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" dev ") && !l.contains(" lladdr "))
        .collect();
    let subnet = format!("{}.0/24", real.registry.rsplit_once('.').unwrap().0);
    assert_eq!(routes.len(), 1, "{out}");
    assert!(routes[0].starts_with(&subnet), "{out}");
    assert!(!out.contains("default"), "{out}");
    assert!(out.trim_end().ends_with("registry reached"), "{out}");
    ns.delete().await;
}
