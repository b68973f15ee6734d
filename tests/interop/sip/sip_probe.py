"""Raw SIP over UDP against a running siptg (configured by tests/interop/sip/run.sh).

5. An INVITE from the `office` PBX (From: office) before it registered, from a source it does
   not have a binding for, gets `405 REGISTER is required first`.
6. Five REGISTERs with wrong credentials from 127.0.0.3 (outside the trusted list, so each gets
   `403 Untrusted IP address`) get that address banned: the sixth gets no answer at all, while
   another address is still answered.
"""
import socket
import sys
import uuid

host, port = sys.argv[1], int(sys.argv[2])
after_lift = "--after-lift" in sys.argv[3:]


def request(method, src_ip, from_user, to_user, body=""):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src_ip, 0))
    s.settimeout(3)
    lport = s.getsockname()[1]
    call_id = uuid.uuid4().hex
    branch = "z9hG4bK" + uuid.uuid4().hex[:12]
    msg = (f"{method} sip:{to_user}@{host}:{port} SIP/2.0\r\n"
           f"Via: SIP/2.0/UDP {src_ip}:{lport};branch={branch};rport\r\n"
           f"Max-Forwards: 70\r\n"
           f"From: <sip:{from_user}@{src_ip}>;tag={uuid.uuid4().hex[:8]}\r\n"
           f"To: <sip:{to_user}@{host}>\r\n"
           f"Call-ID: {call_id}\r\n"
           f"CSeq: 1 {method}\r\n"
           f"Contact: <sip:{from_user}@{src_ip}:{lport}>\r\n"
           f"Content-Length: {len(body)}\r\n\r\n{body}")
    s.sendto(msg.encode(), (host, port))
    try:
        while True:
            data, _ = s.recvfrom(65535)
            line = data.split(b"\r\n", 1)[0].decode()
            if " 100 " not in line:
                return line
    except socket.timeout:
        return None
    finally:
        s.close()


def check(what, got, want):
    ok = got == want
    print(f"[sip_probe] {what}: {got!r} {'ok' if ok else 'WANTED ' + repr(want)}")
    return ok


if after_lift:
    ok = check("REGISTER from the lifted address",
               request("REGISTER", "127.0.0.3", "office", "office"),
               "SIP/2.0 403 Untrusted IP address")
    sys.exit(0 if ok else 1)

sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio 40000 RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\n")
ok = check("INVITE before REGISTER",
           request("INVITE", "127.0.0.1", "office", "+15550001", sdp),
           "SIP/2.0 405 REGISTER is required first")
for i in range(5):
    ok &= check(f"REGISTER #{i + 1} from an untrusted address",
                request("REGISTER", "127.0.0.3", "office", "office"),
                "SIP/2.0 403 Untrusted IP address")
ok &= check("sixth REGISTER from the banned address", request("REGISTER", "127.0.0.3", "office", "office"), None)
ok &= check("another address is still answered",
            request("REGISTER", "127.0.0.4", "office", "office"),
            "SIP/2.0 403 Untrusted IP address")
sys.exit(0 if ok else 1)
