#!/usr/bin/env bash
# A shared MLflow tracking server: PostgreSQL backend store, artifacts proxied by the server.
#
#   scripts/tracking_server.sh start    # init once, start postgres + mlflow server, print the URI to export
#   scripts/tracking_server.sh register # register the shipped champion through the gate unless the store has one
#   scripts/tracking_server.sh stop     # stop both (data stays)
#   scripts/tracking_server.sh status   # exit 0 when both answer
#
# `make tracking-server` runs start then register (REGISTER_PRETRAINED=0: start only, an empty store).
# register runs in the repo as `make demo` does: `dvc repro synthesize` (this copy's test pairs), then
# `python -m deblur.cli.import_pretrained --register $SHIPPED_CHECKPOINT` with MLFLOW_TRACKING_URI set
# to the server; its reports and serving artifact go to $TRACKING_DIR/shipped/, not to this working copy.
#
# Settings (environment):
#   TRACKING_DIR           where everything lives (default ../deblur-tracking beside the repo):
#                          pg/ (the cluster), artifacts/, logs/, pgpass (0600, the db password)
#   TRACKING_HOST, TRACKING_PORT  the mlflow server (default 127.0.0.1, 5000); TRACKING_HOST=0.0.0.0 for a team
#   PGPORT                 PostgreSQL on 127.0.0.1 (default 5433, beside a system cluster on 5432)
#   ARTIFACTS_DESTINATION  default $TRACKING_DIR/artifacts; or s3://bucket/path,
#                          wasbs://container@account.blob.core.windows.net/path (documentation/deploy.md)
#   MLFLOW_WORKERS         server worker processes (default 2)
#   STARTUP_TIMEOUT        seconds to wait for the server's /health (default 300; a busy machine is slow)
#   MLFLOW_BIN             default .venv/bin/mlflow, else mlflow from PATH
#   PG_BIN                 folder holding initdb/pg_ctl/psql (default: newest /usr/lib/postgresql/*/bin)
#   PG_OS_USER             the unprivileged user postgres runs as when this script runs as root (default postgres)
#   MLFLOW_EXTRA_ARGS      more `mlflow server` options, e.g. "--allowed-hosts mlflow.example.com"
#   SHIPPED_CHECKPOINT     what register puts through the gate (default checkpoints/pretrained/nafnet16.pt, as make demo)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
TRACKING_DIR=${TRACKING_DIR:-$root/../deblur-tracking}
case ${1:-start} in
  start) mkdir -p "$TRACKING_DIR" ;;
  stop | status | register)
    [[ -d $TRACKING_DIR ]] || { echo "not running (no $TRACKING_DIR)"; [[ $1 == stop ]]; exit; } ;;
  *) echo "usage: $0 [start|register|stop|status]" >&2; exit 1 ;;
esac
TRACKING_DIR=$(cd "$TRACKING_DIR" && pwd)
HOST=${TRACKING_HOST:-127.0.0.1}
PORT=${TRACKING_PORT:-5000}
PGPORT=${PGPORT:-5433}
ARTIFACTS_DESTINATION=${ARTIFACTS_DESTINATION:-$TRACKING_DIR/artifacts}
case $ARTIFACTS_DESTINATION in *://* | /*) ;; *) ARTIFACTS_DESTINATION=$PWD/$ARTIFACTS_DESTINATION ;; esac
MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-300}
PG_OS_USER=${PG_OS_USER:-postgres}
DB=mlflow
DB_USER=mlflow

pgdata=$TRACKING_DIR/pg
logs=$TRACKING_DIR/logs
pidfile=$TRACKING_DIR/mlflow-server.pid
export PGPASSFILE=$TRACKING_DIR/pgpass   # libpq reads the password from here: it never shows in `ps`
cd "$TRACKING_DIR"   # postgres (another user) may not be allowed into the caller's folder

die() { echo "tracking_server.sh: $*" >&2; exit 1; }

if [[ -z ${MLFLOW_BIN:-} ]]; then
  if [[ -x $root/.venv/bin/mlflow ]]; then MLFLOW_BIN=$root/.venv/bin/mlflow; else MLFLOW_BIN=$(command -v mlflow || true); fi
fi
python=$(dirname "${MLFLOW_BIN:-/missing/mlflow}")/python
[[ -x $python ]] || python=python3
if [[ -z ${PG_BIN:-} ]]; then
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [[ -n $PG_BIN ]] || PG_BIN=$(dirname "$(command -v pg_ctl 2>/dev/null || echo /missing/pg_ctl)")
fi

need_tools() {
  [[ -x $PG_BIN/initdb && -x $PG_BIN/pg_ctl && -x $PG_BIN/psql ]] \
    || die "PostgreSQL server binaries not found (PG_BIN=$PG_BIN): install them (Debian: apt-get install postgresql)"
  [[ -n $MLFLOW_BIN && -x $MLFLOW_BIN ]] || die "mlflow not found: run make install (or set MLFLOW_BIN)"
}

# postgres refuses to run as root: run its server tools as PG_OS_USER then.
as_pg() {
  if [[ $(id -u) == 0 ]]; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi
}

psql_su() { "$PG_BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -tAqc "$1"; }

pg_running() { [[ -f $pgdata/PG_VERSION ]] && as_pg "$PG_BIN/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; }

mlflow_pid() { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null && cat "$pidfile"; }

case $HOST in 0.0.0.0|::) local_host=127.0.0.1 ;; *) local_host=$HOST ;; esac
uri=http://$local_host:$PORT
health() {
  "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
    "http://$local_host:$PORT/health" >/dev/null 2>&1
}

init_cluster() {
  [[ -f $pgdata/PG_VERSION ]] && return
  mkdir -p "$pgdata" "$logs"
  if [[ ! -s $PGPASSFILE ]]; then
    (umask 077; echo "127.0.0.1:*:*:*:$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$PGPASSFILE")
  fi
  local password pwfile
  password=$(cut -d: -f5 "$PGPASSFILE")
  pwfile=$pgdata.pwfile
  (umask 077; echo "$password" >"$pwfile")
  if [[ $(id -u) == 0 ]]; then
    chmod o+x "$TRACKING_DIR"   # PG_OS_USER enters it (and reads nothing else)
    chown "$PG_OS_USER" "$pgdata" "$logs" "$pwfile"
    as_pg test -w "$pgdata" || { rm -f "$pwfile"; die "user $PG_OS_USER cannot write $pgdata: choose a TRACKING_DIR whose parents it can enter"; }
  fi
  echo "initialising a PostgreSQL cluster in $pgdata"
  as_pg "$PG_BIN/initdb" -D "$pgdata" -U postgres --pwfile="$pwfile" --auth-local=peer \
    --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$logs/initdb.log" 2>&1 \
    || { rm -f "$pwfile"; die "initdb failed, see $logs/initdb.log"; }
  rm -f "$pwfile"
}

start_postgres() {
  pg_running && return
  echo "starting PostgreSQL on 127.0.0.1:$PGPORT"
  # TCP on loopback only, no unix socket (its path would be length-limited and need /var/run access).
  as_pg "$PG_BIN/pg_ctl" -D "$pgdata" -l "$logs/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PGPORT -c unix_socket_directories=''" start >/dev/null \
    || die "PostgreSQL did not start, see $logs/postgres.log"
}

create_database() {
  local password
  password=$(cut -d: -f5 "$PGPASSFILE")
  if [[ -z $(psql_su "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'") ]]; then
    # on stdin, not in argv, so the password does not show in `ps`
    "$PG_BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -tAq \
      <<<"CREATE ROLE $DB_USER LOGIN PASSWORD '$password'" >/dev/null
  fi
  if [[ -z $(psql_su "SELECT 1 FROM pg_database WHERE datname = '$DB'") ]]; then
    psql_su "CREATE DATABASE $DB OWNER $DB_USER" >/dev/null
  fi
}

start_mlflow() {
  if health; then echo "mlflow server already answers on port $PORT"; return; fi
  [[ -z $(mlflow_pid) ]] || die "mlflow server (pid $(cat "$pidfile")) runs but does not answer on port $PORT: $0 stop"
  case $ARTIFACTS_DESTINATION in *://*) ;; *) mkdir -p "$ARTIFACTS_DESTINATION" ;; esac
  echo "starting mlflow server on $HOST:$PORT (artifacts: $ARTIFACTS_DESTINATION)"
  # setsid: its own process group, so `stop` ends the server and its workers together.
  # shellcheck disable=SC2086
  setsid "$MLFLOW_BIN" server \
    --backend-store-uri "postgresql+psycopg2://$DB_USER@127.0.0.1:$PGPORT/$DB" \
    --serve-artifacts --artifacts-destination "$ARTIFACTS_DESTINATION" \
    --host "$HOST" --port "$PORT" --workers "$MLFLOW_WORKERS" ${MLFLOW_EXTRA_ARGS:-} \
    >"$logs/mlflow-server.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  # A fresh database: the server runs its schema migrations before it answers.
  local deadline=$((SECONDS + STARTUP_TIMEOUT))
  while ((SECONDS < deadline)); do
    health && return
    kill -0 "$(cat "$pidfile")" 2>/dev/null || die "mlflow server exited, see $logs/mlflow-server.log:
$(tail -n 20 "$logs/mlflow-server.log")"
    sleep 0.5
  done
  die "mlflow server did not answer /health within $STARTUP_TIMEOUT s, see $logs/mlflow-server.log"
}

# The registered model holding `champion` on the server ("deblur v3"), empty when none.
champion() {
  MLFLOW_TRACKING_URI=$uri "$python" -c '
import sys
from deblur.core.config import load_params
from deblur.tracking.runs import version_by_alias
name = load_params(sys.argv[1]).registration.model_name
version = version_by_alias(name, "champion")
print(f"{name} v{version.version}" if version else "")' "$root/params.yaml"
}

# `make demo`'s registration, against the server: the shipped checkpoint scored on this copy's test pairs and put
# through the gate, so a fresh store starts with a champion. A store that has one (any model) is left alone.
register_shipped() {
  health || die "no tracking server answers on $uri: $0 start"
  local current checkpoint=${SHIPPED_CHECKPOINT:-checkpoints/pretrained/nafnet16.pt} out=$TRACKING_DIR/shipped
  current=$(champion) || die "could not read the registry of $uri"
  if [[ -n $current ]]; then
    echo "the store already has a champion ($current): nothing registered"
    return
  fi
  local bin dvc
  bin=$(dirname "$python")
  dvc=$bin/dvc; [[ -x $dvc ]] || dvc=dvc
  echo "no champion on $uri: registering $checkpoint through the gate (scored on this copy's test pairs)"
  # && throughout: `set -e` does not apply inside a subshell followed by ||
  (
    cd "$root" && export MLFLOW_TRACKING_URI=$uri PATH=$bin:$PATH \
      && { [[ -d .dvc ]] || "$dvc" init -q; } \
      && "$dvc" repro synthesize \
      && "$python" -m deblur.cli.import_pretrained --register "$checkpoint" --reports "$out" --serving-dir "$out/model"
  ) || die "registering $checkpoint failed (the server runs on; an empty store: see above)"
  current=$(champion) || die "could not read the registry of $uri"
  [[ -n $current ]] || die "the gate refused $checkpoint on this copy's test pairs: the store has no champion
(reasons in $out/registered_model.json); the first pipeline run that passes the gate becomes champion"
  echo "champion on the server: $current (models:/${current% v*}@champion)"
}

stop_all() {
  local pid
  if pid=$(mlflow_pid); then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "stopped mlflow server (pid $pid)"
  fi
  rm -f "$pidfile"
  if pg_running; then
    as_pg "$PG_BIN/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null
    echo "stopped PostgreSQL ($pgdata)"
  fi
}

case ${1:-start} in
  start)
    need_tools
    init_cluster
    start_postgres
    create_database
    start_mlflow
    echo "tracking server ready; point the pipeline, mlflow ui and the app at it with:"
    echo "export MLFLOW_TRACKING_URI=$uri"
    ;;
  register)
    register_shipped
    echo "UI: $uri   (the pipeline, then make serve: documentation/deploy.md)"
    echo "export MLFLOW_TRACKING_URI=$uri"
    ;;
  stop) stop_all ;;
  status)
    if pg_running && health; then echo "running: http://$local_host:$PORT (PostgreSQL on 127.0.0.1:$PGPORT)"
    else echo "not running"; exit 1; fi
    ;;
esac
