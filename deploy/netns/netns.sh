#!/usr/bin/env bash
# Peers on real links: one network namespace per peer, joined by veth pairs to a bridge
# (in a hub namespace of its own), with `tc netem` delay and loss on every peer's link.
# Needs root (CAP_NET_ADMIN), iproute2 and a kernel with the netem qdisc (sch_netem).
#
#   deploy/netns/netns.sh up N [DELAY_MS [LOSS_PCT]]   create N peer namespaces (prefix $NETNS_PREFIX)
#   deploy/netns/netns.sh down                         delete them all (always safe to call)
#   deploy/netns/netns.sh addr I                       the address of peer I (10.77.0.<I+1>)
#   deploy/netns/netns.sh exec I CMD...                run CMD inside peer I's namespace
#   deploy/netns/netns.sh check                        exit 0 if namespaces and netem work here, else say why
#   deploy/netns/netns.sh run N SECONDS [DELAY_MS [LOSS_PCT]] [-- PEER FLAGS...]
#       up, a roster, N `gradleak peer` processes (peer-0 malicious, the rest honest) with
#       mutual TLS, SECONDS of gossip, SIGTERM, each peer's status, down; files in $NETNS_OUT.
#
# Each packet leaving a peer's namespace crosses one netem (its own link's egress), so
# DELAY_MS is one-way latency per hop and LOSS_PCT the share of packets dropped per hop.
#
# NETNS_LINKS=switch instead joins the namespaces by TAP devices to a userspace switch
# (deploy/netns/lossy_switch.py, in the hub namespace) that delays and drops frames the
# same way, per hop and seeded (NETNS_SEED): for kernels without sch_netem. Its frame
# counts go to ${NETNS_STATE}/${PREFIX}-switch.ready.stats when it stops (`down`).
set -euo pipefail

PREFIX="${NETNS_PREFIX:-glnet}"
SUBNET="${NETNS_SUBNET:-10.77.0}"
HUB="${PREFIX}-hub"
LINKS="${NETNS_LINKS:-veth}"
STATE="${NETNS_STATE:-${TMPDIR:-/tmp}}"
READY="$STATE/${PREFIX}-switch.ready"
PYTHON="${PYTHON:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# The project's virtual environment (make's .venv) unless PYTHON says otherwise.
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

say() { echo "netns: $*" >&2; }
ns() { echo "${PREFIX}-p$1"; }
addr() { echo "${SUBNET}.$(($1 + 1))"; }

up() {
  local n="$1" delay="${2:-0}" loss="${3:-0}"
  [[ "$n" =~ ^[0-9]+$ ]] && ((n >= 2 && n <= 200)) || { say "N must be 2..200, got $n"; exit 2; }
  [[ "$delay" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { say "DELAY_MS must be a number, got $delay"; exit 2; }
  [[ "$loss" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { say "LOSS_PCT must be a number, got $loss"; exit 2; }
  down
  ip netns add "$HUB"
  if [[ "$LINKS" == switch ]]; then up_switch "$n" "$delay" "$loss"; return; fi
  [[ "$LINKS" == veth ]] || { say "NETNS_LINKS must be veth or switch, got $LINKS"; exit 2; }
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" link set br0 up
  local i
  for ((i = 0; i < n; i++)); do
    local p; p="$(ns "$i")"
    ip netns add "$p"
    # Create the pair inside the hub, then move one end: no name ever touches the host's namespace.
    ip -n "$HUB" link add "v$i" type veth peer name eth0 netns "$p"
    ip -n "$HUB" link set "v$i" master br0 up
    ip -n "$p" addr add "$(addr "$i")/24" dev eth0
    ip -n "$p" link set eth0 up
    ip -n "$p" link set lo up
    if [[ "$delay" != 0 || "$loss" != 0 ]]; then
      ip netns exec "$p" tc qdisc add dev eth0 root netem delay "${delay}ms" loss "${loss}%"
    fi
  done
  say "$n peer namespaces ${PREFIX}-p0..$((n - 1)) on ${SUBNET}.0/24, delay ${delay} ms, loss ${loss}% per hop"
}

up_switch() {
  local n="$1" delay="$2" loss="$3" i names=()
  for ((i = 0; i < n; i++)); do ip netns add "$(ns "$i")"; names+=("$(ns "$i")"); done
  rm -f "$READY" "$READY.stats"
  ip netns exec "$HUB" "$PYTHON" "$ROOT/deploy/netns/lossy_switch.py" --delay-ms "$delay" --loss-pct "$loss" \
    --seed "${NETNS_SEED:-0}" --ready "$READY" "${names[@]}" >"$STATE/${PREFIX}-switch.log" 2>&1 &
  for ((i = 0; i < 100; i++)); do [[ -e "$READY" ]] && break; sleep 0.1; done
  [[ -e "$READY" ]] || { say "the switch did not start: $(cat "$STATE/${PREFIX}-switch.log")"; down; exit 1; }
  for ((i = 0; i < n; i++)); do
    local p; p="$(ns "$i")"
    ip -n "$p" addr add "$(addr "$i")/24" dev eth0
    ip -n "$p" link set eth0 up
    ip -n "$p" link set lo up
  done
  say "$n peer namespaces ${PREFIX}-p0..$((n - 1)) on ${SUBNET}.0/24 through a userspace switch, delay ${delay} ms, loss ${loss}% per hop"
}

down() {
  local p
  # The switch writes its frame counts on SIGTERM: give it a moment before the kill below.
  if ip netns list 2>/dev/null | grep -q "^${HUB}\b"; then
    ip netns pids "$HUB" 2>/dev/null | xargs -r kill -TERM 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do [[ -z "$(ip netns pids "$HUB" 2>/dev/null)" ]] && break; sleep 0.1; done
  fi
  for p in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}-(hub|p[0-9]+)$" || true); do
    # A process left inside would keep the namespace's links alive: end it first.
    ip netns pids "$p" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    ip netns del "$p" 2>/dev/null || true
  done
  if [[ -e "$READY.stats" ]]; then say "switch frames: $(cat "$READY.stats")"; fi
}

check() {
  if [[ "$(id -u)" != 0 ]]; then echo "not root: network namespaces need CAP_NET_ADMIN"; return 1; fi
  command -v ip >/dev/null || { echo "iproute2 (ip) is not installed"; return 1; }
  command -v tc >/dev/null || { echo "tc (iproute2) is not installed"; return 1; }
  local probe="${PREFIX}-probe$$" out
  if ! out="$(ip netns add "$probe" 2>&1)"; then echo "ip netns add is not permitted here: $out"; return 1; fi
  if ! out="$(ip -n "$probe" link add eth0 type veth peer name eth1 2>&1)"; then
    ip netns del "$probe"; echo "veth pairs are not permitted here: $out"; return 1
  fi
  if [[ "$LINKS" == switch ]]; then
    ip netns del "$probe"
    [[ -c /dev/net/tun ]] || { echo "no /dev/net/tun: the userspace switch needs TAP devices"; return 1; }
    return 0
  fi
  if ! out="$(ip netns exec "$probe" tc qdisc add dev eth0 root netem delay 1ms loss 1% 2>&1)"; then
    ip netns del "$probe"; echo "tc netem does not work here (the kernel has no sch_netem?): $out"; return 1
  fi
  ip netns del "$probe"
}

run() {
  local n="$1" seconds="$2"; shift 2
  local delay=0 loss=0
  if [[ $# -gt 0 && "$1" != -- ]]; then delay="$1"; shift; fi
  if [[ $# -gt 0 && "$1" != -- ]]; then loss="$1"; shift; fi
  [[ $# -gt 0 && "$1" == -- ]] && shift
  local out="${NETNS_OUT:-$(mktemp -d /tmp/gradleak-netns.XXXXXX)}"
  mkdir -p "$out"
  trap 'down' EXIT
  up "$n" "$delay" "$loss"
  local i ids=()
  for ((i = 0; i < n; i++)); do ids+=("peer-$i"); done
  # A roster and a private CA whose certificates name every peer's address.
  PYTHONPATH="$ROOT" "$PYTHON" - "$out" "$SUBNET" "${ids[@]}" <<'EOF'
import sys
from pathlib import Path
from p2p.roster import Roster, write_roster
from p2p.tls import make_test_pki, write_tls
out, subnet, ids = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
addrs = {p: f"{subnet}.{i + 1}:50051" for i, p in enumerate(ids)}
write_roster(out / "roster.json", Roster(addrs))
_ca, material = make_test_pki(hosts=tuple(a.split(":")[0] for a in addrs.values()), peers=ids)
for p in ids:
    write_tls(out / "tls" / p, material[p])
EOF
  local pids=()
  for ((i = 0; i < n; i++)); do
    local role=honest; ((i == 0)) && role=malicious
    ip netns exec "$(ns "$i")" env PYTHONPATH="$ROOT" OMP_NUM_THREADS=1 "$PYTHON" -m gradleak.cli peer \
      --peer-id "peer-$i" --listen "$(addr "$i"):50051" --roster "$out/roster.json" \
      --tls-dir "$out/tls/peer-$i" --role "$role" --out "$out" "$@" >"$out/peer-$i.log" 2>&1 &
    pids+=($!)
  done
  say "peers started (logs and status files in $out); gossiping for ${seconds} s"
  sleep "$seconds"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  local rc=0
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || rc=$?; done
  PYTHONPATH="$ROOT" "$PYTHON" - "$out" "${ids[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, ids = Path(sys.argv[1]), sys.argv[2:]
for p in ids:
    f = out / f"{p}.status.json"
    if not f.exists():
        print(f"{p}: no status (see {out / (p + '.log')})")
        continue
    s = json.loads(f.read_text())
    line = (f"{p} ({s['role']}): {s['steps']} steps, sent {s['sent']}, failed {s['failed']} {s['send_failures']}, "
            f"received {s['received']}, accuracy {s['accuracy']}")
    if "attacker" in s:
        a = s["attacker"]
        line += f"; attacker received {a['received']}, attacked {a['attacked']}, coverage {a['coverage']}"
    print(line)
EOF
  return "$rc"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  up) up "$@" ;;
  down) down ;;
  addr) addr "$1" ;;
  exec) i="$1"; shift; exec ip netns exec "$(ns "$i")" "$@" ;;
  check) check ;;
  run) run "$@" ;;
  *) sed -n '2,23p' "$0" >&2; exit 2 ;;
esac
