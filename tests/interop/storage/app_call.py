"""A Telegram call through the simulated cloud (tgsim), each party with its own app.

Each party is a media peer (ntgcalls 3.0.5, or siptg's own `tgcall-peer`) plus the app of a
simulated user (`siptg tgsim-app`, logged in to tgsim by phone and code). Unlike the tgcalls
suite's harness, nothing here plays Telegram's servers: tgsim does (DH config, call states,
g_a_hash/g_b/g_a exchange, protocol choice, signalling relay, connections list, hang-up).

    python3 app_call.py SIPTG_BIN SIM_ADDR BIND_IP CALLER_KIND CALLER_PHONE CALLEE_KIND CALLEE_PHONE CALLEE_PEER
                        [--version 8.0.0] [--hangup caller|callee] [--expect-error NAME]
                        [--expect-missed]
"""
import argparse
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tgcalls"))
import harness  # noqa: E402  (SiptgParty, NtgParty, TONES, log)

log = harness.log


class App:
    """`siptg tgsim-app`: a simulated user's Telegram app, JSON lines."""

    def __init__(self, name, binary, sim, phone):
        self.name, self.binary, self.sim, self.phone = name, binary, sim, phone
        self.events = asyncio.Queue()
        self.stash = []
        self.on_signal = None

    async def start(self):
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "tgsim-app", "--sim", self.sim, "--phone", self.phone,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "RUST_LOG": "warn"})
        self.reader = asyncio.ensure_future(self._read())
        ready = await self.expect("ready", 20)
        log(f"app {self.name}: logged in to tgsim as user {ready['user_id']}")

    async def _read(self):
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                await self.events.put({"event": "exit"})
                return
            ev = json.loads(line)
            if ev.get("event") == "signal" and self.on_signal:
                await self.on_signal(bytes.fromhex(ev["data"]))
            else:
                await self.events.put(ev)

    def send(self, **cmd):
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())

    async def expect(self, kind, timeout=15):
        # Events may arrive in either order (an update can overtake an RPC answer): keep the
        # ones not asked for yet.
        for i, ev in enumerate(self.stash):
            if ev.get("event") == kind:
                return self.stash.pop(i)
        while True:
            ev = await asyncio.wait_for(self.events.get(), timeout)
            if ev.get("event") == kind:
                return ev
            if ev.get("event") in ("error", "exit"):
                raise RuntimeError(f"app {self.name}: {ev}")
            self.stash.append(ev)

    async def signal(self, data):
        self.send(op="signal", data=data.hex())

    async def stop(self):
        if self.proc.returncode is None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()


def party(kind, role, binary, bind):
    return harness.SiptgParty(role, binary, bind) if kind == "siptg" else harness.NtgParty(role)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("siptg")
    ap.add_argument("sim")
    ap.add_argument("bind")
    ap.add_argument("caller_kind", choices=["siptg", "ntgcalls"])
    ap.add_argument("caller_phone")
    ap.add_argument("callee_kind", choices=["siptg", "ntgcalls"])
    ap.add_argument("callee_phone")
    ap.add_argument("callee_peer", help="how the caller names the callee: @username or +phone")
    ap.add_argument("--version", default="8.0.0")
    ap.add_argument("--hangup", choices=["caller", "callee"], default="caller")
    ap.add_argument("--expect-error", help="requestCall must fail with this Telegram error")
    ap.add_argument("--expect-missed", action="store_true",
                    help="the callee is offline: the call must ring out as missed")
    a = ap.parse_args()

    capp = App("caller", a.siptg, a.sim, a.caller_phone)
    await capp.start()
    if a.expect_error or a.expect_missed:
        capp.send(op="call", peer=a.callee_peer, g_a_hash=os.urandom(32).hex(), versions=[a.version])
        ev = await capp.events.get()
        while ev.get("event") not in ("error", "calling"):
            ev = await capp.events.get()
        if a.expect_error:
            ok = ev.get("event") == "error" and ev.get("error") == a.expect_error
            log(f"requestCall to {a.callee_peer}: {ev.get('error') or ev.get('event')} "
                f"(expected {a.expect_error})")
        else:
            if ev.get("event") != "calling":
                log(f"FAIL: call not placed: {ev}")
                return 1
            d = await capp.expect("discarded", 30)
            ok = d["reason"] == "missed"
            log(f"offline callee: call discarded as {d['reason']} (expected missed)")
        await capp.stop()
        return 0 if ok else 1

    eapp = App("callee", a.siptg, a.sim, a.callee_phone)
    await eapp.start()
    caller = party(a.caller_kind, "caller", a.siptg, a.bind)
    callee = party(a.callee_kind, "callee", a.siptg, a.bind)
    # Signalling goes through the apps and tgsim (phone.sendSignalingData).
    caller.on_signal, callee.on_signal = capp.signal, eapp.signal
    capp.on_signal, eapp.on_signal = caller.deliver, callee.deliver
    await caller.start()
    await callee.start()
    log(f"{a.caller_kind} calls {a.callee_kind} ({a.callee_peer}) through tgsim")

    capp.send(op="dh")
    dh = await capp.expect("dh")
    if bytes.fromhex(dh["p"]) != harness.PRIME or dh["g"] != 3:
        log("FAIL: tgsim's DH config is not Telegram's prime")
        return 1
    g_a_hash = await caller.request(bytes.fromhex(dh["random"]))
    capp.send(op="call", peer=a.callee_peer, g_a_hash=g_a_hash.hex(), versions=[a.version])
    await capp.expect("calling")
    inc = await eapp.expect("incoming")
    await capp.expect("ringing")
    eapp.send(op="dh")
    edh = await eapp.expect("dh")
    g_b = await callee.incoming(bytes.fromhex(edh["random"]), bytes.fromhex(inc["g_a_hash"]))
    eapp.send(op="accept", g_b=g_b.hex(), versions=[a.version])
    acc = await capp.expect("accepted")
    g_a, fingerprint = await caller.accepted(bytes.fromhex(acc["g_b"]))
    capp.send(op="confirm", g_a=g_a.hex(), fingerprint=fingerprint, versions=[a.version])
    act_c = await capp.expect("active")
    act_e = await eapp.expect("active")
    if act_e["fingerprint"] != fingerprint:
        log(f"FAIL: tgsim relayed fingerprint {act_e['fingerprint']}, caller made {fingerprint}")
        return 1
    await callee.confirmed(bytes.fromhex(act_e["g_a_or_b"]), act_e["fingerprint"])
    if caller.fingerprint != callee.fingerprint:
        log(f"FAIL: key fingerprints differ: {caller.fingerprint} {callee.fingerprint}")
        return 1
    version = act_c["versions"][0]
    log(f"both derived key fingerprint {fingerprint}; tgsim chose {version}, "
        f"p2p_allowed={act_c['p2p']}, {len(act_c['servers'])} server(s)")
    await caller.connect(version, act_c["servers"], act_c["p2p"])
    await callee.connect(version, act_e["servers"], act_e["p2p"])
    try:
        await asyncio.wait_for(asyncio.gather(caller.connected.wait(), callee.connected.wait()), 20)
    except asyncio.TimeoutError:
        log(f"FAIL: not connected (caller {caller.connected.is_set()}, "
            f"callee {callee.connected.is_set()})")
        return 1
    (ok_a, what_a), (ok_b, what_b) = await asyncio.gather(
        caller.play_and_listen(), callee.play_and_listen())
    T = harness.TONES
    log(f"caller ({a.caller_kind}) {'heard' if ok_a else 'did NOT hear'} the callee's "
        f"{T['callee']:.0f} Hz tone: {what_a}")
    log(f"callee ({a.callee_kind}) {'heard' if ok_b else 'did NOT hear'} the caller's "
        f"{T['caller']:.0f} Hz tone: {what_b}")

    # Hang-up through the cloud: phone.discardCall on one side, phoneCallDiscarded on the other.
    (fa, fp), (sa, sp) = ((capp, caller), (eapp, callee)) if a.hangup == "caller" \
        else ((eapp, callee), (capp, caller))
    fa.send(op="discard", reason="hangup", duration=harness.SECONDS)
    await fp.hang_up()
    d = await sa.expect("discarded")
    await sp.hang_up()
    try:
        rcs = [await fp.wait_end(), await sp.wait_end()]
    except asyncio.TimeoutError:
        log("FAIL: a side did not end after hang-up")
        return 1
    log(f"hang-up from the {a.hangup}: the other app heard discarded ({d['reason']}), "
        f"both media peers ended {rcs}")
    await capp.stop()
    await eapp.stop()
    return 0 if ok_a and ok_b and rcs == [0, 0] and d["reason"] == "hangup" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
