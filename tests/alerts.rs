//! The alert rules: the chart's PrometheusRule is the source; prometheus/alerts.yml is its
//! `spec` rendered with the default values (rewritten with
//! `UPDATE_GOLDEN=1 cargo test --test alerts`); promtool checks the rules and runs
//! prometheus/alerts_test.yml, which holds, for every alert, series that fire it and a
//! near miss that does not.
//!
//! Needs helm and promtool, which `e2e/cluster up` provides; run with `e2e/cluster test`.

mod common;

use std::path::Path;

use common::prometheus::rendered_rules;
use common::tool;
use serde_yaml_ng::Value;

const RULES: &str = "prometheus/alerts.yml";
const RULE_TESTS: &str = "prometheus/alerts_test.yml";

#[test]
fn the_plain_rule_file_is_the_charts_prometheus_rule() {
    let rules = rendered_rules(&[]);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(RULES, &rules).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(RULES).unwrap();
    assert!(
        committed == rules,
        "{RULES} differs from the chart's PrometheusRule: run UPDATE_GOLDEN=1 cargo test --test alerts"
    );
}

#[test]
fn promtool_checks_the_rules_and_every_alert_fires_and_has_a_near_miss() {
    let checked = tool("promtool", &["check", "rules", RULES]);
    assert!(checked.contains("SUCCESS: 12 rules found"), "{checked}");
    let tested = tool("promtool", &["test", "rules", RULE_TESTS]);
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Every alert has a test that expects it firing, and a near miss: a case where it
    // is expected quiet, or series of another run (instance, kind) in the same test
    // that promtool then checks do not fire.
    let alerts: Vec<String> = std::fs::read_to_string(RULES)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: ").map(str::to_string))
        .collect();
    assert_eq!(alerts.len(), 12);
    let tests: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(RULE_TESTS).unwrap()).unwrap();
    let runbook = std::fs::read_to_string("docs/runbooks.md").unwrap();
    for alert in &alerts {
        let (mut fires, mut near_miss) = (false, false);
        for test in tests["tests"].as_sequence().unwrap() {
            let cases: Vec<&Value> = test["alert_rule_test"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter(|c| c["alertname"].as_str() == Some(alert.as_str()))
                .collect();
            let expected: Vec<&Value> = cases
                .iter()
                .flat_map(|c| c["exp_alerts"].as_sequence().into_iter().flatten())
                .collect();
            fires |= !expected.is_empty();
            near_miss |= cases
                .iter()
                .any(|c| c["exp_alerts"].as_sequence().is_none_or(|a| a.is_empty()));
            if expected.is_empty() {
                continue;
            }
            // Subjects named in the input series but in no expected alert.
            let subjects = |text: &str| -> Vec<String> {
                let mut found = Vec::new();
                for k in ["run", "instance", "kind"] {
                    let key = format!("{k}=\"");
                    for rest in text.split(key.as_str()).skip(1) {
                        if let Some(v) = rest.split('"').next() {
                            found.push(format!("{k}={v}"));
                        }
                    }
                }
                found
            };
            let fired: Vec<String> = expected
                .iter()
                .flat_map(|e| {
                    ["run", "instance", "kind"]
                        .iter()
                        .filter_map(|k| e["exp_labels"][*k].as_str().map(|v| format!("{k}={v}")))
                })
                .collect();
            near_miss |= test["input_series"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|s| s["series"].as_str())
                .flat_map(subjects)
                .any(|s| !fired.contains(&s));
        }
        assert!(fires, "no promtool test expects {alert} to fire");
        assert!(near_miss, "no promtool test has a near miss of {alert}");
        assert!(
            runbook.contains(&format!("## {alert}")),
            "docs/runbooks.md has no section for {alert}"
        );
    }
    assert!(Path::new(RULE_TESTS).exists());
}

#[test]
fn thresholds_and_durations_come_from_the_values() {
    let rules = rendered_rules(&[
        "alerts.runStuck.noProgressSeconds=42",
        "alerts.runStuck.for=7s",
        "alerts.retryStorm.enabled=false",
        "alerts.labels.team=evals",
    ]);
    let stuck = rules
        .split("- alert: ")
        .find(|r| r.starts_with("ImageBuildRunStuck"))
        .unwrap();
    assert!(
        stuck.contains("imagebuild_run_last_progress_timestamp_seconds) > 42\n"),
        "{stuck}"
    );
    assert!(stuck.contains("for: 7s"), "{stuck}");
    assert!(stuck.contains("team: evals"), "{stuck}");
    assert!(!rules.contains("ImageBuildRunRetryStorm"));
}
