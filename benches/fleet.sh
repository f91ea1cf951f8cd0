#!/usr/bin/env bash
# Fleet benchmark: 4 workers (`rehydrate serve`) restoring the same snapshot
# at once from nginx (the `http://` store), each listing the other three as
# peers ahead of it, against the same 4 without peers. nginx logs every
# request; the figure is block requests at nginx over the snapshot's objects
# (4.0 without peers; at most 1.3 wanted with peers), and the wall time of
# the four restores (all submitted at once, until the last succeeded), and
# the CPU seconds the four workers and nginx spent (user + system, from
# /proc; on a machine with fewer cores than busy threads, the time follows
# it) and how busy the whole machine's CPUs were meanwhile. Every
# target is checked against the manifest (`rehydrate verify`).
#
# Then the kill run: the 4 with peers again, one worker killed (SIGKILL)
# about a quarter into its restore; the other three must finish byte-identical,
# and the killed one, started again on its state directory, resumes its job
# (the worker requeues it) and finishes byte-identical.
#
# Usage: benches/fleet.sh [SIZE_MIB (default 1024)] [REPS (default 3)] [BLOCK (default 1MiB)]
# Env:   NGINX_CONF_IN (default /work/shared/bench/nginx.conf.in), its clean
#                      server (9080) moved to PORT_NGINX (default 9180) so the
#                      fixture's own ports stay free for other benchmarks
#        TARGET_DIR    where the restored volumes go (default /tmp)
#        REHYDRATE     the binary (default: release build of this checkout)
#        PORT_BASE     workers listen on PORT_BASE+1 .. PORT_BASE+4 (default 7970)
#        PEERS_TOML    extra lines for every worker's [peers] section (e.g. "inflight_max = 32")
#        JOBS_DIR      when set, each run's final job status and metrics per worker go there
#
# Needs nginx, curl, python3. Installs nothing.
set -euo pipefail

SIZE_MIB=${1:-1024}
REPS=${2:-3}
BLOCK=${3:-1MiB}
CONF_IN=${NGINX_CONF_IN:-/work/shared/bench/nginx.conf.in}
TARGET_PARENT=${TARGET_DIR:-/tmp}
PORT_NGINX=${PORT_NGINX:-9180}
PORT_BASE=${PORT_BASE:-7970}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/e2e/lib.sh
source "$HERE/benches/e2e/lib.sh"
TOKEN=fleet-bench-token-0123456789
N=4

missing=()
for tool in nginx curl python3; do command -v $tool >/dev/null 2>&1 || missing+=("$tool"); done
while IFS= read -r line; do missing+=("$line"); done < <(nginx_fixture_missing "$CONF_IN")
if ((${#missing[@]})); then
    echo "fleet: cannot run, missing: ${missing[*]}" >&2
    exit 2
fi
BIN=${REHYDRATE:-$HERE/target/release/rehydrate}
[[ -x $BIN ]] || { echo "fleet: no binary at $BIN (cargo build --release, or REHYDRATE=...)" >&2; exit 2; }

bench_dirs fleet
PIDS=()
stop_workers() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap 'stop_workers; bench_cleanup' EXIT

ROOT=$WORK/root
STORE=$ROOT/bucket/snap
LOG=$RUN/logs/access.log
mkdir -p "$STORE"
echo "fleet: binary $BIN; ${SIZE_MIB} MiB in $BLOCK blocks; store $WORK; targets $OUT" >&2
seeded_volume 17 "$SIZE_MIB" "$WORK/source.img"
"$BIN" snapshot create --source "$WORK/source.img" --store "file://$STORE" --name vol --block-size "$BLOCK" \
    --json >"$WORK/snapshot.json"
rm -f "$WORK/source.img"
OBJECTS=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["objects_stored"])' "$WORK/snapshot.json")

nginx_write_conf "$CONF_IN" "$RUN" "$ROOT" "$LOG"
# Only the clean server, on its own port.
python3 - "$RUN/nginx.conf" "$PORT_NGINX" <<'PY'
import re, sys
path, port = sys.argv[1], sys.argv[2]
text = open(path).read()
servers = re.split(r"(?=\n  server \{|\n  limit_req_zone)", text)
head, rest = servers[0], servers[1:]
clean = [s for s in rest if "listen 127.0.0.1:9080;" in s][0].replace("9080", port)
open(path, "w").write(head + clean + "\n}\n")
PY
nginx -p "$RUN" -c "$RUN/nginx.conf" -e "$RUN/logs/error.log"
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT_NGINX") 2>/dev/null && break; sleep 0.1; done

# config NAME INDEX PEERS(0|1) -> $WORK/NAME.toml
config() {
    local name=$1 index=$2 peers=$3 i list=()
    if ((peers)); then
        for i in $(seq 1 $N); do ((i == index + 1)) || list+=("\"http://127.0.0.1:$((PORT_BASE + i))\""); done
    fi
    mkdir -p "$WORK/state-$name" "$OUT/$name"
    cat >"$WORK/$name.toml" <<EOF
[checkpoint]
dir = "$WORK/state-$name"
[peers]
fleet_index = $index
${PEERS_TOML:-}
[worker]
listen = "127.0.0.1:$((PORT_BASE + index + 1))"
target_roots = ["$OUT/$name"]
target_free_bytes_min = 0
[worker.profiles.main]
store = "http://127.0.0.1:$PORT_NGINX/bucket/snap"
peers = [$(IFS=,; echo "${list[*]}")]
EOF
}

# start_worker NAME INDEX
start_worker() {
    local name=$1 index=$2
    REHYDRATE_TOKENS=$TOKEN REHYDRATE_PEER_TOKEN=$TOKEN \
        "$BIN" serve --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
    PIDS[index]=$!
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$((PORT_BASE + index + 1))/healthz" >/dev/null && return 0
        sleep 0.1
    done
    echo "fleet: worker $name did not come up:" >&2; tail -5 "$WORK/$name.log" >&2; return 1
}

api() { # INDEX METHOD PATH [BODY]
    curl -sS -X "$2" -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
        ${4:+--data "$4"} "http://127.0.0.1:$((PORT_BASE + $1 + 1))$3"
}

job_field() { # INDEX EXPR (python over the job JSON j)
    api "$1" GET /v1/jobs/vol | python3 -c "import json,sys; j=json.load(sys.stdin); print($2)" 2>/dev/null || echo "?"
}

submit_all() { # MODE
    local i
    for i in $(seq 0 $((N - 1))); do
        api "$i" POST /v1/jobs "{\"id\":\"vol\",\"profile\":\"main\",\"manifest\":\"vol.manifest\",\"target\":\"$OUT/$1$i/vol.img\"}" >/dev/null
    done
}

wait_succeeded() { # INDEX...
    local i state
    for i in "$@"; do
        for _ in $(seq 6000); do
            state=$(job_field "$i" 'j["state"]')
            [[ $state == succeeded ]] && break
            [[ $state == failed || $state == cancelled ]] && { echo "fleet: worker $i job $state" >&2; return 1; }
            sleep 0.05
        done
    done
}

verify_targets() { # MODE INDEX...
    local mode=$1 i ok=0
    shift
    for i in "$@"; do
        "$BIN" verify --manifest "file://$STORE/vol.manifest" --target "$OUT/$mode$i/vol.img" >/dev/null 2>&1 || ok=1
    done
    return $ok
}

block_requests() { grep -c ' /bucket/snap/blocks/' "$LOG" || true; }

# CPU seconds (user + system) processes PID... have spent so far.
cpu_of() {
    local pid ticks=0 stat f
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        stat=${stat##*) }
        read -r -a f <<<"$stat"
        ticks=$((ticks + f[11] + f[12]))
    done
    python3 -c "print(f'{$ticks / $(getconf CLK_TCK):.1f}')"
}
workers_cpu() { cpu_of "${PIDS[@]}"; }
# The machine's CPU counters (busy and total jiffies, every process).
machine_jiffies() { awk '/^cpu /{t=0; for (i=2; i<=NF; i++) t+=$i; print t-$5-$6, t}' /proc/stat; }
# nginx's workers (the master only forks them).
nginx_cpu() { cpu_of $(ps -o pid= --ppid "$(cat "$RUN/nginx.pid")"); }

sources() { # MODE
    local i
    for i in $(seq 0 $((N - 1))); do
        job_field "$i" '" ".join(f"{k}={v}" for k, v in j["sources"].items())'
    done | paste -sd'|'
}

# run MODE PEERS REP -> one row
run() {
    local mode=$1 peers=$2 rep=$3 i start end verified nginx_before busy busy_before total_before busy_after total_after
    stop_workers
    rm -rf "$OUT"/* "$WORK"/state-*
    : >"$LOG"
    for i in $(seq 0 $((N - 1))); do config "$mode$i" "$i" "$peers"; start_worker "$mode$i" "$i"; done
    nginx_before=$(nginx_cpu)
    read -r busy_before total_before < <(machine_jiffies)
    start=$(date +%s.%N)
    submit_all "$mode"
    wait_succeeded $(seq 0 $((N - 1)))
    end=$(date +%s.%N)
    read -r busy_after total_after < <(machine_jiffies)
    busy=$(((busy_after - busy_before) * 100 / (total_after - total_before)))
    verified=yes
    verify_targets "$mode" $(seq 0 $((N - 1))) || verified=NO
    local requests per_obj
    requests=$(block_requests)
    per_obj=$(python3 -c "print(f'{$requests/$OBJECTS:.2f}')")
    local served cpu
    served=$(sources "$mode")
    if [[ -n ${JOBS_DIR:-} ]]; then
        mkdir -p "$JOBS_DIR"
        for i in $(seq 0 $((N - 1))); do
            api "$i" GET /v1/jobs/vol >"$JOBS_DIR/$mode$i-$rep.json"
            api "$i" GET /metrics >"$JOBS_DIR/$mode$i-$rep.metrics"
        done
    fi
    cpu="$(workers_cpu)+$(python3 -c "print(f'{$(nginx_cpu) - $nginx_before:.1f}')")"
    stop_workers
    ROWS+=("$(printf '%s\t%s\t%.2f\t%s\t%s\t%s\t%s\t%s\t%s' "$mode" "$rep" "$(python3 -c "print($end-$start)")" "$requests" "$per_obj" "$verified" "$cpu" "$busy" "$served")")
    echo "${ROWS[-1]}" >&2
}

ROWS=()
for rep in $(seq 1 "$REPS"); do
    run nopeers 0 "$rep"
    run peers 1 "$rep"
done

# The kill run: worker 3 killed a quarter of the way in, restarted after the
# other three finished.
kill_run() {
    local mode=kill i
    stop_workers
    rm -rf "$OUT"/* "$WORK"/state-*
    : >"$LOG"
    for i in $(seq 0 $((N - 1))); do config "$mode$i" "$i" 1; start_worker "$mode$i" "$i"; done
    submit_all "$mode"
    local total settled now
    for _ in $(seq 6000); do
        # One request per look: the restore takes seconds.
        now=$(job_field 3 'str(j["blocks"]["settled"]) + " " + str(j["blocks"]["total"])')
        read -r settled total <<<"$now"
        [[ $settled =~ ^[0-9]+$ && $total =~ ^[0-9]+$ ]] && ((total > 0 && settled * 4 >= total)) && break
        sleep 0.01
    done
    kill -9 "${PIDS[3]}"
    wait "${PIDS[3]}" 2>/dev/null || true
    echo "fleet: killed worker 3 at $settled of $total blocks settled" >&2
    wait_succeeded 0 1 2
    local three=yes
    verify_targets "$mode" 0 1 2 || three=NO
    start_worker "${mode}3" 3
    wait_succeeded 3
    local resumed
    resumed=$(job_field 3 'j["blocks"].get("resumed", "?")')
    local fourth=yes
    verify_targets "$mode" 3 || fourth=NO
    KILL_ROW="killed at $settled/$total settled; other three verified: $three; killed one resumed (blocks resumed: $resumed) and verified: $fourth; block requests at nginx: $(block_requests) for $OBJECTS objects"
    stop_workers
}
kill_run

echo
echo "fleet: $N workers, ${SIZE_MIB} MiB, $BLOCK blocks, $OBJECTS objects; binary $BIN"
{
    printf 'mode\trep\tseconds\tblock requests\tper object\tverified\tCPU s (workers+nginx)\tmachine busy %%\tserved by source (per worker)\n'
    printf '%s\n' "${ROWS[@]}"
} | column -t -s $'\t'
python3 - "$OBJECTS" "${ROWS[@]}" <<'PY'
import statistics, sys
objects = int(sys.argv[1])
rows = [r.split("\t") for r in sys.argv[2:]]
for mode in ("nopeers", "peers"):
    secs = [float(r[2]) for r in rows if r[0] == mode]
    reqs = [int(r[3]) for r in rows if r[0] == mode]
    cpu = [sum(map(float, r[6].split("+"))) for r in rows if r[0] == mode]
    busy = [int(r[7]) for r in rows if r[0] == mode]
    print(f"median {mode}: {statistics.median(secs):.2f} s, {statistics.median(reqs)} block requests "
          f"({statistics.median(reqs)/objects:.2f} per object), CPU (workers + nginx) {statistics.median(cpu):.1f} s, "
          f"machine busy {statistics.median(busy)} %")
PY
echo "kill run: $KILL_ROW"
