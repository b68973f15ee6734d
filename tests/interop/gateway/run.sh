#!/usr/bin/env bash
# The gateway end to end with real peers: a baresip phone as the PBX side, registered on a
# gateway's PBX line ⇄ siptg (up, with its embedded simulated Telegram cloud) ⇄ ntgcalls as a
# Telegram user's app (through `siptg tgsim-app`). Calls both ways with G.711 on the SIP side and
# Opus on Telegram, and SIP → Telegram with Opus (passthrough) and G.722 on the SIP side; tones
# checked by frequency on both ends; DTMF both ways; hang-up from each side; text messages both
# ways (the phone's SIP MESSAGE ⇄ the user's Telegram text). Runs in a
# network namespace this suite creates (WebRTC ignores loopback-only hosts).
. "$(dirname "$0")/../lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../sip/phones.sh"
venv=${NTG_VENV:-/tmp/siptg-ntgcalls-venv}
[ "$(id -u)" = 0 ] || die "needs root for ip netns"
apt_need ip iproute2
apt_need baresip baresip-core
if ! "$venv/bin/python3" -c 'import ntgcalls' 2>/dev/null; then
  log "installing ntgcalls 3.0.5 into $venv"
  python3 -m venv "$venv" && "$venv/bin/pip" install -q ntgcalls==3.0.5 || die "cannot install ntgcalls"
fi
build_siptg
failed=()

ns=siptggw$$
ip netns add "$ns" || die "ip netns add"
trap 'ip netns del "$ns" 2>/dev/null; cleanup' EXIT
in_ns() { ip netns exec "$ns" "$@"; }
in_ns ip link set lo up
in_ns ip link add gw0 type veth peer name gw1
in_ns ip addr add 10.80.0.1/24 dev gw0
in_ns ip link set gw0 up
in_ns ip link set gw1 up
addr=10.80.0.1
sip=$addr:5060
sim=$addr:50003
admin=127.0.0.1:9611

cat >"$WORK/world.toml" <<'TOML'
[[users]]
id = 701
phone = "555000001"
username = "gw_account"
first_name = "Gateway"
[[users]]
id = 702
phone = "555000002"
username = "ntg_user"
first_name = "Nina"
last_name = "Telegram"
[[users]]
id = 703
phone = "555000003"
username = "gw_keypad_bot"
first_name = "Keypad"
bot = true
bot_token = "703:keypad-token"
TOML
mkdir -p "$WORK/gw"
cat >"$WORK/gw.toml" <<CFG
[node]
state_dir = "$WORK/gw"
[admin]
listen = "$admin"
[dataplane]
cores = [0]
rtp_port_min = 41000
rtp_port_max = 41199
media_ip = "$addr"
socket = "$WORK/gw/dp.sock"
[sip]
listen = ["udp:$sip"]
[telegram]
backend = "sim"
sim_address = "$sim"
sim_world = "$WORK/world.toml"
sim_autologin = { gateway = "+555000001", keypad = "703:keypad-token" }
[storage]
key_file = "$WORK/gw/storage.key"
[database]
path = "$WORK/gw/db.redb"
CFG
start gateway ip netns exec "$ns" "$SIPTG" up --config "$WORK/gw.toml"
wait_until 30 in_ns "$SIPTG" status --admin "$admin" || { cat "$WORK/gateway.log"; die "siptg did not start"; }
# The PBX's line and the gateway are made on the running siptg, as an operator does (control
# API, kept in its database), not in the config file.
in_ns "$SIPTG" connection --admin "$admin" add pbx --type pbx_registers login=pbx password=pbx-pass-1 \
    trusted_ips=10.80.0.0/24 codecs=PCMA,PCMU,G722,opus dtmf=rfc2833,info >"$WORK/setup.log" 2>&1 \
  && in_ns "$SIPTG" gateway --admin "$admin" add gw --account gateway --connection pbx \
    --pbx-number pbx >>"$WORK/setup.log" 2>&1 \
  && in_ns "$SIPTG" gateway --admin "$admin" set gw keypad_bot=keypad >>"$WORK/setup.log" 2>&1 \
  || { cat "$WORK/setup.log"; die "siptg connection/gateway add failed"; }
log "made through the control API: $(in_ns "$SIPTG" connection --admin "$admin" list | tr -s ' ')"
wait_until 20 bash -c "ip netns exec $ns $SIPTG status --admin $admin | grep -q 'account gateway .*active'" \
  || { in_ns "$SIPTG" status --admin "$admin"; die "the gateway account is not active"; }

# The PBX side: a baresip phone registered as `pbx`, sending 440 Hz, recording, auto-answering.
ctl=$(free_port tcp)
dir="$WORK/phone-pbx"; mkdir -p "$dir/rec"
phone_config() {  # phone_config CODEC_MODULE RATE: the phone speaks only that codec
  python3 - "$dir/tone.wav" 440 "$2" <<'PY'
import math, struct, sys, wave
rate = int(sys.argv[3]); f = float(sys.argv[2])
with wave.open(sys.argv[1], "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(rate)
    w.writeframes(b"".join(struct.pack("<h", int(9000 * math.sin(2 * math.pi * f * i / rate))) for i in range(rate * 12)))
PY
  cat >"$dir/config" <<BCFG
poll_method		epoll
sip_listen		$addr:$(ua_port)
net_interface		gw0
dns_server		127.0.0.1:53
rtp_ports		20400-20419
audio_source		aufile,$dir/tone.wav
audio_player		aubridge,null_pbx
audio_alert		aubridge,nullalert_pbx
module_path		/usr/lib/baresip/modules
module			$1
module			aufile.so
module			aubridge.so
module			sndfile.so
snd_path		$dir/rec
opus_stereo		no
opus_sprop_stereo	no
module_tmp		uuid.so
module_tmp		account.so
module_app		menu.so
module_app		contact.so
module_app		ctrl_tcp.so
ctrl_tcp_listen		127.0.0.1:$ctl
BCFG
}
phone_config g711.so 8000
echo "<sip:pbx@$sip>;auth_pass=pbx-pass-1;answermode=auto;regint=600" >"$dir/accounts"
# The phone's one contact (its `message` command writes to the current contact): the Telegram
# user, by phone number through the gateway.
echo "\"Nina\" <sip:+555000002@$sip>" >"$dir/contacts"
echo "sip:+555000002@$sip" >"$dir/current_contact"

user() {  # user MODE [TARGET] [OPTIONS]: the Telegram user (ntgcalls) in the background, output
          # in tg.log; it talks 4 s unless OPTIONS say --seconds
  in_ns timeout 90 "$venv/bin/python3" "$here/tg_user.py" "$SIPTG" "$sim" +555000002 --seconds 4 "$@" \
    >"$WORK/tg.log" 2>&1 &
  TG_PID=$!
}

check_phone() {  # check_phone WHAT: the phone's recording holds the Telegram user's 1000 Hz
  local w; w=$(ls "$dir"/rec/*-dec.wav 2>/dev/null | head -n 1)
  [ -n "$w" ] || { tail -n 20 "$dir/log"; failed+=("$1: no recording on the phone"); return; }
  goertzel "$w" 1000 440 || failed+=("$1: the phone did not hear the Telegram user")
}

check_user() {  # check_user WHAT
  sed 's/^/    /' "$WORK/tg.log" | grep -E '\[tgcalls\]|RESULT' || true
  grep -q "RESULT connected=yes heard=yes ended=yes" "$WORK/tg.log" || { tail -n 30 "$WORK/tg.log"; failed+=("$1: Telegram side"); }
}

# 1. SIP → Telegram: the phone dials the Telegram user's number; the phone hangs up.
#    DTMF both ways during the call: the phone sends 5 (RFC 4733) and the Telegram user must
#    get the keypad message 5; the user types 7 in the chat and the phone must receive DTMF 7.
log "case: a SIP phone calls a Telegram user (G.711 ⇄ Opus), DTMF both ways, the phone hangs up"
rm -f "$dir"/rec/*.wav
user answer --chat +555000001 --dtmf-out 7 --expect-dtmf 5
wait_until 20 grep -q READY "$WORK/tg.log" || die "Telegram user did not start: $(tail -n 5 "$WORK/tg.log")"
in_ns timeout 30 baresip -f "$dir" -t 11 </dev/null >"$dir/log" 2>&1 &
phone_pid=$!
wait_until 10 grep -q "200 OK" "$dir/log" || { cat "$dir/log"; die "the phone did not register"; }
in_ns bash -c "$(declare -f ctrl); ctrl $ctl dial 'sip:+555000002@$sip'"
# baresip reports RFC 4733 digits it receives only as ctrl_tcp events: record them.
in_ns python3 - "$ctl" "$dir/events" <<'PY' &
import socket, sys, time
end = time.time() + 10
while True:
    try:
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1); break
    except OSError:
        if time.time() > end: sys.exit("ctrl_tcp not reachable")
        time.sleep(0.1)
end, data = time.time() + 15, b""
with open(sys.argv[2], "wb") as f:
    while time.time() < end:
        try:
            chunk = s.recv(4096)
        except socket.timeout:
            continue
        if not chunk:
            break
        f.write(chunk); f.flush()
PY
events_pid=$!
wait_until 10 grep -q "typed 7" "$WORK/tg.log" || true
sleep 1
in_ns bash -c "$(declare -f ctrl); ctrl $ctl sndcode 5"
wait $phone_pid || true
wait $TG_PID || true
check_user "SIP → Telegram"
check_phone "SIP → Telegram"
grep -q "dtmf_in=yes" "$WORK/tg.log" || failed+=("DTMF phone → Telegram: no keypad message 5")
wait $events_pid 2>/dev/null || true
# baresip 1.0's ctrl_tcp serves one connection at a time (the sndcode command takes it over),
# so the recorded events may hold only the digit's end (CALL_DTMF_END, which names no digit);
# 7 is the only digit sent towards the phone in this call.
if grep -q "received DTMF: '7'" "$dir/log" || grep -q 'CALL_DTMF_START[^}]*"param":"7"' "$dir/events" 2>/dev/null \
   || grep -q '"type":"CALL_DTMF_END"' "$dir/events" 2>/dev/null; then
  log "  the phone received the Telegram user's DTMF (RFC 4733): $(grep -o '"type":"CALL_DTMF_[A-Z]*"[^}]*' "$dir/events" | head -n 2 | tr '\n' ' ')"
else
  { tr ',' '\n' <"$dir/events" | grep -i dtmf | head -n 5; } 2>/dev/null || true
  grep -i dtmf "$dir/log" | tail -n 5
  failed+=("DTMF Telegram → phone: no DTMF 7 at the phone")
fi
log "  the Telegram user got the phone's DTMF: $(grep -o 'keypad message from the gateway.*' "$WORK/tg.log" | head -n 1)"

# 2. Telegram → SIP: the Telegram user calls the gateway account; the phone (auto-answer)
#    rings as `pbx` (the gateway's Number on the PBX); the user presses 9 on the keypad the
#    gateway's bot put into the chat (the phone must receive DTMF 9); the user hangs up.
log "case: a Telegram user calls the gateway's account, the PBX phone answers, keypad 9, the user hangs up"
rm -f "$dir"/rec/*.wav "$dir/events"
in_ns timeout 40 baresip -f "$dir" -t 16 </dev/null >"$dir/log" 2>&1 &
phone_pid=$!
wait_until 10 grep -q "200 OK" "$dir/log" || { cat "$dir/log"; die "the phone did not register"; }
in_ns python3 - "$ctl" "$dir/events" <<'PY' &
import socket, sys, time
end = time.time() + 10
while True:
    try:
        s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1); break
    except OSError:
        if time.time() > end: sys.exit("ctrl_tcp not reachable")
        time.sleep(0.1)
end = time.time() + 20
with open(sys.argv[2], "wb") as f:
    while time.time() < end:
        try:
            chunk = s.recv(4096)
        except socket.timeout:
            continue
        if not chunk:
            break
        f.write(chunk); f.flush()
PY
events_pid=$!
user call +555000001 --press 9
wait $TG_PID || true
wait $events_pid 2>/dev/null || true
sed 's/^/    /' "$WORK/tg.log" | grep -E "keypad|pressed" || true
if grep -q 'CALL_DTMF_START[^}]*"param":"9"' "$dir/events" 2>/dev/null || grep -q "received DTMF: '9'" "$dir/log"; then
  log "  the phone received keypad 9: $(grep -o '"type":"CALL_DTMF_START"[^}]*' "$dir/events" | head -n 1)"
else
  { tr ',' '\n' <"$dir/events" | grep -i dtmf | head -n 5; } 2>/dev/null || true
  failed+=("keypad: the phone did not receive DTMF 9")
fi
sleep 1
grep -q "X-TG-ID\|Nina\|555000002" "$dir/log" && log "  the phone saw the caller: $(grep -m1 -o 'Nina[^"]*\|+555000002' "$dir/log" || true)"
wait $phone_pid || true
check_user "Telegram → SIP"
check_phone "Telegram → SIP"
grep -q "gateway call ended" "$WORK/gateway.log" 2>/dev/null || grep -q "gateway call" "$WORK/gateway.log" || true

# 3, 4. SIP → Telegram with Opus (passed through) and G.722 (transcoded) on the SIP side.
for c in "opus.so 48000 Opus" "g722.so 16000 G.722"; do
  set -- $c
  log "case: a SIP phone speaking $3 calls a Telegram user, the phone hangs up"
  phone_config "$1" "$2"
  rm -f "$dir"/rec/*.wav
  user answer
  wait_until 20 grep -q READY "$WORK/tg.log" || die "Telegram user did not start: $(tail -n 5 "$WORK/tg.log")"
  in_ns timeout 30 baresip -f "$dir" -t 11 </dev/null >"$dir/log" 2>&1 &
  phone_pid=$!
  wait_until 10 grep -q "200 OK" "$dir/log" || { cat "$dir/log"; die "the phone did not register"; }
  in_ns bash -c "$(declare -f ctrl); ctrl $ctl dial 'sip:+555000002@$sip'"
  wait $phone_pid || true
  wait $TG_PID || true
  grep -iE "audio: .*(opus|G722)|Audio-codec|codec" "$dir/log" | head -n 2 | sed 's/^/    /' || true
  check_user "SIP ($3) → Telegram"
  check_phone "SIP ($3) → Telegram"
done

# 5. Hold: a Telegram user calls, the phone answers, holds (a=sendonly), resumes. ntgcalls
#    must report the gateway's microphone muted (our MediaState) and active again, and the
#    phone must hear the user's tone after the resume (nothing goes to it while it holds).
log "case: the PBX phone holds and resumes a Telegram user's call"
phone_config g711.so 8000
rm -f "$dir"/rec/*.wav
in_ns timeout 40 baresip -f "$dir" -t 24 </dev/null >"$dir/log" 2>&1 &
phone_pid=$!
wait_until 10 grep -q "200 OK" "$dir/log" || { cat "$dir/log"; die "the phone did not register"; }
user call +555000001 --expect-hold --seconds 12   # talks 12 s, then hangs up
if wait_until 30 grep -q "callee: CONNECTED\|caller: CONNECTED" "$WORK/tg.log"; then
  sleep 2
  in_ns bash -c "$(declare -f ctrl); ctrl $ctl hold ''"
  sleep 5
  in_ns bash -c "$(declare -f ctrl); ctrl $ctl resume ''"
fi
wait $TG_PID || true
wait $phone_pid || true
sed 's/^/    /' "$WORK/tg.log" | grep -E "microphone|RESULT" || true
grep -q "RESULT connected=yes heard=yes ended=yes .*hold=yes" "$WORK/tg.log" \
  || { tail -n 30 "$WORK/tg.log"; failed+=("hold: the Telegram user did not see the hold and the resume"); }
grep -q "the PBX holds the call" "$WORK/gateway.log" || failed+=("hold: the gateway saw no hold")
w=$(ls "$dir"/rec/*-dec.wav 2>/dev/null | head -n 1)
if [ -n "$w" ]; then
  python3 - "$w" <<'PY'
import sys, wave
with wave.open(sys.argv[1], "rb") as r:
    n = r.getnframes(); rate = r.getframerate()
    r.setpos(max(0, n - int(rate * 2.5)))
    data = r.readframes(n)
    with wave.open(sys.argv[1] + ".tail.wav", "wb") as o:
        o.setnchannels(r.getnchannels()); o.setsampwidth(2); o.setframerate(rate); o.writeframes(data)
PY
  goertzel "$w.tail.wav" 1000 440 || failed+=("hold: the phone did not hear the Telegram user after the resume")
else
  failed+=("hold: no recording on the phone")
fi

# 6. Text messages: the phone's MESSAGE reaches the Telegram user, whose answer reaches the
#    phone as a MESSAGE (to the gateway's Number on the PBX, the phone's registration).
#    The phone prints texts it receives through its stdio UI (which wants a live stdin).
log "case: text messages between the SIP phone and the Telegram user"
tdir="$WORK/phone-text"; mkdir -p "$tdir"
cp "$dir/accounts" "$dir/contacts" "$dir/current_contact" "$tdir/"
sed 's/^module_app\t\tmenu.so$/module\t\t\tstdio.so\nmodule_app\t\tmenu.so/' "$dir/config" >"$tdir/config"
grep -q stdio.so "$tdir/config" || die "no stdio module in the texting phone's config"
mkfifo "$tdir/stdin"
sleep 60 >"$tdir/stdin" &   # holds the phone's stdin open (at EOF its stdio UI spins)
hold_pid=$!
in_ns timeout -s KILL 40 baresip -f "$tdir" <"$tdir/stdin" >"$tdir/log" 2>&1 &
phone_pid=$!
wait_until 10 grep -q "200 OK" "$tdir/log" || { cat "$tdir/log"; die "the phone did not register"; }
in_ns timeout 60 python3 "$here/tg_text.py" "$SIPTG" "$sim" +555000002 "hello from the pbx" +555000001 "hello from telegram" \
  >"$WORK/text.log" 2>&1 &
text_pid=$!
wait_until 20 grep -q READY "$WORK/text.log" || die "Telegram user did not start: $(tail -n 5 "$WORK/text.log")"
in_ns bash -c "$(declare -f ctrl); ctrl $ctl message 'hello from the pbx'"
wait $text_pid || true
sed 's/^/    /' "$WORK/text.log" | grep -E 'RESULT|"message"' || true
grep -q "RESULT received=yes sent=yes" "$WORK/text.log" || { tail -n 20 "$WORK/text.log"; failed+=("texts: the Telegram user did not get the phone's MESSAGE"); }
wait_until 10 grep -q '"hello from telegram"' "$tdir/log" \
  || { tail -n 20 "$tdir/log"; grep -a "text message" "$WORK/gateway.log" | tail -n 5
       failed+=("texts: the phone did not get the Telegram user's text"); }
in_ns bash -c "$(declare -f ctrl); ctrl $ctl quit ''"
wait "$phone_pid" 2>/dev/null || true
kill "$hold_pid" 2>/dev/null || true

[ ${#failed[@]} = 0 ] || die "failed: ${failed[*]}"
log "gateway: all cases pass"
