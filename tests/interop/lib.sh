# Shared helpers for interop suites (sourced).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d /tmp/siptg-interop.XXXXXX)
PGIDS=()

log() { echo "[interop] $*"; }
die() { echo "[interop] FAIL: $*" >&2; exit 1; }

cleanup() {
  # TERM first: siptg stops the dataplane it started (which runs in its own process group).
  for g in "${PGIDS[@]:-}"; do [ -n "$g" ] && kill -TERM -- "-$g" 2>/dev/null || true; done
  sleep 1
  for g in "${PGIDS[@]:-}"; do [ -n "$g" ] && kill -KILL -- "-$g" 2>/dev/null || true; done
  # A dataplane runs in its own process group; one whose siptg was killed outright is stopped
  # here (its command line names this suite's config).
  pkill -KILL -f -- "dataplane --config $WORK/" 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# apt_need BINARY PACKAGE: installs PACKAGE (non-interactive, idempotent) when BINARY is missing.
apt_need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  log "installing $2"
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq >/dev/null; export APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
  command -v "$1" >/dev/null 2>&1 || die "$2 installed but $1 not found"
}

# Builds siptg once and sets SIPTG to the binary.
build_siptg() {
  (cd "$ROOT" && cargo build -q --bin siptg) || die "siptg does not build"
  SIPTG="$CARGO_TARGET_DIR/debug/siptg"
}

# free_port udp|tcp: a free loopback port.
free_port() {
  python3 -c "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=='udp' else socket.SOCK_STREAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])" "$1"
}

# ua_port: a port for a SIP user agent (baresip), outside Linux's ephemeral range so no
# short-lived client socket takes it, with port+1 free too (baresip also listens there for TLS).
ua_port() {
  python3 - <<'PY'
import random, socket
for _ in range(200):
    p = random.randrange(61000, 64990, 2)
    try:
        socks = []
        for port in (p, p + 1):
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                s = socket.socket(socket.AF_INET, kind); s.bind(("0.0.0.0", port)); socks.append(s)
        print(p)
        break
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
PY
}

# start NAME CMD...: runs CMD in its own process group, output in $WORK/NAME.log.
start() {
  local name=$1; shift
  setsid "$@" >"$WORK/$name.log" 2>&1 < /dev/null &
  PGIDS+=("$!")
  disown "$!"
}

# wait_until SECONDS CMD...: retries CMD until it succeeds.
wait_until() {
  local t=$1; shift
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.2
  done
}
