"""Plays Telegram's servers between two call parties and checks the call end to end.

Parties: `siptg` (a `siptg tgcall-peer` process, the product's own Rust implementation) or
`ntgcalls` (the independent C++/libwebrtc implementation from PyPI, our conformance peer).
The harness relays exactly what Telegram's servers would: the DH config (messages.getDhConfig),
g_a_hash (phone.requestCall), g_b (phone.acceptCall), g_a and key_fingerprint
(phone.confirmCall), the connection list and chosen library version, and every
phone.sendSignalingData packet as updatePhoneCallSignalingData. ntgcalls does its own key
exchange (init_exchange / exchange_keys). Each side sends a tone and must hear the other's, by
Goertzel power; then one side hangs up and both must end.

    python3 harness.py CALLER CALLEE VERSION SIPTG_BIN BIND_IP [--relay TURN_IP:PORT:USER:PASS]
                       [--hangup caller|callee]
"""
import argparse
import asyncio
import json
import math
import os
import struct
import sys
import time

try:
    import ntgcalls as N
except ImportError:  # siptg <-> siptg runs need no ntgcalls
    N = None

RATE = 48000
FRAME = 480  # ntgcalls external frames: 10 ms of 16-bit mono PCM
SECONDS = 3
TONES = {"caller": 440.0, "callee": 1000.0}
# Telegram's current 2048-bit DH prime (messages.getDhConfig), g = 3.
PRIME = bytes.fromhex(
    "c71caeb9c6b1c9048e6c522f70f13f73980d40238e3e21c14934d037563d930f48198a0aa7c14058229493d2"
    "2530f4dbfa336f6e0ac925139543aed44cce7c3720fd51f69458705ac68cd4fe6b6b13abdc97465129693284"
    "54f18faf8c595f642477fe96bb2a941d5bcd1d4ac8cc49880708fa9b378e3c4f3a9060bee67cf9a4a4a69581"
    "1051907e162753b56b0f6b410dba74d8a84b2a14b3144e0ef1284754fd17ed950d5965b4b9dd46582db1178d"
    "169c6bc465b0d6ff9ca3928fef5b9ae4e418fc15e83ebea0f87fa9ff5eed70050ded2849f47bf959d956850c"
    "e929851f0d8115f635b105ee2e4e15d04b2454bf6f4fadf034b10403119cd8e3b92fcc5b")


def log(*a):
    print("[tgcalls]", *a, flush=True)


def goertzel_ok(pcm, want, other):
    samples = struct.unpack("<%dh" % (len(pcm) // 2), pcm)

    def power(freq):
        c = 2 * math.cos(2 * math.pi * freq / RATE)
        s1 = s2 = 0.0
        for x in samples:
            s1, s2 = x + c * s1 - s2, s1
        return s1 * s1 + s2 * s2 - c * s1 * s2

    rms = math.sqrt(sum(x * x for x in samples) / len(samples)) if samples else 0.0
    return rms, rms > 1000 and power(want) > 100 * max(power(other), power(2000))


class SiptgParty:
    """A `siptg tgcall-peer` process; its MTProto side is this harness."""

    def __init__(self, role, binary, bind):
        self.role, self.binary, self.bind = role, binary, bind
        self.events = asyncio.Queue()
        self.on_signal = None
        self.fingerprint = None
        self.emoji = None
        self.connected = asyncio.Event()
        self.heard = None
        self.ended = asyncio.Event()

    async def start(self):
        other = "callee" if self.role == "caller" else "caller"
        args = [self.binary, "tgcall-peer", "--bind", self.bind,
                "--tone", str(TONES[self.role]), "--expect", str(TONES[other]),
                "--seconds", str(SECONDS)]
        if self.role == "caller":
            args.append("--caller")
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self):
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                self.ended.set()
                return
            ev = json.loads(line)
            kind = ev.get("ev")
            if kind == "signal":
                await self.on_signal(bytes.fromhex(ev["hex"]))
            elif kind == "key":
                self.fingerprint, self.emoji = ev["fingerprint"], ev["emoji"]
                await self.events.put(ev)
            elif kind == "state":
                log(f"siptg {self.role}: {ev['state']}")
                if ev["state"] == "connected":
                    self.connected.set()
            elif kind == "heard":
                self.heard = ev
            elif kind == "ended":
                log(f"siptg {self.role}: ended ({ev.get('reason')})")
                self.ended.set()
            else:
                await self.events.put(ev)

    def send(self, obj):
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())

    async def expect(self, kind, timeout=10):
        while True:
            ev = await asyncio.wait_for(self.events.get(), timeout)
            if ev.get("ev") == kind:
                return ev
            log(f"siptg {self.role}: unexpected {ev}")

    # --- the server's side of the DH exchange ---
    async def request(self, dh):  # caller: returns g_a_hash
        self.send({"op": "dh_config", "g": 3, "p": PRIME.hex(), "random": dh.hex()})
        return bytes.fromhex((await self.expect("g_a_hash"))["hex"])

    async def incoming(self, dh, g_a_hash):  # callee: returns g_b
        self.send({"op": "dh_config", "g": 3, "p": PRIME.hex(), "random": dh.hex()})
        self.send({"op": "requested", "g_a_hash": g_a_hash.hex()})
        return bytes.fromhex((await self.expect("accept"))["g_b"])

    async def accepted(self, g_b):  # caller: returns (g_a, fingerprint)
        self.send({"op": "accepted", "g_b": g_b.hex()})
        ev = await self.expect("confirm")
        await self.expect("key")
        return bytes.fromhex(ev["g_a"]), ev["fingerprint"]

    async def confirmed(self, g_a, fingerprint):  # callee
        self.send({"op": "confirmed", "g_a": g_a.hex(), "fingerprint": fingerprint})
        await self.expect("key")

    async def connect(self, version, servers, p2p_allowed):
        self.send({"op": "connect", "version": version, "p2p_allowed": p2p_allowed,
                   "servers": servers})

    async def deliver(self, data):
        self.send({"op": "signal", "hex": data.hex()})

    async def play_and_listen(self):
        # The peer sends its tone by itself and reports what it heard after SECONDS.
        end = time.monotonic() + SECONDS + 10
        while self.heard is None and time.monotonic() < end:
            await asyncio.sleep(0.1)
        if self.heard is None:
            return False, "no report"
        return self.heard["ok"], f"rms {self.heard['rms']}, {self.heard['samples']} samples"

    async def hang_up(self):
        self.send({"op": "hangup"})
        await self.proc.stdin.drain()
        self.proc.stdin.close()

    async def wait_end(self, timeout=10):
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        return rc


class NtgParty:
    """ntgcalls 3.0.5 as the other party, fed raw PCM (external source)."""

    def __init__(self, role):
        self.role = role
        self.uid = 777
        self.on_signal = None
        self.connected = asyncio.Event()
        self.ended = asyncio.Event()
        self.heard = []
        self.fingerprint = None

    async def start(self):
        loop = asyncio.get_running_loop()
        self.call = N.NTgCalls()
        await self.call.create_p2p_call(self.uid)
        ext = N.AudioDescription(N.MediaSource.EXTERNAL, RATE, 1, "", True)
        mic = N.MediaDescription(microphone=ext, speaker=None, camera=None, screen=None)
        await self.call.set_stream_sources(self.uid, N.StreamMode.CAPTURE, mic)
        await self.call.set_stream_sources(self.uid, N.StreamMode.PLAYBACK, mic)

        def sig(_id, data):
            asyncio.run_coroutine_threadsafe(self.on_signal(bytes(data)), loop)
        self.call.on_signaling_data(sig)

        def conn(_id, info):
            def note():
                log(f"ntgcalls {self.role}: {info.state.name}")
                if info.state == N.ConnectionState.CONNECTED:
                    self.connected.set()
                elif info.state in (N.ConnectionState.CLOSED, N.ConnectionState.FAILED,
                                    N.ConnectionState.TIMEOUT):
                    self.ended.set()
            loop.call_soon_threadsafe(note)
        self.call.on_connection_change(conn)

        def frames(_id, mode, device, fr):
            if mode == N.StreamMode.PLAYBACK and device == N.StreamDevice.MICROPHONE:
                self.heard.extend(f.data for f in fr)
        self.call.on_frames(frames)

    async def request(self, dh):
        return bytes(await self.call.init_exchange(self.uid, N.DhConfig(3, PRIME, dh), None))

    async def incoming(self, dh, g_a_hash):
        return bytes(await self.call.init_exchange(self.uid, N.DhConfig(3, PRIME, dh), g_a_hash))

    async def accepted(self, g_b):
        ap = await self.call.exchange_keys(self.uid, g_b, 0)
        self.fingerprint = ap.key_fingerprint
        return bytes(ap.g_a_or_b), ap.key_fingerprint

    async def confirmed(self, g_a, fingerprint):
        ap = await self.call.exchange_keys(self.uid, g_a, fingerprint)
        self.fingerprint = ap.key_fingerprint

    async def connect(self, version, servers, p2p_allowed):
        rtc = [N.RTCServer(i + 1, s["ip"], "", s["port"], s.get("username"), s.get("password"),
                           s.get("turn", False), s.get("stun", False), False, None)
               for i, s in enumerate(servers)]
        self.connecting = asyncio.ensure_future(
            self.call.connect_p2p(self.uid, rtc, [version], p2p_allowed, None))

    async def deliver(self, data):
        await self.call.send_signaling_data(self.uid, data)

    async def play_and_listen(self):
        loop = asyncio.get_running_loop()
        freq = TONES[self.role]
        start = loop.time()
        for k in range(SECONDS * RATE // FRAME):
            frame = b"".join(struct.pack("<h", int(8000 * math.sin(
                2 * math.pi * freq * (k * FRAME + i) / RATE))) for i in range(FRAME))
            await self.call.send_external_frame(self.uid, N.StreamDevice.MICROPHONE, frame,
                                                N.FrameData())
            await asyncio.sleep(max(0.0, start + (k + 1) * FRAME / RATE - loop.time()))
        pcm = b"".join(self.heard)[-2 * RATE:]
        other = TONES["callee" if self.role == "caller" else "caller"]
        rms, ok = goertzel_ok(pcm, other, freq)
        return ok, f"rms {rms:.0f}, {len(self.heard)} frames"

    async def hang_up(self):
        await self.call.stop(self.uid)
        self.ended.set()

    async def wait_end(self, timeout=10):
        await asyncio.wait_for(self.ended.wait(), timeout)
        return 0


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("caller", choices=["siptg", "ntgcalls"])
    ap.add_argument("callee", choices=["siptg", "ntgcalls"])
    ap.add_argument("version")
    ap.add_argument("siptg")
    ap.add_argument("bind")
    ap.add_argument("--relay", help="TURN server ip:port:user:pass; makes the call relay-only")
    ap.add_argument("--hangup", choices=["caller", "callee"], default="caller")
    a = ap.parse_args()

    def make(kind, role):
        return SiptgParty(role, a.siptg, a.bind) if kind == "siptg" else NtgParty(role)
    caller, callee = make(a.caller, "caller"), make(a.callee, "callee")
    caller.on_signal, callee.on_signal = callee.deliver, caller.deliver
    await caller.start()
    await callee.start()
    names = f"{a.caller} calls {a.callee} on {a.version}"
    log(names + (" (relay-only via TURN)" if a.relay else " (P2P)"))

    dh = os.urandom(256)
    g_a_hash = await caller.request(dh)                      # phone.requestCall
    g_b = await callee.incoming(dh, g_a_hash)                # phone.acceptCall
    g_a, fingerprint = await caller.accepted(g_b)            # phone.confirmCall
    await callee.confirmed(g_a, fingerprint)                 # phoneCall
    fps = {p.fingerprint for p in (caller, callee)}
    if len(fps) != 1:
        log(f"FAIL: key fingerprints differ: {fps}")
        return 1
    log(f"both sides derived key fingerprint {fingerprint}")
    emojis = [p.emoji for p in (caller, callee) if isinstance(p, SiptgParty)]
    if len(emojis) == 2 and emojis[0] != emojis[1]:
        log(f"FAIL: emoji differ: {emojis}")
        return 1
    if emojis:
        log("emoji: " + " ".join(emojis[0]))

    if a.relay:
        ip, port, user, pw = a.relay.split(":")
        servers, p2p = [{"ip": ip, "port": int(port), "username": user, "password": pw,
                         "turn": True}], False
    else:
        servers, p2p = [], True
    await caller.connect(a.version, servers, p2p)
    await callee.connect(a.version, servers, p2p)
    try:
        await asyncio.wait_for(asyncio.gather(caller.connected.wait(), callee.connected.wait()), 20)
    except asyncio.TimeoutError:
        log(f"FAIL: not connected (caller {caller.connected.is_set()}, "
            f"callee {callee.connected.is_set()})")
        return 1
    (ok_a, what_a), (ok_b, what_b) = await asyncio.gather(
        caller.play_and_listen(), callee.play_and_listen())
    log(f"caller ({a.caller}) {'heard' if ok_a else 'did NOT hear'} the callee's "
        f"{TONES['callee']:.0f} Hz tone: {what_a}")
    log(f"callee ({a.callee}) {'heard' if ok_b else 'did NOT hear'} the caller's "
        f"{TONES['caller']:.0f} Hz tone: {what_b}")

    # Hang-up: one side discards; the server tells the other (phoneCallDiscarded).
    first, second = (caller, callee) if a.hangup == "caller" else (callee, caller)
    await first.hang_up()
    await second.hang_up()
    try:
        rcs = [await first.wait_end(), await second.wait_end()]
    except asyncio.TimeoutError:
        log("FAIL: a side did not end after hang-up")
        return 1
    log(f"hang-up from the {a.hangup}: both ended (exit codes {rcs})")
    return 0 if ok_a and ok_b and rcs == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
