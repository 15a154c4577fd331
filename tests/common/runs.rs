//! Runs on the local control plane: a SWE-bench-shaped ImageBuildRun, waiting for a
//! phase, and an independent watcher of the run's Jobs that also stands in for BuildKit's
//! push.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use imagebuild_operator::instances::RawInstance;
use imagebuild_operator::manifest;
use imagebuild_operator::manifest::Record;
use imagebuild_operator::names::{
    ANNOTATION_ATTEMPT, ANNOTATION_DISPATCHED_BY, ANNOTATION_IMAGE, LABEL_PHASE, LABEL_RUN,
};
use imagebuild_operator::plan::{Phase, Plan};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use oci_client::secrets::RegistryAuth;

use super::cluster::{TestNamespace, eventually};

/// The first `n` SWE-bench Verified ids of the shared fixture.
pub fn swebench_ids(n: usize) -> Vec<String> {
    std::fs::read_to_string(super::SWEBENCH_IDS)
        .unwrap()
        .lines()
        .take(n)
        .map(str::to_string)
        .collect()
}

/// One Job as the watcher saw it.
#[derive(Clone, Debug)]
pub struct SeenJob {
    pub name: String,
    pub run: String,
    pub phase: String,
    pub attempt: u32,
    /// When the watcher first saw it.
    pub created: Instant,
    /// Its creationTimestamp (whole seconds, from the API server), in Unix milliseconds.
    pub created_ms: i64,
    pub finished: Option<Instant>,
    /// When the watcher saw it deleted.
    pub deleted: Option<Instant>,
    /// Complete (true) or Failed (false), once the Job says so.
    pub succeeded: Option<bool>,
    /// The operator that created it (with leader election).
    pub dispatched_by: Option<String>,
    /// The field manager of its create, as the API server recorded it: the manager of
    /// its one managedFields entry of the whole object (others are of its status).
    pub created_by: Option<String>,
}

/// What an independent watcher saw of a namespace's Jobs, by uid.
#[derive(Default)]
pub struct Seen {
    pub jobs: BTreeMap<String, SeenJob>,
    active: BTreeSet<String>,
    pub max_active: usize,
    /// Jobs in flight per run, after every change.
    pub history: Vec<BTreeMap<String, usize>>,
    pushed: BTreeSet<String>,
}

impl Seen {
    /// How many Jobs were created for each (Job name, attempt): more than one is a
    /// duplicate.
    pub fn per_attempt(&self) -> BTreeMap<(String, u32), usize> {
        let mut out = BTreeMap::new();
        for job in self.jobs.values() {
            *out.entry((job.name.clone(), job.attempt)).or_default() += 1;
        }
        out
    }

    /// Jobs whose build finished (Complete or Failed, or deleted).
    pub fn finished(&self) -> usize {
        self.jobs.values().filter(|j| j.finished.is_some()).count()
    }

    /// Jobs created after `t`.
    pub fn created_after(&self, t: Instant) -> Vec<&SeenJob> {
        self.jobs.values().filter(|j| j.created > t).collect()
    }

    /// Job names with a Complete Job, and those whose Jobs all failed.
    pub fn results(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut built = BTreeSet::new();
        let mut failed = BTreeSet::new();
        for job in self.jobs.values() {
            match job.succeeded {
                Some(true) => {
                    built.insert(job.name.clone());
                }
                Some(false) => {
                    failed.insert(job.name.clone());
                }
                None => {}
            }
        }
        let failed = failed.difference(&built).cloned().collect();
        (built, failed)
    }

    /// Jobs in flight now.
    pub fn active(&self) -> usize {
        self.active.len()
    }
}

fn finished(job: &Job) -> Option<bool> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        .map(|c| c.type_ == "Complete")
}

/// Watches the Jobs of `jobs`' namespace: counts those in flight, and pushes a tiny image
/// for each Job that completes, standing in for BuildKit's push.
pub fn watch_jobs(jobs: Api<Job>) -> Arc<Mutex<Seen>> {
    watch_jobs_pushing(jobs, true)
}

/// [`watch_jobs`], pushing images only if `push`.
pub fn watch_jobs_pushing(jobs: Api<Job>, push: bool) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    tokio::spawn(async move {
        // Through API server and etcd restarts: an error is retried with backoff, and the
        // watch resumes where it was.
        let mut events = watcher(jobs, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = events.next().await {
            let Ok(event) = event else { continue };
            let (job, deleted) = match event {
                watcher::Event::Apply(j) | watcher::Event::InitApply(j) => (j, false),
                watcher::Event::Delete(j) => (j, true),
                _ => continue,
            };
            let uid = job.uid().unwrap_or_default();
            let done = finished(&job);
            let push = {
                let mut s = seen.lock().unwrap();
                let entry = s.jobs.entry(uid.clone()).or_insert_with(|| SeenJob {
                    name: job.name_any(),
                    run: job.labels().get(LABEL_RUN).cloned().unwrap_or_default(),
                    phase: job.labels().get(LABEL_PHASE).cloned().unwrap_or_default(),
                    attempt: job
                        .annotations()
                        .get(ANNOTATION_ATTEMPT)
                        .and_then(|a| a.parse().ok())
                        .unwrap_or(0),
                    created: Instant::now(),
                    created_ms: job
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map_or(0, |t| t.0.as_millisecond()),
                    finished: None,
                    deleted: None,
                    succeeded: None,
                    dispatched_by: job.annotations().get(ANNOTATION_DISPATCHED_BY).cloned(),
                    created_by: job
                        .managed_fields()
                        .iter()
                        .find(|f| {
                            f.subresource.is_none() && f.operation.as_deref() == Some("Update")
                        })
                        .and_then(|f| f.manager.clone()),
                });
                if done.is_some() {
                    entry.succeeded = done;
                }
                if deleted {
                    entry.deleted.get_or_insert_with(Instant::now);
                }
                if deleted || done.is_some() {
                    entry.finished.get_or_insert_with(Instant::now);
                    s.active.remove(&uid);
                } else {
                    s.active.insert(uid.clone());
                }
                s.max_active = s.max_active.max(s.active.len());
                let mut per_run = BTreeMap::new();
                for uid in &s.active {
                    *per_run.entry(s.jobs[uid].run.clone()).or_default() += 1;
                }
                if s.history.last() != Some(&per_run) {
                    s.history.push(per_run);
                }
                match job.annotations().get(ANNOTATION_IMAGE) {
                    Some(image) if push && done == Some(true) && s.pushed.insert(uid) => {
                        Some(image.clone())
                    }
                    _ => None,
                }
            };
            if let Some(image) = push {
                let reference = image.parse().unwrap();
                let (layers, config) = super::oci::tiny_image();
                super::oci::oci()
                    .push(&reference, &layers, config, &RegistryAuth::Anonymous, None)
                    .await
                    .unwrap();
            }
        }
    });
    out
}

/// The creates of one Job name the API server's audit log shows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Creates {
    /// Answered 201: a Job was created.
    pub sure: u32,
    /// Answered with a server error or a timeout (the client gone mid-request, say): the
    /// Job may have been created all the same.
    pub unsure: u32,
}

/// One Job create in the API server's audit log.
#[derive(Clone, Debug)]
pub struct AuditedCreate {
    pub name: String,
    /// Its answer's status code (none: no answer was written).
    pub code: Option<u64>,
    /// When the API server received it (microseconds).
    pub received: chrono::DateTime<chrono::Utc>,
}

/// The Job creates in namespace `ns` (not dry runs: the operator's preflight makes
/// none), in the order they were answered, from the environment's audit log under `dir`.
/// Unlike a watch, it misses no Job that came and went while the watch was down: an API
/// server shuts down gracefully, writing the line of every create it answered.
pub fn audited_creates(dir: &std::path::Path, ns: &str) -> Vec<AuditedCreate> {
    let log = std::fs::read_to_string(dir.join("audit/jobs.log")).unwrap();
    let mut out = Vec::new();
    for line in log.lines() {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        let object = &event["objectRef"];
        if event["verb"] != "create"
            || object["resource"] != "jobs"
            || object["namespace"] != ns
            || event["requestURI"].as_str().unwrap().contains("dryRun=")
        {
            continue;
        }
        out.push(AuditedCreate {
            name: object["name"].as_str().unwrap().to_string(),
            code: event["responseStatus"]["code"].as_u64(),
            received: event["requestReceivedTimestamp"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap(),
        });
    }
    out
}

/// [`audited_creates`] counted by Job name.
pub fn audited_job_creates(dir: &std::path::Path, ns: &str) -> BTreeMap<String, Creates> {
    let mut out: BTreeMap<String, Creates> = BTreeMap::new();
    for create in audited_creates(dir, ns) {
        let creates = out.entry(create.name).or_default();
        match create.code {
            Some(201) => creates.sure += 1,
            // Refused (409 AlreadyExists, 422, 429, ...): nothing created.
            Some(code) if code < 500 => {}
            _ => creates.unsure += 1,
        }
    }
    out
}

/// A SWE-bench-shaped run over `ids`, pushing to `registry/prefix/...`, on the large-disk
/// nodes. Tests adjust its spec before creating it.
pub fn swebench_run(
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

/// Waits until run `name` reaches `phase`.
pub async fn await_phase(
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

/// Deletes run `name` (foreground: its Jobs and manifest first) and waits until it is gone.
pub async fn delete_run(runs: &Api<ImageBuildRun>, name: &str) {
    runs.delete(name, &kube::api::DeleteParams::foreground())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        &format!("run {name} to be gone"),
        || async { runs.get_opt(name).await.unwrap().is_none().then_some(()) },
    )
    .await;
}

/// The run's manifest shards (ConfigMaps), by name.
pub async fn manifest_shards(cms: &Api<ConfigMap>, run: &str) -> BTreeMap<String, ConfigMap> {
    let selector = format!(
        "{LABEL_RUN}={},app.kubernetes.io/component={}",
        imagebuild_operator::names::run_label(run),
        manifest::COMPONENT
    );
    cms.list(&ListParams::default().labels(&selector))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|cm| (cm.name_any(), cm))
        .collect()
}

/// The run's records, by Job name, read from its manifest shards.
pub async fn records(cms: &Api<ConfigMap>, run: &str) -> BTreeMap<String, Record> {
    let mut out = BTreeMap::new();
    for (name, cm) in manifest_shards(cms, run).await {
        let text = cm
            .data
            .unwrap_or_default()
            .remove(manifest::KEY)
            .unwrap_or_default();
        for (job, record) in manifest::parse(&name, &text).unwrap() {
            assert!(
                out.insert(job.clone(), record).is_none(),
                "{job} in two shards"
            );
        }
    }
    out
}

/// Counts the status writes of the runs in `runs`' namespace (each one is a new
/// resourceVersion with a changed status), per run name.
pub fn count_status_writes(runs: Api<ImageBuildRun>) -> Arc<Mutex<BTreeMap<String, usize>>> {
    let writes = Arc::new(Mutex::new(BTreeMap::new()));
    let out = writes.clone();
    tokio::spawn(async move {
        let mut last: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut events = watcher(runs, watcher::Config::default()).boxed();
        while let Some(Ok(event)) = events.next().await {
            let (watcher::Event::Apply(run) | watcher::Event::InitApply(run)) = event else {
                continue;
            };
            let status = serde_json::to_string(&run.status).ok();
            let previous = last.insert(run.name_any(), status.clone());
            let changed = match previous {
                Some(p) => p != status,
                None => run.status.is_some(),
            };
            if changed {
                *writes.lock().unwrap().entry(run.name_any()).or_default() += 1;
            }
        }
    });
    out
}

/// The plan of `run` over `ids`, as the operator makes it.
pub fn plan(run: &ImageBuildRun, ids: &[String]) -> Plan {
    let raw: Vec<RawInstance> = ids
        .iter()
        .map(|id| RawInstance {
            id: id.clone(),
            image: None,
        })
        .collect();
    imagebuild_operator::plan::build(&run.name_any(), &run.spec, &raw).unwrap()
}

/// The Job name of the `phase` node of instance `id` (for a base: of its upstream image).
pub fn job_of(plan: &Plan, phase: Phase, id: &str) -> String {
    let upstream = plan
        .nodes
        .iter()
        .find(|n| n.instance_id.as_deref() == Some(id))
        .and_then(|n| n.upstream_image.clone());
    plan.nodes
        .iter()
        .find(|n| {
            n.phase == phase
                && match phase {
                    Phase::Base => n.upstream_image == upstream,
                    _ => n.instance_id.as_deref() == Some(id),
                }
        })
        .unwrap()
        .job_name
        .clone()
}

pub fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The Events about run `name` (events.k8s.io), as (type, reason, note).
pub async fn events(ns: &TestNamespace, name: &str) -> Vec<(String, String, String)> {
    ns.api::<Event>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

/// Condition `type_` of the run: its status, reason and message.
pub fn condition(run: &ImageBuildRun, type_: &str) -> Option<(String, String, String)> {
    let c = run
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}
