#!/usr/bin/env python3
"""One training step of SmolLM2-135M: smoljax against HF transformers (eager and torch.compile), one machine, one run.

    python3 benchmarks/bench_train.py                          # 16 x 2048 tokens per step, auto device
    python3 benchmarks/bench_train.py --quick --device cpu     # smoke run: 2 x 128 tokens, 2 layers
    python3 benchmarks/bench_train.py --json out.json          # also write every raw timing

What a step is, on every side: forward + loss, backward, global-norm gradient clipping at 1.0 and one AdamW update
(lr 3e-4, weight decay 0.1 on matrices only, betas 0.9/0.95, eps 1e-8), with f32 master weights and bf16 compute:

- smoljax: `jax.jit(make_train_step(...), donate_argnums=0)` with `StepOptions(compute_dtype="bfloat16", remat,
  attn_impl, loss_chunk)` and the optax optimizer of `make_optimizer` (constant learning rate); the step casts the
  f32 parameters to bf16 itself and computes the loss in f32 in chunks. Waited for with `jax.block_until_ready`.
- transformers eager: `LlamaForCausalLM` (sdpa attention) built from `LlamaConfig.to_hf_dict()`, f32 weights,
  `torch.autocast(bfloat16)` around `model(input_ids, labels=input_ids)` (HF's shifted cross-entropy), `backward`,
  `clip_grad_norm_`, `torch.optim.AdamW(fused=True)` (foreach where fused is unavailable), `zero_grad(set_to_none)`.
  Waited for with `torch.cuda.synchronize()`.
- transformers compile: the same with `model = torch.compile(model)`; compilation happens in the first step, with
  empty Inductor/Triton caches (as smoljax starts with an empty JAX compilation cache).

The data: random token ids [B, T + 1] (seed 0), the same on every side, no padding. smoljax trains every one of the
B x T positions (targets = the next id); HF's `labels=input_ids` trains B x (T - 1) of them (its last position has
no next token). Both initialise their own random weights, so the first-step losses differ (a sanity value near
ln(vocab) = 10.8).

How it measures: each side runs in its own child process (benchmarks/harness.py), so imports, compilation caches
and allocators never mix. The first step is timed alone (it includes tracing + XLA compilation, or torch.compile),
then `--warmup` untimed steps, then `--repeats` timed steps, whose median is the step time.

    tokens/s = B x T / step time
    MFU      = tokens/s x FLOPs per token / peak FLOP/s

FLOPs per token is `smoljax.training.metrics.decoder_flops_per_token(config, T)` for every side: 6 x matmul
parameters (LM head included) + 6 x layers x q_heads x head_dim x T (causal attention), remat recomputation not
counted. The peak is `--peak-tflops` (default 798 TFLOP/s, the measured H100 bf16 matmul peak).

Peak memory: GPU, `torch.cuda.max_memory_allocated` during the timed steps, and JAX's `peak_bytes_in_use` from a
second process that loads the compiled step from the persistent compilation cache (so XLA's compile-time autotuning
buffers are left out; the peak with them is in the JSON). CPU: the peak RSS of each process during the timed steps.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (benchmarks/harness.py, beside this script)

SEED = 0
PRESET = "SmolLM2-135M"
SIDES = ("smoljax", "eager", "compile")
TITLES = {"smoljax": "smoljax", "eager": "transformers eager", "compile": "transformers compile"}
# AdamW hyper-parameters of every side.
LR, WEIGHT_DECAY, BETAS, EPS, MAX_GRAD_NORM = 3e-4, 0.1, (0.9, 0.95), 1e-8, 1.0


# ======================================================================================================================
# Shared by the driver and the children
# ======================================================================================================================

def _model_config(layers: int | None):
    from smoljax.config import preset
    config = preset(PRESET)
    return config if layers is None else config.replace(num_hidden_layers=layers)


def _random_sequences(batch: int, seq: int, vocab_size: int):
    """Random ids [batch, seq + 1]: inputs are [:, :-1], next-token targets [:, 1:]."""
    import numpy as np
    return np.random.default_rng(SEED).integers(0, vocab_size, size=(batch, seq + 1), dtype=np.int64)


def _run_steps(step: Callable[[], Any], spec: dict[str, Any], memory: "harness.MemoryProbe") -> dict[str, Any]:
    """The first step (compiles), `warmup` untimed steps, then `repeats` timed ones. `step` waits for the device and
    returns (loss, grad_norm) of that step as something `float()` takes (read after the first step's timing)."""
    start = time.perf_counter()
    loss, grad_norm = step()
    result: dict[str, Any] = {"first_step_s": time.perf_counter() - start,
                              "first_loss": float(loss), "first_grad_norm": float(grad_norm)}
    if spec.get("memory_only"):  # second process for JAX's memory peak: one more step, nothing timed
        step()
        return result
    result["warmup_s"] = [_timed(step)[0] for _ in range(spec["warmup"])]
    memory.start_steady()
    times = []
    for _ in range(spec["repeats"]):
        elapsed, (loss, grad_norm) = _timed(step)
        times.append(elapsed)
    result.update(times_s=times, median_s=statistics.median(times), last_loss=float(loss),
                  last_grad_norm=float(grad_norm))
    return result


def _timed(step: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = step()
    return time.perf_counter() - start, out


# ======================================================================================================================
# Children: one side each
# ======================================================================================================================

def _child_smoljax(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    import smoljax
    from smoljax.params import init_params, llama_specs
    from smoljax.training.optimizer import OptimizerConfig, lr_schedule, make_optimizer
    from smoljax.training.step import StepOptions, init_state, make_train_step

    # A compilation cache of this run's own: empty in the timed process (the first step really compiles), reused by
    # the memory-only process on GPU.
    jax.config.update("jax_compilation_cache_dir", spec["jax_cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    config = _model_config(spec["layers"])
    device = jax.devices()[0]
    total_steps = 2 + spec["warmup"] + spec["repeats"]
    opt_config = OptimizerConfig(learning_rate=LR, warmup_steps=0, decay="constant", weight_decay=WEIGHT_DECAY,
                                 b1=BETAS[0], b2=BETAS[1], eps=EPS, max_grad_norm=MAX_GRAD_NORM)
    optimizer = make_optimizer(opt_config, total_steps)
    options = StepOptions(compute_dtype="bfloat16", remat=spec["remat"], attn_impl=spec["attn_impl"], packed=False,
                          loss_chunk=spec["loss_chunk"], unroll_layers=spec.get("unroll_layers", False))
    # f32 parameters and the optimizer state, made on the device in one program (no host copies).
    make_state = jax.jit(lambda key: init_state(init_params(llama_specs(config), key), optimizer, seed=SEED))
    # Committed to the device like the batch: the step's outputs are, and an uncommitted first state would make the
    # second step compile the program again.
    state = jax.block_until_ready(jax.device_put(make_state(jax.random.key(SEED)), device))
    train_step = jax.jit(make_train_step(config, optimizer, lr_schedule(opt_config, total_steps), options),
                         donate_argnums=0)

    ids = _random_sequences(spec["batch"], spec["seq"], config.vocab_size)
    shape = (spec["batch"], spec["seq"])
    batch = jax.device_put({
        "tokens": jnp.asarray(ids[:, :-1], jnp.int32),
        "targets": jnp.asarray(ids[:, 1:], jnp.int32),
        "loss_mask": jnp.ones(shape, jnp.float32),
        "segment_ids": jnp.ones(shape, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(spec["seq"], dtype=jnp.int32), shape),
    }, device)
    memory = harness.MemoryProbe("jax", device)
    holder = {"state": state}
    del state

    def step():
        holder["state"], metrics = train_step(holder["state"], {}, batch)
        jax.block_until_ready((holder["state"], metrics))
        return metrics["loss"], metrics["grad_norm"]

    result = _run_steps(step, spec, memory)
    result["skipped_steps"] = int(holder["state"].skipped)
    result["memory"] = memory.finish()
    result["info"] = {
        "jax": jax.__version__, "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
        "smoljax": getattr(smoljax, "__version__", "?"), "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)), "remat": options.remat,
        "attn_impl": options.attn_impl, "loss_chunk": options.loss_chunk, "unroll_layers": options.unroll_layers,
        "num_params": int(sum(x.size for x in jax.tree.leaves(holder["state"].params))),
    }
    return result


def _build_torch_model(spec: dict[str, Any], device):
    import torch
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    hf_dict = dict(_model_config(spec["layers"]).to_hf_dict(), torch_dtype="float32")
    hf_config = HFLlamaConfig(**hf_dict, attn_implementation="sdpa")
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(hf_config).to(torch.float32)
    model.train()
    if spec["hf_grad_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _torch_adamw(model) -> tuple[Any, str]:
    """AdamW with smoljax's decay mask (matrices decay, norm scales do not); fused where this torch has it."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    kwargs = dict(lr=LR, betas=BETAS, eps=EPS)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs), "foreach"


def _child_torch(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    on_gpu = spec["device"] == "gpu"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("error: --device gpu but this torch build has no CUDA; install a CUDA build of torch")
    device = torch.device("cuda" if on_gpu else "cpu")
    model = _build_torch_model(spec, device)
    optimizer, adamw_impl = _torch_adamw(model)
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = spec["side"] == "compile"
    if compiled:
        model = torch.compile(model, mode=spec["compile_mode"])  # compiles lazily, in the first step
    input_ids = torch.as_tensor(_random_sequences(spec["batch"], spec["seq"], model.config.vocab_size)[:, :-1],
                                device=device)
    memory = harness.MemoryProbe("torch", device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        return loss.detach(), grad_norm.detach()

    result = _run_steps(step, spec, memory)
    result["memory"] = memory.finish()
    result["info"] = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "attention": model.config._attn_implementation, "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "adamw": adamw_impl,
        "grad_checkpointing": bool(spec["hf_grad_checkpointing"]),
        "compile_mode": (spec["compile_mode"] or "default") if compiled else None,
        "num_params": int(sum(p.numel() for p in params)),
    }
    return result


def _run_child(spec: dict[str, Any]) -> None:
    """Runs one side and writes its result; on an exception, prints the traceback and, as the last line of the log
    (what harness.spawn reports), the exception in one line."""
    if spec["side"] == "smoljax" and spec["device"] == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    if spec["side"] == "compile":  # empty compile caches of this run's own, as smoljax's: the first step compiles
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(spec["workdir"], "torchinductor_cache")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(spec["workdir"], "triton_cache")
    try:
        result = (_child_smoljax if spec["side"] == "smoljax" else _child_torch)(spec)
    except Exception as err:  # noqa: BLE001 - any failure (OOM included) goes into the report, not a crash
        traceback.print_exc()
        message = " ".join(str(err).split())[:300]
        print(f"{type(err).__name__}: {message}", flush=True)
        sys.exit(1)
    with open(spec["result_path"], "w") as f:
        json.dump(result, f)


# ======================================================================================================================
# Driver
# ======================================================================================================================

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (those options say their default in brackets)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark one SmolLM2-135M training step: smoljax vs transformers eager and torch.compile.",
        formatter_class=_HelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto picks gpu when JAX sees a CUDA device")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step [16; 2 with --quick]")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence [2048; 128 with --quick]")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (a smoke-test shrink) [30, the real model; 2 with --quick]")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after the first (compiling) step [3; 1 with --quick]")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps, median reported [10; 3 with --quick]")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 x 128 tokens, 2 layers, few steps")
    parser.add_argument("--only", type=harness.comma_subset(SIDES), default=",".join(SIDES),
                        help="sides to run, comma-separated subset of smoljax,eager,compile")
    parser.add_argument("--remat", choices=("none", "full", "dots", "dots_attention", "save_attn_mlp"), default="full",
                        help="smoljax StepOptions.remat: what the backward pass recomputes")
    parser.add_argument("--attn-impl", choices=("auto", "xla", "cudnn", "pallas"), default="auto",
                        help="smoljax attention; auto is cudnn on GPU in bf16, else xla")
    parser.add_argument("--loss-chunk", type=int, default=2048, help="smoljax loss chunk (tokens per LM-head chunk)")
    parser.add_argument("--unroll-layers", action="store_true",
                        help="smoljax StepOptions.unroll_layers: a Python loop over the layers instead of a scan")
    parser.add_argument("--hf-grad-checkpointing", action="store_true",
                        help="transformers gradient checkpointing (non-reentrant) on both transformers sides")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. max-autotune-no-cudagraphs; default: torch's default mode")
    parser.add_argument("--peak-tflops", type=float, default=798.0,
                        help="peak bf16 TFLOP/s for MFU (798: measured H100 bf16 matmul peak)")
    parser.add_argument("--skip-memory-pass", action="store_true",
                        help="GPU: take smoljax's peak from the timed process (compile-time buffers included)")
    parser.add_argument("--child-timeout", type=float, default=1800, help="seconds per child process")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write all raw results as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return args
    quick = dict(batch=2, seq=128, layers=2, warmup=1, repeats=3) if args.quick else \
        dict(batch=16, seq=2048, layers=None, warmup=3, repeats=10)
    for name, value in quick.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch", "seq", "repeats", "layers", "loss_chunk"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if not args.peak_tflops > 0:
        parser.error("--peak-tflops must be positive")
    if args.json and os.path.isdir(args.json):
        parser.error(f"--json {args.json} is a directory; give a file path")
    return args


def _available_sides(wanted: list[str]) -> list[str]:
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing and any(side != "smoljax" for side in wanted):
        print(f"note: {' and '.join(missing)} not installed, so only smoljax runs (pip install torch transformers)",
              file=sys.stderr)
        return [side for side in wanted if side == "smoljax"]
    return wanted


def _run_side(side: str, base: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One side's child; for smoljax on GPU, a second child for the memory peak without compile-time buffers."""
    spec = dict(base, side=side, jax_cache_dir=os.path.join(base["workdir"], "jax_cache"))
    result = harness.spawn(__file__, spec, f"{TITLES[side]:22s}", args.child_timeout)
    if side == "smoljax" and base["device"] == "gpu" and "error" not in result and not args.skip_memory_pass:
        again = harness.spawn(__file__, dict(spec, memory_only=True), f"{TITLES[side] + ' (memory)':22s}",
                              args.child_timeout)
        memory = result["memory"]
        if "error" in again:
            memory["memory_pass_error"] = again["error"]
        else:
            memory.update(peak_with_compilation_bytes=memory["peak_bytes"], peak_bytes=again["memory"]["peak_bytes"],
                          how="JAX peak_bytes_in_use of a second process that loads the step from the persistent "
                              "compilation cache (no autotuning buffers)")
    return result


def _derived(result: dict[str, Any], tokens_per_step: int, flops_per_token: float, peak_flops: float) -> dict:
    """step time, tokens/s, MFU, first step, peak memory and first loss of one side (empty when it failed)."""
    if "error" in result:
        return {}
    tokens_per_s = tokens_per_step / result["median_s"]
    return {"step_s": result["median_s"], "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / peak_flops, "first_step_s": result["first_step_s"],
            "peak_bytes": result["memory"]["peak_bytes"], "first_loss": result["first_loss"]}


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    if key == "mfu":
        return f"{value:.1%}" if value >= 0.001 else f"{value * 100:.2g}%"
    if key == "first_loss":
        return f"{value:.3f}"
    unit = {"step_s": "ms", "first_step_s": "s", "peak_bytes": "GiB"}.get(key, "")
    return harness.fmt(value, unit)


def _table(sides: list[str], derived: dict[str, dict], results: dict[str, dict], labels: dict[str, str]):
    """Rows: metric | smoljax | transformers eager | transformers compile | smoljax ÷ compile."""
    header = ["metric", *(TITLES[s] for s in SIDES), "smoljax ÷ compile"]
    rows = []
    for index, (key, label) in enumerate(labels.items()):
        row = [label]
        for side in SIDES:
            if side not in sides:
                row.append("not run")
            elif "error" in results[side]:
                message = results[side]["error"].replace("|", "\\|")
                row.append(f"**failed**: {message[:70]}{'…' if len(message) > 70 else ''}" if index == 0 else "—")
            else:
                row.append(_cell(key, derived[side].get(key)))
        ours, ref = derived.get("smoljax", {}).get(key), derived.get("compile", {}).get(key)
        row.append(f"{ours / ref:.2f}×" if key != "first_loss" and ours is not None and ref else "—")
        rows.append(row)
    return header, rows


def _machine_line(device: str, results: dict[str, dict]) -> str:
    infos = [r.get("info", {}) for r in results.values()]
    if device == "gpu":
        gpu = next((i["device"] for i in infos if i.get("device") not in (None, "cpu")), "?")
        return f"GPU {gpu}; CPU {harness.cpu_name()}"
    return f"CPU {harness.cpu_name()}, {os.cpu_count()} logical cores"


def _cpu_has_bf16() -> bool | None:
    """Whether the CPU has native bf16 matmuls (AVX512-BF16 or AMX-BF16); None off Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _notes(args, device: str, sides: list[str], results: dict[str, dict]) -> list[str]:
    """Failures, suspicious steps (a non-finite loss, a slow warm-up step: a recompilation?) and CPU caveats."""
    lines = []
    for side in sides:
        res = results[side]
        if "error" in res:
            lines.append(f"- **{TITLES[side]} failed**: {res['error']}")
            continue
        if not (math.isfinite(res["last_loss"]) and res.get("skipped_steps", 0) == 0):
            lines.append(f"- warning: {TITLES[side]} ended with loss {res['last_loss']} "
                         f"({res.get('skipped_steps', 0)} skipped steps)")
        slow = [round(t, 2) for t in res["warmup_s"] if t > 2 * res["median_s"]]
        if slow:
            lines.append(f"- note: {TITLES[side]} warm-up step(s) took {slow} s against a median of "
                         f"{res['median_s']:.2f} s (recompilation or lazy set-up after the first step; not timed)")
    if device == "cpu":
        native = _cpu_has_bf16()
        lines.append("- CPU figures are a smoke test, not a comparison: bf16 compute on a CPU"
                     + (" without native bf16 matmuls (no AVX512-BF16/AMX here) runs slow fallback kernels, "
                        "torch's far slower than XLA's" if native is False else "") + ".")
    return lines


def _version(package: str) -> str:
    """An installed package's version without importing it (the driver never loads the frameworks)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _side_lines(args, sides: list[str], results: dict[str, dict]) -> list[str]:
    """One line per framework that ran: versions and the settings of its sides."""
    lines = []
    if "smoljax" in sides:
        import smoljax
        backend = results["smoljax"].get("info", {}).get("backend", "?")
        lines.append(f"- smoljax {getattr(smoljax, '__version__', '?')}, jax {_version('jax')} (jaxlib "
                     f"{_version('jaxlib')}, backend {backend}): `jax.jit(make_train_step(...), donate_argnums=0)`, "
                     f"remat {args.remat}, attention {args.attn_impl}, loss chunk {args.loss_chunk}")
    torch_sides = [side for side in ("eager", "compile") if side in sides]
    if torch_sides:
        info = next((results[s]["info"] for s in torch_sides if "info" in results[s]), {})
        line = (f"- transformers {_version('transformers')}, torch {_version('torch')} (threads "
                f"{info.get('torch_threads', '?')}): LlamaForCausalLM, attn_implementation sdpa, torch.autocast bf16, "
                f"gradient checkpointing {'on' if args.hf_grad_checkpointing else 'off'}, "
                f"AdamW {info.get('adamw', '?')}")
        if "compile" in torch_sides:
            line += f"; compile column: `torch.compile(model, mode={args.compile_mode or 'default'})`"
        lines.append(line)
    return lines


def _report(args, argv, device, sides, results, derived, config, flops_per_token, total_s, others_share) -> tuple:
    from smoljax.params import count_params, llama_specs

    now = datetime.datetime.now(datetime.timezone.utc)
    tokens = args.batch * args.seq
    memory_label = "peak device memory ↓" if device == "gpu" else "peak RSS (own process) ↓"
    labels = {"step_s": f"step time, median of {args.repeats} ↓", "tokens_per_s": "tokens/s ↑",
              "mfu": f"MFU (peak {args.peak_tflops:g} TFLOP/s) ↑", "first_step_s": "first step (incl. compile) ↓",
              "peak_bytes": memory_label, "first_loss": "loss, first step (sanity, ≈ ln 49152 = 10.8)"}
    header, rows = _table(sides, derived, results, labels)
    layers = f"{config.num_hidden_layers} layers" + (" (shrunk: a smoke test, not the real model)"
                                                     if args.layers is not None else "")
    lines = [
        f"# smoljax vs transformers: one training step of {PRESET} ({now:%Y-%m-%d %H:%M} UTC)",
        "",
        f"- command: `{shlex.join(['python3', 'benchmarks/bench_train.py', *(argv if argv is not None else sys.argv[1:])])}`",
        f"- machine: {_machine_line(device, results)}; {platform.platform()}; Python {platform.python_version()}",
        f"- model: {PRESET}, {layers}, {count_params(llama_specs(config)):,} parameters, random init (each side its "
        "own initializer); f32 master weights, bf16 compute",
        f"- step: batch {args.batch} × sequence {args.seq} = {tokens:,} tokens of random ids, no padding; forward + "
        f"loss, backward, clip grad norm {MAX_GRAD_NORM}, AdamW (lr {LR}, wd {WEIGHT_DECAY} on matrices, betas "
        f"{BETAS[0]}/{BETAS[1]}, eps {EPS})",
        *_side_lines(args, sides, results),
        f"- timing: first step alone (compilation included), then {args.warmup} untimed warm-up step(s), then the "
        f"median of {args.repeats} timed steps",
        f"- MFU = tokens/s × {flops_per_token / 1e6:,.1f} MFLOPs/token (decoder_flops_per_token at T = {args.seq}, "
        f"the same for every side) ÷ peak {args.peak_tflops:g} TFLOP/s (--peak-tflops)"
        + ("; on a CPU this peak is a GPU's, so MFU there is only a relative figure" if device == "cpu" else ""),
        ("- memory: peak RSS of each side's own process during the timed steps" if device == "cpu" else
         "- memory: smoljax, JAX peak_bytes_in_use of a second process that loads the compiled step from the "
         "persistent compilation cache (the peak with compile-time buffers is in the JSON); transformers, "
         "torch.cuda.max_memory_allocated during the timed steps")
        + (". Both include weights, gradients and optimizer state" if device == "gpu" else ""),
        "- machine load: " + (f"other processes used {others_share:.0%} of all CPU time during the run"
                              if others_share is not None else "CPU use of other processes unknown"),
        "",
        harness.markdown_table(header, rows),
        "",
        "- ↑ higher is better, ↓ lower is better; smoljax ÷ compile > 1 on an ↑ row means smoljax is faster.",
        f"- HF's `labels=input_ids` trains {args.batch * (args.seq - 1):,} of the {tokens:,} positions (no target for "
        "the last one); tokens/s counts all B × T on every side.",
    ]
    lines += _notes(args, device, sides, results)
    lines.append(f"- total benchmark wall time: {total_s / 60:.1f} min")
    return "\n".join(lines), header, rows, now


def main(argv: list[str] | None = None) -> int:
    harness.use_checkout_if_not_installed()
    args = _parse_args(argv)
    if args.child is not None:
        _run_child(json.loads(args.child))
        return 0
    from smoljax.training.metrics import decoder_flops_per_token

    wall_start = time.perf_counter()
    busy_before, own_before = harness.machine_busy_seconds(), harness.own_cpu_seconds()
    device = args.device if args.device != "auto" else harness.detect_device()
    sides = _available_sides(args.only)
    if not sides:
        print("error: nothing to run: torch/transformers cannot be imported and smoljax was not asked for",
              file=sys.stderr)
        return 2
    config = _model_config(args.layers)
    flops_per_token = decoder_flops_per_token(config, args.seq)
    workdir = tempfile.mkdtemp(prefix="smoljax_bench_train_")
    base = {"workdir": workdir, "device": device, "batch": args.batch, "seq": args.seq, "layers": args.layers,
            "warmup": args.warmup, "repeats": args.repeats, "remat": args.remat, "attn_impl": args.attn_impl,
            "loss_chunk": args.loss_chunk, "unroll_layers": args.unroll_layers, "hf_grad_checkpointing": args.hf_grad_checkpointing,
            "compile_mode": args.compile_mode}
    print(f"device {device}, {args.batch} x {args.seq} tokens per step, sides {','.join(sides)}; first step, "
          f"{args.warmup} warm-up, median of {args.repeats}", file=sys.stderr)
    try:
        results = {side: _run_side(side, base, args) for side in sides}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    total_s = time.perf_counter() - wall_start
    busy_after, own_after = harness.machine_busy_seconds(), harness.own_cpu_seconds()
    others_share = None
    if busy_before is not None and busy_after is not None:
        others = max(0.0, (busy_after - busy_before) - (own_after - own_before))
        others_share = others / (total_s * (os.cpu_count() or 1))

    peak_flops = args.peak_tflops * 1e12
    derived = {side: _derived(res, args.batch * args.seq, flops_per_token, peak_flops) for side, res in results.items()}
    report, header, rows, now = _report(args, argv, device, sides, results, derived, config, flops_per_token,
                                        total_s, others_share)
    print(report)
    if args.json:
        payload = {"date_utc": now.isoformat(), "machine": _machine_line(device, results), "device": device,
                   "platform": platform.platform(), "python": platform.python_version(),
                   "args": {k: v for k, v in vars(args).items() if k != "child"},
                   "flops_per_token": flops_per_token, "peak_flops": peak_flops, "total_s": total_s,
                   "results": {side: dict(derived[side], raw=res) for side, res in results.items()},
                   "table": {"header": header, "rows": rows}}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if any("error" in res for res in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
