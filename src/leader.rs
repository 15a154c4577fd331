//! Leader election for more than one replica: a Lease held through kube-lease-manager
//! (server-side apply, so two candidates never both acquire it). Only the holder runs the
//! controller. Renewal is fenced: the holder learns it lost the lease a grace period
//! before the lease can pass to another, stops dispatching at once (the reconciler checks
//! [`Leadership::leading`] before every write) and exits, to come back as a candidate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a lease is held without renewal, and how long before its end the holder
/// renews it (and gives up leading if it cannot).
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
    /// Seconds before the end of the lease at which it is renewed.
    pub grace: u64,
}

/// Holding the lease.
pub struct Leadership {
    leading: Arc<AtomicBool>,
    changes: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

impl Leadership {
    /// Waits until this candidate holds the lease.
    pub async fn acquire(client: Client, config: &LeaseConfig) -> Result<Leadership, String> {
        if config.grace == 0 || config.grace >= config.duration {
            return Err(format!(
                "the lease's renewal grace ({} s) must be above 0 and below its duration ({} s)",
                config.grace, config.duration
            ));
        }
        let manager = LeaseManagerBuilder::new(client, &config.name)
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
        tracing::info!(lease = %config.name, identity = %config.identity, "leading");
        Ok(Leadership {
            leading: Arc::new(AtomicBool::new(true)),
            changes,
            task,
        })
    }

    /// The fence: true while the lease is held; false for good once it is lost.
    pub fn leading(&self) -> Arc<AtomicBool> {
        self.leading.clone()
    }

    /// Resolves when the lease is lost (after which `leading` is false).
    pub async fn lost(&mut self) {
        loop {
            if self.changes.changed().await.is_err() || !*self.changes.borrow_and_update() {
                self.leading.store(false, Ordering::SeqCst);
                return;
            }
        }
    }

    /// Gives the lease up (on shutdown), so that another candidate leads at once.
    pub async fn release(self) {
        self.leading.store(false, Ordering::SeqCst);
        let Leadership { changes, task, .. } = self;
        drop(changes);
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => tracing::info!("released the lease"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the lease failed"),
            _ => tracing::warn!("releasing the lease did not finish"),
        }
    }
}
