//! The controller's state across restarts and faults, on the real control plane: a
//! finished run is left exactly as it is when the operator restarts (no Event, no field
//! changed); a run whose instance ConfigMap comes later recovers; `Degraded` clears once
//! the registry answers again, even after a restart left finished images never checked;
//! a registry that accepts connections and never answers is reported within a bounded
//! time. A stand-in registry (below) plays the faults.
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use common::cluster::{Operator, eventually, setup};
use common::runs::{annotations, await_phase, condition, events, swebench_ids, swebench_run};
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;

/// How the stand-in registry answers manifest requests.
const MISSING: u8 = 0;
const UNAVAILABLE: u8 = 1;
const SILENT: u8 = 2;

/// A registry on loopback that answers every manifest request as `mode` says: 404, 503,
/// or never (the connection stays open). Its address.
async fn stand_in_registry(mode: Arc<AtomicU8>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let app = axum::Router::new()
        .route("/v2/", axum::routing::get(|| async { StatusCode::OK }))
        .fallback(move || {
            let mode = mode.clone();
            async move {
                match mode.load(Ordering::SeqCst) {
                    MISSING => StatusCode::NOT_FOUND,
                    UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
                    _ => std::future::pending().await,
                }
            }
        });
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

#[tokio::test]
async fn a_finished_run_is_left_alone_when_the_operator_restarts() {
    let (env, _logs, ns) = setup("e2e-finished").await;
    let mut operator = Operator::start(&ns.name);
    let runs = ns.api::<ImageBuildRun>();
    let ids = swebench_ids(3);
    let mut done = swebench_run("done", &env.registry, &ns.name, &ids, 3);
    // A second run that fails for good: its spec cannot be planned.
    let mut broken = swebench_run("broken", &env.registry, &ns.name, &ids, 3);
    broken.spec.assembly.image = "{{ nope }}".into();
    done.spec.force_rebuild = true;
    runs.create(&PostParams::default(), &done).await.unwrap();
    runs.create(&PostParams::default(), &broken).await.unwrap();
    let done = await_phase(&runs, "done", RunPhase::Succeeded, Duration::from_secs(120)).await;
    let broken = await_phase(&runs, "broken", RunPhase::Failed, Duration::from_secs(60)).await;
    let before = (
        events(&ns, "done").await.len(),
        events(&ns, "broken").await.len(),
    );

    // A new operator (as after a crash, an upgrade or a leader change) reads them again.
    operator.kill();
    let operator = Operator::start(&ns.name);
    operator.metrics_addr();
    eventually(
        Duration::from_secs(30),
        "the operator's watches to sync",
        || async { operator.log().contains("watches synced").then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (was, name) in [(&done, "done"), (&broken, "broken")] {
        let now = runs.get(name).await.unwrap();
        assert_eq!(
            now.metadata.resource_version, was.metadata.resource_version,
            "{name} was written: {:#?} -> {:#?}",
            was.status, now.status
        );
    }
    let after = (
        events(&ns, "done").await.len(),
        events(&ns, "broken").await.len(),
    );
    assert_eq!(before, after, "no Event sent again");
    ns.delete().await;
}

#[tokio::test]
async fn a_run_whose_instance_configmap_comes_later_recovers() {
    let (env, _logs, ns) = setup("e2e-late-source").await;
    let _operator = Operator::start(&ns.name);
    let runs = ns.api::<ImageBuildRun>();
    let ids = swebench_ids(3);
    let mut run = swebench_run("late", &env.registry, &ns.name, &ids, 3);
    run.spec.force_rebuild = true;
    run.spec.instances.list = None;
    run.spec.instances.config_map =
        Some(serde_json::from_value(serde_json::json!({"name": "ids", "key": "ids.txt"})).unwrap());
    runs.create(&PostParams::default(), &run).await.unwrap();
    // The run waits for its source, and says why.
    let waiting = eventually(
        Duration::from_secs(60),
        "the run to say its source is missing",
        || async {
            let run = runs.get("late").await.ok()?;
            let (status, reason, message) = condition(&run, "Progressing")?;
            (reason == "SourceUnavailable").then_some((run, status, message))
        },
    )
    .await;
    assert_eq!(
        waiting.0.status.as_ref().unwrap().phase,
        Some(RunPhase::Resolving)
    );
    assert_eq!(waiting.1, "True");
    assert!(waiting.2.contains("ids"), "{}", waiting.2);
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ids"},
        "data": {"ids.txt": ids.join("\n")},
    }))
    .unwrap();
    ns.api::<ConfigMap>()
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let done = await_phase(&runs, "late", RunPhase::Succeeded, Duration::from_secs(120)).await;
    assert_eq!(done.status.unwrap().assemblies.succeeded, 3);
    ns.delete().await;
}

#[tokio::test]
async fn degraded_clears_once_the_registry_answers_even_after_a_restart() {
    let (_env, _logs, ns) = setup("e2e-degraded").await;
    let mode = Arc::new(AtomicU8::new(MISSING));
    let registry = stand_in_registry(mode.clone()).await;
    let mut operator = Operator::start(&ns.name);
    let runs = ns.api::<ImageBuildRun>();
    let ids = swebench_ids(6);
    let mut run = swebench_run("flaky", &registry, &ns.name, &ids, 2);
    run.spec.placement.pod_annotations = annotations(&[("sim.imagebuild.dev/duration", "2s")]);
    runs.create(&PostParams::default(), &run).await.unwrap();
    // Some images built (their records final), others not yet.
    eventually(Duration::from_secs(120), "a few images built", || async {
        let status = runs.get("flaky").await.ok()?.status?;
        (status.bases.succeeded >= 2).then_some(())
    })
    .await;
    // Restarted while the registry fails: the images left are checked (and fail), the
    // finished ones never are.
    operator.kill();
    mode.store(UNAVAILABLE, Ordering::SeqCst);
    let _operator = Operator::start(&ns.name);
    let degraded = eventually(Duration::from_secs(90), "Degraded", || async {
        let run = runs.get("flaky").await.ok()?;
        let c = condition(&run, "Degraded")?;
        (c.0 == "True").then_some(c)
    })
    .await;
    assert_eq!(degraded.1, "RegistryError");
    assert!(degraded.2.contains("503"), "{}", degraded.2);
    // The registry answers again: the next round clears it, and the run finishes.
    mode.store(MISSING, Ordering::SeqCst);
    let done = await_phase(
        &runs,
        "flaky",
        RunPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    let c = condition(&done, "Degraded").unwrap();
    assert_eq!(
        (c.0.as_str(), c.1.as_str()),
        ("False", "AsExpected"),
        "{c:?}"
    );
    ns.delete().await;
}

#[tokio::test]
async fn a_registry_that_never_answers_is_reported_within_the_stall_timeout() {
    let (_env, _logs, ns) = setup("e2e-silent").await;
    let mode = Arc::new(AtomicU8::new(SILENT));
    let registry = stand_in_registry(mode.clone()).await;
    let _operator = Operator::start_with(&ns.name, &["--registry-stall-timeout", "5s"]);
    let runs = ns.api::<ImageBuildRun>();
    let ids = swebench_ids(3);
    let run = swebench_run("silent", &registry, &ns.name, &ids, 2);
    let started = std::time::Instant::now();
    runs.create(&PostParams::default(), &run).await.unwrap();
    let degraded = eventually(Duration::from_secs(60), "Degraded", || async {
        let run = runs.get("silent").await.ok()?;
        let c = condition(&run, "Degraded")?;
        (c.0 == "True").then_some(c)
    })
    .await;
    println!(
        "a silent registry was reported after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        degraded.2.contains("did not answer for 5s"),
        "{}",
        degraded.2
    );
    assert!(degraded.2.contains(&registry), "{}", degraded.2);
    // Nothing was built while nothing was known.
    let status = runs.get("silent").await.unwrap().status.unwrap();
    assert_eq!(status.builder.running + status.builder.succeeded, 0);
    ns.delete().await;
}
