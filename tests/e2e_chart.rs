//! The Helm chart against the real control plane: it lints and renders with the defaults
//! and with every toggle on, and the API server accepts every object (server-side
//! dry-run, with the Prometheus operator's CRDs installed); installed, its ServiceAccount
//! has exactly the permissions a whole run needs (the operator runs out of cluster with a
//! token of it) and no others; upgrade and uninstall leave no stray objects, and the CRD
//! stays.
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cluster::{Operator, TestNamespace, install_crypto_provider, setup, token_kubeconfig};
use common::runs::{await_phase, swebench_ids, swebench_run};
use common::tool;
use imagebuild_operator::api::{ConfigMapKeyRef, ImageBuildRun, RunPhase, SecretRef};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};

const CHART: &str = "charts/imagebuild-operator";

/// `helm template` flags for a cluster with the Prometheus operator's CRDs.
const MONITORING_API_VERSIONS: [&str; 4] = [
    "--api-versions",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "--api-versions",
    "monitoring.coreos.com/v1/PrometheusRule",
];

/// Every toggle of the chart on, for a release in `ns` watching `watched`.
fn all_toggles(watched: &str) -> Vec<String> {
    [
        "serviceMonitor.enabled=true",
        "prometheusRule.enabled=true",
        "networkPolicy.enabled=true",
        "podDisruptionBudget.enabled=true",
        "maxTotalWorkers=50",
        "logFormat=text",
        "replicaCount=2",
        "leaderElection.enabled=true",
        // A pod label, and one the selector's labels win over (the API server refuses a
        // Deployment whose selector misses its pods).
        "podLabels.team=builds",
        "podLabels.app\\.kubernetes\\.io/name=other",
        // A decimal, which --set passes as a string.
        "alerts.failureRatio.ratio=0.3",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("watchNamespaces={{{watched}}}")])
    .collect()
}

fn with_sets<'a>(mut args: Vec<&'a str>, sets: &'a [String]) -> Vec<&'a str> {
    for set in sets {
        args.extend(["--set", set.as_str()]);
    }
    args
}

/// The Prometheus operator's CRDs, which `e2e/cluster up` fetched.
fn install_prometheus_operator_crds() {
    let dir = std::env::var("IMAGEBUILD_PROMETHEUS_OPERATOR_CRDS")
        .expect("IMAGEBUILD_PROMETHEUS_OPERATOR_CRDS: run the suite with `e2e/cluster test`");
    tool(
        "kubectl",
        &["apply", "--server-side", "--force-conflicts", "-f", &dir],
    );
    tool(
        "kubectl",
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
        ],
    );
}

#[tokio::test]
async fn the_chart_lints_renders_and_every_object_is_accepted() {
    let (_env, _logs, ns) = setup("e2e-chart").await;
    install_prometheus_operator_crds();
    let toggles = all_toggles(&ns.name);
    for sets in [vec![], toggles.clone()] {
        let lint = tool("helm", &with_sets(vec!["lint", "--strict", CHART], &sets));
        assert!(lint.contains("0 chart(s) failed"), "{lint}");
        let template = vec!["template", "imagebuild", CHART, "--namespace", &ns.name];
        if !sets.is_empty() {
            // Without the Prometheus operator's CRDs, its objects are left out.
            let without = tool("helm", &with_sets(template.clone(), &sets));
            assert!(!without.contains("kind: ServiceMonitor"), "{without}");
            assert!(!without.contains("kind: PrometheusRule"), "{without}");
        }
        let rendered = tool(
            "helm",
            &with_sets([template, MONITORING_API_VERSIONS.to_vec()].concat(), &sets),
        );
        operator_accepts_the_deployments_arguments(&rendered);
        let file = std::env::temp_dir().join(format!("chart-{}.yaml", ns.name));
        std::fs::write(&file, &rendered).unwrap();
        let applied = tool(
            "kubectl",
            &["apply", "--dry-run=server", "-f", file.to_str().unwrap()],
        );
        let kinds: Vec<&str> = applied
            .lines()
            .filter_map(|l| l.split('/').next())
            .collect();
        let expected: &[&str] = if sets.is_empty() {
            &[
                "serviceaccount",
                "clusterrole.rbac.authorization.k8s.io",
                "clusterrolebinding.rbac.authorization.k8s.io",
                "service",
                "deployment.apps",
            ]
        } else {
            &[
                "serviceaccount",
                "role.rbac.authorization.k8s.io",
                "rolebinding.rbac.authorization.k8s.io",
                // The Lease's Role and RoleBinding.
                "role.rbac.authorization.k8s.io",
                "rolebinding.rbac.authorization.k8s.io",
                "service",
                "deployment.apps",
                "networkpolicy.networking.k8s.io",
                "poddisruptionbudget.policy",
                "lease.coordination.k8s.io",
                "prometheusrule.monitoring.coreos.com",
                "servicemonitor.monitoring.coreos.com",
            ]
        };
        for kind in expected {
            assert!(kinds.contains(kind), "{kind} not applied:\n{applied}");
        }
        assert_eq!(kinds.len(), expected.len(), "{applied}");
        if sets.is_empty() {
            assert!(!rendered.contains("kind: PrometheusRule"));
        } else {
            assert!(rendered.contains(&format!("--namespace={}", ns.name)));
            // Run series keep their own `namespace` label (not exported_namespace).
            assert!(rendered.contains("honorLabels: true"), "{rendered}");
            assert!(rendered.contains("--max-total-workers=50"));
            assert!(rendered.contains("--leader-election"));
            assert!(rendered.contains("team: builds"));
            assert!(rendered.contains(") > 0.3\n"), "{rendered}");
            assert!(!rendered.contains("name: other"));
        }
    }

    // The values schema refuses two replicas without leader election, a misspelt alert
    // threshold and a malformed `for:`, each with the offending path.
    for (set, path) in [
        ("replicaCount=2", "/leaderElection/enabled"),
        ("alerts.runStuck.noProgresSeconds=60", "noProgresSeconds"),
        ("alerts.runStuck.for=5 minutes", "/alerts/runStuck/for"),
        ("alerts.runStuck.for=30m1h", "/alerts/runStuck/for"),
        ("registryStallTimeout=30 seconds", "/registryStallTimeout"),
        (
            "alerts.failureRatio.ratio=1.5",
            "/alerts/failureRatio/ratio",
        ),
    ] {
        let out = std::process::Command::new("helm")
            .args(["template", "x", CHART, "--set", set])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(path), "{set}: {err}");
    }
}

/// The operator's own flag parser takes the arguments the rendered Deployment gives it.
fn operator_accepts_the_deployments_arguments(rendered: &str) {
    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        options: imagebuild_operator::operator::Options,
    }
    let deployment: Deployment = rendered
        .split("\n---")
        .filter_map(|doc| serde_yaml_ng::from_str::<serde_yaml_ng::Value>(doc).ok())
        .find(|doc| doc["kind"].as_str() == Some("Deployment"))
        .map(|doc| serde_yaml_ng::from_value(doc).unwrap())
        .expect("a Deployment");
    let spec = deployment.spec.unwrap().template.spec.unwrap();
    let args = spec.containers[0].args.clone().unwrap();
    assert_eq!(args[0], "run", "{args:?}");
    let parsed = <Run as clap::Parser>::try_parse_from(&args);
    let run = parsed.unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert_eq!(run.options.registry_stall_timeout, Duration::from_secs(30));
}

async fn client_from(path: &Path) -> Client {
    install_crypto_provider();
    let kubeconfig = kube::config::Kubeconfig::read_from(path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// Objects of the release, namespaced ones in `ns`, as `kind/name`.
fn release_objects(release: &str, ns: &str) -> Vec<String> {
    let selector = format!("app.kubernetes.io/instance={release}");
    let namespaced = tool(
        "kubectl",
        &[
            "get",
            "deployments,services,serviceaccounts,roles,rolebindings,configmaps,networkpolicies,poddisruptionbudgets,leases,servicemonitors,prometheusrules",
            "-n",
            ns,
            "-l",
            &selector,
            "-o",
            "name",
        ],
    );
    let cluster = tool(
        "kubectl",
        &[
            "get",
            "clusterroles,clusterrolebindings",
            "-l",
            &selector,
            "-o",
            "name",
        ],
    );
    let releases = tool(
        "kubectl",
        &[
            "get",
            "secrets",
            "-n",
            ns,
            "-l",
            &format!("owner=helm,name={release}"),
            "-o",
            "name",
        ],
    );
    namespaced
        .lines()
        .chain(cluster.lines())
        .chain(releases.lines())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn installed_its_service_account_runs_a_whole_run_and_nothing_else() {
    let (env, _logs, system) = setup("e2e-helm").await;
    let client = env.client().await;
    let work = TestNamespace::create(&client, "e2e-helm-runs").await;
    let release = format!("ibo-{}", &system.name[system.name.len() - 6..]);
    install_prometheus_operator_crds();

    let installed = tool(
        "helm",
        &[
            "install",
            &release,
            CHART,
            "--namespace",
            &system.name,
            "--wait=false",
            "--set",
            "leaderElection.enabled=true",
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "prometheusRule.enabled=true",
        ],
    );
    assert!(!installed.contains("NOT CREATED"), "{installed}");
    let kinds = |objects: &[String]| -> BTreeSet<String> {
        let kinds = objects.iter().map(|o| o.split('/').next().unwrap());
        kinds.map(str::to_string).collect()
    };
    let before = release_objects(&release, &system.name);
    let expected = [
        "clusterrole.rbac.authorization.k8s.io",
        "clusterrolebinding.rbac.authorization.k8s.io",
        "deployment.apps",
        "lease.coordination.k8s.io",
        "prometheusrule.monitoring.coreos.com",
        // The Lease's.
        "role.rbac.authorization.k8s.io",
        "rolebinding.rbac.authorization.k8s.io",
        "secret",
        "service",
        "serviceaccount",
        "servicemonitor.monitoring.coreos.com",
    ];
    assert_eq!(
        kinds(&before),
        expected.map(String::from).into(),
        "{before:?}"
    );
    let sa = format!("{release}-imagebuild-operator");
    // The operator-down alert looks for the job the ServiceMonitor makes: the Service's
    // name.
    let rule = tool(
        "kubectl",
        &["get", "prometheusrules", "-n", &system.name, "-o", "yaml"],
    );
    assert!(rule.contains(&format!("up{{job=\"{sa}\"}} == 0")), "{rule}");
    let token = tool(
        "kubectl",
        &[
            "create",
            "token",
            &sa,
            "-n",
            &system.name,
            "--duration",
            "1h",
        ],
    );
    let kubeconfig: PathBuf = std::env::temp_dir().join(format!("{release}.kubeconfig"));
    token_kubeconfig(token.trim(), &kubeconfig);

    // The ServiceAccount may do what the operator does, and nothing more.
    let who = format!("system:serviceaccount:{}:{sa}", system.name);
    let can = |verb: &str, resource: &str| {
        let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
        std::process::Command::new("kubectl")
            .args([
                "auth", "can-i", verb, resource, "-n", &work.name, "--as", &who,
            ])
            .args((!sub.is_empty()).then(|| format!("--subresource={sub}")))
            .output()
            .unwrap()
            .status
            .success()
    };
    let allowed = [
        ("watch", "imagebuildruns.imagebuild.dev"),
        ("patch", "imagebuildruns.imagebuild.dev/status"),
        ("create", "jobs.batch"),
        ("delete", "jobs.batch"),
        ("watch", "pods"),
        ("update", "configmaps"),
        ("create", "events.events.k8s.io"),
        ("get", "secrets"),
    ];
    let refused = [
        ("patch", "imagebuildruns.imagebuild.dev"),
        ("delete", "imagebuildruns.imagebuild.dev"),
        ("update", "jobs.batch"),
        ("create", "pods"),
        ("delete", "pods"),
        ("list", "secrets"),
        ("create", "secrets"),
        ("create", "deployments.apps"),
        ("get", "nodes"),
        ("create", "leases.coordination.k8s.io"),
    ];
    for (verb, resource) in allowed {
        assert!(can(verb, resource), "{sa} cannot {verb} {resource}");
    }
    for (verb, resource) in refused {
        assert!(!can(verb, resource), "{sa} may {verb} {resource}");
    }

    // A whole run, with only the chart's permissions: leader election on the chart's
    // Lease, the instance list from a ConfigMap, registry checks with a push Secret.
    let cms: Api<ConfigMap> = work.api();
    let ids = swebench_ids(4);
    let list: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ids"},
        "data": {"ids.txt": ids.join("\n")}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &list).await.unwrap();
    let dockerconfig = std::fs::read(&env.auth_dockerconfig).unwrap();
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("push".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(
            [(".dockerconfigjson".to_string(), ByteString(dockerconfig))]
                .into_iter()
                .collect(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &work.name)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let lease = format!("--lease-name={release}-imagebuild-operator");
    let operator = Operator::start_as(
        &work.name,
        &[
            "--leader-election",
            "--lease-namespace",
            &system.name,
            &lease,
        ],
        Some(&kubeconfig),
    );
    let runs: Api<ImageBuildRun> = work.api();
    let mut run = swebench_run("helm", &env.auth_registry, &work.name, &ids, 3);
    run.spec.instances.list = None;
    run.spec.instances.config_map = Some(ConfigMapKeyRef {
        name: "ids".into(),
        key: "ids.txt".into(),
    });
    run.spec.registry.push_secret_ref = Some(SecretRef {
        name: "push".into(),
    });
    runs.create(&PostParams::default(), &run).await.unwrap();
    let done = await_phase(&runs, "helm", RunPhase::Succeeded, Duration::from_secs(120)).await;
    let status = done.status.unwrap();
    assert_eq!(status.assemblies.succeeded, 4);
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(
        degraded.status, "False",
        "the registry checks worked: {degraded:?}"
    );
    let log = operator.log();
    assert!(!log.contains("forbidden"), "{log}");
    let held = tool(
        "kubectl",
        &[
            "get",
            "lease",
            &format!("{release}-imagebuild-operator"),
            "-n",
            &system.name,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    );
    assert!(!held.is_empty(), "the operator held the chart's Lease");
    drop(operator);

    // Anything else is refused.
    let limited = client_from(&kubeconfig).await;
    let deployments: Api<Deployment> = Api::namespaced(limited.clone(), &system.name);
    let refused = deployments
        .delete(
            &format!("{release}-imagebuild-operator"),
            &DeleteParams::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, kube::Error::Api(e) if e.code == 403),
        "{refused:?}"
    );
    let secrets: Api<Secret> = Api::namespaced(limited.clone(), &work.name);
    let listed = secrets.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(&listed, kube::Error::Api(e) if e.code == 403),
        "Secrets are read by name only: {listed:?}"
    );

    // An upgrade to one watched namespace swaps the ClusterRole for a Role there.
    let watched = format!("watchNamespaces={{{}}}", work.name);
    tool(
        "helm",
        &[
            "upgrade",
            &release,
            CHART,
            "--namespace",
            &system.name,
            "--set",
            &watched,
        ],
    );
    // What leader election and the monitoring toggles made is gone with them.
    let after = release_objects(&release, &system.name);
    let expected = ["deployment.apps", "secret", "service", "serviceaccount"];
    assert_eq!(
        kinds(&after),
        expected.map(String::from).into(),
        "{after:?}"
    );
    let roles = tool(
        "kubectl",
        &["get", "roles,rolebindings", "-n", &work.name, "-o", "name"],
    );
    assert_eq!(roles.lines().count(), 2, "{roles}");

    // Uninstall leaves nothing of the release, and keeps the CRD (and so the runs).
    tool(
        "helm",
        &["uninstall", &release, "--namespace", &system.name, "--wait"],
    );
    let left = release_objects(&release, &system.name);
    assert_eq!(left, Vec::<String>::new());
    let roles = tool(
        "kubectl",
        &["get", "roles,rolebindings", "-n", &work.name, "-o", "name"],
    );
    assert_eq!(roles.trim(), "", "{roles}");
    tool("kubectl", &["get", "crd", "imagebuildruns.imagebuild.dev"]);
    assert!(runs.get("helm").await.is_ok());
    let _ = std::fs::remove_file(kubeconfig);
}

/// The Grafana dashboard: off by default; on, a ConfigMap holding exactly the chart's
/// dashboard file, labelled for Grafana's dashboard sidecar (label, namespace, extra
/// labels and annotations as set), which the API server accepts; the values schema
/// refuses unknown keys and malformed labels.
#[tokio::test]
async fn the_dashboard_configmap_holds_the_dashboard_file() {
    let (_env, _logs, ns) = setup("e2e-chart-dashboard").await;
    let file =
        std::fs::read_to_string(format!("{CHART}/dashboards/imagebuild-operator.json")).unwrap();
    let default = tool("helm", &["template", "imagebuild", CHART]);
    assert!(!default.contains("kind: ConfigMap"), "{default}");

    let render = |sets: &[&str]| {
        let mut args = vec![
            "template",
            "imagebuild",
            CHART,
            "--namespace",
            "release",
            "--show-only",
            "templates/dashboard.yaml",
            "--set",
            "dashboard.enabled=true",
        ];
        for set in sets {
            args.extend(["--set", set]);
        }
        let lint = tool(
            "helm",
            &[&["lint", "--strict", CHART][..], &args[7..]].concat(),
        );
        assert!(lint.contains("0 chart(s) failed"), "{lint}");
        let rendered = tool("helm", &args);
        let cm: ConfigMap = serde_yaml_ng::from_str(&rendered).unwrap();
        (rendered, cm)
    };

    let (_, cm) = render(&[]);
    assert_eq!(cm.metadata.namespace.as_deref(), Some("release"));
    let labels = cm.metadata.labels.clone().unwrap();
    assert_eq!(
        labels.get("grafana_dashboard").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        labels.get("app.kubernetes.io/instance").map(String::as_str),
        Some("imagebuild")
    );
    assert_eq!(cm.metadata.annotations, None);
    let data = cm.data.unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(
        data["imagebuild-operator.json"], file,
        "the ConfigMap's JSON is the file, byte for byte"
    );

    let namespace = format!("dashboard.namespace={}", ns.name);
    let (rendered, cm) = render(&[
        &namespace,
        // A number, as --set passes it.
        "dashboard.labelValue=1",
        "dashboard.labels.team=builds",
        "dashboard.annotations.grafana_folder=Image builds",
    ]);
    assert_eq!(cm.metadata.namespace.as_deref(), Some(ns.name.as_str()));
    let labels = cm.metadata.labels.unwrap();
    assert_eq!(labels["grafana_dashboard"], "1");
    assert_eq!(labels["team"], "builds");
    assert_eq!(
        cm.metadata.annotations.unwrap()["grafana_folder"],
        "Image builds"
    );
    let (_, cm) = render(&[
        "dashboard.label=grafana.example.com/dashboard",
        "dashboard.labelValue=imagebuild",
    ]);
    let labels = cm.metadata.labels.unwrap();
    assert_eq!(labels["grafana.example.com/dashboard"], "imagebuild");
    assert!(!labels.contains_key("grafana_dashboard"));

    let path = std::env::temp_dir().join(format!("dashboard-{}.yaml", ns.name));
    std::fs::write(&path, &rendered).unwrap();
    let applied = tool(
        "kubectl",
        &["apply", "--dry-run=server", "-f", path.to_str().unwrap()],
    );
    assert_eq!(
        applied.trim(),
        "configmap/imagebuild-imagebuild-operator-dashboard created (server dry run)"
    );
    let _ = std::fs::remove_file(path);

    for (set, path) in [
        ("dashboard.folder=x", "/dashboard"),
        ("dashboard.label=a b", "/dashboard/label"),
        ("dashboard.namespace=Monitoring", "/dashboard/namespace"),
    ] {
        let out = std::process::Command::new("helm")
            .args(["template", "x", CHART, "--set", set])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(path), "{set}: {err}");
    }
    ns.delete().await;
}
