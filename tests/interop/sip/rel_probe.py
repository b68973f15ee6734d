"""Reliable provisionals (RFC 3262), session timers (RFC 4028) and UPDATE (RFC 3311) through
siptg's B2BUA, with raw SIP over UDP. Two sockets play both phones: `alice` (the caller) and
`bob` (the callee) register with digest, then alice calls bob with `Require: 100rel` and
`Session-Expires: 120;refresher=uac`. Checked:
  - the INVITE reaching bob says `Supported: 100rel, timer`;
  - bob's reliable 180 (`Require: 100rel`, `RSeq: 1`) is PRACKed by siptg (`RAck: 1 <cseq> INVITE`);
  - alice gets a reliable 180 (`Require: 100rel`, an `RSeq`), retransmitted (same RSeq) until
    she PRACKs it; her PRACK gets 200;
  - the 200 to alice carries `Session-Expires: 120;refresher=uac` and `Require: timer`;
  - an UPDATE without a body (a refresh) gets 200 with `Session-Expires`; BYE ends both sides;
  - an INVITE with `Session-Expires: 30` gets `422 Session Interval Too Small` with `Min-SE: 90`.
Usage: rel_probe.py HOST PORT (siptg with pbx_registers connections alice and bob)."""
import hashlib
import re
import socket
import sys
import time
import uuid

HOST, PORT = sys.argv[1], int(sys.argv[2])
SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio {port} RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\n"
       "a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n")
failures = []


def check(what, ok, detail=""):
    print(f"[rel] {what}: {'ok' if ok else 'FAILED'} {detail}".rstrip())
    if not ok:
        failures.append(what)


def header(msg, name):
    for line in msg.split("\r\n\r\n", 1)[0].split("\r\n")[1:]:
        n, _, v = line.partition(":")
        if n.strip().lower() == name.lower():
            return v.strip()
    return None


def first_line(msg):
    return msg.split("\r\n", 1)[0]


class Phone:
    def __init__(self, login):
        self.login, self.password = login, f"{login}-pass-1"
        self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.bind(("127.0.0.1", 0))
        self.port = self.s.getsockname()[1]
        self.tag = uuid.uuid4().hex[:8]

    def send(self, text):
        self.s.sendto(text.encode(), (HOST, PORT))

    def via(self):
        return f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"

    def wait(self, pred, timeout=5.0):
        """The first message matching `pred`; others (100 Trying, retransmissions) are skipped."""
        end = time.time() + timeout
        while time.time() < end:
            self.s.settimeout(max(0.01, end - time.time()))
            try:
                data = self.s.recv(65535).decode(errors="replace")
            except socket.timeout:
                break
            if pred(data):
                return data
        return None

    def register(self):
        call_id = uuid.uuid4().hex
        uri = f"sip:{HOST}:{PORT}"

        def reg(cseq, extra=""):
            self.send(f"REGISTER {uri} SIP/2.0\r\n{self.via()}Max-Forwards: 70\r\n"
                      f"From: <sip:{self.login}@{HOST}>;tag={self.tag}\r\nTo: <sip:{self.login}@{HOST}>\r\n"
                      f"Call-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n"
                      f"Contact: <sip:{self.login}@127.0.0.1:{self.port}>\r\nExpires: 60\r\n"
                      f"{extra}Content-Length: 0\r\n\r\n")
        reg(1)
        r = self.wait(lambda d: d.startswith("SIP/2.0 401"))
        ch = header(r or "", "WWW-Authenticate") or ""
        p = {k.lower(): a or b for k, a, b in re.findall(r'(\w+)=(?:"([^"]*)"|([^,\s]+))', ch)}
        md5 = lambda x: hashlib.md5(x.encode()).hexdigest()
        ha1, ha2 = md5(f"{self.login}:{p['realm']}:{self.password}"), md5(f"REGISTER:{uri}")
        realm = p["realm"]
        auth = (f'Digest username="{self.login}", realm="{realm}", nonce="{p.get("nonce")}", '
                f'uri="{uri}", algorithm=MD5')
        nonce = p["nonce"]
        if "qop" in p:
            cnonce = uuid.uuid4().hex[:16]
            resp = md5(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}")
            auth += f', qop=auth, nc=00000001, cnonce="{cnonce}", response="{resp}"'
        else:
            auth += f', response="{md5(f"{ha1}:{nonce}:{ha2}")}"'
        if "opaque" in p:
            opaque = p["opaque"]
            auth += f', opaque="{opaque}"'
        reg(2, f"Authorization: {auth}\r\n")
        ok = self.wait(lambda d: d.startswith("SIP/2.0 ") and "REGISTER" in (header(d, "CSeq") or ""))
        check(f"{self.login} registers", ok is not None and first_line(ok) == "SIP/2.0 200 OK",
              first_line(ok or "(nothing)"))


def respond(phone, req, code, reason, to_tag, extra="", body=""):
    """A response to `req` from `phone` (Via, From, To with our tag, Call-ID, CSeq copied)."""
    lines = [f"SIP/2.0 {code} {reason}"]
    for line in req.split("\r\n\r\n", 1)[0].split("\r\n")[1:]:
        n = line.partition(":")[0].strip().lower()
        if n in ("via", "v", "from", "f", "call-id", "i", "cseq"):
            lines.append(line)
        elif n in ("to", "t"):
            lines.append(line if ";tag=" in line or not to_tag else f"{line};tag={to_tag}")
    lines.append(f"Contact: <sip:{phone.login}@127.0.0.1:{phone.port}>")
    if body:
        lines.append("Content-Type: application/sdp")
    msg = "\r\n".join(lines) + "\r\n" + extra + f"Content-Length: {len(body)}\r\n\r\n" + body
    phone.s.sendto(msg.encode(), (HOST, PORT))


alice, bob = Phone("alice"), Phone("bob")
bob.register()
alice.register()

# alice calls bob, requiring reliable provisionals and asking for a 120 s session timer.
call_id, body = uuid.uuid4().hex, SDP.format(port=41000)
invite = (f"INVITE sip:bob@{HOST}:{PORT} SIP/2.0\r\n{alice.via()}Max-Forwards: 70\r\n"
          f"From: <sip:alice@{HOST}>;tag={alice.tag}\r\nTo: <sip:bob@{HOST}>\r\n"
          f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@127.0.0.1:{alice.port}>\r\n"
          "Require: 100rel\r\nSupported: 100rel, timer\r\nSession-Expires: 120;refresher=uac\r\n"
          "Allow: INVITE, ACK, CANCEL, BYE, PRACK, UPDATE\r\n"
          f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}")
alice.send(invite)
b_inv = bob.wait(lambda d: d.startswith("INVITE "))
check("INVITE reaches bob", b_inv is not None)
if b_inv is None:
    sys.exit(1)
check("bob's INVITE says Supported: 100rel, timer",
      "100rel" in (header(b_inv, "Supported") or "") and "timer" in (header(b_inv, "Supported") or ""),
      repr(header(b_inv, "Supported")))
b_cseq = (header(b_inv, "CSeq") or "1").split()[0]
respond(bob, b_inv, 180, "Ringing", "bobtag", "Require: 100rel\r\nRSeq: 1\r\n")
prack = bob.wait(lambda d: d.startswith("PRACK "))
check("siptg PRACKs bob's reliable 180", prack is not None and header(prack, "RAck") == f"1 {b_cseq} INVITE",
      repr(header(prack or "", "RAck")))
if prack:
    respond(bob, prack, 200, "OK", None)

ringing = alice.wait(lambda d: d.startswith("SIP/2.0 18"))
check("alice gets a reliable 180", ringing is not None and header(ringing, "Require") == "100rel"
      and (header(ringing, "RSeq") or "").isdigit(), first_line(ringing or "(nothing)"))
if ringing is None:
    sys.exit(1)
rseq, a_to = header(ringing, "RSeq"), header(ringing, "To")
again = alice.wait(lambda d: d.startswith("SIP/2.0 18"), timeout=2)
check("the 180 is retransmitted until PRACKed", again is not None and header(again, "RSeq") == rseq)
alice.send(f"PRACK sip:siptg@{HOST}:{PORT} SIP/2.0\r\n{alice.via()}Max-Forwards: 70\r\n"
           f"From: <sip:alice@{HOST}>;tag={alice.tag}\r\nTo: {a_to}\r\nCall-ID: {call_id}\r\n"
           f"CSeq: 2 PRACK\r\nRAck: {rseq} 1 INVITE\r\nContent-Length: 0\r\n\r\n")
pr_ok = alice.wait(lambda d: d.startswith("SIP/2.0 ") and "PRACK" in (header(d, "CSeq") or ""))
check("alice's PRACK gets 200", pr_ok is not None and first_line(pr_ok) == "SIP/2.0 200 OK",
      first_line(pr_ok or "(nothing)"))

# bob answers; siptg ACKs him and answers alice with the session timer's terms.
respond(bob, b_inv, 200, "OK", "bobtag", "", SDP.format(port=42000))
ack = bob.wait(lambda d: d.startswith("ACK "))
check("siptg ACKs bob's 200", ack is not None)
ok = alice.wait(lambda d: d.startswith("SIP/2.0 200") and "INVITE" in (header(d, "CSeq") or ""))
check("alice gets 200 with Session-Expires: 120;refresher=uac and Require: timer",
      ok is not None and header(ok, "Session-Expires") == "120;refresher=uac" and header(ok, "Require") == "timer",
      repr((header(ok or "", "Session-Expires"), header(ok or "", "Require"))))
if ok is None:
    sys.exit(1)
a_to = header(ok, "To")
dialog = (f"From: <sip:alice@{HOST}>;tag={alice.tag}\r\nTo: {a_to}\r\nCall-ID: {call_id}\r\n")
alice.send(f"ACK sip:siptg@{HOST}:{PORT} SIP/2.0\r\n{alice.via()}Max-Forwards: 70\r\n{dialog}"
           "CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n")
# A refresh by UPDATE without a body.
alice.send(f"UPDATE sip:siptg@{HOST}:{PORT} SIP/2.0\r\n{alice.via()}Max-Forwards: 70\r\n{dialog}"
           "CSeq: 3 UPDATE\r\nSession-Expires: 120;refresher=uac\r\nContent-Length: 0\r\n\r\n")
up = alice.wait(lambda d: d.startswith("SIP/2.0 ") and "UPDATE" in (header(d, "CSeq") or ""))
check("a refreshing UPDATE gets 200 with Session-Expires",
      up is not None and first_line(up) == "SIP/2.0 200 OK" and header(up, "Session-Expires") == "120;refresher=uac",
      first_line(up or "(nothing)"))
alice.send(f"BYE sip:siptg@{HOST}:{PORT} SIP/2.0\r\n{alice.via()}Max-Forwards: 70\r\n{dialog}"
           "CSeq: 4 BYE\r\nContent-Length: 0\r\n\r\n")
bye_ok = alice.wait(lambda d: d.startswith("SIP/2.0 ") and "BYE" in (header(d, "CSeq") or ""))
check("alice's BYE gets 200", bye_ok is not None and first_line(bye_ok) == "SIP/2.0 200 OK")
bye = bob.wait(lambda d: d.startswith("BYE "))
check("bob gets the BYE", bye is not None)
if bye:
    respond(bob, bye, 200, "OK", None)

# Too short a session interval.
short = invite.replace(call_id, uuid.uuid4().hex).replace("Session-Expires: 120;refresher=uac",
                                                          "Session-Expires: 30")
short = re.sub(r"branch=z9hG4bK\w+", f"branch=z9hG4bK{uuid.uuid4().hex[:12]}", short)
alice.send(short)
r = alice.wait(lambda d: d.startswith("SIP/2.0 4"))
check("Session-Expires: 30 gets 422 Session Interval Too Small with Min-SE: 90",
      r is not None and first_line(r) == "SIP/2.0 422 Session Interval Too Small" and header(r, "Min-SE") == "90",
      first_line(r or "(nothing)"))
sys.exit(1 if failures else 0)
