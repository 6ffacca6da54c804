#!/usr/bin/env python3
"""SmolVLM2 speed of smoljax against HF transformers (the torch reference), on one machine, in one run.

    python3 benchmarks/bench_vlm.py                     # CPU: f32; GPU: bf16 (auto-detected)
    python3 benchmarks/bench_vlm.py --quick             # smoke run: fewer layers, 2 tiles, 32 new tokens
    python3 benchmarks/bench_vlm.py --json out.json     # also write every raw timing

Model: SmolVLM2-500M-Video-Instruct at its real shapes (SigLIP encoder 12 x 768, pixel-shuffle connector, SmolLM2-360M
decoder) with random weights from smoljax's initializer, written once with `smoljax.save_pretrained` to a temporary
directory that both frameworks load, so both sides run the very same weights (in the benchmark dtype). Nothing is
downloaded and no tokenizer or image processor is used: tiles are random pixels in [-1, 1] with a full pixel mask, and
the prompt is random text ids with `image_seq_len` `<image>` ids per tile in its middle.

Workloads, each (framework, workload) in its own child process:

- vision: the encoder + connector over N tiles (default N = 17 and 64), tiles/s;
- prefill: one image+text prompt (default 17 tiles + 60 text ids = 1,148 tokens) to its last-position logits with
  a KV cache filled, time;
- decode: greedy generation of 128 tokens after that prompt, batch 1, stop tokens off, decode-only tokens/s.

Memory is the peak of the timed calls: on CPU the process's RSS (VmHWM, reset after loading and after the compiling
calls); on GPU `torch.cuda.max_memory_allocated` and, for smoljax, JAX's `peak_bytes_in_use` in a second process
that loads its programs from the persistent compilation cache (compile-time autotuning buffers would otherwise
inflate the peak).
"""

from __future__ import annotations

import argparse
import dataclasses
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

PRESET = "SmolVLM2-500M-Video-Instruct"
SEED = 0
TEXT_IDS = (100, 49000)  # random text ids are drawn from this range: ordinary tokens, no special ones
WORKLOADS = ("vision", "prefill", "decode")


# ======================================================================================================================
# Helpers shared by the driver and the children
# ======================================================================================================================

def make_inputs(tiles: int, text_tokens: int, image_seq_len: int, image_token_id: int, image_size: int,
                seed: int = SEED):
    """(prompt ids, pixel_values [1, tiles, 3, S, S] f32 in [-1, 1], pixel_attention_mask [1, tiles, S, S] bool).

    The prompt is `text_tokens` random text ids with `tiles * image_seq_len` `<image>` ids in the middle. The real
    processor also wraps each tile in marker tokens; they are ordinary text positions and change nothing here.
    Same arguments, same arrays, in every process.
    """
    import numpy as np
    rng = np.random.default_rng(seed)
    text = rng.integers(TEXT_IDS[0], TEXT_IDS[1], size=text_tokens).tolist()
    half = text_tokens // 2
    prompt = text[:half] + [image_token_id] * (tiles * image_seq_len) + text[half:]
    pixels = rng.uniform(-1.0, 1.0, size=(1, tiles, 3, image_size, image_size)).astype(np.float32)
    mask = np.ones((1, tiles, image_size, image_size), dtype=bool)
    return prompt, pixels, mask


def _time_calls(calls: dict[str, Callable[[], Any]], spec: dict[str, Any], memory: harness.MemoryProbe) -> dict[str, Any]:
    """First call of every program (it compiles), then `warmup` untimed calls each, then `repeats` timed calls each.

    Every call waits for its own results (block_until_ready / cuda.synchronize). All first calls and warm-ups come
    before any timed call, so the memory peak of the timed calls is taken apart from compilation. A memory-only
    process (GPU smoljax, programs from the compilation cache) makes each first call and stops.
    """
    out: dict[str, Any] = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        out[name] = {"first_call_s": time.perf_counter() - start}
        if not spec.get("memory_only"):
            for _ in range(spec["warmup"]):
                call()
    if spec.get("memory_only"):
        return out
    memory.start_steady()
    for name, call in calls.items():
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        out[name].update(times_s=times, median_s=statistics.median(times))
    return out


def _save_array(spec: dict[str, Any], name: str, value: Any) -> None:
    """Small arrays (first tile's features, last logits) that the driver compares across frameworks."""
    import numpy as np
    if spec.get("memory_only"):
        return
    np.save(os.path.join(spec["workdir"], f"{spec['framework']}_{spec['task']['id']}_{name}.npy"),
            np.asarray(value, dtype=np.float32))


# ======================================================================================================================
# Children
# ======================================================================================================================

def _child_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Random smoljax parameters at the real shapes, saved once as an HF directory (config.json + safetensors)."""
    import jax

    import smoljax
    from smoljax.config import preset
    from smoljax.params import count_params, init_params, vlm_specs

    config = real = preset(PRESET)
    if spec["text_layers"]:
        config = config.replace(text=config.text.replace(num_hidden_layers=spec["text_layers"]))
    if spec["vision_layers"]:
        config = config.replace(vision=dataclasses.replace(config.vision, num_hidden_layers=spec["vision_layers"]))
    params = jax.jit(lambda key: init_params(vlm_specs(config), key))(jax.random.key(SEED))
    # Stored in the benchmark dtype, so both frameworks read the very same bits (no cast on either side).
    smoljax.save_pretrained(spec["model_dir"], config, params, dtype=spec["dtype"])
    return {"source": f"random init (smoljax init_params, seed {SEED}), {PRESET} config"
                      + (" with fewer layers" if spec["text_layers"] or spec["vision_layers"] else ""),
            "num_params": count_params(params), "smoljax": getattr(smoljax, "__version__", "?"),
            "reduced": (config.text.num_hidden_layers, config.vision.num_hidden_layers)
                       != (real.text.num_hidden_layers, real.vision.num_hidden_layers),
            "text_layers": config.text.num_hidden_layers, "vision_layers": config.vision.num_hidden_layers,
            "text_hidden_size": config.text.hidden_size, "vision_hidden_size": config.vision.hidden_size,
            "image_size": config.vision.image_size, "image_seq_len": config.image_seq_len,
            "image_token_id": config.image_token_id, "stored_dtype": spec["dtype"]}


def _child_smoljax(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import smoljax
    from smoljax.cache import init_cache
    from smoljax.generation import bucket_length, generate, left_pad, prefill, prompt_embeddings
    from smoljax.models import smollm2, smolvlm2

    # Each workload has its own persistent compilation cache: empty in the timed process (its first call really
    # compiles), reused by the memory-only process on GPU (so autotuning buffers are not counted).
    jax.config.update("jax_compilation_cache_dir", spec["jax_cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    task = spec["task"]
    device = jax.devices()[0]
    # Read and cast on the host, then copy each array to the device once: loading leaves nothing in the device peak.
    with jax.default_device(jax.devices("cpu")[0]):
        loaded = smoljax.load(spec["model_dir"], dtype=spec["dtype"])
    config = loaded.config
    params = jax.block_until_ready(jax.device_put(loaded.params, device))
    del loaded
    gc.collect()
    memory = harness.MemoryProbe("jax", device)

    attn = spec["smoljax_attn"]
    accelerator = jax.default_backend() != "cpu"
    # generate()'s own defaults, mirrored by the prefill program below.
    unroll, fuse = accelerator, accelerator
    result: dict[str, Any] = {}
    extra: dict[str, Any] = {}

    if task["kind"] == "vision":
        encode = jax.jit(lambda p, x, m: smolvlm2.image_features(p, x, m, config, attn))
        calls = {}
        for tiles in task["tiles"]:
            _, pixels, mask = make_inputs(tiles, 0, config.image_seq_len, config.image_token_id,
                                          config.vision.image_size)
            x, m = jax.device_put(pixels[0], device), jax.device_put(mask[0], device)

            def run(x=x, m=m, tiles=tiles):
                features = jax.block_until_ready(encode(params, x, m))
                if tiles == task["tiles"][0]:
                    extra["features"] = features
            calls[f"tiles_{tiles}"] = run
        result.update(_time_calls(calls, spec, memory))
        if "features" in extra:
            _save_array(spec, "tile0_features", np.asarray(extra["features"][0], np.float32))
    else:
        prompt, pixels, mask = make_inputs(task["tiles"], task["text_tokens"], config.image_seq_len,
                                           config.image_token_id, config.vision.image_size)
        text_config = config.text
        pad_id = text_config.pad_token_id if text_config.pad_token_id is not None else 0
        prompt_bucket = bucket_length(len(prompt))
        cache_length = prompt_bucket + bucket_length(task["new_tokens"])
        text_params = params["text"]

        @jax.jit
        def prefill_program(text_params, tokens, segments, embeds):
            # What generate()'s compiled program runs before its decode loop, at the same shapes.
            if fuse:
                text_params = smollm2.fuse_projections(text_params)
            cache = init_cache(text_config, tokens.shape[0], cache_length, text_params["embed"].dtype,
                               per_layer=unroll)
            return prefill(text_params, tokens, segments, cache, text_config, attn, embeds, empty_cache=True)

        def run_prefill():
            # From host inputs, as generate() starts: pad the prompt, encode the tiles and merge them into the
            # prompt embeddings (`prompt_embeddings`, host->device copies included), then prefill.
            tokens, segments = left_pad([prompt], prompt_bucket, pad_id)
            embeds = prompt_embeddings(params, config, tokens, pixels, mask, attn)
            logits, cache = prefill_program(text_params, jnp.asarray(tokens), jnp.asarray(segments), embeds)
            extra["logits"] = jax.block_until_ready((logits, cache))[0]

        if task["kind"] == "prefill":
            result.update(_time_calls({"prefill": run_prefill}, spec, memory))
            if "logits" in extra:
                _save_array(spec, "last_logits", np.asarray(extra["logits"][0], np.float32))
        else:
            def run_generate():
                # generate() blocks until its tokens are on the host.
                extra["generated"] = generate(params, config, [prompt], max_new_tokens=task["new_tokens"],
                                              stop_tokens=[], pixel_values=pixels, pixel_attention_mask=mask,
                                              attn_impl=attn)

            result.update(_time_calls({"generate": run_generate, "prefill_only": run_prefill}, spec, memory))
            generated = extra["generated"]
            result["tokens_per_row"] = sorted({len(row) for row in generated.tokens})
            result["row0_tokens"] = generated.tokens[0]
            # generate()'s own clock: compiled program only (image encoding and compilation outside it).
            result["generate_result_seconds"] = generated.seconds
            result["generate_result_compile_seconds"] = generated.compile_seconds
        result["shapes"] = {"prompt_tokens": len(prompt), "prompt_bucket": prompt_bucket, "cache_length": cache_length,
                            "tiles": task["tiles"], "tiles_encoded": task["tiles"]}

    result["memory"] = memory.finish()
    result["info"] = {
        "smoljax": getattr(smoljax, "__version__", "?"), "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"), "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)), "attention": attn,
        "unroll_layers": unroll, "fuse_projections": fuse,
    }
    return result


def _child_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import SmolVLMForConditionalGeneration

    task = spec["task"]
    on_gpu = spec["device"] == "gpu"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("error: --device gpu but this torch build has no CUDA; install a CUDA build of torch")
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec["transformers_attn"]:
        kwargs["attn_implementation"] = spec["transformers_attn"]
    model = SmolVLMForConditionalGeneration.from_pretrained(spec["model_dir"], **kwargs).to(device).eval()
    config = model.config
    # No stop tokens: generate() makes exactly max_new_tokens tokens (checked by the driver).
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = config.text_config.pad_token_id or 0
    gc.collect()
    memory = harness.MemoryProbe("torch", device)
    image_seq_len = int((config.vision_config.image_size // config.vision_config.patch_size) ** 2
                        // config.scale_factor ** 2)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    result: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if task["kind"] == "vision":
        calls = {}
        for tiles in task["tiles"]:
            _, pixels, mask = make_inputs(tiles, 0, image_seq_len, config.image_token_id,
                                          config.vision_config.image_size)
            x, m = torch.from_numpy(pixels).to(device), torch.from_numpy(mask).to(device)

            def run(x=x, m=m, tiles=tiles):
                with torch.no_grad():
                    # Encoder + connector. Recent releases return an output whose pooler_output holds
                    # [tiles * image_seq_len, hidden] per batch row; older ones a [tiles, image_seq_len, hidden]
                    # tensor.
                    features = model.model.get_image_features(x, m)
                sync()
                if tiles == task["tiles"][0]:
                    extra["features"] = features
            calls[f"tiles_{tiles}"] = run
        result.update(_time_calls(calls, spec, memory))
        if "features" in extra:
            features = extra["features"]
            first = features[0] if torch.is_tensor(features) else features.pooler_output[0][:image_seq_len]
            _save_array(spec, "tile0_features", first.float().cpu().numpy())
    else:
        prompt, pixels, mask = make_inputs(task["tiles"], task["text_tokens"], image_seq_len, config.image_token_id,
                                           config.vision_config.image_size)
        host_ids = torch.tensor([prompt], dtype=torch.long)
        host_pixels, host_mask = torch.from_numpy(pixels), torch.from_numpy(mask)

        def device_inputs() -> dict[str, Any]:
            # From host inputs on each call, as smoljax's prefill and generate() start.
            ids = host_ids.to(device)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "pixel_values": host_pixels.to(device), "pixel_attention_mask": host_mask.to(device)}

        def run_prefill():
            with torch.no_grad():
                # As generate()'s first step does: fill a KV cache, logits of the last position only.
                out = model(**device_inputs(), use_cache=True, logits_to_keep=1)
            sync()
            extra["logits"] = out.logits

        def run_generate(new_tokens: int):
            def run():
                with torch.no_grad():
                    extra[new_tokens] = model.generate(**device_inputs(), max_new_tokens=new_tokens,
                                                       min_new_tokens=new_tokens, do_sample=False)
                sync()
            return run

        if task["kind"] == "prefill":
            result.update(_time_calls({"prefill": run_prefill}, spec, memory))
            _save_array(spec, "last_logits", extra["logits"][0, -1].float().cpu().numpy())
        else:
            # Prefill only: generate() for one token = image encoding + prompt forward + generate's own set-up.
            new_tokens = task["new_tokens"]
            result.update(_time_calls({"generate": run_generate(new_tokens), "prefill_only": run_generate(1)},
                                      spec, memory))
            sequences = extra[new_tokens]
            result["tokens_per_row"] = [int(sequences.shape[1] - len(prompt))]
            result["row0_tokens"] = sequences[0, len(prompt):].tolist()
        result["shapes"] = {"prompt_tokens": len(prompt), "tiles": task["tiles"]}

    result["memory"] = memory.finish()
    result["info"] = {
        "transformers": transformers.__version__, "torch": torch.__version__,
        "attention": config._attn_implementation,
        "vision_attention": getattr(config.vision_config, "_attn_implementation", None),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
    }
    return result


def _child_main(spec: dict[str, Any]) -> None:
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])  # before a framework sizes its thread pools
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if spec["framework"] == "prepare" or (spec["framework"] == "smoljax" and spec["device"] == "cpu"):
        os.environ["JAX_PLATFORMS"] = "cpu"  # weights are made on the host
    run = {"prepare": _child_prepare, "smoljax": _child_smoljax, "transformers": _child_transformers}
    result = run[spec["framework"]](spec)
    with open(spec["result_path"], "w") as f:
        json.dump(result, f)


# ======================================================================================================================
# Driver
# ======================================================================================================================

def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=f"Benchmark smoljax against HF transformers on {PRESET} (random weights, real shapes): "
                    "vision encoder tiles/s, image+text prefill time, decode tokens/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto picks gpu when JAX sees a CUDA device")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="weights and compute dtype of both sides; default: float32 on cpu, bfloat16 on gpu")
    parser.add_argument("--workloads", type=harness.comma_subset(WORKLOADS), default=",".join(WORKLOADS),
                        help="which of vision,prefill,decode to run")
    parser.add_argument("--vision-tiles", type=harness.parse_int_list, default=None,
                        help="tile counts of the vision workload [17,64; --quick: 2]")
    parser.add_argument("--tiles", type=int, default=None,
                        help="tiles in the prefill/decode prompt; 17 = one image split 4x4 + the global view "
                             "[17; --quick: 2]")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="text ids around the image tokens of that prompt [60; --quick: 16]")
    parser.add_argument("--new-tokens", type=int, default=None, help="greedy tokens of the decode workload "
                                                                     "[128; --quick: 32]")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per measurement, median reported [1 on cpu, 3 on gpu]")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls after the first (compiling) call, which is always untimed "
                             "[0 on cpu, 1 on gpu]")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 text and 2 vision layers, small workloads; not a model-size result")
    parser.add_argument("--text-layers", type=int, default=None,
                        help="override the decoder's layer count (real model: 32) [--quick: 2]")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help="override the vision encoder's layer count (real model: 12) [--quick: 2]")
    parser.add_argument("--only", choices=("smoljax", "transformers"), default=None, help="run one framework only")
    parser.add_argument("--smoljax-attn", choices=("auto", "xla", "cudnn", "pallas"), default="auto",
                        help="smoljax attention implementation (vision encoder and decoder)")
    parser.add_argument("--transformers-attn", default=None,
                        help="transformers attn_implementation (eager, sdpa, ...); default: transformers' own")
    parser.add_argument("--skip-memory-pass", action="store_true",
                        help="GPU: skip the second smoljax process that measures memory without compile-time "
                             "buffers (the reported smoljax peak then includes compilation)")
    parser.add_argument("--cpus", default=None,
                        help="pin every benchmark process to these CPUs (Linux), e.g. 0 or 0-3 or 0,2")
    parser.add_argument("--child-timeout", type=float, default=1200, help="seconds per child process")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write all raw results as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"vision_tiles": [2] if quick else [17, 64], "tiles": 2 if quick else 17,
                "text_tokens": 16 if quick else 60, "new_tokens": 32 if quick else 128,
                "text_layers": 2 if quick else None, "vision_layers": 2 if quick else None}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("tiles", "new_tokens", "repeats", "text_layers", "vision_layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.text_tokens < 0:
        parser.error("--text-tokens must be >= 0")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.json and os.path.isdir(args.json):
        parser.error(f"--json {args.json} is a directory; give a file path")
    if args.cpus is not None:
        args.cpus = harness.parse_cpus(args.cpus, parser)
    return args


def _metrics(task: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    """Derived figures of one child's result; empty where it failed."""
    if "error" in res:
        return {}
    out: dict[str, Any] = {"peak_bytes": res["memory"]["peak_bytes"]}
    if task["kind"] == "vision":
        for tiles in task["tiles"]:
            timing = res[f"tiles_{tiles}"]
            out[f"tiles_per_s_{tiles}"] = tiles / timing["median_s"]
            out[f"vision_s_{tiles}"] = timing["median_s"]
            out[f"first_call_s_{tiles}"] = timing["first_call_s"]
    elif task["kind"] == "prefill":
        out["prefill_s"] = res["prefill"]["median_s"]
        out["prefill_tok_s"] = res["shapes"]["prompt_tokens"] / res["prefill"]["median_s"]
        out["first_call_s"] = res["prefill"]["first_call_s"]
    else:
        new = task["new_tokens"]
        whole, pre = res["generate"]["median_s"], res["prefill_only"]["median_s"]
        out["e2e_tok_s"] = new / whole
        out["prefill_only_s"] = pre
        decode_s = whole - pre
        out["decode_tok_s"] = (new - 1) / decode_s if new > 1 and decode_s > 0 else None
        out["first_call_s"] = res["generate"]["first_call_s"]
    return out


def _tiles(count: int) -> str:
    return f"{count} tile" + ("" if count == 1 else "s")


def _rows(tasks: list[dict[str, Any]], results: dict[tuple[str, str], dict[str, Any]],
          memory_label: str) -> tuple[list[list[str]], list[tuple[str, float]]]:
    """Table rows, and (label, speed-up) of the figures the 3x target is about."""
    rows: list[list[str]] = []
    targets: list[tuple[str, float]] = []

    def add(name: str, key: str, task_id: str, unit: str = "", higher_is_better: bool = True,
            target: str | None = None):
        ours = results.get(("smoljax", task_id), {}).get(key)
        ref = results.get(("transformers", task_id), {}).get(key)
        ratio = speedup = "—"
        if ours is not None and ref:
            ratio = f"{ours / ref:.2f}×"
            if unit != "GiB" and ours > 0:
                factor = ours / ref if higher_is_better else ref / ours
                speedup = f"{factor:.2f}×"
                if target:
                    targets.append((target, factor))
        rows.append([f"{name} {'↑' if higher_is_better else '↓'}", harness.fmt(ours, unit), harness.fmt(ref, unit), ratio,
                     speedup])

    for task in tasks:
        tid = task["id"]
        if task["kind"] == "vision":
            for tiles in task["tiles"]:
                add(f"vision encoder + connector, {_tiles(tiles)}: tiles/s", f"tiles_per_s_{tiles}", tid,
                    target=f"vision {_tiles(tiles)}")
                add(f"vision encoder + connector, {_tiles(tiles)}: time per call", f"vision_s_{tiles}", tid, "ms",
                    False)
            for tiles in task["tiles"]:
                add(f"vision, {_tiles(tiles)}: first call (incl. compile)", f"first_call_s_{tiles}", tid, "s", False)
            add(f"vision: {memory_label} (largest tile count)", "peak_bytes", tid, "GiB", False)
        elif task["kind"] == "prefill":
            label = f"prefill {_tiles(task['tiles'])} + {task['text_tokens']} text = {task['prompt_tokens']} tokens"
            add(f"{label}: time", "prefill_s", tid, "ms", False, target="image+text prefill")
            add(f"{label}: prompt tok/s", "prefill_tok_s", tid)
            add(f"{label}: first call (incl. compile)", "first_call_s", tid, "s", False)
            add(f"{label}: {memory_label}", "peak_bytes", tid, "GiB", False)
        else:
            label = f"decode b=1, {task['prompt_tokens']}-token image prompt + {task['new_tokens']}"
            add(f"{label}: decode-only tok/s (derived)", "decode_tok_s", tid, target="decode")
            add(f"{label}: new tok/s, whole call", "e2e_tok_s", tid)
            add(f"{label}: prefill-only time", "prefill_only_s", tid, "ms", False)
            add(f"{label}: first call (incl. compile)", "first_call_s", tid, "s", False)
            add(f"{label}: {memory_label}", "peak_bytes", tid, "GiB", False)
    return rows, targets


def _agreement(tasks: list[dict[str, Any]], results: dict, workdir: str) -> list[str]:
    """Same weights, same math: compares what both sides computed (features, logits, greedy tokens)."""
    import numpy as np
    lines = []
    for task in tasks:
        tid = task["id"]
        if task["kind"] in ("vision", "prefill"):
            name = "tile0_features" if task["kind"] == "vision" else "last_logits"
            paths = [os.path.join(workdir, f"{fw}_{tid}_{name}.npy") for fw in ("smoljax", "transformers")]
            if not all(os.path.exists(p) for p in paths):
                continue
            ours, ref = (np.load(p) for p in paths)
            if ours.shape != ref.shape:
                lines.append(f"{tid}: {name} shapes differ, {ours.shape} vs {ref.shape}")
                continue
            diff = float(np.max(np.abs(ours - ref)))
            scale = float(np.max(np.abs(ref))) or 1.0
            what = "first tile's features" if task["kind"] == "vision" else "last-position logits"
            extra = ""
            if task["kind"] == "prefill":
                extra = f", argmax {'equal' if int(ours.argmax()) == int(ref.argmax()) else 'differs'}"
            lines.append(f"{tid}: {what} differ by at most {diff:.3g} (largest |value| {scale:.3g}){extra}")
        else:
            ours = results.get(("smoljax", tid), {}).get("raw", {}).get("row0_tokens")
            ref = results.get(("transformers", tid), {}).get("raw", {}).get("row0_tokens")
            if ours is None or ref is None:
                continue
            same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
            lines.append(f"{tid}: greedy tokens identical for the first {same} of {task['new_tokens']}")
    return lines


def _padding_note(shapes: dict[str, Any] | None) -> str:
    """What smoljax's compile buckets add to the prompt it actually runs (prefill and decode)."""
    if not shapes:
        return ""
    parts = []
    if shapes["tiles_encoded"] != shapes["tiles"]:
        parts.append(f"encodes the prompt's {_tiles(shapes['tiles'])} as {shapes['tiles_encoded']} (blank tiles "
                     "added)")
    if shapes["prompt_bucket"] != shapes["prompt_tokens"]:
        parts.append(f"left-pads the {shapes['prompt_tokens']}-token prompt to {shapes['prompt_bucket']} tokens")
    if not parts:
        return ""
    return (" As `generate()` does, smoljax " + " and ".join(parts)
            + " (its compile buckets); that extra work is in its prefill and decode figures.")


def main(argv: list[str] | None = None) -> int:
    harness.use_checkout_if_not_installed()
    args = _parse_args(argv)
    if args.child is not None:
        _child_main(json.loads(args.child))
        return 0

    wall_start = time.perf_counter()
    device = args.device if args.device != "auto" else harness.detect_device()
    dtype = args.dtype or ("bfloat16" if device == "gpu" else "float32")
    warmup = args.warmup if args.warmup is not None else (1 if device == "gpu" else 0)
    repeats = args.repeats if args.repeats is not None else (3 if device == "gpu" else 1)
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
    try:
        load_before = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        load_before = None
    busy_before, own_before = harness.machine_busy_seconds(), harness.own_cpu_seconds()

    image_seq_len = 64  # corrected from the prepared model below; only used for labels
    tasks: list[dict[str, Any]] = []
    if "vision" in args.workloads:
        tasks.append({"id": "vision", "kind": "vision", "tiles": args.vision_tiles})
    for kind in ("prefill", "decode"):
        if kind in args.workloads:
            tasks.append({"id": kind, "kind": kind, "tiles": args.tiles, "text_tokens": args.text_tokens,
                          "new_tokens": args.new_tokens})

    workdir = tempfile.mkdtemp(prefix="smoljax_bench_vlm_")
    base = {"workdir": workdir, "model_dir": os.path.join(workdir, "model"), "device": device, "dtype": dtype,
            "warmup": warmup, "repeats": repeats, "cpus": args.cpus, "smoljax_attn": args.smoljax_attn,
            "transformers_attn": args.transformers_attn, "text_layers": args.text_layers,
            "vision_layers": args.vision_layers}
    results: dict[tuple[str, str], dict[str, Any]] = {}
    agreement: list[str] = []
    try:
        print(f"device {device}, dtype {dtype}, workloads {','.join(t['id'] for t in tasks)} x "
              f"{len(frameworks)} frameworks, median of {repeats} after {warmup} warm-up call(s) beyond the first",
              file=sys.stderr)
        prepared = harness.spawn(__file__, dict(base, framework="prepare"), "writing weights", args.child_timeout)
        if "error" in prepared:
            return 1  # harness.spawn printed why
        image_seq_len = prepared["image_seq_len"]
        for task in tasks:
            if task["kind"] != "vision":
                task["prompt_tokens"] = task["tiles"] * image_seq_len + task["text_tokens"]
            for framework in frameworks:
                spec = dict(base, framework=framework, task=task,
                            jax_cache_dir=os.path.join(workdir, f"jax_cache_{task['id']}"))
                res = harness.spawn(__file__, spec, f"{framework:12s} {task['id']}", args.child_timeout)
                if framework == "smoljax" and device == "gpu" and "error" not in res and not args.skip_memory_pass:
                    # JAX's peak cannot be reset and holds XLA's autotuning buffers from compiling: take it from
                    # a second process whose programs come from the compilation cache just written.
                    again = harness.spawn(__file__, dict(spec, memory_only=True), f"{framework:12s} {task['id']} (memory)",
                                   args.child_timeout)
                    if "error" not in again:
                        res["memory"]["peak_with_compilation_bytes"] = res["memory"]["peak_bytes"]
                        res["memory"]["peak_bytes"] = again["memory"]["peak_bytes"]
                        res["memory"]["how"] = ("JAX peak_bytes_in_use of a second process that loads the programs "
                                                "from the persistent compilation cache (no autotuning buffers)")
                results[(framework, task["id"])] = dict(_metrics(task, res), raw=res)
        agreement = _agreement(tasks, results, workdir)
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
    sj, hf = infos["smoljax"], infos["transformers"]
    if device == "gpu":
        machine = f"GPU {sj.get('device') or hf.get('device', '?')}; CPU {harness.cpu_name()}"
        memory_label = "peak device memory"
    else:
        machine = (f"CPU {harness.cpu_name()}, {os.cpu_count()} logical cores"
                   + (f", benchmark pinned to CPUs {args.cpus}" if args.cpus else ""))
        memory_label = "peak RSS (own process)"
    now = datetime.datetime.now(datetime.timezone.utc)
    command_args = argv if argv is not None else sys.argv[1:]
    header = ["metric", "smoljax", "transformers", "ratio (smoljax ÷ transformers)", "smoljax speed-up"]
    rows, targets = _rows(tasks, results, memory_label)
    reduced = prepared["reduced"]
    shapes = next((r["raw"]["shapes"] for (f, _), r in results.items()
                   if f == "smoljax" and "shapes" in r.get("raw", {})), None)

    lines = [
        f"# smoljax vs transformers: SmolVLM2 vision, prefill and decode ({now:%Y-%m-%d %H:%M} UTC)",
        "",
        f"- command: `{shlex.join(['python3', 'benchmarks/bench_vlm.py', *command_args])}`",
        f"- machine: {machine}; {platform.platform()}; Python {platform.python_version()}",
        f"- model: {prepared['source']}; {prepared['num_params']:,} parameters; vision {prepared['vision_layers']} "
        f"layers x {prepared['vision_hidden_size']}, text {prepared['text_layers']} layers x "
        f"{prepared['text_hidden_size']}; {prepared['image_size']} px tiles, {image_seq_len} tokens per tile; dtype "
        f"{dtype}; identical weights on both sides (one safetensors directory written by smoljax.save_pretrained "
        "in that dtype, read by both)"
        + ("; **fewer layers than the real model: a smoke run, not a model-size result**" if reduced else ""),
        f"- smoljax {sj.get('smoljax', '?')}, jax {sj.get('jax', '?')} (jaxlib {sj.get('jaxlib', '?')}, backend "
        f"{sj.get('backend', '?')}), attention {sj.get('attention', '?')}"
        + (", generate() with unrolled decode layers and fused projections" if sj.get("unroll_layers") else ""),
        f"- transformers {hf.get('transformers', '?')}, torch {hf.get('torch', '?')} (threads: "
        f"{hf.get('torch_threads', '?')}), attn_implementation {hf.get('attention', '?')}, dynamic cache, eager "
        "(no torch.compile)",
        f"- timing: median of {repeats} call(s) after the first (compiling) call and {warmup} more warm-up call(s); "
        "greedy; stop tokens disabled on both sides; random pixels and random text ids",
        f"- machine load: 1-min load average {load_before} before the run ({os.cpu_count()} CPUs); "
        + (f"other processes used {others_share:.0%} of all CPU time during the run" if others_share is not None
           else "CPU use of other processes unknown")
        + ("; they competed with the benchmark, so absolute CPU figures are pessimistic"
           if device == "cpu" and others_share is not None and others_share > 0.1 else ""),
        "",
        harness.markdown_table(header, rows),
        "",
    ]
    if targets:
        lines.append("Target ≥ 3× transformers on each: " + "; ".join(
            f"{name} {factor:.2f}× ({'met' if factor >= 3 else 'not met'})" for name, factor in targets) + "."
            + (" (Reduced model: this says nothing about the target.)" if reduced else ""))
        lines.append("")
    lines += [
        "What each side times (wall clock; JAX results waited for with `jax.block_until_ready`, torch on GPU with "
        "`torch.cuda.synchronize()`):",
        "- **vision** = tiles ÷ time of one call over N tiles already on the device, encoder + pixel-shuffle "
        "connector on both sides. smoljax: `jax.jit(smolvlm2.image_features)` on [N, 3, H, W] tiles and [N, H, W] "
        "masks; transformers: `model.model.get_image_features(pixel_values [1, N, 3, H, W], pixel_attention_mask)` "
        "under `torch.no_grad`.",
        "- **prefill** = one image+text prompt from host inputs (token ids, f32 pixels, mask) to its last-position "
        "logits with the KV cache filled, host-to-device copies included on both sides. smoljax: what `generate()` "
        "runs before its decode loop, at its shapes: `left_pad` to the bucketed prompt length, "
        "`generation.prompt_embeddings` (vision encoder + connector + merge, jitted) and one jitted program that "
        "allocates the cache for prompt + new tokens and runs `generation.prefill`; transformers: "
        "`model(input_ids, attention_mask, pixel_values, pixel_attention_mask, use_cache=True, logits_to_keep=1)` "
        "under `torch.no_grad`."
        + _padding_note(shapes),
        "- **decode** (batch 1, greedy): whole call = new tokens ÷ wall time of one call from host inputs, image "
        "encoding and prefill included. smoljax: `smoljax.generate(params, config, [ids], max_new_tokens, "
        "stop_tokens=[], pixel_values, pixel_attention_mask)`; transformers: `model.generate(input_ids, "
        "attention_mask, pixel_values, pixel_attention_mask, max_new_tokens, min_new_tokens=max_new_tokens, "
        "do_sample=False)` with no EOS. **decode-only tok/s (derived)** = (new tokens − 1) ÷ (whole call − "
        "prefill-only), where prefill-only is smoljax's prefill above with the cache sized for the new tokens, and "
        "transformers' `generate(max_new_tokens=1)`.",
        "- **first call** = the first call of that workload in a fresh process (smoljax: tracing + XLA compilation + "
        "run; transformers: lazy initialisation + run).",
        ("- **memory**: each framework and workload runs in its own process. CPU: the peak RSS (VmHWM) of that process "
         "during the timed calls — weights + runtime + workload; the high-water mark is reset after loading and again "
         "after the first (compiling) calls, whose peak is in the JSON." if device == "cpu" else
         "- **memory**: each framework and workload runs in its own process. smoljax: JAX `peak_bytes_in_use` of a "
         "second process that loads the compiled programs from the persistent compilation cache, so XLA's "
         "compile-time autotuning buffers are left out (the peak with them is in the JSON); transformers: "
         "`torch.cuda.max_memory_allocated` during the timed calls. Both include the resident weights."),
        "- ↑ higher is better, ↓ lower is better; ratio = smoljax ÷ transformers; speed-up = how many times faster "
        "smoljax is (ratio on ↑ rows, its inverse on ↓ rows).",
    ]
    if agreement:
        lines.append("- same weights, same math: " + "; ".join(agreement) + ".")
    for (framework, task_id), res in results.items():
        raw = res["raw"]
        if "error" in raw:
            lines.append(f"- **{framework} {task_id} failed**: {raw['error']}")
        elif raw.get("tokens_per_row") and raw["tokens_per_row"] != [args.new_tokens]:
            lines.append(f"- warning: {framework} {task_id} produced {raw['tokens_per_row']} tokens per row")
        elif "generate" in raw and res.get("decode_tok_s") is None:
            lines.append(f"- {framework} {task_id}: decode-only tok/s not derived, the whole call "
                         f"({raw['generate']['median_s']:.3f} s) is not longer than prefill-only "
                         f"({raw['prefill_only']['median_s']:.3f} s): timing noise dominates; raise --new-tokens "
                         "or --repeats")
    lines.append(f"- total benchmark wall time: {total_s / 60:.1f} min")
    print("\n".join(lines))

    if args.json:
        payload = {
            "date_utc": now.isoformat(), "machine": machine, "device": device, "dtype": dtype,
            "args": {k: v for k, v in vars(args).items() if k != "child"}, "model": prepared,
            "versions": {"smoljax": sj, "transformers": hf}, "total_s": total_s, "agreement": agreement,
            "targets": {name: factor for name, factor in targets},
            "results": [{"framework": fw, "task": next(t for t in tasks if t["id"] == tid), **res}
                        for (fw, tid), res in results.items()],
            "table": {"header": header, "rows": rows},
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if any("error" in r["raw"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
