"""graftkit vs mergekit: the same YAML through `graft merge` and `mergekit-yaml`.

Generates (once, cached in bench/.cache/merge) a bf16 Llama-style base of about 0.5B parameters
and three "fine-tunes" (base + small Gaussian noise), then for linear, ties and dare_ties (and on
request della, model_stock and sce) runs graftkit and mergekit one after the other, each as a
child process, and reports wall time, GB/s of input read, the child's peak RSS (from
/usr/bin/time -v), the ratios, and whether the two outputs agree (linear / ties / model_stock /
sce: element differences within bf16 rounding; dare_ties / della: the same kept share and the
same expected delta, the masks being random).

Page cache: dropped before every run when /proc/sys/vm/drop_caches is writable (root);
otherwise every run reads warm files and the report says so.

    .venv/bin/python bench/merge_vs_mergekit.py [--methods linear,ties,dare_ties,della,model_stock,sce] [--layers 24]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "merge"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def llama_config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "rope_theta": 10000.0}


def shapes(cfg: dict) -> dict[str, tuple]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{proj}.weight"] = (h, h)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def generate(layers: int) -> dict[str, Path]:
    cfg = llama_config(layers)
    folder = CACHE / f"llama-{layers}L"
    names = ["base", "ft0", "ft1", "ft2"]
    paths = {n: folder / n for n in names}
    if all((p / "model.safetensors.index.json").exists() for p in paths.values()):
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    sh = shapes(cfg)
    n_params = sum(torch.Size(s).numel() for s in sh.values())
    print(f"generating base + 3 fine-tunes, {n_params / 1e9:.3f}B parameters each, bf16, in {folder}", flush=True)
    keys = list(sh)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    for n in names:
        paths[n].mkdir(parents=True)
        (paths[n] / "config.json").write_text(json.dumps(cfg, indent=2))
    for s_i, shard_keys in enumerate(shards):
        fname = f"model-{s_i + 1:05d}-of-00002.safetensors"
        g = torch.Generator().manual_seed(s_i)
        base = {}
        for k in shard_keys:
            if k.endswith("norm.weight"):
                base[k] = torch.ones(sh[k], dtype=torch.bfloat16)
            else:
                base[k] = (torch.randn(sh[k], generator=g) * 0.02).to(torch.bfloat16)
        save_file(base, str(paths["base"] / fname), metadata={"format": "pt"})
        for f_i, n in enumerate(names[1:]):
            g = torch.Generator().manual_seed(1000 * (f_i + 1) + s_i)
            ft = {k: (t.float() + torch.randn(t.shape, generator=g) * 0.002).to(torch.bfloat16) for k, t in base.items()}
            save_file(ft, str(paths[n] / fname), metadata={"format": "pt"})
            del ft
        del base
    for n in names:
        wm = {k: f"model-{i + 1:05d}-of-00002.safetensors" for i, ks in enumerate(shards) for k in ks}
        (paths[n] / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return paths


UNWEIGHTED = ("model_stock", "sce")  # methods that take no per-model weight or density
GLOBAL = {"sce": {"select_topk": 0.5}}  # della: density 0.5 with mergekit's default epsilon 0.15
RANDOM = ("dare_ties", "della")


def slices_recipe(paths: dict[str, Path]) -> dict:
    """passthrough with slices: a frankenmerge of 1.25x the layers (ft0's first half, then ft1's last
    three quarters), the layer-stacking recipe of mergekit's README."""
    n = json.loads((paths["ft0"] / "config.json").read_text())["num_hidden_layers"]
    return {"merge_method": "passthrough", "dtype": "bfloat16",
            "slices": [{"sources": [{"model": str(paths["ft0"]), "layer_range": [0, n // 2]}]},
                       {"sources": [{"model": str(paths["ft1"]), "layer_range": [n // 4, n]}]}]}


def recipe(method: str, paths: dict[str, Path]) -> dict:
    if method == "passthrough":
        return slices_recipe(paths)
    models = []
    for i, w in enumerate([0.5, 0.3, 0.2]):
        params = {} if method in UNWEIGHTED else {"weight": w}
        if method not in ("linear", *UNWEIGHTED):
            params["density"] = 0.5
        models.append({"model": str(paths[f"ft{i}"]), "parameters": params})
    cfg = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method != "linear":
        cfg["base_model"] = str(paths["base"])
    if method in GLOBAL:
        cfg["parameters"] = GLOBAL[method]
    return cfg


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str]) -> dict:
    cold = drop_caches()
    start = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{r.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return {"wall_s": wall, "peak_rss_mb": rss_kb / 1024, "cold_cache": cold}


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def compare(method: str, a: Path, b: Path, base: Path | None) -> str:
    """How the two outputs agree (read one key at a time to keep memory low)."""
    ta, tb = load_all(a), load_all(b)
    if set(ta) != set(tb):
        return f"DIFFERENT KEYS ({len(set(ta) ^ set(tb))})"
    if method == "passthrough":  # a copy: every tensor must be identical
        same = sum(bool(torch.equal(ta[k], tb[k])) for k in ta)
        return f"{same} of {len(ta)} tensors identical"
    if method in RANDOM:
        tbase = load_all(base)
        kept_a = kept_b = n = 0
        sum_a = sum_b = 0.0
        for k in ta:
            da, db = ta[k].float() - tbase[k].float(), tb[k].float() - tbase[k].float()
            kept_a += int((da != 0).sum())
            kept_b += int((db != 0).sum())
            sum_a += float(da.abs().sum())
            sum_b += float(db.abs().sum())
            n += da.numel()
        return (f"random masks: changed share {kept_a / n:.4f} vs {kept_b / n:.4f}, mean |delta| "
                f"{sum_a / n:.3e} vs {sum_b / n:.3e} (ratio {sum_a / max(sum_b, 1e-30):.3f})")
    tbase = load_all(base)
    big = n = 0
    err2 = ref2 = 0.0
    for k in ta:
        x, y = ta[k].float(), tb[k].float()
        diff = (x - y).abs()
        ulp = y.abs().clamp_min(1e-30) * 2**-7  # one bf16 ulp (8 bits of mantissa)
        big += int((diff > ulp * 1.01).sum())
        n += x.numel()
        err2 += float((diff.double() ** 2).sum())
        ref2 += float(((y - tbase[k].float()).double() ** 2).sum())
    return (f"{100 * (n - big) / n:.3f}% of elements within 1 bf16 ulp; |ours - theirs| / |merged delta| = "
            f"{(err2 / max(ref2, 1e-30)) ** 0.5:.2e}")


def warm_kernels(methods: list[str]) -> float:
    """graftkit compiles its fused kernels on first use and caches them on disk (numba
    ``cache=True``), as Python caches bytecode. Run each recipe once, untimed, on tiny bf16 models
    of the same layout so the timed runs measure merging, not that one-off compile."""
    tiny = CACHE / "tiny"
    names = ["base", "ft0", "ft1", "ft2"]
    if not all((tiny / n / "model.safetensors").exists() for n in names):
        g = torch.Generator().manual_seed(0)
        for n in names:
            (tiny / n).mkdir(parents=True, exist_ok=True)
            (tiny / n / "config.json").write_text(json.dumps(llama_config(1)))
            save_file({"w": torch.randn(64, 64, generator=g).to(torch.bfloat16)}, str(tiny / n / "model.safetensors"),
                      metadata={"format": "pt"})
    start = time.perf_counter()
    for method in methods:
        if method == "passthrough":  # no fused kernel to compile
            continue
        path = CACHE / "runs" / f"warm_{method}.yml"
        import yaml

        path.write_text(yaml.safe_dump(recipe(method, {n: tiny / n for n in names})))
        out = CACHE / "runs" / f"warm_{method}"
        subprocess.run([str(BIN / "graft"), "merge", str(path), str(out), "--overwrite"], check=True,
                       capture_output=True, env=ENV)
        shutil.rmtree(out, ignore_errors=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="linear,ties,dare_ties")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
    args = ap.parse_args()
    paths = generate(args.layers)
    input_gb_one = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors")) / 1e9
    work = CACHE / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; torch {torch.__version__}")
    warm = warm_kernels(args.methods.split(","))
    print(f"graftkit kernel cache warmed (untimed; includes any first-use compile): {warm:.1f} s")
    rows = []
    for method in args.methods.split(","):
        cfg = recipe(method, paths)
        path = work / f"{method}.yml"
        import yaml

        path.write_text(yaml.safe_dump(cfg))
        n_inputs = len(cfg.get("models", [])) + (1 if "base_model" in cfg else 0)
        if "slices" in cfg:  # the share of a model's layers the slices read
            layers = json.loads((paths["ft0"] / "config.json").read_text())["num_hidden_layers"]
            n_inputs = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in cfg["slices"]) / layers
        gb = input_gb_one * n_inputs
        ours = timed([str(BIN / "graft"), "merge", str(path), str(work / f"gk_{method}")])
        theirs = timed([str(BIN / "mergekit-yaml"), str(path), str(work / f"mk_{method}"), "--lazy-unpickle"])
        agree = compare(method, work / f"gk_{method}", work / f"mk_{method}", paths["base"])
        row = {"method": method, "input_gb": gb, "graftkit": ours, "mergekit": theirs, "agree": agree}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(work / f"gk_{method}")
            shutil.rmtree(work / f"mk_{method}")
    print()
    print("| method | input read (GB) | graftkit wall (s) | mergekit wall (s) | graftkit GB/s | mergekit GB/s | throughput ratio | graftkit peak RSS (MB) | mergekit peak RSS (MB) | RSS ratio | outputs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g, m = r["graftkit"], r["mergekit"]
        print(f"| {r['method']} | {r['input_gb']:.2f} | {g['wall_s']:.1f} | {m['wall_s']:.1f} | {r['input_gb'] / g['wall_s']:.3f} | "
              f"{r['input_gb'] / m['wall_s']:.3f} | {m['wall_s'] / g['wall_s']:.1f}x | {g['peak_rss_mb']:.0f} | {m['peak_rss_mb']:.0f} | "
              f"{g['peak_rss_mb'] / m['peak_rss_mb']:.2f} | {r['agree']} |")
    cold = all(r["graftkit"]["cold_cache"] for r in rows)
    print(f"\npage cache: {'dropped before every run' if cold else 'NOT dropped (no permission): warm-cache numbers'}")


if __name__ == "__main__":
    main()
