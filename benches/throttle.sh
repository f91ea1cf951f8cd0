#!/usr/bin/env bash
# Throttling benchmark (issue 13, W2b): rehydrate with its DEFAULT config (no
# rate_limit) against the fixture's 300 req/s port (9082: token bucket 300 r/s,
# burst 30, excess answered 503 SlowDown), on one machine, rerunnable:
#
#   benches/throttle.sh [--size-mib N (default 1024)] [--runs N (default 3)]
#
# One seeded volume is snapshotted twice, in 1 MiB and in 256 KiB blocks, into
# a tmpfs store served by nginx from /work/shared/bench/nginx.conf.in. Per round:
#   W2b-1MiB, W2b-256KiB  restore on 9082 with the default config; throughput
#       against what the limit allows (objects + manifest, less the burst, at
#       300/s), 503s over requests (nginx's access log), failed blocks, verify.
#   W2c (1 MiB blocks)    the limit drops from 300 to 60 r/s 2 s into the restore
#       and comes back to 300 10 s later (nginx reloads); from the access log:
#       how long after the drop until requests (503s included) arrive at no
#       more than the new limit plus its burst (66 in a sliding 1 s window),
#       the mean arrival rate from then until the limit rises, the share of
#       1 s windows above 66 in that span, and the 503 share in it.
#   W2 (1 MiB blocks)     with [rate_limit] requests_per_sec = 300,
#       request_burst = 30 configured (the earlier target: >= 0.97 of the
#       limit, < 0.5 % 503s).
# Prints one line per run and a table of medians.
#
# Needs nginx, python3, openssl, curl and the release binary; installs nothing
# (says what is missing). Everything it creates is removed on exit.
#
# Env: NGINX_CONF_IN (default /work/shared/bench/nginx.conf.in), TARGET_DIR
#      (default /tmp), REHYDRATE (default target/release/rehydrate), SEED (1).
set -euo pipefail

SIZE_MIB=1024
RUNS=3
while (($#)); do
    case $1 in
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "throttle: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
[[ $SIZE_MIB =~ ^[1-9][0-9]*$ && $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "throttle: --size-mib and --runs take positive integers" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")/.." && pwd)
CONF_IN=${NGINX_CONF_IN:-/work/shared/bench/nginx.conf.in}
TARGET_PARENT=${TARGET_DIR:-/tmp}
BIN=${REHYDRATE:-$HERE/target/release/rehydrate}
SEED=${SEED:-1}
# shellcheck source=benches/e2e/lib.sh
source "$HERE/benches/e2e/lib.sh"

missing=()
for tool in nginx python3 openssl curl; do
    command -v $tool >/dev/null 2>&1 || missing+=("$tool (apt-get install -y $tool)")
done
[[ -x $BIN ]] || missing+=("$BIN (cargo build --release)")
while IFS= read -r line; do missing+=("$line"); done < <(nginx_fixture_missing "$CONF_IN")
if ((${#missing[@]})); then
    echo "throttle: cannot run, missing:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 2
fi

bench_dirs throttle
ROOT=$WORK/root
LOG=$RUN/logs/access.log
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
echo "throttle: ${SIZE_MIB} MiB volume, $RUNS run(s); binary $BIN; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

seeded_volume "$SEED" "$SIZE_MIB" "$WORK/source.img"
for bs in 1MiB 256KiB; do
    "$BIN" snapshot create --source "$WORK/source.img" --store "file://$ROOT/bucket/$bs" --name vol \
        --block-size "$bs" --json >/dev/null
done
rm -f "$WORK/source.img"

# The fixture's config, with a timestamped access log.
nginx_write_conf "$CONF_IN" "$RUN" "$ROOT" "$LOG"
sed -i -e "s|log_format e2e '|log_format e2e '\$msec |" "$RUN/nginx.conf"
cp "$RUN/nginx.conf" "$RUN/nginx-300.conf"
sed -e 's|rate=300r/s|rate=60r/s|' -e 's|burst=30 nodelay|burst=6 nodelay|' "$RUN/nginx-300.conf" >"$RUN/nginx-60.conf"
nginx_start "$RUN"
reload() { # 300 | 60
    cp "$RUN/nginx-$1.conf" "$RUN/nginx.conf"
    nginx -p "$RUN" -c "$RUN/nginx.conf" -e "$RUN/logs/error.log" -s reload
}

printf '[checkpoint]\ndir = "%s"\n' "$WORK/state" >"$WORK/default.toml"
{ cat "$WORK/default.toml"; printf '[rate_limit]\nrequests_per_sec = 300\nrequest_burst = 30\n'; } >"$WORK/rate300.toml"
export AWS_ACCESS_KEY_ID=nginx-ignores-signatures AWS_SECRET_ACCESS_KEY=nginx-ignores-signatures
export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true AWS_ENDPOINT_URL=http://127.0.0.1:9082
unset AWS_PROFILE AWS_SESSION_TOKEN

# run ROUND WORKLOAD BS CONFIG [DROP_AFTER_SECS RISE_AFTER_SECS]: one restore
# on 9082, one JSON line.
run() {
    local round=$1 wl=$2 bs=$3 config=$4 drop=${5:-} rise=${6:-}
    local target=$OUT/vol.img l0 t0 t1 code=0 pid
    rm -f "$target"
    sync -f "$OUT"
    l0=$(wc -l <"$LOG")
    t0=$(date +%s.%N)
    "$BIN" restore --manifest "s3://bucket/$bs/vol.manifest" --target "$target" --config "$config" \
        --restart --json >"$WORK/restore.json" 2>"$WORK/stderr" &
    pid=$!
    local drop_at=0 rise_at=0
    if [[ -n $drop ]]; then
        sleep "$drop"
        drop_at=$(date +%s.%N)
        reload 60
        sleep "$rise"
        rise_at=$(date +%s.%N)
        reload 300
    fi
    wait $pid || code=$?
    t1=$(date +%s.%N)
    tail -n "+$((l0 + 1))" "$LOG" >"$WORK/window.log"
    "$BIN" verify --manifest "file://$ROOT/bucket/$bs/vol.manifest" --target "$target" --json >"$WORK/verify.json" 2>/dev/null || true
    python3 - "$round" "$wl" "$bs" "$t0" "$t1" "$drop_at" "$rise_at" "$code" "$WORK/window.log" "$WORK/restore.json" "$WORK/verify.json" <<'EOF' >>"$RESULTS"
import json, sys
round_, wl, bs, t0, t1, drop_at, rise_at, code, log, report, verify = sys.argv[1:]
t0, t1, drop_at, rise_at = float(t0), float(t1), float(drop_at), float(rise_at)
arrivals, s503 = [], []
for line in open(log):
    p = line.split()
    if len(p) >= 3 and p[1] == "9082":
        arrivals.append(float(p[0])); s503.append(p[2] == "503")
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return {}
r, v = load(report), load(verify)
objects = r.get("objects_planned", 0)
secs = t1 - t0
# What the limit allows: every object and the manifest at 300/s, the first 30 free.
allowed_secs = max(objects + 1 - 30, 1) / 300.0
rec = {"round": int(round_), "wl": wl, "bs": bs, "secs": secs, "exit": int(code),
       "bytes_per_sec": r.get("bytes_total", 0) / secs if secs > 0 else 0,
       "of_limit": allowed_secs / secs if secs > 0 else 0,
       "requests": len(arrivals), "s503": sum(s503), "share_503": sum(s503) / max(len(arrivals), 1),
       "blocks_failed": r.get("blocks_failed"), "verified": v.get("mismatched") == [] if v else None,
       "throttled_ms": r.get("fetch", {}).get("throttled_millis"),
       "settled_rate": r.get("fetch", {}).get("request_rate_per_source")}
if drop_at:
    # The first instant after the drop whose 1 s window holds at most the new
    # limit plus its burst (66), checked every 100 ms until the limit rises.
    low = [(a, s) for a, s in zip(arrivals, s503) if drop_at <= a < rise_at]
    def in_window(t): return sum(1 for a, _ in low if t <= a < t + 1.0)
    under, t, windows, over = None, drop_at, 0, 0
    while t + 1.0 <= rise_at:
        n = in_window(t)
        if under is None and n <= 66:
            under = t
        if under is not None:
            windows += 1
            over += n > 66
        t += 0.1
    rec["under_after_secs"] = None if under is None else under - drop_at
    if under is not None:
        late = [s for a, s in low if a >= under]
        rec["rate_after"] = len(late) / max(rise_at - under, 1e-3)
        rec["windows_over"] = over / max(windows, 1)
        rec["share_503_after"] = sum(late) / max(len(late), 1)
print(json.dumps(rec))
EOF
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("  " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))' "$(tail -1 "$RESULTS")" >&2
    rm -f "$target"
}

for round in $(seq "$RUNS"); do
    echo "throttle: round $round of $RUNS (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    run "$round" W2b 1MiB "$WORK/default.toml"
    run "$round" W2b 256KiB "$WORK/default.toml"
    run "$round" W2c 1MiB "$WORK/default.toml" 2 10
    run "$round" W2 1MiB "$WORK/rate300.toml"
done

python3 - "$RESULTS" <<'EOF'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
groups = {}
for r in recs:
    groups.setdefault((r["wl"], r["bs"]), []).append(r)
def med(rs, k):
    vals = [r[k] for r in rs if isinstance(r.get(k), (int, float))]
    return statistics.median(vals) if vals else float("nan")
print(f"{'wl':5} {'blocks':7} {'runs':>4} {'secs':>7} {'MiB/s':>7} {'of limit':>8} {'503 share':>9} {'failed':>6} {'exit':>4} {'under after s':>13} {'req/s after':>11} {'windows over':>12} {'503 after':>9}")
for (wl, bs), rs in groups.items():
    print(f"{wl:5} {bs:7} {len(rs):4} {med(rs,'secs'):7.2f} {med(rs,'bytes_per_sec')/(1<<20):7.1f} {med(rs,'of_limit'):8.3f} "
          f"{med(rs,'share_503'):9.4f} {max(r.get('blocks_failed') or 0 for r in rs):6} {max(r['exit'] for r in rs):4} "
          f"{med(rs,'under_after_secs'):13.2f} {med(rs,'rate_after'):11.1f} {med(rs,'windows_over'):12.3f} {med(rs,'share_503_after'):9.4f}")
print("medians over rounds; 'of limit': (objects + manifest - burst 30) / 300 per s over the restore's wall time;"
      " 503 share: 503s over requests at nginx; failed, exit: the worst run;"
      " W2c: the limit drops to 60/s (burst 6) 2 s in and rises to 300/s 10 s later: seconds from the drop until"
      " a 1 s window holds <= 66 arrivals, then the arrival rate, the share of 1 s windows over 66 and the 503 share until the rise")
EOF
