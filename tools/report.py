"""Benchmark reports: each tool owns one "## " section of BENCHMARKS.md and rewrites only it."""
from __future__ import annotations

import os
from pathlib import Path


def write_section(path: Path, title: str, section: str) -> None:
    """Replace the section headed `title` in `path` (up to the next "## " heading), or append
    it; `section` starts with that heading."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(title)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(title))
        text = text[:start] + section + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    path.write_text(text)


def machine() -> str:
    """This machine in words, e.g. "2-core Intel(R) Xeon(R) Processor"."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{os.cpu_count()}-core {name}"
