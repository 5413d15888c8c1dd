#!/usr/bin/env bash
# `make bench-compare`: Switchboard and the Socket.IO peer (../shared/peers/socketio) on the
# same workloads (shared/design/BENCH.md), side by side, interleaved, in one sitting.
#
#   ROUNDS=2 (default)   rounds of every workload, each round runs the peer then Switchboard
#   QUIET_MAX_PCT=15     before each run, wait until the machine is at most this busy (2 s
#   QUIET_WAIT_S=300     sample), for at most QUIET_WAIT_S; then run anyway and say so
#   PEER_DIR=...         where the peer harness is (default ../shared/peers/socketio)
#   RUN_TIMEOUT_S=600    the longest one run may take
#
# Every JSON line goes to stdout (and to target/bench-compare/lines.jsonl); then a table of
# ratios (Switchboard / Socket.IO, medians of the rounds). Progress goes to stderr. The peer
# is copied to target/peers/socketio (its npm install lives there, never in shared/).
# Release binaries must be built (the Makefile target does it first).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ROUNDS="${ROUNDS:-2}"
PEER_SRC="${PEER_DIR:-$ROOT/../shared/peers/socketio}"
PEER="$ROOT/target/peers/socketio"
OUT="$ROOT/target/bench-compare"
BENCH="$ROOT/target/release/switchboard-bench"
log() { echo "[bench-compare] $*" >&2; }

[ -x "$BENCH" ] || { log "$BENCH is not built: cargo build --release --workspace --bins"; exit 1; }
[ -d "$PEER_SRC" ] || { log "no peer harness at $PEER_SRC (set PEER_DIR)"; exit 1; }
command -v node >/dev/null || { log "the peer needs Node 20 and npm"; exit 1; }

# A writable copy of the peer, without its results or dependencies.
mkdir -p "$PEER" "$OUT"
(cd "$PEER_SRC" && tar --exclude=node_modules --exclude=results --exclude=logs -cf - .) | (cd "$PEER" && tar -xf -)
: >"$OUT/lines.jsonl"

busy_pct() {
  local _ u n s i w q sq b1 t1 b2 t2
  read -r _ u n s i w q sq _ </proc/stat; b1=$((u + n + s + q + sq)); t1=$((b1 + i + w))
  sleep 2
  read -r _ u n s i w q sq _ </proc/stat; b2=$((u + n + s + q + sq)); t2=$((b2 + i + w))
  echo $((100 * (b2 - b1) / (t2 - t1 > 0 ? t2 - t1 : 1)))
}
wait_quiet() {
  local deadline=$((SECONDS + ${QUIET_WAIT_S:-300})) p
  while :; do
    p="$(busy_pct)"
    if [ "$p" -le "${QUIET_MAX_PCT:-15}" ]; then return 0; fi
    if [ "$SECONDS" -ge "$deadline" ]; then log "machine still ${p}% busy; running anyway"; return 0; fi
    log "machine ${p}% busy, waiting for it to quieten"
    sleep 8
  done
}

# run LABEL ROUND SYSTEM COMMAND...: one run; its JSON line tagged with label and round.
run() {
  local label=$1 round=$2 system=$3; shift 3
  wait_quiet
  log "$label round $round: $system"
  local line
  # Every run is bounded in time (RUN_TIMEOUT_S, default 600 s).
  if line="$(timeout --kill-after=10 "${RUN_TIMEOUT_S:-600}" "$@" 2>"$OUT/$label.$round.$system.err" | tail -n 1)" && [ -n "$line" ]; then
    echo "$line"
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["_label"]=sys.argv[2]; d["_round"]=int(sys.argv[3]); print(json.dumps(d))' \
      "$line" "$label" "$round" >>"$OUT/lines.jsonl"
  else
    log "$label round $round: $system failed (see $OUT/$label.$round.$system.err)"
    printf '{"_label":"%s","_round":%s,"system":"%s","failed":true}\n' "$label" "$round" "$system" >>"$OUT/lines.jsonl"
  fi
}

# The kernel's own cost of one small write per connection, on as many connections per
# instance as the fixed workloads have (100 and 500): no server can go below it here.
run floor-C100 1 loopback-floor python3 "$ROOT/tests/loopback-floor.py" --connections 100 --rounds 2000
run floor-C500 1 loopback-floor python3 "$ROOT/tests/loopback-floor.py" --connections 500 --rounds 400

for round in $(seq 1 "$ROUNDS"); do
  run fixed-S200-R200 "$round" socketio "$PEER/run.sh" --mode fixed
  run fixed-S200-R200 "$round" switchboard "$BENCH" fanout --mode fixed --subscribers 200 --rate 200
  run max-S200 "$round" socketio "$PEER/run.sh" --mode max --duration 10
  run max-S200 "$round" switchboard "$BENCH" fanout --mode max --subscribers 200
  run fixed-S1000-R100 "$round" socketio "$PEER/run.sh" --mode fixed --subscribers 1000 --rate 100
  run fixed-S1000-R100 "$round" switchboard "$BENCH" fanout --mode fixed --subscribers 1000 --rate 100
  run connections-N10000 "$round" socketio "$PEER/connections.sh" --streams 10000
  run connections-N10000 "$round" switchboard "$BENCH" connections --streams 10000
done

# The table: per workload, medians over the rounds, and Switchboard / Socket.IO.
python3 - "$OUT/lines.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def median(label, system, get):
    vals = []
    for r in rows:
        if r.get("_label") == label and r.get("system") == system and not r.get("failed"):
            try:
                v = get(r)
            except (KeyError, TypeError):
                continue
            if v is not None:
                vals.append(v)
    return statistics.median(vals) if vals else None
metrics = {
    "p99 µs": lambda r: r["latency_us"]["p99"],
    "server CPU s": lambda r: r["server_cpu_s"],
    # Server CPU per delivery, and the benchmark client's own CPU (Switchboard's bench
    # reports it; on 2 cores it competes with the servers).
    "server CPU µs/delivery": lambda r: 1e6 * r["server_cpu_s"] / r["delivered"] if r.get("delivered") else None,
    "client CPU s": lambda r: r.get("client_cpu_s"),
    "deliveries/s": lambda r: r["deliveries_per_s"],
    "lost": lambda r: r["lost"],
    "bytes/stream": lambda r: r["bytes_per_stream"],
    "connect s": lambda r: r.get("connect_s"),
}
labels = []
for r in rows:
    if r.get("_label") not in labels and r.get("system") != "loopback-floor":
        labels.append(r["_label"])
print()
print("| workload | measure | Socket.IO | Switchboard | Switchboard / Socket.IO |")
print("|---|---|---|---|---|")
for label in labels:
    for name, get in metrics.items():
        s, b = median(label, "socketio", get), median(label, "switchboard", get)
        if s is None and b is None:
            continue
        ratio = f"{b / s:.2f}" if s not in (None, 0) and b is not None else "–"
        def ran(system):
            return any(r.get("_label") == label and r.get("system") == system and not r.get("failed") for r in rows)
        def fmt(v, system):
            if v is None:
                return "–" if ran(system) else "failed"
            return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
        print(f"| {label} | {name} | {fmt(s, 'socketio')} | {fmt(b, 'switchboard')} | {ratio} |")
# What the kernel alone costs per delivery, next to what the peer spends in all.
floors = [r for r in rows if r.get("system") == "loopback-floor" and not r.get("failed")]
if floors:
    print()
    for f in floors:
        print(f"Loopback floor, {f['connections']} connections: the sender's kernel spends "
              f"{f['sender_sys_us_per_write']} µs per {f['write_bytes']}-byte write "
              f"(the reader's {f['reader_sys_us_per_write']} µs).")
    per = lambda r: 1e6 * r["server_cpu_s"] / r["delivered"] if r.get("delivered") else None
    for label in ("fixed-S200-R200", "fixed-S1000-R100"):
        s = median(label, "socketio", per)
        if s is not None:
            print(f"{label}: Socket.IO spends {s:.2f} µs of server CPU per delivery "
                  f"(a third is {s / 3:.2f}, a half {s / 2:.2f}).")
EOF
