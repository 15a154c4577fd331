//! The Grafana dashboard of the chart (`charts/imagebuild-operator/dashboards/`), against
//! the real Prometheus of the local environment. Its structure is checked as Grafana would
//! read it (ids, grid, data source, template variables, metric names that exist); then an
//! operator builds a small run that builds, skips, fails and retries images while
//! Prometheus scrapes it, and every query of every panel and every template variable is
//! sent to Prometheus with the variables substituted as Grafana substitutes them: none may
//! be refused, none may return nothing, and each must show a value other than zero at
//! some moment of the run unless it is one of the few that a healthy run leaves at zero.
//! A misspelt metric name returns nothing, and the test says so.
//!
//! Needs `e2e/cluster up` (except the first test); run with `e2e/cluster test`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::cluster::{Env, Operator, eventually, install_crypto_provider, setup};
use common::runs::{annotations, await_phase, plan, swebench_ids, swebench_run};
use imagebuild_operator::api::{ImageBuildRun, RunPhase};
use imagebuild_operator::plan::Phase;
use kube::api::PostParams;
use oci_client::secrets::RegistryAuth;
use regex::Regex;
use serde_json::Value;

const DASHBOARD: &str = "charts/imagebuild-operator/dashboards/imagebuild-operator.json";
const METRICS_DOC: &str = "docs/metrics.md";

/// Grafana's global variables the queries may use.
const BUILT_INS: [&str; 6] = [
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
];

/// Targets (panel title, refId) a healthy run may leave at zero (or NaN) throughout.
const MAY_BE_ZERO: [(&str, &str); 9] = [
    // A 404 or 409 counted before the first scrape makes a series whose rate stays 0.
    ("Kubernetes API errors", "A"),
    // No pod waits for a node, no run is suspended.
    ("Workers", "C"),
    ("Workers", "D"),
    // The run's skips are found in its first registry checks, before Prometheus first
    // scrapes its series, and so are its 404s: a rate does not see them (the run totals
    // do). Later checks answer nothing but 200 and 404.
    ("Build and skip rate by phase", "B"),
    ("Registry checks by status code", "A"),
    ("Registry check errors", "A"),
    ("Unreadable runs", "A"),
    // Reconciles take milliseconds: a scrape rarely finds one running.
    ("Reconciles", "B"),
    ("Reconcile errors by kind", "A"),
];

/// Targets that may return nothing at all for a healthy operator.
const MAY_BE_EMPTY: [(&str, &str); 1] = [
    // No request fails, or only a few 404s and 409s do.
    ("Kubernetes API errors", "A"),
];

/// One query of one panel.
#[derive(Clone, Debug)]
struct Target {
    panel: String,
    ref_id: String,
    expr: String,
}

fn load() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel, those inside collapsed rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

/// `$name`, `${name}`, `${name:format}` and `[[name]]` in `text`.
fn variable_references(text: &str) -> Vec<String> {
    let re = Regex::new(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]").unwrap();
    re.captures_iter(text)
        .map(|c| {
            c.get(1)
                .or(c.get(2))
                .or(c.get(3))
                .unwrap()
                .as_str()
                .to_string()
        })
        .collect()
}

/// The template variables of the dashboard, by name.
fn variables(dashboard: &Value) -> BTreeMap<String, &Value> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().expect("a variable's name").to_string(),
                v,
            )
        })
        .collect()
}

/// The query of a query variable: `label_values(selector, label)`.
fn variable_query(variable: &Value) -> (String, String) {
    let query = match &variable["query"] {
        Value::String(q) => q.as_str(),
        q => q["query"].as_str().expect("a variable's query"),
    };
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{query}: not label_values(selector, label)"));
    let (selector, label) = inner.rsplit_once(',').unwrap();
    (selector.trim().to_string(), label.trim().to_string())
}

/// The metric names `text` uses that the operator exports (`imagebuild_...`), each
/// without a histogram's `_bucket`, `_count` or `_sum`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let re = Regex::new(r"\bimagebuild_[a-z_]+").unwrap();
    re.find_iter(text)
        .map(|m| {
            let name = m.as_str();
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
                .to_string()
        })
        .collect()
}

/// The metrics of the operator `text` uses that `docs/metrics.md` does not document.
fn undocumented(text: &str) -> Vec<String> {
    let docs = std::fs::read_to_string(METRICS_DOC).unwrap();
    metric_names(text)
        .into_iter()
        .filter(|name| !docs.contains(&format!("`{name}`")))
        .collect()
}

/// Checks the dashboard as Grafana reads it; its panels' queries.
fn well_formed(dashboard: &Value) -> Vec<Target> {
    assert_eq!(dashboard["title"], "imagebuild-operator");
    let uid = dashboard["uid"].as_str().expect("a uid");
    assert!(
        !uid.is_empty()
            && uid.len() <= 40
            && uid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "uid {uid}"
    );
    let schema = dashboard["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(dashboard["time"]["from"].is_string());
    assert!(
        dashboard["id"].is_null(),
        "no database id in a provisioned dashboard"
    );

    // Template variables: the data source, then query variables that read it.
    let vars = variables(dashboard);
    let ds = vars.get("datasource").expect("a datasource variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    let documented = |text: &str| {
        let unknown = undocumented(text);
        assert!(
            unknown.is_empty(),
            "{unknown:?} (in {text}): not metrics of {METRICS_DOC}"
        );
    };
    for name in ["job", "instance", "namespace", "run"] {
        let v = vars
            .get(name)
            .unwrap_or_else(|| panic!("no variable {name}"));
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"], ds_ref, "{name}");
        assert_eq!(v["multi"], true, "{name}");
        assert_eq!(v["includeAll"], true, "{name}");
        let (selector, _) = variable_query(v);
        documented(&selector);
    }
    for (name, v) in &vars {
        if v["type"] == "query" {
            let (selector, _) = variable_query(v);
            for used in variable_references(&selector) {
                assert!(
                    vars.contains_key(&used) && used != *name,
                    "variable {name} uses ${used}"
                );
            }
        }
    }
    assert!(
        variable_query(vars["namespace"])
            .0
            .starts_with("imagebuild_run_status_phase")
    );
    assert!(
        variable_query(vars["run"])
            .0
            .starts_with("imagebuild_run_status_phase")
    );

    // Panels: unique ids and titles, on the 24-column grid without overlapping, each
    // reading the data source variable.
    let all = panels(dashboard);
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    let mut targets = Vec::new();
    let in_matcher = Regex::new(r#"\w+=~"\$(\w+)""#).unwrap();
    for panel in &all {
        let title = panel["title"].as_str().expect("a title").to_string();
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{title}: id"));
        assert!(ids.insert(id), "panel id {id} twice");
        assert!(titles.insert(title.clone()), "panel title {title:?} twice");
        let kind = panel["type"].as_str().unwrap_or("");
        assert!(
            [
                "row",
                "timeseries",
                "stat",
                "table",
                "heatmap",
                "bargauge",
                "gauge"
            ]
            .contains(&kind),
            "{title}: type {kind:?}"
        );
        let g = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        });
        assert!(
            (1..=24).contains(&w) && x + w <= 24 && h >= 1,
            "{title}: {g}"
        );
        for (other, [ox, oy, ow, oh]) in &boxes {
            let apart = x + w <= *ox || *ox + ow <= x || y + h <= *oy || *oy + oh <= y;
            assert!(apart, "{title} overlaps {other}");
        }
        boxes.push((title.clone(), [x, y, w, h]));
        if kind == "row" {
            assert_eq!(w, 24, "{title}");
            continue;
        }
        assert!(
            panel["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}: a description says what it shows"
        );
        assert_eq!(panel["datasource"], ds_ref, "{title}: datasource");
        let queries = panel["targets"].as_array().expect("targets");
        assert!(!queries.is_empty(), "{title}: no query");
        let mut refs = BTreeSet::new();
        for t in queries {
            let ref_id = t["refId"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: refId"));
            assert!(refs.insert(ref_id), "{title}: refId {ref_id} twice");
            let expr = t["expr"]
                .as_str()
                .filter(|e| !e.trim().is_empty())
                .unwrap_or_else(|| panic!("{title} {ref_id}: expr"));
            assert_eq!(t["datasource"], ds_ref, "{title} {ref_id}: datasource");
            let mut user = 0;
            for used in variable_references(expr) {
                if BUILT_INS.contains(&used.as_str()) {
                    continue;
                }
                assert!(
                    vars.get(&used).is_some_and(|v| v["type"] == "query"),
                    "{title} {ref_id}: ${used} is not a query variable"
                );
                user += 1;
            }
            // Multi-valued variables become regular expressions: only `=~` takes them.
            assert_eq!(
                in_matcher.find_iter(expr).count(),
                user,
                "{title} {ref_id}: a variable outside a label=~\"$var\" matcher: {expr}"
            );
            documented(expr);
            assert!(
                !expr.contains("process_"),
                "the operator exports no process_ metrics"
            );
            targets.push(Target {
                panel: title.clone(),
                ref_id: ref_id.to_string(),
                expr: expr.to_string(),
            });
        }
    }
    for (panel, ref_id) in MAY_BE_ZERO.iter().chain(&MAY_BE_EMPTY) {
        assert!(
            targets
                .iter()
                .any(|t| t.panel == *panel && t.ref_id == *ref_id),
            "{panel} {ref_id} is excused but not in the dashboard"
        );
    }
    targets
}

#[test]
fn the_dashboard_is_well_formed() {
    let dashboard = load();
    let targets = well_formed(&dashboard);
    let panels = panels(&dashboard)
        .iter()
        .filter(|p| p["type"] != "row")
        .count();
    println!("{panels} panels, {} queries", targets.len());
    // The metrics the dashboard is about are all on it.
    let used: BTreeSet<String> = targets.iter().flat_map(|t| metric_names(&t.expr)).collect();
    for metric in [
        "imagebuild_run_status_phase",
        "imagebuild_run_images",
        "imagebuild_builds_total",
        "imagebuild_skips_total",
        "imagebuild_run_estimated_completion_timestamp_seconds",
        "imagebuild_queue_wait_seconds",
        "imagebuild_build_duration_seconds",
        "imagebuild_build_failures_total",
        "imagebuild_retries_total",
        "imagebuild_registry_requests_total",
        "imagebuild_ready",
        "imagebuild_leader",
        "imagebuild_reconcile_duration_seconds",
        "imagebuild_reconcile_errors_total",
        "imagebuild_kubernetes_requests_total",
        "imagebuild_runs_unreadable",
    ] {
        assert!(used.contains(metric), "no panel shows {metric}");
    }
    // A misspelt metric name is caught before any query.
    assert_eq!(
        undocumented("sum by (phase) (imagebuild_run_imagez) / imagebuild_run_images"),
        ["imagebuild_run_imagez"]
    );
    assert!(undocumented("rate(imagebuild_build_duration_seconds_bucket[1m])").is_empty());
}

/// Grafana's text for a multi-valued variable: each value a regular expression matching
/// it literally, in a PromQL string; several values as alternatives.
fn regex_value(values: &[&str]) -> String {
    let escaped: Vec<String> = values
        .iter()
        .map(|v| {
            let mut out = String::new();
            for c in v.chars() {
                if "\\$^*{}[]'+?.()|".contains(c) {
                    out.push_str("\\\\");
                }
                out.push(c);
            }
            out
        })
        .collect();
    match escaped.as_slice() {
        [one] => one.clone(),
        many => format!("({})", many.join("|")),
    }
}

/// `text` with every variable replaced by its value in `values`.
fn substitute(text: &str, values: &BTreeMap<String, String>) -> String {
    let re = Regex::new(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]").unwrap();
    re.replace_all(text, |c: &regex::Captures| {
        let name = c.get(1).or(c.get(2)).or(c.get(3)).unwrap().as_str();
        values
            .get(name)
            .unwrap_or_else(|| panic!("no value for ${name} in {text}"))
            .clone()
    })
    .into_owned()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The `data` of Prometheus' answer at `path`, or its error (a refused query).
async fn prometheus(env: &Env, path: &str, params: &[(&str, String)]) -> Result<Value, String> {
    let body: Value = reqwest::Client::new()
        .get(format!("{}{path}", env.prometheus))
        .query(params)
        .send()
        .await
        .expect("Prometheus answers")
        .json()
        .await
        .expect("Prometheus answers JSON");
    if body["status"] == "success" {
        Ok(body["data"].clone())
    } else {
        Err(format!("{}: {}", body["errorType"], body["error"]))
    }
}

/// What a query returned over the range: its series, and whether any value was a number
/// other than zero.
#[derive(Debug, Default)]
struct Seen {
    series: usize,
    samples: usize,
    nonzero: bool,
}

async fn query_range(env: &Env, expr: &str, start: f64, end: f64) -> Result<Seen, String> {
    let data = prometheus(
        env,
        "/api/v1/query_range",
        &[
            ("query", expr.to_string()),
            ("start", format!("{start:.3}")),
            ("end", format!("{end:.3}")),
            ("step", "2".into()),
        ],
    )
    .await?;
    let mut seen = Seen::default();
    for series in data["result"].as_array().into_iter().flatten() {
        seen.series += 1;
        for point in series["values"].as_array().into_iter().flatten() {
            seen.samples += 1;
            let v: f64 = point[1].as_str().unwrap().parse().unwrap();
            seen.nonzero |= v.is_finite() && v != 0.0;
        }
    }
    Ok(seen)
}

/// Whether what `target` returned is what the dashboard needs of it.
fn judge(target: &Target, seen: &Result<Seen, String>) -> Result<(), String> {
    let key = (target.panel.as_str(), target.ref_id.as_str());
    let seen = seen.as_ref().map_err(|e| format!("refused: {e}"))?;
    if seen.samples == 0 && !MAY_BE_EMPTY.contains(&key) {
        return Err("no data".into());
    }
    if seen.samples > 0 && !seen.nonzero && !MAY_BE_ZERO.contains(&key) {
        return Err(format!("only zeros ({} series)", seen.series));
    }
    Ok(())
}

/// The instant values of `expr` at `at`, by the values of `labels`.
async fn instant(env: &Env, expr: &str, at: f64, labels: &[&str]) -> BTreeMap<String, f64> {
    let data = prometheus(
        env,
        "/api/v1/query",
        &[("query", expr.to_string()), ("time", format!("{at:.3}"))],
    )
    .await
    .unwrap_or_else(|e| panic!("{expr}: {e}"));
    data["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let key: Vec<&str> = labels
                .iter()
                .map(|l| r["metric"][*l].as_str().unwrap_or(""))
                .collect();
            (
                key.join(" "),
                r["value"][1].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// Removes a file Prometheus reads when the test ends.
struct Remove(std::path::PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits (at most 30 s) until `query` returns a series.
async fn until_prometheus_has(env: &Env, query: &str, what: &str) {
    eventually(Duration::from_secs(30), what, || async {
        let data = prometheus(env, "/api/v1/query", &[("query", query.to_string())])
            .await
            .ok()?;
        (!data["result"].as_array()?.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn every_panel_query_answers_from_a_real_run() {
    let began = Instant::now();
    let dashboard = load();
    let targets = well_formed(&dashboard);
    let vars = variables(&dashboard);
    let (env, _logs, ns) = setup("e2e-dashboard").await;
    install_crypto_provider();
    let operator = Operator::start(&ns.name);
    let addr = operator.metrics_addr();

    // Prometheus scrapes this operator (job imagebuild-operator, instance its address).
    let file = env
        .prometheus_targets
        .join(format!("e2e-dashboard-{}.json", ns.name));
    std::fs::write(&file, format!(r#"[{{"targets":["{addr}"]}}]"#)).unwrap();
    let _target = Remove(file);
    let up = format!("up{{instance=\"{addr}\"}} == 1");
    let job = eventually(
        Duration::from_secs(30),
        "Prometheus to scrape the operator",
        || async {
            let data = prometheus(&env, "/api/v1/query", &[("query", up.clone())])
                .await
                .ok()?;
            data["result"][0]["metric"]["job"]
                .as_str()
                .map(str::to_string)
        },
    )
    .await;
    let start = unix_now() - 2.0;

    // A run that builds, skips, fails and retries: 1 builder, 6 bases, 6 assemblies. The
    // first instance's assembly is in the registry already (skipped, and so its base), the
    // second's fails its build, the third's push is throttled once and retried.
    let name = "dashboard";
    let ids = swebench_ids(6);
    let mut run = swebench_run(name, &env.registry, &ns.name, &ids, 3);
    run.spec.vars.insert("broken".into(), ids[1].clone());
    run.spec.vars.insert("throttled".into(), ids[2].clone());
    let broken = "phase == 'assembly' and instanceId == broken";
    let throttle = "phase == 'assembly' and instanceId == throttled and attempt == 1";
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
    let present = plan(&run, &ids)
        .nodes
        .iter()
        .find(|n| n.phase == Phase::Assembly && n.instance_id.as_deref() == Some(ids[0].as_str()))
        .unwrap()
        .image
        .clone();
    let (layers, config) = common::oci::tiny_image();
    common::oci::oci()
        .push(
            &present.parse().unwrap(),
            &layers,
            config,
            &RegistryAuth::Anonymous,
            None,
        )
        .await
        .unwrap();
    // Created suspended: its counters exist (at zero) and Prometheus scrapes them before
    // anything is built, failed or retried, so every rate sees every step.
    run.spec.suspend = true;
    let runs = ns.api::<ImageBuildRun>();
    let created = Instant::now();
    runs.create(&PostParams::default(), &run).await.unwrap();
    let series = format!(
        "imagebuild_builds_total{{namespace=\"{}\",run=\"{name}\"}}",
        ns.name
    );
    until_prometheus_has(&env, &series, "Prometheus to scrape the run's counters").await;
    runs.patch(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"spec": {"suspend": false}})),
    )
    .await
    .unwrap();
    let done = await_phase(
        &runs,
        name,
        RunPhase::PartiallySucceeded,
        Duration::from_secs(120),
    )
    .await;
    let run_seconds = created.elapsed().as_secs_f64();
    let final_phase = format!(
        "imagebuild_run_status_phase{{namespace=\"{}\",run=\"{name}\",phase=\"PartiallySucceeded\"}} == 1",
        ns.name
    );
    until_prometheus_has(&env, &final_phase, "Prometheus to see the run finished").await;
    let end = unix_now();
    let status = done.status.unwrap();
    assert_eq!(
        (status.bases.skipped, status.assemblies.skipped),
        (1, 1),
        "{status:?}"
    );
    assert_eq!(status.assemblies.failed, 1, "{status:?}");

    // The variables, as Grafana fills them: each one's query lists the value this test
    // picks, given the values picked before it.
    let (interval, scrape) = (2.0_f64, 2.0_f64);
    let rate_interval = (interval + scrape).max(4.0 * scrape);
    let range = (end - start).ceil();
    let mut picked: BTreeMap<String, String> = [
        ("__interval", format!("{interval}s")),
        ("__interval_ms", format!("{}", interval * 1000.0)),
        // Grafana's: max($__interval + scrape interval, 4 * scrape interval), with the
        // environment's scrape interval.
        ("__rate_interval", format!("{rate_interval}s")),
        ("__range", format!("{range}s")),
        ("__range_s", format!("{range}")),
        ("__range_ms", format!("{}", range as u64 * 1000)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut all = picked.clone();
    let choices = [
        ("job", job.as_str()),
        ("instance", addr.as_str()),
        ("namespace", ns.name.as_str()),
        ("run", name),
    ];
    let mut queries = 0;
    for (var, choice) in choices {
        let (selector, label) = variable_query(vars[var]);
        let data = prometheus(
            &env,
            &format!("/api/v1/label/{label}/values"),
            &[
                ("match[]", substitute(&selector, &picked)),
                ("start", format!("{start:.3}")),
                ("end", format!("{end:.3}")),
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("variable {var}: {e}"));
        queries += 1;
        let values: Vec<&str> = data
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|v| v.as_str())
            .collect();
        assert!(
            values.contains(&choice),
            "variable {var}: {values:?} has no {choice}"
        );
        picked.insert(var.to_string(), regex_value(&[choice]));
        all.insert(var.to_string(), ".*".to_string());
    }

    // Every query of every panel, over the whole run, for this run and for all.
    let mut failures = Vec::new();
    let (mut nonzero, mut excused) = (0, Vec::new());
    for target in &targets {
        let expr = substitute(&target.expr, &picked);
        let seen = query_range(&env, &expr, start, end).await;
        queries += 1;
        if let Err(why) = judge(target, &seen) {
            failures.push(format!(
                "{} {}: {why}\n    {expr}",
                target.panel, target.ref_id
            ));
        } else if seen.as_ref().is_ok_and(|s| s.nonzero) {
            nonzero += 1;
        } else {
            excused.push(format!("{} {}", target.panel, target.ref_id));
        }
        let every = substitute(&target.expr, &all);
        let seen_all = query_range(&env, &every, start, end).await;
        queries += 1;
        match (&seen, &seen_all) {
            (_, Err(e)) => failures.push(format!(
                "{} {} (All): refused: {e}",
                target.panel, target.ref_id
            )),
            (Ok(one), Ok(every)) if one.samples > 0 && every.samples == 0 => {
                failures.push(format!("{} {} (All): no data", target.panel, target.ref_id))
            }
            _ => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} queries failed:\n{}",
        failures.len(),
        targets.len(),
        failures.join("\n")
    );

    // A misspelt metric returns nothing, which the test calls a failure.
    let misspelt = Target {
        panel: "misspelt".into(),
        ref_id: "A".into(),
        expr: substitute(
            &targets[0]
                .expr
                .replace("imagebuild_run_", "imagebuild_runs_"),
            &picked,
        ),
    };
    let seen = query_range(&env, &misspelt.expr, start, end).await;
    queries += 1;
    assert_eq!(
        judge(&misspelt, &seen),
        Err("no data".to_string()),
        "{}",
        misspelt.expr
    );

    // At the end the panels show what the run did.
    let expr_of = |panel: &str| {
        let t = targets.iter().find(|t| t.panel == panel).unwrap();
        substitute(&t.expr, &picked)
    };
    let of = |pairs: &[(&str, f64)]| -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };
    let checks = [
        (
            "Runs by phase",
            vec!["phase"],
            of(&[("PartiallySucceeded", 1.0)]),
        ),
        (
            "Progress",
            vec!["namespace", "run"],
            of(&[(format!("{} {name}", ns.name).as_str(), 1.0)]),
        ),
        (
            "Failures by class, run totals",
            vec!["class"],
            of(&[("BuildError", 1.0), ("RegistryThrottled", 1.0)]),
        ),
        (
            "Retries by class, run totals",
            vec!["class"],
            of(&[("RegistryThrottled", 1.0)]),
        ),
        (
            "Skips by phase and reason, run totals",
            vec!["phase", "reason"],
            of(&[("assembly remote_exists", 1.0), ("base not_needed", 1.0)]),
        ),
        ("Leader", vec!["instance"], of(&[(addr.as_str(), 1.0)])),
    ];
    for (panel, labels, expected) in checks {
        let got = instant(&env, &expr_of(panel), end, &labels).await;
        queries += 1;
        assert_eq!(got, expected, "{panel}");
    }
    let phases = instant(&env, &expr_of("Run details"), end, &["phase"]).await;
    assert_eq!(phases.keys().collect::<Vec<_>>(), ["PartiallySucceeded"]);
    // The registry found one image (the assembly pushed before) and missed the others.
    let codes = instant(
        &env,
        &expr_of("Registry checks by code, run totals"),
        end,
        &["code"],
    )
    .await;
    assert_eq!(
        codes.keys().collect::<Vec<_>>(),
        ["200", "404"],
        "{codes:?}"
    );
    assert!(codes["404"] >= 11.0, "{codes:?}");
    queries += 2;

    let panels = panels(&dashboard)
        .iter()
        .filter(|p| p["type"] != "row")
        .count();
    println!(
        "{panels} panels, {} queries: {nonzero} showed data, {} excused at zero or empty \
         ({}); {queries} requests to Prometheus in all (the run took {run_seconds:.1} s; \
         the test {:.1} s)",
        targets.len(),
        excused.len(),
        excused.join(", "),
        began.elapsed().as_secs_f64()
    );
    drop(operator);
    ns.delete().await;
}
