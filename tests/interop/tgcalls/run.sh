#!/usr/bin/env bash
# Telegram-call conformance: siptg's own tgcalls v2 implementation against ntgcalls 3.0.5 (PyPI),
# the independent C++/libwebrtc implementation, and against itself on the versions ntgcalls lacks.
# Everything runs inside a network namespace this suite creates, with a veth pair (WebRTC gathers
# no candidates on loopback-only hosts); harness.py plays Telegram's servers.
. "$(dirname "$0")/../lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
venv=${NTG_VENV:-/tmp/siptg-ntgcalls-venv}
[ "$(id -u)" = 0 ] || die "needs root for ip netns"
apt_need ip iproute2
apt_need turnserver coturn
if ! "$venv/bin/python3" -c 'import ntgcalls' 2>/dev/null; then
  log "installing ntgcalls 3.0.5 into $venv"
  python3 -m venv "$venv" && "$venv/bin/pip" install -q ntgcalls==3.0.5 || die "cannot install ntgcalls"
fi
build_siptg

ns=siptgtg$$
ip netns add "$ns" || die "ip netns add"
trap 'ip netns del "$ns" 2>/dev/null; cleanup' EXIT
in_ns() { ip netns exec "$ns" "$@"; }
in_ns ip link set lo up
in_ns ip link add tg0 type veth peer name tg1
in_ns ip addr add 10.78.0.1/24 dev tg0
in_ns ip link set tg0 up
in_ns ip link set tg1 up
addr=10.78.0.1

# coturn inside the namespace, long-term credentials: the TURN server of relay-only calls
# (Telegram's phoneConnectionWebrtc entries with turn=true, p2p_allowed=false).
cat >"$WORK/turnserver.conf" <<CONF
listening-ip=$addr
listening-port=3478
relay-ip=$addr
min-port=49160
max-port=49299
realm=siptg.test
lt-cred-mech
user=tguser:tgpass
fingerprint
no-tls
no-dtls
no-cli
no-software-attribute
log-file=$WORK/turnserver.log
simple-log
verbose
CONF
start coturn ip netns exec "$ns" turnserver -c "$WORK/turnserver.conf"
wait_until 10 in_ns bash -c "ss -lun | grep -q '$addr:3478'" || die "coturn did not start"
relay="$addr:3478:tguser:tgpass"

failed=()
case_() {
  local name=$1; shift
  log "case: $name"
  if in_ns timeout 90 "$venv/bin/python3" "$here/harness.py" "$@" "$SIPTG" "$addr" >"$WORK/case.log" 2>&1; then
    sed 's/^/    /' "$WORK/case.log" | grep -E '^\s+\[tgcalls\]'
    log "  PASS: $name"
  else
    sed 's/^/    /' "$WORK/case.log" | tail -n 40
    log "  FAIL: $name"
    failed+=("$name")
  fi
  # Nothing may keep running after a call.
  if pgrep -f "siptg tgcall-peer" >/dev/null; then
    log "  FAIL: a tgcall-peer process outlived its call"; failed+=("$name: leftover process")
    pkill -f "siptg tgcall-peer" || true
  fi
}

case_ "siptg calls ntgcalls (8.0.0, P2P)" siptg ntgcalls 8.0.0
case_ "ntgcalls calls siptg (8.0.0, P2P)" ntgcalls siptg 8.0.0 --hangup callee
relayed() {  # successful TURN allocations and relayed data so far, by coturn's own log
  grep -c "ALLOCATE processed, success" "$WORK/turnserver.log" 2>/dev/null || true
}
before=$(relayed)
case_ "siptg calls ntgcalls (8.0.0, relay-only through coturn)" siptg ntgcalls 8.0.0 --relay "$relay"
case_ "ntgcalls calls siptg (8.0.0, relay-only through coturn)" ntgcalls siptg 8.0.0 --relay "$relay" --hangup callee
after=$(relayed)
log "coturn granted $((after - before)) allocations for the relay-only calls"
# Each relay-only call needs an allocation by each side: siptg's own TURN client and ntgcalls'.
[ $((after - before)) -ge 4 ] || failed+=("relay-only calls did not allocate through coturn")
grep -q "CHANNEL_BIND processed, success\|CREATE_PERMISSION processed, success" "$WORK/turnserver.log" \
  || failed+=("no permission or channel bound on coturn")
case_ "siptg calls siptg (7.0.0)" siptg siptg 7.0.0
case_ "siptg calls siptg (13.0.0)" siptg siptg 13.0.0 --hangup callee

[ ${#failed[@]} = 0 ] || die "failed: ${failed[*]}"
log "tgcalls: all cases pass"
