# The build pod's entry point (run as `sh -c <this> imagebuild-build <command> <args>...`):
# runs the build command, then writes one JSON object to the termination message, which the
# operator reads back: the exit code, the pushed image's digest, the seconds spent in the
# whole build and in pushing, and the tail of the output when the build failed.
# Environment: IMAGEBUILD_DOCKERFILE, the Dockerfile text of an inline context;
# IMAGEBUILD_HTTP_REGISTRIES, registry hosts BuildKit speaks plain HTTP to (pulls and
# pushes; spec.registry.insecure); IMAGEBUILD_WORK_DIR and IMAGEBUILD_TERMINATION_LOG,
# for tests.
set -u
work=${IMAGEBUILD_WORK_DIR:-/work}
result=${IMAGEBUILD_TERMINATION_LOG:-/dev/termination-log}
if [ -n "${IMAGEBUILD_DOCKERFILE:-}" ]; then
  mkdir -p "$work/context"
  printf '%s\n' "$IMAGEBUILD_DOCKERFILE" >"$work/context/Dockerfile"
fi
if [ -n "${IMAGEBUILD_HTTP_REGISTRIES:-}" ]; then
  for host in $IMAGEBUILD_HTTP_REGISTRIES; do
    printf '[registry."%s"]\n  http = true\n  insecure = true\n' "$host"
  done >"$work/buildkitd.toml"
  BUILDKITD_FLAGS="${BUILDKITD_FLAGS:-} --config=$work/buildkitd.toml"
  export BUILDKITD_FLAGS
fi
start=$(date +%s)
{
  "$@" 2>&1
  echo $? >"$work/exit-code"
} | tee "$work/build.log"
code=$(cat "$work/exit-code" 2>/dev/null || echo 1)
end=$(date +%s)
digest=$(sed -n 's/.*"containerimage\.digest": *"\(sha256:[0-9a-f]*\)".*/\1/p' \
  "$work/metadata.json" 2>/dev/null | head -n 1)
push=$(sed -n 's/.*pushing layers \([0-9.]*\)s done.*/\1/p' "$work/build.log" |
  awk '{ s += $1 } END { printf "%d", s }')
tail=""
if [ "$code" != 0 ]; then
  # The last lines, at most 2,500 bytes, as a JSON string (4 KiB is the message's limit).
  tail=$(tail -n 40 "$work/build.log" | tail -c 2500 | tr -d '\000-\010\013-\037' |
    tr '\t' ' ' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' | awk '{ printf "%s\\n", $0 }')
fi
printf '{"exitCode":%d,"digest":"%s","buildSeconds":%d,"pushSeconds":%d,"errorTail":"%s"}\n' \
  "$code" "$digest" "$((end - start))" "${push:-0}" "$tail" >"$result"
exit "$code"
