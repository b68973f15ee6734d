#!/usr/bin/env bash
# Session Storage with real parts: the store contract and every account flow on PostgreSQL
# (a private cluster started here), and Telegram calls through the simulated cloud where one
# side's app is ntgcalls 3.0.5 (the independent implementation) and the other siptg's own media
# peer — tgsim plays Telegram's servers. Calls run in a network namespace this suite creates.
. "$(dirname "$0")/../lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
venv=${NTG_VENV:-/tmp/siptg-ntgcalls-venv}
[ "$(id -u)" = 0 ] || die "needs root (ip netns; PostgreSQL runs as the postgres user)"
apt_need ip iproute2
apt_need psql postgresql
if ! "$venv/bin/python3" -c 'import ntgcalls' 2>/dev/null; then
  log "installing ntgcalls 3.0.5 into $venv"
  python3 -m venv "$venv" && "$venv/bin/pip" install -q ntgcalls==3.0.5 || die "cannot install ntgcalls"
fi
build_siptg
failed=()

# --- PostgreSQL: a throw-away cluster owned by the postgres user, on loopback only ---
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
[ -x "$pgbin/initdb" ] || die "no initdb under /usr/lib/postgresql"
chmod 755 "$WORK"
pgdata="$WORK/pgdata"
mkdir -p "$pgdata" && chown postgres "$pgdata"
pgport=$(free_port tcp)
runuser -u postgres -- "$pgbin/initdb" -D "$pgdata" -A trust -U siptg >"$WORK/initdb.log" 2>&1 \
  || { cat "$WORK/initdb.log"; die "initdb failed"; }
runuser -u postgres -- "$pgbin/pg_ctl" -D "$pgdata" -l "$pgdata/postgres.log" -w \
  -o "-p $pgport -k $pgdata -c listen_addresses=127.0.0.1" start >/dev/null \
  || { cat "$pgdata/postgres.log"; die "postgres did not start"; }
stop_pg() { runuser -u postgres -- "$pgbin/pg_ctl" -D "$pgdata" -m fast stop >/dev/null 2>&1 || true; }
url="postgres://siptg@127.0.0.1:$pgport/postgres"
log "PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}') on 127.0.0.1:$pgport"

log "case: store contract and account flows on PostgreSQL"
if (cd "$ROOT" && export SIPTG_TEST_POSTGRES_URL="$url" SIPTG_TEST_PGDATA="$pgdata" &&
    # --workspace, as ./run test: the same feature set, so nothing is rebuilt.
    cargo test -q --workspace --lib store:: &&
    cargo test -q --workspace --test storage_sim -- --test-threads 4) \
    >"$WORK/pgtests.log" 2>&1; then
  grep -E "^test result" "$WORK/pgtests.log" | sed 's/^/    /'
  # The suite really ran on PostgreSQL: one fresh database per test.
  n=$(psql -h 127.0.0.1 -p "$pgport" -U siptg -d postgres -Atc \
      "select count(*) from pg_database where datname like 'siptg_t%'")
  log "  PASS ($n PostgreSQL databases created by the tests)"
  [ "$n" -ge 10 ] || failed+=("the account tests did not use PostgreSQL")
else
  tail -n 40 "$WORK/pgtests.log"
  failed+=("account flows on PostgreSQL")
fi
stop_pg

# --- A restarted siptg process keeps every account logged in (sealed session in redb) ---
log "case: accounts survive a restart of the storage process"
simport=$(free_port tcp); uadmin=$(free_port tcp); usip=$(free_port udp)
cat >"$WORK/up.toml" <<CFG
[node]
state_dir = "$WORK/up"
[admin]
listen = "127.0.0.1:$uadmin"
[dataplane]
cores = [0]
socket = "$WORK/up/dp.sock"
rtp_port_min = 48000
rtp_port_max = 48099
[sip]
listen = ["udp:127.0.0.1:$usip"]
[telegram]
backend = "sim"
sim_address = "127.0.0.1:$simport"
sim_embedded = false
[database]
path = "$WORK/up/siptg.redb"
[storage]
key_file = "$WORK/up/storage.key"
CFG
start tgsim_lo "$SIPTG" tgsim --listen "127.0.0.1:$simport"
wait_until 10 bash -c "ss -ltn | grep -q '127.0.0.1:$simport'" || die "tgsim did not start"
mkdir -p "$WORK/up"
"$SIPTG" --config "$WORK/up.toml" storage login gateway --phone +999000000001 --code 12345 >"$WORK/login.log" 2>&1 \
  || { cat "$WORK/login.log"; die "login failed"; }
# `siptg account …` is the same command under the name SIP.TG uses.
SIPTG_2FA_PASSWORD=demo-password "$SIPTG" --config "$WORK/up.toml" account login twofa \
  --phone +999000000005 --code 12345 >>"$WORK/login.log" 2>&1 || { cat "$WORK/login.log"; die "2FA login failed"; }
grep -h "logged in as" "$WORK/login.log" | sed 's/^/    /'
"$SIPTG" --config "$WORK/up.toml" account list >"$WORK/list.txt" 2>&1 || { cat "$WORK/list.txt"; die "account list failed"; }
for a in gateway twofa; do
  grep -q "$a" "$WORK/list.txt" || { cat "$WORK/list.txt"; failed+=("account list: no $a"); }
done
both_active() {
  "$SIPTG" status --admin "127.0.0.1:$uadmin" >"$WORK/status.txt" 2>&1 || return 1
  [ "$(grep -cE 'account (gateway|twofa) +active +user' "$WORK/status.txt")" = 2 ] &&
    ! grep -q "not connected" "$WORK/status.txt"
}
restarted_ok=1
for round in 1 2; do
  start "up$round" "$SIPTG" up --config "$WORK/up.toml"
  if wait_until 30 both_active; then
    grep -E "^storage|account " "$WORK/status.txt" | sed "s/^/    [run $round] /"
  else
    cat "$WORK/status.txt"; tail -n 20 "$WORK/up$round.log"; restarted_ok=0
  fi
  pkill -TERM -f -- "[s]iptg up --config $WORK/up.toml" || true
  # (The bracket keeps pgrep from matching its own command line.)
  wait_until 20 bash -c "! pgrep -f -- '[s]iptg up --config $WORK/up.toml'" || { log "  siptg up did not stop"; restarted_ok=0; }
done
if [ "$restarted_ok" = 1 ]; then log "  PASS: accounts active after start and after a restart"
else failed+=("accounts after a restart"); fi

# --- Calls through tgsim, in a network namespace (WebRTC ignores loopback-only hosts) ---
ns=siptgst$$
ip netns add "$ns" || die "ip netns add"
trap 'ip netns del "$ns" 2>/dev/null; stop_pg; cleanup' EXIT
in_ns() { ip netns exec "$ns" "$@"; }
in_ns ip link set lo up
in_ns ip link add st0 type veth peer name st1
in_ns ip addr add 10.79.0.1/24 dev st0
in_ns ip link set st0 up
in_ns ip link set st1 up
addr=10.79.0.1
cat >"$WORK/world.toml" <<'TOML'
offline_ring_timeout = 2
[[users]]
id = 501
phone = "555000001"
username = "gateway_app"
first_name = "Gateway"
[[users]]
id = 502
phone = "555000002"
username = "ntg_user"
first_name = "ntgcalls user"
[[users]]
id = 503
phone = "555000003"
username = "private_user"
first_name = "Private"
calls = "nobody"
[[users]]
id = 504
phone = "555000004"
username = "asleep_user"
first_name = "Asleep"
offline = true
TOML
start tgsim ip netns exec "$ns" "$SIPTG" tgsim --listen "$addr:50003" --world "$WORK/world.toml"
wait_until 10 in_ns bash -c "ss -ltn | grep -q '$addr:50003'" || die "tgsim did not start"

case_() {
  local name=$1; shift
  log "case: $name"
  if in_ns timeout 90 "$venv/bin/python3" "$here/app_call.py" "$SIPTG" "$addr:50003" "$addr" "$@" \
      >"$WORK/case.log" 2>&1; then
    sed 's/^/    /' "$WORK/case.log" | grep -E '^\s+\[tgcalls\]'
    log "  PASS: $name"
  else
    sed 's/^/    /' "$WORK/case.log" | tail -n 40
    log "  FAIL: $name"
    failed+=("$name")
  fi
  # This suite's own binary only (other siptg builds may be running tests on the machine),
  # with a moment for a peer that is still closing.
  if ! wait_until 5 bash -c "! pgrep -f '^$SIPTG (tgcall-peer|tgsim-app)' >/dev/null"; then
    log "  FAIL: a peer or app outlived its call"; failed+=("$name: leftover process")
    pkill -f "siptg (tgcall-peer|tgsim-app)" || true
  fi
}

case_ "siptg calls an ntgcalls user through tgsim" \
  siptg +555000001 ntgcalls +555000002 @ntg_user
case_ "an ntgcalls user calls siptg through tgsim (by phone), siptg hangs up" \
  ntgcalls +555000002 siptg +555000001 +555000001 --hangup callee
case_ "privacy: calls from nobody give USER_PRIVACY_RESTRICTED" \
  siptg +555000001 ntgcalls +555000003 @private_user --expect-error USER_PRIVACY_RESTRICTED
case_ "an offline user rings out as missed" \
  siptg +555000001 ntgcalls +555000004 @asleep_user --expect-missed
grep -q "simulated Telegram cloud listening" "$WORK/tgsim.log" || failed+=("tgsim log")

[ ${#failed[@]} = 0 ] || die "failed: ${failed[*]}"
log "storage: all cases pass"
