"""The symbiont frame protocol (docs/protocol.md) for the example agents, standard library only.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON; binary
fields are base64 strings. The runtime writes frames to the program's stdin:

    {"type": "hello", "agent_id": ..., "protocol_version": 1, ...}     first, once
    {"type": "task", "task_id": ..., "input": B64, "timeout_ms": N,
     "handler": {"name": ..., "trigger": "start"|"message"|"schedule",
                 "topic": ..., "from": ..., "message_id": ...}}       one handler run
    {"type": "deliver", "message": {...}, "kind": ...}                  a plain message
    {"type": "ack" | "error", ...}                                      answers to our frames

and reads the program's frames from its stdout:

    {"type": "output", "task_id": ..., "payload": B64}   one result of a handler run; the
                                                        runtime routes it as the handler's
                                                        `reply` / `send` clause says
    {"type": "task_result", "task_id": ..., "ok": true|false, "output": B64, "error": ...}
    {"type": "log", "level": ..., "message": ...}

Handlers here take the task's decoded input (a JSON document) and the handler description,
and return a list of JSON documents, each sent as one `output` frame. Diagnostics go to
stderr; stdout carries frames only.
"""

import base64
import json
import struct
import sys

MAX_FRAME = 16 * 1024 * 1024


def read_frame(stream=None):
    """The next frame from stdin as a dict, or None at end of input."""
    stream = stream or sys.stdin.buffer
    header = stream.read(4)
    if len(header) < 4:
        return None
    (length,) = struct.unpack(">I", header)
    if length == 0 or length > MAX_FRAME:
        raise ValueError(f"bad frame length {length}")
    body = stream.read(length)
    if len(body) < length:
        return None
    return json.loads(body.decode("utf-8"))


def write_frame(obj, stream=None):
    """Writes one frame to stdout."""
    stream = stream or sys.stdout.buffer
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def b64(data):
    return base64.b64encode(data).decode("ascii")


def unb64(text):
    return base64.b64decode(text.encode("ascii"))


def log(level, message):
    write_frame({"type": "log", "level": level, "message": message})


def _decode(raw):
    if not raw:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return raw.decode("utf-8", errors="replace")


def serve(handlers):
    """Runs handlers until stdin closes.

    `handlers` maps a handler name (e.g. "start", "message:documents", "hourly") or a
    trigger ("start", "message", "schedule", "task") to a function `fn(document, handler)`
    returning a list of JSON documents (each sent as one output of the run).
    """
    hello = read_frame()
    if not hello or hello.get("type") != "hello":
        print(f"expected a hello frame, got {hello!r}", file=sys.stderr)
        return 2
    while True:
        frame = read_frame()
        if frame is None:
            return 0
        kind = frame.get("type")
        if kind == "task":
            handler = frame.get("handler") or {"name": "task", "trigger": "task"}
            name = handler["name"]
            fn = handlers.get(name) or handlers.get(handler.get("trigger", ""))
            task_id = frame["task_id"]
            if fn is None:
                write_frame({"type": "task_result", "task_id": task_id, "ok": False,
                             "error": f"no handler `{name}` in this program"})
                continue
            try:
                for document in fn(_decode(unb64(frame.get("input", ""))), handler) or []:
                    payload = json.dumps(document).encode("utf-8")
                    write_frame({"type": "output", "task_id": task_id, "payload": b64(payload)})
                write_frame({"type": "task_result", "task_id": task_id, "ok": True})
            except Exception as exc:  # report it, keep serving
                print(f"handler {name} failed: {exc}", file=sys.stderr)
                write_frame({"type": "task_result", "task_id": task_id, "ok": False,
                             "error": str(exc)})
        elif kind == "deliver":
            fn = handlers.get("deliver")
            if fn is not None:
                fn(frame["message"], frame.get("kind"))
        elif kind == "error":
            print(f"runtime error {frame.get('code')}: {frame.get('message')}", file=sys.stderr)
