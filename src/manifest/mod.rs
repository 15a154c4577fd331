//! The manifest: one record per planned image, as JSON lines, sharded across ConfigMaps
//! the run owns (`<run>-manifest-<i>`, key `manifest.jsonl`) so that none comes near the
//! API server's 1 MiB object limit whatever the run's size. An image's shard follows its
//! position in the plan (`RECORDS_PER_SHARD` consecutive images a shard), so images that
//! finish together mostly share one and a reconcile rewrites few shards; once written, a
//! record stays in the shard it was read from, even if the plan changed.
//!
//! The operator keeps a run's manifest in memory: it loads it once (after a start, or after
//! a write conflict) and then writes only the shards whose records changed, each as a whole
//! with the resourceVersion it last saw, so a lost race is a conflict, never a lost record.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};

mod record;
mod records;
mod write;

pub use record::{Digest, Harvest, MAX_MESSAGE, Record, RecordStatus};
pub use records::Records;
pub use write::{Staged, Written, send};

use crate::api::{ImageBuildRun, MAX_MANIFESTS};
use crate::names::LABEL_RUN_UID;
use crate::plan::{NodeId, Plan};
use crate::text::shorten;

/// The data key of a shard.
pub const KEY: &str = "manifest.jsonl";
/// Records per shard on average. A record is typically under 1 KiB of JSON, at most about
/// 3.3 KiB (its error cut to 1 KiB, 2 KiB escaped; image references and names at their
/// limits). A shard over [`MAX_SHARD_BYTES`] keeps shorter errors.
pub const RECORDS_PER_SHARD: usize = 250;
/// The most a shard's text may take: the API server refuses objects over 1 MiB (less, with
/// etcd's default request limit of 1.5 MiB, once metadata and the request wrap it).
pub const MAX_SHARD_BYTES: usize = 900 * 1024;
/// The error kept per record in a shard that would otherwise be too large.
const SHORT_ERROR: usize = 128;
/// `app.kubernetes.io/component` of the shards.
pub const COMPONENT: &str = "manifest";

/// Why the manifest could not be read or written (the reconcile is retried; the
/// manifest is then read again).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The run has no uid (it was not read from the API server), so it cannot own shards.
    #[error("the run has no uid to own its manifest")]
    NoUid,
    /// A call to the API server failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A line of a shard does not parse.
    #[error("line {line} of ConfigMap {config_map}: {source}")]
    Parse {
        /// The shard.
        config_map: String,
        /// 1-based line number.
        line: usize,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The shard changed since it was read (another writer, or a stale cache).
    #[error("ConfigMap {0} changed since it was read")]
    Conflict(String),
    /// A ConfigMap of that name belongs to an earlier run of the same name; it was
    /// deleted and is written on the next try.
    #[error("ConfigMap {0} belonged to an earlier run of this name and was deleted")]
    Stale(String),
    /// A write sent in the background ended without an answer (its task was cancelled
    /// or panicked); some shards may have been written.
    #[error("the write of the manifest ended without an answer: {0}")]
    Interrupted(String),
}

/// How many shards a run of `nodes` images has.
pub fn shard_count(nodes: usize) -> usize {
    nodes.div_ceil(RECORDS_PER_SHARD).max(1)
}

/// Why a run of `nodes` images cannot be recorded (more shards than the status can
/// name), if it cannot.
pub fn too_many(nodes: usize) -> Option<String> {
    let most = MAX_MANIFESTS * RECORDS_PER_SHARD;
    (shard_count(nodes) > MAX_MANIFESTS).then(|| {
        format!(
            "the run plans {nodes} images; a run may have at most {most}: split the instances over several runs (instances.select or limit)"
        )
    })
}

/// The name of shard `i` of run `run`: `<run>-manifest-<i>`, or, where that would pass
/// the 253 characters an object name may have, the run name cut short and a hash of it.
pub fn shard_name(run: &str, i: usize) -> String {
    crate::names::run_object(run, &format!("manifest-{i}"))
}

/// One line: the record and the Job name it is kept under.
#[derive(Deserialize)]
struct Line {
    job: String,
    #[serde(flatten)]
    record: Record,
}

/// A line to write, borrowed (a record is copied only to cut its error).
#[derive(Serialize)]
struct LineOut<'a> {
    job: &'a str,
    #[serde(flatten)]
    record: std::borrow::Cow<'a, Record>,
}

/// The JSON lines of `records`, in Job-name order, in at most [`MAX_SHARD_BYTES`]: if
/// they would take more, errors are cut to their last `SHORT_ERROR` (128) bytes, then
/// dropped (the status and the Events still tell the failures).
pub fn render<'a>(records: impl IntoIterator<Item = (&'a str, &'a Record)> + Clone) -> String {
    let mut out = String::new();
    for max_error in [None, Some(SHORT_ERROR), Some(0)] {
        out.clear();
        for (job, record) in records.clone() {
            let mut record = std::borrow::Cow::Borrowed(record);
            if let (Some(max), Some(error)) = (max_error, &record.error) {
                let cut = (max > 0).then(|| shorten(error, max));
                record.to_mut().error = cut;
            }
            let line = LineOut { job, record };
            #[allow(
                clippy::expect_used,
                reason = "a record has string keys and derived Serialize only: it cannot fail"
            )]
            let json = serde_json::to_string(&line).expect("records serialize");
            out.push_str(&json);
            out.push('\n');
        }
        if out.len() <= MAX_SHARD_BYTES {
            break;
        }
    }
    out
}

/// Parses the JSON lines of a shard.
pub fn parse(config_map: &str, text: &str) -> Result<Vec<(String, Record)>, ManifestError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let line: Line = serde_json::from_str(l).map_err(|source| ManifestError::Parse {
                config_map: config_map.to_string(),
                line: i + 1,
                source,
            })?;
            Ok((line.job, line.record))
        })
        .collect()
}

/// The run's shards: index, resourceVersion and records of each.
async fn read_shards(
    client: &Client,
    run: &ImageBuildRun,
) -> Result<Vec<(usize, Option<String>, Vec<(String, Record)>)>, ManifestError> {
    let name = run.name_any();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &run.namespace().unwrap_or_default());
    let uid = run.uid().unwrap_or_default();
    let list = cms
        .list(&ListParams::default().labels(&format!("{LABEL_RUN_UID}={uid}")))
        .await?;
    let prefix = shard_name(&name, 0);
    let prefix = prefix.trim_end_matches('0');
    let mut shards = Vec::new();
    for cm in list.items {
        let cm_name = cm.name_any();
        let Some(i) = cm_name
            .strip_prefix(prefix)
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| *i < MAX_MANIFESTS && shard_name(&name, *i) == cm_name)
        else {
            continue;
        };
        let text = cm.data.as_ref().and_then(|d| d.get(KEY));
        let records = parse(&cm_name, text.map_or("", String::as_str))?;
        shards.push((i, cm.resource_version(), records));
    }
    Ok(shards)
}

/// The shards as read: index, resourceVersion and records of each.
type Shards = Vec<(usize, Option<String>, Vec<(String, Record)>)>;

/// A run's manifest as last read or written.
///
/// A record's shard is not kept per record: it is its node's position in the plan the
/// manifest was loaded for, unless the record was read from another shard (or its Job is
/// not in the plan): those few are in `moved`.
pub struct Manifest {
    /// The records, for the plan the manifest was loaded for: the plan they are placed by.
    records: Records,
    /// The shard of each record kept elsewhere than its plan position puts it.
    moved: HashMap<String, usize>,
    /// The resourceVersion of each shard that exists.
    versions: Vec<Option<String>>,
    /// Changes with every change of the records (see [`Manifest::version`]).
    version: u64,
    /// The plan's nodes whose records changed since version `changed_since` (see
    /// [`Manifest::take_changes`]).
    changed: Vec<NodeId>,
    changed_since: u64,
}

/// The version the next manifest made or changed in this process takes.
static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

impl Manifest {
    /// Reads the run's shards.
    pub async fn load(
        client: &Client,
        run: &ImageBuildRun,
        plan: &Arc<Plan>,
    ) -> Result<Manifest, ManifestError> {
        Ok(Manifest::from_shards(
            plan.clone(),
            read_shards(client, run).await?,
        ))
    }

    /// The manifest of `plan`, from the shards read.
    pub fn from_shards(plan: Arc<Plan>, read: Shards) -> Manifest {
        let shards = read
            .iter()
            .map(|(i, _, _)| i + 1)
            .max()
            .unwrap_or(0)
            .max(shard_count(plan.nodes.len()));
        let version = NEXT_VERSION.fetch_add(1, Ordering::Relaxed);
        let mut manifest = Manifest {
            records: Records::new(plan),
            moved: HashMap::new(),
            versions: vec![None; shards],
            version,
            changed: Vec::new(),
            changed_since: version,
        };
        for (i, version, records) in read {
            manifest.versions[i] = version;
            for (job, record) in records {
                // Found twice (a layout of an older version): the newer record wins, and
                // its shard is the record's home from now on.
                if manifest
                    .records
                    .get(&job)
                    .is_some_and(|other| other.time > record.time)
                {
                    continue;
                }
                if manifest.planned_home(&job) == Some(i) {
                    manifest.moved.remove(&job);
                } else {
                    manifest.moved.insert(job.clone(), i);
                }
                manifest.records.insert(job, record);
            }
        }
        manifest
    }

    /// Every record of the run's manifest as stored, by Job name, whatever the plan.
    pub async fn read(
        client: &Client,
        run: &ImageBuildRun,
    ) -> Result<BTreeMap<String, Record>, ManifestError> {
        // Read as the operator reads it (a record found twice: the newer copy).
        let read = read_shards(client, run).await?;
        Ok(Manifest::from_shards(Arc::default(), read)
            .records
            .into_map())
    }

    /// Every record.
    pub fn records(&self) -> &Records {
        &self.records
    }

    /// The plan the manifest was loaded for.
    pub fn plan(&self) -> &Arc<Plan> {
        self.records.plan()
    }

    /// Tells apart the records' states in this process: two manifests, or one before and
    /// after a change of its records, never have the same version. What is derived from
    /// the records can be kept until it changes.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The names of the shards that exist, in shard order.
    pub fn names(&self, run: &str) -> Vec<String> {
        (0..self.versions.len())
            .filter(|&i| self.versions[i].is_some())
            .map(|i| shard_name(run, i))
            .collect()
    }

    /// The shard Job `job`'s plan position puts it in, if it is in the plan.
    fn planned_home(&self, job: &str) -> Option<usize> {
        self.records
            .plan()
            .node_of(job)
            .map(|id| id / RECORDS_PER_SHARD)
    }

    /// The shard of Job `job`'s record (the last shard for a Job not in the plan).
    fn home(&self, job: &str) -> usize {
        self.moved
            .get(job)
            .copied()
            .or_else(|| self.planned_home(job))
            .unwrap_or(self.versions.len() - 1)
    }

    /// Adds or replaces `changes` in memory; the shards to write.
    fn apply(&mut self, changes: BTreeMap<String, Record>) -> BTreeSet<usize> {
        let mut touched = BTreeSet::new();
        for (job, record) in changes {
            let i = self.home(&job);
            touched.insert(i);
            if self.planned_home(&job) != Some(i) {
                self.moved.insert(job.clone(), i);
            }
            if let Some(id) = self.records.plan().node_of(&job) {
                self.changed.push(id);
            }
            self.records.insert(job, record);
        }
        self.version = NEXT_VERSION.fetch_add(1, Ordering::Relaxed);
        touched
    }

    /// What [`Manifest::take_changes`] would return, left in place.
    pub fn changes(&self) -> (u64, &[NodeId]) {
        (self.changed_since, &self.changed)
    }

    /// The plan's nodes whose records changed since the version this returns (the
    /// manifest's when it was read, or when this was last called; a node may be named
    /// more than once), and forgets them: what keeps a copy of the records' states
    /// brings those nodes up to date, if its copy is of that version.
    pub fn take_changes(&mut self) -> (u64, Vec<NodeId>) {
        let since = std::mem::replace(&mut self.changed_since, self.version);
        (since, std::mem::take(&mut self.changed))
    }

    /// The text of shard `i`: the records of the plan's nodes at its positions that were
    /// not moved, and those moved into it.
    fn render_shard(&self, i: usize) -> String {
        let start = (i * RECORDS_PER_SHARD).min(self.records.plan().nodes.len());
        let end = (start + RECORDS_PER_SHARD).min(self.records.plan().nodes.len());
        let planned = (start..end).filter_map(|id| {
            let job = self.records.plan().nodes[id].job_name.as_str();
            let record = self.records.node(id)?;
            (!self.moved.contains_key(job)).then_some((job, record))
        });
        let moved = self
            .moved
            .iter()
            .filter(|&(_, &shard)| shard == i)
            .filter_map(|(job, _)| Some((job.as_str(), self.records.get(job)?)));
        let mut lines: Vec<(&str, &Record)> = planned.chain(moved).collect();
        lines.sort_unstable_by_key(|(job, _)| *job);
        render(lines.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Node, Phase};
    use crate::schedule::{Failure, FailureClass};

    fn record(job: &str) -> Record {
        let node = Node {
            phase: Phase::Assembly,
            instance_id: Some(job.into()),
            upstream_image: None,
            image: format!("r.io/x:{job}").into(),
            build_args: Default::default(),
            git_revision: None,
            cache_ref: None,
            job_name: job.into(),
            deps: vec![],
        };
        Record::built(&node, 1, chrono::Utc::now())
    }

    fn changes(jobs: impl IntoIterator<Item = String>) -> BTreeMap<String, Record> {
        jobs.into_iter().map(|j| (j.clone(), record(&j))).collect()
    }

    #[test]
    fn records_follow_plan_order_and_stay_where_they_were_written() {
        assert_eq!(shard_count(1), 1);
        assert_eq!(shard_count(250), 1);
        assert_eq!(shard_count(251), 2);
        assert_eq!(shard_count(20_001), 81);
        assert_eq!(too_many(64_000), None);
        assert!(too_many(64_001).unwrap().contains("at most 64000"));
        // 601 images: a builder, then 300 bases and 300 assemblies.
        let ids: Vec<String> = (0..300).map(|i| format!("r__r-{i:03}")).collect();
        let plan = Arc::new(crate::plan::fixture(
            &ids.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        assert_eq!(plan.nodes.len(), 601);
        let job = |k: usize| plan.nodes[k].job_name.clone();
        let jobs = |ks: &[usize]| ks.iter().map(|&k| job(k)).collect::<Vec<_>>();

        let mut m = Manifest::from_shards(plan.clone(), vec![]);
        assert!(m.names("run").is_empty(), "nothing written yet");
        let touched = m.apply(changes(jobs(&[0, 1, 249])));
        assert_eq!(touched, BTreeSet::from([0]));
        let touched = m.apply(changes(jobs(&[250, 600])));
        assert_eq!(touched, BTreeSet::from([1, 2]));
        // A hundred images that finish together rewrite at most two shards.
        let touched = m.apply(changes((300..400).map(job)));
        assert_eq!(touched, BTreeSet::from([1]));
        let touched = m.apply(changes((200..300).map(job)));
        assert_eq!(touched, BTreeSet::from([0, 1]));
        // A Job not in the plan goes to the last shard.
        assert_eq!(m.apply(changes(["gone".to_string()])), BTreeSet::from([2]));
        let text = m.render_shard(2);
        let lines = parse("cm", &text).unwrap();
        let names: Vec<&str> = lines.iter().map(|(j, _)| j.as_str()).collect();
        let mut expected = vec![job(600), "gone".to_string()];
        expected.sort();
        assert_eq!(names, expected, "in Job-name order");
        let shard = |m: &Manifest, i: usize| -> BTreeSet<String> {
            let lines = parse("cm", &m.render_shard(i)).unwrap();
            lines.into_iter().map(|(j, _)| j).collect()
        };
        let first: BTreeSet<String> = [0, 1].into_iter().chain(200..250).map(job).collect();
        assert_eq!(shard(&m, 0), first);
        assert_eq!(shard(&m, 1).len(), 150, "250 to 399, each once");

        // Read back: a record stays in the shard it was found in, wherever the plan puts
        // it, and one found twice lives in the later shard only.
        let read: Shards = vec![
            (0, Some("5".into()), vec![(job(600), record(&job(600)))]),
            (
                2,
                Some("7".into()),
                vec![(job(0), record(&job(0))), (job(600), record(&job(600)))],
            ),
        ];
        let mut m = Manifest::from_shards(plan.clone(), read);
        assert_eq!(m.names("run"), ["run-manifest-0", "run-manifest-2"]);
        assert_eq!(m.records().len(), 2);
        assert_eq!(m.apply(changes(jobs(&[0]))), BTreeSet::from([2]));
        assert!(shard(&m, 0).is_empty());
        assert_eq!(shard(&m, 2), BTreeSet::from([job(0), job(600)]));
        // A new record at a moved record's plan position still goes by the plan.
        assert_eq!(m.apply(changes(jobs(&[1]))), BTreeSet::from([0]));
        assert_eq!(shard(&m, 0), BTreeSet::from([job(1)]));
    }

    #[test]
    fn shards_of_worst_case_records_stay_under_900_kib() {
        let node = Node {
            phase: Phase::PostAssembly,
            instance_id: Some(format!("{}__{}", "r".repeat(60), "n".repeat(60)).into()),
            upstream_image: Some(format!("docker.io/{}:latest", "u".repeat(200)).into()),
            image: format!("registry.example/{}:{}", "i".repeat(200), "t".repeat(120)).into(),
            build_args: Default::default(),
            git_revision: None,
            cache_ref: None,
            job_name: "j".repeat(63),
            deps: vec![],
        };
        // Quotes take two bytes each in JSON; control characters are dropped.
        let failure = Failure::new(FailureClass::BuildError, "\"\u{1b}é".repeat(2000));
        let now = chrono::Utc::now();
        let mut record = Record::failed(&node, &failure, 20, Some(now), now);
        record.digest = Some(Digest::from(format!("sha256:{}", "0".repeat(64)).as_str()));
        record.node = Some("n".repeat(253).into());
        record.log_path = Some(format!("{}/{}", "s".repeat(63), "p".repeat(253)));
        record.started_at = Some(now);
        record.finished_at = Some(now);
        record.duration_seconds = Some(u64::MAX);
        record.build_seconds = Some(u64::MAX);
        record.push_seconds = Some(u64::MAX);
        record.cached_steps = Some(u64::MAX);
        let shard = |n: usize, record: &Record| -> BTreeMap<String, Record> {
            (0..n)
                .map(|i| (format!("{}-{i}", "j".repeat(58)), record.clone()))
                .collect()
        };
        // A shard of the average size, all worst cases, keeps whole errors...
        let typical = shard(RECORDS_PER_SHARD, &record);
        let lines = |shard: &BTreeMap<String, Record>| -> String {
            render(shard.iter().map(|(job, r)| (job.as_str(), r)))
        };
        let back = parse("cm", &lines(&typical)).unwrap();
        assert_eq!(back[0].1, record);
        // ...and one half again as large (more than hashing puts in one) still fits,
        // keeping the end of every error.
        let text = lines(&shard(3 * RECORDS_PER_SHARD / 2, &record));
        assert!(text.len() <= MAX_SHARD_BYTES, "{} bytes", text.len());
        let back = parse("cm", &text).unwrap();
        assert_eq!(back.len(), 3 * RECORDS_PER_SHARD / 2);
        let error = back[0].1.error.clone().unwrap();
        assert!(error.len() <= SHORT_ERROR && record.error.unwrap().ends_with(&error[3..]));
        assert_eq!(back[0].1.tags, record.tags);
    }

    #[test]
    fn a_bad_line_names_the_shard_and_line() {
        let err = parse("run-manifest-0", "\n{\"job\": 1}\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("line 2 of ConfigMap run-manifest-0: "),
            "{err}"
        );
    }
}
