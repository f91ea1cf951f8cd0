#!/usr/bin/env bash
# EBS benchmark (issue 14, point 4): the same EBS snapshot restored by
# rehydrate (`restore --manifest ebs://snap-...`) and by `coldsnap download`,
# against the same endpoint, on one machine:
#
#   benches/ebs.sh [--size-mib N (default 1024)] [--runs N (default 3)]
#
# A seeded image of N MiB (the sample volume: some zero, some identical
# 512 KiB blocks) is served as one snapshot by the in-process EBS direct APIs
# server run standalone (`examples/ebs_server.rs`: ListSnapshotBlocks paged,
# GetSnapshotBlock with x-amz-Checksum, tokens checked; no auth, no added
# latency: it measures the clients). Each round restores it with both tools
# (the order alternates) to fresh files under TARGET_DIR, checks each output
# against the image (cmp on the first N MiB; the rest of the 1 GiB-multiple
# volume must be zeros), and prints seconds and MiB/s per tool. Ends with the
# medians and the ratio rehydrate/coldsnap (throughput; > 1: rehydrate faster).
#
# Needs the release binary and example (built here if missing:
# CARGO_TARGET_DIR=/work/target-release cargo build --release --bin rehydrate
# --example ebs_server), coldsnap (cargo install coldsnap --locked), cmp.
# Removes what it creates on exit.
#
# Env: TARGET_DIR (default /tmp), REHYDRATE (default: the release binary),
#      EBS_SERVER (default: the release example), COLDSNAP (default: coldsnap
#      on the PATH), SEED (1).
set -euo pipefail

SIZE_MIB=1024
RUNS=3
while (($#)); do
    case $1 in
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "ebs: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
RELEASE=${CARGO_TARGET_DIR:-/work/target-release}/release
REHYDRATE=${REHYDRATE:-$RELEASE/rehydrate}
EBS_SERVER=${EBS_SERVER:-$RELEASE/examples/ebs_server}
COLDSNAP=${COLDSNAP:-$(command -v coldsnap || true)}
TARGET_DIR=${TARGET_DIR:-/tmp}
SEED=${SEED:-1}
[ -x "$COLDSNAP" ] || { echo "ebs: coldsnap not found (cargo install coldsnap --locked)" >&2; exit 2; }
if [ ! -x "$REHYDRATE" ] || [ ! -x "$EBS_SERVER" ]; then
    CARGO_TARGET_DIR=${RELEASE%/release} cargo build --release --bin rehydrate --example ebs_server
fi

WORK=$(mktemp -d "$TARGET_DIR/ebs-bench.XXXXXX")
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

SNAP=snap-0123456789abcdef0
IMAGE=$WORK/image.raw
python3 - "$IMAGE" "$SIZE_MIB" "$SEED" <<'PY'
import hashlib, sys
path, size_mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = 512 * 1024
with open(path, "wb") as f:
    for i in range(size_mib * 2):
        kind = hashlib.sha256(f"{seed}:{i}".encode()).digest()[0]
        if kind < 26:          # ~10 %: zero blocks (not stored in the snapshot)
            f.write(bytes(block))
        elif kind < 51:        # ~10 %: one repeated block
            f.write(hashlib.sha256(f"{seed}:dup".encode()).digest() * (block // 32))
        else:                  # the rest: distinct, incompressible-ish
            seedb = hashlib.sha256(f"{seed}:{i}:data".encode()).digest()
            f.write(hashlib.shake_256(seedb).digest(block))
PY

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$EBS_SERVER" "$IMAGE" "$SNAP" "$PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 600); do grep -q '^ready' "$WORK/server.log" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready' "$WORK/server.log" || { echo "ebs: server did not start: $(cat "$WORK/server.log")" >&2; exit 1; }
ENDPOINT=http://127.0.0.1:$PORT
: >"$WORK/none" # an empty AWS config and credentials file: only the environment counts
export AWS_ENDPOINT_URL=$ENDPOINT AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench \
    AWS_EC2_METADATA_DISABLED=true AWS_CONFIG_FILE=$WORK/none AWS_SHARED_CREDENTIALS_FILE=$WORK/none
unset AWS_PROFILE AWS_SESSION_TOKEN
cat >"$WORK/rehydrate.toml" <<TOML
[checkpoint]
dir = "$WORK/state"
TOML

check() { # the output holds the image, then zeros
    cmp -n "$((SIZE_MIB << 20))" "$IMAGE" "$1" >/dev/null || { echo "ebs: $1 differs from the image" >&2; exit 1; }
    local rest=$(($(stat -c %s "$1") - (SIZE_MIB << 20)))
    if [ "$rest" -gt 0 ]; then
        cmp -n "$rest" -i "$((SIZE_MIB << 20)):0" "$1" /dev/zero >/dev/null || { echo "ebs: $1 not zero past the image" >&2; exit 1; }
    fi
}
run_rehydrate() {
    rm -f "$WORK/out-r.img"
    local t0=$(date +%s.%N)
    "$REHYDRATE" restore --manifest "ebs://$SNAP" --target "$WORK/out-r.img" --config "$WORK/rehydrate.toml" >/dev/null
    local t1=$(date +%s.%N)
    check "$WORK/out-r.img"
    rm -f "$WORK/out-r.img"
    echo "$t1 - $t0" | bc -l
}
run_coldsnap() {
    rm -f "$WORK/out-c.img"
    local t0=$(date +%s.%N)
    "$COLDSNAP" --endpoint "$ENDPOINT" --region us-east-1 download "$SNAP" "$WORK/out-c.img" >/dev/null 2>&1
    local t1=$(date +%s.%N)
    check "$WORK/out-c.img"
    rm -f "$WORK/out-c.img"
    echo "$t1 - $t0" | bc -l
}

R=() C=()
for run in $(seq 1 "$RUNS"); do
    if ((run % 2)); then r=$(run_rehydrate); c=$(run_coldsnap); else c=$(run_coldsnap); r=$(run_rehydrate); fi
    R+=("$r") C+=("$c")
    printf 'run %d: rehydrate %.2f s (%.0f MiB/s)   coldsnap %.2f s (%.0f MiB/s)\n' \
        "$run" "$r" "$(echo "$SIZE_MIB / $r" | bc -l)" "$c" "$(echo "$SIZE_MIB / $c" | bc -l)"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
mr=$(median "${R[@]}") mc=$(median "${C[@]}")
printf 'median of %d: rehydrate %.2f s (%.0f MiB/s), coldsnap %.2f s (%.0f MiB/s), ratio rehydrate/coldsnap throughput %.2f\n' \
    "$RUNS" "$mr" "$(echo "$SIZE_MIB / $mr" | bc -l)" "$mc" "$(echo "$SIZE_MIB / $mc" | bc -l)" "$(echo "$mc / $mr" | bc -l)"
