# Shell code shared by benches/nginx_check.sh and benches/e2e.sh: nginx from
# the fixture /work/shared/bench/nginx.conf.in, serving a store root in tmpfs.
# Source it; it defines functions only and starts nothing by itself.
#
#   nginx_fixture_missing CONF_IN      print what the fixture lacks (nothing if complete)
#   nginx_write_conf CONF_IN RUN ROOT [ACCESS_LOG]
#                                      write RUN/nginx.conf (and RUN/err/*.xml);
#                                      with ACCESS_LOG, every request is logged
#                                      there as "port status bytes uri"
#                                      (the fixture itself logs nothing)
#   nginx_start RUN                    start it (daemon) and wait for its 4 ports;
#                                      fails if one of them is taken already
#   nginx_stop RUN                     stop it if it was started (idempotent)
#   bench_dirs NAME                    make WORK (/dev/shm/rehydrate-NAME.*, with
#                                      WORK/state, RUN=WORK/run and RUN/logs) and OUT
#                                      ($TARGET_PARENT/rehydrate-NAME-target.*);
#                                      on exit, stop nginx and remove both
#   seeded_volume SEED MIB OUT         write OUT: MIB MiB of random bytes that are
#                                      the same for the same SEED (AES-128-CTR)
#   compressible_volume SEED MIB OUT   the same, but every 4 KiB of random bytes is
#                                      followed by 4 KiB of zeros: zstd makes ~2:1
#   nginx_latency_start CONF_DIR RUN ROOT [ACCESS_LOG]
#                                      write RUN/latency.conf from CONF_DIR/latency.conf.in
#                                      (30 ms to first byte, port 9089; and 9090, the
#                                      same with delays spread over 22-37 ms) and start it
#   nginx_latency_stop RUN             stop it if it was started (idempotent)

NGINX_PORTS=(9080 9082 9083 9084)

nginx_fixture_missing() {
    local conf_in=$1 dir
    dir=$(dirname "$conf_in")
    [[ -f $conf_in ]] || echo "$conf_in (the nginx config template)"
    for xml in slowdown.xml internal.xml; do
        [[ -f $dir/$xml ]] || echo "$dir/$xml (an S3 error body)"
    done
}

nginx_write_conf() {
    local conf_in=$1 run=$2 root=$3 access_log=${4:-}
    mkdir -p "$run/logs" "$run/tmp" "$run/err"
    cp "$(dirname "$conf_in")/slowdown.xml" "$(dirname "$conf_in")/internal.xml" "$run/err/"
    {
        if [[ $(id -u) == 0 ]]; then echo "user root root;"; fi
        if [[ -n $access_log ]]; then
            # Unbuffered, so a run's lines are all there when it ends.
            sed -e "s|@RUN@|$run|g" -e "s|@ROOT@|$root|g" \
                -e "s|^  access_log off;|  log_format e2e '\$server_port \$status \$body_bytes_sent \$uri';\n  access_log $access_log e2e;|" \
                "$conf_in"
        else
            sed -e "s|@RUN@|$run|g" -e "s|@ROOT@|$root|g" "$conf_in"
        fi
    } >"$run/nginx.conf"
}

nginx_start() {
    local run=$1 port
    for port in "${NGINX_PORTS[@]}"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "nginx_start: port $port is in use (another fixture or benchmark running?): stop it and rerun" >&2
            return 1
        fi
    done
    nginx -p "$run" -c "$run/nginx.conf" -e "$run/logs/error.log"
    for port in "${NGINX_PORTS[@]}"; do
        for _ in $(seq 50); do
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
            sleep 0.1
        done
    done
}

nginx_stop() {
    local run=$1
    [[ -f $run/nginx.pid ]] || return 0
    nginx -p "$run" -c "$run/nginx.conf" -e "$run/logs/error.log" -s stop 2>/dev/null ||
        kill "$(cat "$run/nginx.pid")" 2>/dev/null || true
    rm -f "$run/nginx.pid"
}

seeded_volume() {
    # openssl ends on a broken pipe when head has enough: not an error here.
    { openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:rehydrate-e2e-$1" </dev/zero 2>/dev/null || true; } |
        head -c "$(($2 << 20))" >"$3"
    [[ $(stat -c %s "$3") == $(($2 << 20)) ]] || { echo "seeded_volume: could not write $2 MiB to $3" >&2; return 1; }
}

compressible_volume() {
    seeded_volume "$1" "$(($2 / 2))" "$3.half" || return 1
    python3 - "$3.half" "$3" <<'PY'
import sys
zeros = bytes(4096)
with open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as out:
    while chunk := src.read(4096):
        out.write(chunk)
        out.write(zeros)
PY
    rm -f "$3.half"
}

nginx_latency_start() {
    local conf_dir=$1 run=$2 root=$3 access_log=${4:-}
    [[ -f /usr/lib/nginx/modules/ngx_http_echo_module.so ]] || {
        echo "nginx_latency_start: the echo module is missing: apt-get install -y libnginx-mod-http-echo" >&2
        return 1
    }
    {
        if [[ $(id -u) == 0 ]]; then echo "user root root;"; fi
        if [[ -n $access_log ]]; then
            sed -e "s|@RUN@|$run|g" -e "s|@ROOT@|$root|g" \
                -e "s|^  access_log off;|  log_format e2e '\$server_port \$status \$body_bytes_sent \$uri';\n  access_log $access_log e2e;|" \
                "$conf_dir/latency.conf.in"
        else
            sed -e "s|@RUN@|$run|g" -e "s|@ROOT@|$root|g" "$conf_dir/latency.conf.in"
        fi
    } | sed '$d' >"$run/latency.conf"
    latency_spread_server "$root" >>"$run/latency.conf"
    if (exec 3<>/dev/tcp/127.0.0.1/9089) 2>/dev/null; then
        echo "nginx_latency_start: port 9089 is in use: stop it and rerun" >&2
        return 1
    fi
    nginx -p "$run" -c "$run/latency.conf" -e "$run/logs/error-latency.log"
    for _ in $(seq 50); do
        (exec 3<>/dev/tcp/127.0.0.1/9089) 2>/dev/null && return 0
        sleep 0.1
    done
}

# A second server for the latency config (it closes the http block the
# template leaves open once its last line is dropped): port 9090, the same
# files, each request's delay spread over 22-37 ms (mean 29.5) by the last hex
# digit of its random $request_id. The fixed 30 ms port answers every
# request its one worker read in one pass of its event loop together; these
# do not line up, as a store's answers do not.
latency_spread_server() { # ROOT
    echo '  map $request_id $spread_delay {'
    local i=0 digit
    for digit in 0 1 2 3 4 5 6 7 8 9 a b c d e f; do
        printf '    ~%s$ 0.%03d;\n' "$digit" $((22 + i))
        i=$((i + 1))
    done
    echo '  }'
    echo '  server {'
    echo '    listen 127.0.0.1:9090;'
    echo "    root $1;"
    echo '    location = /bucket { return 200; }'
    echo '    location / { echo_sleep $spread_delay; echo_exec @object; }'
    echo '    location @object { try_files $uri =404; }'
    echo '  }'
    echo '}'
}

nginx_latency_stop() {
    local run=$1
    [[ -f $run/nginx-latency.pid ]] || return 0
    kill "$(cat "$run/nginx-latency.pid")" 2>/dev/null || true
    rm -f "$run/nginx-latency.pid"
}

bench_dirs() {
    WORK=$(mktemp -d "/dev/shm/rehydrate-$1.XXXXXX")
    OUT=$(mktemp -d "$TARGET_PARENT/rehydrate-$1-target.XXXXXX")
    RUN=$WORK/run
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    mkdir -p "$WORK/state" "$RUN/logs"
}

bench_cleanup() {
    [[ -z ${WORKER_PID:-} ]] || kill "$WORKER_PID" 2>/dev/null || true
    nginx_latency_stop "$RUN"
    nginx_stop "$RUN"
    rm -rf "$WORK" "$OUT"
}
