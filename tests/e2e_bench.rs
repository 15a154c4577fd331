//! The operator benchmark, run by `e2e/bench` (ignored by the suite): SWE-bench-shaped
//! runs of each size in `IMAGEBUILD_BENCH_SIZES` (default "500 1000") on the local
//! control plane, each with a fresh operator, and a registry skip scan. It prints
//! figures and asserts only that each run ended with every image accounted for: the
//! targets are read from the table, not enforced on a machine of unknown speed.
//!
//! Per run: images, wall time, images/s, the operator's peak RSS (and its RSS when 25, 50,
//! 75 and 100% of the Jobs had finished), its CPU, its API requests per image (reads:
//! GET and WATCH; writes: the rest) from its own metrics, the status writes, and from an
//! independent Job watcher: the fraction of time `maxWorkers` Jobs were in flight while
//! runnable work remained (between the first and the last Job created, the time when
//! every slot was taken or a Job whose inputs the watcher had seen built was not yet
//! created; the inputs from the plan), the slots' use over that time, and the dispatch
//! latency (a Job's completion, as the watcher saw it, to the next Job's creation, first
//! in first out, counted from the created Job's inputs' completion where that came
//! later; p50, p99, max and mean). The control plane's share: the
//! CPU of the API server, etcd, the controller manager and kwok over the run; the
//! operator's mean POST (its request histogram: a Job created, an Event), the API
//! server's part of a dispatch; and the operator's own reconcile time (its histogram) and
//! reconciles per image. With `IMAGEBUILD_BENCH_WINDOW` a run is followed for that long
//! only, its row of what the window saw (the images built in it, the Jobs not ended in
//! flight to its end).
//! The same timeline is read again with each Job in flight from the moment its create
//! reached the API server (the environment's audit log), not from the watcher's seeing
//! it: full slots and dispatch then without the API server's create and the watch's
//! delivery of the new Job, the operator's own share (the completions still as the
//! watcher saw them: a create that reached the API server before the watcher saw the
//! completion that freed its slot is a dispatch of 0).
//! A slot is free for a dispatch after each completion, so the full-slot fraction is
//! about 1 - (completions per second) x (mean dispatch): 0.99 wants builds long enough
//! (`maxWorkers` / build seconds at most about 0.01 / mean dispatch).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{Operator, process_cpu_seconds, setup};
use common::prometheus::{matching, scrape, sum};
use common::runs::{
    Seen, annotations, audited_creates, await_phase, count_status_writes, swebench_run,
    watch_jobs_pushing,
};
use futures::StreamExt;
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use imagebuild_operator::plan::Plan;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use prometheus_parse::Sample;
use serde_json::json;

/// How long to follow each run (`IMAGEBUILD_BENCH_WINDOW`, a duration; default: to its
/// end): a run of long builds at 10,000 instances takes hours, its first minutes tell
/// its slots and dispatch at that size. The row then counts what the window saw: the
/// images built in it, its wall time, the operator's CPU and requests over it.
fn window() -> Option<Duration> {
    let w = std::env::var("IMAGEBUILD_BENCH_WINDOW").ok()?;
    Some(humantime::parse_duration(&w).expect("IMAGEBUILD_BENCH_WINDOW is a duration"))
}

/// The sizes to run, in instances.
fn sizes() -> Vec<usize> {
    std::env::var("IMAGEBUILD_BENCH_SIZES")
        .unwrap_or_else(|_| "500 1000".into())
        .split([' ', ','])
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// `maxWorkers` of every run (`IMAGEBUILD_BENCH_WORKERS`, default 16).
fn workers() -> u32 {
    std::env::var("IMAGEBUILD_BENCH_WORKERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(16)
}

/// How long each simulated build takes (`IMAGEBUILD_BENCH_BUILD`, default 3s).
fn build_time() -> String {
    std::env::var("IMAGEBUILD_BENCH_BUILD").unwrap_or_else(|_| "3s".into())
}

/// The control plane's processes, by name, as the environment starts them.
const CONTROL_PLANE: [&str; 4] = ["kube-apiserver", "etcd", "kube-controller", "kwok"];

fn pids_named(name: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

fn control_plane_cpu() -> BTreeMap<&'static str, f64> {
    CONTROL_PLANE
        .iter()
        .map(|name| {
            let cpu = pids_named(name)
                .into_iter()
                .filter_map(process_cpu_seconds)
                .sum();
            (*name, cpu)
        })
        .collect()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples the operator's RSS every 100 ms; the RSS when each quarter of `total` Jobs had
/// finished, as the watcher counts them.
fn sample_rss(pid: u32, seen: Arc<Mutex<Seen>>, total: usize) -> Arc<Mutex<Vec<u64>>> {
    let marks = Arc::new(Mutex::new(Vec::new()));
    let out = marks.clone();
    tokio::spawn(async move {
        loop {
            let finished = seen.lock().unwrap().finished();
            let Some(rss) = rss_kib(pid) else { return };
            {
                let mut marks = marks.lock().unwrap();
                while marks.len() < 4 && finished * 4 >= total * (marks.len() + 1) {
                    marks.push(rss);
                }
                if marks.len() == 4 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    out
}

/// What the watcher saw of slots and dispatch.
struct Slots {
    /// Fraction of the time, from the first to the last Job created, while runnable work
    /// remained (a Job in flight on every slot, or one whose inputs were built not yet
    /// created), with `workers` in flight.
    full: f64,
    /// Jobs in flight over that time, as a fraction of `workers`.
    used: f64,
    /// A slot's freeing (a completion) to the next creation, or from the created Job's
    /// becoming runnable (its inputs' completions) when that came later; sorted.
    dispatch: Vec<Duration>,
}

/// The Job names each Job's node waits on (its inputs'), by Job name.
type Inputs = BTreeMap<String, Vec<String>>;

/// The inputs of every node of `plan`, by Job name.
fn inputs(plan: &Plan) -> Inputs {
    plan.nodes
        .iter()
        .map(|node| {
            let deps = node.deps.iter().map(|&d| plan.nodes[d].job_name.clone());
            (node.job_name.clone(), deps.collect())
        })
        .collect()
}

/// `seen` with each Job created when its create reached the API server, as `arrivals`
/// has it by Job name (in the watcher's clock); a Job of a name created more than once,
/// or not in `arrivals`, keeps the watcher's time.
fn arrived(seen: &Seen, arrivals: &BTreeMap<String, Vec<Instant>>) -> Seen {
    let mut out = Seen::default();
    out.jobs = seen
        .jobs
        .iter()
        .map(|(uid, job)| {
            let mut job = job.clone();
            if let Some([at]) = arrivals.get(&job.name).map(Vec::as_slice) {
                job.created = *at;
            }
            (uid.clone(), job)
        })
        .collect();
    out
}

/// When each Job create the API server answered 201 in namespace `ns` reached it, by Job
/// name, in the clock of `anchor` (an instant and the wall time at it).
fn arrivals(
    dir: &std::path::Path,
    ns: &str,
    anchor: (Instant, chrono::DateTime<chrono::Utc>),
) -> BTreeMap<String, Vec<Instant>> {
    let mut out: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
    for create in audited_creates(dir, ns) {
        if create.code != Some(201) {
            continue;
        }
        let since = (create.received - anchor.1).to_std();
        let at = match since {
            Ok(after) => anchor.0 + after,
            Err(_) => anchor.0 - (anchor.1 - create.received).to_std().unwrap(),
        };
        out.entry(create.name).or_default().push(at);
    }
    out
}

fn slots(seen: &Seen, workers: usize, inputs: &Inputs) -> Slots {
    let (Some(first), Some(last)) = (
        seen.jobs.values().map(|j| j.created).min(),
        seen.jobs.values().map(|j| j.created).max(),
    ) else {
        return Slots {
            full: 0.0,
            used: 0.0,
            dispatch: Vec::new(),
        };
    };
    // When each image was first built, as the watcher saw.
    let mut built: BTreeMap<&str, Instant> = BTreeMap::new();
    for job in seen.jobs.values() {
        if let (Some(true), Some(f)) = (job.succeeded, job.finished) {
            let at = built.entry(&job.name).or_insert(f);
            *at = (*at).min(f);
        }
    }
    // A Job became runnable once its inputs were built (at the start, without inputs).
    let runnable = |job: &common::runs::SeenJob| {
        let ready = inputs.get(&job.name).into_iter().flatten();
        let at = ready.fold(first, |at, input| {
            at.max(built.get(input.as_str()).copied().unwrap_or(first))
        });
        at.min(job.created)
    };
    // Events: a Job created (+1 in flight, -1 waiting), ended (-1 in flight), runnable
    // (+1 waiting). At one instant: completions, then runnable, then creations.
    let mut events: Vec<(Instant, u8, Option<Instant>)> = Vec::new();
    for job in seen.jobs.values() {
        let ready = runnable(job);
        events.push((ready, 1, None));
        events.push((job.created, 2, Some(ready)));
        if let Some(f) = job.finished {
            events.push((f, 0, None));
        }
    }
    events.sort();
    let (mut active, mut waiting, mut prev) = (0usize, 0usize, first);
    let (mut counted, mut full, mut used) = (Duration::ZERO, Duration::ZERO, 0.0);
    let mut freed = std::collections::VecDeque::new();
    let mut dispatch = Vec::new();
    // Jobs created before the end that freed their slot: read to the create's arrival, a
    // create can reach the API server before the watcher sees the end the operator's own
    // watch told it of. That end is then the Job's (a dispatch of 0), not the next one's.
    let mut early = 0usize;
    for (t, kind, ready) in events {
        // The state from `prev` to `t`, the part of it inside the window, counts while
        // work remained.
        let (lo, hi) = (prev.max(first), t.min(last));
        if hi > lo && (active >= workers || waiting > 0) {
            counted += hi - lo;
            if active >= workers {
                full += hi - lo;
            }
            used += (hi - lo).as_secs_f64() * active.min(workers) as f64;
        }
        prev = prev.max(t);
        match (kind, ready) {
            (0, _) => {
                active = active.saturating_sub(1);
                if early > 0 {
                    early -= 1;
                    dispatch.push(Duration::ZERO);
                } else if t < last {
                    freed.push_back(t);
                }
            }
            (1, _) => waiting += 1,
            (_, ready) => {
                active += 1;
                waiting = waiting.saturating_sub(1);
                match freed.pop_front() {
                    Some(f) => dispatch.push(t - f.max(ready.unwrap_or(f))),
                    None if active > workers => early += 1,
                    None => {}
                }
            }
        }
    }
    let counted = counted.as_secs_f64().max(f64::EPSILON);
    dispatch.sort();
    Slots {
        full: full.as_secs_f64() / counted,
        used: used / (counted * workers as f64),
        dispatch,
    }
}

/// The mean, in ms.
fn mean(durations: &[Duration]) -> f64 {
    let total: Duration = durations.iter().sum();
    total.as_secs_f64() * 1000.0 / durations.len().max(1) as f64
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// The `q` quantile of a Prometheus histogram (its buckets summed over its series), in ms:
/// the upper bound of the first bucket that holds it.
fn histogram_quantile(samples: &[Sample], metric: &str, q: f64) -> f64 {
    let mut buckets: BTreeMap<u64, f64> = BTreeMap::new();
    for sample in matching(samples, metric, &[]) {
        if let prometheus_parse::Value::Histogram(counts) = &sample.value {
            for c in counts {
                *buckets.entry(c.less_than.to_bits()).or_default() += c.count;
            }
        }
    }
    let mut buckets: Vec<(f64, f64)> = buckets
        .into_iter()
        .map(|(le, n)| (f64::from_bits(le), n))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, count)| *count >= total * q)
        .map_or(f64::NAN, |(le, _)| le * 1000.0)
}

struct Row {
    instances: usize,
    /// The seconds the run was followed, when cut short by the window.
    window: Option<f64>,
    /// Images built (all of the run's, unless cut short).
    images: usize,
    wall: f64,
    peak_mib: f64,
    quarters_mib: Vec<f64>,
    cpu: f64,
    reads: f64,
    writes: f64,
    status_writes: usize,
    slots: Slots,
    /// The same, each Job in flight from its create's arrival at the API server.
    arrived: Slots,
    reconcile_p50: f64,
    reconcile_p99: f64,
    /// Reconciles of the run, all told.
    reconciles: f64,
    /// The operator's mean POST (Jobs created, Events) from sending to the answer, in ms.
    post_mean: f64,
    control_plane: BTreeMap<&'static str, f64>,
}

async fn one_run(n: usize, workers: u32) -> Row {
    let (env, _logs, ns) = setup(&format!("e2e-bench-{n}")).await;
    let operator = Operator::start_quiet(&ns.name, &[]);
    let (runs, cms) = (ns.api::<ImageBuildRun>(), ns.api::<ConfigMap>());
    let seen = watch_jobs_pushing(ns.api::<Job>(), false);
    let writes = count_status_writes(runs.clone());
    let ids: Vec<String> = (0..n).map(|i| format!("bench__bench-{i:05}")).collect();
    let list = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("bench-instances".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("ids.txt".into(), ids.join("\n"))])),
        ..Default::default()
    };
    cms.create(&PostParams::default(), &list).await.unwrap();
    let mut run = swebench_run("bench", &env.registry, &ns.name, &ids[..1], workers);
    run.spec.instances.list = None;
    run.spec.instances.config_map =
        Some(serde_json::from_value(json!({"name": "bench-instances", "key": "ids.txt"})).unwrap());
    run.spec.placement.cpu = k8s_openapi::apimachinery::pkg::api::resource::Quantity("10m".into());
    run.spec.placement.pod_annotations =
        annotations(&[("sim.imagebuild.dev/duration", &build_time())]);
    let images = 1 + 2 * n;
    let inputs = inputs(&common::runs::plan(&run, &ids));
    assert_eq!(inputs.len(), images);
    // Settle what the operator did on start before counting.
    let _ = operator.metrics_addr();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_before = operator.cpu_seconds().unwrap_or(0.0);
    let plane_before = control_plane_cpu();
    let quarters = sample_rss(operator.pid(), seen.clone(), images);
    let started = Instant::now();
    let anchor = (started, chrono::Utc::now());
    runs.create(&PostParams::default(), &run).await.unwrap();
    // The builds alone take images x build / workers; twice that, and the control plane's
    // own pace at short builds.
    let build =
        humantime::parse_duration(&build_time()).expect("IMAGEBUILD_BENCH_BUILD is a duration");
    let timeout = Duration::from_secs(600 + 2 * n as u64) + build * 2 * images as u32 / workers;
    let whole = await_phase(&runs, "bench", RunPhase::Succeeded, timeout);
    let ended = match window() {
        Some(window) => tokio::time::timeout(window, whole).await.is_ok(),
        None => {
            whole.await;
            true
        }
    };
    let wall = started.elapsed().as_secs_f64();
    let cpu = operator.cpu_seconds().unwrap_or(0.0) - cpu_before;
    let plane_after = control_plane_cpu();
    let samples = scrape(&operator.metrics_addr()).await;
    let requests = |verbs: &[&str]| -> f64 {
        verbs
            .iter()
            .filter_map(|verb| {
                sum(
                    &samples,
                    "imagebuild_kubernetes_requests_total",
                    &[("verb", verb)],
                )
            })
            .sum()
    };
    let reads = requests(&["GET", "WATCH"]);
    let writes_n = requests(&["POST", "PATCH", "PUT", "DELETE"]);
    let arrivals = arrivals(&env.dir, &ns.name, anchor);
    let (built, slots, arrived) = {
        let seen = seen.lock().unwrap();
        (
            seen.results().0.len(),
            slots(&seen, workers as usize, &inputs),
            slots(&arrived(&seen, &arrivals), workers as usize, &inputs),
        )
    };
    if ended {
        assert_eq!(built, images, "every image built, as the watcher saw");
    }
    let row = Row {
        instances: n,
        window: (!ended).then_some(wall),
        images: built,
        wall,
        peak_mib: operator.peak_rss_kib().unwrap_or(0) as f64 / 1024.0,
        quarters_mib: quarters
            .lock()
            .unwrap()
            .iter()
            .map(|k| *k as f64 / 1024.0)
            .collect(),
        cpu,
        reads,
        writes: writes_n,
        status_writes: writes.lock().unwrap().get("bench").copied().unwrap_or(0),
        slots,
        arrived,
        reconcile_p50: histogram_quantile(&samples, "imagebuild_reconcile_duration_seconds", 0.5),
        reconcile_p99: histogram_quantile(&samples, "imagebuild_reconcile_duration_seconds", 0.99),
        reconciles: sum(&samples, "imagebuild_reconcile_duration_seconds_count", &[])
            .unwrap_or(f64::NAN),
        post_mean: {
            let of = |part: &str| {
                let metric = format!("imagebuild_kubernetes_request_duration_seconds_{part}");
                sum(&samples, &metric, &[("verb", "POST")]).unwrap_or(f64::NAN)
            };
            1000.0 * of("sum") / of("count")
        },
        control_plane: plane_after
            .iter()
            .map(|(k, v)| (*k, v - plane_before.get(k).copied().unwrap_or(0.0)))
            .collect(),
    };
    ns.delete().await;
    row
}

fn print(rows: &[Row], workers: u32) {
    println!();
    println!(
        "operator benchmark: maxWorkers {workers}, {} simulated builds (kwok), release build",
        build_time()
    );
    println!(
        "| instances | images | wall s | images/s | peak RSS MiB | RSS at 25/50/75/100% MiB | CPU s (% of a core) | API requests per image (reads/writes) | status writes | full slots | slots used | dispatch p50/p99/max (mean) ms | full slots, dispatch p50/p99/max (mean) ms to the create's arrival | API POST mean ms | reconcile p50/p99 ms (reconciles per image) | control plane CPU s (apiserver/etcd/kcm/kwok) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let quarters: Vec<String> = r.quarters_mib.iter().map(|m| format!("{m:.1}")).collect();
        let cp = |k: &str| r.control_plane.get(k).copied().unwrap_or(0.0);
        println!(
            "| {}{} | {} | {:.1} | {:.1} | {:.1} | {} | {:.1} ({:.1}%) | {:.2} ({:.2}/{:.2}) | {} | {:.3} | {:.3} | {:.0}/{:.0}/{:.0} ({:.1}) | {:.3}, {:.0}/{:.0}/{:.0} ({:.1}) | {:.1} | {:.1}/{:.1} ({:.2}) | {:.0}/{:.0}/{:.0}/{:.0} |",
            r.instances,
            r.window
                .map(|w| format!(" (its first {w:.0} s)"))
                .unwrap_or_default(),
            r.images,
            r.wall,
            r.images as f64 / r.wall,
            r.peak_mib,
            quarters.join("/"),
            r.cpu,
            100.0 * r.cpu / r.wall,
            (r.reads + r.writes) / r.images as f64,
            r.reads / r.images as f64,
            r.writes / r.images as f64,
            r.status_writes,
            r.slots.full,
            r.slots.used,
            quantile(&r.slots.dispatch, 0.5),
            quantile(&r.slots.dispatch, 0.99),
            quantile(&r.slots.dispatch, 1.0),
            mean(&r.slots.dispatch),
            r.arrived.full,
            quantile(&r.arrived.dispatch, 0.5),
            quantile(&r.arrived.dispatch, 0.99),
            quantile(&r.arrived.dispatch, 1.0),
            mean(&r.arrived.dispatch),
            r.post_mean,
            r.reconcile_p50,
            r.reconcile_p99,
            r.reconciles / r.images as f64,
            cp("kube-apiserver"),
            cp("etcd"),
            cp("kube-controller"),
            cp("kwok"),
        );
    }
}

#[tokio::test]
#[ignore = "the benchmark: e2e/bench"]
async fn bench_runs() {
    let workers = workers();
    let mut rows = Vec::new();
    for n in sizes() {
        rows.push(one_run(n, workers).await);
        // Each row as it comes: a long run's figures are not lost to a later failure.
        print(&rows[rows.len() - 1..], workers);
    }
    print(&rows, workers);
}

/// Each phase run `name` is seen in, from a watch, with when it was first seen; ends at
/// a final phase.
fn run_phases(
    runs: kube::Api<ImageBuildRun>,
    name: &str,
) -> tokio::task::JoinHandle<Vec<(RunPhase, Instant)>> {
    use kube::runtime::{WatchStreamExt, watcher};
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    tokio::spawn(async move {
        let mut seen: Vec<(RunPhase, Instant)> = Vec::new();
        let mut events = std::pin::pin!(watcher(runs, config).applied_objects());
        while let Some(Ok(run)) = events.next().await {
            let Some(phase) = run.status.and_then(|s| s.phase) else {
                continue;
            };
            if seen.last().is_none_or(|(last, _)| *last != phase) {
                seen.push((phase, Instant::now()));
            }
            if phase.is_final() {
                break;
            }
        }
        seen
    })
}

/// Instances of the registry skip scan (`IMAGEBUILD_BENCH_SKIP`, default 1,000).
fn skip_instances() -> usize {
    std::env::var("IMAGEBUILD_BENCH_SKIP")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000)
}

#[tokio::test]
#[ignore = "the benchmark: e2e/bench"]
async fn bench_registry_skip_scan() {
    let n = skip_instances();
    let (env, _logs, ns) = setup("e2e-bench-skip").await;
    let operator = Operator::start_quiet(&ns.name, &[]);
    let runs = ns.api::<ImageBuildRun>();
    let seen = watch_jobs_pushing(ns.api::<Job>(), false);
    let ids: Vec<String> = (0..n).map(|i| format!("skip__skip-{i:05}")).collect();
    let mut run = swebench_run("skip", &env.registry, &ns.name, &ids, 32);
    // The builder and every assembly exist; the bases are then not needed.
    let plan = common::runs::plan(&run, &ids);
    let wanted: Vec<String> = plan
        .nodes
        .iter()
        .filter(|node| node.phase != imagebuild_operator::plan::Phase::Base)
        .map(|node| node.image.to_string())
        .collect();
    let pushing = Instant::now();
    let oci = common::oci::oci();
    let (layers, config) = common::oci::tiny_image();
    futures::stream::iter(wanted.iter())
        .for_each_concurrent(16, |image| {
            let (oci, layers, config) = (oci.clone(), layers.clone(), config.clone());
            async move {
                let reference = image.parse().unwrap();
                oci.push(
                    &reference,
                    &layers,
                    config,
                    &oci_client::secrets::RegistryAuth::Anonymous,
                    None,
                )
                .await
                .unwrap();
            }
        })
        .await;
    let pushed = pushing.elapsed();
    let _ = operator.metrics_addr();
    run.spec.placement.pod_annotations = annotations(&[("sim.imagebuild.dev/duration", "1s")]);
    // Timed from a watch of the run (polling would add up to its interval).
    let phases = run_phases(runs.clone(), "skip");
    let started = Instant::now();
    runs.create(&PostParams::default(), &run).await.unwrap();
    let done = await_phase(&runs, "skip", RunPhase::Succeeded, Duration::from_secs(300)).await;
    let phases = phases.await.unwrap();
    let took = phases
        .last()
        .map_or(started.elapsed(), |(_, at)| at.duration_since(started));
    let phases: Vec<String> = phases
        .iter()
        .map(|(phase, at)| {
            format!(
                "{phase:?} {:.2} s",
                at.duration_since(started).as_secs_f64()
            )
        })
        .collect();
    let status = done.status.unwrap();
    let skipped: u32 = [status.builder, status.bases, status.assemblies]
        .iter()
        .map(|c| c.skipped)
        .sum();
    let jobs = seen.lock().unwrap().jobs.len();
    println!();
    println!(
        "registry skip scan: {n} instances, {} images ({} present, pushed in {:.1} s): created to Succeeded in {:.2} s ({}), {jobs} Jobs, {} skipped",
        plan.nodes.len(),
        wanted.len(),
        pushed.as_secs_f64(),
        took.as_secs_f64(),
        phases.join(", "),
        skipped,
    );
    assert_eq!(skipped as usize, plan.nodes.len(), "every image skipped");
    assert_eq!(jobs, 0, "no Job for an image that exists");
    ns.delete().await;
}

/// A watcher's timeline of Jobs `(name, created, finished)` that all succeeded, in ms
/// after `t0`.
fn timeline(t0: Instant, jobs: &[(&str, u64, u64)]) -> Seen {
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let mut seen = Seen::default();
    for &(name, c, f) in jobs {
        let job = common::runs::SeenJob {
            name: name.into(),
            run: "r".into(),
            phase: "base".into(),
            attempt: 1,
            created: at(c),
            created_ms: 0,
            finished: Some(at(f)),
            deleted: None,
            succeeded: Some(true),
            dispatched_by: None,
            created_by: None,
        };
        seen.jobs.insert(name.into(), job);
    }
    seen
}

#[test]
fn slots_and_dispatch_are_read_from_the_watchers_timeline() {
    let t0 = Instant::now();
    let seen = |jobs: &[(&str, u64, u64)]| timeline(t0, jobs);
    // Two slots: a Job from 0 to 10 s, one from 0 to 5, one from 5.1 to 12 (created last).
    let jobs = seen(&[("a", 0, 10_000), ("b", 0, 5_000), ("c", 5_100, 12_000)]);
    let s = slots(&jobs, 2, &Inputs::new());
    // Full for 5.0 of the 5.1 s window; one slot idle for 0.1 s of 10.2 slot-seconds.
    assert!((s.full - 5.0 / 5.1).abs() < 1e-6, "{}", s.full);
    assert!((s.used - 10.1 / 10.2).abs() < 1e-6, "{}", s.used);
    assert_eq!(s.dispatch, vec![Duration::from_millis(100)]);
    // c waits on a, created 0.1 s after a ended: from 5 to 10 s nothing was runnable, so
    // that time does not count, and c's dispatch runs from a's end, not b's.
    let jobs = seen(&[("a", 0, 10_000), ("b", 0, 5_000), ("c", 10_100, 12_000)]);
    let inputs = Inputs::from([("c".to_string(), vec!["a".to_string()])]);
    let s = slots(&jobs, 2, &inputs);
    assert!((s.full - 5.0 / 5.1).abs() < 1e-6, "{}", s.full);
    assert!((s.used - 10.0 / 10.2).abs() < 1e-6, "{}", s.used);
    assert_eq!(s.dispatch, vec![Duration::from_millis(100)]);
    // Read as if c had no inputs, the same timeline has a slot free for 5.1 s.
    let s = slots(&jobs, 2, &Inputs::new());
    assert!((s.full - 5.0 / 10.1).abs() < 1e-6, "{}", s.full);
    assert_eq!(s.dispatch, vec![Duration::from_millis(5_100)]);
}

#[test]
fn arrivals_move_a_jobs_creation_to_when_its_create_reached_the_api_server() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let seen = timeline(
        t0,
        &[("a", 0, 10_000), ("b", 0, 5_000), ("c", 5_100, 12_000)],
    );
    // c's create reached the API server 70 ms before the watcher saw c; a was created
    // twice (its arrivals say nothing of the one the watcher saw).
    let times = BTreeMap::from([
        ("c".to_string(), vec![at(5_030)]),
        ("a".to_string(), vec![at(1), at(2)]),
    ]);
    let s = slots(&arrived(&seen, &times), 2, &Inputs::new());
    assert_eq!(s.dispatch, vec![Duration::from_millis(30)]);
    assert!((s.full - 5.0 / 5.03).abs() < 1e-6, "{}", s.full);
    // c's create reached the API server 10 ms before the watcher saw b end: b's end is
    // c's (0 ms), and d's dispatch runs from a's end, not from b's.
    let seen = timeline(
        t0,
        &[
            ("a", 0, 10_000),
            ("b", 0, 5_000),
            ("c", 5_100, 12_000),
            ("d", 10_050, 13_000),
        ],
    );
    let times = BTreeMap::from([("c".to_string(), vec![at(4_990)])]);
    let s = slots(&arrived(&seen, &times), 2, &Inputs::new());
    assert_eq!(s.dispatch, [0, 50].map(Duration::from_millis));
    // The wall clock's times (to the audit log's microseconds), read in the watcher's clock.
    let wall = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6);
    let dir = std::env::temp_dir().join(format!("bench-arrivals-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("audit")).unwrap();
    let line = |name: &str, code: u16, ms: i64, uri: &str| {
        let received = wall + chrono::TimeDelta::milliseconds(ms);
        serde_json::json!({
            "verb": "create", "requestURI": uri,
            "objectRef": {"resource": "jobs", "namespace": "ns", "name": name},
            "responseStatus": {"code": code},
            "requestReceivedTimestamp": received.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        })
        .to_string()
    };
    let log = [
        line("c", 201, 250, "/apis/batch/v1/namespaces/ns/jobs"),
        line("c", 201, 10, "/apis/batch/v1/namespaces/ns/jobs?dryRun=All"),
        line("d", 409, 300, "/apis/batch/v1/namespaces/ns/jobs"),
        line("e", 201, -40, "/apis/batch/v1/namespaces/ns/jobs"),
    ];
    std::fs::write(dir.join("audit/jobs.log"), log.join("\n")).unwrap();
    let got = arrivals(&dir, "ns", (at(1_000), wall));
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        got,
        BTreeMap::from([
            ("c".to_string(), vec![at(1_250)]),
            ("e".to_string(), vec![at(960)]),
        ])
    );
}
