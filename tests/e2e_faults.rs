//! The fault suite, on the local environment, with figures: each test runs a build run
//! through one fault and asserts that the run completes with every image built, that an
//! independent watcher saw no duplicate Job per (image, attempt), that no record is lost
//! or doubled (one record per image, whose attempt count is the number of Jobs created for
//! it, as the watcher and the API server's audit log show), and prints how long the run
//! took and how long it took to recover.
//!
//! Faults: kube-apiserver restarted mid-run; etcd restarted mid-run; a node lost mid-run
//! (a kwok node deleted under running builds); the registry down for 30 s as a run starts;
//! the operator SIGKILLed at 20 random moments of a 500-instance run; 5% of builds failing
//! transiently at random; every Job delete refused for a while (an admission policy): the
//! run ends only once its finished Jobs are gone; every update of the manifest refused for
//! a while: no finished Job is deleted before its record is written.
//!
//! The faults touch the shared control plane, so the tests of this binary run one at a
//! time (`SERIAL`); no other binary runs beside them.
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{Operator, eventually, setup};
use common::runs::{
    Seen, annotations, audited_job_creates, await_phase, records, swebench_ids, swebench_run,
    watch_jobs_pushing,
};
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use imagebuild_operator::manifest::RecordStatus;
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Instances of the runs through one fault (each instance a base and an assembly, and one
/// builder).
const SMALL: usize = 12;
const SMALL_IMAGES: usize = 2 * SMALL + 1;

/// Instances of the run whose builds fail transiently at random.
const FLAKY: usize = 120;

/// A fault test's fixtures: the environment, a namespace (its logs printed on failure),
/// its runs, and an independent watcher of its Jobs (pushing nothing).
struct Fixture {
    env: common::cluster::Env,
    _logs: common::cluster::LogsOnFailure,
    ns: common::cluster::TestNamespace,
    runs: Api<ImageBuildRun>,
    seen: Arc<Mutex<Seen>>,
}

async fn fixture(prefix: &str) -> Fixture {
    let (env, _logs, ns) = setup(prefix).await;
    let runs = ns.api::<ImageBuildRun>();
    let seen = watch_jobs_pushing(ns.api::<Job>(), false);
    Fixture {
        env,
        _logs,
        ns,
        runs,
        seen,
    }
}

/// Runs `e2e/cluster ARGS` (stop, restart, up); panics if it fails.
fn cluster(args: &[&str]) {
    let out = Command::new("e2e/cluster").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "e2e/cluster {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A SWE-bench-shaped run of `n` instances whose builds take `duration` on kwok.
fn run_of(
    env_registry: &str,
    ns: &str,
    name: &str,
    n: usize,
    workers: u32,
    duration: &str,
) -> ImageBuildRun {
    let mut run = swebench_run(name, env_registry, ns, &swebench_ids(n), workers);
    run.spec.force_rebuild = true;
    run.spec.placement.pod_annotations = annotations(&[("sim.imagebuild.dev/duration", duration)]);
    run.spec.retry.backoff.initial = "1s".into();
    run.spec.retry.backoff.max = "2s".into();
    run
}

/// What a fault left: duplicates, lost records, records whose attempts disagree with the
/// Jobs created. Asserts all three are zero and every image is built; returns the records
/// retried and the Jobs created.
///
/// A record's attempts must lie between the Jobs surely created for it and those that may
/// have been. Surely: the most of what the watcher saw and the creates the API server's
/// audit log shows answered 201 (across an API server restart the watcher relists, and a
/// Job created and deleted before its relist is one it never sees). Maybe: those, and the
/// creates answered with a server error (the operator killed mid-request: the Job may
/// exist all the same, and the watcher then sees it).
async fn verify(
    what: &str,
    env: &common::cluster::Env,
    ns: &common::cluster::TestNamespace,
    seen: &Arc<Mutex<Seen>>,
    run: &ImageBuildRun,
    images: usize,
) -> (usize, usize) {
    let (runs, cms) = (ns.api::<ImageBuildRun>(), ns.api::<ConfigMap>());
    let name = run.name_any();
    let done = runs.get(&name).await.unwrap();
    let status = done.status.as_ref().unwrap();
    assert_eq!(
        status.phase,
        Some(RunPhase::Succeeded),
        "{what}: {status:?}"
    );
    let records = records(&cms, &name).await;
    let (duplicates, watched) = {
        let s = seen.lock().unwrap();
        let duplicates = s.per_attempt().values().filter(|&&n| n > 1).count();
        let mut watched: BTreeMap<String, u32> = BTreeMap::new();
        for job in s.jobs.values() {
            *watched.entry(job.name.clone()).or_default() += 1;
        }
        (duplicates, watched)
    };
    let audited = audited_job_creates(&env.dir, &ns.name);
    let created = |job: &str| {
        let creates = audited.get(job).copied().unwrap_or_default();
        let sure = creates.sure.max(watched.get(job).copied().unwrap_or(0));
        (sure, creates.sure + creates.unsure)
    };
    let lost = images.saturating_sub(records.len())
        + records
            .values()
            .filter(|r| r.status != RecordStatus::Built)
            .count();
    let mismatched: Vec<String> = records
        .iter()
        .filter(|(job, r)| {
            let (sure, maybe) = created(job);
            !(sure..=maybe).contains(&r.attempt_count)
        })
        .map(|(job, r)| {
            format!(
                "{job}: {} attempts; Jobs watched {:?}, audited {:?}",
                r.attempt_count,
                watched.get(job),
                audited.get(job)
            )
        })
        .collect();
    assert_eq!(records.len(), images, "{what}: one record per image");
    assert_eq!(duplicates, 0, "{what}: duplicate Jobs");
    assert_eq!(lost, 0, "{what}: lost records");
    assert!(mismatched.is_empty(), "{what}: {mismatched:?}");
    let retried = records.values().filter(|r| r.attempt_count > 1).count();
    let jobs = records.keys().map(|job| created(job).0 as usize).sum();
    (retried, jobs)
}

/// The first Job the watcher saw created after `t`: how long after `t`.
async fn next_job_after(seen: &Arc<Mutex<Seen>>, t: Instant) -> Duration {
    eventually(
        Duration::from_secs(120),
        "a Job after the fault",
        || async {
            let s = seen.lock().unwrap();
            s.created_after(t)
                .iter()
                .map(|j| j.created)
                .min()
                .map(|c| c - t)
        },
    )
    .await
}

fn figures(fault: &str, images: usize, jobs: usize, wall: Duration, recovery: &str) {
    println!(
        "FAULT | {fault} | {images} images, {jobs} Jobs | run {:.1} s | {recovery} | duplicates 0, lost 0, doubled 0",
        wall.as_secs_f64()
    );
}

/// A run through a restart of control-plane component `component` once `finished` Jobs
/// are done.
async fn through_a_restart_of(component: &str, prefix: &str) {
    let _serial = SERIAL.lock().await;
    let Fixture {
        env,
        _logs,
        ns,
        runs,
        seen,
    } = fixture(prefix).await;
    let _operator = Operator::start(&ns.name);
    let run = run_of(&env.registry, &ns.name, "restart", SMALL, 6, "1s");
    let started = Instant::now();
    runs.create(&PostParams::default(), &run).await.unwrap();
    eventually(Duration::from_secs(120), "6 finished Jobs", || async {
        (seen.lock().unwrap().finished() >= 6).then_some(())
    })
    .await;
    let fault = Instant::now();
    cluster(&["restart", component]);
    let down = fault.elapsed();
    let recovery = next_job_after(&seen, fault).await;
    await_phase(
        &runs,
        "restart",
        RunPhase::Succeeded,
        Duration::from_secs(240),
    )
    .await;
    let wall = started.elapsed();
    let (_, jobs) = verify(component, &env, &ns, &seen, &run, SMALL_IMAGES).await;
    figures(
        &format!("{component} restarted mid-run"),
        SMALL_IMAGES,
        jobs,
        wall,
        &format!(
            "restart took {:.1} s; next Job {:.1} s after the fault began",
            down.as_secs_f64(),
            recovery.as_secs_f64()
        ),
    );
    ns.delete().await;
}

#[tokio::test]
async fn kube_apiserver_restarted_mid_run() {
    through_a_restart_of("kube-apiserver", "e2e-fault-apiserver").await;
}

#[tokio::test]
async fn etcd_restarted_mid_run() {
    through_a_restart_of("etcd", "e2e-fault-etcd").await;
}

/// Deletes, every 200 ms, each unfinished pod bound to `node` (as the pod garbage
/// collector does for a node that is gone), recording its name.
async fn collect_pods_of_lost_node(
    pods: Api<Pod>,
    node: &'static str,
    collected: Arc<Mutex<std::collections::BTreeSet<String>>>,
) {
    let now = kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let bound = ListParams::default().fields(&format!("spec.nodeName={node}"));
    loop {
        if let Ok(list) = pods.list(&bound).await {
            for pod in &list.items {
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                if matches!(phase, Some("Succeeded") | Some("Failed")) {
                    continue;
                }
                let name = pod.name_any();
                if pods.delete(&name, &now).await.is_ok() {
                    collected.lock().unwrap().insert(name);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_node_lost_mid_run_has_its_builds_retried_elsewhere() {
    let _serial = SERIAL.lock().await;
    let Fixture {
        env,
        _logs,
        ns,
        runs,
        seen,
    } = fixture("e2e-fault-node").await;
    let _operator = Operator::start(&ns.name);
    let run = run_of(&env.registry, &ns.name, "node", SMALL, 6, "3s");
    let started = Instant::now();
    runs.create(&PostParams::default(), &run).await.unwrap();
    // Once builds run on kwok-large-0, the node goes (as a machine that died would).
    let pods = ns.api::<Pod>();
    let on_node = |p: &Pod| {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("kwok-large-0")
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    };
    let victims = eventually(
        Duration::from_secs(120),
        "builds running on kwok-large-0",
        || async {
            let list = pods.list(&ListParams::default()).await.ok()?;
            let names: Vec<String> = list
                .items
                .iter()
                .filter(|p| on_node(p))
                .map(|p| p.name_any())
                .collect();
            (!names.is_empty()).then_some(names)
        },
    )
    .await;
    let nodes: Api<Node> = Api::all(env.client().await);
    let fault = Instant::now();
    nodes
        .delete("kwok-large-0", &Default::default())
        .await
        .unwrap();
    // What the pod garbage collector does to the pods of a node that is gone (after a
    // quarantine of 40 s), done at once and kept up until the run ends: a pod bound to
    // the node between the list above and the delete (or by a scheduler that has not yet
    // seen the delete) is collected too, and every pod collected is counted.
    let collected = Arc::new(Mutex::new(std::collections::BTreeSet::<String>::new()));
    let collector = tokio::spawn(collect_pods_of_lost_node(
        pods.clone(),
        "kwok-large-0",
        collected.clone(),
    ));
    let recovery = next_job_after(&seen, fault).await;
    await_phase(&runs, "node", RunPhase::Succeeded, Duration::from_secs(240)).await;
    let wall = started.elapsed();
    collector.abort();
    let collected: Vec<String> = collected.lock().unwrap().iter().cloned().collect();
    assert!(
        victims.iter().any(|v| collected.contains(v)),
        "the builds seen running on the lost node ({victims:?}) were collected: {collected:?}"
    );
    // The node comes back for the other tests.
    cluster(&["up"]);
    let (retried, jobs) = verify("node lost", &env, &ns, &seen, &run, SMALL_IMAGES).await;
    assert!(
        (1..=collected.len()).contains(&retried),
        "the builds on the lost node ({collected:?}) were retried: {retried}"
    );
    figures(
        "a node lost mid-run",
        SMALL_IMAGES,
        jobs,
        wall,
        &format!(
            "{} builds on it, {retried} images retried; next Job {:.1} s after the node went",
            collected.len(),
            recovery.as_secs_f64()
        ),
    );
    ns.delete().await;
}

#[tokio::test]
async fn the_registry_down_for_30_s_is_waited_out_and_said() {
    let _serial = SERIAL.lock().await;
    let Fixture {
        env,
        _logs,
        ns,
        runs,
        seen,
    } = fixture("e2e-fault-registry").await;
    let _operator = Operator::start_with(&ns.name, &["--registry-stall-timeout", "10s"]);
    // Checked against the registry (not forced): nothing is built before it answers.
    let mut run = run_of(&env.registry, &ns.name, "registry", SMALL, 6, "1s");
    run.spec.force_rebuild = false;
    cluster(&["stop", "registry"]);
    let fault = Instant::now();
    runs.create(&PostParams::default(), &run).await.unwrap();
    let degraded = eventually(
        Duration::from_secs(60),
        "Degraded while the registry is down",
        || async {
            let run = runs.get("registry").await.ok()?;
            let c = run
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Degraded")?;
            (c.status == "True").then_some((fault.elapsed(), c.message))
        },
    )
    .await;
    let remaining = Duration::from_secs(30).saturating_sub(fault.elapsed());
    tokio::time::sleep(remaining).await;
    assert_eq!(
        seen.lock().unwrap().jobs.len(),
        0,
        "no Job while nothing is known"
    );
    cluster(&["up"]);
    let up = Instant::now();
    let recovery = next_job_after(&seen, up).await;
    let cleared = eventually(Duration::from_secs(120), "Degraded to clear", || async {
        let run = runs.get("registry").await.ok()?;
        let c = run
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Degraded")?;
        (c.status == "False").then_some(up.elapsed())
    })
    .await;
    await_phase(
        &runs,
        "registry",
        RunPhase::Succeeded,
        Duration::from_secs(240),
    )
    .await;
    let wall = fault.elapsed();
    let (_, jobs) = verify("registry down", &env, &ns, &seen, &run, SMALL_IMAGES).await;
    figures(
        "registry down for the first 30 s of a run",
        SMALL_IMAGES,
        jobs,
        wall,
        &format!(
            "Degraded {:.1} s into the outage ({}); after it: first Job {:.1} s, Degraded cleared {:.1} s",
            degraded.0.as_secs_f64(),
            degraded.1.chars().take(80).collect::<String>(),
            recovery.as_secs_f64(),
            cleared.as_secs_f64()
        ),
    );
    ns.delete().await;
}

#[tokio::test]
async fn the_operator_killed_at_20_random_moments_of_a_500_instance_run() {
    let _serial = SERIAL.lock().await;
    let Fixture {
        env,
        _logs,
        ns,
        runs,
        seen,
    } = fixture("e2e-fault-kill").await;
    let mut operator = Operator::start(&ns.name);
    let run = run_of(&env.registry, &ns.name, "killed", 500, 32, "300ms");
    let images = 1001;
    // 20 moments, by Jobs finished, at random.
    let mut moments: Vec<usize> = (0..20)
        .map(|_| 20 + rand::random::<u32>() as usize % 940)
        .collect();
    moments.sort_unstable();
    let started = Instant::now();
    runs.create(&PostParams::default(), &run).await.unwrap();
    let mut recoveries = Vec::new();
    for moment in &moments {
        eventually(
            Duration::from_secs(600),
            &format!("{moment} finished Jobs"),
            || async { (seen.lock().unwrap().finished() >= *moment).then_some(()) },
        )
        .await;
        let killed = Instant::now();
        operator.kill();
        operator = Operator::start(&ns.name);
        // From the kill to the first Job the new process creates.
        let next = eventually(
            Duration::from_secs(120),
            "a Job after the restart",
            || async {
                let s = seen.lock().unwrap();
                s.created_after(killed)
                    .iter()
                    .map(|j| j.created)
                    .min()
                    .map(|c| c - killed)
            },
        )
        .await;
        recoveries.push(next);
    }
    await_phase(
        &runs,
        "killed",
        RunPhase::Succeeded,
        Duration::from_secs(900),
    )
    .await;
    let wall = started.elapsed();
    let (retried, jobs) = verify("operator killed", &env, &ns, &seen, &run, images).await;
    assert_eq!(retried, 0, "a kill costs no build");
    assert_eq!(jobs, images, "one Job per image");
    recoveries.sort();
    figures(
        "operator SIGKILLed at 20 random moments",
        images,
        jobs,
        wall,
        &format!(
            "kills after {moments:?} Jobs finished; kill to next Job p50 {:.2} s, max {:.2} s",
            recoveries[recoveries.len() / 2].as_secs_f64(),
            recoveries[recoveries.len() - 1].as_secs_f64()
        ),
    );
    ns.delete().await;
}

#[tokio::test]
async fn five_percent_of_builds_failing_transiently_are_retried() {
    let _serial = SERIAL.lock().await;
    let Fixture {
        env,
        _logs,
        ns,
        runs,
        seen,
    } = fixture("e2e-fault-flaky").await;
    let _operator = Operator::start(&ns.name);
    let mut run = run_of(&env.registry, &ns.name, "flaky", FLAKY, 32, "300ms");
    // The first attempt of an image whose hash starts below 0d (13 of 256: 5.1%) is
    // throttled by the registry, a transient failure.
    let unlucky = "attempt == 1 and (image | sha256)[:2] < '0d'";
    run.spec.placement.pod_annotations = annotations(&[
        ("sim.imagebuild.dev/duration", "300ms"),
        (
            "sim.imagebuild.dev/exit-code",
            &format!("{{% if {unlucky} %}}1{{% endif %}}"),
        ),
        (
            "sim.imagebuild.dev/message",
            &format!(
                "{{% if {unlucky} %}}error: failed to push: 429 Too Many Requests: toomanyrequests{{% endif %}}"
            ),
        ),
    ]);
    let started = Instant::now();
    runs.create(&PostParams::default(), &run).await.unwrap();
    await_phase(
        &runs,
        "flaky",
        RunPhase::Succeeded,
        Duration::from_secs(600),
    )
    .await;
    let wall = started.elapsed();
    let images = 2 * FLAKY + 1;
    let (retried, jobs) = verify("5% transient", &env, &ns, &seen, &run, images).await;
    let expected = common::runs::plan(&run, &swebench_ids(FLAKY))
        .nodes
        .iter()
        .filter(|n| imagebuild_operator::names::sha256_hex(&n.image)[..2] < *"0d")
        .count();
    assert_eq!(retried, expected, "each unlucky image once more, no other");
    assert_eq!(jobs, images + retried);
    figures(
        "5% of builds failing transiently",
        images,
        jobs,
        wall,
        &format!(
            "{retried} images ({:.1}%) failed once and were retried",
            100.0 * retried as f64 / images as f64
        ),
    );
    ns.delete().await;
}

/// Deletes the admission policy and binding named `.0` when dropped, the test passed or
/// not: they are cluster-wide objects.
struct PolicyGone(String);

impl Drop for PolicyGone {
    fn drop(&mut self) {
        for kind in [
            "validatingadmissionpolicybinding",
            "validatingadmissionpolicy",
        ] {
            let _ = Command::new("kubectl")
                .args(["delete", kind, &self.0, "--ignore-not-found"])
                .output();
        }
    }
}

/// A policy refusing `operation` on `resource` (of API group `group`, matching
/// `object_selector`) in namespace `ns`, and its binding.
fn refusing(
    ns: &str,
    what: &str,
    (group, resource, operation): (&str, &str, &str),
    object_selector: serde_json::Value,
) -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
    let name = format!("e2e-no-{what}-{ns}");
    let policy = serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "objectSelector": object_selector,
                "resourceRules": [{
                    "apiGroups": [group], "apiVersions": ["v1"],
                    "resources": [resource], "operations": [operation],
                }],
            },
            "validations": [{"expression": "false", "message": format!("{what} refused (e2e)")}],
        },
    });
    let binding = serde_json::json!({
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    });
    (
        serde_json::from_value(policy).unwrap(),
        serde_json::from_value(binding).unwrap(),
    )
}

/// A policy refusing every delete of a Job in namespace `ns`, and its binding.
fn no_job_deletes(ns: &str) -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
    refusing(
        ns,
        "job-deletes",
        ("batch", "jobs", "DELETE"),
        serde_json::json!({}),
    )
}

/// A policy refusing every update of a manifest shard in namespace `ns`, and its binding.
fn no_manifest_updates(ns: &str) -> (ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding) {
    refusing(
        ns,
        "manifest-updates",
        ("", "configmaps", "UPDATE"),
        serde_json::json!({"matchLabels": {"app.kubernetes.io/component": "manifest"}}),
    )
}

/// Creates `policy` and `binding`; returns once `refused` (a dry run of the refused
/// request) is refused.
async fn in_force<F, Fut>(
    client: kube::Client,
    policy: &ValidatingAdmissionPolicy,
    binding: &ValidatingAdmissionPolicyBinding,
    refused: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client);
    policies
        .create(&PostParams::default(), policy)
        .await
        .unwrap();
    bindings
        .create(&PostParams::default(), binding)
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the policy in force", || {
        let refused = refused();
        async move { refused.await.then_some(()) }
    })
    .await;
}

/// A policy's fault, lifted.
struct Lifted<'a> {
    bindings: &'a Api<ValidatingAdmissionPolicyBinding>,
    binding: &'a ValidatingAdmissionPolicyBinding,
    /// The fault, as the figures name it.
    fault: &'a str,
    /// What the lifting allows again.
    allowed: &'a str,
}

impl Lifted<'_> {
    /// Lifts the policy (its binding deleted); asserts that `run` then succeeds within
    /// 60 s with no Job of it left, one Job per image and nothing lost (`verify`), and
    /// prints the figures.
    async fn then_succeeds(
        &self,
        env: &common::cluster::Env,
        ns: &common::cluster::TestNamespace,
        seen: &Arc<Mutex<Seen>>,
        run: &ImageBuildRun,
        started: Instant,
    ) {
        let lifted = Instant::now();
        self.bindings
            .delete(&self.binding.name_any(), &Default::default())
            .await
            .unwrap();
        let runs = ns.api::<ImageBuildRun>();
        await_phase(
            &runs,
            &run.name_any(),
            RunPhase::Succeeded,
            Duration::from_secs(60),
        )
        .await;
        let recovery = lifted.elapsed();
        let of_run =
            ListParams::default().labels("app.kubernetes.io/managed-by=imagebuild-operator");
        let left = ns.api::<Job>().list(&of_run).await.unwrap().items.len();
        assert_eq!(left, 0, "a finished Job left behind by the run's end");
        let (retried, jobs_made) = verify(self.fault, env, ns, seen, run, SMALL_IMAGES).await;
        assert_eq!((retried, jobs_made), (0, SMALL_IMAGES));
        figures(
            self.fault,
            SMALL_IMAGES,
            jobs_made,
            started.elapsed(),
            &format!(
                "{:.1} s from {} allowed again to Succeeded",
                recovery.as_secs_f64(),
                self.allowed
            ),
        );
    }
}

#[tokio::test]
async fn job_deletes_refused_hold_the_runs_end_until_its_jobs_are_gone() {
    let _serial = SERIAL.lock().await;
    let Fixture {
        env,
        _logs,
        ns,
        runs,
        seen,
    } = fixture("e2e-fault-deletes").await;
    let client = env.client().await;
    let (policy, binding) = no_job_deletes(&ns.name);
    let _gone = PolicyGone(policy.name_any());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    // In force once a delete of a Job (a suspended one, which runs nothing) is refused.
    let jobs = ns.api::<Job>();
    let probe: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "probe"},
        "spec": {"suspend": true, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "none"}]}}},
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &probe).await.unwrap();
    let dry = kube::api::DeleteParams {
        dry_run: true,
        ..Default::default()
    };
    in_force(client, &policy, &binding, || async {
        jobs.delete("probe", &dry).await.is_err()
    })
    .await;

    let _operator = Operator::start(&ns.name);
    let run = run_of(&env.registry, &ns.name, "undeleted", SMALL, 4, "300ms");
    let started = Instant::now();
    runs.create(&PostParams::default(), &run).await.unwrap();
    let cms = ns.api::<ConfigMap>();
    eventually(
        Duration::from_secs(120),
        "every image recorded built",
        || async {
            let records = records(&cms, "undeleted").await;
            let built = records.values().filter(|r| r.status == RecordStatus::Built);
            (built.count() == SMALL_IMAGES).then_some(())
        },
    )
    .await;
    // Every image built, but its finished Jobs still there: the run does not end (its
    // reconciles fail on the refused deletes and are tried again, every 5 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let of_run = ListParams::default().labels("app.kubernetes.io/managed-by=imagebuild-operator");
    let left = jobs.list(&of_run).await.unwrap().items.len();
    let status = runs
        .get("undeleted")
        .await
        .unwrap()
        .status
        .unwrap_or_default();
    assert_eq!(status.phase, Some(RunPhase::Building), "{status:?}");
    assert_eq!(left, SMALL_IMAGES, "every finished Job still there");

    // Deletes allowed again: the Jobs go and the run ends.
    let lifted = Lifted {
        bindings: &bindings,
        binding: &binding,
        fault: "every Job delete refused",
        allowed: "the deletes",
    };
    lifted.then_succeeds(&env, &ns, &seen, &run, started).await;
    ns.delete().await;
}

#[tokio::test]
async fn manifest_updates_refused_keep_each_finished_job_until_its_record_is_written() {
    let _serial = SERIAL.lock().await;
    let Fixture {
        env,
        _logs,
        ns,
        runs,
        seen,
    } = fixture("e2e-fault-records").await;
    let client = env.client().await;
    let (policy, binding) = no_manifest_updates(&ns.name);
    let _gone = PolicyGone(policy.name_any());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    // In force once an update of a ConfigMap labelled as a shard (a probe) is refused.
    let cms = ns.api::<ConfigMap>();
    let probe: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "probe", "labels": {"app.kubernetes.io/component": "manifest"}},
    }))
    .unwrap();
    let probe = cms.create(&PostParams::default(), &probe).await.unwrap();
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    in_force(client, &policy, &binding, || async {
        cms.replace("probe", &dry, &probe).await.is_err()
    })
    .await;

    // The first write of the records creates the shard (allowed): the builder's record.
    // Every later write is refused, and the run's reconciles fail on it and are tried
    // again (its manifest read again, its finished Jobs harvested again).
    let _operator = Operator::start(&ns.name);
    let run = run_of(&env.registry, &ns.name, "unwritten", SMALL, 4, "300ms");
    let started = Instant::now();
    runs.create(&PostParams::default(), &run).await.unwrap();
    let finished_unrecorded = || {
        let s = seen.lock().unwrap();
        s.jobs
            .values()
            .filter(|j| j.succeeded.is_some() && j.deleted.is_none())
            .count()
    };
    eventually(
        Duration::from_secs(120),
        "builds finished whose records cannot be written",
        || async { (finished_unrecorded() >= 4).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    // No Job was deleted whose record is not written: a deleted Job is a lost result.
    let stored = records(&cms, "unwritten").await;
    let deleted: Vec<String> = {
        let s = seen.lock().unwrap();
        s.jobs
            .values()
            .filter(|j| j.deleted.is_some())
            .map(|j| j.name.clone())
            .collect()
    };
    let lost: Vec<&String> = deleted
        .iter()
        .filter(|job| !stored.contains_key(*job))
        .collect();
    assert!(lost.is_empty(), "Jobs deleted without a record: {lost:?}");
    let status = runs
        .get("unwritten")
        .await
        .unwrap()
        .status
        .unwrap_or_default();
    assert_eq!(status.phase, Some(RunPhase::Building), "{status:?}");
    assert!(
        stored.len() < SMALL_IMAGES,
        "{} records written",
        stored.len()
    );

    // Updates allowed again: the records are written, the Jobs go and the run ends.
    let lifted = Lifted {
        bindings: &bindings,
        binding: &binding,
        fault: "every manifest update refused",
        allowed: "the updates",
    };
    lifted.then_succeeds(&env, &ns, &seen, &run, started).await;
    ns.delete().await;
}
