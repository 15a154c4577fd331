//! A run's records as the operator keeps them: a slot per node of the plan, by its
//! position, made when the manifest is loaded, so that the memory a run takes does not
//! grow with the images it finishes; and, by Job name, the few records of Jobs the plan
//! does not have (an older plan's).
//!
//! A record's instance, upstream image and image reference are the plan node's own
//! strings, shared rather than copied, and a Kubernetes node's name is kept once for all
//! the records of images built on it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Record, RecordStatus};
use crate::plan::{Node, NodeId, Plan};
use crate::schedule::{NodeState, Tally};

/// The records of a run, by node of its plan and by Job name.
#[derive(Clone, Debug, Default)]
pub struct Records {
    plan: Arc<Plan>,
    /// The record of each node of the plan, by position.
    slots: Vec<Option<Record>>,
    /// The status of each node's record, packed: the passes over every node read this,
    /// not the records (328 bytes each, a cache miss apiece at 20,000 nodes).
    statuses: Vec<Option<RecordStatus>>,
    /// The state each node's record gives it ([`Records::state`]; new without a record),
    /// kept as records come: a reconcile copies these whole and reads only the nodes
    /// with a Job, rather than make each node's state again from its record.
    states: Vec<NodeState>,
    /// The tally of `states`, kept with them.
    tally: Tally,
    /// The records of Jobs not in the plan.
    others: BTreeMap<String, Record>,
    /// The Kubernetes nodes named by records, one copy each.
    hosts: BTreeSet<Arc<str>>,
    len: usize,
}

impl Records {
    /// No records yet, for the nodes of `plan`.
    pub fn new(plan: Arc<Plan>) -> Records {
        Records {
            slots: vec![None; plan.nodes.len()],
            statuses: vec![None; plan.nodes.len()],
            states: vec![NodeState::NEW; plan.nodes.len()],
            tally: Tally::of(&plan, &vec![NodeState::NEW; plan.nodes.len()]),
            plan,
            ..Default::default()
        }
    }

    /// `records`, for the nodes of `plan`.
    pub fn of(plan: Arc<Plan>, records: impl IntoIterator<Item = (String, Record)>) -> Records {
        let mut out = Records::new(plan);
        for (job, record) in records {
            out.insert(job, record);
        }
        out
    }

    /// `records`, for the nodes of a copy of `plan`.
    #[cfg(test)]
    pub fn test_of(plan: &Plan, records: &BTreeMap<String, Record>) -> Records {
        Records::of(Arc::new(plan.clone()), records.clone())
    }

    /// The plan the records are kept for.
    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    /// The record of Job `job`.
    pub fn get(&self, job: &str) -> Option<&Record> {
        match self.plan.node_of(job) {
            Some(id) => self.slots[id].as_ref(),
            None => self.others.get(job),
        }
    }

    /// Every node's state as its record gives it, indexed like the plan's nodes: what
    /// [`Records::state`] says, or new.
    pub fn states(&self) -> &[NodeState] {
        &self.states
    }

    /// The tally of [`Records::states`].
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

    /// The record of node `id` of the plan.
    pub fn node(&self, id: NodeId) -> Option<&Record> {
        self.slots.get(id).and_then(Option::as_ref)
    }

    /// The status of node `id`'s record.
    pub fn status(&self, id: NodeId) -> Option<RecordStatus> {
        self.statuses.get(id).copied().flatten()
    }

    /// The state node `id`'s record gives it: read from its status alone unless it failed
    /// or waits for a retry.
    pub fn state(&self, id: NodeId) -> Option<NodeState> {
        let status = self.status(id)?;
        status
            .settled_state()
            .or_else(|| self.node(id).map(Record::state))
    }

    /// The records of the plan's nodes of status `status`, in plan order; the others are
    /// not read.
    pub fn planned_of(&self, status: RecordStatus) -> impl Iterator<Item = (NodeId, &Record)> {
        self.statuses
            .iter()
            .enumerate()
            .filter(move |(_, s)| **s == Some(status))
            .filter_map(|(id, _)| Some((id, self.slots[id].as_ref()?)))
    }

    /// Adds or replaces the record of Job `job`.
    pub fn insert(&mut self, job: String, mut record: Record) {
        if let Some(host) = &mut record.node {
            *host = self.host(host);
        }
        let old = match self.plan.node_of(&job) {
            Some(id) => {
                share(&self.plan.nodes[id], &mut record);
                self.statuses[id] = Some(record.status);
                let state = record.state();
                self.tally
                    .change(self.plan.phase(id), id, &self.states[id], &state);
                self.states[id] = state;
                self.slots[id].replace(record)
            }
            None => self.others.insert(job, record),
        };
        if old.is_none() {
            self.len += 1;
        }
    }

    /// The one copy of Kubernetes node name `host`.
    fn host(&mut self, host: &Arc<str>) -> Arc<str> {
        if let Some(known) = self.hosts.get(host) {
            return known.clone();
        }
        self.hosts.insert(host.clone());
        host.clone()
    }

    /// The records of the plan's nodes, in plan order.
    pub fn planned(&self) -> impl Iterator<Item = (NodeId, &Record)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(id, r)| Some((id, r.as_ref()?)))
    }

    /// Every record with its Job name: the plan's in plan order, then the others.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Record)> {
        self.planned()
            .map(|(id, r)| (self.plan.nodes[id].job_name.as_str(), r))
            .chain(self.others.iter().map(|(job, r)| (job.as_str(), r)))
    }

    /// Every record.
    pub fn values(&self) -> impl Iterator<Item = &Record> {
        self.iter().map(|(_, r)| r)
    }

    /// How many records there are.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every record, by Job name.
    pub fn into_map(self) -> BTreeMap<String, Record> {
        let Records {
            plan,
            slots,
            mut others,
            ..
        } = self;
        for (id, record) in slots.into_iter().enumerate() {
            if let Some(record) = record {
                others.insert(plan.nodes[id].job_name.clone(), record);
            }
        }
        others
    }
}

/// Makes `record` hold `node`'s strings where it has the same text.
fn share(node: &Node, record: &mut Record) {
    fn same(mine: &mut Arc<str>, theirs: &Arc<str>) {
        if **mine == **theirs {
            *mine = theirs.clone();
        }
    }
    if let (Some(mine), Some(theirs)) = (&mut record.instance_id, &node.instance_id) {
        same(mine, theirs);
    }
    if let (Some(mine), Some(theirs)) = (&mut record.base_image, &node.upstream_image) {
        same(mine, theirs);
    }
    for tag in &mut record.tags {
        same(tag, &node.image);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::RecordStatus;
    use chrono::Utc;

    #[test]
    fn a_nodes_state_is_its_records_whatever_the_packed_status_says() {
        use crate::schedule::{Failure, FailureClass, SkipReason};
        let plan = Arc::new(crate::plan::fixture(&["a__a-1", "b__b-2", "c__c-3"]));
        let mut records = Records::new(plan.clone());
        let (now, n) = (Utc::now(), plan.nodes.len());
        let failure = Failure::new(FailureClass::BuildError, "exit 1");
        let later = now + chrono::Duration::seconds(30);
        let made = [
            Record::built(&plan.nodes[0], 1, now),
            Record::skipped(&plan.nodes[1], SkipReason::Exists, now),
            Record::skipped(&plan.nodes[2], SkipReason::NotNeeded, now),
            Record::failed(&plan.nodes[3], &failure, 2, None, now),
            Record::failed(&plan.nodes[4], &failure, 1, Some(later), now),
        ];
        for (id, record) in made.iter().enumerate() {
            records.insert(plan.nodes[id].job_name.clone(), record.clone());
        }
        for (id, record) in made.iter().enumerate() {
            assert_eq!(records.status(id), Some(record.status));
            assert_eq!(records.state(id), Some(record.state()), "node {id}");
        }
        assert_eq!(
            records.state(4),
            Some(NodeState::Waiting {
                attempts: 1,
                not_before: Some(later)
            })
        );
        assert!((5..n).all(|id| records.status(id).is_none() && records.state(id).is_none()));
        // The states kept for every node say the same, and new for a node without one.
        let kept = |records: &Records| -> Vec<NodeState> {
            (0..n)
                .map(|id| records.state(id).unwrap_or(NodeState::NEW))
                .collect()
        };
        assert_eq!(records.states(), kept(&records));
        assert_eq!(*records.tally(), Tally::of(&plan, &kept(&records)));
        assert_eq!(records.tally().next_wakeup(records.states()), Some(later));
        // A record replaced: its status and state follow.
        records.insert(
            plan.nodes[3].job_name.clone(),
            Record::built(&plan.nodes[3], 3, now),
        );
        assert_eq!(records.state(3), Some(NodeState::Succeeded));
        assert_eq!(records.states()[3], NodeState::Succeeded);
        assert_eq!(*records.tally(), Tally::of(&plan, &kept(&records)));
        assert_eq!(records.states(), kept(&records));
        let failed: Vec<_> = records
            .planned_of(RecordStatus::Retrying)
            .map(|(id, _)| id)
            .collect();
        assert_eq!(failed, [4]);
        assert_eq!(records.planned_of(RecordStatus::Failed).count(), 0);
    }

    #[test]
    fn records_are_found_by_job_and_node_and_share_the_plans_strings() {
        let plan = Arc::new(crate::plan::fixture(&["a__a-1", "b__b-2"]));
        let mut records = Records::new(plan.clone());
        assert!(records.is_empty());
        let asm = plan.nodes.len() - 1;
        let node = &plan.nodes[asm];
        // A record as read from a shard: its own copies of the strings.
        let mut read = Record::built(node, 1, Utc::now());
        read.instance_id = node.instance_id.as_deref().map(Arc::from);
        read.tags = smallvec::smallvec![Arc::from(&*node.image)];
        read.node = Some(Arc::from("worker-1"));
        assert!(!Arc::ptr_eq(&read.tags[0], &node.image));
        records.insert(node.job_name.clone(), read.clone());
        let mut other = read.clone();
        other.node = Some(Arc::from("worker-1"));
        records.insert("old-plan-job".into(), other);

        let kept = records.get(&node.job_name).unwrap();
        assert_eq!(kept, &read, "sharing changes no value");
        assert!(std::ptr::eq(kept, records.node(asm).unwrap()));
        assert!(Arc::ptr_eq(&kept.tags[0], &node.image));
        let (mine, theirs) = (kept.instance_id.as_ref(), node.instance_id.as_ref());
        assert!(Arc::ptr_eq(mine.unwrap(), theirs.unwrap()));
        let host = kept.node.as_ref().unwrap();
        let other_host = records.get("old-plan-job").unwrap().node.as_ref().unwrap();
        assert!(Arc::ptr_eq(host, other_host), "one copy of a host name");

        // A record of another image keeps its own text.
        let mut stranger = Record::built(&plan.nodes[0], 1, Utc::now());
        stranger.tags = smallvec::smallvec![Arc::from("r.io/elsewhere:1")];
        records.insert(plan.nodes[0].job_name.clone(), stranger);
        assert_eq!(records.node(0).unwrap().image(), "r.io/elsewhere:1");

        // Replacing counts once; the plan's records come first, in plan order.
        let mut again = records.node(asm).unwrap().clone();
        again.status = RecordStatus::Failed;
        records.insert(node.job_name.clone(), again);
        assert_eq!(records.len(), 3);
        let jobs: Vec<&str> = records.iter().map(|(job, _)| job).collect();
        assert_eq!(
            jobs,
            [
                plan.nodes[0].job_name.as_str(),
                node.job_name.as_str(),
                "old-plan-job"
            ]
        );
        let map = records.clone().into_map();
        assert_eq!(map.len(), 3);
        assert_eq!(map[&node.job_name].status, RecordStatus::Failed);
        assert!(records.get("no-such-job").is_none());
    }

    #[test]
    fn a_slot_stays_small() {
        // A slot is made for every image of the plan (20,001 at 10,000 instances): a
        // field that grows it grows every run's memory by 20 KiB per byte.
        assert!(
            size_of::<Option<Record>>() <= 328,
            "{}",
            size_of::<Option<Record>>()
        );
    }
}
