//! Two operators with leader election on one Lease: only the holder dispatches. The
//! independent Job watcher sees every Job annotated with its dispatcher. The leader is
//! frozen (SIGSTOP) mid-run: the other takes over only after the lease ran out; when the
//! old leader wakes, its fence refuses every write and it exits; no two operators' Jobs
//! interleave, and the run finishes with one Job per node and attempt. A candidate stands
//! by ready and leaves at once on SIGTERM; the leader releases the lease on SIGTERM.
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{Operator, eventually, setup};
use common::runs::{await_phase, swebench_ids, swebench_run, watch_jobs};
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::PostParams;

const LEASE_SECONDS: &str = "6";

fn candidate(ns: &str, identity: &str) -> Operator {
    Operator::start_with(
        ns,
        &[
            "--leader-election",
            "--lease-namespace",
            ns,
            "--lease-duration",
            LEASE_SECONDS,
            "--identity",
            identity,
        ],
    )
}

async fn holder(leases: &kube::Api<Lease>) -> Option<String> {
    let lease = leases.get_opt("imagebuild-operator").await.ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

#[tokio::test]
async fn two_operators_never_both_dispatch() {
    let (env, _logs, ns) = setup("e2e-leader").await;
    let leases = ns.api::<Lease>();
    let mut a = candidate(&ns.name, "op-a");
    let first = eventually(Duration::from_secs(30), "a leader", || holder(&leases)).await;
    assert_eq!(first, "op-a");
    let mut b = candidate(&ns.name, "op-b");
    // B stands by, ready, while A leads.
    let b_addr = b.metrics_addr();
    eventually(
        Duration::from_secs(30),
        "the candidate to be ready",
        || async {
            let answer = reqwest::get(format!("http://{b_addr}/readyz")).await.ok()?;
            let text = answer.text().await.ok()?;
            text.contains("standing by").then_some(())
        },
    )
    .await;

    let seen = watch_jobs(ns.api::<Job>());
    let runs = ns.api::<ImageBuildRun>();
    let mut run = swebench_run("leader", &env.registry, &ns.name, &swebench_ids(15), 3);
    run.spec.placement.pod_annotations =
        common::runs::annotations(&[("sim.imagebuild.dev/duration", "2s")]);
    runs.create(&PostParams::default(), &run).await.unwrap();

    eventually(Duration::from_secs(60), "A to create 8 Jobs", || async {
        (seen.lock().unwrap().jobs.len() >= 8).then_some(())
    })
    .await;
    // A freezes (a long GC pause, a partitioned node): it neither renews nor notices.
    a.signal("STOP");
    let stopped = Instant::now();
    let stopped_ms = chrono::Utc::now().timestamp_millis();
    // A's lease runs until its last renewal + the duration; no one may take it before.
    // (Read once any renewal A had in flight has landed; a later one only ends it later.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = leases
        .get("imagebuild-operator")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(frozen.holder_identity.as_deref(), Some("op-a"));
    let lease_end_ms = frozen.renew_time.unwrap().0.as_millisecond()
        + i64::from(frozen.lease_duration_seconds.unwrap()) * 1000;
    let next = eventually(Duration::from_secs(60), "B to take the lease", || async {
        holder(&leases).await.filter(|h| h == "op-b")
    })
    .await;
    assert_eq!(next, "op-b");
    eventually(Duration::from_secs(60), "B to dispatch", || async {
        let seen = seen.lock().unwrap();
        let by_b = seen
            .jobs
            .values()
            .any(|j| j.dispatched_by.as_deref() == Some("op-b"));
        by_b.then_some(())
    })
    .await;
    // A wakes up with Jobs to create and statuses to write: its fence refuses them all,
    // and it exits to stand again as a candidate.
    let thawed_ms = chrono::Utc::now().timestamp_millis();
    a.signal("CONT");
    let exit = a.wait(Duration::from_secs(20));
    assert_eq!(exit.and_then(|s| s.code()), Some(1), "A did not step down");
    assert!(a.log().contains("lost the lease"), "{}", a.log());

    let done = await_phase(
        &runs,
        "leader",
        RunPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(done.status.unwrap().assemblies.succeeded, 15);
    {
        let seen = seen.lock().unwrap();
        let by = |who: &str| -> Vec<Instant> {
            seen.jobs
                .values()
                .filter(|j| j.dispatched_by.as_deref() == Some(who))
                .map(|j| j.created)
                .collect()
        };
        let (by_a, by_b) = (by("op-a"), by("op-b"));
        assert_eq!(
            by_a.len() + by_b.len(),
            seen.jobs.len(),
            "every Job names its dispatcher"
        );
        assert!(!by_a.is_empty() && !by_b.is_empty());
        let last_a = by_a.iter().max().unwrap();
        let first_b = by_b.iter().min().unwrap();
        assert!(last_a < first_b, "A's and B's Jobs interleave");
        // Nothing of A's is younger than its thaw. (Creation times are whole seconds;
        // A's Jobs before the freeze are older by the whole takeover.)
        assert!(seen.jobs.values().all(|j| j.created_ms > 0));
        let after_thaw: Vec<_> = seen
            .jobs
            .values()
            .filter(|j| j.dispatched_by.as_deref() == Some("op-a"))
            .filter(|j| j.created_ms >= thawed_ms - 1000)
            .map(|j| &j.name)
            .collect();
        assert!(
            after_thaw.is_empty(),
            "A dispatched once thawed: {after_thaw:?}"
        );
        // B dispatched only once A's lease had run out: the watcher saw B's first Job
        // no earlier than A's last renewal + the lease's duration.
        let waited = first_b.duration_since(stopped);
        let first_b_ms = stopped_ms + waited.as_millis() as i64;
        println!(
            "A: {} Jobs, B: {} Jobs; A's lease ran out {:.1} s after A froze, B's first Job \
             was seen {:.1} s after",
            by_a.len(),
            by_b.len(),
            (lease_end_ms - stopped_ms) as f64 / 1000.0,
            waited.as_secs_f64()
        );
        assert!(
            first_b_ms >= lease_end_ms,
            "B's first Job was seen {} ms before A's lease ran out",
            lease_end_ms - first_b_ms
        );
        assert!(
            seen.per_attempt().values().all(|&n| n == 1),
            "one Job per node and attempt"
        );
    }

    // A candidate standing by leaves at once on SIGTERM.
    let mut c = candidate(&ns.name, "op-c");
    let c_addr = c.metrics_addr();
    eventually(Duration::from_secs(30), "C to stand by", || async {
        let answer = reqwest::get(format!("http://{c_addr}/readyz")).await.ok()?;
        answer
            .text()
            .await
            .ok()?
            .contains("standing by")
            .then_some(())
    })
    .await;
    let exit = c.terminate(Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");

    // The leader leaves cleanly on SIGTERM and gives the lease up.
    let exit = b.terminate(Duration::from_secs(30));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    eventually(Duration::from_secs(10), "the lease released", || async {
        holder(&leases).await.is_none().then_some(())
    })
    .await;
}
