"""Collector: on start, publishes every text file of its inbox as one document."""

import os
import sys

from frames import serve

INBOX = os.environ.get("INBOX", "inbox")


def on_start(_document, _handler):
    documents = []
    for name in sorted(os.listdir(INBOX)):
        path = os.path.join(INBOX, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            documents.append({"name": name, "text": f.read()})
    print(f"collector: {len(documents)} document(s) in {INBOX}", file=sys.stderr)
    return documents


if __name__ == "__main__":
    serve({"start": on_start})
