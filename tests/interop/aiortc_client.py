"""A cocoon client written from docs/PROTOCOL.md alone, on an independent
WebRTC stack (aiortc): authenticate, open a session over the relay, move it
to a data channel, run a command in a terminal, read its output.

Usage: aiortc_client.py WS_URL ACCESS_TOKEN DEVICE_ID
Prints one line "OK <output> via=<frames on the data channel>/<on the relay>".
"""

import asyncio
import json
import struct
import sys

import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

DATA, ACK, FIN, PING, PONG, SKIP = 1, 2, 3, 4, 5, 6
MAX_DATA = 16384 - 13


def data_frame(stream, offset, payload):
    return bytes([DATA]) + struct.pack(">IQ", stream, offset) + payload


def ack_frame(stream, offset):
    return bytes([ACK]) + struct.pack(">IQ", stream, offset)


class Session:
    def __init__(self, ws, device):
        self.ws = ws
        self.address = device.encode()
        self.channel = None
        self.sent = {0: 0}
        self.received = {}
        self.control = b""
        self.frames = asyncio.Queue()
        self.via = {"channel": 0, "relay": 0}

    async def send_frame(self, frame):
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(frame)
        else:
            await self.ws.send(bytes([len(self.address)]) + self.address + frame)

    async def send_stream(self, stream, payload):
        for start in range(0, len(payload), MAX_DATA):
            chunk = payload[start : start + MAX_DATA]
            offset = self.sent.get(stream, 0)
            await self.send_frame(data_frame(stream, offset, chunk))
            self.sent[stream] = offset + len(chunk)

    async def send_control(self, message):
        body = json.dumps(message).encode()
        await self.send_stream(0, struct.pack(">I", len(body)) + body)

    async def read_relay(self):
        async for message in self.ws:
            if isinstance(message, bytes):
                length = message[0]
                self.via["relay"] += 1
                await self.frames.put(message[1 + length :])

    def on_channel_message(self, message):
        self.via["channel"] += 1
        self.frames.put_nowait(message)

    async def next_event(self):
        """The next control message, or (stream, bytes) of terminal output."""
        while True:
            frame = await self.frames.get()
            kind = frame[0]
            if kind == DATA:
                stream, offset = struct.unpack(">IQ", frame[1:13])
                payload = frame[13:]
                expected = self.received.get(stream, 0)
                if offset <= expected < offset + len(payload):
                    fresh = payload[expected - offset :]
                    self.received[stream] = expected + len(fresh)
                else:
                    fresh = b""
                await self.send_frame(ack_frame(stream, self.received.get(stream, 0)))
                if stream == 0:
                    self.control += fresh
                    if len(self.control) >= 4:
                        (length,) = struct.unpack(">I", self.control[:4])
                        if len(self.control) >= 4 + length:
                            message = json.loads(self.control[4 : 4 + length])
                            self.control = self.control[4 + length :]
                            if self.control:
                                # More messages may be buffered: re-queue a no-op.
                                self.frames.put_nowait(data_frame(0, self.received[0], b""))
                            return message
                elif fresh:
                    return (stream, fresh)
            elif kind == PING:
                await self.send_frame(bytes([PONG]) + frame[1:9])


async def main(url, token, device):
    ws = await websockets.connect(url, max_size=None)
    await ws.send(json.dumps({"type": "authenticate", "access_token": token}))
    reply = json.loads(await ws.recv())
    assert reply["type"] == "authenticated", reply
    session = Session(ws, device)
    asyncio.ensure_future(session.read_relay())

    # No ICE servers: aiortc's default is a public STUN server, which tests
    # must never contact. Host candidates are all it needs here.
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("cocoon", ordered=True)
    opened = asyncio.Event()
    channel.on("open", opened.set)
    channel.on("message", session.on_channel_message)
    await pc.setLocalDescription(await pc.createOffer())
    await session.send_control({"type": "rtc_offer", "sdp": pc.localDescription.sdp})

    output = b""
    exit_code = None
    attached = False
    while exit_code is None:
        if opened.is_set() and not attached:
            session.channel = channel
            attached = True
            await session.send_control(
                {
                    "type": "attach_pty",
                    "command": "echo interop-$((6*7))",
                    "cols": 80,
                    "rows": 24,
                    "request_id": "i1",
                    "stream": 1,
                }
            )
        try:
            event = await asyncio.wait_for(session.next_event(), 0.2)
        except asyncio.TimeoutError:
            continue
        if isinstance(event, tuple):
            output += event[1]
        elif event["type"] == "rtc_answer":
            await pc.setRemoteDescription(RTCSessionDescription(event["sdp"], "answer"))
        elif event["type"] == "rtc_candidate":
            candidate = candidate_from_sdp(event["candidate"].split(":", 1)[1])
            candidate.sdpMid = event.get("sdp_mid")
            candidate.sdpMLineIndex = event.get("sdp_mline_index")
            await pc.addIceCandidate(candidate)
        elif event["type"] == "pty_exited":
            exit_code = event["exit_code"]
        elif event["type"] == "error":
            raise SystemExit(f"error from the worker: {event}")
    print(f"OK {output.decode().strip()} exit={exit_code} via={session.via['channel']}/{session.via['relay']}")
    await pc.close()
    await ws.close()


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(*sys.argv[1:4]), 60))
