//! Leader election for more than one replica: a Lease held through kube-lease-manager
//! (server-side apply, so two candidates never both acquire it). Only the holder runs the
//! controller.
//!
//! Writes are fenced on a local deadline, not on news of a lost lease (which a failing
//! API server may never deliver): a watchdog reads the Lease often and, while it names
//! this candidate, allows writes until its last renewal + duration - grace / 2, on the
//! monotonic clock. The lease is renewed at renewal + duration - grace, so a healthy
//! leader never reaches the deadline, and one that failed to renew stops writing half a
//! grace period before anyone else may take the lease. [`FenceLayer`] refuses every
//! mutating request of the operator's client past that deadline, whatever task sends it,
//! so a paused or cut-off leader writes nothing once another may lead. Past the deadline
//! the process exits, to come back as a candidate. The lease itself is renewed by
//! kube-lease-manager on a client of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Method, Request};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::{Layer, Service};

/// How often the watchdog reads the Lease, at most.
const WATCHDOG: Duration = Duration::from_secs(1);

/// The Lease and this candidate.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This candidate's identity (the pod name).
    pub identity: String,
    /// Seconds a lease lasts unless renewed.
    pub duration: u64,
    /// Seconds before the end of the lease at which it is renewed; this candidate stops
    /// writing half of this before the end if it was not.
    pub grace: u64,
}

/// Until when this operator may write.
#[derive(Debug)]
pub struct Fence {
    /// Without leader election the fence is always open.
    elected: bool,
    origin: Instant,
    /// Milliseconds after `origin` up to which writes are allowed.
    until: AtomicU64,
}

impl Fence {
    /// A fence for an operator with (`elected`) or without leader election; closed until
    /// the lease is first confirmed.
    pub fn new(elected: bool) -> Arc<Fence> {
        Arc::new(Fence {
            elected,
            origin: Instant::now(),
            until: AtomicU64::new(0),
        })
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Whether writes are allowed now.
    pub fn may_write(&self) -> bool {
        !self.elected || self.now() < self.until.load(Ordering::SeqCst)
    }

    /// Allows writes for `valid` from now.
    fn allow_for(&self, valid: Duration) {
        let until = self.now() + valid.as_millis() as u64;
        self.until.store(until, Ordering::SeqCst);
    }

    /// Refuses writes from now on.
    fn close(&self) {
        self.until.store(0, Ordering::SeqCst);
    }
}

/// How long the lease, as read, still allows `identity` to write (zero if it is not the
/// holder, or the renewal is too old): renewal + duration - grace / 2 - now.
pub fn remaining(lease: &Lease, identity: &str, grace: u64, now_ms: i64) -> Duration {
    let Some(spec) = &lease.spec else {
        return Duration::ZERO;
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return Duration::ZERO;
    }
    let (Some(renewed), Some(duration)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return Duration::ZERO;
    };
    let end = renewed.0.as_millisecond() + i64::from(duration) * 1000 - grace as i64 * 500;
    Duration::from_millis(u64::try_from(end - now_ms).unwrap_or(0))
}

fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Holding the lease.
pub struct Leadership {
    fence: Arc<Fence>,
    changes: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
    watchdog: JoinHandle<()>,
}

impl Leadership {
    /// Waits until this candidate holds the lease, then keeps `fence` open while it does.
    /// `client` must not be fenced: it renews the lease.
    pub async fn acquire(
        client: Client,
        config: &LeaseConfig,
        fence: Arc<Fence>,
    ) -> Result<Leadership, String> {
        if config.grace == 0 || config.grace >= config.duration {
            return Err(format!(
                "the lease's renewal grace ({} s) must be above 0 and below its duration ({} s)",
                config.grace, config.duration
            ));
        }
        let manager = LeaseManagerBuilder::new(client.clone(), &config.name)
            .with_namespace(&config.namespace)
            .with_identity(&config.identity)
            .with_duration(config.duration)
            .with_grace(config.grace)
            .build()
            .await
            .map_err(|e| format!("Lease {}/{}: {e}", config.namespace, config.name))?;
        let (mut changes, task) = manager.watch().await;
        tracing::info!(lease = %config.name, identity = %config.identity, "waiting to lead");
        while !*changes.borrow_and_update() {
            if changes.changed().await.is_err() {
                return Err(match task.await {
                    Ok(Err(e)) => format!("leader election failed: {e}"),
                    _ => "leader election stopped".into(),
                });
            }
        }
        let leases: Api<Lease> = Api::namespaced(client, &config.namespace);
        // Open the fence only on a Lease read that names this candidate.
        let (name, identity, grace) = (config.name.clone(), config.identity.clone(), config.grace);
        let check = move |fence: Arc<Fence>, leases: Api<Lease>| {
            let (name, identity) = (name.clone(), identity.clone());
            async move {
                match leases.get(&name).await {
                    Ok(lease) => {
                        let left = remaining(&lease, &identity, grace, wall_ms());
                        if left.is_zero() {
                            fence.close();
                        } else {
                            fence.allow_for(left);
                        }
                    }
                    // The deadline already set runs out by itself.
                    Err(e) => tracing::warn!(error = %e, "reading the Lease failed"),
                }
            }
        };
        let started = Instant::now();
        while !fence.may_write() {
            if started.elapsed() > Duration::from_secs(config.duration) {
                return Err("acquired the lease but could not confirm it".into());
            }
            check(fence.clone(), leases.clone()).await;
            if !fence.may_write() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // Often enough to read each renewal before the previous deadline passes.
        let every = WATCHDOG.min(Duration::from_millis(config.grace * 250));
        let watchdog = tokio::spawn({
            let fence = fence.clone();
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    check(fence.clone(), leases.clone()).await;
                }
            }
        });
        tracing::info!(lease = %config.name, identity = %config.identity, "leading");
        Ok(Leadership {
            fence,
            changes,
            task,
            watchdog,
        })
    }

    /// Resolves when this candidate may no longer write: the lease manager saw the lease
    /// taken, or the fence's deadline passed.
    pub async fn lost(&mut self) {
        loop {
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() || !*self.changes.borrow_and_update() {
                        self.fence.close();
                        return;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if !self.fence.may_write() {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up (on shutdown), so that another candidate leads at once.
    pub async fn release(self) {
        self.fence.close();
        self.watchdog.abort();
        let Leadership { changes, task, .. } = self;
        drop(changes);
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => tracing::info!("released the lease"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the lease failed"),
            _ => tracing::warn!("releasing the lease did not finish"),
        }
    }
}

/// A tower layer for the operator's client: past the fence's deadline, every request
/// that writes (POST, PUT, PATCH, DELETE) fails at once without reaching the API server.
#[derive(Clone)]
pub struct FenceLayer(pub Arc<Fence>);

impl<S> Layer<S> for FenceLayer {
    type Service = Fenced<S>;

    fn layer(&self, inner: S) -> Fenced<S> {
        Fenced {
            inner,
            fence: self.0.clone(),
        }
    }
}

/// The service [`FenceLayer`] wraps.
#[derive(Clone)]
pub struct Fenced<S> {
    inner: S,
    fence: Arc<Fence>,
}

impl<S, B> Service<Request<B>> for Fenced<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
    S::Error: From<std::io::Error> + 'static,
    S::Response: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let writes = matches!(
            *request.method(),
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        if writes && !self.fence.may_write() {
            let refused = std::io::Error::other("fenced: this operator no longer holds the lease");
            return Box::pin(async move { Err(refused.into()) });
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: &str, renewed_ms: i64, duration: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(
                    k8s_openapi::jiff::Timestamp::from_millisecond(renewed_ms).unwrap(),
                )),
                lease_duration_seconds: Some(duration),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn writes_are_allowed_until_renewal_plus_duration_minus_half_the_grace() {
        let now = 1_000_000;
        // Renewed 2 s ago, 15 s lease, 5 s grace: 10.5 s left (renewal due in 8 s).
        let held = lease("a", now - 2_000, 15);
        assert_eq!(remaining(&held, "a", 5, now), Duration::from_millis(10_500));
        // Someone else's lease, or one that ran out: nothing.
        assert_eq!(remaining(&held, "b", 5, now), Duration::ZERO);
        assert_eq!(remaining(&held, "a", 5, now + 10_500), Duration::ZERO);
        assert_eq!(remaining(&Lease::default(), "a", 5, now), Duration::ZERO);
    }

    #[tokio::test]
    async fn the_fence_refuses_writes_past_its_deadline_and_only_writes() {
        let fence = Fence::new(true);
        assert!(!fence.may_write(), "closed until confirmed");
        fence.allow_for(Duration::from_millis(150));
        assert!(fence.may_write());
        let layer = FenceLayer(fence.clone());
        let mut service = layer.layer(tower::service_fn(|_: Request<()>| async {
            Ok::<_, std::io::Error>("sent")
        }));
        let request = |method: Method| Request::builder().method(method).body(()).unwrap();
        assert_eq!(service.call(request(Method::POST)).await.unwrap(), "sent");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!fence.may_write());
        let refused = service.call(request(Method::PATCH)).await.unwrap_err();
        assert!(refused.to_string().contains("fenced"), "{refused}");
        assert_eq!(service.call(request(Method::GET)).await.unwrap(), "sent");
        assert!(Fence::new(false).may_write(), "no election, no fence");
    }
}
