#!/usr/bin/env bash
# A/B: two rehydrate binaries restoring the same snapshot from the fixture's
# clean port (W1), alternately, in one run, so a change can be checked for a
# regression against the binary before it:
#
#   benches/ab.sh OLD_BINARY NEW_BINARY [--size-mib N (default 2048)] [--runs N (default 5)]
#
# Builds a seeded volume, snapshots it in 1 MiB blocks (with NEW) into a tmpfs
# store served by nginx (/work/shared/bench/nginx.conf.in, port 9080), then
# alternates OLD and NEW restores (fdatasync included; each restore is
# verified against the manifest outside the timed window). Prints each run and
# the medians, and NEW's median time over OLD's.
set -euo pipefail

(($# >= 2)) || { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 2; }
OLD=$1 NEW=$2
shift 2
SIZE_MIB=2048
RUNS=5
while (($#)); do
    case $1 in
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
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
"$NEW" snapshot create --source "$WORK/source.img" --store "file://$STORE" --name vol --block-size 1MiB >/dev/null
rm -f "$WORK/source.img"
nginx_write_conf "$CONF_IN" "$RUN" "$WORK/root"
nginx_start "$RUN"
printf '[checkpoint]\ndir = "%s"\n' "$WORK/state" >"$WORK/clean.toml"
export AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
export AWS_ENDPOINT_URL=http://127.0.0.1:9080

: >"$WORK/times"
for round in $(seq "$RUNS"); do
    for which in old new; do
        bin=$OLD
        [[ $which == new ]] && bin=$NEW
        rm -f "$OUT/vol.img"
        sync -f "$OUT"
        t0=$(date +%s.%N)
        "$bin" restore --manifest s3://bucket/snap/vol.manifest --target "$OUT/vol.img" --config "$WORK/clean.toml" \
            --restart --json >/dev/null
        t1=$(date +%s.%N)
        "$NEW" verify --manifest "file://$STORE/vol.manifest" --target "$OUT/vol.img" >/dev/null
        echo "$which $(echo "$t1 - $t0" | bc)" | tee -a "$WORK/times" >&2
    done
done
python3 - "$WORK/times" "$SIZE_MIB" <<'EOF'
import statistics, sys
t = {"old": [], "new": []}
for line in open(sys.argv[1]):
    which, secs = line.split()
    t[which].append(float(secs))
mib = int(sys.argv[2])
for which in ("old", "new"):
    m = statistics.median(t[which])
    print(f"{which}: median {m:.3f} s ({mib / 1024 / m:.3f} GiB/s) over {len(t[which])} runs: {', '.join(f'{x:.3f}' for x in t[which])}")
print(f"new/old median time: {statistics.median(t['new']) / statistics.median(t['old']):.3f}")
EOF
