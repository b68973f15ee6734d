#!/usr/bin/env bash
# B2BUA calls between two real SIP phones (baresip), both registered to siptg as PBX connections
# `alice` and `bob`; the dataplane relays the media. Checked:
#  1. alice calls bob (auto-answer); each records what it hears: alice must hear bob's 1000 Hz,
#     bob alice's 440 Hz (Goertzel); the caller hangs up, and both see the call end;
#  2. bob calls alice and the callee hangs up this time (BYE relayed the other way);
#  3. hold and resume by re-INVITE from the caller: answered, mirrored to the callee, and
#     after the resume both tones flow again (Goertzel on the last seconds);
#  4. CANCEL before answer: the caller gets 487 Request Terminated and the callee's ringing
#     call is cancelled;
#  5. an IP trunk (no registration, matched by its address 127.0.0.5) calls bob and is bridged;
#     a phone at an address no connection names (127.0.0.6) gets 404 Route not found;
#  6. a phone registered over TCP calls one registered over UDP, and the reverse (tones checked);
#  7. raw SIP (rel_probe.py): reliable provisionals (RFC 3262) both ways, session timers
#     (RFC 4028) negotiated and refreshed by UPDATE, 422 below Min-SE;
#  8. no media session outlives the calls.
# Usage: calls.sh SIPTG_BINARY (sourced helpers from ../lib.sh; run from tests/interop/sip/run.sh)
. "$(dirname "$0")/../lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
. "$here/phones.sh"
apt_need baresip baresip-core
SIPTG=${1:-}
[ -x "$SIPTG" ] || build_siptg

sip=$(free_port udp); admin=$(free_port tcp); siptcp=$(free_port tcp)
sip6=$(python3 -c "import socket; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(('::1',0)); print(s.getsockname()[1])")
cat >"$WORK/calls.toml" <<CFG
[node]
state_dir = "$WORK/calls-state"
[admin]
listen = "127.0.0.1:$admin"
[dataplane]
cores = [0]
socket = "$WORK/calls-state/dp.sock"
rtp_port_min = 47200
rtp_port_max = 47299
[sip]
listen = ["udp:127.0.0.1:$sip", "tcp:127.0.0.1:$siptcp", "udp:[::1]:$sip6"]

[[connection]]
name = "alice"
type = "pbx_registers"
login = "alice"
password = "alice-pass-1"
trusted_ips = ["127.0.0.1/32"]

[[connection]]
name = "bob"
type = "pbx_registers"
login = "bob"
password = "bob-pass-1"
trusted_ips = ["127.0.0.1/32"]

[[connection]]
name = "trunk"
type = "ip"
server = "127.0.0.5:5060"
CFG
start calls-siptg "$SIPTG" up --config "$WORK/calls.toml"
wait_until 20 "$SIPTG" status --admin "127.0.0.1:$admin" || { cat "$WORK/calls-siptg.log"; die "siptg did not start"; }
sleep 1


# phone NAME FREQ: a baresip dir that sends FREQ, records what it hears, auto-answers.
phone() {
  local name=$1 freq=$2 dir="$WORK/phone-$1" ip=${5:-127.0.0.1}
  mkdir -p "$dir/rec"
  tone "$dir/tone.wav" "$freq"
  cat >"$dir/config" <<BCFG
poll_method		epoll
sip_listen		$ip:$(ua_port)
net_interface		$ip
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
  echo "<sip:$name@127.0.0.1:$sip>;auth_pass=$name-pass-1;answermode=auto;regint=600" >"$dir/accounts"
}


ctl_alice=$(free_port tcp); ctl_bob=$(free_port tcp)
phone alice 440 20300-20319 "$ctl_alice"
phone bob 1000 20320-20339 "$ctl_bob"


# call CALLER CALLEE HANGUP_BY: the callee runs longer or shorter so the chosen side hangs up.
call() {
  local caller=$1 callee=$2 by=$3 t_caller t_callee
  rm -f "$WORK"/phone-*/rec/*.wav
  if [ "$by" = caller ]; then t_caller=8; t_callee=12; else t_caller=12; t_callee=8; fi
  timeout 20 baresip -f "$WORK/phone-$callee" -t $t_callee </dev/null >"$WORK/phone-$callee/log" 2>&1 &
  local callee_pid=$!
  sleep 1.5
  timeout 20 baresip -f "$WORK/phone-$caller" -t $t_caller </dev/null >"$WORK/phone-$caller/log" 2>&1 &
  local caller_pid=$!
  # Dial once the caller has registered (an INVITE before REGISTER gets 405, by design).
  local port; [ "$caller" = alice ] && port=$ctl_alice || port=$ctl_bob
  wait_until 5 grep -q "200 OK" "$WORK/phone-$caller/log"
  ctrl "$port" dial "sip:$callee@127.0.0.1:${DIAL:-$sip}"
  wait $caller_pid || true
  wait $callee_pid || true
  grep -q "Call established\|call established\|ESTABLISHED" "$WORK/phone-$caller/log" "$WORK/phone-$callee/log" 2>/dev/null \
    || grep -qi "established" "$WORK/phone-$caller/log" \
    || { tail -n 30 "$WORK/phone-$caller/log" "$WORK/phone-$callee/log"; tail -n 30 "$WORK/calls-siptg.log"; die "$caller -> $callee: call not established"; }
  local wa wb
  wa=$(ls "$WORK/phone-$caller"/rec/*-dec.wav 2>/dev/null | head -n 1)
  wb=$(ls "$WORK/phone-$callee"/rec/*-dec.wav 2>/dev/null | head -n 1)
  [ -n "$wa" ] && [ -n "$wb" ] || die "$caller -> $callee: no recording"
  local fa fb
  [ "$caller" = alice ] && { fa=1000; fb=440; } || { fa=440; fb=1000; }
  goertzel "$wa" $fa $fb || die "$caller did not hear $callee's tone"
  goertzel "$wb" $fb $fa || die "$callee did not hear $caller's tone"
  grep -q "call ended" "$WORK/calls-siptg.log" || die "siptg did not end the call"
  log "call $caller -> $callee: tones heard both ways; hung up by the $by"
}

call alice bob caller
call bob alice callee

# 3. Hold and resume.
rm -f "$WORK"/phone-*/rec/*.wav
timeout 20 baresip -f "$WORK/phone-bob" -t 12 </dev/null >"$WORK/phone-bob/log" 2>&1 &
bob_pid=$!
sleep 1.5
timeout 20 baresip -f "$WORK/phone-alice" -t 10 </dev/null >"$WORK/phone-alice/log" 2>&1 &
alice_pid=$!
wait_until 5 grep -q "200 OK" "$WORK/phone-alice/log"
ctrl "$ctl_alice" dial "sip:bob@127.0.0.1:$sip"
sleep 3
ctrl "$ctl_alice" hold ""
sleep 1.5
ctrl "$ctl_alice" resume ""
wait $alice_pid || true
wait $bob_pid || true
grep 're-INVITE' "$WORK/calls-siptg.log" | grep -q sendonly || { tail -n 20 "$WORK/calls-siptg.log"; die "no hold re-INVITE seen"; }
grep 're-INVITE' "$WORK/calls-siptg.log" | grep -q sendrecv || die "no resume re-INVITE seen"
tail_of() { python3 - "$1" <<'PY'
import sys, wave
with wave.open(sys.argv[1], "rb") as w:
    n = w.getnframes(); rate = w.getframerate()
    w.setpos(max(0, n - int(rate * 2.5)))
    data = w.readframes(n)
    with wave.open(sys.argv[1] + ".tail.wav", "wb") as o:
        o.setnchannels(w.getnchannels()); o.setsampwidth(2); o.setframerate(rate); o.writeframes(data)
PY
}
wa=$(ls "$WORK/phone-alice"/rec/*-dec.wav | head -n 1); wb=$(ls "$WORK/phone-bob"/rec/*-dec.wav | head -n 1)
tail_of "$wa"; tail_of "$wb"
goertzel "$wa.tail.wav" 1000 440 || die "alice did not hear bob after resume"
goertzel "$wb.tail.wav" 440 1000 || die "bob did not hear alice after resume"
log "hold/resume: re-INVITEs answered and mirrored; tones flow both ways after the resume"

# 4. CANCEL before answer: bob rings (manual answer) and alice gives up.
sed -i 's/answermode=auto/answermode=manual/' "$WORK/phone-bob/accounts"
timeout 20 baresip -f "$WORK/phone-bob" -t 8 </dev/null >"$WORK/phone-bob/log" 2>&1 &
bob_pid=$!
sleep 1.5
timeout 20 baresip -f "$WORK/phone-alice" -t 8 </dev/null >"$WORK/phone-alice/log" 2>&1 &
alice_pid=$!
wait_until 5 grep -q "200 OK" "$WORK/phone-alice/log"
ctrl "$ctl_alice" dial "sip:bob@127.0.0.1:$sip"
sleep 2
ctrl "$ctl_alice" hangup ""
wait $alice_pid || true
wait $bob_pid || true
grep -q "caller cancelled" "$WORK/calls-siptg.log" || { tail -n 20 "$WORK/calls-siptg.log"; die "siptg did not see the CANCEL"; }
# baresip reports a CANCELled incoming call as "session closed" (ECONNRESET), never established.
{ grep -q "Incoming call" "$WORK/phone-bob/log" && grep -q "session closed" "$WORK/phone-bob/log" \
  && ! grep -q "Call established" "$WORK/phone-bob/log"; } \
  || { tail -n 20 "$WORK/phone-bob/log"; die "bob's ringing call was not cancelled"; }
log "CANCEL: the caller's CANCEL ended the call and bob's ringing call was cancelled"

# 5. IP trunk: a phone without registration at the trunk's address calls bob.
sed -i 's/answermode=manual/answermode=auto/' "$WORK/phone-bob/accounts"
ctl_trunk=$(free_port tcp); ctl_stranger=$(free_port tcp)
phone trunk 440 20340-20359 "$ctl_trunk" 127.0.0.5
phone stranger 440 20360-20379 "$ctl_stranger" 127.0.0.6
for p in trunk stranger; do
  echo "<sip:$p@127.0.0.1:$sip>;regint=0;answermode=auto" >"$WORK/phone-$p/accounts"
done
rm -f "$WORK"/phone-*/rec/*.wav
timeout 20 baresip -f "$WORK/phone-bob" -t 9 </dev/null >"$WORK/phone-bob/log" 2>&1 &
bob_pid=$!
sleep 1.5
timeout 20 baresip -f "$WORK/phone-trunk" -t 6 </dev/null >"$WORK/phone-trunk/log" 2>&1 &
trunk_pid=$!
sleep 1
ctrl "$ctl_trunk" dial "sip:bob@127.0.0.1:$sip"
wait $trunk_pid || true
wait $bob_pid || true
wt=$(ls "$WORK/phone-trunk"/rec/*-dec.wav 2>/dev/null | head -n 1); wb=$(ls "$WORK/phone-bob"/rec/*-dec.wav 2>/dev/null | head -n 1)
[ -n "$wt" ] && [ -n "$wb" ] || { tail -n 20 "$WORK/phone-trunk/log"; die "IP trunk call: no recording"; }
goertzel "$wt" 1000 440 || die "the trunk did not hear bob"
goertzel "$wb" 440 1000 || die "bob did not hear the trunk"
timeout 20 baresip -f "$WORK/phone-stranger" -t 4 </dev/null >"$WORK/phone-stranger/log" 2>&1 &
stranger_pid=$!
sleep 1
ctrl "$ctl_stranger" dial "sip:bob@127.0.0.1:$sip"
wait $stranger_pid || true
grep -q "404 Route not found" "$WORK/phone-stranger/log" || { tail -n 10 "$WORK/phone-stranger/log"; die "an unknown source was not refused with 404"; }
log "IP trunk: matched by address and bridged with tones both ways; an unknown source got 404 Route not found"

# IPv6: the [::1] listener answers OPTIONS (Via with a bracketed address, rport).
python3 - "$sip6" <<'PY' || die "no answer over IPv6"
import socket, sys, uuid
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(("::1", 0)); s.settimeout(3)
lp = s.getsockname()[1]
msg = (f"OPTIONS sip:gw@[::1]:{port} SIP/2.0\r\nVia: SIP/2.0/UDP [::1]:{lp};branch=z9hG4bK{uuid.uuid4().hex[:10]};rport\r\n"
       f"From: <sip:probe@[::1]>;tag=1\r\nTo: <sip:gw@[::1]>\r\nCall-ID: {uuid.uuid4().hex}\r\nCSeq: 1 OPTIONS\r\n"
       "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
s.sendto(msg.encode(), ("::1", port))
line = s.recvfrom(65535)[0].split(b"\r\n", 1)[0].decode()
print(f"[ipv6] OPTIONS over [::1]: {line}")
sys.exit(0 if line == "SIP/2.0 200 OK" else 1)
PY

# 6. alice over TCP, bob over UDP, both directions.
echo "<sip:alice@127.0.0.1:$siptcp;transport=tcp>;auth_pass=alice-pass-1;answermode=auto;regint=600" >"$WORK/phone-alice/accounts"
DIAL="$siptcp;transport=tcp" call alice bob caller
call bob alice callee
grep -q "TCP.*200 OK" "$WORK/phone-alice/log" || die "alice did not register over TCP"
log "TCP: a phone registered over TCP called and was called by one over UDP"
# 7. Raw SIP: reliable provisionals both ways, session-timer terms, a refreshing UPDATE, 422.
python3 "$here/rel_probe.py" 127.0.0.1 "$sip" || { tail -n 30 "$WORK/calls-siptg.log"; die "100rel/session-timer checks failed"; }
log "100rel: reliable 180s PRACKed both ways; session timer negotiated and refreshed by UPDATE; 422 below Min-SE"
sleep 1
left=$(curl -fsS "http://127.0.0.1:$admin/status" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(sum(sh.get("sessions",0) for sh in (s.get("worker",{}).get("dataplane",{}).get("process",{}) or {}).get("shards",[])))' 2>/dev/null || echo "?")
log "media sessions left after the calls: $left"
[ "$left" = 0 ] || [ "$left" = "?" ] || die "$left media sessions outlived their calls"
log "calls: all cases pass"
