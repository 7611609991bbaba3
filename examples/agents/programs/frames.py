"""Frame protocol helpers shared by the example agents.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. The
runtime writes one frame per handler run to the program's stdin:

    {"type": "start" | "message" | "schedule", "handler": NAME,
     "topic": TOPIC, "from": SENDER, "payload": ANY}        (topic/from/payload for messages)

and reads the program's answers from its stdout:

    {"type": "output", "handler": NAME, "payload": ANY}  one per result; routed as the
                                                        handler's `reply`/`send` says
    {"type": "done",   "handler": NAME}                 the run is over
    {"type": "error",  "handler": NAME, "error": TEXT}  the run failed

Only the Python standard library is used; stderr is free-form log text.
"""

import json
import struct
import sys


def _read_exact(stream, n):
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_frame(stream=None):
    """The next frame from stdin as a dict, or None at end of input."""
    stream = stream or sys.stdin.buffer
    header = _read_exact(stream, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    body = _read_exact(stream, length)
    if body is None:
        return None
    return json.loads(body.decode("utf-8"))


def write_frame(obj, stream=None):
    """Writes one frame to stdout."""
    stream = stream or sys.stdout.buffer
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def serve(handlers):
    """Runs handlers until stdin closes.

    `handlers` maps a handler name (e.g. "start", "message:documents", "hourly") or its
    kind ("message", "schedule") to a function taking the frame and returning a list of
    payloads.
    """
    while True:
        frame = read_frame()
        if frame is None:
            return
        name = frame.get("handler", "")
        fn = handlers.get(name) or handlers.get(name.split(":", 1)[0])
        if fn is None:
            write_frame({"type": "error", "handler": name, "error": "no such handler"})
            continue
        try:
            for payload in fn(frame) or []:
                write_frame({"type": "output", "handler": name, "payload": payload})
            write_frame({"type": "done", "handler": name})
        except Exception as exc:  # report, keep serving
            print(f"handler {name} failed: {exc}", file=sys.stderr)
            write_frame({"type": "error", "handler": name, "error": str(exc)})
