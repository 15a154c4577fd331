//! The build pod's wrapper script (`src/job/wrapper.sh`) run for real with stand-ins for
//! buildkitd, buildctl and rootlesskit: what it starts, how it waits for the daemon, and
//! the termination message it writes for a build that succeeds, fails, whose daemon never
//! starts or dies midway. The same script against real BuildKit is `tests/e2e_real.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use imagebuild_operator::job::{self, BuildReport};
use imagebuild_operator::schedule::FailureClass;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;

/// A scratch directory with stand-in executables, and the wrapper run in it.
struct Executor {
    dir: PathBuf,
    /// The shell that runs the wrapper: `sh` (dash on Debian) unless set.
    shell: Vec<String>,
}

/// The stand-in daemon: `FAKE_DAEMON` says whether it comes up (`ok`), prints its log and
/// exits 1 (`fail`), or runs without ever answering (`hang`).
const BUILDKITD: &str = r#"#!/bin/sh
echo "buildkitd $*" >>"$FAKE/calls"
echo $$ >"$FAKE/daemon.pid"
echo 'time="2026-12-01T00:00:00Z" level=info msg="auto snapshotter: using overlayfs"'
case "${FAKE_DAEMON:-ok}" in
  ok)
    touch "$FAKE/up"
    trap 'rm -f "$FAKE/up"; exit 0' TERM
    while :; do sleep 0.05; done ;;
  fail)
    printf '%s\n' "$FAKE_DAEMON_LOG"
    exit 1 ;;
  hang)
    while :; do sleep 0.05; done ;;
esac
"#;

/// The stand-in client: `debug workers` answers while the daemon is up; `build` prints
/// `$FAKE/output`, writes the metadata file if `FAKE_CODE` is 0, and exits with it; with
/// `FAKE_CRASH` set it kills the daemon first, with `FAKE_HANG` it never ends.
const BUILDCTL: &str = r#"#!/bin/sh
echo "buildctl $*" >>"$FAKE/calls"
case "$2" in
  debug) [ -f "$FAKE/up" ] ;;
  build)
    if [ -n "${FAKE_CRASH:-}" ]; then kill -KILL "$(cat "$FAKE/daemon.pid")"; rm -f "$FAKE/up"; fi
    if [ -n "${FAKE_HANG:-}" ]; then echo '#4 [2/2] RUN sleep 600'; echo $$ >"$FAKE/build.pid"; exec sleep 600; fi
    cat "$FAKE/output"
    if [ "${FAKE_CODE:-0}" = 0 ]; then
      printf '{\n  "containerimage.digest": "sha256:abc123",\n  "image.name": "x"\n}\n' \
        >"$IMAGEBUILD_WORK_DIR/metadata.json"
    fi
    exit "${FAKE_CODE:-0}" ;;
esac
"#;

const ROOTLESSKIT: &str = "#!/bin/sh\necho \"rootlesskit $*\" >>\"$FAKE/calls\"\nexec \"$@\"\n";

/// What one wrapper run left.
struct Ran {
    code: i32,
    stdout: String,
    report: BuildReport,
    dir: PathBuf,
}

impl Ran {
    /// The stand-ins' command lines, one a line.
    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.join("calls")).unwrap_or_default()
    }

    /// The calls that started the daemon (buildctl polls it meanwhile).
    fn daemon_calls(&self) -> Vec<String> {
        self.calls()
            .lines()
            .filter(|l| !l.starts_with("buildctl "))
            .map(str::to_string)
            .collect()
    }
}

impl Executor {
    fn new(kind: &str) -> Executor {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "imagebuild-wrapper-{kind}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        for (name, text) in [
            ("buildkitd", BUILDKITD),
            ("buildctl", BUILDCTL),
            ("rootlesskit", ROOTLESSKIT),
        ] {
            let path = dir.join("bin").join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::write(dir.join("output"), "").unwrap();
        Executor {
            dir,
            shell: vec!["sh".into()],
        }
    }

    /// Runs the wrapper with `shell` (e.g. busybox's, as BuildKit's own images have).
    fn shell(mut self, shell: &[&str]) -> Executor {
        self.shell = shell.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The build prints `output`.
    fn output(self, output: &str) -> Executor {
        std::fs::write(self.dir.join("output"), format!("{output}\n")).unwrap();
        self
    }

    /// The wrapper as the build pod runs it (`sh /imagebuild/build.sh build ...`), its work
    /// directory and termination message in the scratch directory.
    fn command(&self) -> Command {
        let script = self.dir.join(job::WRAPPER_KEY);
        std::fs::write(&script, job::WRAPPER).unwrap();
        let path = format!(
            "{}:{}",
            self.dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = Command::new(&self.shell[0]);
        command
            .args(&self.shell[1..])
            .arg(&script)
            .args(["build", "--opt"])
            .arg("platform=linux/amd64")
            .env("PATH", path)
            .env("FAKE", &self.dir)
            .env("IMAGEBUILD_WORK_DIR", self.work())
            .env("IMAGEBUILD_TERMINATION_LOG", self.dir.join("result"))
            .env_remove("XDG_RUNTIME_DIR");
        command
    }

    fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    fn run(&self, command: &mut Command) -> Ran {
        let out = command.output().unwrap();
        let message = std::fs::read_to_string(self.dir.join("result"))
            .unwrap_or_else(|_| panic!("no termination message: {out:?}"));
        let report = BuildReport::parse(&message).unwrap_or_else(|| panic!("{message}"));
        Ran {
            code: out.status.code().unwrap(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            report,
            dir: self.dir.clone(),
        }
    }
}

fn path_in(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn a_successful_build_reports_digest_timings_and_cached_steps() {
    let log = "#5 [2/3] RUN make\n#5 CACHED\n#6 [3/3] COPY . /src\n#6 CACHED\n\
               #12 pushing layers\n#12 pushing layers 2.5s done\n#13 pushing manifest 1.0s done";
    let ex = Executor::new("ok").output(log);
    let ran = ex.run(ex.command().env("IMAGEBUILD_DOCKERFILE", "FROM scratch"));
    assert_eq!(ran.code, 0, "{}", ran.stdout);
    let r = &ran.report;
    assert_eq!((r.exit_code, r.stage.as_str()), (0, "build"));
    assert_eq!(r.digest, "sha256:abc123");
    assert_eq!((r.push_seconds, r.cached_steps), (2, 2));
    assert_eq!(r.error_tail, "");
    assert_eq!(
        std::fs::read_to_string(ex.work().join("context/Dockerfile")).unwrap(),
        "FROM scratch\n"
    );
    assert!(
        ran.stdout.contains("#13 pushing manifest"),
        "the log is shown"
    );
    // A privileged executor: buildkitd as it is, on a socket in the work directory; the
    // build against that socket; the daemon stopped after.
    let addr = format!("--addr=unix://{}", path_in(&ex.work(), "buildkitd.sock"));
    let calls = ran.calls();
    assert_eq!(ran.daemon_calls(), [format!("buildkitd {addr}")], "{calls}");
    assert!(
        calls
            .lines()
            .any(|l| l == format!("buildctl {addr} build --opt platform=linux/amd64")),
        "{calls}"
    );
    assert!(!ex.work().join("up").exists() && !ex.dir.join("up").exists());
}

#[test]
fn a_failed_build_reports_its_output_tail() {
    let mut log = String::new();
    for i in 0..100 {
        log.push_str(&format!("#5 step {i}\n"));
    }
    log.push_str("ERROR: \"quoted\" back\\slash\ttab: no space left on device");
    let ex = Executor::new("fail").output(&log);
    let ran = ex.run(ex.command().env("FAKE_CODE", "1"));
    assert_eq!(ran.code, 1);
    let message = std::fs::read_to_string(ex.dir.join("result")).unwrap();
    assert!(
        message.len() < 4096,
        "termination messages are cut at 4 KiB: {}",
        message.len()
    );
    let r = &ran.report;
    assert_eq!(
        (r.exit_code, r.stage.as_str(), r.digest.as_str()),
        (1, "build", "")
    );
    assert!(
        r.error_tail
            .ends_with("ERROR: \"quoted\" back\\slash tab: no space left on device\n"),
        "{:?}",
        r.error_tail
    );
    assert!(!r.error_tail.contains("step 10\n"), "only the tail is kept");
    assert_eq!(
        job::classify_text(&r.error_tail),
        Some(FailureClass::DiskFull)
    );
}

#[test]
fn rootless_mode_starts_the_daemon_through_rootlesskit_with_its_flags() {
    let ex = Executor::new("rootless");
    let ran = ex.run(
        ex.command()
            .env("IMAGEBUILD_EXECUTOR_MODE", "rootless")
            .env("BUILDKITD_FLAGS", "--oci-worker-no-process-sandbox")
            .env(
                "IMAGEBUILD_BUILDKIT_ROOT",
                "/home/user/.local/share/buildkit",
            )
            .env(
                "IMAGEBUILD_HTTP_REGISTRIES",
                "kind-registry:5000 localhost:5001",
            ),
    );
    assert_eq!(ran.code, 0, "{}", ran.stdout);
    let config = ex.work().join("buildkitd.toml");
    let flags = format!(
        "--oci-worker-no-process-sandbox --config={} --root=/home/user/.local/share/buildkit --addr=unix://{}",
        config.display(),
        path_in(&ex.work(), "buildkitd.sock")
    );
    assert_eq!(
        ran.daemon_calls(),
        [
            format!("rootlesskit buildkitd {flags}"),
            format!("buildkitd {flags}")
        ],
        "{}",
        ran.calls()
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "[registry.\"kind-registry:5000\"]\n  http = true\n[registry.\"localhost:5001\"]\n  http = true\n"
    );
    // An image without XDG_RUNTIME_DIR gets one in the work directory.
    assert!(ex.work().join("run").is_dir());
}

#[test]
fn a_daemon_that_does_not_start_is_reported_with_its_cause_last() {
    // What rootlesskit prints when the node refuses the user namespace mapping.
    let cause = "[rootlesskit:parent] error: failed to setup UID/GID map: newuidmap 25 [0 1000 1 1 100000 65536] failed: newuidmap: write to uid_map failed: Operation not permitted";
    // Seen on the real node in both orders: the child's complaint that its parent went
    // away came before or after the parent's reason.
    let child = "[rootlesskit:child ] error: EOF";
    for log in [
        format!("{cause}\n: exit status 1\n{child}\n"),
        format!("{child}\n{cause}\n: exit status 1\n"),
    ] {
        let ex = Executor::new("nostart-order");
        let ran = ex.run(
            ex.command()
                .env("IMAGEBUILD_EXECUTOR_MODE", "rootless")
                .env("FAKE_DAEMON", "fail")
                .env("FAKE_DAEMON_LOG", &log),
        );
        assert_eq!(
            ran.report.error_tail.lines().last().unwrap(),
            format!("buildkitd did not start (exit code 1): {cause}"),
            "{log}"
        );
    }
    let log = format!(
        "{cause}\n: exit status 1\n[rootlesskit:parent] error: child exited: exit status 1\n"
    );
    let ex = Executor::new("nostart");
    let ran = ex.run(
        ex.command()
            .env("IMAGEBUILD_EXECUTOR_MODE", "rootless")
            .env("FAKE_DAEMON", "fail")
            .env("FAKE_DAEMON_LOG", &log),
    );
    assert_eq!(ran.code, 1);
    let r = &ran.report;
    assert_eq!(r.stage, job::STAGE_START);
    let last = r.error_tail.lines().last().unwrap();
    assert_eq!(
        last,
        format!("buildkitd did not start (exit code 1): {cause}")
    );
    assert!(
        !ran.calls().contains(" build "),
        "no build without a daemon: {}",
        ran.calls()
    );
    assert!(ran.stdout.contains(cause), "the daemon's log is shown");

    // The operator reads that as a failure class of its own, with the cause in it.
    let failure = failed_outcome(&std::fs::read_to_string(ex.dir.join("result")).unwrap());
    assert_eq!(failure.class, FailureClass::ExecutorStartFailed);
    assert!(
        failure
            .message
            .trim_end()
            .ends_with("Operation not permitted")
    );
}

#[test]
fn buildkitds_own_exit_message_wins_over_its_stack_and_rootlesskit() {
    // What buildkitd v0.34 printed on the real node when its runtime directory was missing.
    let log = "buildkitd: mkdir /run/user: permission denied\ncreating trace controller listener\nmain.runTraceController\n\tgithub.com/moby/buildkit@v0.34.2/cmd/buildkitd/main.go:1120\nmain.main\n\tgithub.com/moby/buildkit@v0.34.2/cmd/buildkitd/main.go:495\nruntime.goexit\n\truntime/asm_amd64.s:1771\n[rootlesskit:child ] error: command [buildkitd --addr=unix:///work/buildkitd.sock] exited: exit status 1\n[rootlesskit:parent] error: child exited: exit status 1";
    let ex = Executor::new("stack");
    let ran = ex.run(
        ex.command()
            .env("IMAGEBUILD_EXECUTOR_MODE", "rootless")
            .env("FAKE_DAEMON", "fail")
            .env("FAKE_DAEMON_LOG", log),
    );
    assert_eq!(
        ran.report.error_tail.lines().last().unwrap(),
        "buildkitd did not start (exit code 1): buildkitd: mkdir /run/user: permission denied"
    );
}

#[test]
fn a_daemon_that_never_answers_is_given_up_on() {
    let ex = Executor::new("hang");
    let started = std::time::Instant::now();
    let ran = ex.run(
        ex.command()
            .env("FAKE_DAEMON", "hang")
            .env("IMAGEBUILD_START_TIMEOUT", "1"),
    );
    assert_eq!((ran.code, ran.report.stage.as_str()), (1, "start"));
    assert!(
        ran.report
            .error_tail
            .trim_end()
            .ends_with("buildkitd did not answer within 1s: time=\"2026-12-01T00:00:00Z\" level=info msg=\"auto snapshotter: using overlayfs\""),
        "{}",
        ran.report.error_tail
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // The daemon is stopped, not left behind.
    let pid = std::fs::read_to_string(ex.dir.join("daemon.pid")).unwrap();
    assert!(!Path::new(&format!("/proc/{}", pid.trim())).exists() || zombie(pid.trim()));
}

fn zombie(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(true)
}

#[test]
fn a_daemon_that_dies_during_the_build_is_an_executor_crash() {
    let ex = Executor::new("crash").output("#7 [2/2] RUN make\nerror: failed to receive status: rpc error: code = Unavailable desc = error reading from server: EOF");
    let ran = ex.run(ex.command().env("FAKE_CODE", "1").env("FAKE_CRASH", "1"));
    assert_eq!((ran.code, ran.report.stage.as_str()), (1, "build"));
    assert!(
        ran.report
            .error_tail
            .contains("buildkitd exited during the build"),
        "{}",
        ran.report.error_tail
    );
    let failure = failed_outcome(&std::fs::read_to_string(ex.dir.join("result")).unwrap());
    assert_eq!(failure.class, FailureClass::ExecutorCrashed);
}

/// The failure the operator reads from a failed Job whose pod's termination message is
/// `message`.
fn failed_outcome(message: &str) -> imagebuild_operator::schedule::Failure {
    let job: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "j"},
        "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    }))
    .unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p"},
        "status": {"phase": "Failed", "containerStatuses": [{
            "name": "build", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}}
        }]}
    }))
    .unwrap();
    match job::outcome(&job, Some(&pod)) {
        Some(job::Outcome::Failed { failure, .. }) => failure,
        other => panic!("{other:?}"),
    }
}

#[test]
fn busybox_sh_runs_the_wrapper_too() {
    // BuildKit's own images are Alpine's: busybox's sh and tools.
    let busybox = ["/bin/busybox", "sh"];
    assert!(
        Path::new(busybox[0]).exists(),
        "busybox-static is not installed: run the suite with `e2e/cluster test`, which installs it"
    );
    let ex = Executor::new("busybox-ok")
        .shell(&busybox)
        .output("#6 CACHED\n#12 pushing layers 1.5s done");
    let ran = ex.run(&mut ex.command());
    assert_eq!(ran.code, 0, "{}", ran.stdout);
    assert_eq!(
        (ran.report.digest.as_str(), ran.report.cached_steps),
        ("sha256:abc123", 1)
    );
    let ex = Executor::new("busybox-nostart").shell(&busybox);
    let ran = ex.run(ex.command().env("FAKE_DAEMON", "fail").env(
        "FAKE_DAEMON_LOG",
        "buildkitd: failed to create worker: no such file",
    ));
    assert_eq!(ran.report.stage, job::STAGE_START);
    assert!(
        ran.report
            .error_tail
            .trim_end()
            .ends_with("buildkitd did not start (exit code 1): buildkitd: failed to create worker: no such file"),
        "{}",
        ran.report.error_tail
    );
}

#[test]
fn a_signal_mid_build_is_reported_at_once() {
    // The Job's deadline: the kubelet sends SIGTERM to the wrapper, PID 1 of the container.
    let ex = Executor::new("signal");
    let mut child = ex.command().env("FAKE_HANG", "1").spawn().unwrap();
    let calls = ex.dir.join("calls");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&calls)
        .unwrap_or_default()
        .contains(" build ")
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no build started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let signalled = std::time::Instant::now();
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    assert!(
        signalled.elapsed() < std::time::Duration::from_secs(5),
        "the wrapper took {:?} to stop",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(143));
    let message = std::fs::read_to_string(ex.dir.join("result")).unwrap();
    let report = BuildReport::parse(&message).unwrap();
    assert_eq!((report.exit_code, report.stage.as_str()), (143, "build"));
    assert!(
        report
            .error_tail
            .ends_with("RUN sleep 600\nthe build was stopped by a signal\n"),
        "{:?}",
        report.error_tail
    );
    // Outside a container nothing ends the stand-ins with the wrapper: end them here.
    for pid in ["daemon.pid", "build.pid"] {
        let pid = std::fs::read_to_string(ex.dir.join(pid)).unwrap();
        let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
    }
}
