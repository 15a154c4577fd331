# The build pod's entry point (run as `sh /imagebuild/build.sh <buildctl args>...`, from the
# run's wrapper ConfigMap):
# starts buildkitd for this one build (through rootlesskit in rootless mode), runs
# `buildctl build` against it, stops it, and writes one JSON object to the termination
# message, which the operator reads back: the exit code, the pushed image's digest, the
# seconds spent in the whole build and in pushing, the steps BuildKit found cached, which
# stage failed, and the tail of the output when something failed.
# A daemon that does not start is reported as stage "start", its log's telling line last.
# Environment: IMAGEBUILD_EXECUTOR_MODE (rootless | privileged); BUILDKITD_FLAGS, extra
# flags for buildkitd; IMAGEBUILD_BUILDKIT_ROOT, buildkitd's state directory;
# IMAGEBUILD_DOCKERFILE, the Dockerfile text of an inline context;
# IMAGEBUILD_HTTP_REGISTRIES, registry hosts BuildKit speaks plain HTTP to (pulls, pushes
# and the cache; spec.registry.insecure); IMAGEBUILD_START_TIMEOUT, seconds to wait for the daemon
# (default 60); IMAGEBUILD_WORK_DIR and IMAGEBUILD_TERMINATION_LOG, for tests.
set -u
work=${IMAGEBUILD_WORK_DIR:-/work}
result=${IMAGEBUILD_TERMINATION_LOG:-/dev/termination-log}
daemon_log="$work/buildkitd.log"
build_log="$work/build.log"
start=$(date +%s)
mkdir -p "$work"
: >"$build_log"

if [ -n "${IMAGEBUILD_DOCKERFILE:-}" ]; then
  mkdir -p "$work/context"
  printf '%s\n' "$IMAGEBUILD_DOCKERFILE" >"$work/context/Dockerfile"
fi
flags=${BUILDKITD_FLAGS:-}
if [ -n "${IMAGEBUILD_HTTP_REGISTRIES:-}" ]; then
  for host in $IMAGEBUILD_HTTP_REGISTRIES; do
    printf '[registry."%s"]\n  http = true\n' "$host"
  done >"$work/buildkitd.toml"
  flags="$flags --config=$work/buildkitd.toml"
fi
if [ -n "${IMAGEBUILD_BUILDKIT_ROOT:-}" ]; then
  flags="$flags --root=$IMAGEBUILD_BUILDKIT_ROOT"
fi
addr="unix://$work/buildkitd.sock"
helper=""
if [ "${IMAGEBUILD_EXECUTOR_MODE:-privileged}" = rootless ]; then
  helper=rootlesskit
  # rootlesskit keeps its state there; images that do not set it get one of their own.
  if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    XDG_RUNTIME_DIR="$work/run"
    export XDG_RUNTIME_DIR
  fi
  mkdir -p "$XDG_RUNTIME_DIR"
fi

# The line of the daemon's log that says why it stopped, most telling first: buildkitd's
# own exit message (`buildkitd: ...`, before its stack trace); a user namespace mapping
# refused (newuidmap, newgidmap); a fatal or error log entry, or rootlesskit's parent's
# error; any other error. Never rootlesskit reporting that a process exited or that the
# other side of its pipe went away (in either order with the real cause). Else the log's
# last line.
daemon_cause() {
  cause=""
  for pattern in '^buildkitd: ' 'newuidmap|newgidmap|uid_map|gid_map' \
    'level=(fatal|error)|\[rootlesskit:parent\] error: ' '\] error: |^[Ee]rror'; do
    cause=$(grep -E "$pattern" "$daemon_log" 2>/dev/null |
      grep -vE 'exited: exit status [0-9]+$|\] error: EOF$' | tail -n 1)
    [ -n "$cause" ] && break
  done
  if [ -z "$cause" ]; then
    cause=$(grep -vE '^[[:space:]]|^$' "$daemon_log" 2>/dev/null | tail -n 1)
  fi
  printf '%s' "${cause:-no output}" | cut -c 1-600
}

# One JSON string from text: control characters dropped, tabs as spaces, quotes and
# backslashes escaped, lines joined with \n.
json_text() {
  tr -d '\000-\010\013-\037' | tr '\t' ' ' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' |
    awk '{ printf "%s\\n", $0 }'
}

# report CODE STAGE TAIL_FILE: the termination message.
report() {
  end=$(date +%s)
  digest=$(sed -n 's/.*"containerimage\.digest": *"\(sha256:[0-9a-f]*\)".*/\1/p' \
    "$work/metadata.json" 2>/dev/null | head -n 1)
  push=$(sed -n 's/.*pushing layers \([0-9.]*\)s done.*/\1/p' "$build_log" |
    awk '{ s += $1 } END { printf "%d", s }')
  cached=$(grep -cE '^#[0-9]+ CACHED' "$build_log")
  tail=""
  if [ "$1" != 0 ]; then
    # The last lines, at most 2,500 bytes (4 KiB is the message's limit).
    tail=$(tail -n 40 "$3" | tail -c 2500 | json_text)
  fi
  printf '{"exitCode":%d,"stage":"%s","digest":"%s","buildSeconds":%d,"pushSeconds":%d,"cachedSteps":%d,"errorTail":"%s"}\n' \
    "$1" "$2" "$digest" "$((end - start))" "${push:-0}" "${cached:-0}" "$tail" >"$result"
}

# Whether process $1 runs (a child that exited stays a zombie until waited for).
alive() {
  [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

daemon=""
# Stops the daemon: TERM, then KILL after 10 s (a build step it ran may hold it up).
stop_daemon() {
  [ -n "$daemon" ] || return 0
  kill "$daemon" 2>/dev/null
  i=0
  while alive "$daemon" && [ "$i" -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
  done
  alive "$daemon" && kill -KILL "$daemon" 2>/dev/null
  wait "$daemon" 2>/dev/null
  daemon=""
}
# Killed (the Job's deadline, a deleted pod): say so and exit at once; the container's
# other processes (the daemon, its build steps) end with it.
on_signal() {
  echo "the build was stopped by a signal" >>"$build_log"
  report 143 build "$build_log"
  exit 143
}
trap on_signal TERM INT

$helper buildkitd $flags --addr="$addr" >"$daemon_log" 2>&1 &
daemon=$!
waited=0
limit=$((${IMAGEBUILD_START_TIMEOUT:-60} * 10))
until buildctl --addr="$addr" debug workers >/dev/null 2>&1; do
  if ! alive "$daemon" || [ "$waited" -ge "$limit" ]; then
    if alive "$daemon"; then
      why="buildkitd did not answer within ${IMAGEBUILD_START_TIMEOUT:-60}s: $(daemon_cause)"
    else
      wait "$daemon" 2>/dev/null
      status=$?
      why="buildkitd did not start (exit code $status): $(daemon_cause)"
    fi
    stop_daemon
    { tail -n 30 "$daemon_log"; echo "$why"; } >"$work/start.log"
    cat "$work/start.log"
    report 1 start "$work/start.log"
    exit 1
  fi
  sleep 0.1
  waited=$((waited + 1))
done

# In the background, so that a signal is handled while it runs.
{
  buildctl --addr="$addr" "$@" 2>&1
  echo $? >"$work/exit-code"
} | tee "$build_log" &
build=$!
wait "$build"
code=$(cat "$work/exit-code" 2>/dev/null || echo 1)
if [ "$code" != 0 ] && ! alive "$daemon"; then
  daemon=""
  echo "buildkitd exited during the build: $(daemon_cause)" | tee -a "$build_log"
fi
stop_daemon
report "$code" build "$build_log"
exit "$code"
