#!/usr/bin/env bash
# `make observe`: the demo proxy plus a real Prometheus scraping it, on loopback only.
#
# Starts `jalur demo` (proxy 127.0.0.1:8080, admin 127.0.0.1:9901), Prometheus with
# config/prometheus.yml on 127.0.0.1:$PROM_PORT (default 9090) and a temporary data dir,
# sends a little demo traffic, waits until Prometheus has scraped it, prints a query URL and
# the per-route result, then runs until Ctrl-C. On exit both processes are stopped by PID
# and the data dir is removed.
set -euo pipefail
# Job control: each background process gets its own process group, so a terminal Ctrl-C
# reaches only make and this script, whose trap then stops the children by PID.
set -m
cd "$(dirname "$0")/.."

JALUR=${JALUR:-.venv/bin/jalur}
PYTHON=${PYTHON:-.venv/bin/python}
PROMETHEUS=${PROMETHEUS:-prometheus}
PROM_PORT=${PROM_PORT:-9090}
PROXY=http://127.0.0.1:8080
ADMIN=http://127.0.0.1:9901
PROM=http://127.0.0.1:${PROM_PORT}
REQUESTS=${REQUESTS:-25}   # per route: /api/feed and /api/payment/charge

work=$(mktemp -d "${TMPDIR:-/tmp}/jalur-observe.XXXXXX")
jalur_pid=
prom_pid=

stop() {  # stop PID: SIGTERM, wait up to 10 s, then SIGKILL
    local pid=$1 i
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    trap - EXIT INT TERM
    echo
    echo "observe: stopping prometheus (pid ${prom_pid:--}) and jalur demo (pid ${jalur_pid:--})"
    stop "$prom_pid"
    stop "$jalur_pid"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

die() {
    echo "observe: $*" >&2
    exit 1
}

# wait_for DESCRIPTION SECONDS PID COMMAND...: poll COMMAND until it succeeds, failing at the
# deadline or as soon as PID (the process being waited on) has exited.
wait_for() {
    local what=$1 seconds=$2 pid=$3 log=$4
    shift 4
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$log" >&2 || true
            die "$what: the process exited (log above)"
        fi
        ((SECONDS < deadline)) || die "$what: not within ${seconds}s"
        sleep 0.2
    done
}

command -v "$PROMETHEUS" >/dev/null || die "prometheus not found (make install-prometheus)"
[[ -x $JALUR ]] || die "$JALUR not found (make venv)"
for url in "$PROXY" "$ADMIN" "$PROM"; do
    if curl -s -o /dev/null --max-time 1 "$url/"; then
        die "something already listens on ${url#http://}; stop it first"
    fi
done

"$JALUR" demo >"$work/jalur.log" 2>&1 &
jalur_pid=$!
wait_for "jalur demo" 30 "$jalur_pid" "$work/jalur.log" curl -fsS "$ADMIN/readyz"
echo "observe: jalur demo running (pid $jalur_pid): proxy $PROXY, metrics $ADMIN/metrics"

"$PROMETHEUS" --config.file=config/prometheus.yml --storage.tsdb.path="$work/data" \
    --web.listen-address="127.0.0.1:${PROM_PORT}" >"$work/prometheus.log" 2>&1 &
prom_pid=$!
wait_for "prometheus" 60 "$prom_pid" "$work/prometheus.log" curl -fsS "$PROM/-/ready"
echo "observe: prometheus running (pid $prom_pid): $PROM"

for ((i = 0; i < REQUESTS; i++)); do
    curl -s -o /dev/null --max-time 5 "$PROXY/api/feed"
    curl -s -o /dev/null --max-time 5 -X POST "$PROXY/api/payment/charge" -d '{}'
done
echo "observe: sent $((2 * REQUESTS)) requests (GET /api/feed, POST /api/payment/charge)"

query='sum by (route) (jalur_requests_total)'
# Prints "route value" lines; succeeds once both routes show all the traffic sent.
scraped() {
    curl -fsS --max-time 2 -G "$PROM/api/v1/query" --data-urlencode "query=$query" |
        "$PYTHON" -c '
import json, sys
want = int(sys.argv[1])
rows = {r["metric"].get("route", ""): r["value"][1] for r in json.load(sys.stdin)["data"]["result"]}
for route, value in sorted(rows.items()):
    print(f"  route={route:<10} jalur_requests_total={value}")
sys.exit(0 if all(float(rows.get(r, 0)) >= want for r in ("feed", "payment")) else 1)
' "$REQUESTS"
}
wait_for "prometheus scraping jalur_requests_total" 60 "$prom_pid" "$work/prometheus.log" scraped

encoded=$("$PYTHON" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$query")
echo "observe: Prometheus has the series. Query:"
echo "  $PROM/graph?g0.expr=${encoded}&g0.tab=1"
echo "observe: $query"
scraped
echo "observe: Grafana dashboard: config/grafana/jalur.json (import it, pick this Prometheus)."
echo "observe: Ctrl-C stops prometheus and the demo."
wait -n "$prom_pid" "$jalur_pid" || true
tail -n 20 "$work/prometheus.log" "$work/jalur.log" >&2 || true
die "prometheus or jalur demo exited on its own (logs above)"
