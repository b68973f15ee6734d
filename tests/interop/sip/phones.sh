# Helpers for baresip phones in the SIP suites (sourced by calls.sh and run.sh): a test tone,
# a Goertzel check of a recording, and one ctrl_tcp command.

tone() {  # tone FILE FREQ: 8 kHz mono S16LE WAV, 12 s
  python3 - "$1" "$2" <<'PY'
import math, struct, sys, wave
with wave.open(sys.argv[1], "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(8000)
    f = float(sys.argv[2])
    w.writeframes(b"".join(struct.pack("<h", int(9000 * math.sin(2 * math.pi * f * i / 8000))) for i in range(8000 * 12)))
PY
}

goertzel() {  # goertzel WAV WANT OTHER -> exit 0 when WANT dominates OTHER by 100x and rms > 1000
  python3 - "$@" <<'PY'
import math, struct, sys, wave
with wave.open(sys.argv[1], "rb") as w:
    ch, rate, n = w.getnchannels(), w.getframerate(), w.getnframes()
    x = struct.unpack("<%dh" % n * ch, w.readframes(n))[::ch][int(rate * 0.5):]
def p(f):
    k = 2 * math.cos(2 * math.pi * f / rate); s1 = s2 = 0.0
    for v in x: s0 = v + k * s1 - s2; s2, s1 = s1, s0
    return s1 * s1 + s2 * s2 - k * s1 * s2
want, other = float(sys.argv[2]), float(sys.argv[3])
rms = math.sqrt(sum(v * v for v in x) / max(1, len(x)))
ok = rms > 1000 and p(want) > 100 * max(p(other), p(2000))
print(f"{sys.argv[1].split('/')[-3]} heard {want:g} Hz: {'yes' if ok else 'NO'} (rms {rms:.0f}, {len(x) / rate:.1f} s)")
sys.exit(0 if ok else 1)
PY
}

ctrl() {  # ctrl PORT COMMAND PARAMS: one ctrl_tcp command (netstring JSON), after the phone is up
  python3 - "$@" <<'PY'
import json, socket, sys, time
port, cmd, params = int(sys.argv[1]), sys.argv[2], sys.argv[3]
end = time.time() + 10
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2); break
    except OSError:
        if time.time() > end: sys.exit("ctrl_tcp not reachable")
        time.sleep(0.1)
body = json.dumps({"command": cmd, "params": params, "token": "1"}).encode()
s.sendall(str(len(body)).encode() + b":" + body + b",")
time.sleep(0.3)
PY
}
