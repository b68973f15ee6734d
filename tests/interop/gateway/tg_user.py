"""A Telegram user for the gateway suite: ntgcalls 3.0.5 as the media (the independent
implementation) plus `siptg tgsim-app` as the user's app on the simulated cloud.

    python3 tg_user.py SIPTG_BIN SIM_ADDR PHONE answer [--seconds S] [DTMF options]
    python3 tg_user.py SIPTG_BIN SIM_ADDR PHONE call TARGET [--seconds S] [DTMF options]

`--expect-hold` requires ntgcalls to report the gateway's microphone muted (the PBX held the
call: our `MediaState` said muted) and then active again (resumed).

DTMF options: `--chat +PHONE --dtmf-out 7` types 7 in the chat with the gateway account once
connected (the gateway sends it to the PBX as DTMF); `--expect-dtmf 5` requires the keypad
message 5 from the gateway (the PBX's DTMF) before the call ends; `--press 9` waits for the
keypad the gateway's bot puts into the chat and presses 9 on it (DTMF to the PBX).

Plays a 1000 Hz tone and checks it hears 440 Hz (the SIP phone's tone); `call` hangs up after
the tone, `answer` waits for the other side to hang up. Prints one result line and exits 0 only
when the call connected, the tone was heard and the call ended.
"""
import argparse
import asyncio
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "tgcalls"))
sys.path.insert(0, os.path.join(here, "..", "storage"))
import harness  # noqa: E402
from app_call import App  # noqa: E402

log = harness.log
harness.TONES["caller"] = 1000.0
harness.TONES["callee"] = 1000.0


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("siptg")
    ap.add_argument("sim")
    ap.add_argument("phone")
    ap.add_argument("mode", choices=["answer", "call"])
    ap.add_argument("target", nargs="?")
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--chat", help="the gateway account (+phone) to type digits to")
    ap.add_argument("--dtmf-out", help="digits typed in the chat once connected (DTMF to the PBX)")
    ap.add_argument("--expect-dtmf", help="a digit the gateway must send as a keypad message")
    ap.add_argument("--press", help="a key to press on the gateway's inline keypad once connected")
    ap.add_argument("--expect-hold", action="store_true",
                    help="the gateway's MediaState must go muted, then unmuted")
    a = ap.parse_args()
    harness.SECONDS = int(a.seconds)

    app = App("tg-user", a.siptg, a.sim, a.phone)
    await app.start()
    role = "callee" if a.mode == "answer" else "caller"
    party = harness.NtgParty(role)
    party.on_signal = app.signal
    app.on_signal = party.deliver
    await party.start()
    # ntgcalls reports the peer's MediaState (its data-channel message) as remote source
    # changes: the microphone IDLING when muted, ACTIVE when not.
    mic_states = []
    if a.expect_hold:
        loop = asyncio.get_running_loop()

        def remote(_id, src):
            if src.device == harness.N.StreamDevice.MICROPHONE:
                name = src.state.name

                def note():
                    mic_states.append(name)
                    log(f"the gateway's microphone: {name}")
                loop.call_soon_threadsafe(note)
        party.call.on_remote_source_change(remote)
    app.send(op="dh")
    dh = await app.expect("dh")
    if a.mode == "answer":
        print("READY", flush=True)
        inc = await app.expect("incoming", 60)
        log(f"incoming call from user {inc['from']}")
        g_b = await party.incoming(bytes.fromhex(dh["random"]), bytes.fromhex(inc["g_a_hash"]))
        app.send(op="accept", g_b=g_b.hex(), versions=inc["versions"])
        act = await app.expect("active", 20)
        await party.confirmed(bytes.fromhex(act["g_a_or_b"]), act["fingerprint"])
    else:
        g_a_hash = await party.request(bytes.fromhex(dh["random"]))
        app.send(op="call", peer=a.target, g_a_hash=g_a_hash.hex(), versions=["8.0.0"])
        await app.expect("calling")
        acc = await app.expect("accepted", 40)
        g_a, fp = await party.accepted(bytes.fromhex(acc["g_b"]))
        app.send(op="confirm", g_a=g_a.hex(), fingerprint=fp, versions=["8.0.0"])
        act = await app.expect("active")
    await party.connect(act["versions"][0], act["servers"], act["p2p"])
    try:
        await asyncio.wait_for(party.connected.wait(), 20)
    except asyncio.TimeoutError:
        print("RESULT connected=no heard=no ended=no")
        return 1
    if a.dtmf_out and a.chat:
        app.send(op="send", peer=a.chat, text=a.dtmf_out)
        await app.expect("sent")
        log(f"typed {a.dtmf_out} in the chat with {a.chat}")
    if a.press:
        # The gateway's keypad bot puts its keypad into the chat once the call is answered.
        k = await app.expect("keypad", 15)
        log(f"keypad from the gateway via bot {k['via_bot']}: {' '.join(k['keys'])}")
        app.send(op="press", key=a.press)
        p = await app.expect("pressed", 15)
        log(f"pressed {a.press} on the keypad; the bot answered {p['answer']!r}")
    # harness.NtgParty.play_and_listen checks for the other role's tone: both are 1000 Hz
    # here, so check 440 Hz (the SIP phone) ourselves on what was heard.
    loop = asyncio.get_running_loop()
    ok, what = await play_and_check(party, loop)
    log(f"Telegram user heard the SIP phone's 440 Hz: {'yes' if ok else 'NO'} ({what})")
    dtmf_in = "n/a"
    if a.expect_dtmf:
        dtmf_in = "no"
        try:
            while True:
                m = await app.expect("message", 10)
                log(f"keypad message from the gateway: {m['text']!r}")
                if m["text"].strip() == a.expect_dtmf:
                    dtmf_in = "yes"
                    break
        except Exception as e:  # noqa: BLE001
            log(f"no keypad message {a.expect_dtmf}: {e}")
    if a.mode == "call":
        app.send(op="discard", reason="hangup", duration=int(a.seconds))
        await party.hang_up()
        ended = True
    else:
        try:
            d = await app.expect("discarded", 30)
            log(f"the gateway ended the call ({d['reason']})")
            ended = True
        except Exception as e:  # noqa: BLE001
            log(f"no end of call: {e}")
            ended = False
        await party.hang_up()
    await app.stop()
    hold = "n/a"
    if a.expect_hold:
        held = "IDLING" in mic_states
        hold = "yes" if held and "ACTIVE" in mic_states[mic_states.index("IDLING"):] else "no"
        log(f"the gateway's microphone went: {mic_states}")
    print(f"RESULT connected=yes heard={'yes' if ok else 'no'} ended={'yes' if ended else 'no'} "
          f"dtmf_in={dtmf_in} hold={hold}", flush=True)
    return 0 if ok and ended and dtmf_in != "no" and hold != "no" else 1


async def play_and_check(party, loop):
    import math
    import struct
    start = loop.time()
    frames = int(harness.SECONDS * harness.RATE // harness.FRAME)
    for k in range(frames):
        frame = b"".join(struct.pack("<h", int(8000 * math.sin(
            2 * math.pi * 1000.0 * (k * harness.FRAME + i) / harness.RATE))) for i in range(harness.FRAME))
        await party.call.send_external_frame(party.uid, harness.N.StreamDevice.MICROPHONE, frame,
                                             harness.N.FrameData())
        await asyncio.sleep(max(0.0, start + (k + 1) * harness.FRAME / harness.RATE - loop.time()))
    pcm = b"".join(party.heard)[-2 * harness.RATE:]
    rms, ok = harness.goertzel_ok(pcm, 440.0, 1000.0)
    return ok, f"rms {rms:.0f}, {len(party.heard)} frames"


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
