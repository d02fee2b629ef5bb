"""The adapter family on one budget: parameters vs accuracy, MiniLM on BBC News topics.

Every method trains MiniLM (all-MiniLM-L6-v2) + a new 5-way head with ``graft train``'s loop on
the same class-balanced split of BBC News (``--train`` articles, ``--heldout`` more held out,
seed 0, as ``examples/make_data.py`` draws it), the same number of steps, batch size, sequence
length, schedule (10% warmup, linear decay) and seed. Per method it reports

* trainable parameters, and their share of the base model's (the new head counts as trainable;
  its 1,925 parameters are in every row);
* held-out accuracy after the last step (``graft train``'s own evaluation);
* step time: the median over the logged steps (tokens / tokens-per-second of each step);
* peak RSS: each method runs in its own fresh subprocess, so the high-water mark is its own
  (the whole process: model load, data, training and evaluation).

Then the forward overhead of unmerged bottleneck adapters: the bare model's forward (no
gradients, one batch of ``--batch`` x ``--max-len`` real tokens) against the same model with a
freshly injected Pfeiffer / Houlsby / parallel adapter, median of ``--reps`` timed forwards each,
bare measured before and after (interleaved rounds, in one subprocess).

Methods (``--methods`` picks some; ones not registered are listed as missing): LoRA r=8 on
query/key/value/dense (the example recipe), Houlsby, Pfeiffer, the parallel adapter (s = 4),
Compacter and Compacter++ (n = 4) at reduction factor 16, LN tuning, the unified view's MAM-style
composition (parallel adapter + LoRA r=4 on query/value), and full fine-tuning as the reference.
Learning rates: ``--lr`` (adapters and LoRA, default 2e-3), full fine-tuning 5e-5, LN tuning
``--ln-lr`` (default 1e-2); ``--sweep`` also runs each adapter method at ``--lr2``.

Soft prompts and prefixes (issue 14) on the same task and budget: prompt tuning, P-tuning,
prefix tuning, P-tuning v2 (``--virtual-tokens`` each, default 20) and IAPT (its paper's 4 tokens
per layer), each at its own learning rate from the papers and peft's guides (``SOFT_LR``; the new
head trains at that rate too). A method not registered in this build prints "not available in
this build". For the three methods peft has (prompt tuning, P-tuning, prefix tuning) the same
invocation also runs real peft (``PeftModelForSequenceClassification``) with the same settings:
the same examples in the same order, head initialisation, AdamW groups, schedule, clipping,
recomputed-mask dropout, loss and evaluation (``graft train``'s own functions, in a plain loop),
and prints graftkit/peft step-time and peak-RSS ratios; where peft fails, its row is
"skipped: <peft's error>" and carries no number. ``--jobs 2`` runs two workers at a time (a
method's graftkit and peft runs side by side, under the same load).

    python bench/adapters.py                  # 100 steps, batch 8, 128 tokens (2 epochs; 2-4 minutes a method on 2 cores)
    python bench/adapters.py --threads 1 --jobs 2 --no-overhead --methods prompt_tuning p_tuning prefix_tuning p_tuning_v2 iapt
    python bench/adapters.py --quick          # 10 steps on 40/40 articles, 64 tokens: a check that it runs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from _measure import cpu_name, peak_rss_mb

LORA = {"method": "lora", "r": 8, "lora_alpha": 16, "targets": ["query", "key", "value", "dense"]}
BOTTLENECK = {"reduction_factor": 16}
METHODS = {
    "lora": LORA,
    "houlsby": {"method": "houlsby", **BOTTLENECK},
    "pfeiffer": {"method": "pfeiffer", **BOTTLENECK},
    "parallel_adapter": {"method": "parallel_adapter", **BOTTLENECK},
    "compacter_pp": {"method": "compacter_pp", **BOTTLENECK, "phm_dim": 4},
    "ln_tuning": {"method": "ln_tuning"},
    "compacter": {"method": "compacter", **BOTTLENECK, "phm_dim": 4},
    "mam": {"method": "compose", "methods": [{"method": "parallel_adapter", **BOTTLENECK},
                                             {"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["query", "value"]}]},
    "full": {"method": "full"},
    # soft prompts and prefixes (num_virtual_tokens from --virtual-tokens, see method_config); prompt
    # tuning starts from sampled vocabulary embeddings (Lester et al.'s better start than random, and
    # one peft has: SAMPLE_VOCAB, so both sides start alike)
    "prompt_tuning": {"method": "prompt_tuning", "init": "vocab"},
    "p_tuning": {"method": "p_tuning"},  # peft's default MLP prompt encoder, hidden width = d on both sides
    "prefix_tuning": {"method": "prefix_tuning"},  # no MLP, as peft's default
    "p_tuning_v2": {"method": "p_tuning_v2", "preset": "simple"},  # the paper's classification options: dropout 0.1 on the prefix
    "iapt": {"method": "iapt", "num_virtual_tokens": 4, "bottleneck": 16},  # the paper's 4 tokens per layer (not --virtual-tokens)
    # weight-space methods (issue 15); GreenTrainer in place at full fine-tuning's rate, half the backward FLOPs
    "greentrainer": {"method": "greentrainer", "flops_budget": 0.5},
    # P8: random-subspace tuning, z of d = 1000 through a Fastfood projection of every encoder parameter (SAID's setup;
    # the new head trains whole at z's rate here, the probe freezes it: graft probe intrinsic-dim)
    "subspace": {"method": "subspace", "d": 1000},
    # LoHa / LoKr at peft's defaults (r 8, alpha 8) on LoRA's targets; FourierFT as the paper's GLUE runs
    # (n 1000 on query/value, peft's default scaling 150)
    "loha": {"method": "loha", "r": 8, "alpha": 8, "targets": ["query", "key", "value", "dense"]},
    "lokr": {"method": "lokr", "r": 8, "alpha": 8, "targets": ["query", "key", "value", "dense"]},
    "fourierft": {"method": "fourierft", "n_frequency": 1000, "scaling": 150.0, "targets": ["query", "value"]},
    # FLoRA r 8 per mode on LoRA's targets, the authors' example scale 4; DSEE as LoRA (r 8, alpha 16) plus the authors'
    # 64 sparse entries per weight (--num_sparse 64) at magnitude-chosen places, and with the README's pruning ratio 0.5
    "flora": {"method": "flora", "r": 8, "scale": 4.0, "targets": ["query", "key", "value", "dense"]},
    "dsee": {"method": "dsee", "r": 8, "lora_alpha": 16, "num_sparse": 64, "targets": ["query", "key", "value", "dense"]},
    "dsee_pruned": {"method": "dsee", "r": 8, "lora_alpha": 16, "num_sparse": 64, "prune": 0.5,
                    "targets": ["query", "key", "value", "dense"]},
    # AdaLoRA at peft's defaults (init_r 12 -> target_r 8, its docstring's lora_alpha 32) on LoRA's targets, with the
    # schedule of peft's docstring example (tinit 10%, tfinal 20% of the steps: adalora_schedule); total_step = the run's steps
    "adalora": {"method": "adalora", "init_r": 12, "target_r": 8, "lora_alpha": 32, "targets": ["query", "key", "value", "dense"]},
    # Light-PEFT: LoRA's row, pruned after 10% of the steps: a quarter of the heads and half the FFN neurons (the paper
    # reports over 40% of the foundation model pruned), a quarter of the LoRA modules and half of the remaining ranks
    # (the paper: trainable parameters at 25% of the PEFT method's)
    "light_peft": {**LORA, "method": "light_peft", "head_prune_ratio": 0.25, "ffn_prune_ratio": 0.5, "module_prune_ratio": 0.25,
                   "rank_prune_ratio": 0.5, "prune_fraction": 0.1},
    # OFT / BOFT at peft's defaults (OFT: blocks of 32, Cayley-Neumann; BOFT: blocks of 4, one butterfly factor, which is
    # all peft builds without its CUDA extension) on LoRA's targets, at the adapters' --lr
    "oft": {"method": "oft", "oft_block_size": 32, "targets": ["query", "key", "value", "dense"]},
    "boft": {"method": "boft", "boft_block_size": 4, "targets": ["query", "key", "value", "dense"]},
    # P2: VeRA at peft's default r (256) on the paper's query/value; DEFT = LoRA's row + the authors' density loss (weight 1, eps 1e-7)
    "vera": {"method": "vera", "r": 256, "targets": ["query", "value"]},
    "deft": {**LORA, "method": "deft", "density_weight": 1.0},
    # P5: LoRA's row with PiSSA / OLoRA / EVA starts, at LoRA's rate as the papers compare them (EVA: its default start on
    # the first 4 micro-batches; peft's side gets the same batches through initialize_lora_eva_weights). EVA leaves out the
    # pooler: it sees one vector per sequence, too few rows for peft's incremental SVD, whose loop would then never end
    "lora+pissa": {**LORA, "init_lora_weights": "pissa"},
    "lora+olora": {**LORA, "init_lora_weights": "olora"},
    "lora+eva": {**LORA, "targets": ["query", "key", "value", "output.dense", "intermediate.dense"], "init_lora_weights": "eva"},
    # P7: sparse fine-tuning over every tensor at the composable-sft code's default density (1% of the entries; its
    # "Random" mask is APET's, at the adapters' --lr); LT-SFT's two halves at full fine-tuning's rate (that code trains both
    # phases at it); diff pruning to the paper's 0.5% with the projection at mid-run, then the kept entries fine-tuned (the
    # paper's stage 3), at full fine-tuning's rate (the authors' scripts: 1e-5 for the gated stage, 5e-5 for the last)
    "lt_sft": {"method": "lt_sft", "fraction": 0.01},
    "apet": {"method": "apet", "fraction": 0.01},
    "diff_pruning": {"method": "diff_pruning", "target_sparsity": 0.005, "project_at": 0.5},
}
#: the soft-prompt rows (their own learning rates, and the peft comparison where peft has the method)
SOFT = ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2", "iapt")
#: peft 0.21's config class and options for the same method (PeftModelForSequenceClassification)
PEFT = {"vera": ("VeraConfig", {"r": 256, "target_modules": ["query", "value"]}),
        "prompt_tuning": ("PromptTuningConfig", {"prompt_tuning_init": "SAMPLE_VOCAB"}),
        "p_tuning": ("PromptEncoderConfig", {"encoder_reparameterization_type": "MLP"}),
        "prefix_tuning": ("PrefixTuningConfig", {"prefix_projection": False}),
        "loha": ("LoHaConfig", {"r": 8, "alpha": 8, "target_modules": ["query", "key", "value", "dense"]}),
        "lokr": ("LoKrConfig", {"r": 8, "alpha": 8, "target_modules": ["query", "key", "value", "dense"]}),
        "fourierft": ("FourierFTConfig", {"n_frequency": 1000, "scaling": 150.0, "target_modules": ["query", "value"]}),
        # total_step is added per run (the recipe's steps); the worker calls update_and_allocate and takes peft's
        # loss (cross-entropy + orthogonality), as peft's AdaLoRA guide trains it
        "adalora": ("AdaLoraConfig", {"init_r": 12, "target_r": 8, "lora_alpha": 32, "target_modules": ["query", "key", "value", "dense"]}),
        "oft": ("OFTConfig", {"oft_block_size": 32, "target_modules": ["query", "key", "value", "dense"]}),
        "boft": ("BOFTConfig", {"boft_block_size": 4, "target_modules": ["query", "key", "value", "dense"]}),
        **{f"lora+{init}": ("LoraConfig", {"r": 8, "lora_alpha": 16, "target_modules": METHODS[f"lora+{init}"]["targets"],
                                           "init_lora_weights": init}) for init in ("pissa", "olora", "eva")}}
#: EVA's start (both sides): the first micro-batches of the run's order (graftkit's eva_config.batches default)
EVA_BATCHES = 4


def adalora_schedule(steps: int) -> dict:
    """AdaLoRA's warm-up and final phases for a run of ``steps`` (peft's docstring example: 10 and 20 of 100)."""
    return {"tinit": steps // 10, "tfinal": steps // 5}


def method_config(m: str, a) -> dict:
    """The recipe's ``method:`` for ``m``; a soft-prompt method gets ``--virtual-tokens`` (peft the same number)."""
    if m == "adalora":
        return {**METHODS[m], **adalora_schedule(a.steps)}
    return {**METHODS[m], "num_virtual_tokens": a.virtual_tokens} if m in SOFT and m != "iapt" else METHODS[m]
LABELS = {"lt_sft": "LT-SFT (1% of entries, half full FT)", "apet": "APET (random 1% of entries)",
          "diff_pruning": "diff pruning (L0 gates, 0.5% kept)", "subspace": "random subspace d=1000 (Fastfood, all parameters)",
          "vera": "VeRA r=256 (q/v)", "deft": "DEFT: LoRA r=8 + density loss (w=1)",
          "full": "full fine-tuning", "lora": "LoRA r=8 (q/k/v/dense)", "houlsby": "Houlsby (rf 16)", "pfeiffer": "Pfeiffer (rf 16)",
          "parallel_adapter": "parallel adapter (rf 16, s=4)", "compacter": "Compacter (rf 16, n=4)",
          "compacter_pp": "Compacter++ (rf 16, n=4)", "ln_tuning": "LN tuning", "mam": "MAM: parallel adapter + LoRA r=4 (q/v)",
          "prompt_tuning": "prompt tuning (vocab init)", "p_tuning": "P-tuning (MLP encoder)",
          "prefix_tuning": "prefix tuning (no MLP)", "p_tuning_v2": "P-tuning v2 (prefix dropout 0.1)",
          "iapt": "IAPT (4 tokens per layer, bottleneck 16)", "flora": "FLoRA r=8 per mode (q/k/v/dense, scale 4)", "dsee": "DSEE r=8 + 64 sparse (q/k/v/dense)",
          "dsee_pruned": "DSEE r=8 + 64 sparse, final weight 50% pruned", "greentrainer": "GreenTrainer (50% of the backward FLOPs)",
          "oft": "OFT b=32 (q/k/v/dense, Cayley-Neumann)", "boft": "BOFT b=4 (q/k/v/dense)",
          "adalora": "AdaLoRA r 12->8 (q/k/v/dense)",
          "light_peft": "Light-PEFT: LoRA r=8, heads -25%, FFN -50%, modules -25%, ranks -50% at 10%",
          "lora+pissa": "LoRA r=8 (q/k/v/dense), PiSSA start", "lora+olora": "LoRA r=8 (q/k/v/dense), OLoRA start",
          "lora+eva": "LoRA r=8 (q/k/v/dense but the pooler), EVA start (4 batches)",
          "loha": "LoHa r=8 (q/k/v/dense)", "lokr": "LoKr r=8 (q/k/v/dense)", "fourierft": "FourierFT n=1000 (q/v, scaling 150)"}


def write_data(folder: Path, n_train: int, n_heldout: int) -> tuple[Path, Path]:
    from graftkit.data import bbc_news, stratified_split, text_key

    train, held = stratified_split(bbc_news(), (n_train, n_heldout), seed=0, key=lambda e: text_key(e[0]))
    paths = []
    for name, rows in (("train", train), ("heldout", held)):
        p = folder / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y, *_ in rows))
        paths.append(p)
    return paths[0], paths[1]


def recipe(method: dict, lr: float, a, train: Path, held: Path, out: Path) -> dict:
    return {"model": "minilm", "task": "classification",
            "data": {"train": str(train), "validation": str(held), "max_length": a.max_len},
            "method": method, "optim": {"lr": lr, "batch_size": a.batch, "max_steps": a.steps, "warmup_ratio": 0.1,
                                        "schedule": "linear", "seed": 0},
            "eval": {"every": None, "at_start": False, "batch_size": 64}, "output": {"dir": str(out), "log_every": 1}}


def train_worker(spec: dict) -> dict:
    """One method in this (fresh) process: ``graft train``'s loop, its summary and metrics."""
    import torch
    from rich.console import Console

    torch.set_num_threads(spec["threads"])
    from graftkit.train import parse_recipe, train

    out = Path(spec["recipe"]["output"]["dir"])
    summary = train(parse_recipe(spec["recipe"]), console=Console(stderr=True, highlight=False), progress=spec["progress"])
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["tokens"] / r["tokens_per_s"] for r in steps if r.get("tokens_per_s")]
    import graftkit as gk

    total = sum(p.numel() for p in gk.load_model("minilm").parameters())  # the base encoder, no head
    return {"trainable": summary["trainable_parameters"], "base_params": total, "accuracy": summary.get("val_accuracy"),
            "val_loss": summary.get("val_loss"), "first_loss": summary["first_loss"], "final_loss": summary["final_loss"],
            "step_s": statistics.median(times[1:] or times), "peak_rss_mb": peak_rss_mb(), "seconds": summary["seconds"],
            "method_report": summary.get("method_report")}


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def peft_worker(spec: dict) -> dict:
    """The same run with real peft's method instead of graftkit's: the same examples, order,
    padding, head initialisation, AdamW groups, schedule, clipping, dropout kernel, loss and
    evaluation as ``graft train`` (its own functions), in a plain loop around peft's model."""
    import torch

    torch.set_num_threads(spec["threads"])
    import peft
    from rich.console import Console

    import graftkit as gk
    from graftkit.train import parse_recipe
    from graftkit.train.data import Order, collate, prepare
    from graftkit.train.dropout import use_fast_dropout
    from graftkit.train.loop import _adamw, _schedule, param_groups

    Console(stderr=True).print(f"peft {peft.__version__}: {spec['peft'][0]}({spec['peft'][1]})")
    r = parse_recipe(spec["recipe"])
    o = r.optim
    tok = gk.load_tokenizer(r.model)
    torch.manual_seed(o.seed)  # graft train's order: seed, load the model with its new head, then the method
    data = prepare(r, tok, None)  # data.max_length (128) is within MiniLM's 512 positions, prompt included
    torch.manual_seed(o.seed)
    labels = data.labels
    model = gk.load_model(r.model, head="classification", num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={l: i for i, l in enumerate(labels)})
    cls, options = spec["peft"]
    order = Order(len(data.train), o.batch_size, 1, 0, o.seed)
    pad = tok.pad_token_id
    try:
        model = peft.get_peft_model(model, getattr(peft, cls)(task_type="SEQ_CLS", **options))
        if options.get("init_lora_weights") == "eva":  # peft's data-driven start, on graft train's first micro-batches
            from peft.tuners.lora.eva import initialize_lora_eva_weights

            starts = [collate([data.train[i] for i in order.micro_batch(k)], pad) for k in range(EVA_BATCHES)]
            initialize_lora_eva_weights(model, [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in starts],
                                        show_progress_bar=False)
    except Exception as exc:  # peft's own failure is the result: reported, never replaced by a number
        return {"skipped": one_line(exc)}
    use_fast_dropout(model)  # graft train's CPU dropout on both sides: the methods differ, not the dropout kernel
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = _adamw(param_groups(r, model, named), o)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(r, o.max_steps))
    torch.manual_seed(o.seed)  # the dropout stream, as graft train reseeds before its first step
    times, losses = [], []
    t_run = time.perf_counter()
    for step in range(o.max_steps):
        t = time.perf_counter()
        model.train()
        batch = collate([data.train[i] for i in order.micro_batch(step)], pad)
        adaptive = cls == "AdaLoraConfig"  # peft adds AdaLoRA's orthogonality loss to the model's own loss
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **({"labels": batch["labels"]} if adaptive else {}))
            logits = out.logits.float()
        except Exception as exc:
            if step:
                raise
            return {"skipped": one_line(exc)}
        loss = out.loss if adaptive else torch.nn.functional.cross_entropy(logits, batch["labels"])
        loss.backward()
        value = float(loss.detach())
        if o.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in named], o.max_grad_norm)
        optimizer.step()
        scheduler.step()
        if adaptive:  # the rank allocation, after the step and before the gradients go (peft's AdaLoRA guide)
            model.base_model.update_and_allocate(step + 1)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(value)
    seconds = time.perf_counter() - t_run
    model.eval()
    loss_sum = correct = n = 0
    with torch.no_grad():
        for i in range(0, len(data.validation), r.eval.batch_size):
            batch = collate(data.validation[i:i + r.eval.batch_size], pad)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            n += len(batch["labels"])
    total = sum(p.numel() for p in gk.load_model(r.model).parameters())
    return {"trainable": sum(p.numel() for _, p in named), "base_params": total, "accuracy": correct / max(n, 1),
            "val_loss": loss_sum / max(n, 1), "first_loss": losses[0], "final_loss": losses[-1],
            "step_s": statistics.median(times[1:] or times), "peak_rss_mb": peak_rss_mb(), "seconds": round(seconds, 2)}


def overhead_worker(spec: dict) -> dict:
    """Median forward time of the bare model and of the model with each unmerged adapter."""
    import torch

    torch.set_num_threads(spec["threads"])
    import graftkit as gk
    from graftkit.data import bbc_news

    tok = gk.load_tokenizer("minilm")
    texts = [t for t, *_ in bbc_news()[:: 2225 // spec["batch"]][: spec["batch"]]]
    enc = tok(texts, truncation=True, max_length=spec["max_len"], padding="max_length", return_tensors="pt")
    model = gk.load_model("minilm").eval()

    def timed() -> float:
        with torch.no_grad():
            model(**enc)  # warm-up
            ts = []
            for _ in range(spec["reps"]):
                t = time.perf_counter()
                model(**enc)
                ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    out: dict[str, list[float]] = {"bare": []}
    for _ in range(spec["rounds"]):  # bare and adapted interleaved, so drift on the machine hits both
        out["bare"].append(timed())
        for name in spec["methods"]:
            gk.inject(model, {"method": name, **BOTTLENECK})
            out.setdefault(name, []).append(timed())
            gk.unload(model, merge=False)  # an activation adapter has no weights to fold in
    out["bare"].append(timed())
    return {k: statistics.median(v) for k, v in out.items()}


def run_worker(kind: str, spec: dict) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)], stdout=subprocess.PIPE, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(line[-1][len("RESULT "):])


#: the soft prompts' learning rates (AdamW, both sides; the new head trains at the same rate), from
#: the papers and peft's guides, not tuned here: prompt tuning 3e-2 (Lester et al. train prompts at
#: 0.3 with Adafactor; peft's prompt-tuning guide uses 3e-2 with AdamW), P-tuning 1e-3 (peft's
#: P-tuning sequence-classification guide), prefix tuning and P-tuning v2 1e-2 (peft's prefix-tuning
#: guide; P-tuning v2's scripts use 5e-3 to 1e-2 on BERT-size encoders), IAPT 2e-3 (the adapters'
#: rate: its generator is a bottleneck network; the paper's rate is not in the text available here)
#: a weight-space method's own learning rate where --lr (the adapters' 2e-3) does not suit it, from its
#: paper or peft's docs (each entry says where); the peft side runs at the same rate
METHOD_LR: dict[str, float] = {
    # VeRA 2e-2: the vectors' rate of peft's VeRA sequence-classification example (examples/sequence_classification/VeRA.ipynb,
    # vera_lr; its head trains at 1e-2, here it shares 2e-2)
    "vera": 2e-2,
    # FourierFT 5e-2: the spectrum's rate of the paper's RoBERTa-base SST-2 / MRPC runs (its repository's
    # experiments/GLUE/sst2-base-best.sh; the paper trains the head at 6e-3, here it shares the 5e-2)
    "fourierft": 5e-2,
    # subspace 1e-2: graftkit.train.probe.SUBSPACE_LR (an Adam step moves theta by about lr*sqrt(d): at d = 1000 about as
    # far as full fine-tuning's 5e-5 on MiniLM's 22.7M parameters); neither paper gives an AdamW rate
    "subspace": 1e-2,
}
SOFT_LR = {"prompt_tuning": 3e-2, "p_tuning": 1e-3, "prefix_tuning": 1e-2, "p_tuning_v2": 1e-2, "iapt": 2e-3}
PEFT_HEADER = ("| method | graftkit: held-out acc. / step (s) / peak RSS (MB) | peft: trainable / held-out acc. / step (s) / peak RSS (MB) "
               "| step time graftkit/peft | peak RSS graftkit/peft |\n|---|---|---|---|---|")


def peft_row(m: str, g: dict, q: dict) -> str:
    """One method side by side; a peft failure prints as peft's one-line error, with no numbers."""
    gk = "failed" if "error" in g else f"{g['accuracy']:.3f} / {g['step_s']:.3f} / {g['peak_rss_mb']:.0f}"
    if "skipped" in q or "error" in q:
        return f"| {LABELS[m]} | {gk} | skipped: {q.get('skipped') or q['error']} | | |"
    pq = f"{q['trainable']:,} / {q['accuracy']:.3f} / {q['step_s']:.3f} / {q['peak_rss_mb']:.0f}"
    if "error" in g:
        return f"| {LABELS[m]} | {gk} | {pq} | | |"
    return f"| {LABELS[m]} | {gk} | {pq} | {g['step_s'] / q['step_s']:.2f} | {g['peak_rss_mb'] / q['peak_rss_mb']:.2f} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--train", type=int, default=400, help="training articles (class-balanced)")
    p.add_argument("--heldout", type=int, default=200, help="held-out articles (class-balanced, disjoint)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of LoRA and the adapters")
    p.add_argument("--lr2", type=float, default=5e-4, help="the second learning rate of --sweep")
    p.add_argument("--ln-lr", type=float, default=1e-2, help="learning rate of LN tuning")
    p.add_argument("--full-lr", type=float, default=5e-5, help="learning rate of full fine-tuning")
    p.add_argument("--sweep", action="store_true", help="also run every adapter method at --lr2 and keep the better held-out accuracy")
    p.add_argument("--virtual-tokens", type=int, default=20, help="num_virtual_tokens of every soft-prompt method (graftkit and peft)")
    for m in SOFT:
        p.add_argument(f"--{m.replace('_', '-')}-lr", type=float, default=SOFT_LR[m], help=f"learning rate of {m} (peft too)")
    p.add_argument("--jobs", type=int, default=1, help="workers run at a time (each with --threads torch threads)")
    p.add_argument("--no-peft", action="store_true", help="skip the peft side of the methods peft has")
    p.add_argument("--reps", type=int, default=7, help="timed forwards per overhead measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved bare/adapted rounds of the overhead measurement")
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads per worker (on a machine shared with other jobs 1 is faster and steadier)")
    p.add_argument("--quick", action="store_true", help="10 steps, 40/40 articles, batch 8, 64 tokens, 1 overhead round")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        fn = {"train": train_worker, "peft": peft_worker, "overhead": overhead_worker}[a.worker[0]]
        print("RESULT " + json.dumps(fn(json.loads(a.worker[1]))), flush=True)
        return
    if a.quick:
        a.steps, a.train, a.heldout, a.batch, a.max_len, a.rounds, a.reps = 10, 40, 40, 8, 64, 1, 3

    import torch
    import transformers

    import graftkit.methods  # noqa: F401  (registers the methods)
    from graftkit.registry import METHODS as REGISTERED

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {a.threads} torch thread(s) per worker; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; load average before: {os.getloadavg()[0]:.1f}")
    print(f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}")
    print(f"budget per method: {a.steps} steps x batch {a.batch} x {a.max_len} tokens; BBC News {a.train} train / {a.heldout} held out; "
          f"lr {a.lr:g} (LN tuning {a.ln_lr:g}, full {a.full_lr:g}){f', sweep also {a.lr2:g}' if a.sweep else ''}", flush=True)
    if any(m in SOFT for m in a.methods):
        print(f"soft prompts: num_virtual_tokens {a.virtual_tokens} (IAPT: {METHODS['iapt']}, the paper's 4 per layer); lr "
              + ", ".join(f"{m} {getattr(a, m + '_lr'):g}" for m in SOFT) + "; the head trains at the method's lr; seed 0; "
              f"fp32; graft train's recomputed-mask CPU dropout on both sides; "
              f"{a.threads} torch thread(s); peft: {'off' if a.no_peft else 'the same settings, options ' + json.dumps(PEFT)}; "
              "BERT's pooler reads [CLS] in graftkit (pool: real, its default) and the first virtual token in peft", flush=True)
    print(flush=True)
    folder = Path(tempfile.mkdtemp())
    train_path, held_path = write_data(folder, a.train, a.heldout)
    need = lambda m: METHODS[m]["method"] if METHODS[m]["method"] != "compose" else "compose"  # noqa: E731
    missing = [m for m in a.methods if need(m) not in REGISTERED]
    peft_rows: dict[str, dict] = {}
    rows = {}
    header = ("| method | trainable params | % of base | held-out accuracy | lr | step time (s) | peak RSS (MB) |\n"
              "|---|---|---|---|---|---|---|")

    def row(m: str, r: dict, side: str = "") -> str:
        if "error" in r or "skipped" in r:
            return f"| {side}{LABELS[m]} | {'failed (' + r['error'] + ')' if 'error' in r else 'skipped: ' + r['skipped']} | | | | | |"
        return (f"| {side}{LABELS[m]} | {r['trainable']:,} | {100 * r['trainable'] / r['base_params']:.3f}% | {r['accuracy']:.3f} | {r['lr']:g} | "
                f"{r['step_s']:.3f} | {r['peak_rss_mb']:.0f} |")

    print(header, flush=True)
    jobs = []  # (method, lr or "peft", worker kind, spec), in the order they start
    for m in [m for m in a.methods if m not in missing]:
        lr = {"full": a.full_lr, "greentrainer": a.full_lr, "lt_sft": a.full_lr, "diff_pruning": a.full_lr, "ln_tuning": a.ln_lr, **METHOD_LR,
              **{k: getattr(a, k + "_lr") for k in SOFT}}.get(m, a.lr)
        for lr_ in [lr] + ([a.lr2] if a.sweep and m not in ("full", "ln_tuning", *SOFT) else []):
            jobs.append((m, lr_, "train", {"recipe": recipe(method_config(m, a), lr_, a, train_path, held_path, folder / f"{m}-{lr_:g}"),
                                           "progress": a.jobs == 1, "threads": a.threads}))
        if m in PEFT and not a.no_peft:  # the same recipe (lr, steps, batch, seed, threads, tokens) through peft
            cls, options = PEFT[m]
            jobs.append((m, "peft", "peft", {"recipe": recipe(method_config(m, a), lr, a, train_path, held_path, folder / f"{m}-peft"),
                                             "threads": a.threads,
                                             "peft": [cls, {**options, **({"num_virtual_tokens": a.virtual_tokens} if m in SOFT else {}),
                                                            **({"total_step": a.steps, **adalora_schedule(a.steps)} if cls == "AdaLoraConfig" else {})}]}))
    results: dict[tuple, dict] = {}

    def start(job: tuple) -> dict:
        m, lr_, kind, spec = job
        print(f"== {'peft ' if kind == 'peft' else ''}{LABELS[m]}, lr {spec['recipe']['optim']['lr']:g}", file=sys.stderr, flush=True)
        return {**run_worker(kind, spec), "lr": spec["recipe"]["optim"]["lr"]}

    # --jobs 2: two workers at a time (each with --threads), so a method's graftkit and peft runs share the machine alike
    with ThreadPoolExecutor(a.jobs) as pool:
        running = {pool.submit(start, job): job for job in jobs}
        for done in as_completed(running):
            m, lr_, kind, _ = running[done]
            results[(m, lr_)] = done.result()
            # as each run ends: a long run stopped early keeps its rows
            print(row(m, results[(m, lr_)], "" if kind == "train" else "peft: "), flush=True)
    for m, lr_, kind, _ in jobs:
        res = results[(m, lr_)]
        if kind == "peft":
            peft_rows[m] = res
            continue
        best = rows.get(m)  # --sweep: the better held-out accuracy of the two rates
        if best is None or ("error" in best and "error" not in res) or (
                "error" not in res and (res["accuracy"] or 0) > (best["accuracy"] or 0)):
            rows[m] = res
    print("\n" + header)
    for m, r in rows.items():
        print(row(m, r))
    for m in missing:
        print(f"| {LABELS[m]} | {'not available in this build' if m in SOFT else 'not registered'} | | | | | |")
    for m, r in rows.items():  # what a method reports of its own run (sparsity, FLOPs or parameters saved, ...)
        if r.get("method_report"):
            print(f"{LABELS[m]}: {json.dumps(r['method_report'])}")
    if peft_rows:
        from importlib.metadata import version

        print(f"\ngraftkit vs peft {version('peft')}, same settings:\n{PEFT_HEADER}")
        for m, r in peft_rows.items():
            print(peft_row(m, rows[m], r))
    result = {"rows": rows, "missing": missing, "peft": peft_rows}
    if not a.no_overhead:
        names = [n for n in ("pfeiffer", "houlsby", "parallel_adapter") if n in REGISTERED]
        print(f"\nforward overhead of unmerged adapters (batch {a.batch} x {a.max_len}, median of {a.reps} forwards, {a.rounds} rounds):",
              flush=True)
        ov = run_worker("overhead", {"methods": names, "batch": a.batch, "max_len": a.max_len, "reps": a.reps, "rounds": a.rounds,
                                     "threads": a.threads})
        if "error" in ov:
            print(f"  failed ({ov['error']})")
        else:
            print(f"  bare model: {ov['bare'] * 1000:.1f} ms")
            for n in names:
                print(f"  {n}: {ov[n] * 1000:.1f} ms ({100 * (ov[n] / ov['bare'] - 1):+.1f}% over the bare model)")
        result["overhead"] = ov
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    print("RESULTS " + json.dumps(result))


if __name__ == "__main__":
    main()
