"""The VRAM tier on a GPU, side by side with HF transformers on the same weights (issue 13).

    python tools/bench_gpu.py --work /tmp/gpu-bench [--shape 1.1b] [--prompt 1000] [--decode 64]
    python tools/bench_gpu.py --work /tmp/gpu-bench --shape moe     # issue 15: Mixtral, 1/4 VRAM
    python tools/bench_gpu.py --work /tmp/gpu-bench --shape tiny --device cpu   # a smoke run

A random-weight Llama (1.1b: d 2048, 22 layers, F 5632, GQA 32/4, vocab 32000), or Mixtral
(moe: d 1024, 16 layers, 8 experts top-2 of F 3584, GQA 16/4), is written once as float16
safetensors and converted to an f16 store. Each row runs in its own process
(its GPU memory is its own) over the same prompt ids, greedy:

  hf-vram       transformers, eager attention, every weight in VRAM (float16)
  tc-vram       tiercache, --vram holding every weight (the VRAM tier's float16 layers)
  hf-offload    transformers + accelerate device_map="auto", max_memory on the GPU = --share
                of the weights (half; a quarter for moe), the rest offloaded to CPU RAM and
                copied in per use
  tc-half       tiercache, --vram = the same share: the head and the first layers on the GPU,
                the rest computed on the CPU from RAM; a Mixtral's head and every layer's
                trunk (attention, router, KV) on the GPU with the experts that fit, the others'
                routed uses computed on the CPU (vram.HybridMoE)

Reported: prefill tok/s over the prompt, decode tok/s over --decode tokens, the GPU's peak
allocated memory, and whether the greedy tokens equal hf-vram's (float16 on both sides: a
near-tie may flip a late token). The last stdout line is the JSON of every row; --out appends a
section to a Markdown file. Conditions (GPU, CPU, threads, torch) are recorded with it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # d, layers, F, heads, kv heads, vocab, experts (0: a dense Llama)
    "1.1b": (2048, 22, 5632, 32, 4, 32000, 0),
    "moe": (1024, 16, 3584, 16, 4, 32000, 8),
    "tiny": (256, 4, 512, 8, 2, 512, 0),
    "tiny-moe": (256, 4, 512, 8, 2, 512, 4),
}
SHARE = {"moe": 0.25, "tiny-moe": 0.25}  # of the weights in VRAM for the offload rows; else 0.5
ROWS = ("hf-vram", "tc-vram", "hf-offload", "tc-half")


def build(work: Path, shape: str) -> tuple[Path, Path, int]:
    """-> (HF dir, f16 store, weight bytes), made once under work."""
    import torch
    import transformers as T
    d, layers, f, heads, kv, vocab, experts = SHAPES[shape]
    hf, store = work / f"hf-{shape}", work / f"store-{shape}-f16"
    if not (hf / "config.json").exists():
        torch.manual_seed(0)
        common = dict(vocab_size=vocab, hidden_size=d, intermediate_size=f,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=False, torch_dtype="float16")
        cfg = (T.MixtralConfig(**common, num_local_experts=experts, num_experts_per_tok=2)
               if experts else T.LlamaConfig(**common))
        with torch.device("meta"):
            model = T.AutoModelForCausalLM.from_config(cfg)
        model = model.to_empty(device="cpu").half()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02) if p.ndim == 2 else p.fill_(1.0)
        model.save_pretrained(hf)
    if not (store / "manifest.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tiercache.store.convert import convert
        convert(hf, store, dtype="f16", progress=False)
    weights = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    return hf, store, weights


def row_hf(a, ids: list[int]) -> dict:
    import torch
    import transformers as T
    kw = dict(torch_dtype=torch.float16, attn_implementation="eager")
    if a.row == "hf-offload":
        kw.update(device_map="auto", max_memory={0: a.vram, "cpu": 1 << 40})
        model = T.AutoModelForCausalLM.from_pretrained(a.hf, **kw)
        dev = torch.device("cuda")
    else:
        dev = torch.device(a.device)
        model = T.AutoModelForCausalLM.from_pretrained(a.hf, **kw).to(dev)
    model.eval()
    x = torch.tensor([ids], device=dev)
    with torch.inference_mode():
        t0 = _now(dev)
        out = model(x, use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        t1 = _now(dev)
        past, tokens = out.past_key_values, [tok]
        for _ in range(a.decode - 1):
            out = model(torch.tensor([[tok]], device=dev), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens.append(tok)
        t2 = _now(dev)
    return _report(a, dev, len(ids), t1 - t0, t2 - t1, tokens)


def row_tc(a, ids: list[int]) -> dict:
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tiercache  # noqa: F401 - before torch's threads start, as the CLI
    from tiercache.engine.tiered import TierConfig, load_tiered
    from tiercache.store.format import Store
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    eng = load_tiered(Store(a.store), TierConfig(vram_bytes=a.vram, vram_device=a.device,
                                                 context=len(ids) + a.decode + 8, kv="f16"))
    s = eng.new_session()
    with torch.inference_mode():
        t0 = _now(dev)
        tok = int(eng.prefill(s, ids).argmax())
        t1 = _now(dev)
        tokens = [tok]
        for _ in range(a.decode - 1):
            tok = int(eng.decode(s, tok).argmax())
            tokens.append(tok)
        t2 = _now(dev)
    r = _report(a, dev, len(ids), t1 - t0, t2 - t1, tokens)
    r["vram_tier"] = eng.stats()["vram"]
    return r


def _now(dev) -> float:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _report(a, dev, n_prompt: int, prefill_s: float, decode_s: float, tokens: list[int]) -> dict:
    import torch
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    return {"row": a.row, "prefill_tok_s": n_prompt / prefill_s,
            "decode_tok_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 else 0.0,
            "gpu_peak_bytes": peak, "tokens": tokens, "vram_budget": a.vram}


def conditions(device: str) -> dict:
    import torch
    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(l.split(":")[1].split()) for l in f if l.startswith("flags")), set())
    except OSError:
        pass
    return {"gpu": gpu, "cpu": platform.processor() or platform.machine(),
            "cpu_flags": sorted(flags & {"avx2", "fma", "f16c", "avx512f", "amx_tile"}),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--shape", choices=SHAPES, default="1.1b")
    p.add_argument("--prompt", type=int, default=1000)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--out", type=Path, help="append a Markdown section to this file")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--row", help=argparse.SUPPRESS)  # worker: one row, JSON on stdout
    p.add_argument("--hf", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--vram", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.row:
        ids = json.loads(Path(a.ids).read_text())
        print(json.dumps((row_hf if a.row.startswith("hf") else row_tc)(a, ids)))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    hf, store, weights = build(a.work, a.shape)
    vocab = SHAPES[a.shape][5]
    ids_file = a.work / f"ids-{a.prompt}.json"
    ids_file.write_text(json.dumps([(i * 7919) % (vocab - 3) + 3 for i in range(a.prompt)]))
    results = []
    for row in a.rows:
        if a.device != "cuda" and row == "hf-offload":
            continue  # accelerate's offload needs a GPU to offload from
        share = int(weights * SHARE.get(a.shape, 0.5))
        vram = {"hf-vram": 0, "tc-vram": 4 * weights + (1 << 30), "hf-offload": share,
                "tc-half": share}[row]
        cmd = [sys.executable, __file__, "--work", str(a.work), "--row", row, "--hf", str(hf),
               "--store", str(store), "--vram", str(vram), "--ids", str(ids_file),
               "--decode", str(a.decode), "--device", a.device, "--threads", str(a.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        if r.returncode != 0:
            results.append({"row": row, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(_line(results[-1]), flush=True)
    ref = next((r["tokens"] for r in results if r.get("row") == "hf-vram" and "tokens" in r), None)
    for r in results:
        if ref is not None and "tokens" in r:
            r["same_tokens_as_hf_vram"] = r["tokens"] == ref
            r["tokens_agree"] = next((i for i, (x, y) in enumerate(zip(r["tokens"], ref))
                                      if x != y), len(ref))
    res = {"conditions": conditions(a.device), "shape": a.shape, "weight_bytes": weights,
           "prompt": a.prompt, "decode": a.decode, "threads": a.threads, "rows": results}
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n" + markdown(res) + "\n")
    print(json.dumps(res))


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['row']}: failed: {r['error']}"
    return (f"{r['row']}: prefill {r['prefill_tok_s']:.1f} tok/s, decode "
            f"{r['decode_tok_s']:.2f} tok/s, GPU peak {_mib(r['gpu_peak_bytes'])}")


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MiB"


def markdown(res: dict) -> str:
    c = res["conditions"]
    kind = "Mixtral" if SHAPES[res["shape"]][6] else "Llama"
    out = [f"## GPU: tiercache's VRAM tier vs HF transformers ({res['shape']} {kind} shape, f16)",
           "", f"Conditions ({c['date']}): GPU {c['gpu']}, CPU {c['cpu']} ({c['cpus']} CPUs, "
           f"{' '.join(c['cpu_flags'])}), {res['threads']} CPU threads, torch {c['torch']}; "
           f"random weights ({res['weight_bytes'] / 2**30:.2f} GiB), {res['prompt']}-token "
           f"prompt, {res['decode']} greedy tokens, each row in its own process.", "",
           "| row | VRAM budget | prefill tok/s | decode tok/s | GPU peak | tokens equal hf-vram |",
           "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            out.append(f"| {r['row']} | | failed: {r['error'][:80]} | | | |")
            continue
        same = r.get("same_tokens_as_hf_vram")
        agree = "yes" if same else f"first {r.get('tokens_agree', '?')}"
        out.append(f"| {r['row']} | {_mib(r['vram_budget'] or None)} | {r['prefill_tok_s']:.1f} | "
                   f"{r['decode_tok_s']:.2f} | {_mib(r['gpu_peak_bytes'])} | {agree} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
