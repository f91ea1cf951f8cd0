#!/usr/bin/env bash
# Flat cost (issue 6): a large restore must run as fast, per byte, as a small
# one, in the same memory.
#
#   benches/flat_cost.sh [--small-mib N (default 1024)] [--large-mib N (default 16384)] [--runs N (default 3)]
#
# Builds one seeded pseudo-random volume of --large-mib (AES-CTR keystream, as
# benches/e2e.sh) and snapshots it, and its first --small-mib, into one
# file:// store in tmpfs (the small snapshot's objects are a prefix of the
# large one's, so the store holds the large volume once). nginx serves the
# store as in /work/shared/bench/nginx.conf.in (the clean port, 9080). Then,
# --runs times, small and large in turn, it restores each through the S3
# client into TARGET_DIR (fdatasync and swap included) and records wall time,
# peak RSS (GNU time) and whole-machine CPU seconds. It prints the medians and
# the large run's ratio to the small one for each.
#
# Needs: nginx, curl, openssl, python3, /usr/bin/time, the release build, and
# tmpfs room for the large volume's objects plus disk room in TARGET_DIR for
# the volume itself (the source is written there while it is snapshotted).
# Installs nothing: it says what is missing and exits 2. Cleans up on exit.
#
# Env: TARGET_DIR (default /tmp), REHYDRATE (default /work/main/target/release/rehydrate),
#      NGINX_CONF_IN (default /work/shared/bench/nginx.conf.in), SEED (default 1)
set -euo pipefail

SMALL_MIB=1024
LARGE_MIB=16384
RUNS=3
while (($#)); do
    case $1 in
    --small-mib) SMALL_MIB=$2; shift 2 ;;
    --large-mib) LARGE_MIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "flat_cost: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
for n in "$SMALL_MIB" "$LARGE_MIB" "$RUNS"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "flat_cost: sizes and --runs take positive integers" >&2; exit 2; }
done
((SMALL_MIB <= LARGE_MIB)) || { echo "flat_cost: --small-mib must not exceed --large-mib" >&2; exit 2; }

CONF_IN=${NGINX_CONF_IN:-/work/shared/bench/nginx.conf.in}
TARGET_PARENT=${TARGET_DIR:-/tmp}
BIN=${REHYDRATE:-/work/main/target/release/rehydrate}
SEED=${SEED:-1}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/e2e/lib.sh
source "$HERE/benches/e2e/lib.sh"

missing=()
for tool in nginx curl openssl python3; do
    command -v $tool >/dev/null 2>&1 || missing+=("$tool (apt-get install -y $tool)")
done
[[ -x /usr/bin/time ]] || missing+=("/usr/bin/time (apt-get install -y time)")
[[ -x $BIN ]] || missing+=("$BIN (cd $HERE && cargo build --release)")
while IFS= read -r line; do missing+=("$line"); done < <(nginx_fixture_missing "$CONF_IN")
shm_free=$(df -B1M --output=avail /dev/shm | tail -1)
disk_free=$(df -B1M --output=avail "$TARGET_PARENT" | tail -1)
((shm_free > LARGE_MIB + 256)) || missing+=("room in /dev/shm: ${LARGE_MIB} MiB needed, ${shm_free} MiB free")
((disk_free > LARGE_MIB + 1024)) || missing+=("room in $TARGET_PARENT: ${LARGE_MIB} MiB needed, ${disk_free} MiB free")
if ((${#missing[@]})); then
    echo "flat_cost: cannot run, missing:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 2
fi

bench_dirs flat
STORE=$WORK/root/bucket/snap
mkdir -p "$STORE"
echo "flat_cost: ${SMALL_MIB} MiB against ${LARGE_MIB} MiB, $RUNS run(s); binary $BIN; load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

snapshot() { # name MiB
    seeded_volume "$SEED" "$2" "$OUT/source.img" || exit 1
    "$BIN" snapshot create --source "$OUT/source.img" --store "file://$STORE" --name "$1" --block-size 1MiB \
        --json >/dev/null
    rm -f "$OUT/source.img"
}
snapshot large "$LARGE_MIB"
snapshot small "$SMALL_MIB"

nginx_write_conf "$CONF_IN" "$RUN" "$WORK/root"
nginx_start "$RUN"
printf '[checkpoint]\ndir = "%s"\n' "$WORK/state" >"$WORK/config.toml"
export AWS_ACCESS_KEY_ID=nginx-ignores-signatures AWS_SECRET_ACCESS_KEY=nginx-ignores-signatures
export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true AWS_ENDPOINT_URL=http://127.0.0.1:9080
unset AWS_PROFILE AWS_SESSION_TOKEN

busy_jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }
: >"$WORK/results"
for round in $(seq "$RUNS"); do
    for name in small large; do
        rm -f "$OUT/vol.img"
        sync -f "$OUT"
        b0=$(busy_jiffies)
        /usr/bin/time -f %M -o "$WORK/rss" "$BIN" restore --manifest "s3://bucket/snap/$name.manifest" \
            --target "$OUT/vol.img" --config "$WORK/config.toml" --restart --json >"$WORK/report.json"
        b1=$(busy_jiffies)
        python3 - "$name" "$WORK/report.json" "$(cat "$WORK/rss")" "$((b1 - b0))" "$(getconf CLK_TCK)" \
            >>"$WORK/results" <<'EOF'
import json, sys
name, report, rss_kib, jiffies, tck = sys.argv[1:]
r = json.load(open(report))
assert r["succeeded"] and r["blocks_settled"] == r["blocks_total"], r
print(json.dumps({"name": name, "bytes": r["bytes_total"], "secs": r["duration_secs"],
                  "rss_mib": int(rss_kib) / 1024, "cpu_secs": int(jiffies) / int(tck), "timings": r["timings"]}))
EOF
        tail -1 "$WORK/results" >&2
    done
done
rm -f "$OUT/vol.img"

python3 - "$WORK/results" "$RUNS" "$(nproc)" "$(uname -r)" <<'EOF'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
GIB = 1 << 30
def med(name, f):
    return statistics.median(f(r) for r in recs if r["name"] == name)
rows = [("throughput GiB/s", lambda r: r["bytes"] / r["secs"] / GIB, ".3f"),
        ("peak RSS MiB", lambda r: r["rss_mib"], ".1f"),
        ("CPU s/GiB (whole machine)", lambda r: r["cpu_secs"] / (r["bytes"] / GIB), ".3f")]
size = {n: next(r["bytes"] for r in recs if r["name"] == n) / GIB for n in ("small", "large")}
print(f"\nflat cost: {size['small']:g} GiB against {size['large']:g} GiB, medians of {sys.argv[2]} run(s); "
      f"nproc {sys.argv[3]}, kernel {sys.argv[4]}")
print(f"{'':28}{'small':>10}{'large':>10}{'large/small':>13}")
for label, f, spec in rows:
    s, l = med("small", f), med("large", f)
    print(f"{label:28}{format(s, spec):>10}{format(l, spec):>10}{l / s:>13.3f}")
EOF
