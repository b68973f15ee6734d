#!/usr/bin/env bash
# Foundation suite: real processes and a real SIP peer (SIPp).
#  1. a Worker started without its Manager answers SIPp's OPTIONS and REGISTER with
#     "503 No response from Manager";
#  2. a Manager linked over mutual TLS (certificates from `siptg certs`) makes the same Worker
#     answer OPTIONS 200 and REGISTER "404 Route not found";
#  3. `siptg up` starts every role and `siptg status` shows a running shard on every core.
. "$(dirname "$0")/../lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
apt_need sipp sip-tester
build_siptg

# sipp_expect METHOD CODE REASON SIP_PORT: one request, exact status line required.
sipp_expect() {
  local method=$1 code=$2 reason=$3 port=$4 sf="$WORK/$1-$2.xml"
  sed -e "s/METHOD/$method/g" -e "s/CODE/$code/g" -e "s/REASON/$reason/g" "$here/options_expect.xml.in" >"$sf"
  if timeout 30 sipp -sf "$sf" -m 1 -i 127.0.0.1 -p "$(free_port udp)" "127.0.0.1:$port" \
      -nostdin -timeout 10s -timeout_error -trace_err -error_file "$WORK/sipp-$method-$code.err" \
      >"$WORK/sipp-$method-$code.log" 2>&1; then
    log "SIPp $method -> $code $reason: ok"
  else
    cat "$WORK/sipp-$method-$code.err" 2>/dev/null | tail -20
    die "SIPp $method did not get '$code $reason'"
  fi
}

certs="$WORK/certs"
"$SIPTG" certs init --dir "$certs" >/dev/null
"$SIPTG" certs issue worker-1 --dir "$certs" >/dev/null
"$SIPTG" certs issue manager-1 --dir "$certs" >/dev/null

sip=$(free_port udp); link=$(free_port tcp); wadmin=$(free_port tcp); madmin=$(free_port tcp)
cat >"$WORK/worker.toml" <<CFG
[node]
state_dir = "$WORK/worker"
[admin]
listen = "127.0.0.1:$wadmin"
[worker]
name = "worker-1"
link_listen = "127.0.0.1:$link"
manager_timeout = "1s"
[tls]
ca = "$certs/ca.pem"
cert = "$certs/worker-1.pem"
key = "$certs/worker-1.key"
[dataplane]
cores = "all"
socket = "$WORK/worker/dp.sock"
rtp_port_min = 46000
rtp_port_max = 46999
[sip]
listen = ["udp:127.0.0.1:$sip"]
CFG
"$SIPTG" check-config "$WORK/worker.toml" >/dev/null || die "worker config invalid"
start worker "$SIPTG" worker --config "$WORK/worker.toml"
wait_until 20 "$SIPTG" status --admin "127.0.0.1:$wadmin" || { cat "$WORK/worker.log"; die "worker did not start"; }

sipp_expect OPTIONS 503 "No response from Manager" "$sip"
sipp_expect REGISTER 503 "No response from Manager" "$sip"

cat >"$WORK/manager.toml" <<CFG
[node]
state_dir = "$WORK/manager"
[admin]
listen = "127.0.0.1:$madmin"
[manager]
name = "manager-1"
heartbeat_interval = "500ms"
link_timeout = "2s"
workers = [{ name = "worker-1", address = "127.0.0.1:$link" }]
[tls]
ca = "$certs/ca.pem"
cert = "$certs/manager-1.pem"
key = "$certs/manager-1.key"
CFG
start manager "$SIPTG" manager --config "$WORK/manager.toml"
link_up() { "$SIPTG" status --admin "127.0.0.1:$madmin" | grep -q "worker-1 (worker) at 127.0.0.1:$link: up"; }
wait_until 20 link_up || { "$SIPTG" status --admin "127.0.0.1:$madmin"; cat "$WORK/manager.log"; die "mTLS link did not come up"; }
log "manager linked to worker over mutual TLS"

sipp_expect OPTIONS 200 "OK" "$sip"
sipp_expect REGISTER 404 "Route not found" "$sip"

# 3. everything on one host
uadmin=$(free_port tcp); usip=$(free_port udp)
cat >"$WORK/up.toml" <<CFG
[node]
state_dir = "$WORK/up"
[admin]
listen = "127.0.0.1:$uadmin"
[dataplane]
cores = "all"
socket = "$WORK/up/dp.sock"
rtp_port_min = 47000
rtp_port_max = 47999
[sip]
listen = ["udp:127.0.0.1:$usip"]
CFG
start up "$SIPTG" up --config "$WORK/up.toml"
ncores=$(nproc)
all_running() { [ "$("$SIPTG" status --admin "127.0.0.1:$uadmin" | grep -c ': running, sessions')" -eq "$ncores" ]; }
wait_until 20 all_running || { "$SIPTG" status --admin "127.0.0.1:$uadmin"; cat "$WORK/up.log"; die "not every core runs a shard"; }
"$SIPTG" status --admin "127.0.0.1:$uadmin"
sipp_expect OPTIONS 200 "OK" "$usip"
log "foundation suite passed"
