#!/usr/bin/env bash
# Real-endpoint check: `rehydrate restore` against nginx serving a snapshot
# S3-style (path style, signatures ignored), on the four ports of
# /work/shared/bench/nginx.conf.in:
#
#   9080 clean
#   9082 token bucket 300 req/s (burst 30), excess 503 SlowDown; the client
#        runs with rate_limit.requests_per_sec = 300, request_burst = 30
#   9083 ~1.2 % of keys answer 500 InternalError; --secondary file://<store>
#   9084 the same keys served at 256 KiB/s (stragglers); --secondary too
#
# It prints one row per port: seconds, GiB/s, requests, retries, fallbacks,
# blocks served per source, exit code. Figures, not a pass/fail: the ports
# with faults are expected to succeed through their secondary.
#
# Usage: benches/nginx_check.sh [SIZE_MIB (default 1024)] [BLOCK (default 1MiB)]
# Env:   NGINX_CONF_IN  (default /work/shared/bench/nginx.conf.in; the two XML
#                        error bodies are read from the same directory)
#        TARGET_DIR     where restored volumes are written (default /tmp;
#                        each is removed after its run)
#        REHYDRATE      the binary (default: the release build of /work/main
#                        if present, else a debug build of this checkout)
#
# Needs: nginx, python3 (for the JSON), bash. Installs nothing: if nginx is
# missing it says so and stops. The store and the source volume live in tmpfs
# (/dev/shm) so nginx serves from memory; everything is removed on exit.
set -euo pipefail

SIZE_MIB=${1:-1024}
BLOCK=${2:-1MiB}
CONF_IN=${NGINX_CONF_IN:-/work/shared/bench/nginx.conf.in}
TARGET_PARENT=${TARGET_DIR:-/tmp}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/e2e/lib.sh
source "$HERE/benches/e2e/lib.sh"

missing=()
command -v nginx >/dev/null 2>&1 || missing+=("nginx (Debian package: apt-get install nginx)")
command -v python3 >/dev/null 2>&1 || missing+=("python3 (to read the --json reports)")
while IFS= read -r line; do missing+=("$line"); done < <(nginx_fixture_missing "$CONF_IN")
if ((${#missing[@]})); then
    echo "nginx_check: cannot run, missing:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 2
fi

build=release
if [[ -n ${REHYDRATE:-} ]]; then
    BIN=$REHYDRATE
    build="given ($BIN)"
elif [[ -x /work/main/target/release/rehydrate ]]; then
    BIN=/work/main/target/release/rehydrate
else
    echo "nginx_check: no release build at /work/main/target/release/rehydrate; building debug" >&2
    (cd "$HERE" && cargo build --quiet)
    BIN=${CARGO_TARGET_DIR:-$HERE/target}/debug/rehydrate
    build="DEBUG (figures are not release figures)"
fi

WORK=$(mktemp -d /dev/shm/rehydrate-nginx.XXXXXX)
OUT=$(mktemp -d "$TARGET_PARENT/rehydrate-nginx-target.XXXXXX")
RUN=$WORK/run
ROOT=$WORK/root
STORE=$ROOT/bucket/snap

cleanup() {
    nginx_stop "$RUN"
    rm -rf "$WORK" "$OUT"
}
trap cleanup EXIT INT TERM

mkdir -p "$STORE" "$WORK/state"

echo "nginx_check: binary $BIN [$build]; volume ${SIZE_MIB} MiB in $BLOCK blocks; store in $WORK; targets in $OUT" >&2
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$WORK/source.img"
"$BIN" snapshot create --source "$WORK/source.img" --store "file://$STORE" --name vol --block-size "$BLOCK" --json \
    >"$WORK/snapshot.json"
rm -f "$WORK/source.img" # the restore is checked against the manifest (rehydrate verify), not this copy

nginx_write_conf "$CONF_IN" "$RUN" "$ROOT"
nginx_start "$RUN"

base_config() {
    cat <<EOF
[checkpoint]
dir = "$WORK/state"
EOF
}
base_config >"$WORK/clean.toml"
{
    base_config
    printf '[rate_limit]\nrequests_per_sec = 300\nrequest_burst = 30\n'
} >"$WORK/rate300.toml"

export AWS_ACCESS_KEY_ID=nginx-ignores-signatures AWS_SECRET_ACCESS_KEY=nginx-ignores-signatures
export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
unset AWS_PROFILE AWS_SESSION_TOKEN

rows=()
run() { # port config label [restore args...]
    local port=$1 config=$2 label=$3
    shift 3
    local target=$OUT/vol-$port.img code=0
    AWS_ENDPOINT_URL=http://127.0.0.1:$port "$BIN" restore --manifest s3://bucket/snap/vol.manifest \
        --target "$target" --config "$config" --restart --json "$@" >"$WORK/report-$port.json" \
        2>"$WORK/stderr-$port.log" || code=$?
    local verified=-
    if ((code == 0)); then
        if "$BIN" verify --manifest "file://$STORE/vol.manifest" --target "$target" >/dev/null 2>&1; then
            verified=yes
        else
            verified=NO
        fi
    else
        echo "port $port exited $code; last stderr lines:" >&2
        tail -3 "$WORK/stderr-$port.log" >&2
    fi
    rows+=("$(python3 - "$WORK/report-$port.json" "$port" "$label" "$code" "$verified" <<'PY'
import json, sys
path, port, label, code, verified = sys.argv[1:]
try:
    r = json.load(open(path))
except Exception:
    r = {}
f = r.get("fetch", {})
secs = r.get("duration_secs")
gibs = r.get("throughput_bytes_per_sec", 0) / 2**30 if secs else None
served = " ".join(f"{name}={n}" for name, n in f.get("served_by_source", [])) or "-"
fmt = lambda v, spec: format(v, spec) if v is not None else "-"
print("\t".join([port, label, fmt(secs, ".2f"), fmt(gibs, ".3f"), str(f.get("requests", "-")),
                 str(f.get("retries", "-")), str(f.get("fallbacks", "-")), served,
                 str(r.get("blocks_failed", "-")), verified, code]))
PY
)")
    rm -f "$target"
}

run 9080 "$WORK/clean.toml" clean
run 9082 "$WORK/rate300.toml" "300req/s"
run 9083 "$WORK/clean.toml" "1%-500" --secondary "file://$STORE"
run 9084 "$WORK/clean.toml" "1%-slow" --secondary "file://$STORE"

objects=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r.get("objects_stored", "?"))' "$WORK/snapshot.json")
echo
echo "rehydrate restore via nginx: ${SIZE_MIB} MiB volume, $BLOCK blocks, $objects objects; binary: $build"
{
    printf 'port\tfault\tseconds\tGiB/s\trequests\tretries\tfallbacks\tserved\tfailed\tverified\texit\n'
    printf '%s\n' "${rows[@]}"
} | column -t -s $'\t'
