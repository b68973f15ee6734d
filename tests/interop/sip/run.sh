#!/usr/bin/env bash
# SIP suite: siptg's Worker + Manager (`siptg up`) against real SIP user agents.
#  Registration (PBX -> gateway connection), with baresip (Debian baresip-core) as the PBX:
#   1. the right password registers (200 OK);
#   2. a wrong password gets "403 Wrong password";
#   3. a source outside the connection's trusted IPs gets "403 Untrusted IP address";
#   4. an unknown login gets "404 Route not found".
#  Then, with raw SIP over UDP (sip_probe.py):
#   5. an INVITE from the PBX before it registered gets "405 REGISTER is required first";
#   6. five failed REGISTERs from one address get it banned: the sixth gets no answer at all.
#  Gateway -> PBX connections (`register_to_pbx`), with Kamailio (Debian) as the PBX registrar
#  (digest auth against passwords in an htable, real-peers.md section 3):
#   7. siptg registers through the 401 challenge; Kamailio holds the binding (`kamcmd ul.dump`)
#      and an OPTIONS sent to siptg's AOR at Kamailio reaches siptg by location lookup (200);
#   8. a connection with a wrong password shows as failed (403) in siptg's /status, and is not
#      retried in a loop;
#   9. on shutdown (SIGTERM) siptg un-registers: the binding is gone from Kamailio;
#  10. OPTIONS keep-alive: Kamailio is up, a trunk nobody answers for is down (status, metric, log);
#  11. a call routed from Kamailio to siptg (a baresip phone at Kamailio dials a number it routes
#      to siptg's registered contact) is answered by a baresip phone registered at siptg; tones
#      are checked both ways.
. "$(dirname "$0")/../lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
. "$here/phones.sh"
apt_need baresip baresip-core
apt_need kamailio kamailio
apt_need kamcmd kamailio
build_siptg

sip=$(free_port udp); admin=$(free_port tcp); kam=$(free_port udp); tcp=$(free_port tcp); tlsport=$(free_port tcp)
deadport=$(free_port udp)

# Kamailio: a registrar with digest auth (realm = To domain), passwords in memory; it relays
# out-of-domain requests to registered contacts. Started first so siptg's first REGISTER lands.
mkdir -p "$WORK/kamrun"
cat >"$WORK/kamailio.cfg" <<KCFG
#!KAMAILIO
debug=2
log_stderror=yes
fork=yes
children=2
auto_aliases=no
listen=udp:127.0.0.1:$kam
alias="127.0.0.1:$kam"
dns=no
rev_dns=no
use_dns_cache=no
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "kex.so"
loadmodule "corex.so"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "sanity.so"
loadmodule "htable.so"
loadmodule "auth.so"
loadmodule "ctl.so"
modparam("ctl", "binrpc", "unix:$WORK/kamrpc.sock")
modparam("usrloc", "db_mode", 0)
modparam("registrar", "max_expires", 3600)
modparam("auth", "nonce_expire", 300)
modparam("htable", "htable", "pw=>size=4;")
event_route[htable:mod-init] {
    \$sht(pw=>gateway) = "gw-pass-1";
    \$sht(pw=>gateway2) = "gw-pass-2";
    \$sht(pw=>carol) = "carol-pass-1";
}
request_route {
    if (!mf_process_maxfwd_header("10")) { sl_send_reply("483", "Too Many Hops"); exit; }
    if (!sanity_check("17895", "7")) { exit; }
    xlog("L_INFO", "REQ \$rm \$ru from \$fu (src \$si:\$sp)\n");
    if (has_totag()) {
        # In-dialog requests of calls it record-routed; nothing else.
        if (loose_route()) { t_relay(); exit; }
        sl_send_reply("404", "Not here"); exit;
    }
    t_check_trans();
    if (is_method("REGISTER")) {
        if (\$sht(pw=>\$tU) == \$null) { sl_send_reply("403", "Unknown user"); exit; }
        pv_auth_check("\$td", "\$sht(pw=>\$tU)", "0", "1");
        \$var(arc) = \$rc;
        xlog("L_INFO", "REGISTER auth for \$tU: rc=\$var(arc)\n");
        if (\$var(arc) == -2) { sl_send_reply("403", "Wrong password"); exit; }
        if (\$var(arc) < 0) { auth_challenge("\$td", "1"); exit; }
        consume_credentials();
        if (!save("location")) { sl_reply_error(); exit; }
        xlog("L_INFO", "REGISTERED \$tU contact \$ct expires \$hdr(Expires)\n");
        exit;
    }
    if (is_method("INVITE")) { record_route(); }
    if (!lookup("location")) {
        # A number no local phone has goes out the gateway trunk: to siptg's registered
        # contact, with the dialled user kept in the Request-URI.
        if (is_method("INVITE") && \$rU != \$null) {
            \$var(dialled) = \$rU;
            if (lookup("location", "sip:gateway@127.0.0.1:$kam")) {
                \$rU = \$var(dialled);
                xlog("L_INFO", "TRUNK \$var(dialled) to \$ru\n");
                t_relay();
                exit;
            }
        }
        sl_send_reply("404", "Not Found"); exit;
    }
    if (!t_relay()) { sl_reply_error(); }
    exit;
}
KCFG
kamailio -c -f "$WORK/kamailio.cfg" >"$WORK/kamailio-check.log" 2>&1 || { cat "$WORK/kamailio-check.log"; die "kamailio config invalid"; }
start kamailio kamailio -f "$WORK/kamailio.cfg" -DD -E -m 64 -M 8 -P "$WORK/kamailio.pid" -Y "$WORK/kamrun"
kamrpc() { kamcmd -s "unix:$WORK/kamrpc.sock" "$@"; }
wait_until 10 kamrpc core.version || { cat "$WORK/kamailio.log"; die "kamailio did not start"; }
# SIP over TLS: a certificate from `siptg certs` (a throwaway CA; the probe does not verify it).
"$SIPTG" certs init --dir "$WORK/sipcerts" >/dev/null || die "siptg certs init failed"
"$SIPTG" certs issue sip-edge --dir "$WORK/sipcerts" >/dev/null || die "siptg certs issue failed"
cat >"$WORK/siptg.toml" <<CFG
[node]
state_dir = "$WORK/state"
[admin]
listen = "127.0.0.1:$admin"
[dataplane]
cores = [0]
socket = "$WORK/state/dp.sock"
rtp_port_min = 47000
rtp_port_max = 47099
[sip]
listen = ["udp:127.0.0.1:$sip", "tcp:127.0.0.1:$tcp", "tls:127.0.0.1:$tlsport"]
tls_cert = "$WORK/sipcerts/sip-edge.pem"
tls_key = "$WORK/sipcerts/sip-edge.key"

[[connection]]
name = "office"
type = "pbx_registers"
login = "office"
password = "office-pass-1"
trusted_ips = ["127.0.0.1/32"]

[[connection]]
name = "kamailio"
type = "register_to_pbx"
server = "127.0.0.1:$kam"
login = "gateway"
password = "gw-pass-1"
expires = 600
keepalive = "2s"

[[connection]]
name = "dead-trunk"
type = "ip"
server = "127.0.0.9:$deadport"
keepalive = "2s"

[[connection]]
name = "kamailio-wrong"
type = "register_to_pbx"
server = "127.0.0.1:$kam"
login = "gateway2"
password = "not-the-password"
CFG
"$SIPTG" check-config "$WORK/siptg.toml" >/dev/null || die "config invalid"
start siptg "$SIPTG" up --config "$WORK/siptg.toml"
siptg_pgid=${PGIDS[-1]}
wait_until 20 "$SIPTG" status --admin "127.0.0.1:$admin" || { cat "$WORK/siptg.log"; die "siptg did not start"; }
# The Manager links to the Worker in-process; give it a moment.
sleep 1

# baresip_register NAME BIND_IP LOGIN PASSWORD EXPECT: runs baresip as a PBX registering for a
# few seconds; EXPECT is a regex its log must show (the registrar's status line).
baresip_register() {
  local name=$1 ip=$2 login=$3 pass=$4 expect=$5 dir="$WORK/baresip-$1"
  mkdir -p "$dir"
  cat >"$dir/config" <<BCFG
poll_method		epoll
sip_listen		$ip:$(ua_port)
net_interface		$ip
dns_server		127.0.0.1:53
module_path		/usr/lib/baresip/modules
module			g711.so
module_tmp		uuid.so
module_tmp		account.so
module_app		menu.so
BCFG
  echo "<sip:$login@127.0.0.1:$sip>;auth_pass=$pass;regint=600" >"$dir/accounts"
  timeout 15 baresip -f "$dir" -t 4 </dev/null >"$dir/log" 2>&1 || true
  if grep -Eq "$expect" "$dir/log"; then
    log "baresip $name: $(grep -Eo "$expect" "$dir/log" | head -n 1)"
  else
    sed 's/^/    /' "$dir/log" | tail -n 20
    die "baresip $name: expected /$expect/"
  fi
}

baresip_register right 127.0.0.1 office office-pass-1 "200 OK"
baresip_register wrong-password 127.0.0.1 office not-the-password "403 Wrong password"
baresip_register untrusted 127.0.0.2 office office-pass-1 "403 Untrusted IP address"
baresip_register unknown-login 127.0.0.1 nobody whatever "404 Route not found"
grep -q "PBX registered" "$WORK/siptg.log" || die "siptg did not log the registration"

python3 "$here/sip_probe.py" 127.0.0.1 "$sip" || die "raw SIP checks failed"
# Malformed messages get 400 or silence, odd but valid ones are answered, siptg stays up.
python3 "$here/malformed.py" 127.0.0.1 "$sip" || die "malformed-message checks failed"
python3 "$here/tcp_probe.py" 127.0.0.1 "$tcp" && { "$SIPTG" status --admin "127.0.0.1:$admin" --json >"$WORK/status.json" && grep -q "tcp:127.0.0.1:$tcp" "$WORK/status.json"; } || die "SIP over TCP checks failed"
python3 "$here/tls_probe.py" 127.0.0.1 "$tlsport" && { "$SIPTG" status --admin "127.0.0.1:$admin" --json >"$WORK/status.json" && grep -q "tls:127.0.0.1:$tlsport" "$WORK/status.json"; } || die "SIP over TLS checks failed"
# The ban is listed and lifted through the admin API; the address is answered again.
curl -fsS "http://127.0.0.1:$admin/bans" | grep -q '"127.0.0.3/32"' || die "ban of 127.0.0.3 not listed"
curl -fsS -X POST "http://127.0.0.1:$admin/bans/lift?ip=127.0.0.3" >/dev/null || die "ban not lifted"
python3 "$here/sip_probe.py" 127.0.0.1 "$sip" --after-lift || die "lifted address not answered"
log "bans: listed and lifted through the admin API"
# outbound NAME: the connection's entry in siptg's /status, as JSON.
outbound() {
  "$SIPTG" status --admin "127.0.0.1:$admin" --json | python3 -c '
import json, sys
def find(v):
    if isinstance(v, dict):
        if "outbound_registrations" in v: return v["outbound_registrations"]
        for x in v.values():
            r = find(x)
            if r is not None: return r
    elif isinstance(v, list):
        for x in v:
            r = find(x)
            if r is not None: return r
for o in find(json.load(sys.stdin)) or []:
    if o["name"] == sys.argv[1]: print(json.dumps(o, separators=(",", ":")))' "$1"
}
registered() { outbound kamailio | grep -q '"state":"registered"'; }
wait_until 20 registered || { outbound kamailio; tail -n 30 "$WORK/kamailio.log"; die "siptg did not register at kamailio"; }
log "kamailio: siptg's status: $(outbound kamailio)"
grep -q "REGISTER auth for gateway: rc=-5" "$WORK/kamailio.log" || die "kamailio did not challenge siptg"
grep -q "REGISTERED gateway contact <sip:gateway@127.0.0.1:$sip>" "$WORK/kamailio.log" \
  || { tail -n 30 "$WORK/kamailio.log"; die "kamailio did not save siptg's contact"; }
kamrpc ul.dump >"$WORK/uldump.txt"
grep -q "sip:gateway@127.0.0.1:$sip" "$WORK/uldump.txt" || { cat "$WORK/uldump.txt"; die "no binding for siptg in kamailio's location table"; }
log "kamailio: location table holds $(grep -o "sip:gateway@127.0.0.1:$sip" "$WORK/uldump.txt" | head -n 1)"

# OPTIONS keep-alive: Kamailio answers (its 404 counts: any answer means up); nobody listens at
# the dead trunk's address, so it is down. Both in `siptg status` and in /metrics.
peer() { "$SIPTG" status --admin "127.0.0.1:$admin" --json | python3 -c '
import json, sys
def find(v):
    if isinstance(v, dict):
        if "pbx_options" in v: return v["pbx_options"]
        for x in v.values():
            r = find(x)
            if r is not None: return r
for p in find(json.load(sys.stdin)) or []:
    if p["name"] == sys.argv[1]: print(p["state"])' "$1"; }
kam_up() { [ "$(peer kamailio)" = up ]; }
dead_down() { [ "$(peer dead-trunk)" = down ]; }
wait_until 10 kam_up || { "$SIPTG" status --admin "127.0.0.1:$admin"; die "kamailio not up by OPTIONS"; }
wait_until 10 dead_down || { "$SIPTG" status --admin "127.0.0.1:$admin"; die "the dead trunk is not down by OPTIONS"; }
"$SIPTG" status --admin "127.0.0.1:$admin" >"$WORK/status.txt"
grep -q "kamailio at 127.0.0.1:$kam: up" "$WORK/status.txt" || { cat "$WORK/status.txt"; die "siptg status does not show kamailio up"; }
curl -fsS "http://127.0.0.1:$admin/metrics" | grep -q 'siptg_sip_peer_up{connection="dead-trunk"} 0' || die "no siptg_sip_peer_up gauge for the dead trunk"
grep -q "PBX does not answer OPTIONS: down.*dead-trunk" "$WORK/siptg.log" || die "the down transition was not logged"
log "keepalive: kamailio up (answers OPTIONS), dead trunk down; shown in status and /metrics"

# An OPTIONS to siptg's AOR at Kamailio is relayed by location lookup and answered by siptg.
python3 - "$kam" <<'PY' || die "OPTIONS through kamailio did not reach siptg"
import socket, sys, uuid
kam = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); s.settimeout(5)
port = s.getsockname()[1]
msg = (f"OPTIONS sip:gateway@127.0.0.1:{kam} SIP/2.0\r\n"
       f"Via: SIP/2.0/UDP 127.0.0.1:{port};rport;branch=z9hG4bK{uuid.uuid4().hex}\r\n"
       "Max-Forwards: 70\r\n"
       f"From: <sip:probe@probe.invalid>;tag={uuid.uuid4().hex[:8]}\r\n"
       f"To: <sip:gateway@127.0.0.1:{kam}>\r\n"
       f"Call-ID: {uuid.uuid4().hex}@probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
s.sendto(msg.encode(), ("127.0.0.1", kam))
while True:
    data = s.recv(65535).decode(errors="replace")
    line = data.split("\r\n", 1)[0]
    if not line.startswith("SIP/2.0 1"): break
server = next((l for l in data.split("\r\n") if l.lower().startswith("server:")), "?")
print("[interop] kamailio: OPTIONS to siptg's AOR:", line, "|", server)
sys.exit(0 if line.startswith("SIP/2.0 200") and "siptg" in server.lower() else 1)
PY

# A call routed from Kamailio to siptg is answered: carol (baresip registered at Kamailio) dials
# `office`, a number Kamailio does not have; it sends the call to siptg's registered contact;
# siptg takes it as coming from the `kamailio` connection and bridges it to the `office` phone
# (baresip registered at siptg, auto-answer). Tones are checked both ways.
kphone() {  # kphone NAME FREQ RTP_PORTS CTL_PORT ACCOUNT
  local name=$1 dir="$WORK/kphone-$1"
  mkdir -p "$dir/rec"
  tone "$dir/tone.wav" "$2"
  cat >"$dir/config" <<BCFG
poll_method		epoll
sip_listen		127.0.0.1:$(ua_port)
net_interface		127.0.0.1
dns_server		127.0.0.1:53
rtp_ports		$3
audio_source		aufile,$dir/tone.wav
audio_player		aubridge,null_$name
audio_alert		aubridge,nullalert_$name
module_path		/usr/lib/baresip/modules
module			g711.so
module			aufile.so
module			aubridge.so
module			sndfile.so
snd_path		$dir/rec
module_tmp		uuid.so
module_tmp		account.so
module_app		menu.so
module_app		ctrl_tcp.so
ctrl_tcp_listen		127.0.0.1:$4
BCFG
  echo "$5" >"$dir/accounts"
}
ctl_office=$(free_port tcp); ctl_carol=$(free_port tcp)
kphone office 1000 20400-20419 "$ctl_office" "<sip:office@127.0.0.1:$sip>;auth_pass=office-pass-1;answermode=auto;regint=600"
kphone carol 440 20420-20439 "$ctl_carol" "<sip:carol@127.0.0.1:$kam>;auth_pass=carol-pass-1;regint=600"
timeout 20 baresip -f "$WORK/kphone-office" -t 12 </dev/null >"$WORK/kphone-office/log" 2>&1 &
office_pid=$!
timeout 20 baresip -f "$WORK/kphone-carol" -t 10 </dev/null >"$WORK/kphone-carol/log" 2>&1 &
carol_pid=$!
wait_until 5 grep -q "200 OK" "$WORK/kphone-office/log" || die "office phone did not register at siptg"
wait_until 5 grep -q "200 OK" "$WORK/kphone-carol/log" || { tail -n 20 "$WORK/kphone-carol/log"; die "carol did not register at kamailio"; }
ctrl "$ctl_carol" dial "sip:office@127.0.0.1:$kam"
wait $carol_pid || true
wait $office_pid || true
grep -q "TRUNK office to sip:office@127.0.0.1:$sip" "$WORK/kamailio.log" \
  || { tail -n 20 "$WORK/kamailio.log"; die "kamailio did not send the call to siptg's contact"; }
grep -qi "established" "$WORK/kphone-carol/log" && grep -qi "established" "$WORK/kphone-office/log" \
  || { tail -n 20 "$WORK/kphone-carol/log" "$WORK/kphone-office/log"; tail -n 30 "$WORK/siptg.log"; die "the call from kamailio was not answered"; }
wc=$(ls "$WORK/kphone-carol"/rec/*-dec.wav 2>/dev/null | head -n 1); wo=$(ls "$WORK/kphone-office"/rec/*-dec.wav 2>/dev/null | head -n 1)
[ -n "$wc" ] && [ -n "$wo" ] || die "call from kamailio: no recording"
goertzel "$wc" 1000 440 || die "carol (at kamailio) did not hear the office phone"
goertzel "$wo" 440 1000 || die "the office phone did not hear carol"
log "kamailio: a call routed from Kamailio to siptg was answered by the office phone; tones both ways"

# The wrong password: failed with Kamailio's 403, and not retried in a loop.
failed() { local o; o=$(outbound kamailio-wrong); [[ $o == *'"state":"failed"'* && $o == *'"code":403'* ]]; }
wait_until 10 failed || { outbound kamailio-wrong; die "wrong-password connection not reported failed"; }
log "kamailio: wrong password: $(outbound kamailio-wrong)"
before=$(grep -c "REGISTER auth for gateway2" "$WORK/kamailio.log" || true)
sleep 6
attempts=$(( $(grep -c "REGISTER auth for gateway2" "$WORK/kamailio.log" || true) - before ))
[ "$attempts" -le 4 ] || die "wrong-password REGISTERs loop ($attempts in 6 s)"
log "kamailio: wrong password: $attempts REGISTERs in the next 6 s (backoff, no loop)"

# Graceful shutdown un-registers.
kill -TERM -- "-$siptg_pgid"
gone() { ! kamrpc ul.dump | grep -q "sip:gateway@127.0.0.1:$sip"; }
wait_until 10 gone || die "siptg's binding still at kamailio after shutdown"
grep -q "outbound registration stopped" "$WORK/siptg.log" || die "siptg did not log the stop"
log "kamailio: binding removed on siptg shutdown"
# B2BUA calls between two real phones through siptg (own siptg instance).
"$here/calls.sh" "$SIPTG" || die "B2BUA calls failed"
log "sip: all cases pass"
