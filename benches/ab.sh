#!/usr/bin/env bash
# A/B: two rehydrate binaries restoring the same snapshot from the fixture's
# clean port (W1), alternately, in one run, so a change can be checked for a
# regression against the binary before it:
#
#   benches/ab.sh OLD_BINARY NEW_BINARY [--size-mib N (default 2048)] [--runs N (default 5)]
#                 [--block-size SIZE (default 1MiB)] [--port N (default 9080)] [--jobs N]
#
# Builds a seeded volume, snapshots it in SIZE blocks (with NEW) into a tmpfs
# store served by nginx (/work/shared/bench/nginx.conf.in, port 9080; with
# --port 9089 also the fixture's latency.conf.in, 30 ms to first byte: W7
# (--port 9090: the same with delays spread over 22-37 ms, W7s),
# or W8 with --block-size 256KiB; --port 9083: W3, with the store itself as
# the file:// secondary), then alternates OLD and NEW restores (fdatasync
# included; each restore is verified against the manifest outside the timed
# window). Prints each run (wall time, the process's user + sys CPU and peak
# RSS from GNU time) and the medians, and NEW's median time over OLD's.
# --jobs N: W10's shape instead: each run starts `rehydrate serve` and submits
# N restores of the snapshot at once (benches/e2e/jobs.py); the time is until
# the last is done, CPU and RSS the worker's, and each job's time is printed.
# NEW_WRAP: a command NEW runs under (e.g. "strace -f -T -e trace=fdatasync
# -o /tmp/sync.txt"), inside the timing.
# OLD_TOML / NEW_TOML: TOML appended to each binary's config; OLD_PORT: OLD
# restores from that port instead (the same binary twice with --port 9083
# OLD_PORT=9080 compares W3 with W1 in one run).
set -euo pipefail

(($# >= 2)) || { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 2; }
OLD=$1 NEW=$2
shift 2
SIZE_MIB=2048
RUNS=5
BLOCK_SIZE=1MiB
PORT=9080
JOBS=0
while (($#)); do
    case $1 in
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --block-size) BLOCK_SIZE=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    *) echo "ab: unknown argument $1" >&2; exit 2 ;;
    esac
done
HERE=$(cd "$(dirname "$0")/.." && pwd)
CONF_IN=${NGINX_CONF_IN:-/work/shared/bench/nginx.conf.in}
TARGET_PARENT=${TARGET_DIR:-/tmp}
# shellcheck source=benches/e2e/lib.sh
source "$HERE/benches/e2e/lib.sh"
for bin in "$OLD" "$NEW"; do [[ -x $bin ]] || { echo "ab: $bin is not an executable" >&2; exit 2; }; done
command -v nginx >/dev/null || { echo "ab: needs nginx (apt-get install -y nginx)" >&2; exit 2; }

bench_dirs ab
STORE=$WORK/root/bucket/snap
seeded_volume 1 "$SIZE_MIB" "$WORK/source.img"
"$NEW" snapshot create --source "$WORK/source.img" --store "file://$STORE" --name vol --block-size "$BLOCK_SIZE" >/dev/null
rm -f "$WORK/source.img"
nginx_write_conf "$CONF_IN" "$RUN" "$WORK/root"
nginx_start "$RUN"
OLD_PORT=${OLD_PORT:-$PORT}
if [[ " 9089 9090 " == *" $PORT "* || " 9089 9090 " == *" $OLD_PORT "* ]]; then nginx_latency_start "$(dirname "$CONF_IN")" "$RUN" "$WORK/root"; fi
# W3/W4's ports fail some keys on purpose: the store itself is their secondary.
secondary() { if [[ $1 == 9083 || $1 == 9084 ]]; then echo "--secondary=file://$STORE"; fi; }
for which in old new; do
    printf '[checkpoint]\ndir = "%s"\n' "$WORK/state" >"$WORK/$which.toml"
done
printf '%s\n' "${OLD_TOML:-}" >>"$WORK/old.toml"
printf '%s\n' "${NEW_TOML:-}" >>"$WORK/new.toml"
export AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
echo "ab: $SIZE_MIB MiB in $BLOCK_SIZE blocks, port $PORT (old: $OLD_PORT), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

# One restore by BIN (OLD or NEW) as WHICH in ROUND: time, CPU, RSS, phases.
restore_once() { # WHICH BIN PORT ROUND WRAP...
    local which=$1 bin=$2 port=$3 round=$4 phases
    shift 4
    rm -f "$OUT/vol.img"
    sync -f "$OUT"
    # shellcheck disable=SC2046 # secondary prints one word or nothing
    AWS_ENDPOINT_URL=http://127.0.0.1:$port /usr/bin/time -f "%e %U %S %M" -o "$WORK/time" "$@" "$bin" restore \
        --manifest s3://bucket/snap/vol.manifest --target "$OUT/vol.img" --config "$WORK/$which.toml" \
        --restart --json $(secondary "$port") >"$WORK/report-$which-$round.json"
    "$NEW" verify --manifest "file://$STORE/vol.manifest" --target "$OUT/vol.img" >/dev/null
    phases=$(python3 -c 'import json,sys
r = json.load(open(sys.argv[1])); t = r.get("timings", {}); f = r.get("fetch", {})
print(*("%s=%.2f" % (k, t.get(k + "_secs", 0)) for k in ("prepare", "transfer", "tail", "finish")),
      "retries=%s hedges=%s served=%s" % (f.get("retries"), f.get("hedges"), f.get("served_by_source")))' \
        "$WORK/report-$which-$round.json")
    echo "$which $(cat "$WORK/time") $phases"
}

# JOBS restores at once through one `rehydrate serve` of BIN: the time until
# the last is done, the worker's CPU and peak RSS, each job's time.
jobs_once() { # WHICH BIN PORT ROUND
    local which=$1 bin=$2 port=$3 round=$4 t0 t1 pid
    rm -rf "$OUT/jobs" "$WORK/worker-state"
    mkdir -p "$OUT/jobs"
    cp "$WORK/$which.toml" "$WORK/worker.toml"
    printf '[worker]\nlisten = "127.0.0.1:7879"\ntarget_roots = ["%s"]\njobs_running_max = %s\ntarget_free_bytes_min = 0\nstate_dir = "%s"\n[worker.profiles.ab]\nstore = "s3://bucket/snap"\n' \
        "$OUT/jobs" "$JOBS" "$WORK/worker-state" >>"$WORK/worker.toml"
    AWS_ENDPOINT_URL=http://127.0.0.1:$port /usr/bin/time -f "%e %U %S %M" -o "$WORK/time" "$bin" serve \
        --config "$WORK/worker.toml" >"$WORK/worker.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do curl -sf http://127.0.0.1:7879/readyz >/dev/null && break; sleep 0.1; done
    t0=$(date +%s.%N)
    python3 "$HERE/benches/e2e/jobs.py" http://127.0.0.1:7879 ab vol.manifest "$OUT/jobs" "$JOBS" "ab$which$round" >"$WORK/jobs.json" ||
        { tail -5 "$WORK/worker.log" >&2; pkill -TERM -P "$pid"; return 1; }
    t1=$(date +%s.%N)
    # $pid is GNU time: stop the worker it runs, and time reports on it.
    pkill -TERM -P "$pid"
    wait "$pid" || true
    for f in "$OUT"/jobs/*.img; do "$NEW" verify --manifest "file://$STORE/vol.manifest" --target "$f" >/dev/null; done
    read -r _ user sys rss < <(tail -1 "$WORK/time")
    echo "$which $(echo "$t1 - $t0" | bc) $user $sys $rss jobs=$(python3 -c 'import json,sys; print(",".join("%.2f" % x for x in json.load(open(sys.argv[1]))["job_secs"]))' "$WORK/jobs.json")"
}

: >"$WORK/times"
for round in $(seq "$RUNS"); do
    for which in old new; do
        bin=$OLD port=$OLD_PORT wrap=()
        [[ $which == new ]] && bin=$NEW port=$PORT && read -ra wrap <<<"${NEW_WRAP:-}"
        if ((JOBS)); then
            jobs_once "$which" "$bin" "$port" "$round"
        else
            restore_once "$which" "$bin" "$port" "$round" "${wrap[@]}"
        fi | tee -a "$WORK/times" >&2
    done
done
python3 - "$WORK/times" "$((SIZE_MIB * (JOBS > 0 ? JOBS : 1)))" <<'EOF'
import statistics, sys
t, cpu, rss = {"old": [], "new": []}, {"old": [], "new": []}, {"old": [], "new": []}
for line in open(sys.argv[1]):
    which, secs, user, sys_, kib = line.split()[:5]
    t[which].append(float(secs))
    cpu[which].append(float(user) + float(sys_))
    rss[which].append(int(kib) / 1024)
gib = int(sys.argv[2]) / 1024
med = statistics.median
for which in ("old", "new"):
    m = med(t[which])
    print(f"{which}: median {m:.3f} s ({gib / m:.3f} GiB/s), {med(cpu[which]) / gib:.2f} own CPU s/GiB, "
          f"{med(rss[which]):.0f} MiB peak RSS over {len(t[which])} runs: {', '.join(f'{x:.3f}' for x in t[which])}")
print(f"new/old median time: {med(t['new']) / med(t['old']):.3f}")
EOF
