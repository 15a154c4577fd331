//! Results users can trust, on the real control plane: the `summary` command against a run
//! with scripted build times, failures, retries and skips; the counts in the status, in
//! the manifest and from an independent watcher agreeing after operator restarts; and a
//! large run with its sizes and costs printed: 200 instances by default, the 10,000 of the
//! benchmark with `IMAGEBUILD_SCALE_INSTANCES=10000` (see docs/benchmarks.md).
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::cluster::{Operator, eventually, setup};
use common::prometheus::sum;
use common::runs::{
    Seen, annotations, await_phase, count_status_writes, events, job_of, manifest_shards, plan,
    records, swebench_ids, swebench_run, watch_jobs, watch_jobs_pushing,
};
use imagebuild_operator::api::{ImageBuildRun, ImageBuildRunStatus, PhaseCounts, RunPhase};
use imagebuild_operator::manifest::{Record, RecordStatus};
use imagebuild_operator::plan::{Phase, Plan};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use oci_client::secrets::RegistryAuth;
use serde_json::{Value, json};

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

/// Runs the `summary` command against the environment, for a run that did not succeed
/// (exit 1: the report, and a failing status for CI); its stdout.
fn summary(ns: &str, run: &str, format: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imagebuild-operator"))
        .args(["summary", run, "-n", ns, "-o", format])
        .output()
        .expect("run imagebuild-operator summary");
    assert_eq!(
        out.status.code(),
        Some(1),
        "summary of a run that did not succeed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A map literal for the templates: `{"key": value, ...}`.
fn literal(pairs: &[(String, u64)]) -> String {
    let items: Vec<String> = pairs.iter().map(|(k, v)| format!("{k:?}: {v}")).collect();
    format!("{{{}}}", items.join(", "))
}

#[tokio::test]
async fn the_summary_reports_scripted_build_times_failures_retries_and_skips() {
    let (env, _logs, ns) = setup("e2e-summary").await;
    let _operator = Operator::start(&ns.name);
    let (runs, cms) = (ns.api::<ImageBuildRun>(), ns.api::<ConfigMap>());
    let _seen = watch_jobs(ns.api::<Job>());

    let ids = swebench_ids(8);
    let mut run = swebench_run("results", &env.registry, &ns.name, &ids, 4);
    let p = plan(&run, &ids);
    // Scripted build seconds: the builder 100; the base of ids[i] 30 + 5i; assemblies
    // from a table.
    let asm_seconds = [12u64, 30, 7, 45, 21, 9, 60, 33];
    let upstream = |i: usize| {
        p.nodes
            .iter()
            .find(|n| n.instance_id.as_deref() == Some(ids[i].as_str()))
            .and_then(|n| n.upstream_image.as_deref())
            .unwrap()
            .to_string()
    };
    let bases: Vec<(String, u64)> = (0..8).map(|i| (upstream(i), 30 + 5 * i as u64)).collect();
    let asms: Vec<(String, u64)> = (0..8).map(|i| (ids[i].clone(), asm_seconds[i])).collect();
    // ids[0]'s assembly is already in the registry (so its base is not needed); ids[1]'s
    // Dockerfile fails; ids[2] is throttled on every attempt; ids[3] on its first only.
    let (present, broken, exhausted, flaky) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    let spec = &mut run.spec;
    for (k, v) in [
        ("broken", broken),
        ("exhausted", exhausted),
        ("flaky", flaky),
    ] {
        spec.vars.insert(k.into(), v.clone());
    }
    let build_error = "phase == 'assembly' and instanceId == broken";
    let throttled = "phase == 'assembly' and (instanceId == exhausted or (instanceId == flaky and attempt == 1))";
    let exit_code = format!("{{% if ({build_error}) or ({throttled}) %}}1{{% endif %}}");
    let message = format!(
        "{{% set bases = {} %}}{{% set asms = {} %}}\
         {{% if {build_error} %}}ERROR: failed to solve: process \"/bin/sh -c make\" did not complete successfully: exit code: 2\
         {{% elif {throttled} %}}error: failed to push: 429 Too Many Requests: toomanyrequests\
         {{% else %}}{{\"exitCode\":0,\"digest\":\"{DIGEST}\",\"buildSeconds\":\
         {{% if phase == 'builder' %}}100{{% elif phase == 'base' %}}{{{{ bases[upstreamImage] }}}}{{% else %}}{{{{ asms[instanceId] }}}}{{% endif %}}\
         ,\"pushSeconds\":1}}{{% endif %}}",
        literal(&bases),
        literal(&asms)
    );
    spec.placement.pod_annotations = annotations(&[
        ("sim.imagebuild.dev/exit-code", &exit_code),
        ("sim.imagebuild.dev/message", &message),
    ]);
    spec.retry.attempts = 2;
    spec.retry.backoff.initial = "1s".into();
    spec.retry.backoff.max = "2s".into();

    let present_image = p
        .nodes
        .iter()
        .find(|n| n.phase == Phase::Assembly && n.instance_id.as_deref() == Some(present.as_str()))
        .unwrap()
        .image
        .clone();
    let (layers, config) = common::oci::tiny_image();
    common::oci::oci()
        .push(
            &present_image.parse().unwrap(),
            &layers,
            config,
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .unwrap();

    runs.create(&PostParams::default(), &run).await.unwrap();
    let done = await_phase(
        &runs,
        "results",
        RunPhase::PartiallySucceeded,
        Duration::from_secs(180),
    )
    .await;
    let status = done.status.clone().unwrap();
    let records = records(&cms, "results").await;
    assert_eq!(records.len(), p.nodes.len(), "one record per planned image");

    // The manifest says what was scripted.
    let record = |phase: Phase, id: &str| &records[&job_of(&p, phase, id)];
    for (i, id) in ids.iter().enumerate() {
        let asm = record(Phase::Assembly, id);
        let expected = match i {
            0 => (RecordStatus::SkippedRemoteExists, None, 0),
            1 => (RecordStatus::Failed, None, 1),
            2 => (RecordStatus::Failed, None, 2),
            3 => (RecordStatus::Built, Some(asm_seconds[i]), 2),
            _ => (RecordStatus::Built, Some(asm_seconds[i]), 1),
        };
        assert_eq!(
            (asm.status, asm.build_seconds, asm.attempt_count),
            expected,
            "{id}: {asm:?}"
        );
        let base = record(Phase::Base, id);
        if i == 0 {
            assert_eq!(base.status, RecordStatus::SkippedNotNeeded, "{base:?}");
        } else {
            assert_eq!(base.build_seconds, Some(30 + 5 * i as u64), "{base:?}");
            assert_eq!(base.base_image.as_deref(), Some(upstream(i).as_str()));
        }
    }
    let ran: Vec<&Record> = records.values().filter(|r| r.attempt_count > 0).collect();
    assert!(
        ran.iter().all(|r| r.duration_seconds.is_some()
            && r.log_path
                .as_deref()
                .is_some_and(|l| l.starts_with(&ns.name))),
        "every attempt has its duration and pod: {ran:?}"
    );
    assert_eq!(
        record(Phase::Assembly, exhausted).failure_class.as_deref(),
        Some("RegistryThrottled")
    );
    assert_eq!(status.retries_exhausted, 1);
    assert_eq!(
        status.estimated_completion, None,
        "nothing left to estimate"
    );

    // The JSON summary, against the scripted numbers and the manifest.
    let s: Value = serde_json::from_str(&summary(&ns.name, "results", "json")).unwrap();
    assert_eq!(s["schema_version"], 1);
    assert_eq!(s["phase"], "PartiallySucceeded");
    assert_eq!(
        s["totals"],
        json!({"images": 17, "built": 13, "skipped": 2, "failed": 2, "retried": 2, "pending": 0})
    );
    let wall = (status.completed_at.unwrap() - status.started_at.unwrap()).num_seconds();
    assert_eq!(s["wall_clock_seconds"], wall);
    let image_seconds: u64 = records.values().filter_map(|r| r.duration_seconds).sum();
    assert_eq!(s["image_seconds"], image_seconds);
    assert!(image_seconds >= 13, "every build took at least a second");
    let phases = s["phases"].as_array().unwrap();
    let phase = |name: &str| phases.iter().find(|p| p["phase"] == name).unwrap();
    // Assemblies built: ids[3..8] took 45, 21, 9, 60, 33 s.
    assert_eq!(
        phase("assembly")["build_seconds"],
        json!({"count": 5, "median": 33.0, "p95": 60, "max": 60, "total": 168})
    );
    assert_eq!(
        phase("assembly")["totals"],
        json!({"images": 8, "built": 5, "skipped": 1, "failed": 2, "retried": 2, "pending": 0})
    );
    // Bases built: ids[1..8] took 35 to 65 s.
    assert_eq!(
        phase("base")["build_seconds"],
        json!({"count": 7, "median": 50.0, "p95": 65, "max": 65, "total": 350})
    );
    assert_eq!(phase("builder")["build_seconds"]["max"], 100);
    let slowest: Vec<u64> = s["slowest"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["build_seconds"].as_u64().unwrap())
        .collect();
    assert_eq!(slowest, [100, 65, 60, 60, 55, 50, 45, 45, 40, 35]);
    let failed: Vec<(&str, &str, u64)> = s["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["subject"].as_str().unwrap(),
                f["failure_class"].as_str().unwrap(),
                f["attempt_count"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut expected = vec![
        (broken.as_str(), "BuildError", 1),
        (exhausted.as_str(), "RegistryThrottled", 2),
    ];
    expected.sort();
    assert_eq!(failed, expected);
    assert_eq!(
        s["skip_reasons"],
        json!({"skipped_not_needed": 1, "skipped_remote_exists": 1})
    );

    // The Markdown form says the same.
    let md = summary(&ns.name, "results", "markdown");
    assert!(
        md.contains("17 images: 13 built, 2 skipped, 2 failed, 2 retried, 0 pending."),
        "{md}"
    );
    assert!(
        md.contains("| assembly | 8 | 5 | 1 | 2 | 2 | 0 | 33 | 60 | 60 |"),
        "{md}"
    );
    assert!(md.contains(&format!("| assembly | {broken} | BuildError | 1 |")));

    // Events: the run's milestones and aggregated failures, not one per image.
    let events = events(&ns, "results").await;
    let reasons: BTreeSet<&str> = events.iter().map(|(_, r, _)| r.as_str()).collect();
    for reason in [
        "Resolved",
        "BuilderStarted",
        "BuilderSucceeded",
        "ImagesFailed",
        "RetriesExhausted",
        "PartiallySucceeded",
    ] {
        assert!(reasons.contains(reason), "{reason} missing from {events:?}");
    }
    let failed_events = events
        .iter()
        .filter(|(_, r, _)| r == "ImagesFailed")
        .count();
    assert_eq!(failed_events, 1, "2 failures: one Event at 1 ({events:?})");

    // A missing run is a clear error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imagebuild-operator"))
        .args(["summary", "nope", "-n", &ns.name])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "ImageBuildRun nope not found in namespace {}",
            ns.name
        )),
        "{err}"
    );
    ns.delete().await;
}

/// The totals of `status` over every phase: (succeeded, failed, running).
fn status_totals(status: &ImageBuildRunStatus) -> (u32, u32, u32) {
    let all: [&PhaseCounts; 4] = [
        &status.builder,
        &status.bases,
        &status.assemblies,
        &status.post_assemblies,
    ];
    (
        all.iter().map(|c| c.succeeded).sum(),
        all.iter().map(|c| c.failed).sum(),
        all.iter().map(|c| c.running).sum(),
    )
}

/// Job names by recorded status.
fn by_status(records: &BTreeMap<String, Record>, statuses: &[RecordStatus]) -> BTreeSet<String> {
    records
        .iter()
        .filter(|(_, r)| statuses.contains(&r.status))
        .map(|(job, _)| job.clone())
        .collect()
}

/// Waits until the status, the manifest and the watcher agree while nothing runs: the
/// same images built (status count, manifest and watcher names) and failed (status and
/// manifest; the watcher's failed Jobs are those failed or waiting to retry). Returns the
/// number built.
async fn counts_agree(
    runs: &Api<ImageBuildRun>,
    cms: &Api<ConfigMap>,
    seen: &std::sync::Arc<std::sync::Mutex<Seen>>,
    name: &str,
    when: &str,
) -> usize {
    eventually(
        Duration::from_secs(60),
        &format!("status, manifest and watcher to agree {when}"),
        || async {
            let status = runs.get(name).await.ok()?.status?;
            let records = records(cms, name).await;
            let (built, failed) = seen.lock().unwrap().results();
            let active = seen.lock().unwrap().active();
            let (s_built, s_failed, s_running) = status_totals(&status);
            let m_built = by_status(&records, &[RecordStatus::Built]);
            let m_failed = by_status(&records, &[RecordStatus::Failed]);
            let m_failing = by_status(&records, &[RecordStatus::Failed, RecordStatus::Retrying]);
            let agree = active == 0
                && s_running == 0
                && s_built as usize == m_built.len()
                && m_built == built
                && s_failed as usize == m_failed.len()
                && m_failing == failed;
            agree.then_some(m_built.len())
        },
    )
    .await
}

async fn set_suspend(runs: &Api<ImageBuildRun>, name: &str, suspend: bool) {
    runs.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"suspend": suspend}})),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn status_manifest_and_watcher_agree_across_operator_restarts() {
    let (env, _logs, ns) = setup("e2e-restarts").await;
    let mut operator = Operator::start(&ns.name);
    let (runs, cms) = (ns.api::<ImageBuildRun>(), ns.api::<ConfigMap>());
    let seen = watch_jobs(ns.api::<Job>());

    let ids = swebench_ids(30);
    let mut run = swebench_run("restarts", &env.registry, &ns.name, &ids, 4);
    let spec = &mut run.spec;
    spec.vars.insert("broken".into(), ids[7].clone());
    spec.vars.insert("flaky".into(), ids[20].clone());
    let build_error = "phase == 'assembly' and instanceId == broken";
    let throttled = "phase == 'assembly' and instanceId == flaky and attempt == 1";
    spec.placement.pod_annotations = annotations(&[
        (
            "sim.imagebuild.dev/exit-code",
            &format!("{{% if ({build_error}) or ({throttled}) %}}1{{% endif %}}"),
        ),
        (
            "sim.imagebuild.dev/message",
            &format!(
                "{{% if {build_error} %}}ERROR: exit code: 2{{% elif {throttled} %}}429 Too Many Requests{{% endif %}}"
            ),
        ),
        (
            "sim.imagebuild.dev/duration",
            "{% if phase == 'builder' %}3s{% else %}1s{% endif %}",
        ),
    ]);
    spec.retry.backoff.initial = "1s".into();
    spec.retry.backoff.max = "2s".into();
    runs.create(&PostParams::default(), &run).await.unwrap();
    let plan: Plan = plan(&run, &ids);

    // Kill the operator while the builder runs, among the bases and among the assemblies;
    // after each restart, suspend the run and compare the three views once it is still.
    let mut built = 0;
    for (after_jobs, pause) in [
        (1usize, Duration::from_secs(4)),
        (12, Duration::from_secs(2)),
        (40, Duration::ZERO),
    ] {
        eventually(
            Duration::from_secs(120),
            &format!("{after_jobs} Jobs created"),
            || async { (seen.lock().unwrap().jobs.len() >= after_jobs).then_some(()) },
        )
        .await;
        operator.kill();
        tokio::time::sleep(pause).await;
        operator = Operator::start(&ns.name);
        set_suspend(&runs, "restarts", true).await;
        let now = counts_agree(
            &runs,
            &cms,
            &seen,
            "restarts",
            &format!("after the restart at {after_jobs} Jobs"),
        )
        .await;
        println!("restart at {after_jobs} Jobs: the three views agree on {now} built");
        assert!(now >= built, "built went from {built} to {now}");
        built = now;
        set_suspend(&runs, "restarts", false).await;
    }
    assert!(built > 0, "the restarts fell after some images were built");

    let done = await_phase(
        &runs,
        "restarts",
        RunPhase::PartiallySucceeded,
        Duration::from_secs(240),
    )
    .await;
    let built = counts_agree(&runs, &cms, &seen, "restarts", "at the end").await;
    assert_eq!(built, plan.nodes.len() - 1, "all but the broken assembly");
    let records = records(&cms, "restarts").await;
    assert_eq!(
        records.keys().collect::<BTreeSet<_>>(),
        plan.nodes
            .iter()
            .map(|n| &n.job_name)
            .collect::<BTreeSet<_>>(),
        "exactly one record per node"
    );
    assert!(records.values().all(|r| r.status != RecordStatus::Retrying));
    let flaky = &records[&job_of(&plan, Phase::Assembly, &ids[20])];
    assert_eq!(
        (flaky.status, flaky.attempt_count),
        (RecordStatus::Built, 2)
    );
    let status = done.status.unwrap();
    assert_eq!(status.failed_total, 1);
    let per_attempt = seen.lock().unwrap().per_attempt();
    assert!(
        per_attempt.values().all(|&n| n == 1),
        "one Job per node and attempt: {per_attempt:?}"
    );
    ns.delete().await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Instances of the large run: `IMAGEBUILD_SCALE_INSTANCES`, default 200 (401 images,
/// two manifest shards), which keeps the suite short; the benchmark sets 10,000.
fn scale_instances() -> usize {
    std::env::var("IMAGEBUILD_SCALE_INSTANCES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200)
}

#[tokio::test]
async fn a_large_run_fits_its_objects_and_counts_right() {
    let (env, _logs, ns) = setup("e2e-scale").await;
    let operator = Operator::start(&ns.name);
    let (runs, cms) = (ns.api::<ImageBuildRun>(), ns.api::<ConfigMap>());
    // No pushes: the run is about the operator's bookkeeping, not the registry.
    let seen = watch_jobs_pushing(ns.api::<Job>(), false);
    let writes = count_status_writes(runs.clone());

    let n = scale_instances();
    let ids: Vec<String> = (0..n).map(|i| format!("scale__scale-{i:05}")).collect();
    let list = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("scale-instances".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("ids.txt".into(), ids.join("\n"))])),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &list).await.unwrap();
    let mut run = swebench_run("scale", &env.registry, &ns.name, &ids[..1], 150);
    run.spec.instances.list = None;
    run.spec.instances.config_map =
        Some(serde_json::from_value(json!({"name": "scale-instances", "key": "ids.txt"})).unwrap());
    run.spec.placement.cpu = k8s_openapi::apimachinery::pkg::api::resource::Quantity("100m".into());
    // About 3% of assemblies fail with a build error (the first two hex digits of their
    // id's hash below 08), the rest take 100 ms.
    let broken = "phase == 'assembly' and (instanceId | sha256)[:2] < '08'";
    run.spec.placement.pod_annotations = annotations(&[
        ("sim.imagebuild.dev/duration", "100ms"),
        ("sim.imagebuild.dev/start-delay", "50ms"),
        (
            "sim.imagebuild.dev/exit-code",
            &format!("{{% if {broken} %}}1{{% endif %}}"),
        ),
        (
            "sim.imagebuild.dev/message",
            &format!("{{% if {broken} %}}ERROR: exit code: 2{{% endif %}}"),
        ),
    ]);
    let started = Instant::now();
    runs.create(&PostParams::default(), &run).await.unwrap();
    let timeout = Duration::from_secs(120 + n as u64 / 2);
    let done = await_phase(&runs, "scale", RunPhase::PartiallySucceeded, timeout).await;
    let elapsed = started.elapsed();
    let peak_kib = operator.peak_rss_kib();
    let cpu = operator.cpu_seconds();
    let scraped = Instant::now();
    let page = reqwest::get(format!("http://{}/metrics", operator.metrics_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape_ms = scraped.elapsed().as_secs_f64() * 1000.0;
    let samples = prometheus_parse::Scrape::parse(page.lines().map(|l| Ok(l.to_string())))
        .unwrap()
        .samples;

    let status = done.status.clone().unwrap();
    let status_bytes = serde_json::to_vec(&done.status).unwrap().len();
    let object_bytes = serde_json::to_vec(&done).unwrap().len();
    let shards = manifest_shards(&cms, "scale").await;
    let sizes: Vec<usize> = shards
        .values()
        .map(|cm| {
            cm.data
                .as_ref()
                .map_or(0, |d| d.values().map(String::len).sum())
        })
        .collect();
    let records = records(&cms, "scale").await;
    let nodes = 1 + 2 * n;
    let status_writes = writes.lock().unwrap().get("scale").copied().unwrap_or(0);
    let jobs = seen.lock().unwrap().jobs.len();
    println!(
        "scale run: {n} instances, {nodes} images, {jobs} Jobs in {:.0} s ({:.1} images/s)",
        elapsed.as_secs_f64(),
        nodes as f64 / elapsed.as_secs_f64()
    );
    println!("  status: {status_bytes} bytes (whole object {object_bytes} bytes)");
    println!(
        "  manifest: {} shards, {} to {} bytes, {} in all",
        sizes.len(),
        sizes.iter().min().unwrap(),
        sizes.iter().max().unwrap(),
        sizes.iter().sum::<usize>()
    );
    println!("  status writes: {status_writes}");
    let requests = sum(&samples, "imagebuild_kubernetes_requests_total", &[]).unwrap();
    println!(
        "  metrics: {} bytes, {} samples, scraped in {scrape_ms:.1} ms; {requests} API requests ({:.2} per image)",
        page.len(),
        samples.len(),
        requests / nodes as f64
    );
    println!(
        "  operator: peak RSS {} MiB, CPU {} s",
        peak_kib.map_or("?".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
        cpu.map_or("?".into(), |c| format!("{c:.1}"))
    );

    assert!(status_bytes < 16 * 1024, "status is {status_bytes} bytes");
    assert!(
        sizes.iter().all(|&s| s < 900 * 1024),
        "a shard over 900 KiB: {sizes:?}"
    );
    assert_eq!(status.manifests.len(), shards.len());
    assert_eq!(records.len(), nodes, "one record per image");
    let broken: Vec<&Record> = records
        .values()
        .filter(|r| r.status == RecordStatus::Failed)
        .collect();
    // Exactly the scripted ones: the instances whose id hashes below 08.
    let scripted: BTreeSet<&str> = ids
        .iter()
        .filter(|id| {
            use sha2::Digest;
            hex(&sha2::Sha256::digest(id.as_bytes()))[..2] < *"08"
        })
        .map(String::as_str)
        .collect();
    let failed_ids: BTreeSet<&str> = broken
        .iter()
        .filter_map(|r| r.instance_id.as_deref())
        .collect();
    assert_eq!(failed_ids, scripted);
    assert_eq!(broken.len(), scripted.len(), "only assemblies fail");
    let (s_built, s_failed, _) = status_totals(&status);
    let (built, failed) = seen.lock().unwrap().results();
    assert_eq!(
        s_built as usize,
        by_status(&records, &[RecordStatus::Built]).len()
    );
    assert_eq!(s_built as usize, built.len());
    assert_eq!(s_failed as usize, broken.len());
    assert_eq!(failed.len(), broken.len());
    assert_eq!(
        status.failures.len(),
        broken.len().min(20),
        "the list is bounded"
    );
    assert_eq!(status.failed_total as usize, broken.len());
    // The metrics count what the status counts.
    let r = [("namespace", ns.name.as_str()), ("run", "scale")];
    let builds = |result: &'static str| {
        let labels: Vec<(&str, &str)> = r.iter().copied().chain([("result", result)]).collect();
        sum(&samples, "imagebuild_builds_total", &labels).unwrap()
    };
    assert_eq!(builds("succeeded"), f64::from(s_built));
    assert_eq!(builds("failed"), f64::from(s_failed));
    let log = operator.log();
    assert!(
        !log.contains("too large") && !log.contains("reconcile failed"),
        "the API server refused a write: {}",
        log.lines()
            .filter(|l| l.contains("WARN"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    ns.delete().await;
}
