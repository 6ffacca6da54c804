#!/usr/bin/env python3
"""Generation and prefill speed of smoljax against HF transformers (the torch reference), on one machine, in one run.

    python3 benchmarks/bench_generate.py                      # CPU: f32; GPU: bf16 (auto-detected)
    python3 benchmarks/bench_generate.py --quick              # smoke run with tiny workloads
    python3 benchmarks/bench_generate.py --json out.json      # also write every raw timing

Both frameworks run SmolLM2-135M with the very same weights: random ones initialised by smoljax (default) or a real
checkpoint (`--model PATH|default`), written once to a temporary HF-layout directory that both sides load. Stop tokens
are disabled on both sides, so every generate call produces exactly `--new-tokens` tokens per row.

Every (framework, workload) runs in its own child process, so imports, compilation caches and allocator state never
leak from one measurement into another, and peak memory belongs to one workload: on CPU the peak RSS during the timed
calls (/proc/self/status VmHWM, reset after loading and after the compiling calls); on GPU
`torch.cuda.max_memory_allocated` and, for smoljax, JAX's `peak_bytes_in_use` in a second process that loads its
programs from the persistent compilation cache (compile-time autotuning buffers would otherwise double the peak).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (benchmarks/harness.py, beside this script)

SEED = 0
DEFAULT_PRESET = "SmolLM2-135M-Instruct"


# ======================================================================================================================
# Shared helpers (driver and children)
# ======================================================================================================================

def _random_prompts(batch: int, length: int, vocab_size: int, seed: int = SEED):
    import numpy as np
    rng = np.random.default_rng(seed)
    # Ids 3.. skip the special tokens of the SmolLM2 vocabulary; nothing depends on it.
    return rng.integers(3, vocab_size, size=(batch, length), dtype=np.int64)


def prompt_lengths(batch: int, length: int, ragged: bool, seed: int = SEED) -> list[int]:
    """Each prefill row's real prompt length: all `length`, or (ragged) drawn from [length / 2, length], the rows
    then left-padded to `length` as generate() pads a batch to its bucket."""
    import numpy as np
    if not ragged:
        return [length] * batch
    return np.random.default_rng(seed + 1).integers(length // 2, length + 1, batch).tolist()


def padded_prefill_batch(batch: int, length: int, ragged: bool, vocab_size: int, pad_id: int):
    """The smoljax prefill workload: random prompts of `prompt_lengths`, left-padded to `length` by generate()'s
    `left_pad`. Returns (tokens, segment ids), numpy [batch, length] each."""
    from smoljax.generation import left_pad
    ids = _random_prompts(batch, length, vocab_size).tolist()
    prompts = [row[length - n:] for row, n in zip(ids, prompt_lengths(batch, length, ragged))]
    return left_pad(prompts, length, pad_id)


def _measure(calls: dict[str, Callable[[], Any]], spec: dict[str, Any], memory: "harness.MemoryProbe") -> dict[str, Any]:
    """Times each call: a first call (it compiles), `warmup` untimed calls, then `repeats` timed ones (median).

    The first calls and warm-ups of every program run before any timed call, so the memory peak of the timed calls
    is measured apart from compilation. Each call must synchronise with its device itself. With `memory_only`
    (a second process whose programs come from the persistent compilation cache) each runs once, untimed.
    """
    results: dict[str, Any] = {}
    for name, fn in calls.items():
        start = time.perf_counter()
        fn()
        results[name] = {"first_call_s": time.perf_counter() - start}
        if spec.get("memory_only"):
            continue
        for _ in range(spec["warmup"]):
            fn()
    if spec.get("memory_only"):
        return results
    memory.start_steady()
    for name, fn in calls.items():
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results[name].update(times_s=times, median_s=statistics.median(times))
    return results


# ======================================================================================================================
# Children: one framework, one phase each
# ======================================================================================================================

def _child_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Writes the weights both frameworks load (config.json + model.safetensors, HF names and layout, f32)."""
    import numpy as np
    from safetensors.numpy import save_file

    import smoljax
    from smoljax.config import preset

    workdir, model = spec["workdir"], spec["model"]
    if model is None:
        import jax
        from smoljax.checkpoints.hf_layout import params_to_hf
        from smoljax.params import init_params, llama_specs
        config = preset(DEFAULT_PRESET)
        params = jax.jit(lambda key: init_params(llama_specs(config), key))(jax.random.key(SEED))
        tensors = params_to_hf(params, config)
        source = f"random init (smoljax init_params, seed {SEED}), {DEFAULT_PRESET} config"
    else:
        config, tensors, source = _load_real_weights(model)
    tensors = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in tensors.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, os.path.join(workdir, "model.safetensors"))
    config.to_json_file(os.path.join(workdir, "config.json"))
    return {"source": source, "num_params": int(sum(v.size for v in tensors.values())),
            "smoljax": getattr(smoljax, "__version__", "?"), "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers, "vocab_size": config.vocab_size}


def _load_real_weights(model: str):
    """(LlamaConfig, HF-named numpy tensors, description) of a real checkpoint: a .gguf file, a directory with
    config.json + safetensors, or `default` (the bundled SmolLM2-135M-Instruct). Falls back to `smoljax.load` when
    the library has one and the path is something else."""
    from pathlib import Path

    from smoljax.config import LlamaConfig
    from smoljax.errors import SmolJaxError

    try:
        if model == "default":
            from smoljax.checkpoints.hub import find_default_model
            path = find_default_model()
        else:
            path = Path(model).expanduser()
        if path.is_dir() and not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                path = ggufs[0]
        if path.is_file() and path.suffix.lower() == ".gguf":
            from smoljax.checkpoints.gguf import gguf_to_hf_config, read_gguf_metadata, read_gguf_tensors
            config = LlamaConfig.from_hf_dict(gguf_to_hf_config(read_gguf_metadata(path)))
            return config, read_gguf_tensors(path), f"{path} (GGUF, dequantized to f32)"
        if path.is_dir():
            from smoljax.checkpoints.safetensors_io import read_safetensors
            config = LlamaConfig.from_json_file(path / "config.json")
            return config, read_safetensors(path, dtype="float32"), f"{path} (safetensors)"
        import smoljax
        loader = getattr(smoljax, "load", None)
        if loader is None:
            raise SystemExit(f"error: cannot load {model!r}: pass a .gguf file, a directory with config.json and "
                             "safetensors, or `default`; this smoljax has no smoljax.load() for other sources")
        loaded = loader(model)
        params, config = (loaded if isinstance(loaded, tuple)
                          else (getattr(loaded, "params"), getattr(loaded, "config")))
        from smoljax.checkpoints.hf_layout import params_to_hf
        return config, params_to_hf(params, config), f"{model} (smoljax.load)"
    except SmolJaxError as err:
        raise SystemExit(f"error: {err}") from None


def _hf_dir_config(workdir: str):
    from smoljax.config import LlamaConfig
    return LlamaConfig.from_json_file(os.path.join(workdir, "config.json"))


def _child_smoljax(spec: dict[str, Any]) -> dict[str, Any]:
    import inspect

    import jax
    import jax.numpy as jnp

    import smoljax
    from smoljax.cache import init_cache
    from smoljax.checkpoints.hf_layout import hf_to_params
    from smoljax.checkpoints.safetensors_io import read_safetensors
    from smoljax.generation import bucket_length, generate, left_pad, prefill
    from smoljax.models import smollm2

    # A compilation cache of this phase's own: empty in the timed process (so the first call really compiles), reused
    # by the memory-only process on GPU (so XLA's autotuning buffers are not counted as the program's memory).
    jax.config.update("jax_compilation_cache_dir", spec["jax_cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    task, workdir = spec["task"], spec["workdir"]
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[spec["dtype"]]
    device = jax.devices()[0]
    config = _hf_dir_config(workdir)
    # Cast and lay out on the host (as transformers' from_pretrained(dtype=...) does), then copy each array to the
    # device once, so weight loading leaves no transient copies in the device allocator's peak.
    with jax.default_device(jax.devices("cpu")[0]):
        host_params = hf_to_params(read_safetensors(workdir, dtype=spec["dtype"]), config, dtype=dtype)
    params = jax.block_until_ready(jax.device_put(host_params, device))
    del host_params
    gc.collect()
    memory = harness.MemoryProbe("jax", device)

    attn_impl = spec["smoljax_attn"]
    gen_kwargs: dict[str, Any] = {"attn_impl": attn_impl}
    if spec.get("smoljax_unroll_layers"):
        if "unroll_layers" not in inspect.signature(generate).parameters:
            raise SystemExit("error: --smoljax-unroll-layers: this smoljax's generate() has no unroll_layers option")
        gen_kwargs["unroll_layers"] = True
    if spec.get("smoljax_fused_layers") in ("on", "off"):
        if "fused_layers" not in inspect.signature(generate).parameters:
            raise SystemExit("error: --smoljax-fused-layers: this smoljax's generate() has no fused_layers option")
        gen_kwargs["fused_layers"] = spec["smoljax_fused_layers"] == "on"
    batch = task["batch"]
    # generate() prefills an empty cache; --smoljax-prefill-over-cache times the general prefill instead.
    empty_cache = not spec.get("smoljax_prefill_over_cache")
    if not empty_cache and "empty_cache" not in inspect.signature(prefill).parameters:
        raise SystemExit("error: --smoljax-prefill-over-cache: this smoljax's prefill() has no empty_cache option")

    fuse = jax.default_backend() != "cpu"  # generate()'s default

    def prefill_fn(cache_length: int):
        """What the generate loop runs before its decode loop: fuse the projections (on accelerators), allocate the
        cache, prefill the prompt. The cache is one stacked buffer where generate() keeps one per layer inside its
        program: returned from a jitted call, 60 buffers cost ~0.4 ms more host time than one (ab_prefill.py)."""
        @jax.jit
        def run(params, tokens, segments):
            if fuse:
                params = smollm2.fuse_projections(params)
            cache = init_cache(config, tokens.shape[0], cache_length, params["embed"].dtype)
            return prefill(params, tokens, segments, cache, config, attn_impl, empty_cache=empty_cache)
        return run

    result: dict[str, Any] = {}
    if task["kind"] == "generate":
        prompt_len, new_tokens = task["prompt_len"], task["new_tokens"]
        prompts = _random_prompts(batch, prompt_len, config.vocab_size).tolist()
        outputs = {}

        def run_generate():
            # generate() blocks until the tokens are ready and copies them to the host.
            outputs["result"] = generate(params, config, prompts, max_new_tokens=new_tokens, stop_tokens=[],
                                         **gen_kwargs)

        # Prefill only, at the very shapes generate() uses (bucketed prompt, cache for prompt + new tokens).
        prompt_bucket = bucket_length(prompt_len)
        tokens, segments = left_pad(prompts, prompt_bucket, config.pad_token_id or 0)
        tokens, segments = jnp.asarray(tokens), jnp.asarray(segments)
        run = prefill_fn(prompt_bucket + bucket_length(new_tokens))
        result.update(_measure({"generate": run_generate,
                                "prefill_only": lambda: jax.block_until_ready(run(params, tokens, segments))},
                               spec, memory))
        generated = outputs["result"].tokens
        result["tokens_per_row"] = sorted({len(row) for row in generated})
        result["row0_tokens"] = generated[0]
    else:
        seq_len = task["seq_len"]
        tokens, segments = padded_prefill_batch(batch, seq_len, task["ragged"], config.vocab_size,
                                                config.pad_token_id or 0)
        tokens, segments = jnp.asarray(tokens), jnp.asarray(segments)
        run = prefill_fn(bucket_length(seq_len))
        result.update(_measure({"prefill": lambda: jax.block_until_ready(run(params, tokens, segments))},
                               spec, memory))

    result["memory"] = memory.finish()
    result["info"] = {
        "jax": jax.__version__, "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
        "smoljax": getattr(smoljax, "__version__", "?"), "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)), "attention": attn_impl,
        # generate()'s defaults: both on accelerators, off on CPU.
        "unroll_layers": bool(gen_kwargs.get("unroll_layers", jax.default_backend() != "cpu")),
        "fuse_projections": fuse,
        "fused_layers": spec.get("smoljax_fused_layers", "auto"),
        "prefill_over_cache": not empty_cache,
    }
    return result


def _child_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    task, workdir = spec["task"], spec["workdir"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    on_gpu = spec["device"] == "gpu"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("error: --device gpu but this torch build has no CUDA; install a CUDA build of torch")
    device = torch.device("cuda" if on_gpu else "cpu")
    kwargs = {"dtype": dtype}
    if spec["hf_attn"]:
        kwargs["attn_implementation"] = spec["hf_attn"]
    model = LlamaForCausalLM.from_pretrained(workdir, **kwargs).to(device).eval()
    # No stop tokens: every row generates exactly max_new_tokens tokens (checked below).
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    gc.collect()
    memory = harness.MemoryProbe("torch", device)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    batch = task["batch"]
    vocab = model.config.vocab_size
    result: dict[str, Any] = {}
    if task["kind"] == "generate":
        prompt_len, new_tokens = task["prompt_len"], task["new_tokens"]
        input_ids = torch.as_tensor(_random_prompts(batch, prompt_len, vocab), device=device)
        gen_kwargs: dict[str, Any] = dict(do_sample=False, attention_mask=torch.ones_like(input_ids))
        if spec["transformers_compile"]:
            from transformers import CompileConfig
            compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead" if on_gpu else "default")
            if not on_gpu:
                compile_config._compile_all_devices = True  # transformers only auto-compiles on accelerators
            gen_kwargs.update(cache_implementation="static", compile_config=compile_config)
        outputs = {}

        def run_generate(max_new: int):
            def run():
                with torch.no_grad():
                    outputs[max_new] = model.generate(input_ids, max_new_tokens=max_new, min_new_tokens=max_new,
                                                      **gen_kwargs)
                sync()
            return run

        # Prefill only: generate() with one new token runs the prompt forward plus generate's own set-up.
        result.update(_measure({"generate": run_generate(new_tokens), "prefill_only": run_generate(1)},
                               spec, memory))
        ids = outputs[new_tokens]
        result["tokens_per_row"] = [int(ids.shape[1] - prompt_len)]
        result["row0_tokens"] = ids[0, prompt_len:].tolist()
    else:
        seq_len = task["seq_len"]
        input_ids = torch.as_tensor(_random_prompts(batch, seq_len, vocab), device=device)
        attention_mask = torch.ones_like(input_ids)
        for row, n in enumerate(prompt_lengths(batch, seq_len, task["ragged"])):
            attention_mask[row, : seq_len - n] = 0  # left padding, as transformers pads for generation

        def run_prefill():
            with torch.no_grad():
                # As generate()'s prefill does: fill a KV cache, compute the last position's logits only.
                out = model(input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
            sync()
            return out

        result.update(_measure({"prefill": run_prefill}, spec, memory))

    result["memory"] = memory.finish()
    result["info"] = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "attention": model.config._attn_implementation, "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "compiled": bool(spec["transformers_compile"] and task["kind"] == "generate"),
    }
    return result


def _run_child(spec: dict[str, Any]) -> None:
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])  # before any framework sizes its thread pools
    if spec["framework"] == "smoljax" or spec["framework"] == "prepare":
        if spec["device"] == "cpu" or spec["framework"] == "prepare":
            os.environ["JAX_PLATFORMS"] = "cpu"  # the weight file is written on the host
    handler = {"prepare": _child_prepare, "smoljax": _child_smoljax, "transformers": _child_transformers}
    result = handler[spec["framework"]](spec)
    with open(spec["result_path"], "w") as f:
        json.dump(result, f)


# ======================================================================================================================
# Driver
# ======================================================================================================================

def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            batch, length = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected shapes like 1x512,8x512, got {text!r}") from None
        if batch < 1 or length < 1:
            raise argparse.ArgumentTypeError(f"shapes must be positive, got {item!r}")
        shapes.append((batch, length))
    return shapes


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark smoljax generation and prefill against HF transformers on this machine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto picks gpu when JAX sees a CUDA device")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: float32 on cpu, bfloat16 on gpu")
    parser.add_argument("--model", default=None,
                        help="real weights: a .gguf, a directory with config.json + safetensors, or 'default' "
                             "(bundled SmolLM2-135M-Instruct); omitted: random weights")
    parser.add_argument("--batch-sizes", type=harness.parse_int_list, default=None, help="generate batch sizes [1,32]")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per row [256]")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per row [32]")
    parser.add_argument("--prefill-shapes", type=_parse_shapes, default=None,
                        help="prefill workloads, BATCHxLENGTH [1x512,8x512]")
    parser.add_argument("--prefill-ragged", action="store_true",
                        help="prefill rows of random real lengths in [L/2, L], left-padded to L; tok/s counts real "
                             "tokens")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement, median reported [1 on cpu, 5 on gpu]")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls after the first (compiling) call, which is always a warm-up "
                             "[0 on cpu, 1 on gpu]")
    parser.add_argument("--quick", action="store_true", help="tiny workloads for a smoke run")
    parser.add_argument("--only", choices=("smoljax", "transformers"), default=None,
                        help="run one framework only")
    parser.add_argument("--skip-prefill", action="store_true", help="skip the standalone prefill workloads")
    parser.add_argument("--skip-generate", action="store_true", help="skip the generate workloads")
    parser.add_argument("--smoljax-attn", choices=("auto", "xla", "cudnn", "pallas"), default="auto",
                        help="smoljax attention implementation")
    parser.add_argument("--smoljax-unroll-layers", action="store_true",
                        help="smoljax generate(unroll_layers=True), where this smoljax has it")
    parser.add_argument("--smoljax-fused-layers", choices=("auto", "on", "off"), default="auto",
                        help="smoljax generate(fused_layers=...): the fused decode-layer kernels (auto: its default)")
    parser.add_argument("--smoljax-prefill-over-cache", action="store_true",
                        help="prefill workloads: the general prefill, which attends over the cache, instead of "
                             "generate()'s prefill of an empty cache")
    parser.add_argument("--transformers-attn", default=None,
                        help="transformers attn_implementation (eager, sdpa, ...); default: transformers' own")
    parser.add_argument("--transformers-compile", action="store_true",
                        help="transformers generate with a static cache and torch.compile (slow first call)")
    parser.add_argument("--cpus", default=None,
                        help="pin every benchmark process to these CPUs (Linux), e.g. 0 or 0-3 or 0,2; both "
                             "frameworks size their thread pools to them")
    parser.add_argument("--child-timeout", type=float, default=3600, help="seconds per child process")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write all raw results as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(batch_sizes=[1, 4] if quick else [1, 32], new_tokens=16 if quick else 256,
                    prompt_len=8 if quick else 32, prefill_shapes=[(1, 64), (2, 64)] if quick else [(1, 512), (8, 512)])
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("new_tokens", "prompt_len", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.json and os.path.isdir(args.json):
        parser.error(f"--json {args.json} is a directory; give a file path")
    if args.cpus is not None:
        args.cpus = harness.parse_cpus(args.cpus, parser)
    return args


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _metrics(task: dict[str, Any], res: dict[str, Any]) -> dict[str, float | None]:
    """Derived numbers of one child's result; None where the child failed."""
    if "error" in res:
        return {}
    out: dict[str, float | None] = {}
    batch = task["batch"]
    if task["kind"] == "generate":
        new = task["new_tokens"]
        gen, pre = res["generate"], res["prefill_only"]
        out["e2e_tok_s"] = batch * new / gen["median_s"]
        out["prefill_only_s"] = pre["median_s"]
        decode_s = gen["median_s"] - pre["median_s"]
        out["decode_tok_s"] = batch * (new - 1) / decode_s if new > 1 and decode_s > 0 else None
        out["first_call_s"] = gen["first_call_s"]
        out["median_s"] = gen["median_s"]
    else:
        pre = res["prefill"]
        real_tokens = sum(prompt_lengths(batch, task["seq_len"], task["ragged"]))
        out["prefill_tok_s"] = real_tokens / pre["median_s"]
        out["prefill_s"] = pre["median_s"]
        out["first_call_s"] = pre["first_call_s"]
    out["peak_bytes"] = res["memory"]["peak_bytes"]
    out["after_load_bytes"] = res["memory"]["after_load_bytes"]
    return out


def _rows(tasks: list[dict[str, Any]], results: dict[str, dict[str, Any]], memory_label: str) -> list[list[str]]:
    rows = []

    def add(name: str, key: str, task_id: str, unit: str = "", higher_is_better: bool = True):
        ours = results.get(("smoljax", task_id), {}).get(key)
        ref = results.get(("transformers", task_id), {}).get(key)
        ratio = f"{ours / ref:.2f}×" if ours is not None and ref else "—"
        arrow = "↑" if higher_is_better else "↓"
        rows.append([f"{name} {arrow}", harness.fmt(ours, unit), harness.fmt(ref, unit), ratio])

    for task in tasks:
        tid = task["id"]
        if task["kind"] == "generate":
            label = f"generate b={task['batch']}, {task['prompt_len']}+{task['new_tokens']}"
            add(f"{label}: new tok/s, whole call", "e2e_tok_s", tid)
            add(f"{label}: decode-only tok/s (derived)", "decode_tok_s", tid)
            add(f"{label}: prefill-only time", "prefill_only_s", tid, "ms", False)
            add(f"{label}: first call (incl. compile)", "first_call_s", tid, "s", False)
            add(f"{label}: {memory_label}", "peak_bytes", tid, "GiB", False)
        else:
            label = f"prefill {task['batch']}×{task['seq_len']}" + (" ragged" if task["ragged"] else "")
            add(f"{label}: tok/s", "prefill_tok_s", tid)
            add(f"{label}: first call (incl. compile)", "first_call_s", tid, "s", False)
            add(f"{label}: {memory_label}", "peak_bytes", tid, "GiB", False)
    return rows


def _agreement(results: dict, tasks: list[dict[str, Any]]) -> list[str]:
    """How many leading greedy tokens of row 0 the two frameworks share, per generate workload."""
    lines = []
    for task in tasks:
        if task["kind"] != "generate":
            continue
        ours = results.get(("smoljax", task["id"]), {}).get("raw", {}).get("row0_tokens")
        ref = results.get(("transformers", task["id"]), {}).get("raw", {}).get("row0_tokens")
        if ours is None or ref is None:
            continue
        same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        lines.append(f"b={task['batch']}: row 0 greedy tokens identical for the first {same} of {task['new_tokens']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    harness.use_checkout_if_not_installed()
    args = _parse_args(argv)
    if args.child is not None:
        _run_child(json.loads(args.child))
        return 0

    wall_start = time.perf_counter()
    device = args.device if args.device != "auto" else harness.detect_device()
    dtype = args.dtype or ("bfloat16" if device == "gpu" else "float32")
    warmup = args.warmup if args.warmup is not None else (1 if device == "gpu" else 0)
    repeats = args.repeats if args.repeats is not None else (5 if device == "gpu" else 1)
    frameworks = [args.only] if args.only else ["smoljax", "transformers"]
    import importlib.util
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if "transformers" in frameworks and missing:
        print(f"note: {' and '.join(missing)} not installed, so transformers is skipped "
              "(pip install torch transformers)", file=sys.stderr)
        frameworks.remove("transformers")
    if not frameworks:
        print("error: nothing to run: --only transformers, but transformers cannot be imported", file=sys.stderr)
        return 2
    load_before = _load_average()
    busy_before, own_before = harness.machine_busy_seconds(), harness.own_cpu_seconds()

    tasks: list[dict[str, Any]] = []
    if not args.skip_generate:
        for batch in args.batch_sizes:
            tasks.append({"id": f"generate_b{batch}", "kind": "generate", "batch": batch,
                          "prompt_len": args.prompt_len, "new_tokens": args.new_tokens})
    if not args.skip_prefill:
        for batch, length in args.prefill_shapes:
            tasks.append({"id": f"prefill_{batch}x{length}" + ("_ragged" if args.prefill_ragged else ""),
                          "kind": "prefill", "batch": batch, "seq_len": length, "ragged": args.prefill_ragged})

    workdir = tempfile.mkdtemp(prefix="smoljax_bench_")
    base = {"workdir": workdir, "device": device, "dtype": dtype, "warmup": warmup, "repeats": repeats,
            "cpus": args.cpus,
            "smoljax_attn": args.smoljax_attn, "smoljax_unroll_layers": args.smoljax_unroll_layers,
            "smoljax_fused_layers": args.smoljax_fused_layers,
            "smoljax_prefill_over_cache": args.smoljax_prefill_over_cache,
            "hf_attn": args.transformers_attn,
            "transformers_compile": args.transformers_compile, "model": args.model}
    results: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        print(f"device {device}, dtype {dtype}, {len(tasks)} workloads x {len(frameworks)} frameworks, "
              f"median of {repeats} after {warmup} warm-up call(s) beyond the first", file=sys.stderr)
        prepared = harness.spawn(__file__, dict(base, framework="prepare"), "writing weights", args.child_timeout)
        if "error" in prepared:
            return 1  # harness.spawn printed the reason
        for task in tasks:
            for framework in frameworks:
                spec = dict(base, framework=framework, task=task,
                            jax_cache_dir=os.path.join(workdir, f"jax_cache_{task['id']}"))
                res = harness.spawn(__file__, spec, f"{framework:12s} {task['id']}", args.child_timeout)
                if framework == "smoljax" and device == "gpu" and "error" not in res:
                    # JAX's peak cannot be reset and includes XLA's autotuning buffers from compilation: take the
                    # peak from a second process whose programs come from the compilation cache just written.
                    again = harness.spawn(__file__, dict(spec, memory_only=True), f"{framework:12s} {task['id']} (memory)",
                                   args.child_timeout)
                    if "error" not in again:
                        res["memory"]["peak_with_compilation_bytes"] = res["memory"]["peak_bytes"]
                        res["memory"]["peak_bytes"] = again["memory"]["peak_bytes"]
                        res["memory"]["how"] = ("JAX peak_bytes_in_use of a second process that loads the programs "
                                                "from the persistent compilation cache (no autotuning buffers)")
                results[(framework, task["id"])] = dict(_metrics(task, res), raw=res)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    total_s = time.perf_counter() - wall_start
    busy_after, own_after = harness.machine_busy_seconds(), harness.own_cpu_seconds()
    others_share = None
    if busy_before is not None and busy_after is not None:
        others = max(0.0, (busy_after - busy_before) - (own_after - own_before))
        others_share = others / (total_s * (os.cpu_count() or 1))

    infos = {fw: next((r["raw"]["info"] for (f, _), r in results.items() if f == fw and "info" in r["raw"]), {})
             for fw in ("smoljax", "transformers")}
    if device == "gpu":
        machine = f"GPU {infos['smoljax'].get('device') or infos['transformers'].get('device', '?')}; " \
                  f"CPU {harness.cpu_name()}"
        memory_label = "peak device memory"
    else:
        machine = f"CPU {harness.cpu_name()}, {os.cpu_count()} logical cores" + \
                  (f", benchmark pinned to CPUs {args.cpus}" if args.cpus else "")
        memory_label = "peak RSS (own process)"
    now = datetime.datetime.now(datetime.timezone.utc)

    header = ["metric", "smoljax", "transformers", "ratio (smoljax ÷ transformers)"]
    rows = _rows(tasks, results, memory_label)
    sj, hf = infos["smoljax"], infos["transformers"]
    lines = [
        f"# smoljax vs transformers: generate and prefill ({now:%Y-%m-%d %H:%M} UTC)",
        "",
        f"- command: `{shlex.join(['python3', 'benchmarks/bench_generate.py', *(argv or sys.argv[1:])])}`",
        f"- machine: {machine}; {platform.platform()}; Python {platform.python_version()}",
        f"- model: {prepared.get('source')}; {prepared.get('num_params', 0):,} parameters; dtype {dtype}; "
        "identical weights on both sides",
        f"- smoljax {sj.get('smoljax', '?')}, jax {sj.get('jax', '?')} (jaxlib {sj.get('jaxlib', '?')}, "
        f"backend {sj.get('backend', '?')}), attention {sj.get('attention', '?')}"
        + (", unrolled layers in decode" if sj.get("unroll_layers") else "")
        + (", fused [out, in] projections" if sj.get("fuse_projections") else "")
        + f", fused decode layers {sj.get('fused_layers', 'auto')}",
        f"- transformers {hf.get('transformers', '?')}, torch {hf.get('torch', '?')} "
        f"(threads: {hf.get('torch_threads', '?')}), attn_implementation {hf.get('attention', '?')}"
        + (", static cache + torch.compile" if args.transformers_compile
           else ", dynamic cache, eager (no torch.compile)"),
        f"- timing: median of {repeats} call(s) after the first (compiling) call and {warmup} more warm-up call(s);"
        " greedy; stop tokens disabled on both sides; prompts are random ids",
        f"- machine load: 1-min load average {load_before} before the run ({os.cpu_count()} CPUs); "
        + (f"other processes used {others_share:.0%} of all CPU time during the run"
           if others_share is not None else "CPU use of other processes unknown")
        + ("; they competed with the benchmark, so absolute CPU figures are pessimistic"
           if device == "cpu" and others_share is not None and others_share > 0.1 else ""),
        "",
        harness.markdown_table(header, rows),
        "",
        "How to read it:",
        "- **new tok/s, whole call** = batch × new tokens ÷ wall time of one generate() call, prefill included "
        "(smoljax: `smoljax.generation.generate`, transformers: `model.generate(do_sample=False)`).",
        "- **decode-only tok/s (derived)** = batch × (new tokens − 1) ÷ (generate time − prefill-only time). "
        "Prefill-only is smoljax's cache allocation + `prefill` jitted at generate()'s shapes, and transformers' "
        "`generate(max_new_tokens=1)`.",
        "- **prefill B×L tok/s** = B × L ÷ time of one prompt forward that fills a KV cache and returns "
        "last-position logits (smoljax: jitted projection fusion (accelerators), cache allocation and `prefill`; "
        "transformers: `model(..., use_cache=True, "
        "logits_to_keep=1)` under `torch.no_grad`)"
        + ("; with --prefill-ragged, the real (unpadded) tokens ÷ that time." if args.prefill_ragged else "."),
        "- **first call** = wall time of the first call of that workload in a fresh process, run included (smoljax: "
        "tracing + XLA compilation + run; transformers: lazy initialisation + run"
        + (", torch.compile included" if args.transformers_compile else "") + ").",
        ("- **memory**: each framework and workload runs in its own process (subprocesses, so one framework's "
         "imports, caches and allocator never count against the other). CPU: the peak RSS (VmHWM) of that process "
         "during the timed calls — weights + runtime + workload; the high-water mark is reset after loading and "
         "again after the first (compiling) calls, whose peak is in the JSON." if device == "cpu" else
         "- **memory**: each framework and workload runs in its own process. smoljax: JAX `peak_bytes_in_use` of a "
         "second process that loads the compiled programs from the persistent compilation cache, so XLA's "
         "compile-time autotuning buffers are left out (the peak with them is in the JSON); transformers: "
         "`torch.cuda.max_memory_allocated` during the timed calls. Both include the resident weights."),
        "- ↑ higher is better, ↓ lower is better; ratio > 1 on an ↑ row means smoljax is faster.",
    ]
    agreement = _agreement(results, tasks)
    if agreement:
        lines.append("- same weights, same math: " + "; ".join(agreement) + ".")
    for (framework, task_id), res in results.items():
        raw = res["raw"]
        if "error" in raw:
            lines.append(f"- **{framework} {task_id} failed**: {raw['error']}")
        elif raw.get("tokens_per_row") and raw["tokens_per_row"] != [args.new_tokens]:
            lines.append(f"- warning: {framework} {task_id} produced {raw['tokens_per_row']} tokens per row")
    lines.append(f"- total benchmark wall time: {total_s / 60:.1f} min")
    report = "\n".join(lines)
    print(report)

    if args.json:
        payload = {
            "date_utc": now.isoformat(), "machine": machine, "device": device, "dtype": dtype,
            "args": {k: v for k, v in vars(args).items() if k != "child"}, "model": prepared,
            "versions": {"smoljax": sj, "transformers": hf}, "total_s": total_s,
            "results": [{"framework": fw, "task": next(t for t in tasks if t["id"] == tid), **res}
                        for (fw, tid), res in results.items()],
            "table": {"header": header, "rows": rows},
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    failed = any("error" in r["raw"] for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
