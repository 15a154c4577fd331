//! The operator's metrics and alerts against the real control plane, registry and
//! Prometheus: scrapes taken while a run builds agree with the run's status at that
//! moment; the counters and histograms add up to the run at its end; a deleted run's
//! series go; the endpoint stops with the operator. With the chart's rules at test-sized
//! durations, a run whose pods never finish makes ImageBuildRunStuck fire (Prometheus'
//! alerts API), while a healthy run next to it fires nothing.
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Operator, eventually, install_crypto_provider, setup};
use common::prometheus::{
    alert_rules, alerts, matching, query, reload, rendered_rules, scrape, sum,
};
use common::runs::{annotations, await_phase, swebench_ids, swebench_run};
use imagebuild_operator::api::{ImageBuildRun, ImageBuildRunStatus, RunPhase};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use prometheus_parse::Sample;

const WAIT: Duration = Duration::from_secs(180);

fn seconds(t: chrono::DateTime<chrono::Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// Checks every per-run gauge that mirrors the status against `status`.
fn assert_agree(samples: &[Sample], ns: &str, run: &str, status: &ImageBuildRunStatus) {
    let r = [("namespace", ns), ("run", run)];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
        r.iter().chain(extra).copied().collect()
    };
    let phases = [
        ("builder", &status.builder),
        ("base", &status.bases),
        ("assembly", &status.assemblies),
        ("postAssembly", &status.post_assemblies),
    ];
    let mut running = 0;
    for (phase, counts) in phases {
        for (state, n) in [
            ("pending", counts.pending),
            ("running", counts.running),
            ("succeeded", counts.succeeded),
            ("skipped", counts.skipped),
            ("failed", counts.failed),
        ] {
            let got = sum(
                samples,
                "imagebuild_run_images",
                &with(&[("phase", phase), ("state", state)]),
            );
            assert_eq!(got, Some(f64::from(n)), "{phase} {state} in {status:?}");
        }
        running += counts.running;
    }
    assert_eq!(
        sum(samples, "imagebuild_run_jobs_in_flight", &r),
        Some(f64::from(running))
    );
    let phase = format!("{:?}", status.phase.expect("a phase"));
    let current: Vec<String> = matching(samples, "imagebuild_run_status_phase", &r)
        .into_iter()
        .filter(|s| common::prometheus::number(s) == 1.0)
        .filter_map(|s| s.labels.get("phase").map(str::to_string))
        .collect();
    assert_eq!(current, vec![phase]);
    let progress = status.last_progress_at.or(status.started_at).unwrap();
    let got = sum(
        samples,
        "imagebuild_run_last_progress_timestamp_seconds",
        &r,
    )
    .unwrap();
    assert!((got - seconds(progress)).abs() < 0.002, "{got} {progress}");
    let eta = sum(
        samples,
        "imagebuild_run_estimated_completion_timestamp_seconds",
        &r,
    );
    match status.estimated_completion {
        Some(t) => assert!((eta.unwrap() - seconds(t)).abs() < 0.002),
        None => assert_eq!(eta, None, "an estimate the status does not have"),
    }
}

#[tokio::test]
async fn metrics_agree_with_the_status_and_go_with_the_run_and_the_operator() {
    let (env, _logs, ns) = setup("e2e-metrics").await;
    install_crypto_provider();
    let mut operator = Operator::start(&ns.name);
    let addr = operator.metrics_addr();
    let runs = ns.api::<ImageBuildRun>();

    let health = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    eventually(Duration::from_secs(30), "/readyz to answer 200", || async {
        let answer = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
        (answer.status() == 200).then_some(())
    })
    .await;

    let name = "agree";
    let ids = swebench_ids(20);
    let mut run = swebench_run(name, &env.registry, &ns.name, &ids, 3);
    // One assembly is throttled on its first attempt (then built), one fails its build.
    run.spec.vars.insert("throttled".into(), ids[3].clone());
    run.spec.vars.insert("broken".into(), ids[7].clone());
    let throttle = "phase == 'assembly' and instanceId == throttled and attempt == 1";
    let broken = "phase == 'assembly' and instanceId == broken";
    run.spec.placement.pod_annotations = annotations(&[
        (
            "sim.imagebuild.dev/exit-code",
            &format!("{{% if ({throttle}) or ({broken}) %}}1{{% endif %}}"),
        ),
        (
            "sim.imagebuild.dev/message",
            &format!(
                "{{% if {throttle} %}}error: failed to push: 429 Too Many Requests: toomanyrequests\
                 {{% elif {broken} %}}ERROR: failed to solve: exit code: 2{{% endif %}}"
            ),
        ),
    ]);
    run.spec.retry.backoff.initial = "1s".into();
    runs.create(&PostParams::default(), &run).await.unwrap();

    // Status, scrape, status: when the status did not change around the scrape, the
    // scrape must match it exactly.
    let (mut compared, mut while_building) = (0, 0);
    let start = Instant::now();
    let last = loop {
        assert!(start.elapsed() < WAIT, "the run did not finish");
        let before = runs.get(name).await.unwrap();
        let samples = scrape(&addr).await;
        let after = runs.get(name).await.unwrap();
        let status = after.status.clone().unwrap_or_default();
        if before.resource_version() == after.resource_version() && status.phase.is_some() {
            assert_agree(&samples, &ns.name, name, &status);
            compared += 1;
            if status.phase == Some(RunPhase::Building) {
                while_building += 1;
            }
        }
        if matches!(
            status.phase,
            Some(RunPhase::Succeeded | RunPhase::PartiallySucceeded | RunPhase::Failed)
        ) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("{compared} scrapes compared with the status, {while_building} while building");
    assert!(
        while_building >= 3,
        "{while_building} comparisons while building"
    );
    assert_eq!(last.phase, Some(RunPhase::PartiallySucceeded));
    let samples = scrape(&addr).await;
    assert_agree(&samples, &ns.name, name, &last);

    // The counters and histograms add up to the run: 1 builder, 20 bases, 20 assemblies,
    // all missing from the registry; 40 built, one of them on a second attempt after a
    // throttled push; one failed its build: 42 Jobs.
    let r = [("namespace", ns.name.as_str()), ("run", name)];
    let counter = |metric: &str, extra: &[(&'static str, &'static str)]| {
        let labels: Vec<(&str, &str)> = r.iter().chain(extra).copied().collect();
        sum(&samples, metric, &labels).unwrap_or(0.0)
    };
    assert_eq!(
        counter("imagebuild_builds_total", &[("result", "succeeded")]),
        40.0
    );
    assert_eq!(
        counter(
            "imagebuild_builds_total",
            &[("result", "failed"), ("phase", "assembly")]
        ),
        1.0
    );
    assert_eq!(
        counter(
            "imagebuild_builds_total",
            &[("result", "retried"), ("phase", "assembly")]
        ),
        1.0
    );
    assert_eq!(counter("imagebuild_builds_total", &[]), 42.0);
    assert_eq!(
        counter(
            "imagebuild_build_failures_total",
            &[("class", "BuildError")]
        ),
        1.0
    );
    assert_eq!(
        counter(
            "imagebuild_build_failures_total",
            &[("class", "RegistryThrottled")]
        ),
        1.0
    );
    assert_eq!(counter("imagebuild_build_failures_total", &[]), 2.0);
    assert_eq!(
        counter(
            "imagebuild_retries_total",
            &[("class", "RegistryThrottled")]
        ),
        1.0
    );
    assert_eq!(counter("imagebuild_retries_total", &[]), 1.0);
    assert_eq!(counter("imagebuild_skips_total", &[]), 0.0);
    // The run's repositories do not exist yet: the 20 assemblies' and the 20 bases' are
    // each answered by one tag list (NAME_UNKNOWN), the builder by one manifest request.
    assert_eq!(
        counter("imagebuild_registry_requests_total", &[("code", "404")]),
        3.0
    );
    // Durations of the 40 builds; a queue wait per Job created, a pending time per pod.
    for (histogram, count) in [
        ("imagebuild_build_duration_seconds_count", 40.0),
        ("imagebuild_queue_wait_seconds_count", 42.0),
        ("imagebuild_pod_pending_seconds_count", 42.0),
    ] {
        assert_eq!(sum(&samples, histogram, &[]), Some(count), "{histogram}");
    }
    assert_eq!(
        sum(
            &samples,
            "imagebuild_build_duration_seconds_count",
            &[("phase", "assembly")]
        ),
        Some(19.0)
    );
    let medians = matching(&samples, "imagebuild_run_build_duration_median_seconds", &r);
    assert_eq!(medians.len(), 3, "builder, base and assembly medians");
    let creates = sum(
        &samples,
        "imagebuild_kubernetes_requests_total",
        &[("verb", "POST"), ("code", "201")],
    )
    .unwrap();
    assert!(creates >= 42.0, "{creates} creates for 42 Jobs");
    assert!(
        sum(
            &samples,
            "imagebuild_kubernetes_requests_total",
            &[("verb", "WATCH")]
        )
        .unwrap()
            >= 3.0
    );
    assert_eq!(sum(&samples, "imagebuild_ready", &[]), Some(1.0));
    assert!(sum(&samples, "imagebuild_reconcile_duration_seconds_count", &[]).unwrap() > 0.0);

    // Deleting the run takes its series away.
    runs.delete(name, &DeleteParams::default()).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the run's series to go",
        || async {
            let samples = scrape(&addr).await;
            samples
                .iter()
                .all(|s| s.labels.get("run") != Some(name))
                .then_some(())
        },
    )
    .await;

    // SIGTERM stops the operator and its endpoint.
    let exit = operator.terminate(Duration::from_secs(30));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    assert!(
        reqwest::get(format!("http://{addr}/healthz"))
            .await
            .is_err()
    );
}

/// A rule file and a scrape target of one test, removed when it ends.
struct Scraped {
    files: Vec<std::path::PathBuf>,
}

impl Drop for Scraped {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[tokio::test]
async fn a_stuck_run_fires_its_alert_and_a_healthy_run_fires_nothing() {
    let (env, _logs, ns) = setup("e2e-alerts").await;
    install_crypto_provider();
    let operator = Operator::start(&ns.name);
    let addr = operator.metrics_addr();
    let token = format!("{:08x}", rand::random::<u32>());

    // Prometheus scrapes this operator, labelled with the token, and evaluates the
    // chart's rules with test-sized thresholds and durations.
    let target = env.prometheus_targets.join(format!("e2e-{token}.json"));
    std::fs::write(
        &target,
        format!(r#"[{{"targets":["{addr}"],"labels":{{"test":"{token}"}}}}]"#),
    )
    .unwrap();
    // Scraped before the rules load, so that "no target" is never true for a moment.
    eventually(
        Duration::from_secs(30),
        "Prometheus to scrape the operator",
        || async {
            let up = query(&env, &format!("up{{test=\"{token}\"}} == 1")).await;
            (!up.is_empty()).then_some(())
        },
    )
    .await;
    let selector = format!("alerts.operatorDown.selector=test=\"{token}\"");
    let rules = rendered_rules(&[
        "alerts.runStuck.noProgressSeconds=20",
        "alerts.runStuck.for=4s",
        "alerts.runMissesDeadline.for=4s",
        "alerts.slowBuilds.for=4s",
        "alerts.slowBuilds.baselineWindow=10m",
        "alerts.slowBuilds.minBuilds=2",
        "alerts.failureRatio.window=1m",
        "alerts.failureRatio.minBuilds=2",
        "alerts.failureRatio.for=4s",
        "alerts.retryStorm.window=1m",
        "alerts.retryStorm.minRetries=2",
        "alerts.retryStorm.for=4s",
        "alerts.podsUnschedulable.for=4s",
        "alerts.evictionsOrDiskFull.window=1m",
        "alerts.evictionsOrDiskFull.threshold=1",
        "alerts.registryThrottled.window=1m",
        "alerts.registryThrottled.threshold=1",
        "alerts.registryThrottled.for=0s",
        &selector,
        "alerts.operatorDown.for=4s",
        "alerts.operatorNotReady.for=4s",
        "alerts.reconcileErrors.window=1m",
        "alerts.reconcileErrors.for=4s",
    ]);
    assert!(rules.contains("> 20\n") && rules.contains(&format!("test=\"{token}\"")));
    let rule_file = env.prometheus_rules.join(format!("e2e-{token}.yml"));
    std::fs::write(&rule_file, rules).unwrap();
    let _cleanup = Scraped {
        files: vec![target, rule_file],
    };
    reload(&env).await;
    eventually(
        Duration::from_secs(30),
        "Prometheus to load the rules",
        || async {
            let loaded = alert_rules(&env).await;
            loaded
                .iter()
                .any(|r| r == "ImageBuildRunStuck")
                .then_some(())
        },
    )
    .await;

    let runs: Api<ImageBuildRun> = ns.api();
    let mut stuck = swebench_run("stuck", &env.registry, &ns.name, &swebench_ids(2), 2);
    stuck.spec.placement.pod_annotations =
        annotations(&[("sim.imagebuild.dev/never-finish", "true")]);
    runs.create(&PostParams::default(), &stuck).await.unwrap();
    let healthy = swebench_run("healthy", &env.registry, &ns.name, &swebench_ids(6), 3);
    runs.create(&PostParams::default(), &healthy).await.unwrap();

    // Any alert of the healthy run, and any firing alert about this operator itself
    // (down, not ready, reconcile errors), is a failure, whenever it happens.
    let quiet = |all: &[serde_json::Value]| {
        let noisy: Vec<&serde_json::Value> = all
            .iter()
            .filter(|a| {
                let labels = &a["labels"];
                let ours = labels["namespace"] == ns.name.as_str();
                let operator = labels["test"] == token.as_str() && labels["run"].is_null();
                (ours && labels["run"] == "healthy")
                    || (a["state"] == "firing" && (operator || labels["kind"].is_string()))
            })
            .collect();
        assert!(noisy.is_empty(), "alerts that should be quiet: {noisy:#?}");
    };

    let fired = eventually(
        WAIT,
        "ImageBuildRunStuck to fire for the stuck run",
        || async {
            let all = alerts(&env).await;
            quiet(&all);
            all.into_iter().find(|a| {
                a["labels"]["alertname"] == "ImageBuildRunStuck"
                    && a["labels"]["namespace"] == ns.name.as_str()
                    && a["labels"]["run"] == "stuck"
                    && a["state"] == "firing"
            })
        },
    )
    .await;
    let description = fired["annotations"]["description"].as_str().unwrap();
    assert!(
        description.starts_with(&format!(
            "No image of run {}/stuck has finished for ",
            ns.name
        )),
        "{description}"
    );
    assert_eq!(fired["labels"]["severity"], "warning");
    let stuck_status = runs.get("stuck").await.unwrap().status.unwrap();
    assert_eq!(stuck_status.phase, Some(RunPhase::Building));
    assert_eq!(stuck_status.builder.running, 1);
    let s = &stuck_status;
    let remaining: u32 = [&s.builder, &s.bases, &s.assemblies, &s.post_assemblies]
        .iter()
        .map(|c| c.pending + c.running)
        .sum();
    assert!(
        description.contains(&format!("remain to build ({remaining} pending or running)")),
        "{description}"
    );

    // The healthy run finishes; Prometheus sees it finished, and it agrees with the
    // status.
    let done = await_phase(&runs, "healthy", RunPhase::Succeeded, WAIT).await;
    let status = done.status.unwrap();
    let promql = format!(
        "sum(imagebuild_run_images{{namespace=\"{}\",run=\"healthy\",state=\"succeeded\"}}) \
         and on () imagebuild_run_status_phase{{namespace=\"{}\",run=\"healthy\",phase=\"Succeeded\"}} == 1",
        ns.name, ns.name
    );
    let succeeded = eventually(
        Duration::from_secs(30),
        "Prometheus to see the healthy run done",
        || async {
            query(&env, &promql)
                .await
                .into_iter()
                .next()
                .map(|(_, v)| v)
        },
    )
    .await;
    let built = status.builder.succeeded + status.bases.succeeded + status.assemblies.succeeded;
    assert_eq!(succeeded, built.to_string());
    assert_eq!(built, 13);
    // Longer than the stuck threshold and every `for:`: still nothing from it.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(30) {
        quiet(&alerts(&env).await);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    drop(operator);
    drop(_cleanup);
    reload(&env).await;
}
