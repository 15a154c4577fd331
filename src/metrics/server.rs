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

/// Asks the API server for its version every [`READY_INTERVAL`] and records the answer in
/// `health` and the `imagebuild_ready` gauge; runs until the process ends.
pub async fn watch_readiness(client: kube::Client, health: Arc<Health>, metrics: Arc<Metrics>) {
    loop {
        let reachable = matches!(
            tokio::time::timeout(API_TIMEOUT, client.apiserver_version()).await,
            Ok(Ok(_))
        );
        if reachable != health.api.swap(reachable, Ordering::SeqCst) {
            tracing::info!(reachable, "Kubernetes API server reachability changed");
        }
        metrics.set_ready(health.ready());
        tokio::time::sleep(READY_INTERVAL).await;
    }
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
