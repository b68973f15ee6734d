"""Malformed and odd SIP against a running siptg: every malformed message gets 400 or silence
(never a crash, never a hang), a torture-style set of valid but odd messages is answered, and
siptg still answers afterwards.

    python3 malformed.py HOST PORT
"""
import socket
import sys
import uuid

host, port = sys.argv[1], int(sys.argv[2])


def send(data, wait=1.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(wait)
    s.sendto(data, (host, port))
    try:
        while True:
            got, _ = s.recvfrom(65535)
            line = got.split(b"\r\n", 1)[0].decode(errors="replace")
            if " 100 " not in line:
                return line
    except socket.timeout:
        return None
    finally:
        s.close()


def options(extra="", uri=None, via_host="127.0.0.1:5999", compact=False):
    b = "z9hG4bK" + uuid.uuid4().hex[:10]
    uri = uri or f"sip:gw@{host}:{port}"
    h = {
        "Via": f"SIP/2.0/UDP {via_host};branch={b};rport",
        "From": f"<sip:probe@127.0.0.1>;tag={uuid.uuid4().hex[:6]}",
        "To": f"<sip:gw@{host}>",
        "Call-ID": uuid.uuid4().hex,
    }
    if compact:
        names = {"Via": "v", "From": "f", "To": "t", "Call-ID": "i"}
        lines = [f"{names[k]}: {v}" for k, v in h.items()]
    else:
        lines = [f"{k}: {v}" for k, v in h.items()]
    return (f"OPTIONS {uri} SIP/2.0\r\n" + "\r\n".join(lines) +
            f"\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n{extra}Content-Length: 0\r\n\r\n").encode()


ok = True
malformed = {
    "binary junk": bytes(range(256)) * 4,
    "truncated head": options()[:60],
    "no blank line": options().replace(b"\r\n\r\n", b"\r\n"),
    "bad start line": b"OPTIONS\r\nVia: x\r\n\r\n",
    "Content-Length beyond the datagram": options().replace(b"Content-Length: 0", b"Content-Length: 500"),
    "negative Content-Length": options().replace(b"Content-Length: 0", b"Content-Length: -5"),
    "header without colon": options(extra="NoColonHere\r\n"),
    "NUL bytes": options().replace(b"Max-Forwards: 70", b"Max-Forwards: 7\x000"),
    "missing Call-ID": b"OPTIONS sip:gw SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKx\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:gw@c>\r\nCSeq: 1 OPTIONS\r\n\r\n",
    "SIP/3.0": options().replace(b"SIP/2.0\r\nVia", b"SIP/3.0\r\nVia", 1),
    "response with nonsense code": b"SIP/2.0 99999 Huh\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKq\r\n\r\n",
    "only CRLFs": b"\r\n\r\n\r\n",
}
for name, data in malformed.items():
    got = send(data[:65507])
    good = got is None or got.startswith("SIP/2.0 400")
    ok &= good
    print(f"[malformed] {name}: {got or 'no answer'} {'ok' if good else 'WANTED 400 or silence'}")

odd = {
    "compact header names": options(compact=True),
    "folded header": options(extra="Subject: one\r\n  two\r\n"),
    "unknown headers": options(extra="X-Weird: ;;;\r\nP-Foo: <sip:x@y>;a=b\r\n"),
    "escaped URI": options(uri=f"sip:%61lice@{host}:{port};transport=udp"),
    "tel URI": options(uri="tel:+15551234567"),
    "IPv6 Via": options(via_host="[::1]:5999"),
    "lowercase names": options().replace(b"Via:", b"via:").replace(b"Call-ID:", b"call-id:"),
}
for name, data in odd.items():
    got = send(data)
    good = got is not None and got.startswith("SIP/2.0 ")
    ok &= good
    print(f"[odd] {name}: {got or 'no answer'} {'ok' if good else 'WANTED an answer'}")

# The largest datagram UDP carries (a 65 KB header): any answer or none, but siptg lives on.
got = send(options(extra="X-Big: " + "a" * 65000 + "\r\n")[:65507])
print(f"[huge] 65 KB datagram: {got or 'no answer'} ok")

got = send(options(extra="Require: 100rel, foo\r\n"))
good = got == "SIP/2.0 420 Bad Extension"
ok &= good
print(f"[odd] Require of an unsupported extension: {got} {'ok' if good else 'WANTED 420 Bad Extension'}")

got = send(options())
ok &= got == "SIP/2.0 200 OK"
print(f"[after] OPTIONS still answered: {got}")
sys.exit(0 if ok else 1)
