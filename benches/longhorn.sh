#!/usr/bin/env bash
# Longhorn benchmark (issue 14, point 4): the same Longhorn backup restored by
# rehydrate and by a restore that follows Longhorn's own procedure, over the
# same nginx fixture.
#
#   benches/longhorn.sh [--size-mib N (default 1024)] [--runs N (default 3)] [--method lz4|gzip|none]
#
# 1. benches/longhorn/make_backup.py writes a backupstore in tmpfs exactly as
#    Longhorn lays it out (2 MiB blocks, SHA-512 names, the backup's
#    compression, holes unlisted, copies stored once), under
#    <root>/bucket/lh/backupstore/, and nginx serves <root> as in
#    /work/shared/bench/nginx.conf.in (port 9080, clean).
# 2. Each round (targets in TARGET_DIR, on disk):
#    - rehydrate restore --manifest 'longhorn+s3://bucket/lh?volume=...&backup=...'
#      (its defaults; nginx answers the lock's PUT with 405, so it restores
#      with the read-only warning, as with read-only credentials);
#    - benches/longhorn/reference_restore.py: Longhorn's procedure (backup
#      order, a channel of 10, `restore-concurrent-limit` workers, default 2,
#      each block fetched, decompressed, SHA-512 checked and written at its
#      offset), and again at REFERENCE_WIDE workers (default 16) to show
#      what raising Longhorn's setting gives;
#    each followed by `sync -f` inside the timed window; both outputs are
#    compared with the volume's image (cmp), outside it. Each round runs on
#    the clean port and on the fixture's second nginx (latency.conf.in: 30 ms
#    to first byte per object, like an object store), when the echo module
#    is installed.
# 3. Prints medians of the rounds and the ratios.
#
# Env: REHYDRATE (default /work/main/target/release/rehydrate), TARGET_DIR
# (default /tmp), NGINX_CONF_IN, REFERENCE_WIDE, SEED (default 1),
# PORT_SHIFT (default 0: the fixture's ports 9080-9084; e.g. 100 moves them to
# 9180-9184 when another benchmark holds them).
# Needs nginx, python3 with the PyPI `lz4` package (pip install lz4), cmp.
set -euo pipefail

SIZE_MIB=1024
RUNS=3
METHOD=lz4
while (($#)); do
    case $1 in
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --method) METHOD=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "longhorn: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
[[ $SIZE_MIB =~ ^[1-9][0-9]*$ && $RUNS =~ ^[1-9][0-9]*$ && $((SIZE_MIB % 2)) == 0 ]] ||
    { echo "longhorn: --size-mib takes an even positive integer, --runs a positive integer" >&2; exit 2; }

CONF_IN=${NGINX_CONF_IN:-/work/shared/bench/nginx.conf.in}
TARGET_PARENT=${TARGET_DIR:-/tmp}
BIN=${REHYDRATE:-/work/main/target/release/rehydrate}
WIDE=${REFERENCE_WIDE:-16}
SEED=${SEED:-1}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/e2e/lib.sh
source "$HERE/benches/e2e/lib.sh"

missing=()
command -v nginx >/dev/null 2>&1 || missing+=("nginx (apt-get install -y nginx)")
python3 -c 'import lz4.frame' 2>/dev/null || missing+=("python3 lz4 (pip install lz4)")
[[ -x $BIN ]] || missing+=("$BIN (cargo build --release)")
while IFS= read -r line; do missing+=("$line"); done < <(nginx_fixture_missing "$CONF_IN")
if ((${#missing[@]})); then
    echo "longhorn: cannot run, missing:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 2
fi

bench_dirs longhorn
ROOT=$WORK/root
VOLUME=pvc-bench
BACKUP=backup-0123456789abcdef
mkdir -p "$ROOT/bucket/lh"
python3 "$HERE/benches/longhorn/make_backup.py" "$ROOT/bucket/lh" "$VOLUME" "$BACKUP" --size-mib "$SIZE_MIB" \
    --method "$METHOD" --seed "$SEED" --image "$WORK/image.img" >"$WORK/backup.json"
STORED=$(du -sb --apparent-size "$ROOT/bucket/lh/backupstore" | cut -f1)
nginx_write_conf "$CONF_IN" "$RUN" "$ROOT"
SHIFT=${PORT_SHIFT:-0}
PORT=$((9080 + SHIFT))
if ((SHIFT)); then
    for p in 9080 9082 9083 9084; do sed -i "s/127.0.0.1:$p;/127.0.0.1:$((p + SHIFT));/" "$RUN/nginx.conf"; done
    for i in "${!NGINX_PORTS[@]}"; do NGINX_PORTS[i]=$((NGINX_PORTS[i] + SHIFT)); done
fi
nginx_start "$RUN"
echo "longhorn: $SIZE_MIB MiB volume, $METHOD, $(cat "$WORK/backup.json"), $STORED bytes stored; binary $BIN; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

export AWS_ACCESS_KEY_ID=nginx-ignores-signatures AWS_SECRET_ACCESS_KEY=nginx-ignores-signatures
export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true AWS_ENDPOINT_URL=http://127.0.0.1:$PORT
unset AWS_PROFILE AWS_SESSION_TOKEN
printf '[checkpoint]\ndir = "%s"\n' "$WORK/state" >"$WORK/rehydrate.toml"
URL="longhorn+s3://bucket/lh?volume=$VOLUME&backup=$BACKUP"

timed() { # NAME TARGET -- CMD...: seconds for CMD + sync, appended to $WORK/times
    local name=$1 target=$2
    shift 3
    rm -f "$target"
    sync -f "$OUT"
    local t0 t1
    t0=$(date +%s.%N)
    mkdir -p "$(dirname "$WORK/$name")"
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || { echo "$name failed:" >&2; tail -5 "$WORK/$name.err" >&2; exit 1; }
    sync -f "$OUT"
    t1=$(date +%s.%N)
    cmp -s "$target" "$WORK/image.img" || { echo "$name: the restored volume differs from the image" >&2; exit 1; }
    echo "$name $(python3 -c "print(f'{$t1 - $t0:.3f}')")" | tee -a "$WORK/times" >&2
}

# The second nginx of the fixture: every object 30 ms to first byte.
LAT_PORT=$((9089 + SHIFT))
LAT_CONF_IN=$(dirname "$CONF_IN")/latency.conf.in
WORKLOADS=("clean $PORT")
if [[ -f $LAT_CONF_IN && -f /usr/lib/nginx/modules/ngx_http_echo_module.so ]]; then
    sed -e "s|@RUN@|$RUN|g" -e "s|@ROOT@|$ROOT|g" -e "s/127.0.0.1:9089;/127.0.0.1:$LAT_PORT;/" "$LAT_CONF_IN" >"$RUN/latency.conf"
    if [[ $(id -u) == 0 ]]; then sed -i '1a user root root;' "$RUN/latency.conf"; fi
    nginx -p "$RUN" -c "$RUN/latency.conf" -e "$RUN/logs/error-latency.log"
    trap 'kill "$(cat "$RUN/nginx-latency.pid" 2>/dev/null)" 2>/dev/null || true; bench_cleanup' EXIT
    WORKLOADS+=("latency30ms $LAT_PORT")
else
    echo "note: no latency workload ($LAT_CONF_IN or the nginx echo module is missing)" >&2
fi

for round in $(seq "$RUNS"); do
    echo "round $round" >&2
    for workload in "${WORKLOADS[@]}"; do
        read -r wl port <<<"$workload"
        ref=(python3 "$HERE/benches/longhorn/reference_restore.py" "http://127.0.0.1:$port" bucket lh "$VOLUME" "$BACKUP" "$OUT/ref.img")
        timed "$wl/rehydrate" "$OUT/rh.img" -- env AWS_ENDPOINT_URL="http://127.0.0.1:$port" \
            "$BIN" restore --manifest "$URL" --target "$OUT/rh.img" --config "$WORK/rehydrate.toml"
        grep -q "NOT held off" "$WORK/$wl/rehydrate.err" || echo "note: rehydrate did not warn about the lock" >&2
        timed "$wl/longhorn-2" "$OUT/ref.img" -- "${ref[@]}" --concurrency 2
        timed "$wl/longhorn-$WIDE" "$OUT/ref.img" -- "${ref[@]}" --concurrency "$WIDE"
    done
done

python3 - "$WORK/times" "$SIZE_MIB" "$WIDE" <<'PY'
import statistics, sys
times = {}
for line in open(sys.argv[1]):
    name, secs = line.split()
    times.setdefault(name, []).append(float(secs))
mib, wide = int(sys.argv[2]), sys.argv[3]
med = {k: statistics.median(v) for k, v in times.items()}
print("| workload | restore | median s | MiB/s | runs | Longhorn's / rehydrate's time |")
print("|---|---|---|---|---|---|")
for wl in dict.fromkeys(k.split("/")[0] for k in times):
    base = med[wl + "/rehydrate"]
    for client in ["rehydrate", "longhorn-2", "longhorn-" + wide]:
        k = wl + "/" + client
        runs = " ".join(f"{t:.2f}" for t in times[k])
        ratio = "" if client == "rehydrate" else f"{med[k] / base:.1f}x"
        print(f"| {wl} | {client} | {med[k]:.2f} | {mib / med[k]:.0f} | {runs} | {ratio} |")
PY
