//! What wakes a run from the Job watch: most of its events are progress no reconcile
//! decides on, and waking the run for each was most of its reconciles.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::runtime::watcher;

/// Which Job events wake the Job's run: its end (once), and its deletion before an end
/// was told (deleted by hand, or the end missed). A Job's creation and its progress
/// (started, pods counted, ready) change nothing a reconcile decides: the reconcile that
/// created it counts it as running (`state::Dispatched`), and pods waiting for a node are
/// looked at on a timer. Most of a Job's events are progress, so this saves most
/// reconciles.
#[derive(Default)]
pub(super) struct JobTriggers {
    /// The uids of the Jobs whose end was told.
    ended: HashSet<String>,
}

impl JobTriggers {
    pub(super) fn wakes(&mut self, event: watcher::Event<Arc<Job>>) -> Option<Arc<Job>> {
        match event {
            // A new list (a start, or a watch that lost its place): every end is told again.
            watcher::Event::Init => {
                self.ended.clear();
                None
            }
            watcher::Event::InitDone => None,
            watcher::Event::Apply(job) | watcher::Event::InitApply(job) => {
                let ended = crate::job::outcome(&job, None).is_some();
                (ended && self.ended.insert(job.uid().unwrap_or_default())).then_some(job)
            }
            watcher::Event::Delete(job) => {
                (!self.ended.remove(&job.uid().unwrap_or_default())).then_some(job)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(uid: &str, condition: Option<&str>) -> Arc<Job> {
        let conditions: Vec<serde_json::Value> = condition
            .map(|c| serde_json::json!({"type": c, "status": "True"}))
            .into_iter()
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": uid, "uid": uid},
            "status": {"active": 1, "conditions": conditions},
        }))
        .unwrap()
    }

    #[test]
    fn a_job_wakes_its_run_when_it_ends_or_goes_unended() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut t = JobTriggers::default();
        let mut wakes = |e| t.wakes(e).map(|j| j.name_any());
        // Created and progressing: nothing to decide.
        assert_eq!(wakes(Apply(job("a", None))), None);
        assert_eq!(wakes(Apply(job("a", None))), None);
        // Its end, told once however many updates follow; its deletion then is no news.
        assert_eq!(wakes(Apply(job("a", Some("Complete")))), Some("a".into()));
        assert_eq!(wakes(Apply(job("a", Some("Complete")))), None);
        assert_eq!(wakes(Delete(job("a", Some("Complete")))), None);
        // A Job deleted before it ended (by hand), and one whose end was never seen.
        assert_eq!(wakes(Delete(job("b", None))), Some("b".into()));
        assert_eq!(wakes(Delete(job("c", Some("Failed")))), Some("c".into()));
        // A new list tells every end again.
        assert_eq!(wakes(Apply(job("d", Some("Failed")))), Some("d".into()));
        assert_eq!(wakes(Init), None);
        assert_eq!(wakes(InitApply(job("d", Some("Failed")))), Some("d".into()));
        assert_eq!(wakes(InitDone), None);
    }
}
