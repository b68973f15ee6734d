"""Raw SIP over TCP against a running siptg (configured by tests/interop/sip/run.sh).

REGISTER (office) gets 401 then 200 with an MD5 digest, OPTIONS gets 200, a CRLFCRLF keep-alive
gets a CRLF (RFC 5626), a framing error closes the connection, and after a truncated message
and a close siptg still answers on a new connection.
"""
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sip_stream import Probe, Reader  # noqa: E402

host, port = sys.argv[1], int(sys.argv[2])


def connect():
    s = socket.create_connection((host, port), timeout=5)
    s.settimeout(5)
    return s


p = Probe("tcp_probe", host, port, "tcp", connect)
s = connect()
r = Reader(s)
ok = p.register_and_options(s, r)
s.sendall(b"\r\n\r\n")
while len(r.buf) < 2:
    r.more()
ok &= p.check("CRLFCRLF keep-alive", r.buf[:2], b"\r\n")
r.buf = r.buf[2:]
# A framing error (no SIP start line) closes the connection.
s.sendall(b"THIS IS NOT SIP\r\nX: y\r\n\r\n")
try:
    closed = s.recv(100) == b""
except ConnectionResetError:
    closed = True
except socket.timeout:
    closed = False
ok &= p.check("connection closed after a framing error", closed, True)
s.close()

# A truncated message, then a close: siptg keeps serving.
t = connect()
t.sendall(b"OPTIONS sip:office@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;bra")
t.close()
time.sleep(0.2)
ok &= p.options_ok("OPTIONS on a new connection after a truncated one")
sys.exit(0 if ok else 1)
