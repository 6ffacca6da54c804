"""The whole benchmark suite in one command: smoljax against transformers on the same GPU in one run, one table, each
figure with its share of the hardware limit.

    python3 benchmarks/bench_suite.py                      # everything (about 12 minutes on one H100)
    python3 benchmarks/bench_suite.py --parts decode prefill
    python3 benchmarks/bench_suite.py --quick              # smoke run of every script (CPU-sized workloads)

It runs the per-area scripts, each of which runs every framework in its own process, and reads their JSON:

| part | script | workload |
|---|---|---|
| decode | `bench_generate.py` | greedy, 32-token prompt + 256 new tokens, batch 1 and 64 |
| prefill | `bench_generate.py` | 1 x 2048 and 8 x 2048 tokens into a KV cache |
| train | `bench_train.py` | 16 x 2048 AdamW step (remat `dots_attention`, layers unrolled), against transformers eager and `torch.compile` |
| attention | `bench_attention.py` | flash attention forward + backward, T = 2048, 4096, 8192, Pallas against cuDNN |
| vision | `bench_vlm.py` | SmolVLM2-500M vision encoder + connector, 17 tiles |

Hardware limits (`--hbm-bytes-per-s`, `--peak-flops`; the H100 figures measured on the benchmark machine):
- decode: bytes a step must read from HBM (every bf16 weight once per step, plus each row's live K/V cache)
  divided by the copy bandwidth gives the tokens/s ceiling;
- prefill and training: model FLOPs (forward: 2 x matmul parameters + causal attention; training 3 times that)
  against the bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ("decode", "prefill", "train", "attention", "vision")

# SmolLM2-135M: 30 layers, hidden 576, 9 query / 3 KV heads of 64, MLP 1536, vocabulary 49152 (tied).
LAYERS, HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 30, 576, 9, 3, 64, 1536, 49152
LAYER_MATMUL_PARAMS = LAYERS * (HIDDEN * (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM + Q_HEADS * HEAD_DIM * HIDDEN
                                + 3 * HIDDEN * MLP)
ALL_PARAMS = 134_515_008


def decode_ceiling(batch: int, prompt: int, new: int, hbm: float) -> float:
    """Tokens/s if a decode step only had to read its bytes at `hbm` bytes/s: all weights (bf16) once per step,
    and each row's live K/V (on average prompt + new / 2 slots, 30 layers, K and V, bf16)."""
    kv_per_row = LAYERS * 2 * (prompt + new / 2) * KV_HEADS * HEAD_DIM * 2
    step_bytes = 2 * ALL_PARAMS + batch * kv_per_row
    return batch * hbm / step_bytes


def prefill_flops_per_token(seq: int) -> float:
    """Forward model FLOPs per prompt token: the layer matmuls and causal attention (QK^T and PV over half the
    scores); the LM head runs on the last token only and is left out."""
    return 2 * LAYER_MATMUL_PARAMS + 2 * 2 * LAYERS * Q_HEADS * HEAD_DIM * seq / 2


def run_script(script: str, args: list[str], json_path: Path, log: Path) -> dict | None:
    command = [sys.executable, str(HERE / script), *args, "--json", str(json_path)]
    print(f"$ {' '.join(command[1:])}", flush=True)
    with open(log, "a") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    if code != 0 or not json_path.exists():
        print(f"  {script} failed (exit {code}); see {log}", flush=True)
        return None
    return json.loads(json_path.read_text())


def generate_results(data: dict) -> dict:
    return {(r["framework"], r["task"]["id"]): r for r in data["results"]}


def fmt(value, digits: int = 0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def ratio(ours, theirs) -> str:
    return f"{ours / theirs:.2f}x" if ours and theirs else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--quick", action="store_true", help="each script's smoke workload")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hbm-bytes-per-s", type=float, default=3.0e12, help="measured copy bandwidth")
    parser.add_argument("--peak-flops", type=float, default=798e12, help="measured bf16 matmul peak")
    parser.add_argument("--out", default=None, help="directory for the scripts' JSON and logs (default: temp)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="smoljax-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "suite.log"
    quick = ["--quick"] if args.quick else []
    repeats = ["--repeats", str(args.repeats)]
    rows: list[list[str]] = []
    started = time.time()

    if "decode" in args.parts or "prefill" in args.parts:
        gen_args = quick + repeats + ["--warmup", "1"]
        if not args.quick:
            gen_args += ["--batch-sizes", "1,64", "--prompt-len", "32", "--new-tokens", "256",
                         "--prefill-shapes", "1x2048,8x2048"]
        if "decode" not in args.parts:
            gen_args.append("--skip-generate")
        if "prefill" not in args.parts:
            gen_args.append("--skip-prefill")
        data = run_script("bench_generate.py", gen_args, out / "generate.json", log)
        if data:
            results = generate_results(data)
            prompt, new = data["args"]["prompt_len"], data["args"]["new_tokens"]
            for (framework, task_id), result in sorted(results.items()):
                if framework != "smoljax":
                    continue
                theirs = results.get(("transformers", task_id), {})
                task = result["task"]
                if task["kind"] == "generate":
                    ceiling = decode_ceiling(task["batch"], prompt, new, args.hbm_bytes_per_s)
                    ours = result.get("e2e_tok_s")
                    rows.append([f"decode b={task['batch']}, {prompt}+{new}, tok/s (whole call)", fmt(ours),
                                 fmt(theirs.get("e2e_tok_s")), ratio(ours, theirs.get("e2e_tok_s")),
                                 f"{100 * ours / ceiling:.0f}% of {ceiling:,.0f} (HBM)" if ours else ""])
                else:
                    ours = result.get("prefill_tok_s")
                    flops = prefill_flops_per_token(task["seq_len"])
                    rows.append([f"prefill {task['batch']}x{task['seq_len']}, tok/s", fmt(ours),
                                 fmt(theirs.get("prefill_tok_s")), ratio(ours, theirs.get("prefill_tok_s")),
                                 f"{100 * ours * flops / args.peak_flops:.0f}% MFU" if ours else ""])

    if "train" in args.parts:
        train_args = quick + ["--remat", "dots_attention", "--unroll-layers", "--loss-chunk", "8192"] + ([] if args.quick else
                                                                          ["--repeats", "10", "--warmup", "3"])
        data = run_script("bench_train.py", train_args, out / "train.json", log)
        if data:
            res = data["results"]
            ours = res.get("smoljax", {}).get("tokens_per_s")
            for side in ("compile", "eager"):
                theirs = res.get(side, {}).get("tokens_per_s")
                if theirs:
                    rows.append([f"train step {data['args']['batch']}x{data['args']['seq']}, tok/s "
                                 f"(vs transformers {side})", fmt(ours), fmt(theirs), ratio(ours, theirs),
                                 f"{100 * res['smoljax']['mfu']:.1f}% MFU" if ours else ""])

    if "attention" in args.parts:
        attn_args = ["--parts", "train", "--repeats", str(max(args.repeats, 5))]
        if args.quick:
            attn_args += ["--seq", "256", "--tokens", "512"]
        command = [sys.executable, str(HERE / "bench_attention.py"), *attn_args]
        print(f"$ {' '.join(command[1:])}", flush=True)
        text = subprocess.run(command, capture_output=True, text=True).stdout
        (out / "attention.md").write_text(text)
        timings: dict[tuple[str, str], tuple[float, str]] = {}
        for match in re.finditer(r"\| train \| (\S+) \| (\w+), causal only \| ([\d.]+) \| (\d*) \|", text):
            timings[(match[1], match[2])] = (float(match[3]), match[4])
        for shape in dict.fromkeys(s for s, _ in timings):
            pallas, cudnn = timings.get((shape, "pallas")), timings.get((shape, "cudnn"))
            if pallas:
                rows.append([f"flash attention fwd+bwd {shape}, causal, ms (vs cuDNN)", f"{pallas[0]:.2f}",
                             f"{cudnn[0]:.2f}" if cudnn else "", ratio(cudnn[0], pallas[0]) if cudnn else "",
                             f"{pallas[1]} TFLOP/s ({100 * float(pallas[1]) * 1e12 / args.peak_flops:.0f}%)"
                             if pallas[1] else ""])

    if "vision" in args.parts:
        vlm_args = quick + repeats + ["--workloads", "vision"] + ([] if args.quick else ["--vision-tiles", "17"])
        data = run_script("bench_vlm.py", vlm_args, out / "vlm.json", log)
        if data:
            by_side = {r["framework"]: r for r in data["results"] if r["task"]["kind"] == "vision"}
            key = next((k for k in by_side.get("smoljax", {}) if k.startswith("tiles_per_s_")), None)
            if key:
                ours, theirs = by_side["smoljax"][key], by_side.get("transformers", {}).get(key)
                rows.append([f"SmolVLM2-500M vision encoder, {key.rsplit('_', 1)[1]} tiles, tiles/s", fmt(ours),
                             fmt(theirs), ratio(ours, theirs), ""])

    print(f"\nsmoljax benchmark suite, {time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s; raw data in {out}\n")
    print("| metric | smoljax | transformers | ratio | share of the hardware limit |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
