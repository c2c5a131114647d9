#!/usr/bin/env bash
# A whole care-scale "cluster" on one machine, for trying the flow before a real cluster:
#   - an S3 protocol server (moto's server mode, from the `dev` extra) on 127.0.0.1, holding
#     slides and tables
#   - a Ray head whose every server (GCS, raylet, workers, dashboard / job API) listens on
#     127.0.0.1 only, so `ray job submit` works as on a cluster: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
#     makes Ray bind loopback (as on macOS/Windows) instead of all interfaces; drivers joining
#     it need the same variable (it is in the printed env) or they dial the routable address
#
#   infra/local/cluster.sh up       # start both, print the env vars to export
#   infra/local/cluster.sh status   # is it running? prints the env again
#   infra/local/cluster.sh down     # stop both; no process left behind
#
# State (PIDs, ports, logs, env file) lives in $CARE_SCALE_LOCAL_STATE
# (default: ~/.cache/care-scale/local). `up` records where (in env.sh, and in
# ~/.cache/care-scale/local-state), so `status` and `down` find it without the variable.
# Both servers run in their own sessions, so closing
# the terminal does not stop them; `down` stops exactly the processes `up` started (by PID,
# plus their descendants), never other Ray clusters on the machine (so no `ray stop`).
#
# Knobs (env): CARE_SCALE_LOCAL_BUCKET (care-scale), CARE_SCALE_LOCAL_CPUS (2),
# CARE_SCALE_LOCAL_OBJECT_STORE_BYTES (1000000000), PYTHON (python3), RAY (ray).
set -euo pipefail

CACHE_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/care-scale
POINTER=$CACHE_ROOT/local-state   # the state folder of the last `up`
if [ -n "${CARE_SCALE_LOCAL_STATE:-}" ]; then
  STATE=$CARE_SCALE_LOCAL_STATE
elif [ "${1:-}" != up ] && [ -s "$POINTER" ]; then
  STATE=$(cat "$POINTER")
else
  STATE=$CACHE_ROOT/local
fi
BUCKET=${CARE_SCALE_LOCAL_BUCKET:-care-scale}
CPUS=${CARE_SCALE_LOCAL_CPUS:-2}
OBJECT_STORE_BYTES=${CARE_SCALE_LOCAL_OBJECT_STORE_BYTES:-1000000000}
PYTHON=${PYTHON:-python3}
RAY=${RAY:-ray}
# moto accepts any credentials; these are placeholders, not secrets.
LOCAL_KEY_ID=testing
LOCAL_SECRET=testing-secret
LOCAL_REGION=us-east-1

die() { echo "cluster.sh: $*" >&2; exit 1; }

# Running and not a zombie (a zombie whose parent is gone may never be reaped in a container).
alive() {
  [ -n "${1:-}" ] || return 1
  local stat
  stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [ -n "$stat" ] && [ "${stat#Z}" = "$stat" ]
}

# Descendants of a PID (children first found through /proc via ps), one per line.
descendants() {
  local pid=$1 child
  for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

free_ports() {  # N distinct free loopback ports
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

wait_for() {  # wait_for SECONDS PID DESCRIPTION PYTHON-CHECK
  local deadline=$(( $(date +%s) + $1 ))
  while ! "$PYTHON" -c "$4" >/dev/null 2>&1; do
    alive "$2" || die "$3 exited during start-up; see $STATE/*.log"
    [ "$(date +%s)" -lt "$deadline" ] || die "$3 did not come up within $1 s; see $STATE/*.log"
    sleep 0.5
  done
}

print_env() {
  # shellcheck disable=SC1091
  . "$STATE/env.sh"
  cat "$STATE/env.sh"
  echo "# Ray dashboard: $RAY_ADDRESS   S3 endpoint: $AWS_ENDPOINT_URL   bucket: s3://$BUCKET"
}

up() {
  if [ -f "$STATE/ray.pid" ] && alive "$(cat "$STATE/ray.pid")"; then
    echo "# already running (state in $STATE)"
    print_env
    return 0
  fi
  mkdir -p "$STATE" "$CACHE_ROOT"
  rm -f "$STATE"/*.pid "$STATE/env.sh"
  (cd "$STATE" && pwd) >"$POINTER"
  # A failed start leaves nothing running behind it.
  trap 'echo "cluster.sh: start failed, stopping what was started" >&2; down >&2' EXIT
  read -r S3_PORT GCS_PORT DASH_PORT CLIENT_PORT NM_PORT OM_PORT AGENT_PORT AGENT_GRPC \
    METRICS_PORT RTENV_PORT < <(free_ports 10)
  local endpoint="http://127.0.0.1:$S3_PORT"

  # 1. S3 server. `setsid` gives it its own process group, so `down` can stop it whole.
  setsid "$PYTHON" -m moto.server -H 127.0.0.1 -p "$S3_PORT" \
    >"$STATE/moto.log" 2>&1 </dev/null &
  echo $! >"$STATE/moto.pid"
  wait_for 30 "$(cat "$STATE/moto.pid")" "moto server" \
    "import socket; socket.create_connection(('127.0.0.1', $S3_PORT), timeout=0.5)"

  # The Ray processes inherit these, so jobs and their workers reach the local S3 server
  # through the standard AWS chain, with no credentials in any config file.
  export AWS_ENDPOINT_URL=$endpoint AWS_ACCESS_KEY_ID=$LOCAL_KEY_ID
  export AWS_SECRET_ACCESS_KEY=$LOCAL_SECRET AWS_DEFAULT_REGION=$LOCAL_REGION
  export AWS_REGION=$LOCAL_REGION AWS_ALLOW_HTTP=true
  export RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  # Ray turns token authentication on by itself when ~/.ray/auth_token exists, while the job
  # CLI only sends the token in token mode: say "disabled" on both sides (env.sh below) so this
  # loopback-only dev head behaves the same on every machine.
  export RAY_AUTH_MODE=disabled

  "$PYTHON" - "$endpoint" "$BUCKET" <<'EOF'
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1]).create_bucket(Bucket=sys.argv[2])
EOF

  # 2. Ray head. --block keeps `ray start` in the foreground as the parent of every Ray
  # process of this node; on SIGTERM it shuts them down. Every port is chosen here so this
  # head never collides with another Ray cluster on the machine. The temp dir is short
  # because Ray's Unix socket paths must stay under 108 bytes.
  local ray_tmp
  ray_tmp=$(mktemp -d /tmp/csray.XXXXXX)
  echo "$ray_tmp" >"$STATE/ray_tmp"
  setsid "$RAY" start --head --block --disable-usage-stats \
    --node-ip-address=127.0.0.1 --port="$GCS_PORT" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
    --ray-client-server-port="$CLIENT_PORT" --node-manager-port="$NM_PORT" \
    --object-manager-port="$OM_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
    --dashboard-agent-grpc-port="$AGENT_GRPC" --metrics-export-port="$METRICS_PORT" \
    --runtime-env-agent-port="$RTENV_PORT" \
    --num-cpus="$CPUS" --num-gpus=0 --object-store-memory="$OBJECT_STORE_BYTES" \
    --temp-dir="$ray_tmp" >"$STATE/ray.log" 2>&1 </dev/null &
  echo $! >"$STATE/ray.pid"
  # The job server answers on the dashboard port once the head is ready for `ray job submit`.
  wait_for 120 "$(cat "$STATE/ray.pid")" "ray head" \
    "import urllib.request, urllib.error
try:
    urllib.request.urlopen('http://127.0.0.1:$DASH_PORT/api/version', timeout=2)
except urllib.error.HTTPError:
    pass  # it answered (401 when Ray token authentication is on): the server is up"
  # Jobs go through the head node's dashboard agent, which registers a few seconds after the
  # dashboard; until then `ray job submit` fails with "No available agent".
  wait_for 120 "$(cat "$STATE/ray.pid")" "ray dashboard agent" \
    "import urllib.request
body = urllib.request.urlopen('http://127.0.0.1:$AGENT_PORT/api/local_raylet_healthz', timeout=2).read()
assert b'success' in body"

  cat >"$STATE/env.sh" <<EOF
export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT
export RAY_GCS_ADDRESS=127.0.0.1:$GCS_PORT
export RAY_AUTH_MODE=disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export AWS_ENDPOINT_URL=$endpoint
export AWS_ACCESS_KEY_ID=$LOCAL_KEY_ID
export AWS_SECRET_ACCESS_KEY=$LOCAL_SECRET
export AWS_DEFAULT_REGION=$LOCAL_REGION
export AWS_REGION=$LOCAL_REGION
export AWS_ALLOW_HTTP=true
export CARE_SCALE_LOCAL_BUCKET=$BUCKET
export CARE_SCALE_LOCAL_STATE=$(cd "$STATE" && pwd)
EOF
  trap - EXIT
  echo "# care-scale local cluster is up (state in $STATE). Run:  . $STATE/env.sh"
  print_env
}

wait_gone() {  # wait_gone SECONDS PID...: until none is alive or the time is up
  local deadline=$(( $(date +%s) + $1 )) p
  shift
  for p in "$@"; do
    while alive "$p" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
  done
}

stop_tree() {  # stop_tree NAME: stop the process `up` started and everything under it
  local name=$1 pid p
  local -a pids
  [ -f "$STATE/$name.pid" ] || return 0
  pid=$(cat "$STATE/$name.pid")
  if alive "$pid"; then
    # Collect the whole tree first: once a parent dies, its children are re-parented.
    mapfile -t pids < <(echo "$pid"; descendants "$pid")
    # SIGTERM to the root only: `ray start --block` then shuts its processes down in order
    # (signalling the whole group at once leaves the raylet draining for much longer).
    kill -TERM "$pid" 2>/dev/null || true
    wait_gone 30 "$pid"
    for p in "${pids[@]}"; do
      if alive "$p"; then kill -TERM "$p" 2>/dev/null || true; fi
    done
    wait_gone 10 "${pids[@]}"
    for p in "${pids[@]}"; do
      if alive "$p"; then kill -KILL "$p" 2>/dev/null || true; fi
    done
  fi
  rm -f "$STATE/$name.pid"
  echo "# stopped $name"
}

down() {
  [ -d "$STATE" ] || { echo "# nothing to stop (no $STATE)"; return 0; }
  stop_tree ray
  stop_tree moto
  if [ -f "$STATE/ray_tmp" ]; then
    rm -rf "$(cat "$STATE/ray_tmp")"
    rm -f "$STATE/ray_tmp"
  fi
  rm -f "$STATE/env.sh"
  if [ -s "$POINTER" ] && [ "$(cat "$POINTER")" = "$(cd "$STATE" && pwd)" ]; then
    rm -f "$POINTER"
  fi
}

status() {
  local rc=0 name pid
  for name in moto ray; do
    pid=$(cat "$STATE/$name.pid" 2>/dev/null || true)
    if alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; rc=1; fi
  done
  if [ "$rc" = 0 ]; then print_env; fi
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 64 ;;
esac
