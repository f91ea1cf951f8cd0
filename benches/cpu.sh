#!/usr/bin/env bash
# rehydrate's own CPU per GiB (issue 16, point 4), rerunnable:
#
#   benches/cpu.sh BINARY [--runs N (default 3)] [--size-mib N (default 1024)] [--block-size SIZE (default 1MiB)]
#                  [--profile] [--faults]
#
# Snapshots a seeded random volume in 1 MiB blocks into tmpfs, serves it with
# the fixture's nginx (clean port 9080), restores it N times to TARGET_DIR
# (default /tmp) under GNU time (user + sys of the rehydrate process, per
# GiB), then once under `strace -c -f` (syscalls per block) and, with
# --profile and perf installed, once under `perf record -g` (top symbols of
# the process, and its samples by object: kernel, binary, libc) and, with
# --faults, once under `perf record -e page-faults --call-graph dwarf` (who
# touches fresh pages, which the kernel zeroes) and `perf record --call-graph
# dwarf` (benches/e2e/leaf_callers.py: the copy, zeroing, hashing and socket
# copy samples split by the caller). Removes everything on exit.
set -euo pipefail
(($# >= 1)) || { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 2; }
BIN=$1
shift
RUNS=3 SIZE_MIB=1024 BLOCK_SIZE=1MiB PROFILE=0 FAULTS=0
while (($#)); do
    case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    --block-size) BLOCK_SIZE=$2; shift 2 ;;
    --profile) PROFILE=1; shift ;;
    --faults) FAULTS=1; shift ;;
    *) echo "cpu: unknown argument $1" >&2; exit 2 ;;
    esac
done
HERE=$(cd "$(dirname "$0")/.." && pwd)
CONF_IN=${NGINX_CONF_IN:-/work/shared/bench/nginx.conf.in}
TARGET_PARENT=${TARGET_DIR:-/tmp}
# shellcheck source=benches/e2e/lib.sh
source "$HERE/benches/e2e/lib.sh"
bench_dirs cpu
STORE=$WORK/root/bucket/snap
mkdir -p "$STORE"
seeded_volume 7 "$SIZE_MIB" "$WORK/source.img"
"$BIN" snapshot create --source "$WORK/source.img" --store "file://$STORE" --name vol --block-size "$BLOCK_SIZE" --json >/dev/null
rm -f "$WORK/source.img"
nginx_write_conf "$CONF_IN" "$RUN" "$WORK/root"
nginx_start "$RUN"
printf '[checkpoint]\ndir = "%s"\n' "$WORK/state" >"$WORK/clean.toml"
export AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
export AWS_ENDPOINT_URL=http://127.0.0.1:9080
restore() { "$@" "$BIN" restore --manifest s3://bucket/snap/vol.manifest --target "$OUT/vol.img" --config "$WORK/clean.toml" --restart --json >/dev/null; }
gib=$(python3 -c "print($SIZE_MIB / 1024)")
echo "cpu: $SIZE_MIB MiB in $BLOCK_SIZE blocks, load $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq "$RUNS"); do
    rm -f "$OUT/vol.img"
    restore /usr/bin/time -f "%e %U %S %M" -o "$WORK/time"
    read -r wall user sys rss <"$WORK/time"
    python3 -c "w,u,s,g=$wall,$user,$sys,$gib; print(f'  run $i: {w:.2f} s, user {u:.2f} s, sys {s:.2f} s, {(u+s)/g:.2f} CPU s/GiB (user {u/g:.2f}, sys {s/g:.2f}), peak RSS {$rss/1024:.0f} MiB')"
done
rm -f "$OUT/vol.img"
if command -v strace >/dev/null; then
    restore strace -c -f -o "$WORK/strace"
    echo "  strace -c -f (one run):"
    head -20 "$WORK/strace" | sed 's/^/    /'
fi
rm -f "$OUT/vol.img"
# perf report's output is cut with head: a SIGPIPE there is not a failure.
if ((PROFILE)) && command -v perf >/dev/null; then
    restore perf record -q -g -o "$WORK/perf.data"
    echo "  perf record -g, top symbols of the process (self):"
    { perf report -i "$WORK/perf.data" --no-children --sort sym --stdio 2>/dev/null || true; } |
        grep -E '^ +[0-9]' | head -25 | sed 's/^/    /' || true
    echo "  by object (the kernel, the binary, libc):"
    { perf report -i "$WORK/perf.data" --no-children --sort dso --stdio 2>/dev/null || true; } |
        grep -E '^ +[0-9]' | head -6 | sed 's/^/    /' || true
    rm -f "$OUT/vol.img" "$WORK/perf.data"
fi
if ((FAULTS)) && command -v perf >/dev/null; then
    restore perf record -q -e page-faults --call-graph dwarf,16384 -o "$WORK/faults.data"
    echo "  page faults by caller (perf record -e page-faults --call-graph dwarf; first lines per stack):"
    { perf report -i "$WORK/faults.data" --no-children --sort sym --stdio -G 2>/dev/null || true; } |
        grep -vE '^$|^#' | head -80 | sed 's/^/    /' || true
    rm -f "$OUT/vol.img" "$WORK/faults.data"
    restore perf record -q -F 997 --call-graph dwarf,16384 -o "$WORK/cycles.data"
    echo "  CPU samples of the big leaves by caller (perf record --call-graph dwarf):"
    [[ -z ${PERF_KEEP:-} ]] || cp "$WORK/cycles.data" "$PERF_KEEP"
    perf script -i "$WORK/cycles.data" -F comm,period,ip,sym 2>/dev/null | python3 "$HERE/benches/e2e/leaf_callers.py" |
        sed 's/^/    /'
fi
