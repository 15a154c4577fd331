//! Writing a manifest's changed shards, in two steps: [`Manifest::stage`] adds the
//! changes to the records in memory and renders each shard they touch, then [`send`]
//! replaces those shards (at once, each with the resourceVersion last seen) and
//! [`Manifest::written`] keeps the versions they were given. The reconciler sends in the
//! background, so a reconcile does not hold the run's events for the API server's round
//! trips; [`Manifest::write`] does all three in one.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Deserialize;

use super::{COMPONENT, KEY, Manifest, ManifestError, Record, shard_name};
use crate::api::ImageBuildRun;
use crate::names::{LABEL_RUN, LABEL_RUN_UID, MANAGER, run_label};

/// What a write of a shard reads of the API server's answer.
#[derive(Deserialize)]
struct Answer {
    metadata: AnswerMeta,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnswerMeta {
    resource_version: Option<String>,
}

/// The shards a change touched, rendered: to [`send`].
pub struct Staged {
    shards: Vec<StagedShard>,
}

struct StagedShard {
    index: usize,
    config_map: ConfigMap,
}

impl Staged {
    /// How many shards are to be written.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether no shard is to be written.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }
}

/// The resourceVersion each shard written was given (by shard index).
#[derive(Debug, Default)]
pub struct Written(Vec<(usize, Option<String>)>);

/// Shards written at once, at most.
const SHARDS_AT_ONCE: usize = 8;

impl Manifest {
    /// Adds or replaces `changes` in memory and renders the shards they fall in, each with
    /// the resourceVersion last seen. Until the shards are [`written`](Manifest::written),
    /// nothing else may be staged: their versions are not known yet.
    pub fn stage(
        &mut self,
        run: &ImageBuildRun,
        changes: BTreeMap<String, Record>,
    ) -> Result<Staged, ManifestError> {
        let touched = self.apply(changes);
        let shards = touched
            .into_iter()
            .map(|index| {
                let config_map = self.shard(run, index, self.render_shard(index))?;
                Ok(StagedShard { index, config_map })
            })
            .collect::<Result<_, ManifestError>>()?;
        Ok(Staged { shards })
    }

    /// Keeps the versions the shards were given. On an error of theirs the manifest must
    /// be loaded again instead (some shards may have been written).
    pub fn written(&mut self, written: Written) {
        for (index, version) in written.0 {
            if let Some(slot) = self.versions.get_mut(index) {
                *slot = version;
            }
        }
    }

    /// Adds or replaces `changes` and writes the shards they fall in. On an error the
    /// manifest must be loaded again.
    pub async fn write(
        &mut self,
        client: &Client,
        run: &ImageBuildRun,
        changes: BTreeMap<String, Record>,
    ) -> Result<(), ManifestError> {
        let staged = self.stage(run, changes)?;
        let written = send(client, run, staged).await?;
        self.written(written);
        Ok(())
    }

    fn shard(
        &self,
        run: &ImageBuildRun,
        i: usize,
        text: String,
    ) -> Result<ConfigMap, ManifestError> {
        // A run read from the API server always has a uid; one without cannot own a shard.
        let owner = run.controller_owner_ref(&()).ok_or(ManifestError::NoUid)?;
        let labels = [
            ("app.kubernetes.io/managed-by", MANAGER.to_string()),
            ("app.kubernetes.io/component", COMPONENT.to_string()),
            (LABEL_RUN, run_label(&run.name_any())),
            (LABEL_RUN_UID, run.uid().unwrap_or_default()),
        ];
        Ok(ConfigMap {
            metadata: ObjectMeta {
                name: Some(shard_name(&run.name_any(), i)),
                resource_version: self.versions[i].clone(),
                labels: Some(
                    labels
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                ),
                owner_references: Some(vec![owner]),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(KEY.to_string(), text)])),
            ..Default::default()
        })
    }
}

/// Writes the staged shards of `run`'s manifest, eight at a time (`SHARDS_AT_ONCE`): each
/// replaced with the resourceVersion it was staged with (created, if it has none yet).
/// The first error is the answer; the manifest must then be loaded again.
pub async fn send(
    client: &Client,
    run: &ImageBuildRun,
    staged: Staged,
) -> Result<Written, ManifestError> {
    let ns = run.namespace().unwrap_or_default();
    let request = kube::core::Request::new(ConfigMap::url_path(&(), Some(&ns)));
    let answers: Vec<Result<(usize, Option<String>), ManifestError>> =
        futures::stream::iter(staged.shards)
            .map(|shard| {
                let request = &request;
                async move {
                    let version = send_shard(client, request, shard.config_map).await?;
                    Ok((shard.index, version))
                }
            })
            .buffer_unordered(SHARDS_AT_ONCE)
            .collect()
            .await;
    let mut written = Written::default();
    let mut conflicted = None;
    for answer in answers {
        match answer {
            Ok(version) => written.0.push(version),
            Err(ManifestError::Conflict(name)) => conflicted = conflicted.or(Some(name)),
            Err(e) => return Err(e),
        }
    }
    match conflicted {
        Some(name) => {
            let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
            Err(conflict(&cms, run, &name).await)
        }
        None => Ok(written),
    }
}

/// Replaces (or creates) one shard; its new resourceVersion. A 409 is
/// [`ManifestError::Conflict`], told apart by [`conflict`].
async fn send_shard(
    client: &Client,
    request: &kube::core::Request,
    config_map: ConfigMap,
) -> Result<Option<String>, ManifestError> {
    let name = config_map.name_any();
    let replace = config_map.metadata.resource_version.is_some();
    let body = serde_json::to_vec(&config_map).map_err(kube::Error::SerdeError)?;
    let pp = PostParams::default();
    let sent = match replace {
        true => request.replace(&name, &pp, body),
        false => request.create(&pp, body),
    }
    .map_err(kube::Error::BuildRequest)?;
    // Only the new resourceVersion is read back; the shard's text, echoed whole in the
    // answer, is skipped by the parser.
    match client.request::<Answer>(sent).await {
        Ok(answer) => Ok(answer.metadata.resource_version),
        Err(kube::Error::Api(e)) if e.code == 409 => Err(ManifestError::Conflict(name)),
        Err(e) => Err(e.into()),
    }
}

/// What a 409 on shard `name` means: a ConfigMap left by an earlier run of the same name
/// (deleted here), or a shard changed by someone else.
async fn conflict(cms: &Api<ConfigMap>, run: &ImageBuildRun, name: &str) -> ManifestError {
    let existing = match cms.get_opt(name).await {
        Ok(existing) => existing,
        Err(e) => return e.into(),
    };
    let ours = existing.as_ref().is_some_and(|cm| {
        cm.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == run.uid().as_ref())
    });
    if existing.is_some() && !ours {
        return match cms.delete(name, &DeleteParams::background()).await {
            Ok(_) => ManifestError::Stale(name.to_string()),
            Err(kube::Error::Api(e)) if e.code == 404 => ManifestError::Stale(name.to_string()),
            Err(e) => e.into(),
        };
    }
    ManifestError::Conflict(name.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::json;

    use super::*;
    use crate::plan::Plan;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
    type Sender = tower_test::mock::SendResponse<Response<Body>>;

    fn run() -> ImageBuildRun {
        serde_json::from_value(json!({
            "apiVersion": "imagebuild.dev/v1alpha1",
            "kind": "ImageBuildRun",
            "metadata": {"name": "run", "namespace": "ns", "uid": "u1"},
            "spec": serde_yaml_ng::from_str::<serde_json::Value>(r#"
instances: {list: [a__a-1], upstreamImage: "r.io/up/{{ name }}:1"}
builder: {context: {inline: "FROM scratch"}, image: "r.io/b:1"}
base: {context: {inline: "FROM scratch"}, image: "r.io/base:{{ customTag }}"}
assembly: {context: {inline: "FROM scratch"}, image: "r.io/a:{{ instanceId | lower }}"}
"#).unwrap(),
        }))
        .unwrap()
    }

    fn changes(plan: &Plan, nodes: &[usize]) -> BTreeMap<String, Record> {
        nodes
            .iter()
            .map(|&id| {
                let node = &plan.nodes[id];
                (
                    node.job_name.clone(),
                    Record::built(node, 1, chrono::Utc::now()),
                )
            })
            .collect()
    }

    /// The next `n` requests, none answered yet: "METHOD shard resourceVersion" each.
    async fn requests(handle: &mut Handle, n: usize) -> Vec<(String, Sender)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let next = tokio::time::timeout(Duration::from_secs(5), handle.next_request());
            let (request, send) = next.await.expect("sent at once").expect("a request");
            let method = request.method().to_string();
            let body = request.into_body().collect_bytes().await.unwrap();
            let cm: ConfigMap = serde_json::from_slice(&body).unwrap();
            let version = cm.metadata.resource_version.clone().unwrap_or_default();
            out.push((format!("{method} {} {version}", cm.name_any()), send));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// `staged` sent in a task of its own.
    fn sending(
        client: &Client,
        run: &ImageBuildRun,
        staged: Staged,
    ) -> tokio::task::JoinHandle<Result<Written, ManifestError>> {
        let (client, run) = (client.clone(), run.clone());
        tokio::spawn(async move { send(&client, &run, staged).await })
    }

    fn respond(send: Sender, code: u16, body: serde_json::Value) {
        send.send_response(
            Response::builder()
                .status(StatusCode::from_u16(code).unwrap())
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }

    #[tokio::test]
    async fn the_shards_staged_are_sent_at_once_and_their_versions_kept() {
        // 601 images: shards 0 to 2; shard 0 was read (version 5), 1 and 2 are new.
        let ids: Vec<String> = (0..300).map(|i| format!("r__r-{i:03}")).collect();
        let plan = Arc::new(crate::plan::fixture(
            &ids.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        let mut m = Manifest::from_shards(plan.clone(), vec![(0, Some("5".into()), vec![])]);
        let run = run();
        let staged = m.stage(&run, changes(&plan, &[0, 250, 600])).unwrap();
        assert_eq!(staged.len(), 3);
        // Staged: the records are the manifest's already.
        assert_eq!(m.records().len(), 3);

        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "ns");
        let answer = sending(&client, &run, staged);
        // All three arrive before any is answered.
        let sent = requests(&mut handle, 3).await;
        let seen: Vec<&str> = sent.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            seen,
            [
                "POST run-manifest-1 ",
                "POST run-manifest-2 ",
                "PUT run-manifest-0 5"
            ]
        );
        for (i, (_, send)) in sent.into_iter().enumerate() {
            respond(
                send,
                200,
                json!({"metadata": {"resourceVersion": format!("1{i}")}}),
            );
        }
        let written = answer.await.unwrap().unwrap();
        m.written(written);
        assert_eq!(
            m.names("run"),
            ["run-manifest-0", "run-manifest-1", "run-manifest-2"]
        );
        // The next write of each shard carries the version it was given.
        let staged = m.stage(&run, changes(&plan, &[1, 251, 599])).unwrap();
        let answer = sending(&client, &run, staged);
        let sent = requests(&mut handle, 3).await;
        let seen: Vec<&str> = sent.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            seen,
            [
                "PUT run-manifest-0 12",
                "PUT run-manifest-1 10",
                "PUT run-manifest-2 11"
            ]
        );
        // A conflict on one shard (the run's own: changed by someone else) is the answer,
        // whatever the others' were.
        for (seen, send) in sent {
            match seen.starts_with("PUT run-manifest-1 ") {
                true => respond(
                    send,
                    409,
                    json!({"kind": "Status", "apiVersion": "v1",
                    "status": "Failure", "message": "conflict", "reason": "Conflict", "code": 409}),
                ),
                false => respond(send, 200, json!({"metadata": {"resourceVersion": "20"}})),
            }
        }
        let (request, send) = handle.next_request().await.unwrap();
        assert_eq!(request.method(), "GET");
        assert!(request.uri().path().ends_with("/configmaps/run-manifest-1"));
        respond(
            send,
            200,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "run-manifest-1", "ownerReferences": [{"apiVersion":
            "imagebuild.dev/v1alpha1", "kind": "ImageBuildRun", "name": "run", "uid": "u1"}]}}),
        );
        match answer.await.unwrap() {
            Err(ManifestError::Conflict(name)) => assert_eq!(name, "run-manifest-1"),
            other => panic!("{other:?}"),
        }
    }
}
