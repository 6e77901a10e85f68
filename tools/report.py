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


SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni",
        "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> str:
    """The SIMD flags /proc/cpuinfo reports (the ones kernels are chosen by), e.g. 'avx2 fma'."""
    try:
        with open("/proc/cpuinfo") as f:
            have = next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), set())
    except OSError:
        return "unknown"
    return " ".join(x for x in SIMD if x in have) or "none of " + "/".join(SIMD[:3])


def commit(root: Path, paths=("tiercache", "backends", "planner")) -> str:
    """HEAD's short hash, plus how many files under `paths` differ from it (the engine measured
    is the working tree, which others may be editing)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                              text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [ln for ln in git("status", "--porcelain", "--", *paths).splitlines() if ln]
    return head + (f" + uncommitted changes in {len(dirty)} engine file(s)" if dirty else "")
