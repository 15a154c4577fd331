//! Simulated SWE-bench-shaped runs: how close the scheduler gets to the lower bound, how
//! the phase-barrier schedule of today's scripts compares, and what one decision costs.
//! Prints figures; asserts nothing about speed. Run with `cargo bench --bench schedule`.

use chrono::{TimeZone, Utc};
use imagebuild_operator::cli::load_run;
use imagebuild_operator::instances::RawInstance;
use imagebuild_operator::plan::{self, Phase, Plan};
use imagebuild_operator::schedule::sim::{Attempt, barrier_makespan, lower_bound, simulate};
use imagebuild_operator::schedule::{FailureClass, Policy, Registry};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, LogNormal, Uniform};

fn instances(n: usize) -> Vec<RawInstance> {
    if n == 500 {
        let text = std::fs::read_to_string("tests/fixtures/swebench-verified-ids.txt")
            .expect("fixture ids");
        return text
            .lines()
            .map(|id| RawInstance {
                id: id.into(),
                image: None,
            })
            .collect();
    }
    (0..n)
        .map(|i| {
            let repo = if i % 50 == 0 {
                "sphinx-doc".to_string()
            } else {
                format!("repo{}", i % 40)
            };
            RawInstance {
                id: format!("{repo}__{repo}-{i:05}"),
                image: None,
            }
        })
        .collect()
}

/// Durations like domain.md: builder ~10 min, base 60-300 s, assembly ~70 s with a long
/// tail, the post layer ~30 s.
fn durations(plan: &Plan, rng: &mut StdRng) -> Vec<f64> {
    let base = Uniform::new(60.0, 300.0).expect("valid range");
    let assembly = LogNormal::new(70f64.ln(), 0.45).expect("valid lognormal");
    plan.nodes
        .iter()
        .map(|n| match n.phase {
            Phase::Builder => 600.0,
            Phase::Base => base.sample(rng),
            Phase::Assembly => assembly.sample(rng),
            Phase::PostAssembly => 30.0,
        })
        .collect()
}

fn main() {
    let run = load_run("examples/swebench-run.yaml".as_ref()).expect("example run");
    println!(
        "{:>9} {:>7} {:>11} {:>11} {:>8} {:>11} {:>8} {:>10} {:>8} {:>12}",
        "instances",
        "workers",
        "makespan_s",
        "lower_bd_s",
        "ratio",
        "barrier_s",
        "ratio",
        "decisions",
        "kept_up",
        "us/decision"
    );
    println!(
        "(lower_bd: max of critical path and total work / workers; barrier: the scripts' builder -> all bases -> all assemblies schedule on the same durations, without failures; kept_up: decisions kept up from the one before, the rest made whole)"
    );
    for (n, workers, failure_rate) in [
        (500, 16, 0.0),
        (500, 16, 0.05),
        (10_000, 64, 0.0),
        (10_000, 64, 0.05),
    ] {
        let plan = plan::build("bench", &run.spec, &instances(n)).expect("plan");
        let mut rng = StdRng::seed_from_u64(42);
        let seconds = durations(&plan, &mut rng);
        let failures: Vec<bool> = (0..plan.nodes.len() * 3)
            .map(|_| rng.random_bool(failure_rate))
            .collect();
        let policy = Policy {
            max_workers: workers,
            attempts: 3,
            backoff_initial: std::time::Duration::from_secs(30),
            backoff_max: std::time::Duration::from_secs(600),
            force_rebuild: false,
            suspend: false,
            deadline: None,
        };
        let registry = vec![Registry::Missing; plan.nodes.len()];
        let start = Utc
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .expect("valid time");
        // Transient failures (throttling) on a few percent of attempts, retried.
        let oracle = |node: usize, attempt: u32| Attempt {
            seconds: seconds[node],
            failure: failures[(node * 3 + attempt as usize) % failures.len()]
                .then_some(FailureClass::RegistryThrottled),
        };
        let report = simulate(&plan, &registry, &policy, start, oracle, |_| {}).expect("run ends");
        let bound = lower_bound(&plan, &seconds, workers);
        let barrier = barrier_makespan(&plan, &seconds, workers);
        let per_decision = report.decide_time.as_secs_f64() * 1e6 / report.decisions as f64;
        println!(
            "{:>9} {:>7} {:>11.0} {:>11.0} {:>8.3} {:>11.0} {:>8.3} {:>10} {:>8} {:>12.1}{}",
            n,
            workers,
            report.makespan_seconds,
            bound,
            report.makespan_seconds / bound,
            barrier,
            barrier / bound,
            report.decisions,
            report.kept_up,
            per_decision,
            if failure_rate > 0.0 {
                format!("  ({:.0}% throttled attempts)", failure_rate * 100.0)
            } else {
                String::new()
            }
        );
    }
}
