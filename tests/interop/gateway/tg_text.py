"""A Telegram user's texts for the gateway suite, through `siptg tgsim-app` on the simulated cloud.

    python3 tg_text.py SIPTG_BIN SIM_ADDR PHONE EXPECT_TEXT SEND_TO SEND_TEXT

Prints READY once logged in, waits (30 s) for a text EXPECT_TEXT (the SIP phone's MESSAGE, sent
by the gateway's account), then sends SEND_TEXT to SEND_TO (the gateway's account; the phone
should get it as a MESSAGE). Prints one RESULT line; exits 0 only when both happened.
"""
import json
import subprocess
import sys
import time


def main():
    siptg, sim, phone, expect, send_to, send_text = sys.argv[1:7]
    app = subprocess.Popen([siptg, "tgsim-app", "--sim", sim, "--phone", phone],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def event(name, timeout):
        end = time.time() + timeout
        while time.time() < end:
            line = app.stdout.readline()
            if not line:
                return None
            ev = json.loads(line)
            print(f"  app: {line.strip()}", file=sys.stderr, flush=True)
            if ev.get("event") == name:
                return ev
        return None

    got = sent = False
    try:
        if event("ready", 20) is None:
            print("RESULT received=no sent=no (no login)", flush=True)
            return 1
        print("READY", flush=True)
        m = event("message", 30)
        got = m is not None and m.get("text") == expect
        app.stdin.write(json.dumps({"op": "send", "peer": send_to, "text": send_text}) + "\n")
        app.stdin.flush()
        sent = event("sent", 10) is not None
    finally:
        app.kill()
    print(f"RESULT received={'yes' if got else 'no'} sent={'yes' if sent else 'no'}", flush=True)
    return 0 if got and sent else 1


if __name__ == "__main__":
    sys.exit(main())
