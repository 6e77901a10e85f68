"""`tiercache plan` and `tiercache device list|probe`: pure functions plus thin typer commands.

The lead registers them in tiercache/cli.py: `app.add_typer(device_app, name="device")` and
`app.command()(plan)`. Errors are TiercacheError subclasses, printed there as one line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .profiles import DeviceProfile, list_presets, preset, resolve_device
from .units import mb

device_app = typer.Typer(help="Device profiles: presets and a probe of this machine.",
                         no_args_is_help=True)


# -- pure functions ------------------------------------------------------------------------------
def device_rows() -> list[dict]:
    """One row per preset: name, RAM, VRAM, flash at 4 KiB and 1 MiB (1 read in flight)."""
    rows = []
    for name in list_presets():
        p = preset(name)
        rows.append({"name": name, "ram_gb": p.ram_bytes / 1e9, "vram_gb": p.vram_bytes / 1e9,
                     "flash_4k_mb_s": mb(p.flash_bw(4096, 1)),
                     "flash_1m_mb_s": mb(p.flash_bw(1 << 20, 1)),
                     "description": p.description})
    return rows


def format_devices(rows: list[dict]) -> str:
    head = f"{'device':<26}{'RAM':>8}{'VRAM':>8}{'4K MB/s':>9}{'1M MB/s':>9}  description"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<26}{r['ram_gb']:>6.1f}GB{r['vram_gb']:>6.1f}GB"
                     f"{r['flash_4k_mb_s']:>9.0f}{r['flash_1m_mb_s']:>9.0f}  {r['description']}")
    return "\n".join(lines)


def format_profile(p: DeviceProfile) -> str:
    lines = [f"{p.name}: {p.description}",
             f"  RAM {p.ram_bytes / 1e9:.1f} GB, VRAM {p.vram_bytes / 1e9:.1f} GB, runtime "
             f"{mb(p.runtime_overhead_bytes):.0f} MB, memory {p.memory_bw / 1e9:.1f} GB/s, "
             f"copy {p.copy_bw / 1e9:.1f} GB/s, O_DIRECT {'yes' if p.direct_io else 'no'}, "
             f"read-ahead {p.readahead_bytes // 1024} KiB",
             "  flash MB/s (block x reads in flight):"]
    levels = sorted({int(q) for _, q, _ in p.flash})
    blocks = sorted({int(b) for b, _, _ in p.flash})
    lines.append("    " + f"{'block':>9}" + "".join(f"{q:>8}" for q in levels))
    for b in blocks:
        lines.append("    " + f"{_kib(b):>9}" + "".join(f"{mb(p.flash_bw(b, q)):>8.0f}"
                                                        for q in levels))
    for be, c in p.compute.items():
        mv = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in c.get("matvec", {}).items())
        mm = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in c.get("matmul", {}).items())
        lines.append(f"  {be}: matvec GB/s {mv}; matmul GFLOP/s {mm}")
    return "\n".join(lines)


def _kib(b: int) -> str:
    return f"{b // (1 << 20)} MiB" if b >= 1 << 20 else f"{b // 1024} KiB"


def format_plan(plan: dict) -> str:
    """The readable table: memory per region, what streams, predicted speeds."""
    e, p, m = plan["engine"], plan["predicted"], plan["model"]
    mem, how = p["memory"], p["assumes"]
    lines = [f"plan for {m['name']} ({m['params'] / 1e6:.0f}M params, {m['dtype']}, "
             f"{mb(m['weight_bytes']):.0f} MB of weights"
             + (", estimate only" if m.get("estimate_only") else "")
             + f") on {plan['device']}, RAM budget {mb(plan['limits']['ram_bytes']):.0f} MB",
             *_lean_lines(plan), "", f"{'region':<14}{'MB':>9}  where / what"]
    rows = [("runtime", mem["runtime"] + mem["tokenizer"], "python + torch + tokenizer"),
            ("fixed", mem["fixed"] or e["fixed_bytes"],
             f"{how['placement']['attention']}: embeddings, attention, norms"
             + (", gate" if e["gate_pinned"] else "") + f", compute {e['compute']}"),
            ("ffn hot", e["hot_bytes"], f"{how['placement']['ffn_hot']}: {e['hot_clusters']} "
                                        f"clusters pinned, as {e['hold']['ffn']}"),
            ("ffn cold LRU", e["cold_bytes"], f"ram: {e['cold_clusters']} clusters"),
            ("kv cache", e["kv_bytes"], f"{plan['limits']['context']} tokens"),
            ("file pages", mem.get("file_reserve", 0) + mem.get("file_pages", 0),
             "code pages the runtime keeps using (a cgroup counts them)"),
            ("buffers", mem["buffers"] + mem["activations"] + mem["page_cache"],
             "reads in flight, gathered slots, activations (>= 32 MB)"),
            ("peak", p["peak_memory_bytes"], "predicted, as a cgroup counts it")]
    lines += [f"{name:<14}{mb(v):>9.1f}  {what}" for name, v, what in rows]
    lines += ["", f"streams from flash: {mb(p['store_bytes_per_token']):.2f} MB/token in "
                  f"{p['reads_per_token']:.0f} reads of {e['read_cluster_bytes'] / 1024:.1f} KiB "
                  f"({how['io_mode']}, {e['io_threads']} I/O threads, lookahead "
                  f"{e['prefetch_layers']}); hit rate {p['hit_rate']:.1%}",
              f"decode   {p['decode_tok_s']:>8.1f} tok/s  bottleneck {p['bottleneck']:<8}"
              f"backend {how['decode_backend']}",
              f"prefill  {p['prefill_tok_s']:>8.1f} tok/s  ({p['prompt_tokens']}-token prompt, "
              f"{e['prefill_cluster_bytes'] // 1024} KiB reads)  backend {how['prefill_backend']}",
              "", *[f"- {line}" for line in plan["explanation"]]]
    return "\n".join(lines)


def _lean_lines(plan: dict) -> list[str]:
    """On a store the lean runtime takes (what `--ram` alone runs), its figures first: the
    table below is the tiered engine's (what `--plan` runs unless plan["runs"] is lean)."""
    fit = plan.get("lean")
    if not fit or not fit.get("fits"):
        return []
    speed = f"{fit['decode_tok_s']:.1f} tok/s decode (one thread)" if "decode_tok_s" in fit \
        else "speed not modelled"
    reads = mb(fit.get("read_bytes_per_token", 0))
    if plan.get("runs") == "lean":
        return ["", f"runs on the lean runtime (--plan and --ram alone): {speed}, {reads:.1f} "
                    f"MB/token from the store, needs at least {mb(fit['least_bytes']):.0f} MB; "
                    "the table below is the tiered engine's, predicted slower"]
    return ["", f"without --plan: the lean runtime, {speed}, {reads:.1f} MB/token from the "
                f"store, needs at least {mb(fit['least_bytes']):.0f} MB; the table below is "
                "the tiered engine's (--plan)"]


def plot_budget_curve(model, device, path: Path, ram_bytes: int, vram=None,
                      context: int = 2048, active: float | None = None) -> Path:
    """PNG of predicted decode tok/s against the RAM budget, the chosen budget marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kw = {"vram": vram, "context": context, "active": active}
    from .search import sweep  # (its cost model imports torch: not for `tiercache chat`)
    pts = [p for p in sweep(model, device, **kw) if p["decode_tok_s"]]
    pts += [p for p in sweep(model, device, budgets=[ram_bytes], **kw) if p["decode_tok_s"]]
    pts.sort(key=lambda p: p["ram_bytes"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([mb(p["ram_bytes"]) for p in pts], [p["decode_tok_s"] for p in pts], "o-", ms=3,
            label="predicted decode")
    ax.axvline(mb(ram_bytes), color="red", ls="--", label=f"budget {mb(ram_bytes):.0f} MB")
    ax.set_xlabel("RAM budget (MB)")
    ax.set_ylabel("decode tok/s (predicted)")
    ax.set_title(f"{Path(str(model)).name} on {resolve_device(device).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# -- typer commands ------------------------------------------------------------------------------
@device_app.command("list")
def device_list(
        json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List the device presets."""
    rows = device_rows()
    typer.echo(json.dumps(rows, indent=1) if json_out else format_devices(rows))


@device_app.command("probe")
def device_probe(
        out: Annotated[Path | None, typer.Option(help="write the profile JSON here")] = None,
        quick: Annotated[bool, typer.Option(help="a few seconds, rougher figures")] = False,
) -> DeviceProfile:
    """Measure this machine (flash curve, memory, compute, runtime footprint; < 1 minute)."""
    from .probe import home, probe
    prof = probe(quick=quick, path=out.parent if out else None)
    dest = out or home() / "device.json"  # also what `--device this` reads
    prof.to_json(dest)
    typer.echo(format_profile(prof))
    typer.echo(f"wrote {dest}")
    return prof


def plan(
        model: Annotated[str, typer.Argument(help="store directory, HF directory or .gguf")],
        device: Annotated[str, typer.Option(help="preset name, 'this' or a profile JSON")] =
        "this",
        ram: Annotated[str | None, typer.Option(help="RAM budget, e.g. 512M, 1.5G")] = None,
        vram: Annotated[str | None, typer.Option(help="VRAM budget")] = None,
        out: Annotated[Path | None, typer.Option(help="write the plan JSON here")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="print the plan JSON")] = False,
        plot: Annotated[Path | None, typer.Option(help="PNG: decode tok/s vs RAM")] = None,
        min_tok_s: Annotated[float | None, typer.Option(help="refuse below this")] = None,
        context: Annotated[int, typer.Option(help="tokens of KV cache to plan for")] = 2048,
        active: Annotated[float | None, typer.Option(
            help="share of FFN neurons active per token when the model has no profile "
                 "(default 0.5; 1.0 plans a dense run)")] = None,
) -> dict:
    """Plan how to run MODEL on a device within a RAM (and VRAM) budget."""
    from .search import make_plan
    result = make_plan(model, device, ram=ram, vram=vram, min_tok_s=min_tok_s, context=context,
                       active=active)
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    if plot:
        plot_budget_curve(model, device, plot, result["limits"]["ram_bytes"], vram, context,
                          active)
    typer.echo(json.dumps(result, indent=1) if json_out else format_plan(result))
    return result
