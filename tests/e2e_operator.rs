//! The operator against the real control plane: a SWE-bench-shaped run completes with
//! exact counts, never more Jobs in flight than maxWorkers (seen by an independent
//! watcher), bases and assemblies overlap, and a second run of the same spec builds
//! nothing because every image is then in the registry.
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cluster::{Env, Operator, TestNamespace, apply_crd, eventually};
use common::runs::{
    await_phase, count_status_writes, delete_run, manifest_shards, plan, records, swebench_ids,
    swebench_run, watch_jobs,
};
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;

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
    let writes = count_status_writes(runs.clone());
    let started = std::time::Instant::now();

    let ids = swebench_ids(50);
    let max_workers = 4;
    let run = swebench_run("swebench-50", &env.registry, &ns.name, &ids, max_workers);
    runs.create(&PostParams::default(), &run).await.unwrap();
    // While it builds, the status estimates when it will be done.
    let eta = eventually(
        Duration::from_secs(120),
        "an estimated completion while building",
        || async {
            let status = runs.get("swebench-50").await.ok()?.status?;
            (status.phase == Some(RunPhase::Building))
                .then_some(status.estimated_completion)
                .flatten()
        },
    )
    .await;
    assert!(
        eta > chrono::Utc::now() - chrono::Duration::minutes(1),
        "{eta}"
    );
    let done = await_phase(
        &runs,
        "swebench-50",
        RunPhase::Succeeded,
        Duration::from_secs(300),
    )
    .await;

    // Status writes are coalesced: about one a second at most, whatever the Job traffic.
    let took = started.elapsed().as_secs() as usize;
    let written = writes.lock().unwrap()["swebench-50"];
    println!("status writes: {written} in {took} s");
    assert!(written <= took + 10, "{written} status writes in {took} s");

    // The plan the operator worked from, computed here independently.
    let plan = plan(&run, &ids);
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
    let rate = status.images_per_hour.unwrap();
    assert!(rate > 60.0, "{rate} images/hour over a one-minute run");
    assert!(status.last_progress_at.is_some());
    assert_eq!(
        status.estimated_completion, None,
        "a finished run has no estimate"
    );

    // One record per planned node, for exactly the planned image.
    let records = records(&cms, "swebench-50").await;
    // 101 images: one manifest shard, named in the status.
    let shards = manifest_shards(&cms, "swebench-50").await;
    assert_eq!(
        status.manifests,
        shards.keys().cloned().collect::<Vec<_>>(),
        "the status names the shards"
    );
    assert_eq!(shards.len(), 1);
    assert_eq!(records.len(), plan.nodes.len());
    for node in &plan.nodes {
        let record = &records[&node.job_name];
        assert_eq!(record.image(), &*node.image);
        assert_eq!(record.attempt_count, 1, "{}", node.job_name);
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
        assert_eq!(s.jobs.len(), plan.nodes.len(), "one Job per node");
        assert!(
            s.per_attempt().values().all(|&n| n == 1),
            "duplicate Jobs: {:?}",
            s.per_attempt()
        );
        assert!(
            s.max_active <= max_workers as usize,
            "{} Jobs in flight, maxWorkers {max_workers}",
            s.max_active
        );
        assert!(s.max_active >= 2, "the run never built two images at once");
        // The operator says who it is: the API server names its creates after it.
        let creators: BTreeSet<_> = s.jobs.values().map(|j| j.created_by.clone()).collect();
        assert_eq!(
            creators,
            BTreeSet::from([Some("imagebuild-operator".to_string())]),
            "the field managers of the Jobs' creates"
        );
        let first_assembly = s
            .jobs
            .values()
            .filter(|j| j.phase == "assembly")
            .map(|j| j.created)
            .min()
            .unwrap();
        let last_base = s
            .jobs
            .values()
            .filter(|j| j.phase == "base")
            .map(|j| j.finished.unwrap())
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
    let created_before = seen.lock().unwrap().jobs.len();
    delete_run(&runs, "swebench-50").await;
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
        seen.lock().unwrap().jobs.len(),
        created_before,
        "the rerun created Jobs"
    );
    ns.delete().await;
}
