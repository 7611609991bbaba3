"""Reporter: keeps a Markdown report of every summary it receives (in its workspace) and
sends the report when asked, on its schedule, or as the result of a task."""

import json
import os

from frames import serve

REPORT = os.environ.get("REPORT", "report.md")
STATE = REPORT + ".json"


def load():
    if os.path.exists(STATE):
        with open(STATE, encoding="utf-8") as f:
            return json.load(f)
    return []


def render(rows):
    lines = [
        "# Document report",
        "",
        "| document | lines | words | characters | top words |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        top = ", ".join(f"{w} ({n})" for w, n in r.get("top_words", []))
        lines.append(f"| {r['name']} | {r['lines']} | {r['words']} | {r['chars']} | {top} |")
    total = sum(r["words"] for r in rows)
    lines += ["", f"{len(rows)} document(s), {total} word(s) in total."]
    return "\n".join(lines) + "\n"


def on_summary(summary, _handler):
    rows = [r for r in load() if r["name"] != summary["name"]]
    rows.append(summary)
    rows.sort(key=lambda r: r["name"])
    with open(STATE, "w", encoding="utf-8") as f:
        json.dump(rows, f)
    with open(REPORT, "w", encoding="utf-8") as f:
        f.write(render(rows))
    return []


def on_report(_document, _handler):
    return [{"report": render(load())}]


if __name__ == "__main__":
    serve({
        "message:summaries": on_summary,
        "message:report-request": on_report,
        "hourly": on_report,
        "task": on_report,  # a task submitted to the reporter returns the report
    })
