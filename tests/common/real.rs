//! The real node of the local environment: its registries as pods reach them, the executor
//! images, the git server; fixtures for runs that really build (a git repository, small
//! upstream images), running an image as a pod there, and reading build pods' termination
//! messages as they finish.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use imagebuild_operator::api::ImageBuildRun;
use imagebuild_operator::job::BuildReport;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{LogParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use oci_client::client::{Config, ImageLayer};
use oci_client::manifest::{
    IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;

use super::cluster::{Env, eventually};
use super::oci::oci;

/// What `e2e/cluster env` says about the real node.
pub struct RealNode {
    /// The node's name.
    pub node: String,
    /// The anonymous registry, as pods on the node (and the host) reach it.
    pub registry: String,
    /// The authenticated registry, likewise.
    pub auth_registry: String,
    /// Its user and password.
    pub auth_user: String,
    pub auth_password: String,
    /// The executor images: rootful, rootless, rootless with a setuid newuidmap.
    pub executor: String,
    pub executor_rootless: String,
    pub executor_setuid: String,
    /// A busybox image in the anonymous registry.
    pub busybox: String,
    /// `git://host:port` of the git server, and the directory it serves.
    pub git: String,
    pub git_dir: PathBuf,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: this test needs the local environment's real node; run it with `e2e/cluster test`")
    })
}

impl RealNode {
    pub fn get() -> (Env, RealNode) {
        let env = Env::get();
        let real = RealNode {
            node: var("IMAGEBUILD_REAL_NODE"),
            registry: var("IMAGEBUILD_POD_REGISTRY"),
            auth_registry: var("IMAGEBUILD_POD_AUTH_REGISTRY"),
            auth_user: env.auth_user.clone(),
            auth_password: env.auth_password.clone(),
            executor: var("IMAGEBUILD_EXECUTOR_IMAGE"),
            executor_rootless: var("IMAGEBUILD_EXECUTOR_IMAGE_ROOTLESS"),
            executor_setuid: var("IMAGEBUILD_EXECUTOR_IMAGE_ROOTLESS_SETUID"),
            busybox: var("IMAGEBUILD_BUSYBOX_IMAGE"),
            git: var("IMAGEBUILD_GIT"),
            git_dir: var("IMAGEBUILD_GIT_DIR").into(),
        };
        (env, real)
    }

    /// Basic credentials for the authenticated registry.
    pub fn auth(&self) -> RegistryAuth {
        RegistryAuth::Basic(self.auth_user.clone(), self.auth_password.clone())
    }

    /// A `kubernetes.io/dockerconfigjson` Secret for the authenticated registry, with
    /// `password` (the right one unless told otherwise).
    pub async fn push_secret(&self, secrets: &Api<Secret>, name: &str, password: Option<&str>) {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let pair = format!(
            "{}:{}",
            self.auth_user,
            password.unwrap_or(&self.auth_password)
        );
        let config =
            serde_json::json!({"auths": {&self.auth_registry: {"auth": b64.encode(pair)}}});
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": config.to_string()},
        }))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }

    /// A bare repository `name` served by the git server, holding `files` in one commit;
    /// the commit's hash.
    pub fn git_repo(&self, name: &str, files: &[(&str, &str)]) -> String {
        let work = std::env::temp_dir().join(format!("imagebuild-git-{name}"));
        let _ = std::fs::remove_dir_all(&work);
        for (path, text) in files {
            let path = work.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let git = |dir: &Path, args: &[&str]| {
            let out = Command::new("git")
                .current_dir(dir)
                .args([
                    "-c",
                    "user.name=imagebuild",
                    "-c",
                    "user.email=e2e@imagebuild.dev",
                ])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "fixture"]);
        let bare = self.git_dir.join(format!("{name}.git"));
        let _ = std::fs::remove_dir_all(&bare);
        git(
            &work,
            &["clone", "-q", "--bare", ".", bare.to_str().unwrap()],
        );
        std::fs::remove_dir_all(&work).unwrap();
        git(&bare, &["rev-parse", "HEAD"])
    }

    /// Pushes `target`: the busybox image, with one more layer holding `files` unless there
    /// are none. `auth` is for the target's registry.
    pub async fn push_image(&self, target: &str, files: &[(&str, &str)], auth: &RegistryAuth) {
        let client = oci();
        let base = client
            .pull(
                &self.busybox.parse().unwrap(),
                &RegistryAuth::Anonymous,
                vec![
                    IMAGE_LAYER_GZIP_MEDIA_TYPE,
                    IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
                    IMAGE_LAYER_MEDIA_TYPE,
                ],
            )
            .await
            .unwrap_or_else(|e| panic!("pull {}: {e}", self.busybox));
        let mut layers = base.layers;
        let mut config: serde_json::Value = serde_json::from_slice(&base.config.data).unwrap();
        if !files.is_empty() {
            let mut tar = tar::Builder::new(Vec::new());
            for (path, text) in files {
                let mut header = tar::Header::new_gnu();
                header.set_size(text.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                tar.append_data(&mut header, path, text.as_bytes()).unwrap();
            }
            let layer = ImageLayer::oci_v1(tar.into_inner().unwrap(), None);
            config["rootfs"]["diff_ids"]
                .as_array_mut()
                .unwrap()
                .push(layer.sha256_digest().into());
            if let Some(history) = config["history"].as_array_mut() {
                history.push(serde_json::json!({"created_by": "imagebuild e2e: fixture files"}));
            }
            layers.push(layer);
        }
        let config = Config::oci_v1(serde_json::to_vec(&config).unwrap(), None);
        client
            .push(&target.parse().unwrap(), &layers, config, auth, None)
            .await
            .unwrap_or_else(|e| panic!("push {target}: {e}"));
    }

    /// The digest the registry serves for `image`, or `None` if it has no such tag.
    pub async fn digest(&self, image: &str, auth: &RegistryAuth) -> Option<String> {
        oci()
            .fetch_manifest_digest(&image.parse().unwrap(), auth)
            .await
            .ok()
    }

    /// Runs `image` as a pod on the real node with `sh -c script` and returns its output.
    pub async fn run_pod(
        &self,
        pods: &Api<Pod>,
        name: &str,
        image: &str,
        script: &str,
        pull_secret: Option<&str>,
    ) -> String {
        let mut spec = serde_json::json!({
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "nodeSelector": {"imagebuild.dev/real": "true"},
            "tolerations": [{"key": "imagebuild.dev/real", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "main", "image": image, "command": ["sh", "-c", script]}],
        });
        if let Some(secret) = pull_secret {
            spec["imagePullSecrets"] = serde_json::json!([{"name": secret}]);
        }
        let pod: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "spec": spec}))
                .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let done = eventually(
            Duration::from_secs(180),
            &format!("pod {name} to finish"),
            || async {
                let pod = pods.get(name).await.ok()?;
                let phase = pod.status.as_ref()?.phase.clone()?;
                (phase == "Succeeded" || phase == "Failed").then_some(pod)
            },
        )
        .await;
        let logs = pods.logs(name, &LogParams::default()).await.unwrap();
        let status = done.status.unwrap();
        assert_eq!(
            status.phase.as_deref(),
            Some("Succeeded"),
            "pod {name} of {image}: {status:?}\n{logs}"
        );
        assert_eq!(
            done.spec.unwrap().node_name.as_deref(),
            Some(self.node.as_str())
        );
        logs
    }
}

/// The termination messages of the build pods in `pods`' namespace, by pod name, as their
/// build containers finish (the operator deletes them soon after).
pub fn watch_termination_messages(pods: Api<Pod>) -> Arc<Mutex<BTreeMap<String, String>>> {
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        let config =
            watcher::Config::default().labels("app.kubernetes.io/managed-by=imagebuild-operator");
        let mut events = watcher(pods, config).boxed();
        while let Some(Ok(event)) = events.next().await {
            let (watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) = event else {
                continue;
            };
            let message = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone());
            if let Some(message) = message {
                seen.lock().unwrap().insert(pod.name_any(), message);
            }
        }
    });
    out
}

/// The reports among `messages` (termination messages the wrapper wrote).
pub fn reports(messages: &Mutex<BTreeMap<String, String>>) -> BTreeMap<String, BuildReport> {
    messages
        .lock()
        .unwrap()
        .iter()
        .map(|(pod, m)| {
            let report = BuildReport::parse(m)
                .unwrap_or_else(|| panic!("pod {pod}: no report in its termination message: {m}"));
            (pod.clone(), report)
        })
        .collect()
}

/// The Dockerfile of the fixture repository: a multi-stage builder (its source from the
/// repository, an optional slow step, the agent files under /agent-server) and a base
/// stage on an upstream image that fails or hangs when the upstream image says so.
pub const DOCKERFILE: &str = r#"ARG BUSYBOX
ARG BASE_IMAGE=scratch
FROM ${BUSYBOX} AS source
ARG SLOW=0
COPY agent /src/agent
RUN sleep "$SLOW" && mkdir -p /agent-server && cp -r /src/agent/. /agent-server/ \
 && echo "from the builder" > /agent-server/from-builder.txt

FROM ${BUSYBOX} AS builder
COPY --from=source /agent-server /agent-server

FROM ${BASE_IMAGE} AS base-image-minimal
RUN if [ -e /fail-build ]; then i=0; while [ $i -lt 20000 ]; do \
      echo "pip log line $i: Collecting package-$i from the local index, a long line as pip writes"; \
      i=$((i+1)); done; echo "this base cannot be built" >&2; exit 1; fi; \
    if [ -e /slow ]; then sleep 600; fi; \
    echo "base of $(cat /upstream.txt)" > /base.txt
"#;

/// The assembly Dockerfile, as OpenHands writes it.
pub const ASSEMBLY: &str = "ARG BASE_IMAGE\nARG BUILDER_IMAGE\nFROM ${BUILDER_IMAGE} AS builder\nFROM ${BASE_IMAGE}\nCOPY --from=builder /agent-server /agent-server\n";

/// The post-assembly layer (sphinx-doc's pin, in place).
pub const POST_ASSEMBLY: &str =
    "ARG ASSEMBLY_IMAGE\nFROM ${ASSEMBLY_IMAGE}\nRUN echo 'docutils<0.21' > /post-assembly.txt\n";

/// How a run on the real node is made.
pub struct RealRun<'a> {
    pub name: &'a str,
    /// Where every image of the run goes (and its upstream images and busybox are).
    pub registry: &'a str,
    /// A path prefix in it, unique to the test.
    pub prefix: &'a str,
    pub executor: &'a str,
    /// `rootless` or `privileged`.
    pub mode: &'a str,
    /// The fixture repository's URL and revision.
    pub git: &'a str,
    pub revision: &'a str,
    /// The ConfigMap with the instance list (JSON lines with `id` and `image`).
    pub instances: &'a str,
    pub push_secret: Option<&'a str>,
    /// Seconds the builder's slow step sleeps.
    pub builder_sleep: u32,
    pub max_workers: u32,
    pub build_timeout: &'a str,
    pub attempts: u32,
}

impl RealRun<'_> {
    /// The ImageBuildRun: builder and bases from the fixture repository, assemblies and the
    /// sphinx-doc post layer inline, the builder's layer cache in the registry.
    pub fn resource(&self) -> ImageBuildRun {
        let (registry, prefix) = (self.registry, self.prefix);
        let secret = self
            .push_secret
            .map(|s| format!("pushSecretRef: {{name: {s}}},"))
            .unwrap_or_default();
        let yaml = format!(
            r#"
apiVersion: imagebuild.dev/v1alpha1
kind: ImageBuildRun
metadata: {{name: {name}}}
spec:
  instances: {{configMap: {{name: {instances}, key: instances.jsonl}}}}
  vars: {{sdkSha: 43376f18a9c1, dockerfileHash: 93c33d0, busybox: "{registry}/{prefix}/busybox:e2e"}}
  builder:
    context: {{git: {{url: "{git}", revision: "{{{{ revision }}}}"}}}}
    dockerfile: docker/Dockerfile
    target: builder
    buildArgs: {{BUSYBOX: "{{{{ busybox }}}}", SLOW: "{sleep}"}}
    image: "{registry}/{prefix}/eval-builder:{{{{ sdkSha | short }}}}"
    cache: max
    cacheRef: "{registry}/{prefix}/eval-cache:builder"
  base:
    context: {{git: {{url: "{git}", revision: "{{{{ revision }}}}"}}}}
    dockerfile: docker/Dockerfile
    target: base-image-minimal
    buildArgs: {{BASE_IMAGE: "{{{{ upstreamImage }}}}", BUSYBOX: "{{{{ busybox }}}}"}}
    image: "{registry}/{prefix}/eval-base:{{{{ dockerfileHash }}}}-{{{{ customTag }}}}"
  assembly:
    context: {{inline: {assembly}}}
    buildArgs: {{BASE_IMAGE: "{{{{ base.image }}}}", BUILDER_IMAGE: "{{{{ builder.image }}}}"}}
    image: "{registry}/{prefix}/eval-agent-server:{{{{ sdkSha | short }}}}-{{{{ dockerfileHash }}}}-{{{{ instanceId | lower }}}}-source-minimal"
  postAssembly:
    match: "^sphinx-doc__"
    context: {{inline: {post}}}
    buildArgs: {{ASSEMBLY_IMAGE: "{{{{ assembly.image }}}}"}}
  registry: {{{secret} insecure: true}}
  maxWorkers: {workers}
  retry: {{attempts: {attempts}, backoff: {{initial: 1s, max: 2s}}}}
  timeouts: {{build: {timeout}, pending: 5m, run: 30m}}
  placement:
    nodeSelector: {{imagebuild.dev/real: "true"}}
    tolerations: [{{key: imagebuild.dev/real, operator: Exists, effect: NoSchedule}}]
    cpu: 250m
    memory: 1Gi
    ephemeralStorage: 4Gi
  executor: {{image: "{executor}", mode: {mode}}}
"#,
            name = self.name,
            instances = self.instances,
            git = self.git,
            sleep = self.builder_sleep,
            assembly = serde_json::to_string(ASSEMBLY).unwrap(),
            post = serde_json::to_string(POST_ASSEMBLY).unwrap(),
            workers = self.max_workers,
            attempts = self.attempts,
            timeout = self.build_timeout,
            executor = self.executor,
            mode = self.mode,
        );
        let mut run: ImageBuildRun = serde_yaml_ng::from_str(&yaml).unwrap();
        run.spec
            .vars
            .insert("revision".into(), self.revision.to_string());
        run
    }
}
