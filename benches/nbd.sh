#!/usr/bin/env bash
# NBD export benchmark (issue 12): a restore exported with --export while a
# client reads it at random, against the fixture's clean port (9080) and its
# 300 req/s port (9082), on one machine, rerunnable:
#
#   benches/nbd.sh [--size-mib N (default 1024)] [--runs N (default 3)]
#
# One seeded volume in 1 MiB blocks is snapshotted into a tmpfs store served by
# nginx from /work/shared/bench/nginx.conf.in. Per round and port:
#   GET     the store's median GET latency: 41 random block objects, one at a
#           time, with curl (time_total), just before the restores.
#   W       a plain restore (the reference: W1 on 9080, W2b on 9082; default
#           config, staged, O_DIRECT), its throughput from its report.
#   X0      the same restore with --export and no client (what export mode
#           costs by itself: in place, through the page cache).
#   X       the same restore with --export while one client (python3-libnbd)
#           connects as soon as the port answers and reads 4 KiB at random
#           offsets, one at a time, until the restore ends:
#             first byte  from the command's start to the first read answered;
#             read p50/p99 local and on demand, from the export's own
#               histograms (its summary line at exit; bucket upper bounds,
#               at most 19 % high); the client's own p50/p99 over all reads;
#             throughput  the restore's (its report), over W's in the round.
# Targets: first byte < 1 s; on-demand p99 < 3 x the median GET; X / W1 >= 0.8.
# Prints one line per run and a table of medians.
#
# Needs nginx, python3 with the nbd module (python3-libnbd), openssl, curl and
# the release binary; installs nothing (says what is missing). Everything it
# creates is removed on exit. benches/e2e.sh runs it at its end.
#
# Env: NGINX_CONF_IN (default /work/shared/bench/nginx.conf.in), TARGET_DIR
#      (default /tmp), REHYDRATE (default target/release/rehydrate), SEED (1),
#      NBD_PORT (10809), PORT_BASE (9080: the fixture's ports; another base
#      shifts all four, e.g. 19080 beside a running benchmark),
#      LATENCY_RATIO_MAX (1.5: concurrency.latency_ratio_max of every restore
#      here, W included; empty: the default, the latency rule off),
#      CONCURRENCY_TOML (more [concurrency] lines for every restore here,
#      e.g. "concurrency_min = 2"; newline-separated).
set -euo pipefail

SIZE_MIB=1024
RUNS=3
while (($#)); do
    case $1 in
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "nbd: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
[[ $SIZE_MIB =~ ^[1-9][0-9]*$ && $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "nbd: --size-mib and --runs take positive integers" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")/.." && pwd)
CONF_IN=${NGINX_CONF_IN:-/work/shared/bench/nginx.conf.in}
TARGET_PARENT=${TARGET_DIR:-/tmp}
BIN=${REHYDRATE:-$HERE/target/release/rehydrate}
SEED=${SEED:-1}
NBD_PORT=${NBD_PORT:-10809}
LATENCY_RATIO_MAX=${LATENCY_RATIO_MAX-1.5}
PORT_BASE=${PORT_BASE:-9080}
CLEAN=$PORT_BASE RATE300=$((PORT_BASE + 2))
# shellcheck source=benches/e2e/lib.sh
source "$HERE/benches/e2e/lib.sh"

missing=()
for tool in nginx python3 openssl curl; do
    command -v $tool >/dev/null 2>&1 || missing+=("$tool (apt-get install -y $tool)")
done
/usr/bin/python3 -c 'import nbd' 2>/dev/null || missing+=("python3 nbd module (apt-get install -y python3-libnbd)")
[[ -x $BIN ]] || missing+=("$BIN (cargo build --release)")
while IFS= read -r line; do missing+=("$line"); done < <(nginx_fixture_missing "$CONF_IN")
if ((${#missing[@]})); then
    echo "nbd: cannot run, missing:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 2
fi

bench_dirs nbd
ROOT=$WORK/root
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
echo "nbd: ${SIZE_MIB} MiB volume, $RUNS run(s); binary $BIN; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

seeded_volume "$SEED" "$SIZE_MIB" "$WORK/source.img"
"$BIN" snapshot create --source "$WORK/source.img" --store "file://$ROOT/bucket/snap" --name vol \
    --block-size 1MiB --json >/dev/null
rm -f "$WORK/source.img"
find "$ROOT/bucket/snap" -path '*blocks*' -type f -printf '%P\n' | shuf -n 41 --random-source=<(yes) >"$WORK/keys"
nginx_write_conf "$CONF_IN" "$RUN" "$ROOT"
NGINX_PORTS=()
for p in 0 2 3 4; do
    sed -i "s|listen 127.0.0.1:$((9080 + p));|listen 127.0.0.1:$((PORT_BASE + p));|" "$RUN/nginx.conf"
    NGINX_PORTS+=($((PORT_BASE + p)))
done
nginx_start "$RUN"

printf '[checkpoint]\ndir = "%s"\n' "$WORK/state" >"$WORK/config.toml"
printf '[concurrency]\n' >>"$WORK/config.toml"
[[ -z $LATENCY_RATIO_MAX ]] || printf 'latency_ratio_max = %s\n' "$LATENCY_RATIO_MAX" >>"$WORK/config.toml"
[[ -z ${CONCURRENCY_TOML:-} ]] || printf '%s\n' "$CONCURRENCY_TOML" >>"$WORK/config.toml"
export AWS_ACCESS_KEY_ID=nginx-ignores-signatures AWS_SECRET_ACCESS_KEY=nginx-ignores-signatures
export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
unset AWS_PROFILE AWS_SESSION_TOKEN

# The client: connect as soon as the export answers (first byte), then random
# 4 KiB reads until the file $3 exists; one JSON line.
cat >"$WORK/reader.py" <<'EOF'
import json, os, random, sys, time
import nbd
t0, url, done = float(sys.argv[1]), sys.argv[2], sys.argv[3]
h = None
while h is None:
    try:
        h = nbd.NBD()
        h.connect_uri(url)
    except nbd.Error:
        h = None
        if time.time() - t0 > 120:
            sys.exit("no export within 120 s")
        time.sleep(0.002)
h.pread(4096, 0)
first_byte = time.time() - t0
size = h.get_size()
rng = random.Random(1)
lat = []
while not os.path.exists(done):
    off = rng.randrange(0, size // 4096) * 4096
    s = time.perf_counter()
    h.pread(4096, off)
    lat.append(time.perf_counter() - s)
h.shutdown()
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3 if lat else float("nan")
print(json.dumps({"first_byte_secs": first_byte, "client_reads": len(lat), "client_p50_ms": q(0.5), "client_p99_ms": q(0.99)}))
EOF

get_median() { # port -> median GET time_total in ms, one at a time
    local port=$1 key
    while read -r key; do
        curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$port/bucket/snap/$key"
    done <"$WORK/keys" | sort -n | awk '{v[NR]=$1} END {printf "%.3f\n", v[int((NR+1)/2)]*1000}'
}

# record ROUND PORT WL GET_MS REPORT_JSON [READER_JSON STDERR]: one JSON line.
record() {
    python3 - "$@" <<'EOF' >>"$RESULTS"
import json, re, sys
round_, port, wl, get_ms, report = sys.argv[1:6]
reader = sys.argv[6] if len(sys.argv) > 6 else ""
stderr = sys.argv[7] if len(sys.argv) > 7 else ""
def load(path):
    try:
        text = open(path).read()
        return json.loads(text[text.index("{"):text.rindex("}") + 1])
    except (OSError, ValueError):
        return {}
r = load(report)
rec = {"round": int(round_), "port": int(port), "wl": wl, "get_median_ms": float(get_ms),
       "succeeded": r.get("succeeded"), "secs": r.get("duration_secs"),
       "bytes_per_sec": r.get("throughput_bytes_per_sec")}
if reader:
    rec.update(load(reader))
if stderr:
    m = re.search(r"local: (\d+), p50 ([\d.]+) ms, p99 ([\d.]+) ms; on demand: (\d+), p50 ([\d.]+) ms, p99 ([\d.]+) ms", open(stderr).read())
    if m:
        n_l, l50, l99, n_d, d50, d99 = m.groups()
        rec.update({"local_reads": int(n_l), "local_p50_ms": float(l50), "local_p99_ms": float(l99),
                    "demand_reads": int(n_d), "demand_p50_ms": float(d50), "demand_p99_ms": float(d99)})
print(json.dumps(rec))
EOF
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("  " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))' "$(tail -1 "$RESULTS")" >&2
}

plain() { # round port get_ms
    local target=$OUT/vol.img wl=W1
    [[ $2 == "$RATE300" ]] && wl=W2b
    rm -f "$target"
    AWS_ENDPOINT_URL=http://127.0.0.1:$2 "$BIN" restore --manifest s3://bucket/snap/vol.manifest --target "$target" \
        --config "$WORK/config.toml" --restart --json >"$WORK/restore.json" 2>/dev/null || true
    record "$1" "$2" "$wl" "$3" "$WORK/restore.json"
    rm -f "$target"
}

# exported ROUND PORT GET_MS READ(0|1): the restore with --export, served until
# its report is out, then SIGTERM.
exported() {
    local round=$1 port=$2 get_ms=$3 read=$4 target=$OUT/vol.img pid reader= t0 wl=X0
    ((read)) && wl=X
    # The last run's stderr must be gone before the wait below reads it.
    rm -f "$target" "$WORK/done" "$WORK/reader.json" "$WORK/stderr" "$WORK/restore.json"
    rm -rf "$WORK/state"/*
    sync -f "$OUT"
    t0=$(date +%s.%N)
    AWS_ENDPOINT_URL=http://127.0.0.1:$port "$BIN" restore --manifest s3://bucket/snap/vol.manifest \
        --target "$target" --config "$WORK/config.toml" --json --export "nbd://127.0.0.1:$NBD_PORT/vol" \
        >"$WORK/restore.json" 2>"$WORK/stderr" &
    pid=$!
    if ((read)); then
        /usr/bin/python3 "$WORK/reader.py" "$t0" "nbd://127.0.0.1:$NBD_PORT/vol" "$WORK/done" >"$WORK/reader.json" &
        reader=$!
    fi
    until grep -q "still exporting\|^error" "$WORK/stderr" 2>/dev/null || ! kill -0 $pid 2>/dev/null; do sleep 0.05; done
    touch "$WORK/done"
    [[ -n $reader ]] && { wait "$reader" || true; }
    kill -TERM $pid 2>/dev/null || true
    wait $pid || true
    if ! grep -q '"succeeded": true' "$WORK/restore.json"; then
        echo "nbd: $wl on $port did not succeed; its stderr ends:" >&2
        tail -5 "$WORK/stderr" | sed 's/^/    /' >&2
    fi
    if ((read)); then
        record "$round" "$port" "$wl" "$get_ms" "$WORK/restore.json" "$WORK/reader.json" "$WORK/stderr"
    else
        record "$round" "$port" "$wl" "$get_ms" "$WORK/restore.json"
    fi
    rm -f "$target"
}

for round in $(seq "$RUNS"); do
    for port in $CLEAN $RATE300; do
        echo "nbd: round $round of $RUNS, port $port (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
        get_ms=$(get_median "$port")
        plain "$round" "$port" "$get_ms"
        exported "$round" "$port" "$get_ms" 0
        exported "$round" "$port" "$get_ms" 1
    done
done

python3 - "$RESULTS" "$CLEAN" "$RATE300" <<'EOF'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
clean, rate300 = int(sys.argv[2]), int(sys.argv[3])
def med(rs, k):
    vals = [r[k] for r in rs if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
    return statistics.median(vals) if vals else float("nan")
rounds = sorted({r["round"] for r in recs})
print(f"{'port':5} {'GET p50 ms':>10} {'W MiB/s':>8} {'X0 / W':>7} {'X / W':>6} {'first byte s':>12} {'local p50/p99 ms':>17} {'on-demand p50/p99 ms':>21} {'od p99 / GET':>12} {'client p50/p99 ms':>18} {'reads':>6}")
for port in (clean, rate300):
    rs = [r for r in recs if r["port"] == port]
    x0_ratio, x_ratio = [], []
    for rnd in rounds:
        by = {r["wl"]: r for r in rs if r["round"] == rnd}
        w = by.get("W1") or by.get("W2b")
        if w and w.get("bytes_per_sec"):
            if by.get("X0", {}).get("bytes_per_sec"): x0_ratio.append(by["X0"]["bytes_per_sec"] / w["bytes_per_sec"])
            if by.get("X", {}).get("bytes_per_sec"): x_ratio.append(by["X"]["bytes_per_sec"] / w["bytes_per_sec"])
    w = [r for r in rs if r["wl"] in ("W1", "W2b")]
    x = [r for r in rs if r["wl"] == "X"]
    get = med(rs, "get_median_ms")
    od99 = med(x, "demand_p99_ms")
    m = lambda v: statistics.median(v) if v else float("nan")
    name = "clean" if port == clean else "300/s"
    print(f"{name:5} {get:10.2f} {med(w,'bytes_per_sec')/(1<<20):8.1f} {m(x0_ratio):7.3f} {m(x_ratio):6.3f} {med(x,'first_byte_secs'):12.3f} "
          f"{med(x,'local_p50_ms'):8.2f}/{med(x,'local_p99_ms'):<8.2f} {med(x,'demand_p50_ms'):10.2f}/{od99:<10.2f} {od99/get:12.2f} "
          f"{med(x,'client_p50_ms'):8.2f}/{med(x,'client_p99_ms'):<9.2f} {med(x,'client_reads'):6.0f}")
print("medians over rounds. W: plain restore (W1 on 9080, W2b on 9082), X0: --export without a client, X: --export with"
      " one client reading 4 KiB at random, one at a time, from the first moment the export answers to the end of the restore;"
      " ratios: throughput over W's in the same round; first byte: from the command's start; local / on-demand: the export's"
      " histograms (bucket upper bounds); client: the reader's own timing over all its reads."
      " Targets: first byte < 1 s, on-demand p99 < 3 x GET p50, X / W1 >= 0.8")
EOF
