//! The second line behind the schema, on the real control plane: a run stored under a
//! looser CRD (here: `maxWorkers` without its maximum, so a value past `u32` is stored)
//! does not read as an `ImageBuildRun`. The operator names it (log, Warning Event, gauge)
//! and skips it, and every other run is reconciled, before a restart and after one.
//!
//! A binary of its own: it loosens the cluster's CRD for a moment, which no other test
//! may see (every test's setup applies the project's CRD again).
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::time::Duration;

use common::cluster::{Operator, apply_crd, eventually, setup};
use common::prometheus::{scrape, sum};
use common::runs::{await_phase, events, swebench_ids, swebench_run, watch_jobs};
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};

const HUGE: u64 = 1 << 40;

/// Applies the project's CRD with `maxWorkers` unbounded above.
async fn apply_loose_crd(client: &kube::Client) {
    let text = std::fs::read_to_string(imagebuild_operator::crd::CRD_PATH).unwrap();
    let mut crd: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    let max_workers = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["maxWorkers"];
    assert!(max_workers["maximum"].is_number(), "{max_workers}");
    max_workers.as_object_mut().unwrap().remove("maximum");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(crd).unwrap();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("imagebuild-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn an_unreadable_run_is_named_and_skipped_and_the_others_build_across_a_restart() {
    let (env, _logs, ns) = setup("e2e-unreadable").await;
    let client = env.client().await;
    let runs = ns.api::<ImageBuildRun>();
    let _seen = watch_jobs(ns.api::<Job>());
    let ids = swebench_ids(2);

    // Stored under the loose schema: a run whose maxWorkers no u32 holds.
    apply_loose_crd(&client).await;
    let gvk = GroupVersionKind::gvk("imagebuild.dev", "v1alpha1", "ImageBuildRun");
    let raw: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns.name, &ApiResource::from_gvk(&gvk));
    let mut bad =
        serde_json::to_value(swebench_run("bad", &env.registry, &ns.name, &ids, 2)).unwrap();
    bad["spec"]["maxWorkers"] = HUGE.into();
    let bad: DynamicObject = serde_json::from_value(bad).unwrap();
    // The API server takes the new schema within a moment.
    eventually(
        Duration::from_secs(30),
        "the loose schema to be served",
        || async { raw.create(&PostParams::default(), &bad).await.ok() },
    )
    .await;
    apply_crd(&client).await;
    let stored = raw.get("bad").await.unwrap();
    assert_eq!(stored.data["spec"]["maxWorkers"], HUGE);

    let good = |name: &str| {
        let mut run = swebench_run(name, &env.registry, &ns.name, &ids, 2);
        run.spec.force_rebuild = true;
        run
    };
    runs.create(&PostParams::default(), &good("good"))
        .await
        .unwrap();
    let mut operator = Operator::start(&ns.name);
    await_phase(&runs, "good", RunPhase::Succeeded, Duration::from_secs(120)).await;

    // Named: a Warning Event with the reason, the log, the gauge.
    let said = eventually(Duration::from_secs(30), "the Unreadable Event", || async {
        events(&ns, "bad")
            .await
            .into_iter()
            .find(|(_, reason, _)| reason == "Unreadable")
    })
    .await;
    assert_eq!(said.0, "Warning");
    assert!(said.2.contains(&HUGE.to_string()), "{}", said.2);
    assert!(
        operator
            .log()
            .contains("the run does not read as an ImageBuildRun"),
        "not in the log"
    );
    let gauge = sum(
        &scrape(&operator.metrics_addr()).await,
        "imagebuild_runs_unreadable",
        &[],
    );
    assert_eq!(gauge, Some(1.0));
    // Skipped: no status written, no Job made.
    assert!(raw.get("bad").await.unwrap().data.get("status").is_none());

    // After a restart the first list holds it again: the others are still reconciled.
    operator.kill();
    let operator = Operator::start(&ns.name);
    runs.create(&PostParams::default(), &good("good-after-restart"))
        .await
        .unwrap();
    await_phase(
        &runs,
        "good-after-restart",
        RunPhase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    let addr = operator.metrics_addr();
    eventually(
        Duration::from_secs(30),
        "the gauge after the restart",
        || async {
            (sum(&scrape(&addr).await, "imagebuild_runs_unreadable", &[]) == Some(1.0))
                .then_some(())
        },
    )
    .await;

    // Deleted: no longer counted.
    raw.delete("bad", &Default::default()).await.unwrap();
    eventually(Duration::from_secs(30), "the gauge to drop", || async {
        (sum(&scrape(&addr).await, "imagebuild_runs_unreadable", &[]) == Some(0.0)).then_some(())
    })
    .await;
    let jobs = ns
        .api::<Job>()
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    assert!(
        jobs.iter().all(|j| !j.name_any().starts_with("bad-")),
        "a Job of the unreadable run"
    );
    ns.delete().await;
}
