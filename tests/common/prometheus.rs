//! Reading metrics: the operator's `/metrics` page (parsed with prometheus-parse) and
//! the environment's Prometheus (queries, alerts, rule reloads).

use prometheus_parse::{Sample, Scrape, Value};

use super::cluster::Env;
use super::tool;

/// The chart whose PrometheusRule holds the alerts.
pub const CHART: &str = "charts/imagebuild-operator";

/// The samples of the page at `http://{addr}/metrics`.
pub async fn scrape(addr: &str) -> Vec<Sample> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("the operator's metrics endpoint answers")
        .error_for_status()
        .unwrap()
        .text()
        .await
        .unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap()
        .samples
}

/// The value of a counter, gauge or untyped sample.
pub fn number(sample: &Sample) -> f64 {
    match sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        _ => panic!("{} is not a number", sample.metric),
    }
}

/// The samples of `metric` whose labels include `labels`.
pub fn matching<'a>(
    samples: &'a [Sample],
    metric: &str,
    labels: &[(&str, &str)],
) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect()
}

/// The sum of the samples of `metric` whose labels include `labels`; `None` if there
/// are none.
pub fn sum(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found = matching(samples, metric, labels);
    (!found.is_empty()).then(|| found.iter().map(|s| number(s)).sum())
}

/// The `data` of a successful answer of Prometheus' HTTP API at `path` with `params`.
async fn api(env: &Env, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
    let body: serde_json::Value = reqwest::Client::new()
        .get(format!("{}{path}", env.prometheus))
        .query(params)
        .send()
        .await
        .expect("Prometheus answers")
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "success", "{body}");
    body["data"].clone()
}

/// The result of an instant query: each series' labels and value.
pub async fn query(env: &Env, promql: &str) -> Vec<(serde_json::Value, String)> {
    let data = api(env, "/api/v1/query", &[("query", promql)]).await;
    data["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["metric"].clone(),
                r["value"][1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every alert Prometheus holds, pending or firing (its alerts API).
pub async fn alerts(env: &Env) -> Vec<serde_json::Value> {
    let data = api(env, "/api/v1/alerts", &[]).await;
    data["alerts"].as_array().cloned().unwrap_or_default()
}

/// The names of the alerting rules Prometheus has loaded.
pub async fn alert_rules(env: &Env) -> Vec<String> {
    let data = api(env, "/api/v1/rules", &[("type", "alert")]).await;
    data["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["name"].as_str().map(str::to_string))
        .collect()
}

/// Asks Prometheus to read its configuration and rule files again.
pub async fn reload(env: &Env) {
    let answer = reqwest::Client::new()
        .post(format!("{}/-/reload", env.prometheus))
        .send()
        .await
        .expect("Prometheus answers");
    assert!(answer.status().is_success(), "reload: {}", answer.status());
}

/// The chart's rule groups as a plain rule file, rendered with `sets` (helm `--set`).
pub fn rendered_rules(sets: &[&str]) -> String {
    let mut args = vec![
        "template",
        "imagebuild-operator",
        CHART,
        "--show-only",
        "templates/prometheusrule.yaml",
        "--api-versions",
        "monitoring.coreos.com/v1/PrometheusRule",
        "--set",
        "prometheusRule.enabled=true",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    let manifest = tool("helm", &args);
    let spec = manifest
        .split_once("\nspec:\n")
        .expect("the PrometheusRule has a spec")
        .1;
    let mut rules = String::from(
        "# Generated from the chart's PrometheusRule (charts/imagebuild-operator) with its\n\
         # default values: change the chart, then run UPDATE_GOLDEN=1 cargo test --test alerts.\n",
    );
    for line in spec.lines() {
        rules.push_str(line.strip_prefix("  ").unwrap_or(line));
        rules.push('\n');
    }
    rules
}
