//! The kubectl plugin (`kubectl-imagebuild`) against the real control plane and a running
//! operator, with the user's kubeconfig: `wait` and `summary` exit non-zero on a run that
//! did not succeed and name its failures; `retry --instance` builds a failed image again
//! in the same run (its record's attempts bumped, the manifest kept) until `wait` exits 0;
//! `cancel` stops a run (phase Cancelled, Jobs gone, records kept, `Complete` True, no
//! way back); `suspend`/`resume`; errors for a missing run and for a user whose RBAC
//! allows reading runs only; `status --watch` draws live bars in a terminal (tmux).
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::cluster::{Operator, eventually, setup, token_kubeconfig};
use common::runs::{
    annotations, await_phase, plan, records, swebench_ids, swebench_run, watch_jobs,
};
use common::tool;
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use imagebuild_operator::manifest::RecordStatus;
use imagebuild_operator::names::LABEL_KEPT_LOG;
use imagebuild_operator::plan::Phase;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};

const WAIT: Duration = Duration::from_secs(120);

/// Runs the plugin with `args` (and the environment's admin kubeconfig unless
/// `kubeconfig` names another).
fn plugin(args: &[&str], kubeconfig: Option<&Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kubectl-imagebuild"));
    command.args(args);
    if let Some(k) = kubeconfig {
        command.env("KUBECONFIG", k);
    }
    command.output().expect("kubectl-imagebuild runs")
}

/// Its exit code, stdout and stderr.
fn run_plugin(args: &[&str], kubeconfig: Option<&Path>) -> (i32, String, String) {
    let out = plugin(args, kubeconfig);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn condition(run: &ImageBuildRun, type_: &str) -> Option<(String, String)> {
    run.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn wait_summary_and_retry_of_a_partly_failed_run() {
    let (env, _logs, ns) = setup("e2e-plugin-retry").await;
    let _operator = Operator::start(&ns.name);
    let _seen = watch_jobs(ns.api::<Job>());
    let runs: Api<ImageBuildRun> = ns.api();
    let cms: Api<ConfigMap> = ns.api();
    let ids = swebench_ids(3);
    let broken = ids[1].clone();
    let mut run = swebench_run("partly", &env.registry, &ns.name, &ids, 4);
    // The first attempt of one assembly fails with a build error (never retried by itself).
    let first = format!("phase == 'assembly' and instanceId == '{broken}' and attempt == 1");
    run.spec.placement.pod_annotations = annotations(&[
        ("sim.imagebuild.dev/duration", "300ms"),
        (
            "sim.imagebuild.dev/exit-code",
            &format!("{{% if {first} %}}1{{% endif %}}"),
        ),
        (
            "sim.imagebuild.dev/message",
            &format!(
                "{{% if {first} %}}ERROR: failed to solve: pip install: exit code: 1{{% endif %}}"
            ),
        ),
    ]);
    runs.create(&PostParams::default(), &run).await.unwrap();

    // wait: exit 1 on a run that did not succeed, with the failure named.
    let (code, out, err) = run_plugin(&["wait", "partly", "-n", &ns.name, "--timeout", "2m"], None);
    assert_eq!(code, 1, "wait on a partly failed run: {out}{err}");
    assert!(out.contains("PartiallySucceeded"), "{out}");
    assert!(out.contains(&broken) && out.contains("BuildError"), "{out}");
    let done = runs.get("partly").await.unwrap();
    assert_eq!(
        condition(&done, "Complete"),
        Some(("True".into(), "PartiallySucceeded".into())),
        "a terminal condition for kubectl wait"
    );
    assert_eq!(condition(&done, "Ready").map(|c| c.0), Some("False".into()));
    // kubectl wait ends on it at once.
    tool(
        "kubectl",
        &[
            "wait",
            "-n",
            &ns.name,
            "--for=condition=Complete",
            "ibr/partly",
            "--timeout=10s",
        ],
    );
    let (code, out, _) = run_plugin(&["summary", "partly", "-n", &ns.name], None);
    assert_eq!(code, 1, "summary of a run that did not succeed: {out}");
    assert!(out.contains(&broken), "{out}");
    let (code, out, _) = run_plugin(&["summary", "partly", "-n", &ns.name, "-o", "json"], None);
    assert_eq!(code, 1);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["totals"]["failed"], 1, "{json}");

    // The failed build's pod outlives its Job, for its log: out of the Job, owned by the run.
    let plan = plan(&run, &ids);
    let job = common::runs::job_of(&plan, Phase::Assembly, &broken);
    let kept = ns
        .api::<Pod>()
        .list(&ListParams::default().labels(&format!("{LABEL_KEPT_LOG}={job}")))
        .await
        .unwrap()
        .items;
    assert_eq!(kept.len(), 1, "the failed attempt's pod is kept");
    let pod = &kept[0];
    assert!(!pod.labels().contains_key("batch.kubernetes.io/job-name"));
    let owners = pod.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.len(), 1);
    assert_eq!(
        (owners[0].kind.as_str(), Some(owners[0].uid.clone())),
        ("ImageBuildRun", done.uid())
    );
    assert!(
        ns.api::<Job>().get_opt(&job).await.unwrap().is_none(),
        "its Job is gone"
    );
    let (code, out, err) = run_plugin(
        &["logs", "partly", "-n", &ns.name, "--instance", &broken],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("==> assembly {broken} (Failed, BuildError) <=="))
            && out.contains(&format!("--- attempt 1 (pod {}) ---", pod.name_any())),
        "{out}"
    );

    // retry of an instance the run does not have: refused, nothing sent.
    let (code, _, err) = run_plugin(
        &[
            "retry",
            "partly",
            "-n",
            &ns.name,
            "--instance",
            "no__such-1",
        ],
        None,
    );
    assert_eq!(code, 2);
    assert!(err.contains("no record of instance(s) no__such-1"), "{err}");
    assert!(
        runs.get("partly")
            .await
            .unwrap()
            .spec
            .retry_request
            .is_none()
    );

    // retry: the same run builds the failed image again, with its next attempt.
    let manifests_before: Vec<String> = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.uid().unwrap())
        .collect();
    let (code, out, err) = run_plugin(
        &["retry", "partly", "-n", &ns.name, "--instance", &broken],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("retry request 1"), "{out}");
    let (code, out, err) = run_plugin(&["wait", "partly", "-n", &ns.name, "--timeout", "2m"], None);
    assert_eq!(code, 0, "wait after the retry: {out}{err}");
    let run = await_phase(&runs, "partly", RunPhase::Succeeded, WAIT).await;
    let status = run.status.unwrap();
    let retry = status.last_retry.expect("the request is in the status");
    assert_eq!((retry.id, retry.reopened), (1, 1), "{}", retry.message);
    assert_eq!(status.failed_total, 0);
    let by_instance = records(&cms, "partly").await;
    let record = by_instance
        .values()
        .find(|r| r.instance_id.as_deref() == Some(broken.as_str()) && r.phase == Phase::Assembly)
        .expect("the retried image's record");
    assert_eq!(record.status, RecordStatus::Built);
    assert_eq!(record.attempt_count, 2, "the retry is the second attempt");
    let manifests_after: Vec<String> = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.uid().unwrap())
        .collect();
    for uid in &manifests_before {
        assert!(
            manifests_after.contains(uid),
            "the manifest was kept, not recreated"
        );
    }
    // Nothing failed any more: a retry has nothing to do.
    let (code, _, err) = run_plugin(&["retry", "partly", "-n", &ns.name], None);
    assert_eq!(code, 2);
    assert!(err.contains("no failed image to retry"), "{err}");
    let (code, _, _) = run_plugin(&["summary", "partly", "-n", &ns.name], None);
    assert_eq!(code, 0, "summary of a run that succeeded");
    ns.delete().await;
}

#[tokio::test]
async fn cancel_suspend_resume_and_clear_errors() {
    let (env, _logs, ns) = setup("e2e-plugin-cancel").await;
    let _operator = Operator::start(&ns.name);
    let _seen = watch_jobs(ns.api::<Job>());
    let runs: Api<ImageBuildRun> = ns.api();
    let jobs: Api<Job> = ns.api();
    let cms: Api<ConfigMap> = ns.api();

    // A user who may read runs and nothing else.
    let user = "reader";
    tool(
        "kubectl",
        &["create", "serviceaccount", user, "-n", &ns.name],
    );
    tool(
        "kubectl",
        &[
            "create",
            "role",
            user,
            "-n",
            &ns.name,
            "--verb=get,list,watch",
            "--resource=imagebuildruns.imagebuild.dev,configmaps",
        ],
    );
    tool(
        "kubectl",
        &[
            "create",
            "rolebinding",
            user,
            "-n",
            &ns.name,
            "--role",
            user,
            &format!("--serviceaccount={}:{user}", ns.name),
        ],
    );
    let token = tool("kubectl", &["create", "token", user, "-n", &ns.name]);
    let kubeconfig = std::env::temp_dir().join(format!("{}-{user}.kubeconfig", ns.name));
    token_kubeconfig(token.trim(), &kubeconfig);

    // The builder is built; the other builds never end on their own.
    let mut run = swebench_run("endless", &env.registry, &ns.name, &swebench_ids(3), 2);
    run.spec.placement.pod_annotations = annotations(&[(
        "sim.imagebuild.dev/never-finish",
        "{% if phase != 'builder' %}true{% endif %}",
    )]);
    runs.create(&PostParams::default(), &run).await.unwrap();
    let in_flight = || async {
        jobs.list(&ListParams::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(0)
    };
    eventually(WAIT, "the builder built and a base in flight", || async {
        let run = runs.get("endless").await.ok()?;
        let status = run.status?;
        (status.builder.succeeded == 1 && status.bases.running > 0 && in_flight().await > 0)
            .then_some(())
    })
    .await;

    // Errors: no such run; a reader may look but not cancel.
    let (code, _, err) = run_plugin(&["status", "nope", "-n", &ns.name], None);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!(
            "ImageBuildRun nope not found in namespace {}",
            ns.name
        )),
        "{err}"
    );
    let (code, out, err) = run_plugin(&["status", "endless", "-n", &ns.name], Some(&kubeconfig));
    assert_eq!(code, 0, "a reader sees the status: {err}");
    assert!(
        out.contains("endless: Building") && out.contains("builder"),
        "{out}"
    );
    let (code, _, err) = run_plugin(&["cancel", "endless", "-n", &ns.name], Some(&kubeconfig));
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!(
            "no permission to patch ImageBuildRuns in namespace {}",
            ns.name
        )),
        "{err}"
    );
    let (code, _, err) = run_plugin(
        &["status", "endless", "-n", "kube-system"],
        Some(&kubeconfig),
    );
    assert_eq!(code, 2);
    assert!(err.contains("no permission to get"), "{err}");

    // suspend, then resume.
    let (code, out, _) = run_plugin(&["suspend", "endless", "-n", &ns.name], None);
    assert_eq!(code, 0, "{out}");
    eventually(WAIT, "Progressing False, Suspended", || async {
        let run = runs.get("endless").await.ok()?;
        (condition(&run, "Progressing") == Some(("False".into(), "Suspended".into()))).then_some(())
    })
    .await;
    let (code, out, _) = run_plugin(&["status", "endless", "-n", &ns.name], None);
    assert_eq!(code, 0);
    assert!(out.contains("(suspended)"), "{out}");
    let (code, _, _) = run_plugin(&["resume", "endless", "-n", &ns.name], None);
    assert_eq!(code, 0);
    eventually(WAIT, "Progressing True again", || async {
        let run = runs.get("endless").await.ok()?;
        (condition(&run, "Progressing").map(|c| c.0) == Some("True".into())).then_some(())
    })
    .await;

    // cancel: Cancelled, every Job gone, the manifest and its records kept.
    let before = in_flight().await;
    assert!(before > 0);
    let cancelled_at = Instant::now();
    let (code, out, err) = run_plugin(&["cancel", "endless", "-n", &ns.name], None);
    assert_eq!(code, 0, "{out}{err}");
    let run = await_phase(&runs, "endless", RunPhase::Cancelled, WAIT).await;
    eventually(WAIT, "the run's Jobs gone", || async {
        (in_flight().await == 0).then_some(())
    })
    .await;
    println!(
        "cancel: {before} Job(s) in flight, all gone {:.1} s after `cancel`",
        cancelled_at.elapsed().as_secs_f64()
    );
    assert_eq!(
        condition(&run, "Complete"),
        Some(("True".into(), "Cancelled".into()))
    );
    let status = run.status.clone().unwrap();
    assert!(status.completed_at.is_some());
    assert!(
        !status.manifests.is_empty(),
        "the manifest is kept: {status:?}"
    );
    for name in &status.manifests {
        assert!(cms.get_opt(name).await.unwrap().is_some(), "{name} kept");
    }
    let by_image = records(&cms, "endless").await;
    assert!(
        by_image
            .values()
            .any(|r| r.phase == Phase::Builder && r.status == RecordStatus::Built),
        "the builder's record stays: {by_image:?}"
    );
    assert_eq!(status.builder.succeeded, 1);
    assert_eq!(
        status.bases.running + status.assemblies.running,
        0,
        "nothing in flight"
    );
    // No Job comes back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(in_flight().await, 0);
    // wait ends at once with a failing exit; cancel again is a no-op; undoing is refused.
    let (code, out, _) = run_plugin(
        &["wait", "endless", "-n", &ns.name, "--timeout", "10s"],
        None,
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("Cancelled"), "{out}");
    let (code, out, _) = run_plugin(&["cancel", "endless", "-n", &ns.name], None);
    assert_eq!(code, 0);
    assert!(out.contains("already cancelled"), "{out}");
    let undo = runs
        .patch(
            "endless",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"cancel": false}})),
        )
        .await
        .unwrap_err();
    assert!(
        undo.to_string().contains("cancel cannot be undone"),
        "{undo}"
    );
    let (code, _, err) = run_plugin(&["suspend", "endless", "-n", &ns.name], None);
    assert_eq!(code, 2);
    assert!(err.contains("it has ended (Cancelled)"), "{err}");
    // A run waiting for its instance list (a ConfigMap that does not exist) is cancelled
    // as well: it ends Cancelled without a plan.
    let mut waiting = swebench_run("unplanned", &env.registry, &ns.name, &swebench_ids(1), 1);
    waiting.spec.instances.list = None;
    waiting.spec.instances.config_map =
        Some(serde_json::from_value(serde_json::json!({"name": "nope", "key": "ids"})).unwrap());
    runs.create(&PostParams::default(), &waiting).await.unwrap();
    await_phase(&runs, "unplanned", RunPhase::Resolving, WAIT).await;
    let (code, out, err) = run_plugin(&["cancel", "unplanned", "-n", &ns.name], None);
    assert_eq!(code, 0, "{out}{err}");
    let unplanned = await_phase(&runs, "unplanned", RunPhase::Cancelled, WAIT).await;
    assert_eq!(
        condition(&unplanned, "Complete"),
        Some(("True".into(), "Cancelled".into()))
    );

    // wait gives up at its timeout, with exit 2, on a run that does not end.
    let mut other = swebench_run("slow", &env.registry, &ns.name, &swebench_ids(1), 1);
    other.spec.placement.pod_annotations =
        annotations(&[("sim.imagebuild.dev/never-finish", "true")]);
    runs.create(&PostParams::default(), &other).await.unwrap();
    let (code, _, err) = run_plugin(&["wait", "slow", "-n", &ns.name, "--timeout", "2s"], None);
    assert_eq!(code, 2);
    assert!(err.contains("slow did not end within 2s"), "{err}");
    // A run deleted while waited on: exit 2 at once, not at the timeout.
    let waiting = Command::new(env!("CARGO_BIN_EXE_kubectl-imagebuild"))
        .args(["wait", "slow", "-n", &ns.name, "--timeout", "5m"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let deleted = Instant::now();
    runs.delete("slow", &Default::default()).await.unwrap();
    let out = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("ImageBuildRun slow not found"), "{err}");
    assert!(deleted.elapsed() < Duration::from_secs(60));
    let _ = std::fs::remove_file(kubeconfig);
    ns.delete().await;
}

/// `status --watch` in a terminal: tmux runs it, its pane is captured while the run
/// builds and when it ends.
#[tokio::test]
async fn status_watch_draws_live_bars_in_a_terminal() {
    let (env, _logs, ns) = setup("e2e-plugin-watch").await;
    let _operator = Operator::start(&ns.name);
    let _seen = watch_jobs(ns.api::<Job>());
    let runs: Api<ImageBuildRun> = ns.api();
    let mut run = swebench_run("bars", &env.registry, &ns.name, &swebench_ids(12), 3);
    run.spec.placement.pod_annotations = annotations(&[("sim.imagebuild.dev/duration", "1s")]);
    runs.create(&PostParams::default(), &run).await.unwrap();
    let session = format!("ibw-{}", ns.name);
    let command = format!(
        "{} status --watch bars -n {}; echo EXITED $?; sleep 60",
        env!("CARGO_BIN_EXE_kubectl-imagebuild"),
        ns.name
    );
    tool(
        "tmux",
        &[
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "160",
            "-y",
            "20",
            &command,
        ],
    );
    let capture = || tool("tmux", &["capture-pane", "-p", "-t", &session]);
    // While it builds: a bar per phase, assemblies part done.
    let mid = eventually(WAIT, "bars of a run in progress", || async {
        let screen = capture();
        let assemblies = screen
            .lines()
            .find(|l| l.contains("assemblies"))?
            .to_string();
        let (done, total) = assemblies
            .split_whitespace()
            .find_map(|w| w.split_once('/'))
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))?;
        (done > 0 && done < total && screen.contains("bars: Building")).then_some(screen)
    })
    .await;
    println!("status --watch mid-run:\n{mid}");
    assert!(mid.contains("builder") && mid.contains("bases"), "{mid}");
    assert!(mid.contains('[') && mid.contains('='), "a drawn bar: {mid}");
    let end = eventually(WAIT, "the watch to end with the run", || async {
        let screen = capture();
        screen.contains("EXITED").then_some(screen)
    })
    .await;
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", &session])
        .status();
    println!("status --watch at the end:\n{end}");
    assert!(end.contains("EXITED 0"), "{end}");
    assert!(end.contains("bars: Succeeded"), "{end}");
    assert!(end.contains("12/12"), "{end}");
    ns.delete().await;
}
