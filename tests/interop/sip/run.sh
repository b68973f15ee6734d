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
. "$(dirname "$0")/../lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
apt_need baresip baresip-core
build_siptg

sip=$(free_port udp); admin=$(free_port tcp)
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
listen = ["udp:127.0.0.1:$sip"]

[[connection]]
name = "office"
type = "pbx_registers"
login = "office"
password = "office-pass-1"
trusted_ips = ["127.0.0.1/32"]
CFG
"$SIPTG" check-config "$WORK/siptg.toml" >/dev/null || die "config invalid"
start siptg "$SIPTG" up --config "$WORK/siptg.toml"
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
sip_listen		$ip:$(free_port udp)
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
# The ban is listed and lifted through the admin API; the address is answered again.
curl -fsS "http://127.0.0.1:$admin/bans" | grep -q '"127.0.0.3/32"' || die "ban of 127.0.0.3 not listed"
curl -fsS -X POST "http://127.0.0.1:$admin/bans/lift?ip=127.0.0.3" >/dev/null || die "ban not lifted"
python3 "$here/sip_probe.py" 127.0.0.1 "$sip" --after-lift || die "lifted address not answered"
log "bans: listed and lifted through the admin API"
log "sip: all cases pass"
