//! The registries and Prometheus of the local environment are real: an image pushed is
//! found by a manifest HEAD (anonymously, and with credentials where they are required),
//! and Prometheus scrapes what it is pointed at and answers queries about it.
//!
//! Needs `e2e/cluster up`; run with `e2e/cluster test`.

mod common;

use std::time::Duration;

use common::cluster::{Env, eventually, install_crypto_provider};
use common::oci::{oci, pushed_digest, reference, tiny_image};
use common::prometheus::query;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;

const WAIT: Duration = Duration::from_secs(60);

/// A 401, whichever request of the client's flow met it.
fn unauthorized(err: &OciDistributionError) -> bool {
    match err {
        OciDistributionError::UnauthorizedError { .. } => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| e.code == OciErrorCode::Unauthorized),
        OciDistributionError::ServerError { code, .. } => *code == 401,
        _ => false,
    }
}

#[tokio::test]
async fn anonymous_registry_push_then_manifest_head() {
    let env = Env::get();
    let _logs = env.logs_on_failure();
    let client = oci();
    let tag = format!("t{:08x}", rand::random::<u32>());
    let image = reference(&env.registry, "e2e/eval-base", &tag);
    let digest = pushed_digest(&client, &image, &RegistryAuth::Anonymous).await;

    let found = client
        .fetch_manifest_digest(&image, &RegistryAuth::Anonymous)
        .await
        .unwrap();
    assert_eq!(found, digest);

    let missing = reference(&env.registry, "e2e/eval-base", &format!("{tag}-missing"));
    let err = client
        .fetch_manifest_digest(&missing, &RegistryAuth::Anonymous)
        .await
        .unwrap_err();
    let manifest_unknown = matches!(&err, OciDistributionError::RegistryError { envelope, .. }
        if envelope.errors.iter().any(|e| e.code == OciErrorCode::ManifestUnknown));
    assert!(manifest_unknown, "{err}");
}

#[tokio::test]
async fn authenticated_registry_needs_its_credentials() {
    let env = Env::get();
    let _logs = env.logs_on_failure();
    let auth = RegistryAuth::Basic(env.auth_user.clone(), env.auth_password.clone());
    let tag = format!("t{:08x}", rand::random::<u32>());
    let image = reference(&env.auth_registry, "e2e/eval-agent", &tag);

    let (layers, config) = tiny_image();
    let Err(err) = oci()
        .push(&image, &layers, config, &RegistryAuth::Anonymous, None)
        .await
    else {
        panic!("anonymous push to the authenticated registry succeeded");
    };
    assert!(unauthorized(&err), "{err}");

    let digest = pushed_digest(&oci(), &image, &auth).await;
    assert_eq!(
        oci().fetch_manifest_digest(&image, &auth).await.unwrap(),
        digest
    );

    for wrong in [
        RegistryAuth::Anonymous,
        RegistryAuth::Basic(env.auth_user.clone(), "not-the-password".into()),
    ] {
        let err = oci()
            .fetch_manifest_digest(&image, &wrong)
            .await
            .unwrap_err();
        assert!(unauthorized(&err), "{wrong:?}: {err}");
    }
}

/// Instant-query result of Prometheus as (labels, value) pairs.
#[tokio::test]
async fn prometheus_scrapes_a_target_and_answers_a_query() {
    let env = Env::get();
    let _logs = env.logs_on_failure();
    install_crypto_provider();

    // A target of this test's own, added the way the operator's target is configured.
    let token = format!("{:08x}", rand::random::<u32>());
    let page = format!(
        "# TYPE imagebuild_e2e_probe gauge\nimagebuild_e2e_probe{{token=\"{token}\"}} 42\n"
    );
    let app =
        axum::Router::new().route("/metrics", axum::routing::get(move || async move { page }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let target = env.prometheus_targets.join(format!("e2e-{token}.json"));
    std::fs::write(&target, format!(r#"[{{"targets":["{addr}"]}}]"#)).unwrap();

    let promql = format!("imagebuild_e2e_probe{{token=\"{token}\"}}");
    let result = eventually(WAIT, "Prometheus to scrape the probe", || async {
        let result = query(&env, &promql).await;
        (!result.is_empty()).then_some(result)
    })
    .await;
    std::fs::remove_file(&target).unwrap();
    assert_eq!(result.len(), 1);
    let (labels, value) = &result[0];
    assert_eq!(value, "42");
    assert_eq!(labels["job"], "imagebuild-operator");
    assert_eq!(labels["instance"], addr.to_string());

    // The operator's own metrics address is a target of the same job, up or not.
    let operator = query(
        &env,
        &format!(
            "up{{job=\"imagebuild-operator\",instance=\"{}\"}}",
            env.metrics_addr
        ),
    )
    .await;
    assert_eq!(
        operator.len(),
        1,
        "no scrape target for the operator at {}",
        env.metrics_addr
    );
}

#[test]
fn promtool_accepts_the_environment_prometheus_config() {
    let env = Env::get();
    let config = env.dir.join("prometheus/prometheus.yml");
    let out = std::process::Command::new("promtool")
        .args(["check", "config"])
        .arg(&config)
        .output()
        .expect("promtool (Debian package prometheus) is installed by `e2e/cluster up`");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("SUCCESS"), "{stdout}");
}
