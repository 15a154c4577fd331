//! The local environment is the real thing: the API server, the Job controller, the
//! garbage collector, the scheduler, the registries and Prometheus decide, and the kwok
//! nodes are simulated (scripted per pod by `sim.imagebuild.dev/*` annotations). The real
//! node is `tests/e2e_real.rs`'.
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cluster::{Env, TestNamespace, eventually};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, PodCondition};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// A one-pod Job (backoffLimit 0, as the operator makes them) whose pod carries `annotations`.
fn job(name: &str, annotations: serde_json::Value, pod_spec: serde_json::Value) -> Job {
    let mut spec = json!({
        "restartPolicy": "Never",
        "containers": [{"name": "build", "image": "moby/buildkit:rootless"}],
    });
    for (k, v) in pod_spec.as_object().unwrap() {
        spec[k] = v.clone();
    }
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"metadata": {"annotations": annotations}, "spec": spec},
        },
    }))
    .unwrap()
}

fn has_condition(job: &Job, type_: &str) -> Option<(String, String)> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| {
            (
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

/// Waits until the Job has condition `type_` (Complete or Failed); returns it and its
/// reason and message.
async fn await_job(jobs: &Api<Job>, name: &str, type_: &str) -> (Job, String, String) {
    eventually(WAIT, &format!("Job {name} to be {type_}"), || async {
        let job = jobs.get(name).await.ok()?;
        let other = if type_ == "Complete" {
            "Failed"
        } else {
            "Complete"
        };
        if let Some((reason, message)) = has_condition(&job, other) {
            panic!("Job {name} is {other} ({reason}: {message}), expected {type_}");
        }
        let (reason, message) = has_condition(&job, type_)?;
        Some((job, reason, message))
    })
    .await
}

async fn pods_of(pods: &Api<Pod>, job: &str) -> Vec<Pod> {
    let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
    pods.list(&lp).await.expect("list pods").items
}

async fn only_pod_of(pods: &Api<Pod>, job: &str) -> Pod {
    let mut all = pods_of(pods, job).await;
    assert_eq!(all.len(), 1, "Job {job} has {} pods, expected 1", all.len());
    all.remove(0)
}

fn terminated(pod: &Pod) -> k8s_openapi::api::core::v1::ContainerStateTerminated {
    let status = pod.status.as_ref().expect("pod status");
    let container = &status
        .container_statuses
        .as_ref()
        .expect("container statuses")[0];
    let state = container.state.as_ref().expect("container state");
    state.terminated.clone().expect("container terminated")
}

fn pod_condition(pod: &Pod, type_: &str) -> Option<PodCondition> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find(|c| c.type_ == type_).cloned()
}

async fn node_labels(client: &Client, name: &str) -> BTreeMap<String, String> {
    let node = Api::<Node>::all(client.clone())
        .get(name)
        .await
        .expect("node");
    node.metadata.labels.unwrap_or_default()
}

#[tokio::test]
async fn job_runs_on_a_large_disk_node_for_its_scripted_time_and_completes() {
    let env = Env::get();
    let _logs = env.logs_on_failure();
    let client = env.client().await;
    let ns = TestNamespace::create(&client, "e2e-job-ok").await;
    let (jobs, pods) = (ns.api::<Job>(), ns.api::<Pod>());

    let result = r#"{"digest":"sha256:0123","buildSeconds":3}"#;
    let spec = job(
        "build-ok",
        json!({"sim.imagebuild.dev/duration": "3s", "sim.imagebuild.dev/message": result}),
        json!({
            "nodeSelector": {"imagebuild.dev/disk": "large"},
            "containers": [{"name": "build", "image": "moby/buildkit:rootless",
                "resources": {"requests": {"ephemeral-storage": "60Gi", "cpu": "2", "memory": "8Gi"}}}],
        }),
    );
    jobs.create(&PostParams::default(), &spec).await.unwrap();
    let (done, _, _) = await_job(&jobs, "build-ok", "Complete").await;

    let pod = only_pod_of(&pods, "build-ok").await;
    let node = pod
        .spec
        .as_ref()
        .unwrap()
        .node_name
        .clone()
        .expect("scheduled");
    assert_eq!(
        node_labels(&client, &node).await.get("imagebuild.dev/disk"),
        Some(&"large".to_string()),
        "pod placed on {node}, which is not a large-disk node"
    );
    let term = terminated(&pod);
    assert_eq!(term.exit_code, 0);
    assert_eq!(term.message.as_deref(), Some(result));
    // Timestamps have one-second resolution; the pod ran for its scripted 3 s.
    let ran = term.finished_at.unwrap().0.as_second() - term.started_at.unwrap().0.as_second();
    assert!((2..=10).contains(&ran), "pod ran {ran}s, scripted 3s");
    let status = done.status.unwrap();
    assert_eq!(status.succeeded, Some(1));
    let took =
        status.completion_time.unwrap().0.as_second() - status.start_time.unwrap().0.as_second();
    assert!(took >= 3, "Job complete after {took}s, its pod runs 3s");
    ns.delete().await;
}

#[tokio::test]
async fn failing_evicted_and_overdue_pods_fail_their_jobs_as_scripted() {
    let env = Env::get();
    let _logs = env.logs_on_failure();
    let client = env.client().await;
    let ns = TestNamespace::create(&client, "e2e-job-fail").await;
    let (jobs, pods) = (ns.api::<Job>(), ns.api::<Pod>());
    let pp = PostParams::default();

    let failing = json!({
        "sim.imagebuild.dev/duration": "1s",
        "sim.imagebuild.dev/exit-code": "2",
        "sim.imagebuild.dev/message": "ERROR: failed to solve: no space left on device",
    });
    jobs.create(&pp, &job("build-fails", failing, json!({})))
        .await
        .unwrap();
    let evicted = json!({
        "sim.imagebuild.dev/duration": "1s",
        "sim.imagebuild.dev/pod-reason": "Evicted",
        "sim.imagebuild.dev/pod-message": "The node was low on resource: ephemeral-storage.",
    });
    jobs.create(&pp, &job("build-evicted", evicted, json!({})))
        .await
        .unwrap();
    let never = json!({"sim.imagebuild.dev/never-finish": "true"});
    jobs.create(&pp, &job("build-hangs", never, json!({})))
        .await
        .unwrap();

    let (_, reason, _) = await_job(&jobs, "build-fails", "Failed").await;
    assert_eq!(reason, "BackoffLimitExceeded");
    let term = terminated(&only_pod_of(&pods, "build-fails").await);
    assert_eq!(term.exit_code, 2);
    assert_eq!(term.reason.as_deref(), Some("Error"));
    assert_eq!(
        term.message.as_deref(),
        Some("ERROR: failed to solve: no space left on device")
    );

    let (_, reason, _) = await_job(&jobs, "build-evicted", "Failed").await;
    assert_eq!(reason, "BackoffLimitExceeded");
    let pod = only_pod_of(&pods, "build-evicted").await;
    let status = pod.status.as_ref().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert_eq!(status.reason.as_deref(), Some("Evicted"));
    assert_eq!(
        status.message.as_deref(),
        Some("The node was low on resource: ephemeral-storage.")
    );

    // A pod that never finishes runs on (where one without the annotation succeeds after
    // the default 1s) until the Job controller ends it at the deadline given it now.
    let started = eventually(WAIT, "the pod of build-hangs to run", || async {
        let pod = pods_of(&pods, "build-hangs").await.pop()?;
        let status = pod.status?;
        (status.phase.as_deref() == Some("Running")).then_some(status.start_time?)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let job = jobs.get("build-hangs").await.unwrap();
    assert!(has_condition(&job, "Complete").is_none() && has_condition(&job, "Failed").is_none());
    let pod = only_pod_of(&pods, "build-hangs").await;
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Running"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let running_for = now.as_secs() as i64 - started.0.as_second();
    let deadline = json!({"spec": {"activeDeadlineSeconds": running_for + 2}});
    jobs.patch(
        "build-hangs",
        &PatchParams::default(),
        &Patch::Merge(&deadline),
    )
    .await
    .unwrap();
    let (_, reason, _) = await_job(&jobs, "build-hangs", "Failed").await;
    assert_eq!(reason, "DeadlineExceeded");
    ns.delete().await;
}

#[tokio::test]
async fn scheduler_respects_node_selectors_and_ephemeral_storage() {
    let env = Env::get();
    let _logs = env.logs_on_failure();
    let client = env.client().await;
    let ns = TestNamespace::create(&client, "e2e-sched").await;
    let (jobs, pods) = (ns.api::<Job>(), ns.api::<Pod>());
    let pp = PostParams::default();
    let never = || json!({"sim.imagebuild.dev/never-finish": "true"});
    let storage = |size: &str| {
        json!([{"name": "build", "image": "moby/buildkit:rootless",
            "resources": {"requests": {"ephemeral-storage": size}}}])
    };

    // The ordinary node has 100Gi of disk: 50Gi fits, 200Gi does not.
    let on_small = json!({"kubernetes.io/hostname": "kwok-small-0"});
    let fits = json!({"nodeSelector": on_small, "containers": storage("50Gi")});
    jobs.create(&pp, &job("small-fits", never(), fits))
        .await
        .unwrap();
    let too_big = json!({"nodeSelector": on_small, "containers": storage("200Gi")});
    jobs.create(&pp, &job("small-too-big", never(), too_big))
        .await
        .unwrap();
    let nowhere = json!({"nodeSelector": {"imagebuild.dev/disk": "nonexistent"}});
    jobs.create(&pp, &job("no-such-node", never(), nowhere))
        .await
        .unwrap();

    let scheduled = eventually(WAIT, "small-fits to be scheduled", || async {
        let pod = pods_of(&pods, "small-fits").await.pop()?;
        pod.spec?.node_name
    })
    .await;
    assert_eq!(scheduled, "kwok-small-0");

    for (job_name, expected) in [
        ("small-too-big", "Insufficient ephemeral-storage"),
        ("no-such-node", "didn't match Pod's node affinity/selector"),
    ] {
        let cond = eventually(WAIT, &format!("{job_name} to be unschedulable"), || async {
            let pod = pods_of(&pods, job_name).await.pop()?;
            pod_condition(&pod, "PodScheduled").filter(|c| c.status == "False")
        })
        .await;
        assert_eq!(cond.reason.as_deref(), Some("Unschedulable"));
        let message = cond.message.unwrap_or_default();
        assert!(message.contains(expected), "{job_name}: {message}");
        // It stays that way: the scheduler keeps it Pending.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pod = only_pod_of(&pods, job_name).await;
        assert_eq!(
            pod.status.as_ref().unwrap().phase.as_deref(),
            Some("Pending")
        );
        assert!(pod.spec.as_ref().unwrap().node_name.is_none());
    }
    ns.delete().await;
}

#[tokio::test]
async fn garbage_collector_and_ttl_controller_clean_up_jobs() {
    let env = Env::get();
    let _logs = env.logs_on_failure();
    let client = env.client().await;
    let ns = TestNamespace::create(&client, "e2e-gc").await;
    let (jobs, pods) = (ns.api::<Job>(), ns.api::<Pod>());
    let pp = PostParams::default();

    let never = json!({"sim.imagebuild.dev/never-finish": "true"});
    jobs.create(&pp, &job("deleted", never, json!({})))
        .await
        .unwrap();
    let mut ttl = job(
        "short-lived",
        json!({"sim.imagebuild.dev/duration": "1s"}),
        json!({}),
    );
    ttl.spec.as_mut().unwrap().ttl_seconds_after_finished = Some(1);
    jobs.create(&pp, &ttl).await.unwrap();

    let pod = eventually(WAIT, "the pod of Job deleted to run", || async {
        let pod = pods_of(&pods, "deleted").await.pop()?;
        (pod.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(pod)
    })
    .await;
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Job", "deleted")
    );

    jobs.delete("deleted", &DeleteParams::background())
        .await
        .unwrap();
    eventually(WAIT, "the garbage collector to delete the pod", || async {
        pods_of(&pods, "deleted").await.is_empty().then_some(())
    })
    .await;

    // The TTL controller deletes the finished Job; the garbage collector then its pod.
    eventually(
        WAIT,
        "the TTL controller to delete Job short-lived",
        || async {
            jobs.get_opt("short-lived")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    eventually(WAIT, "the pod of Job short-lived to go", || async {
        pods_of(&pods, "short-lived").await.is_empty().then_some(())
    })
    .await;
    ns.delete().await;
}

#[tokio::test]
async fn the_project_crd_is_served_with_its_status_subresource_and_cel_rules() {
    use imagebuild_operator::api::ImageBuildRun;

    let env = Env::get();
    let _logs = env.logs_on_failure();
    let client = env.client().await;
    common::cluster::apply_crd(&client).await;

    let ns = TestNamespace::create(&client, "e2e-crd").await;
    let runs = ns.api::<ImageBuildRun>();
    let mut run: ImageBuildRun =
        serde_yaml_ng::from_str(&std::fs::read_to_string("examples/swegym-run.yaml").unwrap())
            .unwrap();
    run.metadata.namespace = Some(ns.name.clone());
    // The API server may not serve the new type for a moment after it is Established.
    eventually(WAIT, "the ImageBuildRun to be created", || async {
        runs.create(&PostParams::default(), &run).await.ok()
    })
    .await;

    // Status is a subresource: written through it, ignored through the main resource.
    let status = json!({"status": {"phase": "Building"}});
    runs.patch_status("swegym", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let ignored = json!({"status": {"phase": "Failed"}});
    runs.patch("swegym", &PatchParams::default(), &Patch::Merge(&ignored))
        .await
        .unwrap();
    let got = runs.get("swegym").await.unwrap();
    assert_eq!(
        serde_json::to_value(got.status.unwrap()).unwrap()["phase"],
        "Building"
    );

    // CEL rules run on the server: a mutable field changes, an immutable one does not.
    let scale = json!({"spec": {"maxWorkers": 4}});
    runs.patch("swegym", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    let vars = json!({"spec": {"vars": {"sdkSha": "ffffff0"}}});
    let err = runs
        .patch("swegym", &PatchParams::default(), &Patch::Merge(&vars))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("vars is immutable"), "{err}");

    let mut two_sources = serde_json::to_value(&run).unwrap();
    two_sources["metadata"]["name"] = json!("two-sources");
    two_sources["spec"]["instances"]["list"] = json!(["a__b-1"]);
    let two_sources: ImageBuildRun = serde_json::from_value(two_sources).unwrap();
    let err = runs
        .create(&PostParams::default(), &two_sources)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("instances must set exactly one of list, configMap or huggingFace"),
        "{err}"
    );
    ns.delete().await;
}

/// `KEY=value` of `e2e/versions.env`, the one file that pins the components.
fn pinned(key: &str) -> String {
    let text = std::fs::read_to_string("e2e/versions.env").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} is not pinned in e2e/versions.env"))
        .trim()
        .to_string()
}

#[tokio::test]
async fn the_components_are_the_pinned_versions() {
    let env = Env::get();
    let client = env.client().await;
    let server = client.apiserver_version().await.unwrap();
    assert_eq!(server.git_version, pinned("KUBERNETES_VERSION"));

    let run = |tool: &str, args: &[&str]| {
        let out = std::process::Command::new(env.bin.join(tool))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(out.status.success(), "{tool} {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    };
    let kubectl: serde_json::Value =
        serde_json::from_str(&run("kubectl", &["version", "--client", "-o", "json"])).unwrap();
    assert_eq!(
        kubectl["clientVersion"]["gitVersion"],
        pinned("KUBERNETES_VERSION")
    );
    assert!(run("helm", &["version", "--short"]).starts_with(&pinned("HELM_VERSION")));
    assert!(run("kwok", &["--version"]).contains(&pinned("KWOK_VERSION")));
    assert!(run("etcd", &["--version"]).contains(pinned("ETCD_VERSION").trim_start_matches('v')));
    assert!(run("kubelet", &["--version"]).contains(&pinned("KUBERNETES_VERSION")));
    assert!(run("crictl", &["--version"]).contains(&pinned("CRI_TOOLS_VERSION")));
    for tool in ["buildkitd", "buildctl"] {
        assert!(run(tool, &["--version"]).contains(&pinned("BUILDKIT_VERSION")));
    }
    assert!(
        run("rootlesskit", &["--version"])
            .contains(pinned("ROOTLESSKIT_VERSION").trim_start_matches('v'))
    );
}
