"""Raw SIP over TLS (RFC 3261 §26) against a running siptg (configured by tests/interop/sip/run.sh).

Python's ssl client, certificate verification off (the suite's certificate is issued by a
throwaway CA): REGISTER (office) gets 401 then 200 with an MD5 digest, OPTIONS gets 200; a
plaintext client sending garbage to the TLS port, a TLS client sending garbage and a truncated
message followed by a close do not stop siptg answering on a new connection.
"""
import hashlib
import re
import socket
import ssl
import sys
import time
import uuid

host, port = sys.argv[1], int(sys.argv[2])
login, password = "office", "office-pass-1"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1_2


def connect():
    raw = socket.create_connection((host, port), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname=host)
    s.settimeout(5)
    return s


class Reader:
    """Frames responses on one connection by Content-Length."""

    def __init__(self, s):
        self.s, self.buf = s, b""

    def more(self):
        d = self.s.recv(65535)
        if not d:
            raise EOFError
        self.buf += d

    def response(self):
        while True:
            while b"\r\n\r\n" not in self.buf:
                self.more()
            head, rest = self.buf.split(b"\r\n\r\n", 1)
            m = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
            n = int(m.group(1)) if m else 0
            while len(rest) < n:
                self.more()
                head, rest = self.buf.split(b"\r\n\r\n", 1)
            self.buf = rest[n:]
            text = head.decode(errors="replace")
            if " 100 " not in text.split("\r\n", 1)[0]:
                return text


def request(s, method, cseq, call_id, tag, extra=""):
    lhost, lport = s.getsockname()[:2]
    uri = f"sip:{host}:{port};transport=tls" if method == "REGISTER" else f"sip:{login}@{host}:{port}"
    msg = (f"{method} {uri} SIP/2.0\r\n"
           f"Via: SIP/2.0/TLS {lhost}:{lport};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
           "Max-Forwards: 70\r\n"
           f"From: <sip:{login}@{host}>;tag={tag}\r\n"
           f"To: <sip:{login}@{host}>\r\n"
           f"Call-ID: {call_id}\r\n"
           f"CSeq: {cseq} {method}\r\n"
           f"Contact: <sip:{login}@{lhost}:{lport};transport=tls>\r\n"
           f"{extra}Content-Length: 0\r\n\r\n")
    s.sendall(msg.encode())


def digest(challenge, method, uri):
    """An Authorization header (MD5, qop=auth when offered) for one WWW-Authenticate value."""
    p = {k.lower(): a or b for k, a, b in re.findall(r'(\w+)=(?:"([^"]*)"|([^,\s]+))', challenge)}
    realm, nonce = p["realm"], p["nonce"]
    md5 = lambda x: hashlib.md5(x.encode()).hexdigest()
    ha1, ha2 = md5(f"{login}:{realm}:{password}"), md5(f"{method}:{uri}")
    auth = f'Digest username="{login}", realm="{realm}", nonce="{nonce}", uri="{uri}", algorithm=MD5'
    if "qop" in p and "auth" in p["qop"].split(","):
        cnonce, nc = uuid.uuid4().hex[:16], "00000001"
        resp = md5(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
        auth += f', qop=auth, nc={nc}, cnonce="{cnonce}"'
    else:
        resp = md5(f"{ha1}:{nonce}:{ha2}")
    auth += f', response="{resp}"'
    if "opaque" in p:
        auth += f', opaque="{p["opaque"]}"'
    return auth


def check(what, got, want):
    ok = got == want
    print(f"[tls_probe] {what}: {got!r} {'ok' if ok else 'WANTED ' + repr(want)}")
    return ok


def status(text):
    return text.split("\r\n", 1)[0]


def options_ok(what):
    u = connect()
    request(u, "OPTIONS", 1, uuid.uuid4().hex, uuid.uuid4().hex[:8])
    good = check(what, status(Reader(u).response()), "SIP/2.0 200 OK")
    u.close()
    return good


ok = True
s = connect()
print(f"[tls_probe] connected with {s.version()} {s.cipher()[0]}")
r = Reader(s)
call_id, tag = uuid.uuid4().hex, uuid.uuid4().hex[:8]
request(s, "REGISTER", 1, call_id, tag)
first = r.response()
ok &= check("REGISTER over TLS", status(first), "SIP/2.0 401 Unauthorized")
challenges = [l.split(":", 1)[1].strip() for l in first.split("\r\n")
              if l.lower().startswith("www-authenticate:")]
md5 = next((c for c in challenges if re.search(r"algorithm=\"?MD5\"?(,|$|\s)", c, re.I)),
           next((c for c in challenges if "algorithm" not in c.lower()), None))
if md5 is None:
    print(f"[tls_probe] no MD5 challenge in {challenges!r}")
    sys.exit(1)
auth = digest(md5, "REGISTER", f"sip:{host}:{port};transport=tls")
request(s, "REGISTER", 2, call_id, tag, f"Authorization: {auth}\r\n")
ok &= check("REGISTER with digest over TLS", status(r.response()), "SIP/2.0 200 OK")
request(s, "OPTIONS", 1, uuid.uuid4().hex, uuid.uuid4().hex[:8])
ok &= check("OPTIONS over TLS", status(r.response()), "SIP/2.0 200 OK")
# A framing error inside TLS closes that connection.
s.sendall(b"THIS IS NOT SIP\r\nX: y\r\n\r\n")
try:
    closed = s.recv(100) == b""
except (ConnectionResetError, ssl.SSLError):
    closed = True
except socket.timeout:
    closed = False
ok &= check("TLS connection closed after a framing error", closed, True)
s.close()

# Plaintext garbage on the TLS port, then a close: no handshake, siptg keeps serving.
g = socket.create_connection((host, port), timeout=5)
g.sendall(b"OPTIONS sip:office@127.0.0.1 SIP/2.0\r\n\r\n\x16\x03\x01\x00\x05garbage")
g.close()
# A truncated message inside TLS, then a close.
t = connect()
t.sendall(b"OPTIONS sip:office@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:9;bra")
t.close()
time.sleep(0.2)
ok &= options_ok("OPTIONS on a new TLS connection after garbage and a truncated message")
sys.exit(0 if ok else 1)
