//! The environment started by `e2e/cluster up`: control plane, registries, Prometheus.
//!
//! Tests find it through the variables `e2e/cluster env` exports. A test that needs it and
//! does not find it fails, saying how to start it: it never passes silently.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};

/// Where the running environment is, read from the variables of `e2e/cluster env`.
pub struct Env {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub registry: String,
    pub auth_registry: String,
    pub auth_user: String,
    pub auth_password: String,
    pub auth_dockerconfig: PathBuf,
    pub prometheus: String,
    pub prometheus_targets: PathBuf,
    pub prometheus_rules: PathBuf,
    pub metrics_addr: String,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: this test needs the local control plane, registries and \
             Prometheus. Run the suite with `e2e/cluster test`, or start them with \
             `e2e/cluster up` and then `eval \"$(e2e/cluster env)\"`."
        )
    })
}

impl Env {
    pub fn get() -> Env {
        let env = Env {
            dir: var("IMAGEBUILD_E2E_DIR").into(),
            bin: var("IMAGEBUILD_E2E_BIN").into(),
            registry: var("IMAGEBUILD_REGISTRY"),
            auth_registry: var("IMAGEBUILD_AUTH_REGISTRY"),
            auth_user: var("IMAGEBUILD_AUTH_REGISTRY_USER"),
            auth_password: var("IMAGEBUILD_AUTH_REGISTRY_PASSWORD"),
            auth_dockerconfig: var("IMAGEBUILD_AUTH_REGISTRY_DOCKERCONFIG").into(),
            prometheus: var("IMAGEBUILD_PROMETHEUS"),
            prometheus_targets: var("IMAGEBUILD_PROMETHEUS_TARGETS").into(),
            prometheus_rules: var("IMAGEBUILD_PROMETHEUS_RULES").into(),
            metrics_addr: var("IMAGEBUILD_METRICS_ADDR"),
        };
        var("KUBECONFIG");
        assert!(
            env.dir.join("pids").is_dir(),
            "IMAGEBUILD_E2E_DIR={} holds no running environment: run `e2e/cluster up`",
            env.dir.display()
        );
        env
    }

    /// A client with the admin credentials of the environment's kubeconfig.
    pub async fn client(&self) -> Client {
        install_crypto_provider();
        Client::try_default()
            .await
            .expect("kube client from KUBECONFIG (is `e2e/cluster up` running?)")
    }

    /// Prints the tail of every component's log if the test panics while it is alive.
    pub fn logs_on_failure(&self) -> LogsOnFailure {
        LogsOnFailure(self.dir.join("logs"))
    }
}

/// rustls needs one process-wide crypto provider; the project uses ring.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub struct LogsOnFailure(PathBuf);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_log_tails(&self.0, 40);
        }
    }
}

fn print_log_tails(dir: &Path, lines: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        eprintln!("---- {} (last {} lines)", path.display(), tail.len());
        for line in tail {
            eprintln!("{line}");
        }
    }
}

/// Polls `probe` every 200 ms until it returns `Some`, for at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A namespace of its own for one test, with its default ServiceAccount in place (pods
/// are refused until the controller manager has made it).
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    pub async fn create(client: &Client, prefix: &str) -> TestNamespace {
        let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"imagebuild.dev/e2e": "true"}}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        eventually(
            Duration::from_secs(60),
            "the default ServiceAccount",
            || {
                let sas = sas.clone();
                async move { sas.get_opt("default").await.ok().flatten() }
            },
        )
        .await;
        TestNamespace {
            name,
            client: client.clone(),
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Deletes the namespace (and so everything in it). Left in place when a test fails,
    /// for a look with kubectl.
    /// A namespace already going (404, or 409 while it terminates) is fine; other errors
    /// are retried for a while, as a busy API server may drop a request now and then.
    pub async fn delete(self) {
        let namespaces = Api::<Namespace>::all(self.client.clone());
        let mut last = None;
        for _ in 0..10 {
            match namespaces
                .delete(&self.name, &DeleteParams::background())
                .await
            {
                Ok(_) => return,
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("delete namespace {}: {}", self.name, last.unwrap());
    }
}

/// Applies the project's CRD (server-side apply) and waits until it is served.
pub async fn apply_crd(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    use kube::runtime::wait::{await_condition, conditions};

    let text = std::fs::read_to_string(imagebuild_operator::crd::CRD_PATH).unwrap();
    let crd: CustomResourceDefinition = serde_yaml_ng::from_str(&text).unwrap();
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let name = crd.metadata.name.clone().unwrap();
    let apply = PatchParams::apply("imagebuild-e2e").force();
    crds.patch(&name, &apply, &Patch::Apply(&crd))
        .await
        .unwrap();
    let established = await_condition(crds, &name, conditions::is_crd_established());
    tokio::time::timeout(Duration::from_secs(60), established)
        .await
        .expect("CRD established in time")
        .unwrap();
}

/// The operator binary, running against the environment and watching one namespace;
/// killed (SIGKILL) when dropped. Its log is printed if the test fails.
pub struct Operator {
    child: std::process::Child,
    log: PathBuf,
    /// Started under a wrapper, in a process group of its own.
    grouped: bool,
}

impl Operator {
    pub fn start(namespace: &str) -> Operator {
        Self::start_with(namespace, &[])
    }

    /// Starts it with extra arguments to `run`. Its metrics endpoint listens on a free
    /// loopback port (see [`Operator::metrics_addr`]) unless `args` name one.
    pub fn start_with(namespace: &str, args: &[&str]) -> Operator {
        Self::start_as(namespace, args, None)
    }

    /// Starts it with the credentials of `kubeconfig` (default: the environment's admin).
    pub fn start_as(namespace: &str, args: &[&str], kubeconfig: Option<&Path>) -> Operator {
        Self::spawn(
            namespace,
            args,
            kubeconfig,
            "info,imagebuild_operator=debug",
        )
    }

    /// Starts it logging at `info`, as installed (the benchmark: debug lines cost CPU).
    pub fn start_quiet(namespace: &str, args: &[&str]) -> Operator {
        Self::spawn(namespace, args, None, "info")
    }

    fn spawn(
        namespace: &str,
        args: &[&str],
        kubeconfig: Option<&Path>,
        rust_log: &str,
    ) -> Operator {
        let any_port = ["--metrics-address", "127.0.0.1:0"];
        let endpoint: &[&str] = if args.contains(&"--metrics-address") {
            &[]
        } else {
            &any_port
        };
        let log = std::env::temp_dir().join(format!(
            "imagebuild-operator-{namespace}-{}.log",
            rand::random::<u32>()
        ));
        let file = std::fs::File::create(&log).unwrap();
        // A profiler to run it under (`e2e/bench` says how), e.g. `heaptrack -o FILE` (with
        // the operator built `--no-default-features`: heaptrack sees only malloc's calls).
        let wrapper = std::env::var("IMAGEBUILD_OPERATOR_WRAPPER").unwrap_or_default();
        let mut command: Vec<&str> = wrapper.split_whitespace().collect();
        command.push(env!("CARGO_BIN_EXE_imagebuild-operator"));
        let mut spawn = std::process::Command::new(command[0]);
        if !wrapper.is_empty() {
            // A group of its own, so that a kill takes the operator the wrapper started.
            std::os::unix::process::CommandExt::process_group(&mut spawn, 0);
        }
        let child = spawn
            .args(&command[1..])
            .args(["run", "--namespace", namespace])
            .args(args)
            .args(endpoint)
            .envs(kubeconfig.map(|k| ("KUBECONFIG", k)))
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start imagebuild-operator");
        Operator {
            child,
            log,
            grouped: !wrapper.is_empty(),
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the operator to exit; its exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        self.wait(timeout)
    }

    /// Waits up to `timeout` for the operator to exit; its exit status.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Sends `signal` (e.g. STOP, CONT) to the operator.
    pub fn signal(&self, signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal}");
    }

    /// The address of its /metrics, /healthz and /readyz, as it logged it on start.
    pub fn metrics_addr(&self) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            let found = log
                .lines()
                .filter(|l| l.contains("serving /metrics"))
                .find_map(|l| l.split("address=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string);
            if let Some(address) = found {
                return address;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the operator logged no metrics address in 30 s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its peak resident memory so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// The CPU time it used so far (user and system), in seconds.
    pub fn cpu_seconds(&self) -> Option<f64> {
        process_cpu_seconds(self.pid())
    }

    /// Kills the operator at once, as a crash would (under a wrapper, its whole group:
    /// killing the wrapper alone would leave the operator running).
    pub fn kill(&mut self) {
        if self.grouped && matches!(self.child.try_wait(), Ok(None)) {
            let group = format!("-{}", self.child.id());
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &group])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("---- operator log {} (last 60 lines)", self.log.display());
            for line in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// The CPU time process `pid` used so far (user and system), in seconds.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The environment, its logs printed on failure, and a fresh namespace with the CRD in
/// place.
pub async fn setup(prefix: &str) -> (Env, LogsOnFailure, TestNamespace) {
    let env = Env::get();
    let logs = env.logs_on_failure();
    let client = env.client().await;
    apply_crd(&client).await;
    let ns = TestNamespace::create(&client, prefix).await;
    (env, logs, ns)
}

/// A kubeconfig for the environment's API server with `token` as the only credential.
pub fn token_kubeconfig(token: &str, path: &Path) {
    let admin: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(std::env::var("KUBECONFIG").unwrap()).unwrap(),
    )
    .unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": cluster}],
        "users": [{"name": "user", "user": {"token": token}}],
        "contexts": [{"name": "user", "context": {"cluster": "e2e", "user": "user"}}],
        "current-context": "user",
    });
    std::fs::write(path, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
}
