"""Shared helpers of the raw SIP probes over streams (tcp_probe.py, tls_probe.py): framing by
Content-Length, requests from the `office` PBX, an MD5 digest, and the REGISTER + OPTIONS
round that both probes start with."""
import hashlib
import re
import sys
import uuid

LOGIN, PASSWORD = "office", "office-pass-1"


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


class Probe:
    """One probe run: `transport` is "tcp" or "tls", `connect()` opens a connection."""

    def __init__(self, name, host, port, transport, connect):
        self.name, self.host, self.port = name, host, port
        self.transport, self.connect = transport, connect

    def request(self, s, method, cseq, call_id, tag, extra=""):
        lhost, lport = s.getsockname()[:2]
        t = self.transport
        uri = (f"sip:{self.host}:{self.port};transport={t}" if method == "REGISTER"
               else f"sip:{LOGIN}@{self.host}:{self.port}")
        msg = (f"{method} {uri} SIP/2.0\r\n"
               f"Via: SIP/2.0/{t.upper()} {lhost}:{lport};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
               "Max-Forwards: 70\r\n"
               f"From: <sip:{LOGIN}@{self.host}>;tag={tag}\r\n"
               f"To: <sip:{LOGIN}@{self.host}>\r\n"
               f"Call-ID: {call_id}\r\n"
               f"CSeq: {cseq} {method}\r\n"
               f"Contact: <sip:{LOGIN}@{lhost}:{lport};transport={t}>\r\n"
               f"{extra}Content-Length: 0\r\n\r\n")
        s.sendall(msg.encode())

    def check(self, what, got, want):
        ok = got == want
        print(f"[{self.name}] {what}: {got!r} {'ok' if ok else 'WANTED ' + repr(want)}")
        return ok

    def options_ok(self, what):
        u = self.connect()
        self.request(u, "OPTIONS", 1, uuid.uuid4().hex, uuid.uuid4().hex[:8])
        good = self.check(what, status(Reader(u).response()), "SIP/2.0 200 OK")
        u.close()
        return good

    def register_and_options(self, s, r):
        """REGISTER → 401 → digest → 200, then OPTIONS → 200, on connection `s`."""
        up = self.transport.upper()
        call_id, tag = uuid.uuid4().hex, uuid.uuid4().hex[:8]
        self.request(s, "REGISTER", 1, call_id, tag)
        first = r.response()
        ok = self.check(f"REGISTER over {up}", status(first), "SIP/2.0 401 Unauthorized")
        challenges = [l.split(":", 1)[1].strip() for l in first.split("\r\n")
                      if l.lower().startswith("www-authenticate:")]
        md5 = next((c for c in challenges if re.search(r"algorithm=\"?MD5\"?(,|$|\s)", c, re.I)),
                   next((c for c in challenges if "algorithm" not in c.lower()), None))
        if md5 is None:
            print(f"[{self.name}] no MD5 challenge in {challenges!r}")
            sys.exit(1)
        auth = digest(md5, "REGISTER", f"sip:{self.host}:{self.port};transport={self.transport}")
        self.request(s, "REGISTER", 2, call_id, tag, f"Authorization: {auth}\r\n")
        ok &= self.check(f"REGISTER with digest over {up}", status(r.response()), "SIP/2.0 200 OK")
        self.request(s, "OPTIONS", 1, uuid.uuid4().hex, uuid.uuid4().hex[:8])
        ok &= self.check(f"OPTIONS over {up}", status(r.response()), "SIP/2.0 200 OK")
        return ok


def digest(challenge, method, uri):
    """An Authorization header (MD5, qop=auth when offered) for one WWW-Authenticate value."""
    p = {k.lower(): a or b for k, a, b in re.findall(r'(\w+)=(?:"([^"]*)"|([^,\s]+))', challenge)}
    realm, nonce = p["realm"], p["nonce"]
    md5 = lambda x: hashlib.md5(x.encode()).hexdigest()
    ha1, ha2 = md5(f"{LOGIN}:{realm}:{PASSWORD}"), md5(f"{method}:{uri}")
    auth = f'Digest username="{LOGIN}", realm="{realm}", nonce="{nonce}", uri="{uri}", algorithm=MD5'
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


def status(text):
    return text.split("\r\n", 1)[0]
