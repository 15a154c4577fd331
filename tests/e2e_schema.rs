//! The CRD's schema is the contract with the operator's Rust types, checked against the
//! real API server: objects at and beyond every bound the schema states (and random
//! values of every kind, from proptest) are sent with `dryRun=All`. Whatever the API
//! server accepts, defaults applied, must deserialize into `ImageBuildRun` (and validate
//! without a panic); whatever it refuses must be refused with a message naming the field
//! (or one of its parents, for a rule over several fields).
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::collections::BTreeMap;

use common::cluster::setup;
use common::runs::{swebench_ids, swebench_run};
use futures::StreamExt;
use imagebuild_operator::api::ImageBuildRun;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};

/// One step of a path into the object.
#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    /// The first item of an array.
    First,
}

type Path = Vec<Seg>;

/// The path as the API server writes it: `spec.a.b[0].c`.
fn shown(path: &Path) -> String {
    let mut out = String::from("spec");
    for seg in path {
        match seg {
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::First => out.push_str("[0]"),
        }
    }
    out
}

/// Every node of `schema` under `path`, with its schema.
fn walk(schema: &Value, path: Path, out: &mut Vec<(Path, Value)>) {
    out.push((path.clone(), schema.clone()));
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (key, sub) in props {
            let mut p = path.clone();
            p.push(Seg::Key(key.clone()));
            walk(sub, p, out);
        }
    }
    if let Some(items) = schema.get("items").filter(|i| i.is_object()) {
        let mut p = path.clone();
        p.push(Seg::First);
        walk(items, p, out);
    }
    if let Some(values) = schema.get("additionalProperties").filter(|i| i.is_object()) {
        let mut p = path;
        p.push(Seg::Key("k1".into()));
        walk(values, p, out);
    }
}

/// A value of `schema`'s type that satisfies it where that is easy.
fn sample(schema: &Value) -> Value {
    match schema.get("type").and_then(Value::as_str) {
        Some("string") => json!("x"),
        Some("integer") | Some("number") => json!(1),
        Some("boolean") => json!(true),
        Some("array") => json!([]),
        Some("object") => json!({}),
        _ => json!("1"),
    }
}

/// Values at and beyond every bound `schema` states, and of the wrong type.
fn boundary(schema: &Value) -> Vec<Value> {
    let mut out = vec![Value::Null];
    let num = |k: &str| schema.get(k).and_then(Value::as_f64);
    let int = |k: &str| schema.get(k).and_then(Value::as_u64).map(|n| n as usize);
    match schema.get("type").and_then(Value::as_str) {
        Some("integer") | Some("number") => {
            for bound in [num("minimum"), num("maximum")].into_iter().flatten() {
                let b = bound as i64;
                out.extend([
                    json!(b),
                    json!(b.saturating_sub(1)),
                    json!(b.saturating_add(1)),
                ]);
            }
            out.extend([
                json!(i64::MAX),
                json!(i64::MIN),
                json!(1u64 << 40),
                json!("1"),
                json!(1.5),
            ]);
        }
        Some("string") => {
            if let Some(max) = int("maxLength") {
                out.extend([json!("x".repeat(max)), json!("x".repeat(max + 1))]);
            }
            if let Some(min) = int("minLength") {
                out.push(json!("x".repeat(min.saturating_sub(1))));
            }
            out.extend([
                json!(""),
                json!("\u{0}!\n"),
                json!("nope"),
                json!(12),
                json!(["x"]),
            ]);
        }
        Some("boolean") => out.extend([json!("true"), json!(1)]),
        Some("array") => {
            let item = schema.get("items").map(sample).unwrap_or(json!("x"));
            if let Some(max) = int("maxItems") {
                out.push(Value::Array(vec![item.clone(); max + 1]));
            }
            out.extend([json!([]), json!("x"), json!([null])]);
        }
        Some("object") => {
            if let Some(max) = int("maxProperties") {
                let value = schema
                    .get("additionalProperties")
                    .map(sample)
                    .unwrap_or(json!("x"));
                let map: serde_json::Map<String, Value> = (0..=max)
                    .map(|i| (format!("k{i}"), value.clone()))
                    .collect();
                out.push(Value::Object(map));
            }
            out.extend([json!({}), json!("x"), json!([])]);
        }
        _ => {}
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&json!(true)) {
        out.extend([
            json!("abc"),
            json!(-1),
            json!(0),
            json!("1.5Gi"),
            json!(1u64 << 40),
        ]);
    }
    out
}

/// Puts `value` at `path` in `root`, making the objects and arrays on the way.
fn set(root: &mut Value, path: &Path, value: Value) {
    let mut at = root;
    for seg in path {
        at = match seg {
            Seg::Key(k) => {
                if !at.is_object() {
                    *at = json!({});
                }
                at.as_object_mut()
                    .unwrap()
                    .entry(k.clone())
                    .or_insert(Value::Null)
            }
            Seg::First => {
                if at.as_array().is_none_or(|a| a.is_empty()) {
                    *at = json!([null]);
                }
                &mut at.as_array_mut().unwrap()[0]
            }
        };
    }
    *at = value;
}

/// Random values of every kind.
fn any_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        "[0-9]{1,25}(ms|s|m|h|Gi|m|k)?".prop_map(Value::from),
        proptest::collection::vec(".{0,8}", 0..4).prop_map(|v| json!(v)),
        proptest::collection::btree_map("[a-z]{1,8}", ".{0,8}", 0..4).prop_map(|m| json!(m)),
    ]
}

/// The field paths a refusal names, with `[i]` written as `.i` for comparison.
fn named_paths(message: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (start, _) in message.match_indices("spec") {
        let rest = &message[start..];
        let end = rest
            .find(|c: char| {
                !(c.is_ascii_alphanumeric() || matches!(c, '.' | '[' | ']' | '_' | '-' | '/'))
            })
            .unwrap_or(rest.len());
        out.push(normalize(&rest[..end]));
    }
    out
}

fn normalize(path: &str) -> String {
    path.replace('[', ".").replace(']', "")
}

#[tokio::test]
async fn whatever_the_api_server_accepts_reads_and_whatever_it_refuses_names_the_field() {
    let (env, _logs, ns) = setup("e2e-schema").await;
    let client = env.client().await;
    let gvk = GroupVersionKind::gvk("imagebuild.dev", "v1alpha1", "ImageBuildRun");
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, &ns.name, &ApiResource::from_gvk(&gvk));

    let crd: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(imagebuild_operator::crd::CRD_PATH).unwrap(),
    )
    .unwrap();
    let spec_schema =
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut nodes = Vec::new();
    walk(spec_schema, Vec::new(), &mut nodes);
    let base = serde_json::to_value(swebench_run(
        "schema",
        &env.registry,
        &ns.name,
        &swebench_ids(2),
        2,
    ))
    .unwrap();

    // Every bound, then random values at 1 to 3 random places.
    let mut objects: Vec<(Vec<String>, Value)> = Vec::new();
    for (path, schema) in &nodes {
        for value in boundary(schema) {
            let mut object = base.clone();
            set(&mut object["spec"], path, value);
            objects.push((vec![shown(path)], object));
        }
    }
    let bounded = objects.len();
    let mut runner = TestRunner::deterministic();
    let change = (0..nodes.len(), any_value());
    let strategy = proptest::collection::vec(change, 1..=3);
    for _ in 0..600 {
        let changes = strategy.new_tree(&mut runner).unwrap().current();
        let mut object = base.clone();
        let mut paths = Vec::new();
        for (i, value) in changes {
            set(&mut object["spec"], &nodes[i].0, value);
            paths.push(shown(&nodes[i].0));
        }
        objects.push((paths, object));
    }

    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let results: Vec<_> =
        futures::stream::iter(objects.iter().enumerate().map(|(i, (paths, object))| {
            let (api, dry) = (api.clone(), dry.clone());
            async move {
                let mut object = object.clone();
                object["metadata"]["name"] = json!(format!("s{i}"));
                let object: DynamicObject = serde_json::from_value(object).unwrap();
                (paths, api.create(&dry, &object).await)
            }
        }))
        .buffer_unordered(8)
        .collect()
        .await;

    let mut failures = Vec::new();
    let (mut accepted, mut refused, mut invalid_by_operator) = (0, 0, 0);
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    for (paths, result) in results {
        match result {
            Ok(stored) => {
                accepted += 1;
                let value = serde_json::to_value(&stored).unwrap();
                match serde_json::from_value::<ImageBuildRun>(value.clone()) {
                    Ok(run) => {
                        if imagebuild_operator::validate::validate(&run.spec).is_err() {
                            invalid_by_operator += 1;
                        }
                    }
                    Err(e) => failures.push(format!(
                        "accepted but unreadable ({paths:?}): {e}: {}",
                        value["spec"]
                    )),
                }
            }
            Err(kube::Error::Api(e)) => {
                refused += 1;
                let named = named_paths(&e.message);
                // The field; one of its parents (a rule over several fields); one of its
                // children (a value of the wrong shape); or a required sibling of it or of
                // a parent (an object the test made on the way lacks its required fields).
                let ok = paths.iter().map(|p| normalize(p)).any(|p| {
                    named.iter().any(|n| {
                        let parent = n.rsplit_once('.').map_or("", |(head, _)| head);
                        n == &p
                            || (n != "spec"
                                && (p.starts_with(n.as_str())
                                    || n.starts_with(p.as_str())
                                    || (parent != "spec" && p.starts_with(parent))))
                    })
                });
                if !ok {
                    failures.push(format!(
                        "refused without naming a field ({paths:?}): {}",
                        e.message
                    ));
                }
                *refusals.entry(e.reason.clone()).or_default() += 1;
            }
            Err(e) => failures.push(format!("{paths:?}: {e}")),
        }
    }
    println!(
        "schema nodes {}, objects {} ({bounded} at bounds, {} random): accepted {accepted} (all readable: {}; {invalid_by_operator} then failed by the operator's own checks), refused {refused} {refusals:?}",
        nodes.len(),
        objects.len(),
        objects.len() - bounded,
        failures.iter().all(|f| !f.starts_with("accepted"))
    );
    assert!(accepted > 50 && refused > 50, "both sides are exercised");
    assert!(
        failures.is_empty(),
        "{} of {}:\n{}",
        failures.len(),
        objects.len(),
        failures.join("\n")
    );
    ns.delete().await;
}
