"""A minimal RTSP server for tests: one MPEG-TS stream over RTP (payload type 33), interleaved on the RTSP connection.

``python tests/rtsp_server.py SOURCE`` listens on a free local port and prints it; one client at a time
may DESCRIBE, SETUP (``RTP/AVP/TCP``, so the client needs ``rtsp_transport=tcp``) and PLAY
``rtsp://127.0.0.1:PORT/live``, after which the bytes of ``SOURCE`` (a FIFO that ``live_media.py`` writes
at real-time pace) are sent as they arrive, seven 188-byte TS packets per RTP packet. When ``SOURCE``
ends, the server closes the connection and exits, as a camera that goes away. Standard library only.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

TS_PACKET, PER_RTP = 188, 7
SDP = ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=live\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=video 0 RTP/AVP 33\r\na=rtpmap:33 MP2T/90000\r\na=control:track0\r\n")


def read_request(conn: socket.socket, pending: bytearray) -> tuple[str, dict[str, str]] | None:
    """The next request line and headers on ``conn`` (None when the client closed it); ``pending`` keeps what was
    read past the request."""
    while b"\r\n\r\n" not in pending:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        pending.extend(chunk)
    head, _, rest = bytes(pending).partition(b"\r\n\r\n")
    pending[:] = rest
    line, *fields = head.decode().split("\r\n")
    return line, {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}


def reply(conn: socket.socket, cseq: str, headers: dict[str, str] | None = None, body: str = "") -> None:
    lines = ["RTSP/1.0 200 OK", f"CSeq: {cseq}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    conn.sendall(("\r\n".join(lines) + "\r\n\r\n" + body).encode())


def send_stream(conn: socket.socket, source: str, channel: int) -> None:
    """``source``'s bytes as RTP packets of whole TS packets, interleaved on ``conn`` (``$``, channel, length)."""
    seq, start, buffer = 0, time.monotonic(), bytearray()
    with open(source, "rb", buffering=0) as f:
        while True:
            chunk = f.read(TS_PACKET * PER_RTP)
            if chunk:
                buffer.extend(chunk)
            while len(buffer) >= TS_PACKET * PER_RTP or (not chunk and len(buffer) >= TS_PACKET):
                n = min(len(buffer) // TS_PACKET, PER_RTP) * TS_PACKET
                stamp = int((time.monotonic() - start) * 90000) & 0xFFFFFFFF
                rtp = struct.pack("!BBHII", 0x80, 33, seq & 0xFFFF, stamp, 0x5EED) + bytes(buffer[:n])
                conn.sendall(struct.pack("!cBH", b"$", channel, len(rtp)) + rtp)
                del buffer[:n]
                seq += 1
            if not chunk:
                return


def serve(source: str, listener: socket.socket) -> None:
    """Answer one client's requests until it has played ``source`` to its end."""
    conn, _ = listener.accept()
    port = listener.getsockname()[1]
    pending, channel = bytearray(), 0
    with conn:
        while (request := read_request(conn, pending)) is not None:
            (method, *_), headers = request[0].split(), request[1]
            cseq = headers.get("cseq", "0")
            if method == "OPTIONS":
                reply(conn, cseq, {"Public": "OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN"})
            elif method == "DESCRIBE":
                reply(conn, cseq, {"Content-Base": f"rtsp://127.0.0.1:{port}/live/",
                                   "Content-Type": "application/sdp"}, SDP)
            elif method == "SETUP":
                transport = headers.get("transport", "")
                if "TCP" not in transport:
                    conn.sendall(f"RTSP/1.0 461 Unsupported Transport\r\nCSeq: {cseq}\r\n\r\n".encode())
                    continue
                channel = int(transport.partition("interleaved=")[2].split("-")[0] or 0)
                reply(conn, cseq, {"Transport": f"RTP/AVP/TCP;unicast;interleaved={channel}-{channel + 1}",
                                   "Session": "1"})
            elif method == "PLAY":
                reply(conn, cseq, {"Session": "1", "Range": "npt=0.000-"})
                send_stream(conn, source, channel)
                return
            else:  # TEARDOWN and anything else
                reply(conn, cseq)
                return


if __name__ == "__main__":
    with socket.create_server(("127.0.0.1", 0)) as server:
        print(server.getsockname()[1], flush=True)
        serve(sys.argv[1], server)
