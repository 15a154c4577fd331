//! A run's records written in the background. A reconcile that harvests finished Jobs
//! stages their records in the manifest (in memory: the next reconcile reads them) and
//! sends the shards from a task of its own; it does not wait for the API server's answers
//! (over 100 ms a shard when it is busy), which would hold every event of the run, the
//! end of another Job among them, for that long.
//!
//! Until the write is answered, its Jobs are left alone: not harvested again, not deleted,
//! no Job of the same name made. A Job is deleted only once its record is written: the
//! reconcile that takes the answer (which wakes the run) deletes them, after keeping the
//! pods of failed builds. A write that fails is that reconcile's error: the manifest is
//! read again and the Jobs, still there, harvested again. While a write is in flight the
//! run's records are held, as between two writes (at most one a second): the reconciles
//! in between dispatch the slots that free and harvest once the write is answered.

use std::collections::HashSet;
use std::sync::Arc;

use kube::Client;
use tokio::task::JoinHandle;

use super::actions;
use super::context::{Ctx, Error};
use crate::api::ImageBuildRun;
use crate::manifest::{self, Manifest, ManifestError, Record, Staged, Written};
use crate::metrics::RunId;

/// What a write leaves to the reconcile that takes its answer.
#[derive(Debug, Default)]
pub struct Harvested {
    /// The Jobs whose records were written, by name: to delete.
    pub jobs: HashSet<String>,
    /// The records as the build counters take them, with their pods' pending time.
    pub counted: Vec<(Record, Option<f64>)>,
    /// The `(job, pod)` of each failed build, whose pod is kept before its Job goes.
    pub failed: Vec<(String, String)>,
}

/// A write of the run's records in flight.
pub struct Writing {
    /// What it leaves once written.
    harvested: Harvested,
    handle: JoinHandle<Result<Written, ManifestError>>,
}

impl Writing {
    /// Sends `staged` (the shards of `harvested`'s records) in a task of its own, which
    /// calls `wake` once answered.
    pub fn start(
        client: Client,
        run: Arc<ImageBuildRun>,
        staged: Staged,
        harvested: Harvested,
        wake: impl FnOnce() + Send + 'static,
    ) -> Writing {
        let handle = tokio::spawn(async move {
            let written = manifest::send(&client, &run, staged).await;
            wake();
            written
        });
        Writing { harvested, handle }
    }

    /// Whether Job `name`'s record is being written.
    pub fn holds(&self, name: &str) -> bool {
        self.harvested.jobs.contains(name)
    }

    /// Whether the answer has come.
    pub fn answered(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the answer: the versions the shards were given, and what the write
    /// leaves to do; or its error (the manifest must then be read again, and the Jobs
    /// are harvested again).
    pub async fn answer(self) -> Result<(Written, Harvested), ManifestError> {
        match self.handle.await {
            Ok(written) => Ok((written?, self.harvested)),
            Err(e) => Err(ManifestError::Interrupted(e.to_string())),
        }
    }
}

/// Takes the answer of a write of the run's records: the versions its shards were given
/// (kept in `manifest`, the manifest it was staged in, if given), its records counted for
/// the metrics, and the Jobs and pods it leaves added to `harvested`.
pub async fn answered(
    writing: Writing,
    manifest: Option<&mut Manifest>,
    harvested: &mut Harvested,
    ctx: &Ctx,
    id: &RunId<'_>,
    run: &ImageBuildRun,
) -> Result<(), Error> {
    let (written, left) = writing.answer().await?;
    if let Some(manifest) = manifest {
        manifest.written(written);
    }
    count(ctx, id, run, &left.counted);
    harvested.jobs.extend(left.jobs);
    harvested.failed.extend(left.failed);
    Ok(())
}

/// Counts records written for the metrics, and logs the failures among them.
pub fn count(ctx: &Ctx, id: &RunId<'_>, run: &ImageBuildRun, counted: &[(Record, Option<f64>)]) {
    for (record, pending) in counted {
        ctx.metrics.count(id, &actions::counted(record, *pending));
        actions::log_failure(run, record);
    }
}
