"""Raw SIP over TLS (RFC 3261 §26) against a running siptg (configured by tests/interop/sip/run.sh).

Python's ssl client, certificate verification off (the suite's certificate is issued by a
throwaway CA): REGISTER (office) gets 401 then 200 with an MD5 digest, OPTIONS gets 200; a
plaintext client sending garbage to the TLS port, a TLS client sending garbage and a truncated
message followed by a close do not stop siptg answering on a new connection.
"""
import os
import socket
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sip_stream import Probe, Reader  # noqa: E402

host, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1_2


def connect():
    raw = socket.create_connection((host, port), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname=host)
    s.settimeout(5)
    return s


p = Probe("tls_probe", host, port, "tls", connect)
s = connect()
print(f"[tls_probe] connected with {s.version()} {s.cipher()[0]}")
r = Reader(s)
ok = p.register_and_options(s, r)
# A framing error inside TLS closes that connection.
s.sendall(b"THIS IS NOT SIP\r\nX: y\r\n\r\n")
try:
    closed = s.recv(100) == b""
except (ConnectionResetError, ssl.SSLError):
    closed = True
except socket.timeout:
    closed = False
ok &= p.check("TLS connection closed after a framing error", closed, True)
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
ok &= p.options_ok("OPTIONS on a new TLS connection after garbage and a truncated message")
sys.exit(0 if ok else 1)
