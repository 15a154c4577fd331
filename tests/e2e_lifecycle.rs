//! The run lifecycle on the real control plane, with pods scripted through
//! `placement.podAnnotations` (kwok runs them as `sim.imagebuild.dev/*` says): transient
//! failures retried, build errors failed at once, a failed base failing only its
//! assemblies, unschedulable placement, suspend/resume, maxWorkers changes, deletion, and
//! an operator killed mid-run.
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Operator, eventually, setup};
use common::runs::{
    annotations, await_phase, events, job_of, manifest_shards, plan, records, swebench_ids,
    swebench_run, watch_jobs,
};
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use imagebuild_operator::manifest::RecordStatus;
use imagebuild_operator::names::LABEL_RUN_UID;
use imagebuild_operator::plan::Phase;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};

async fn patch_spec(runs: &Api<ImageBuildRun>, name: &str, spec: serde_json::Value) {
    runs.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({ "spec": spec })),
    )
    .await
    .unwrap();
}

fn condition(run: &ImageBuildRun, type_: &str) -> (String, String, String) {
    let c = run
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

#[tokio::test]
async fn transient_failures_retry_build_errors_fail_once_and_a_failed_base_fails_only_its_assemblies()
 {
    let (env, _logs, ns) = setup("e2e-faults").await;
    let _operator = Operator::start(&ns.name);
    let (runs, cms) = (ns.api::<ImageBuildRun>(), ns.api::<ConfigMap>());
    let seen = watch_jobs(ns.api::<Job>());

    let ids = swebench_ids(6);
    let (throttled, broken, broken_base) = (&ids[0], &ids[1], &ids[2]);
    let mut run = swebench_run("faults", &env.registry, &ns.name, &ids, 3);
    let upstream = plan(&run, &ids)
        .nodes
        .iter()
        .find(|n| n.instance_id.as_deref() == Some(broken_base.as_str()))
        .unwrap()
        .upstream_image
        .clone()
        .unwrap();
    let spec = &mut run.spec;
    spec.vars.insert("throttled".into(), throttled.clone());
    spec.vars.insert("broken".into(), broken.clone());
    spec.vars.insert("brokenBase".into(), upstream.to_string());
    // The first attempt of one assembly is throttled by the registry; another assembly's
    // Dockerfile fails; one base fails.
    let throttle = "phase == 'assembly' and instanceId == throttled and attempt == 1";
    let build_error = "phase == 'assembly' and instanceId == broken";
    let base_error = "phase == 'base' and upstreamImage == brokenBase";
    let exit_code =
        format!("{{% if ({throttle}) or ({build_error}) or ({base_error}) %}}1{{% endif %}}");
    let message = format!(
        "{{% if {throttle} %}}error: failed to push: 429 Too Many Requests: toomanyrequests\
         {{% elif {build_error} %}}ERROR: failed to solve: process \"/bin/sh -c make\" did not complete successfully: exit code: 2\
         {{% elif {base_error} %}}ERROR: failed to solve: base: exit code: 2{{% endif %}}"
    );
    spec.placement.pod_annotations = annotations(&[
        ("sim.imagebuild.dev/exit-code", &exit_code),
        ("sim.imagebuild.dev/message", &message),
    ]);
    spec.retry.backoff.initial = "1s".into();
    spec.retry.backoff.max = "2s".into();
    runs.create(&PostParams::default(), &run).await.unwrap();
    let done = await_phase(
        &runs,
        "faults",
        RunPhase::PartiallySucceeded,
        Duration::from_secs(180),
    )
    .await;

    let plan = plan(&run, &ids);
    let records = records(&cms, "faults").await;
    assert_eq!(records.len(), plan.nodes.len(), "one record per node");
    let throttled_asm = &records[&job_of(&plan, Phase::Assembly, throttled)];
    assert_eq!(throttled_asm.status, RecordStatus::Built);
    assert_eq!(throttled_asm.attempt_count, 2, "{throttled_asm:?}");
    let broken_asm = &records[&job_of(&plan, Phase::Assembly, broken)];
    assert_eq!(broken_asm.status, RecordStatus::Failed);
    assert_eq!(broken_asm.failure_class.as_deref(), Some("BuildError"));
    assert_eq!(broken_asm.attempt_count, 1, "a build error is not retried");
    assert!(
        broken_asm
            .error
            .as_deref()
            .is_some_and(|m| m.contains("exit code: 2")),
        "{broken_asm:?}"
    );
    let base = &records[&job_of(&plan, Phase::Base, broken_base)];
    assert_eq!(
        (
            base.status,
            base.failure_class.as_deref(),
            base.attempt_count
        ),
        (RecordStatus::Failed, Some("BuildError"), 1)
    );
    let orphan = &records[&job_of(&plan, Phase::Assembly, broken_base)];
    assert_eq!(
        (orphan.status, orphan.failure_class.as_deref()),
        (RecordStatus::Failed, Some("DependencyFailed"))
    );
    let failed: Vec<&String> = records
        .iter()
        .filter(|(_, r)| r.status != RecordStatus::Built)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(failed.len(), 3, "only those three fail: {failed:?}");

    let status = done.status.as_ref().unwrap();
    assert_eq!(
        (status.assemblies.succeeded, status.assemblies.failed),
        (4, 2)
    );
    assert_eq!((status.bases.succeeded, status.bases.failed), (5, 1));
    assert_eq!(status.failed_total, 3);
    let mut reasons: Vec<(&str, &str)> = status
        .failures
        .iter()
        .map(|f| (f.phase.as_str(), f.reason.as_str()))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("assembly", "BuildError"),
            ("assembly", "DependencyFailed"),
            ("base", "BuildError")
        ]
    );
    assert_eq!(condition(&done, "Ready").1, "PartiallySucceeded");

    {
        let s = seen.lock().unwrap();
        let attempts = s.per_attempt();
        assert!(
            attempts.values().all(|&n| n == 1),
            "duplicates: {attempts:?}"
        );
        let of = |job: &str| -> Vec<u32> {
            attempts
                .keys()
                .filter(|(name, _)| name == job)
                .map(|(_, a)| *a)
                .collect()
        };
        assert_eq!(of(&job_of(&plan, Phase::Assembly, throttled)), [1, 2]);
        assert_eq!(of(&job_of(&plan, Phase::Assembly, broken)), [1]);
        assert!(of(&job_of(&plan, Phase::Assembly, broken_base)).is_empty());
    }
    let events = events(&ns, "faults").await;
    assert!(
        events
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "PartiallySucceeded"),
        "{events:?}"
    );
    ns.delete().await;
}

#[tokio::test]
async fn unschedulable_placement_stalls_within_the_pending_timeout() {
    let (env, _logs, ns) = setup("e2e-stall").await;
    let _operator = Operator::start(&ns.name);
    let runs = ns.api::<ImageBuildRun>();
    let seen = watch_jobs(ns.api::<Job>());

    let ids = swebench_ids(2);
    let mut run = swebench_run("stall", &env.registry, &ns.name, &ids, 2);
    run.spec
        .placement
        .node_selector
        .insert("imagebuild.dev/disk".into(), "enormous".into());
    run.spec.timeouts.pending = "5s".into();
    runs.create(&PostParams::default(), &run).await.unwrap();

    let stalled = eventually(Duration::from_secs(60), "the Stalled condition", || async {
        let run = runs.get("stall").await.ok()?;
        let stalled = run
            .status
            .as_ref()?
            .conditions
            .iter()
            .any(|c| c.type_ == "Stalled" && c.status == "True");
        stalled.then_some(run)
    })
    .await;
    let created = {
        let s = seen.lock().unwrap();
        s.jobs.values().map(|j| j.created).min().unwrap()
    };
    // The pending timeout, plus the operator's 5 s look at pending pods, plus slack.
    let after = created.elapsed();
    assert!(
        after < Duration::from_secs(5 + 5 + 5),
        "Stalled after {after:?}"
    );
    let (_, reason, message) = condition(&stalled, "Stalled");
    assert_eq!(reason, "Unschedulable");
    assert!(
        message.contains("node affinity/selector"),
        "the scheduler's message: {message}"
    );
    // Nothing can run: the builder failed, so everything fails; Stalled stays to say why.
    let failed = await_phase(&runs, "stall", RunPhase::Failed, Duration::from_secs(30)).await;
    assert_eq!(condition(&failed, "Stalled").0, "True");
    let builder =
        &records(&ns.api::<ConfigMap>(), "stall").await[&plan(&run, &ids).nodes[0].job_name];
    assert_eq!(builder.failure_class.as_deref(), Some("Unschedulable"));
    let events = eventually(Duration::from_secs(10), "the Warning Event", || async {
        let events = events(&ns, "stall").await;
        events
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "Unschedulable")
            .then_some(events)
    })
    .await;
    assert!(
        events
            .iter()
            .any(|(_, r, n)| r == "Unschedulable" && n.contains("node affinity/selector")),
        "{events:?}"
    );
    ns.delete().await;
}

#[tokio::test]
async fn suspend_resume_max_workers_and_deletion() {
    let (env, _logs, ns) = setup("e2e-life").await;
    let _operator = Operator::start(&ns.name);
    let (runs, jobs) = (ns.api::<ImageBuildRun>(), ns.api::<Job>());
    let seen = watch_jobs(jobs.clone());

    let ids = swebench_ids(8);
    let mut run = swebench_run("life", &env.registry, &ns.name, &ids, 1);
    run.spec.placement.pod_annotations = annotations(&[("sim.imagebuild.dev/duration", "3s")]);
    runs.create(&PostParams::default(), &run).await.unwrap();

    // maxWorkers 1 -> 3 takes effect at once.
    eventually(Duration::from_secs(60), "a base to start", || async {
        let s = seen.lock().unwrap();
        s.jobs.values().any(|j| j.phase == "base").then_some(())
    })
    .await;
    assert_eq!(seen.lock().unwrap().max_active, 1);
    patch_spec(&runs, "life", serde_json::json!({"maxWorkers": 3})).await;
    eventually(Duration::from_secs(20), "3 Jobs in flight", || async {
        (seen.lock().unwrap().active() == 3).then_some(())
    })
    .await;

    // Suspended: running Jobs finish, nothing new starts.
    patch_spec(&runs, "life", serde_json::json!({"suspend": true})).await;
    // A reconcile that read the spec before the patch may still be creating its Jobs.
    let quiet_from = Instant::now() + Duration::from_secs(2);
    eventually(
        Duration::from_secs(30),
        "running Jobs to finish",
        || async { (seen.lock().unwrap().active() == 0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    {
        let s = seen.lock().unwrap();
        let late = s.created_after(quiet_from);
        assert!(late.is_empty(), "Jobs created while suspended: {late:?}");
    }
    let suspended = runs.get("life").await.unwrap();
    assert_eq!(
        condition(&suspended, "Progressing"),
        (
            "False".into(),
            "Suspended".into(),
            condition(&suspended, "Progressing").2
        )
    );
    assert_eq!(
        suspended.status.as_ref().unwrap().phase,
        Some(RunPhase::Building)
    );

    patch_spec(&runs, "life", serde_json::json!({"suspend": false})).await;
    let done = await_phase(&runs, "life", RunPhase::Succeeded, Duration::from_secs(120)).await;
    assert_eq!(done.status.unwrap().assemblies.succeeded, 8);
    assert!(seen.lock().unwrap().max_active <= 3);

    // Deleting a run mid-build removes its Jobs, their pods and its records.
    // Its own image names: those of the first run are in the registry now.
    let prefix = format!("{}-doomed", ns.name);
    let mut doomed = swebench_run("doomed", &env.registry, &prefix, &ids, 2);
    doomed.spec.placement.pod_annotations =
        annotations(&[("sim.imagebuild.dev/never-finish", "true")]);
    let doomed = runs.create(&PostParams::default(), &doomed).await.unwrap();
    let uid = doomed.uid().unwrap();
    let selector = ListParams::default().labels(&format!("{LABEL_RUN_UID}={uid}"));
    eventually(
        Duration::from_secs(30),
        "the doomed run's builder",
        || async {
            let pods = ns.api::<Pod>().list(&selector).await.unwrap();
            (!pods.items.is_empty()).then_some(())
        },
    )
    .await;
    runs.delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the doomed run's Jobs, pods and records to go",
        || async {
            let jobs = jobs.list(&selector).await.unwrap().items.len();
            let pods = ns.api::<Pod>().list(&selector).await.unwrap().items.len();
            let shards = manifest_shards(&ns.api::<ConfigMap>(), "doomed").await;
            (jobs == 0 && pods == 0 && shards.is_empty()).then_some(())
        },
    )
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn an_operator_killed_mid_run_duplicates_nothing_and_loses_nothing() {
    let (env, _logs, ns) = setup("e2e-kill").await;
    let mut operator = Operator::start(&ns.name);
    let (runs, cms) = (ns.api::<ImageBuildRun>(), ns.api::<ConfigMap>());
    let seen = watch_jobs(ns.api::<Job>());

    let ids = swebench_ids(30);
    let mut run = swebench_run("killed", &env.registry, &ns.name, &ids, 4);
    run.spec.placement.pod_annotations = annotations(&[("sim.imagebuild.dev/duration", "2s")]);
    runs.create(&PostParams::default(), &run).await.unwrap();
    let plan = plan(&run, &ids);

    for (finished, pause) in [(10, Duration::from_secs(5)), (35, Duration::ZERO)] {
        eventually(
            Duration::from_secs(120),
            &format!("{finished} finished Jobs"),
            || async { (seen.lock().unwrap().finished() >= finished).then_some(()) },
        )
        .await;
        operator.kill();
        // Jobs in flight finish while nobody is watching.
        tokio::time::sleep(pause).await;
        operator = Operator::start(&ns.name);
    }
    let done = await_phase(
        &runs,
        "killed",
        RunPhase::Succeeded,
        Duration::from_secs(240),
    )
    .await;

    let status = done.status.unwrap();
    assert_eq!(
        (
            status.bases.succeeded,
            status.assemblies.succeeded,
            status.failed_total
        ),
        (30, 30, 0)
    );
    let records = records(&cms, "killed").await;
    assert_eq!(records.len(), plan.nodes.len());
    for node in &plan.nodes {
        let r = &records[&node.job_name];
        assert_eq!(
            (r.status, r.attempt_count),
            (RecordStatus::Built, 1),
            "{}: {r:?}",
            node.job_name
        );
    }
    {
        let s = seen.lock().unwrap();
        assert_eq!(
            s.jobs.len(),
            plan.nodes.len(),
            "one Job per node, none rebuilt"
        );
        assert!(s.per_attempt().values().all(|&n| n == 1));
        assert!(s.max_active <= 4, "{} in flight", s.max_active);
    }
    ns.delete().await;
}

#[tokio::test]
async fn runs_share_max_total_workers_fairly() {
    let (env, _logs, ns) = setup("e2e-fair").await;
    let _operator = Operator::start_with(&ns.name, &["--max-total-workers", "4"]);
    let runs = ns.api::<ImageBuildRun>();
    let seen = watch_jobs(ns.api::<Job>());

    let ids = swebench_ids(12);
    for name in ["first", "second"] {
        let prefix = format!("{}-{name}", ns.name);
        let mut run = swebench_run(name, &env.registry, &prefix, &ids, 4);
        run.spec.placement.pod_annotations = annotations(&[("sim.imagebuild.dev/duration", "2s")]);
        runs.create(&PostParams::default(), &run).await.unwrap();
        if name == "first" {
            // Alone, the first run takes every worker.
            eventually(
                Duration::from_secs(60),
                "4 Jobs of the first run",
                || async { (seen.lock().unwrap().active() == 4).then_some(()) },
            )
            .await;
        }
    }
    for name in ["first", "second"] {
        await_phase(&runs, name, RunPhase::Succeeded, Duration::from_secs(180)).await;
    }
    {
        let s = seen.lock().unwrap();
        assert!(s.max_active <= 4, "{} Jobs in flight, cap 4", s.max_active);
        // Once the second run had work it got its half: two each at some moment.
        let even = s
            .history
            .iter()
            .any(|per_run| per_run.get("first") == Some(&2) && per_run.get("second") == Some(&2));
        assert!(even, "never 2 + 2: {:?}", s.history);
        let first_done = s
            .jobs
            .values()
            .filter(|j| j.run == "first")
            .filter_map(|j| j.finished)
            .max()
            .unwrap();
        let second_start = s
            .jobs
            .values()
            .filter(|j| j.run == "second")
            .map(|j| j.created)
            .min()
            .unwrap();
        assert!(
            second_start < first_done,
            "the second run waited for the first"
        );
    }
    ns.delete().await;
}

#[tokio::test]
async fn the_run_deadline_fails_what_remains_and_sigterm_stops_the_operator() {
    let (env, _logs, ns) = setup("e2e-deadline").await;
    let mut operator = Operator::start(&ns.name);
    let (runs, jobs) = (ns.api::<ImageBuildRun>(), ns.api::<Job>());

    // Four instances listed, three selected: only those are planned.
    let ids = swebench_ids(4);
    let mut run = swebench_run("late", &env.registry, &ns.name, &ids, 2);
    run.spec.instances.limit = Some(3);
    run.spec.placement.pod_annotations =
        annotations(&[("sim.imagebuild.dev/never-finish", "true")]);
    run.spec.timeouts.run = "8s".into();
    runs.create(&PostParams::default(), &run).await.unwrap();
    let failed = await_phase(&runs, "late", RunPhase::Failed, Duration::from_secs(40)).await;
    let status = failed.status.as_ref().unwrap();
    let started = status.started_at.unwrap();
    let completed = status.completed_at.unwrap();
    assert!(
        completed - started < chrono::Duration::seconds(8 + 10),
        "ended {} s after it started",
        (completed - started).num_seconds()
    );
    let records = records(&ns.api::<ConfigMap>(), "late").await;
    assert_eq!(records.len(), 1 + 3 + 3);
    assert!(
        records
            .values()
            .all(|r| r.failure_class.as_deref() == Some("RunDeadlineExceeded")),
        "{records:?}"
    );
    // The builder's never-ending Job is deleted, not left running.
    eventually(Duration::from_secs(30), "the run's Jobs to go", || async {
        jobs.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
            .then_some(())
    })
    .await;

    let exit = operator.terminate(Duration::from_secs(20));
    assert!(
        exit.is_some_and(|s| s.success()),
        "the operator did not stop cleanly on SIGTERM: {exit:?}"
    );
    ns.delete().await;
}
