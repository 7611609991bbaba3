"""Summarizer: counts lines, words and characters of each document it receives and names
its most frequent words."""

import collections
import os
import re

from frames import serve

TOP_WORDS = int(os.environ.get("TOP_WORDS", "3"))
STOP_WORDS = {"the", "a", "an", "and", "or", "of", "to", "in", "on", "we", "is", "it", "for"}


def on_document(document, _handler):
    doc = document or {}
    text = doc.get("text", "")
    words = re.findall(r"[A-Za-z0-9']+", text)
    counts = collections.Counter(w.lower() for w in words if w.lower() not in STOP_WORDS)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_WORDS]
    return [
        {
            "name": doc.get("name", "?"),
            "lines": len(text.splitlines()),
            "words": len(words),
            "chars": len(text),
            "top_words": [[w, n] for w, n in top],
        }
    ]


if __name__ == "__main__":
    serve({"message:documents": on_document})
