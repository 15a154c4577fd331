//! Hostile input, on the real control plane with one operator: every case is an
//! ImageBuildRun (and the objects it names) a careless or hostile user could write, and
//! asserts its exact outcome:
//! - **refused**: the API server refuses the create, naming the field;
//! - **failed**: the run fails at once with `Ready=False`, the reason, a message naming the
//!   field and the offending value (cut short), and no Job;
//! - **waiting**: the run waits on something the user can fix (a missing ConfigMap or
//!   Secret, an unreachable source), says so in a condition, and creates no Job;
//! - **built**: the run succeeds.
//!
//! The operator runs through the whole suite in one process: no exit, no panic.
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cluster::{Operator, TestNamespace, setup};
use common::runs::{condition, swebench_ids, swebench_run, watch_jobs};
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use imagebuild_operator::names::LABEL_RUN_UID;
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{
    ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

/// What a case must come to.
#[derive(Clone, Debug)]
enum Expect {
    /// The create is refused; the message has each of these.
    Refused(&'static [&'static str]),
    /// Phase Failed, `Ready=False` with this reason, a message with each of these; no Job.
    Failed(&'static str, &'static [&'static str]),
    /// Still without a Job after the others ended; condition `type` has this reason and a
    /// message with each of these.
    Waiting(&'static str, &'static str, &'static [&'static str]),
    /// Phase Succeeded.
    Built,
}

use Expect::{Built, Failed, Refused, Waiting};

struct Case {
    what: &'static str,
    /// Merged into the base run's `spec` (JSON merge patch: null removes).
    patch: Value,
    expect: Expect,
}

fn case(what: &'static str, patch: Value, expect: Expect) -> Case {
    Case {
        what,
        patch,
        expect,
    }
}

/// RFC 7386: objects merge, null removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn many(n: usize, f: impl Fn(usize) -> (String, Value)) -> Value {
    Value::Object((0..n).map(f).collect())
}

fn cases(registry: &str) -> Vec<Case> {
    let git = |revision: &str| json!({"context": {"inline": null, "git": {"url": "git://example.invalid/repo.git", "revision": revision}}});
    let long_id = format!("{}__{}-1", "r".repeat(120), "n".repeat(120));
    vec![
        // Schema: ranges, lengths, counts, patterns, enums, types.
        case(
            "maxWorkers 0",
            json!({"maxWorkers": 0}),
            Refused(&["spec.maxWorkers"]),
        ),
        case(
            "maxWorkers 1001",
            json!({"maxWorkers": 1001}),
            Refused(&["spec.maxWorkers", "1000"]),
        ),
        case(
            "maxWorkers 2^40",
            json!({"maxWorkers": 1u64 << 40}),
            Refused(&["spec.maxWorkers"]),
        ),
        case(
            "maxWorkers as a string",
            json!({"maxWorkers": "16"}),
            Refused(&["spec.maxWorkers", "integer"]),
        ),
        case(
            "attempts 0",
            json!({"retry": {"attempts": 0}}),
            Refused(&["spec.retry.attempts"]),
        ),
        case(
            "attempts 21",
            json!({"retry": {"attempts": 21}}),
            Refused(&["spec.retry.attempts"]),
        ),
        case(
            "limit 0",
            json!({"instances": {"limit": 0}}),
            Refused(&["spec.instances.limit"]),
        ),
        case(
            "limit past u32",
            json!({"instances": {"limit": 1u64 << 33}}),
            Refused(&["spec.instances.limit"]),
        ),
        case(
            "a var of 1025 bytes",
            json!({"vars": {"big": "v".repeat(1025)}}),
            Refused(&["spec.vars", "1024"]),
        ),
        case(
            "65 vars",
            json!({"vars": many(65, |i| (format!("v{i}"), json!("x")))}),
            Refused(&["spec.vars", "64"]),
        ),
        case(
            "20,001 instances",
            json!({"instances": {"list": (0..20001).map(|i| format!("a__b-{i}")).collect::<Vec<_>>()}}),
            Refused(&["spec.instances.list", "20000"]),
        ),
        case(
            "an instance id of 254 characters",
            json!({"instances": {"list": ["x".repeat(254)]}}),
            Refused(&["spec.instances.list[0]", "253"]),
        ),
        case(
            "an inline Dockerfile over 64 KiB",
            json!({"builder": {"context": {"inline": "#".repeat(65537)}}}),
            Refused(&["spec.builder.context.inline", "65536"]),
        ),
        case(
            "executor mode sudo",
            json!({"executor": {"mode": "sudo"}}),
            Refused(&["spec.executor.mode", "sudo"]),
        ),
        case(
            "cache everything",
            json!({"builder": {"cache": "everything"}}),
            Refused(&["spec.builder.cache"]),
        ),
        case(
            "platform without arch",
            json!({"base": {"platform": "linux"}}),
            Refused(&["spec.base.platform"]),
        ),
        case(
            "a git URL to a local path",
            json!({"builder": {"context": {"inline": null, "git": {"url": "file:///etc", "revision": "main"}}}}),
            Refused(&["spec.builder.context.git.url"]),
        ),
        case(
            "a dataset name with a path",
            json!({"instances": {"list": null, "huggingFace": {"dataset": "../../etc", "split": "test"}}}),
            Refused(&["spec.instances.huggingFace.dataset"]),
        ),
        case(
            "a node selector value of 64 characters",
            json!({"placement": {"nodeSelector": {"k": "v".repeat(64)}}}),
            Refused(&["spec.placement.nodeSelector", "63"]),
        ),
        // Durations and retry settings.
        case(
            "run timeout 0s",
            json!({"timeouts": {"run": "0s"}}),
            Refused(&["spec.timeouts.run", "longer than 0s"]),
        ),
        case(
            "run timeout past what a timestamp holds",
            json!({"timeouts": {"run": "99999h99999h99999h99999h"}}),
            Refused(&["spec.timeouts.run", "at most 720h"]),
        ),
        case(
            "build timeout of 20 digits",
            json!({"timeouts": {"build": "18446744073709551615s"}}),
            Refused(&["spec.timeouts.build"]),
        ),
        case(
            "build timeout under a second",
            json!({"timeouts": {"build": "500ms"}}),
            Refused(&["spec.timeouts.build", "at least 1s"]),
        ),
        case(
            "pending timeout in words",
            json!({"timeouts": {"pending": "10 hours"}}),
            Refused(&["spec.timeouts.pending"]),
        ),
        case(
            "backoff initial past max",
            json!({"retry": {"backoff": {"initial": "1h", "max": "1m"}}}),
            Refused(&["spec.retry.backoff", "initial must not be longer than max"]),
        ),
        case(
            "backoff of a week",
            json!({"retry": {"backoff": {"initial": "1s", "max": "168h"}}}),
            Refused(&["spec.retry.backoff.max", "at most 24h"]),
        ),
        // Quantities.
        case(
            "cpu lots",
            json!({"placement": {"cpu": "lots"}}),
            Refused(&["spec.placement.cpu", "quantity"]),
        ),
        case(
            "memory -1Gi",
            json!({"placement": {"memory": "-1Gi"}}),
            Refused(&["spec.placement.memory", "quantity"]),
        ),
        case(
            "disk 0",
            json!({"placement": {"ephemeralStorage": 0}}),
            Refused(&["spec.placement.ephemeralStorage", "quantity"]),
        ),
        case("cpu as a number", json!({"placement": {"cpu": 1}}), Built),
        // CEL rules.
        case(
            "two instance sources",
            json!({"instances": {"configMap": {"name": "ids", "key": "k"}}}),
            Refused(&["exactly one of list, configMap or huggingFace"]),
        ),
        case(
            "two build contexts",
            json!({"builder": {"context": {"git": {"url": "git://h/r.git", "revision": "main"}}}}),
            Refused(&["spec.builder.context"]),
        ),
        // Templates.
        case(
            "an unknown variable",
            json!({"assembly": {"image": format!("{registry}/x:{{{{ nosuch }}}}")}}),
            Failed(
                "PlanFailed",
                &["spec.assembly.image", "unknown variable `nosuch`"],
            ),
        ),
        case(
            "an unknown filter",
            json!({"assembly": {"image": format!("{registry}/x:{{{{ repo | shell }}}}")}}),
            Failed("PlanFailed", &["spec.assembly.image", "shell"]),
        ),
        case(
            "a template that does not parse",
            json!({"base": {"image": "{{ repo"}}),
            Failed("PlanFailed", &["spec.base.image", "does not parse"]),
        ),
        case(
            "a sandbox escape",
            json!({"assembly": {"image": "{{ ''.__class__.__mro__ }}"}}),
            Failed("PlanFailed", &["spec.assembly.image"]),
        ),
        case(
            "a loop without end",
            json!({"assembly": {"buildArgs": {"X": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"}}}),
            Failed("PlanFailed", &["spec.assembly.buildArgs.X"]),
        ),
        case(
            "recursion",
            json!({"assembly": {"buildArgs": {"X": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"}}}),
            Failed("PlanFailed", &["spec.assembly.buildArgs.X"]),
        ),
        case(
            "an output blow-up",
            json!({"base": {"buildArgs": {"X": "{{ 'x' * 1000000 }}"}}}),
            Failed("PlanFailed", &["spec.base.buildArgs.X"]),
        ),
        case(
            "a render just over the limit",
            json!({"base": {"buildArgs": {"X": "{{ 'x' * 16385 }}"}}}),
            Failed("PlanFailed", &["spec.base.buildArgs.X", "at most 16384"]),
        ),
        case(
            "a var shadowing a built-in",
            json!({"vars": {"instanceId": "x"}}),
            Failed("InvalidSpec", &["spec.vars.instanceId", "shadows"]),
        ),
        // Image and cache references.
        case(
            "an image that is no reference",
            json!({"assembly": {"image": format!("{registry}/UPPER CASE:{{{{ instanceId }}}}")}}),
            Failed(
                "PlanFailed",
                &["spec.assembly.image", "not a valid image reference"],
            ),
        ),
        case(
            "an image with a digest",
            json!({"builder": {"image": format!("{registry}/b@sha256:{}", "0".repeat(64))}}),
            Failed("PlanFailed", &["spec.builder.image", "needs a tag"]),
        ),
        case(
            "a cacheRef injecting options",
            json!({"builder": {"cache": "max", "cacheRef": format!("{registry}/cache:x,type=local,dest=/tmp")}}),
            Failed(
                "PlanFailed",
                &["spec.builder.cacheRef", "not a valid image reference"],
            ),
        ),
        case(
            "cache without cacheRef",
            json!({"builder": {"cache": "min"}}),
            Failed("InvalidSpec", &["spec.builder.cacheRef", "required"]),
        ),
        case(
            "an executor image that is no reference",
            json!({"executor": {"image": "not an image!"}}),
            Failed("InvalidSpec", &["spec.executor.image", "not an image!"]),
        ),
        case(
            "a git revision injecting a path",
            json!({"builder": git("main#evil:/etc")}),
            Failed(
                "PlanFailed",
                &["spec.builder.context.git.revision", "main#evil:/etc"],
            ),
        ),
        case(
            "a git revision with an option",
            json!({"builder": git("--upload-pack=touch")}),
            Failed("PlanFailed", &["spec.builder.context.git.revision"]),
        ),
        // Instance ids.
        case(
            "shell metacharacters",
            json!({"instances": {"list": ["a__b-1;rm -rf /"]}}),
            Failed(
                "PlanFailed",
                &["not a valid image reference", "a__b-1;rm -rf /"],
            ),
        ),
        case(
            "control characters",
            json!({"instances": {"list": ["a__b-\u{7}1"]}}),
            Failed("PlanFailed", &["not a valid image reference"]),
        ),
        case(
            "path traversal",
            json!({"instances": {"list": ["../../etc/passwd"]}}),
            Failed(
                "PlanFailed",
                &["spec.instances.upstreamImage", "../../etc/passwd"],
            ),
        ),
        case(
            "non-ASCII",
            json!({"instances": {"list": ["a__b-ü"]}}),
            Failed("PlanFailed", &["not a valid image reference", "a__b-ü"]),
        ),
        case(
            "duplicate ids",
            json!({"instances": {"list": ["a__b-1", "a__b-1"]}}),
            Failed("PlanFailed", &["a__b-1"]),
        ),
        case(
            "the longest id",
            json!({"instances": {"list": [long_id]}}),
            Failed("PlanFailed", &["not a valid image reference"]),
        ),
        case(
            "select naming an absent id",
            json!({"instances": {"select": ["no__such-1"]}}),
            Failed("PlanFailed", &["no__such-1"]),
        ),
        case(
            "limit past the list",
            json!({"instances": {"limit": 50}}),
            Failed("PlanFailed", &["50"]),
        ),
        case(
            "select and limit",
            json!({"instances": {"select": ["astropy__astropy-12907"], "limit": 1}}),
            Built,
        ),
        // Regular expressions.
        case(
            "a regex that does not parse",
            json!({"postAssembly": {"match": "(", "context": {"inline": "FROM scratch"}, "image": format!("{registry}/post:{{{{ instanceId }}}}")}}),
            Failed(
                "InvalidSpec",
                &["spec.postAssembly.match", "not a regular expression"],
            ),
        ),
        case(
            "a regex past the size limit",
            json!({"postAssembly": {"match": "(((a{100}){100}){100}){100}", "context": {"inline": "FROM scratch"}, "image": format!("{registry}/post:{{{{ instanceId }}}}")}}),
            Failed("InvalidSpec", &["spec.postAssembly.match"]),
        ),
        case(
            "a catastrophic-backtracking regex",
            json!({"postAssembly": {"match": "^(a+)+$", "context": {"inline": "FROM scratch"}, "image": format!("{registry}/post-{{{{ instanceId | lower }}}}:1")}}),
            Built,
        ),
        // Build arguments and annotations.
        case(
            "build args with newlines and quotes",
            json!({"assembly": {"buildArgs": {"NOTE": "line one\nline \"two\"\n$(id)"}}}),
            Built,
        ),
        case(
            "a reserved annotation key",
            json!({"placement": {"podAnnotations": {"imagebuild.dev/attempt": "9"}}}),
            Failed("InvalidSpec", &["imagebuild.dev/attempt", "reserved"]),
        ),
        case(
            "an invalid annotation key",
            json!({"placement": {"podAnnotations": {"bad key!": "x"}}}),
            Failed("InvalidSpec", &["spec.placement.podAnnotations.bad key!"]),
        ),
        case(
            "annotations past 256 KiB",
            json!({"placement": {"podAnnotations": many(32, |i| (format!("a{i}"), json!("{{ 'x' * 16000 }}")))}}),
            Failed(
                "InvalidSpec",
                &["refuses the build Jobs", "annotations", "Too long"],
            ),
        ),
        // Past the dry run (which renders the last attempt's): the first attempt's Jobs are
        // refused when created, in the background, and the refusal fails the run.
        case(
            "annotations past 256 KiB in the first attempt only",
            json!({"retry": {"attempts": 2}, "placement": {"podAnnotations": many(32, |i| (format!("a{i}"), json!("{{ 'x' * 16000 if attempt == 1 else 'ok' }}")))}}),
            Failed(
                "InvalidSpec",
                &["refuses the build Jobs", "annotations", "Too long"],
            ),
        ),
        // Tolerations and affinity: checked by the API server itself, before any Job.
        case(
            "a toleration operator Sometimes",
            json!({"placement": {"tolerations": [{"key": "k", "operator": "Sometimes"}]}}),
            Failed(
                "InvalidSpec",
                &[
                    "refuses the build Jobs",
                    "tolerations[0].operator",
                    "Sometimes",
                ],
            ),
        ),
        case(
            "an Exists toleration with a value",
            json!({"placement": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}}),
            Failed("InvalidSpec", &["tolerations[0].operator"]),
        ),
        case(
            "a toleration effect Never",
            json!({"placement": {"tolerations": [{"key": "k", "operator": "Exists", "effect": "Never"}]}}),
            Failed("InvalidSpec", &["tolerations[0].effect"]),
        ),
        case(
            "an affinity operator Near",
            json!({"placement": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "Near", "values": ["v"]}]}]}}}}}),
            Failed("InvalidSpec", &["affinity", "Near"]),
        ),
        case(
            "an affinity weight of 1000",
            json!({"placement": {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1000, "preference": {"matchExpressions": [{"key": "k", "operator": "Exists"}]}}]}}}}),
            Failed("InvalidSpec", &["weight"]),
        ),
        case(
            "a node selector key that is no label",
            json!({"placement": {"nodeSelector": {"not a label!": "x"}}}),
            Failed("InvalidSpec", &["nodeSelector"]),
        ),
        // Secrets.
        case(
            "a push Secret that does not exist",
            json!({"forceRebuild": false, "registry": {"pushSecretRef": {"name": "no-such-secret"}}}),
            Waiting("Degraded", "RegistryError", &["no-such-secret"]),
        ),
        case(
            "a push Secret without docker config",
            json!({"forceRebuild": false, "registry": {"pushSecretRef": {"name": "opaque"}}}),
            Waiting(
                "Degraded",
                "RegistryError",
                &["opaque", ".dockerconfigjson"],
            ),
        ),
        case(
            "a push Secret with broken JSON",
            json!({"forceRebuild": false, "registry": {"pushSecretRef": {"name": "broken-json"}}}),
            Waiting("Degraded", "RegistryError", &["broken-json"]),
        ),
        // Instance sources.
        case(
            "an unreachable dataset server",
            json!({"instances": {"list": null, "huggingFace": {"dataset": "o/d", "split": "test", "endpoint": "http://127.0.0.1:9"}}}),
            Waiting("Progressing", "SourceUnavailable", &["127.0.0.1:9"]),
        ),
        case(
            "a missing ConfigMap",
            json!({"instances": {"list": null, "configMap": {"name": "no-such-ids", "key": "ids"}}}),
            Waiting("Progressing", "SourceUnavailable", &["no-such-ids"]),
        ),
        case(
            "a ConfigMap without the key",
            json!({"instances": {"list": null, "configMap": {"name": "ids", "key": "wrong"}}}),
            Waiting(
                "Progressing",
                "SourceUnavailable",
                &["key wrong", "no such key"],
            ),
        ),
        case(
            "a ConfigMap of binary data",
            json!({"instances": {"list": null, "configMap": {"name": "binary-ids", "key": "ids"}}}),
            Waiting(
                "Progressing",
                "SourceUnavailable",
                &["binary-ids", "binaryData"],
            ),
        ),
        case(
            "a ConfigMap with a broken JSON line",
            json!({"instances": {"list": null, "configMap": {"name": "ids", "key": "broken"}}}),
            Waiting(
                "Progressing",
                "SourceUnavailable",
                &["line 2", "invalid JSON"],
            ),
        ),
        case(
            "a ConfigMap of 30,000 ids",
            json!({"instances": {"list": null, "configMap": {"name": "big-ids", "key": "ids"}}}),
            Failed(
                "PlanFailed",
                &["30000 instances are selected", "at most 20000"],
            ),
        ),
        case(
            "a ConfigMap of ids",
            json!({"instances": {"list": null, "configMap": {"name": "ids", "key": "ids"}}}),
            Built,
        ),
    ]
}

/// The objects the cases name.
async fn objects(ns: &TestNamespace) {
    let cms = ns.api::<ConfigMap>();
    let ids = swebench_ids(2).join("\n");
    let big: String = (0..30000).map(|i| format!("r__n-{i}\n")).collect();
    for cm in [
        json!({"metadata": {"name": "ids"}, "data": {"ids": ids, "broken": format!("{}\n{{\"id\": \n", swebench_ids(1)[0])}}),
        json!({"metadata": {"name": "binary-ids"}, "binaryData": {"ids": "//79/A=="}}),
        json!({"metadata": {"name": "big-ids"}, "data": {"ids": big}}),
    ] {
        let cm: ConfigMap = serde_json::from_value(cm).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let secrets = ns.api::<Secret>();
    for (name, type_, key, value) in [
        ("opaque", "Opaque", "password", "x"),
        ("broken-json", "Opaque", ".dockerconfigjson", "{\"auths\": "),
    ] {
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            type_: Some(type_.into()),
            data: Some(BTreeMap::from([(
                key.to_string(),
                ByteString(value.as_bytes().to_vec()),
            )])),
            ..Default::default()
        };
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
}

async fn jobs_of(jobs: &Api<Job>, uid: &str) -> usize {
    jobs.list(&ListParams::default().labels(&format!("{LABEL_RUN_UID}={uid}")))
        .await
        .unwrap()
        .items
        .len()
}

fn has_all(text: &str, parts: &[&str]) -> bool {
    parts.iter().all(|p| text.contains(p))
}

#[tokio::test]
async fn every_hostile_run_is_refused_failed_waiting_or_built_and_the_operator_lives() {
    let (env, _logs, ns) = setup("e2e-hostile").await;
    let mut operator = Operator::start(&ns.name);
    let runs = ns.api::<ImageBuildRun>();
    let raw = dynamic_runs(&ns);
    let jobs = ns.api::<Job>();
    let _seen = watch_jobs(jobs.clone());
    objects(&ns).await;
    let ids = swebench_ids(2);
    let cases = cases(&env.registry);
    assert!(cases.len() >= 40, "{} cases", cases.len());

    // Create every run at once: one operator sees them all together.
    let mut created = Vec::new();
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let name = format!("h{i:02}");
        let mut run = swebench_run(
            &name,
            &env.registry,
            &format!("{}/{name}", ns.name),
            &ids,
            2,
        );
        run.spec.force_rebuild = true;
        let mut value = serde_json::to_value(&run).unwrap();
        merge(&mut value["spec"], &case.patch);
        // Sent as JSON: the typed client could not send what the Rust type cannot hold.
        let result = create_raw(&raw, value).await;
        match (&case.expect, result) {
            (Refused(parts), Err(message)) => {
                if !has_all(&message, parts) {
                    failures.push(format!(
                        "{}: refused, but the message lacks {parts:?}: {message}",
                        case.what
                    ));
                }
            }
            (Refused(_), Ok(_)) => {
                failures.push(format!("{}: accepted; should be refused", case.what))
            }
            (_, Err(message)) => failures.push(format!("{}: refused: {message}", case.what)),
            (_, Ok(uid)) => created.push((case, name, uid)),
        }
    }

    // Then wait for each outcome; one that does not come is a failure like any other.
    let mut waiting = Vec::new();
    for (case, name, uid) in &created {
        let outcome = match &case.expect {
            Failed(reason, parts) => {
                match final_phase(&runs, name, Duration::from_secs(60)).await {
                    None => Err(format!("{}: not failed within 60 s", case.what)),
                    Some(run) => {
                        let (status, got_reason, message) =
                            condition(&run, "Ready").unwrap_or_default();
                        let jobs = jobs_of(&jobs, uid).await;
                        let phase = run.status.as_ref().and_then(|s| s.phase);
                        if phase != Some(RunPhase::Failed)
                            || status != "False"
                            || got_reason != *reason
                            || !has_all(&message, parts)
                            || message.len() > 2048 + 3
                            || jobs != 0
                        {
                            Err(format!(
                                "{}: {phase:?}, Ready {status} {got_reason}: {message} ({jobs} Jobs)",
                                case.what
                            ))
                        } else {
                            Ok(())
                        }
                    }
                }
            }
            Built => match final_phase(&runs, name, Duration::from_secs(180)).await {
                None => Err(format!("{}: not finished within 180 s", case.what)),
                Some(run)
                    if run.status.as_ref().and_then(|s| s.phase) == Some(RunPhase::Succeeded) =>
                {
                    Ok(())
                }
                Some(run) => Err(format!(
                    "{}: {:?}: {:?}",
                    case.what,
                    run.status.as_ref().and_then(|s| s.phase),
                    condition(&run, "Ready")
                )),
            },
            Waiting(..) => {
                waiting.push((case, name, uid));
                Ok(())
            }
            Refused(_) => unreachable!("refused runs are not created"),
        };
        if let Err(message) = outcome {
            failures.push(message);
        }
    }
    for (case, name, uid) in waiting {
        let Waiting(type_, reason, parts) = &case.expect else {
            unreachable!("only waiting cases are here")
        };
        let said = within(Duration::from_secs(60), || async {
            let run = runs.get(name).await.ok()?;
            let (_, got, message) = condition(&run, type_)?;
            (got == *reason && has_all(&message, parts)).then_some(run)
        })
        .await;
        let Some(run) = said else {
            let now = runs.get(name).await.ok();
            failures.push(format!(
                "{}: never said {type_} {reason} with {parts:?}: {:?}",
                case.what,
                now.as_ref().and_then(|r| condition(r, type_))
            ));
            continue;
        };
        let jobs = jobs_of(&jobs, uid).await;
        let phase = run.status.as_ref().and_then(|s| s.phase);
        if jobs != 0 || matches!(phase, Some(RunPhase::Succeeded | RunPhase::Failed)) {
            failures.push(format!("{}: {phase:?} with {jobs} Jobs", case.what));
        }
    }

    // Immutable fields stay so; an edit of a finished run's mutable fields is checked too.
    let first_built = created
        .iter()
        .find(|(c, ..)| matches!(c.expect, Built))
        .unwrap();
    let patch = json!({"spec": {"builder": {"image": format!("{}/other:1", env.registry)}}});
    let err = runs
        .patch(
            &first_built.1,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("builder is immutable"), "{err}");
    let patch = json!({"spec": {"timeouts": {"run": "0s"}}});
    let err = runs
        .patch(
            &first_built.1,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.timeouts.run"), "{err}");
    assert_eq!(
        runs.get(&first_built.1)
            .await
            .unwrap()
            .status
            .unwrap()
            .phase,
        Some(RunPhase::Succeeded)
    );

    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(
        operator.wait(Duration::from_millis(10)).is_none(),
        "the operator exited"
    );
    let log = operator.log();
    assert!(!log.contains("panicked"), "the operator panicked");
    let count = |f: fn(&Expect) -> bool| cases.iter().filter(|c| f(&c.expect)).count();
    println!(
        "{} hostile cases, all as expected: {} refused, {} failed, {} waiting, {} built; the operator ran through them in one process",
        cases.len(),
        count(|e| matches!(e, Refused(_))),
        count(|e| matches!(e, Failed(..))),
        count(|e| matches!(e, Waiting(..))),
        count(|e| matches!(e, Built)),
    );
    ns.delete().await;
}

/// Polls `probe` every 500 ms for up to `timeout`; its first answer.
async fn within<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(found) = probe().await {
            return Some(found);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Run `name` once it is in a final phase, within `timeout`.
async fn final_phase(
    runs: &Api<ImageBuildRun>,
    name: &str,
    timeout: Duration,
) -> Option<ImageBuildRun> {
    within(timeout, || async {
        let run = runs.get(name).await.ok()?;
        matches!(
            run.status.as_ref()?.phase,
            Some(RunPhase::Failed | RunPhase::Succeeded | RunPhase::PartiallySucceeded)
        )
        .then_some(run)
    })
    .await
}

/// The runs of `ns` as untyped objects.
fn dynamic_runs(ns: &TestNamespace) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("imagebuild.dev", "v1alpha1", "ImageBuildRun");
    Api::namespaced_with(
        ns.api::<ImageBuildRun>().into_client(),
        &ns.name,
        &ApiResource::from_gvk(&gvk),
    )
}

/// Creates run `value` as JSON: its uid, or the API server's refusal.
async fn create_raw(api: &Api<DynamicObject>, value: Value) -> Result<String, String> {
    let object: DynamicObject = serde_json::from_value(value).unwrap();
    match api.create(&PostParams::default(), &object).await {
        Ok(o) => Ok(o.uid().unwrap()),
        Err(kube::Error::Api(e)) => Err(e.message),
        Err(e) => panic!("{e}"),
    }
}

/// A TCP server on loopback that accepts connections and never answers: background work
/// against it (reading a dataset, checking a registry) stays in flight. Its address.
async fn silent_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    address
}

#[tokio::test]
async fn long_and_dotted_names_build_and_a_run_recreated_under_its_name_starts_afresh() {
    let (env, _logs, ns) = setup("e2e-names").await;
    let mut operator = Operator::start(&ns.name);
    let runs = ns.api::<ImageBuildRun>();
    let jobs = ns.api::<Job>();
    let _seen = watch_jobs(jobs.clone());
    let ids = swebench_ids(2);
    let silent = silent_server().await;
    let prefix = ns.name.clone();
    let make = |name: &str| {
        let mut run = swebench_run(name, &env.registry, &prefix, &ids, 2);
        run.spec.force_rebuild = true;
        run
    };

    // The longest name an object may have (253), dotted, and a short dotted one.
    let longest = format!("{}.e", ["a", "b", "c", "d"].map(|c| c.repeat(62)).join("."));
    assert_eq!(longest.len(), 253);
    for name in ["a.b.c", longest.as_str()] {
        runs.create(&PostParams::default(), &make(name))
            .await
            .unwrap();
    }

    // A run deleted while its instance source is being read (the dataset server never
    // answers), then created again under the same name from a list.
    let mut reading = make("again");
    reading.spec.instances.list = None;
    reading.spec.instances.hugging_face = Some(
        serde_json::from_value(
            json!({"dataset": "o/d", "split": "test", "endpoint": format!("http://{silent}")}),
        )
        .unwrap(),
    );
    // A run deleted while its registry checks are in flight (the registry never answers),
    // then created again pushing to the real registry.
    let mut checking = swebench_run("again-checks", &silent, &prefix, &ids, 2);
    checking.spec.force_rebuild = false;
    let mut old_uids = Vec::new();
    for (old, phase) in [
        (&reading, RunPhase::Resolving),
        (&checking, RunPhase::Building),
    ] {
        let name = old.name_any();
        let created = runs.create(&PostParams::default(), old).await.unwrap();
        old_uids.push(created.uid().unwrap());
        within(Duration::from_secs(30), || async {
            let run = runs.get(&name).await.ok()?;
            (run.status?.phase == Some(phase)).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("{name} never reached {phase:?}"));
        runs.delete(&name, &Default::default()).await.unwrap();
        within(Duration::from_secs(30), || async {
            runs.get_opt(&name).await.unwrap().is_none().then_some(())
        })
        .await
        .unwrap();
        runs.create(&PostParams::default(), &make(&name))
            .await
            .unwrap();
    }

    for name in ["a.b.c", longest.as_str(), "again", "again-checks"] {
        let run = final_phase(&runs, name, Duration::from_secs(180))
            .await
            .unwrap_or_else(|| panic!("{name} did not finish"));
        let status = run.status.as_ref().unwrap();
        assert_eq!(
            status.phase,
            Some(RunPhase::Succeeded),
            "{name}: {status:?}"
        );
        assert_eq!(
            (
                status.bases.succeeded,
                status.assemblies.succeeded,
                status.failed_total
            ),
            (2, 2, 0),
            "{name}"
        );
        // Every manifest shard it names exists, and the names fit.
        let cms = ns.api::<ConfigMap>();
        for shard in &status.manifests {
            assert!(shard.len() <= 253, "{shard}");
            cms.get(shard)
                .await
                .unwrap_or_else(|e| panic!("{shard}: {e}"));
        }
    }
    // Nothing of the old runs was built: every Job belongs to a run that lives now.
    let all = jobs.list(&ListParams::default()).await.unwrap().items;
    let stale: Vec<String> = all
        .iter()
        .filter(|j| {
            old_uids
                .iter()
                .any(|u| j.labels().get(LABEL_RUN_UID) == Some(u))
        })
        .map(|j| j.name_any())
        .collect();
    assert!(stale.is_empty(), "Jobs of deleted runs: {stale:?}");
    assert!(
        operator.wait(Duration::from_millis(10)).is_none(),
        "the operator exited"
    );
    assert!(
        !operator.log().contains("panicked"),
        "the operator panicked"
    );
    ns.delete().await;
}
