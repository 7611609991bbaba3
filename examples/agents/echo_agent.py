#!/usr/bin/env python3
"""An example symbiont agent in Python, using only the standard library.

It speaks the frame protocol of docs/protocol.md over stdin (frames from the runtime) and
stdout (frames to the runtime): each frame is a 4-byte big-endian length followed by that
many bytes of JSON. Binary payloads are base64 strings.

Behaviour:
  * subscribes to the topic "broadcast";
  * a direct or topic message is echoed back to its sender on topic "echo", with the
    payload prefixed by b"echo:";
  * a request is answered with the payload reversed;
  * a task's result is its input upper-cased;
  * a message on topic "ask" makes the agent send a request to the agent named in the
    payload (UTF-8 agent id) and forward the reply's payload to the original sender on
    topic "answer";
  * every frame handled is followed by a heartbeat.

Nothing but frames may be written to stdout; diagnostics go to stderr.
"""

import base64
import json
import struct
import sys
import uuid

MAX_FRAME = 16 * 1024 * 1024
PROTOCOL_VERSION = 1


def read_frame(stream):
    header = stream.read(4)
    if not header:
        return None
    if len(header) < 4:
        raise EOFError("stream ended inside a frame header")
    (length,) = struct.unpack(">I", header)
    if length == 0 or length > MAX_FRAME:
        raise ValueError(f"bad frame length {length}")
    body = stream.read(length)
    if len(body) < length:
        raise EOFError("stream ended inside a frame body")
    return json.loads(body)


def write_frame(stream, frame):
    body = json.dumps(frame, separators=(",", ":")).encode("utf-8")
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def b64(data):
    return base64.b64encode(data).decode("ascii")


def unb64(text):
    return base64.b64decode(text.encode("ascii"), validate=True)


def new_id():
    return str(uuid.uuid4())


def main():
    inp = sys.stdin.buffer
    out = sys.stdout.buffer
    hello = read_frame(inp)
    if not hello or hello.get("type") != "hello":
        print(f"expected hello, got {hello!r}", file=sys.stderr)
        return 2
    if hello["protocol_version"] != PROTOCOL_VERSION:
        print("unsupported protocol version", file=sys.stderr)
        return 2
    me = hello["agent_id"]
    write_frame(out, {"type": "log", "level": "info", "message": f"python echo agent {me} ready"})
    write_frame(out, {"type": "subscribe", "id": new_id(), "topic": "broadcast"})

    # request id -> (original sender) for the "ask" relay
    relays = {}
    while True:
        frame = read_frame(inp)
        if frame is None:
            return 0
        kind = frame["type"]
        if kind == "deliver":
            msg = frame["message"]
            payload = unb64(msg["payload"])
            if frame["kind"] == "request":
                write_frame(out, {"type": "reply", "id": new_id(),
                                  "in_reply_to": msg["id"], "payload": b64(payload[::-1])})
            elif frame["kind"] == "reply":
                origin = relays.pop(frame.get("in_reply_to"), None)
                if origin is not None:
                    write_frame(out, {"type": "send", "id": new_id(), "to": origin,
                                      "topic": "answer", "payload": b64(payload)})
            elif msg["topic"] == "ask":
                rid = new_id()
                relays[rid] = msg["from"]
                write_frame(out, {"type": "request", "id": rid, "to": payload.decode("utf-8"),
                                  "topic": "question", "payload": b64(b"ping"),
                                  "timeout_ms": 5000})
            else:
                write_frame(out, {"type": "send", "id": new_id(), "to": msg["from"],
                                  "topic": "echo", "payload": b64(b"echo:" + payload),
                                  "priority": msg.get("priority", "normal")})
        elif kind == "task":
            data = unb64(frame["input"])
            write_frame(out, {"type": "task_result", "task_id": frame["task_id"], "ok": True,
                              "output": b64(data.upper())})
        elif kind == "error":
            print(f"runtime error {frame['code']}: {frame['message']}", file=sys.stderr)
            if frame.get("ref_id") in relays:
                origin = relays.pop(frame["ref_id"])
                write_frame(out, {"type": "send", "id": new_id(), "to": origin,
                                  "topic": "answer", "payload": b64(frame["code"].encode())})
        elif kind == "ack":
            pass
        else:
            write_frame(out, {"type": "error", "code": "UNKNOWN_FRAME",
                              "message": f"unknown frame type {kind}"})
        write_frame(out, {"type": "heartbeat"})


if __name__ == "__main__":
    sys.exit(main())
