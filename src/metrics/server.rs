//! The operator's HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` (the
//! process answers) and `/readyz` (watches synced and the API server reachable), on one
//! address, shut down with the operator.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use super::Metrics;

/// How often readiness is evaluated.
pub const READY_INTERVAL: Duration = Duration::from_secs(5);
/// How long the API server may take to answer the readiness check.
const API_TIMEOUT: Duration = Duration::from_secs(3);

/// What `/readyz` reports, kept current by [`watch_readiness`].
#[derive(Default)]
pub struct Health {
    synced: AtomicBool,
    standby: AtomicBool,
    api: AtomicBool,
}

impl Health {
    /// The watches have listed everything once.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::SeqCst);
    }

    /// A candidate waiting for the lease (ready to take over), or not (leading).
    pub fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::SeqCst);
    }

    /// Ready: synced (or standing by for the lease) and the API server answered the
    /// last check.
    pub fn ready(&self) -> bool {
        (self.synced.load(Ordering::SeqCst) || self.standby.load(Ordering::SeqCst))
            && self.api.load(Ordering::SeqCst)
    }

    fn why_not(&self) -> &'static str {
        if !self.api.load(Ordering::SeqCst) {
            "the Kubernetes API server did not answer"
        } else {
            "watches not synced yet"
        }
    }
}

/// Every [`READY_INTERVAL`], checks that the API server is reachable and records it in
/// `health` and the `imagebuild_ready` gauge; runs until the process ends.
pub async fn watch_readiness(client: kube::Client, health: Arc<Health>, metrics: Arc<Metrics>) {
    loop {
        check_readiness(&client, &health, &metrics).await;
        tokio::time::sleep(READY_INTERVAL).await;
    }
}

/// One check: the API server is reachable if it answered one of the operator's requests
/// within the last [`READY_INTERVAL`] (a busy operator's checks then cost no request), or
/// else if it tells its version within [`API_TIMEOUT`].
async fn check_readiness(client: &kube::Client, health: &Health, metrics: &Metrics) {
    let reachable = metrics.api_answered_within(READY_INTERVAL)
        || matches!(
            tokio::time::timeout(API_TIMEOUT, client.apiserver_version()).await,
            Ok(Ok(_))
        );
    if reachable != health.api.swap(reachable, Ordering::SeqCst) {
        tracing::info!(reachable, "Kubernetes API server reachability changed");
    }
    metrics.set_ready(health.ready());
}

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        s.metrics.gather().await,
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Shared>) -> (StatusCode, String) {
    if s.health.ready() && s.health.standby.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok (standing by for the lease)\n".into())
    } else if s.health.ready() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", s.health.why_not()),
        )
    }
}

/// Binds `address`; the error says which address could not be bound.
pub async fn bind(address: &str) -> Result<TcpListener, String> {
    TcpListener::bind(address)
        .await
        .map_err(|e| format!("cannot listen on {address} for metrics and probes: {e}"))
}

/// Serves the endpoints on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Shared { metrics, health });
    let address: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(
        address = %address.map(|a| a.to_string()).unwrap_or_default(),
        "serving /metrics, /healthz and /readyz"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http::{Request, Response};
    use kube::client::Body;
    use tower::Layer;

    use super::*;
    use crate::metrics::api::CountRequests;

    /// A client through the operator's counting layer to an API server that answers
    /// `/version` with `version` (200) and everything else 404; counts the version asks.
    fn client(metrics: &Arc<Metrics>, version: u16) -> (kube::Client, Arc<AtomicUsize>) {
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let server = tower::service_fn(move |request: Request<Body>| {
            let code = if request.uri().path() == "/version" {
                counter.fetch_add(1, Ordering::SeqCst);
                version
            } else {
                404
            };
            let body = serde_json::json!({"major": "1", "minor": "37", "gitVersion": "v1.37.2",
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code});
            async move {
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
            }
        });
        let service = CountRequests(metrics.clone()).layer(server);
        (kube::Client::new(service, "ns"), asked)
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_asks_the_api_server_only_when_no_request_was_answered_lately() {
        let metrics = Arc::new(Metrics::new());
        let health = Health::default();
        health.set_synced();
        let (client, asked) = client(&metrics, 200);
        // Nothing answered yet: it asks, and the answer makes it ready.
        check_readiness(&client, &health, &metrics).await;
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        assert!(health.ready());
        // That answer is recent: the next check takes it.
        tokio::time::advance(READY_INTERVAL / 2).await;
        check_readiness(&client, &health, &metrics).await;
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // Any answer below 500 counts (a 404 is an answer), as long as it is recent.
        tokio::time::advance(READY_INTERVAL).await;
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::all(client.clone());
        pods.get("x").await.unwrap_err();
        check_readiness(&client, &health, &metrics).await;
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        // Past the interval, it asks again.
        tokio::time::advance(READY_INTERVAL + Duration::from_millis(1)).await;
        check_readiness(&client, &health, &metrics).await;
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        assert!(health.ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_error_is_no_sign_of_a_reachable_api_server() {
        let metrics = Arc::new(Metrics::new());
        let health = Health::default();
        health.set_synced();
        let (client, asked) = client(&metrics, 503);
        check_readiness(&client, &health, &metrics).await;
        assert!(!health.ready());
        // Its own 503 answered the last check, and does not stand for the next.
        check_readiness(&client, &health, &metrics).await;
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        assert!(!health.ready());
    }
}
