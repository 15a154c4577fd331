//! What one reconcile's pure passes cost on a 10,000-instance run (20,001 images) half
//! built, with 150 builds in flight: reading the world into node states (`observe`, over
//! the states the reconcile before kept, and over a copy of the records' states),
//! deciding (`decide` whole, also with its inputs out of the cache, and kept up from the
//! decision before as the operator decides, `decide_from`), and
//! making a Job to dispatch (whole, and from its phase's template). Prints microseconds
//! per call; asserts nothing about speed. Run with `cargo bench --bench reconcile`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use imagebuild_operator::cli::load_run;
use imagebuild_operator::controller::observe::{LiveJob, observe, over};
use imagebuild_operator::instances::RawInstance;
use imagebuild_operator::job::{JobInputs, JobTemplate, build_job, job_value};
use imagebuild_operator::manifest::{Record, Records};
use imagebuild_operator::plan;
use imagebuild_operator::schedule::{self, Policy, Registry};

// The operator's allocator (src/main.rs): a pass's large vectors come back from it as
// they do in the operator, not from fresh pages.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: imagebuild_operator::memory::Allocator =
    imagebuild_operator::memory::Allocator {};

const INSTANCES: usize = 10_000;
const IN_FLIGHT: usize = 150;
const ROUNDS: u32 = 300;

fn main() {
    let run = load_run("examples/swebench-run.yaml".as_ref()).expect("example run");
    let raw: Vec<RawInstance> = (0..INSTANCES)
        .map(|i| RawInstance {
            id: format!("repo{}__repo{}-{i:05}", i % 40, i % 40),
            image: None,
        })
        .collect();
    let plan = Arc::new(plan::build("bench", &run.spec, &raw).expect("plan"));
    let n = plan.nodes.len();
    let now = Utc::now();
    // The first half built; the next IN_FLIGHT nodes running.
    let records = Records::of(
        plan.clone(),
        plan.nodes[..n / 2]
            .iter()
            .map(|node| (node.job_name.clone(), Record::built(node, 1, now))),
    );
    let inputs = JobInputs {
        run_name: "bench",
        namespace: "default",
        run_uid: "uid",
        spec: &run.spec,
        build_timeout: Duration::from_secs(3600),
    };
    let jobs: BTreeMap<String, LiveJob> = plan.nodes[n / 2..n / 2 + IN_FLIGHT]
        .iter()
        .map(|node| {
            let job = build_job(&inputs, node, 1, &BTreeMap::new()).expect("job");
            let live = LiveJob {
                job: Arc::new(job),
                pod: None,
                listed: None,
            };
            (node.job_name.clone(), live)
        })
        .collect();
    let dispatched: BTreeMap<String, u32> = plan.nodes[n / 2 + IN_FLIGHT..n / 2 + IN_FLIGHT + 10]
        .iter()
        .map(|node| (node.job_name.clone(), 1))
        .collect();
    // Room for 20 more: the 10 just made, and 10 to dispatch.
    let policy = Policy {
        max_workers: IN_FLIGHT as u32 + 20,
        attempts: 3,
        backoff_initial: Duration::from_secs(30),
        backoff_max: Duration::from_secs(600),
        force_rebuild: false,
        suspend: false,
        deadline: None,
    };
    let registry = vec![Registry::Missing; n];
    let timeout = Duration::from_secs(600);

    // A reconcile starts from the states the one before left (`controller::working`): the
    // nodes it read from a Job are set back to their records' states, then read again.
    let base = records.states();
    let mut states = base.to_vec();
    let mut overlaid: Vec<usize> = Vec::new();
    let started = Instant::now();
    for _ in 0..ROUNDS {
        for &id in &overlaid {
            states[id] = base[id].clone();
        }
        let observed = over(&plan, states, &jobs, &dispatched, timeout, now);
        (states, overlaid) = (observed.states, observed.overlaid);
    }
    let observing = started.elapsed() / ROUNDS;
    let started = Instant::now();
    for _ in 0..ROUNDS / 10 {
        states = observe(&plan, &records, &jobs, &dispatched, timeout, now).states;
    }
    let copying = started.elapsed() / (ROUNDS / 10);
    let started = Instant::now();
    let mut actions = 0;
    for _ in 0..ROUNDS {
        actions = schedule::decide(&plan, &registry, &states, &policy, now).len();
    }
    let deciding = started.elapsed() / ROUNDS;
    // As in the operator, where the events between two reconciles leave a decision's
    // inputs out of the cache: each call after a walk over a buffer larger than the
    // caches (not timed).
    let mut flush = vec![0u8; 64 << 20];
    let mut cold = Duration::ZERO;
    for round in 0..ROUNDS / 10 {
        for byte in flush.iter_mut().step_by(64) {
            *byte = byte.wrapping_add(round as u8);
        }
        std::hint::black_box(&flush);
        let started = Instant::now();
        actions = schedule::decide(&plan, &registry, &states, &policy, now).len();
        cold += started.elapsed();
    }
    let cold = cold / (ROUNDS / 10);
    // As the operator decides: kept up from the decision before (`schedule::frontier`),
    // one Job ended since, its inputs out of the cache as above.
    let (_, mut frontier) =
        schedule::decide_from(None, None, &plan, &registry, &states, &policy, now);
    let mut kept = Duration::ZERO;
    let mut kept_up = 0;
    let mut ended = n / 2;
    for round in 0..ROUNDS / 10 {
        // The Job that ended the round before runs again; the next one ends.
        let changed = [ended, n / 2 + (round as usize + 1) % IN_FLIGHT];
        ended = changed[1];
        let mut now_states = states.clone();
        now_states[ended] = schedule::NodeState::Finished {
            attempt: 1,
            at: now,
            result: Ok(()),
        };
        for byte in flush.iter_mut().step_by(64) {
            *byte = byte.wrapping_add(round as u8);
        }
        std::hint::black_box(&flush);
        let started = Instant::now();
        let (decided, next) = schedule::decide_from(
            frontier.take(),
            Some(&changed),
            &plan,
            &registry,
            &now_states,
            &policy,
            now,
        );
        kept += started.elapsed();
        std::hint::black_box(decided);
        kept_up += u32::from(next.as_ref().is_some_and(|f| f.kept_up()));
        frontier = next;
    }
    let kept = kept / (ROUNDS / 10);
    // Making the Jobs to dispatch: each built whole, and each a copy of its phase's
    // template (`job::JobTemplate`, made once per generation of the spec).
    let to_make = &plan.nodes[n / 2..n / 2 + IN_FLIGHT];
    let started = Instant::now();
    for node in to_make {
        std::hint::black_box(job_value(&inputs, node, 1, &BTreeMap::new()).expect("job"));
    }
    let whole = started.elapsed() / IN_FLIGHT as u32;
    let mut templates = BTreeMap::new();
    let started = Instant::now();
    for node in to_make {
        let template = templates
            .entry(node.phase)
            .or_insert_with(|| JobTemplate::new(&inputs, node.phase).expect("phase"));
        let job = template.job(&inputs, node, 1, &BTreeMap::new());
        std::hint::black_box(job.expect("job"));
    }
    let copied = started.elapsed() / IN_FLIGHT as u32;
    println!("{n} images, {IN_FLIGHT} in flight, {ROUNDS} rounds");
    println!(
        "observe: {:>8.1} us/call over the states kept ({:.1} over a copy of the records')",
        observing.as_secs_f64() * 1e6,
        copying.as_secs_f64() * 1e6
    );
    println!(
        "decide:  {:>8.1} us/call ({actions} actions); {:.1} with its inputs out of the cache",
        deciding.as_secs_f64() * 1e6,
        cold.as_secs_f64() * 1e6
    );
    println!(
        "decide:  {:>8.1} us/call kept up from the one before, one Job ended, its inputs out of the cache ({kept_up} of {} kept up)",
        kept.as_secs_f64() * 1e6,
        ROUNDS / 10
    );
    println!(
        "a Job:   {:>8.1} us built whole, {:.1} from its phase's template",
        whole.as_secs_f64() * 1e6,
        copied.as_secs_f64() * 1e6
    );
}
