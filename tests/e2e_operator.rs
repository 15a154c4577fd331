//! The operator against the real control plane: a SWE-bench-shaped run completes with
//! exact counts, never more Jobs in flight than maxWorkers (seen by an independent
//! watcher), bases and assemblies overlap, and a second run of the same spec builds
//! nothing because every image is then in the registry.
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{Env, Operator, TestNamespace, apply_crd, eventually};
use common::oci::oci;
use futures::StreamExt;
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use imagebuild_operator::controller::reconcile::records_name;
use imagebuild_operator::controller::records::Record;
use imagebuild_operator::instances::RawInstance;
use imagebuild_operator::job::ANNOTATION_IMAGE;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use oci_client::secrets::RegistryAuth;

const IDS: &str = "tests/fixtures/swebench-verified-ids.txt";

/// What an independent watcher saw of the namespace's Jobs.
#[derive(Default)]
struct Seen {
    active: BTreeSet<String>,
    max_active: usize,
    created: BTreeMap<String, (String, Instant)>,
    finished: BTreeMap<String, Instant>,
    pushed: BTreeSet<String>,
}

fn finished(job: &Job) -> Option<bool> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .map(|c| c.type_ == "Complete")
}

/// Watches the namespace's Jobs: counts those in flight, and pushes a tiny image for each
/// Job that completes, standing in for BuildKit's push.
fn watch_jobs(jobs: Api<Job>) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    tokio::spawn(async move {
        let mut events = watcher(jobs, watcher::Config::default()).boxed();
        while let Some(Ok(event)) = events.next().await {
            let (job, deleted) = match event {
                watcher::Event::Apply(j) | watcher::Event::InitApply(j) => (j, false),
                watcher::Event::Delete(j) => (j, true),
                _ => continue,
            };
            let name = job.name_any();
            let image = job.annotations().get(ANNOTATION_IMAGE).cloned();
            let push = {
                let mut s = seen.lock().unwrap();
                let phase = job
                    .labels()
                    .get("imagebuild.dev/phase")
                    .cloned()
                    .unwrap_or_default();
                s.created
                    .entry(name.clone())
                    .or_insert((phase, Instant::now()));
                match (deleted, finished(&job)) {
                    (false, None) => {
                        s.active.insert(name.clone());
                    }
                    (_, done) => {
                        s.active.remove(&name);
                        s.finished.entry(name.clone()).or_insert_with(Instant::now);
                        if done != Some(true) {
                            continue;
                        }
                    }
                }
                s.max_active = s.max_active.max(s.active.len());
                match image {
                    Some(image)
                        if finished(&job) == Some(true) && s.pushed.insert(name.clone()) =>
                    {
                        Some(image)
                    }
                    _ => None,
                }
            };
            if let Some(image) = push {
                let reference = image.parse().unwrap();
                let (layers, config) = common::oci::tiny_image();
                oci()
                    .push(&reference, &layers, config, &RegistryAuth::Anonymous, None)
                    .await
                    .unwrap();
            }
        }
    });
    out
}

fn run_yaml(
    name: &str,
    registry: &str,
    prefix: &str,
    ids: &[String],
    max_workers: u32,
) -> ImageBuildRun {
    let list = serde_json::to_string(ids).unwrap();
    let yaml = format!(
        r#"
apiVersion: imagebuild.dev/v1alpha1
kind: ImageBuildRun
metadata: {{name: {name}}}
spec:
  instances:
    list: {list}
    upstreamImage: "docker.io/swebench/sweb.eval.x86_64.{{{{ repo | lower }}}}_1776_{{{{ name | lower }}}}:latest"
  vars: {{sdkSha: 43376f1abcdef}}
  builder: {{context: {{inline: "FROM scratch"}}, image: "{registry}/{prefix}/eval-builder:{{{{ sdkSha | short }}}}"}}
  base:
    context: {{inline: "FROM scratch"}}
    image: "{registry}/{prefix}/eval-base:{{{{ customTag }}}}"
    buildArgs: {{BASE_IMAGE: "{{{{ upstreamImage }}}}"}}
  assembly:
    context: {{inline: "FROM scratch"}}
    image: "{registry}/{prefix}/eval-agent:{{{{ sdkSha | short }}}}-{{{{ instanceId | lower }}}}"
    buildArgs: {{BASE_IMAGE: "{{{{ base.image }}}}", BUILDER_IMAGE: "{{{{ builder.image }}}}"}}
  registry: {{insecure: true}}
  maxWorkers: {max_workers}
  placement: {{nodeSelector: {{imagebuild.dev/disk: large}}, cpu: "1", memory: 1Gi, ephemeralStorage: 20Gi}}
"#
    );
    serde_yaml_ng::from_str(&yaml).unwrap()
}

async fn await_phase(
    runs: &Api<ImageBuildRun>,
    name: &str,
    phase: RunPhase,
    timeout: Duration,
) -> ImageBuildRun {
    eventually(timeout, &format!("run {name} to be {phase:?}"), || async {
        let run = runs.get(name).await.ok()?;
        (run.status.as_ref()?.phase == Some(phase)).then_some(run)
    })
    .await
}

#[tokio::test]
async fn a_swebench_shaped_run_completes_then_reruns_as_all_skipped() {
    let env = Env::get();
    let _logs = env.logs_on_failure();
    let client = env.client().await;
    apply_crd(&client).await;
    let ns = TestNamespace::create(&client, "e2e-op").await;
    let _operator = Operator::start(&ns.name);
    let (runs, jobs, cms) = (
        ns.api::<ImageBuildRun>(),
        ns.api::<Job>(),
        ns.api::<ConfigMap>(),
    );
    let seen = watch_jobs(jobs.clone());

    let ids: Vec<String> = std::fs::read_to_string(IDS)
        .unwrap()
        .lines()
        .take(50)
        .map(str::to_string)
        .collect();
    let max_workers = 4;
    let run = run_yaml("swebench-50", &env.registry, &ns.name, &ids, max_workers);
    runs.create(&PostParams::default(), &run).await.unwrap();
    let done = await_phase(
        &runs,
        "swebench-50",
        RunPhase::Succeeded,
        Duration::from_secs(300),
    )
    .await;

    // The plan the operator worked from, computed here independently.
    let raw: Vec<RawInstance> = ids
        .iter()
        .map(|id| RawInstance {
            id: id.clone(),
            image: None,
        })
        .collect();
    let plan = imagebuild_operator::plan::build("swebench-50", &run.spec, &raw).unwrap();
    let bases = plan
        .nodes
        .iter()
        .filter(|n| n.phase == imagebuild_operator::plan::Phase::Base)
        .count() as u32;
    let status = done.status.unwrap();
    assert_eq!((status.builder.total, status.builder.succeeded), (1, 1));
    assert_eq!((status.bases.total, status.bases.succeeded), (bases, bases));
    assert_eq!(
        (status.assemblies.total, status.assemblies.succeeded),
        (50, 50)
    );
    assert_eq!(status.failed_total, 0);

    // One record per planned node, for exactly the planned image.
    let cm = cms.get(&records_name("swebench-50")).await.unwrap();
    let records: BTreeMap<String, Record> = cm
        .data
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, serde_json::from_str(&v).unwrap()))
        .collect();
    assert_eq!(records.len(), plan.nodes.len());
    for node in &plan.nodes {
        let record = &records[&node.job_name];
        assert_eq!(record.image, node.image);
        assert_eq!(record.attempt, 1, "{}", node.job_name);
        assert!(
            record
                .node
                .as_deref()
                .is_some_and(|n| n.starts_with("kwok-large-")),
            "{record:?}"
        );
    }

    {
        let s = seen.lock().unwrap();
        assert_eq!(
            s.created.len(),
            plan.nodes.len(),
            "one Job per node, no duplicates"
        );
        assert!(
            s.max_active <= max_workers as usize,
            "{} Jobs in flight, maxWorkers {max_workers}",
            s.max_active
        );
        assert!(s.max_active >= 2, "the run never built two images at once");
        let first_assembly = s
            .created
            .values()
            .filter(|(p, _)| p == "assembly")
            .map(|(_, t)| *t)
            .min()
            .unwrap();
        let last_base = s
            .created
            .iter()
            .filter(|(_, (p, _))| p == "base")
            .map(|(name, _)| s.finished[name])
            .max()
            .unwrap();
        assert!(
            first_assembly < last_base,
            "assemblies waited for every base: no pipelining"
        );
    }
    // Finished Jobs are harvested and deleted.
    eventually(
        Duration::from_secs(60),
        "the run's Jobs to be deleted",
        || async {
            jobs.list(&Default::default())
                .await
                .unwrap()
                .items
                .is_empty()
                .then_some(())
        },
    )
    .await;

    // The same spec again: every image is in the registry now, so nothing is built.
    let created_before = seen.lock().unwrap().created.len();
    runs.delete("swebench-50", &DeleteParams::foreground())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the first run to be gone",
        || async {
            runs.get_opt("swebench-50")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    runs.create(&PostParams::default(), &run).await.unwrap();
    let again = await_phase(
        &runs,
        "swebench-50",
        RunPhase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    let status = again.status.unwrap();
    assert_eq!(
        (
            status.builder.skipped,
            status.bases.skipped,
            status.assemblies.skipped
        ),
        (1, bases, 50)
    );
    assert_eq!(
        seen.lock().unwrap().created.len(),
        created_before,
        "the rerun created Jobs"
    );
    ns.delete().await;
}
