"""Training metrics: an analytic FLOP count for MFU, and a logger writing metrics.jsonl (and TensorBoard).

FLOPs per trained token (forward + backward = 3x forward), counting every matmul of the decoder:
    6 * (matmul parameters, the LM head included)  +  6 * layers * q_heads * head_dim * seq_len
The attention term is QK^T and PV (2 matmuls x 2 FLOPs x T x D per head) times 3 for the backward pass, halved
for the causal mask; remat recomputation is not counted (it is overhead, which MFU is meant to expose).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from smoljax.config import LlamaConfig, VLMConfig

# Dense bf16 matmul peaks (FLOP/s) for MFU. H100/H200: measured with a large bf16 matmul (see BENCHMARKS.md), not the
# datasheet's 989 TFLOP/s; TPUs: datasheet.
PEAK_BF16_FLOPS = {
    "H100": 798e12,
    "H200": 798e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def decoder_flops_per_token(config: LlamaConfig | VLMConfig, seq_len: int) -> float:
    """Training FLOPs per token of the text decoder at sequence length `seq_len` (see the module docstring).
    For SmolVLM2 the vision tower is not counted (its cost depends on the number of images)."""
    text = config.text if isinstance(config, VLMConfig) else config
    hidden, layers = text.hidden_size, text.num_hidden_layers
    attn_width = text.num_attention_heads * text.head_dim
    kv_width = text.num_key_value_heads * text.head_dim
    per_layer = hidden * (attn_width + 2 * kv_width) + attn_width * hidden + 3 * hidden * text.intermediate_size
    matmul_params = layers * per_layer + hidden * text.vocab_size
    return 6.0 * matmul_params + 6.0 * layers * attn_width * seq_len


def device_peak_flops(device: Any = None) -> float | None:
    """The bf16 peak of `device` (default: the first device) from PEAK_BF16_FLOPS, or None when unknown (CPU)."""
    import jax

    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


class MetricsLogger:
    """Appends one JSON line per logged step to `<run>/metrics.jsonl`, mirrors it to TensorBoard when
    `tensorboardX` or `torch.utils.tensorboard` is installed and wanted, and shows a progress bar on stderr."""

    def __init__(self, run_dir: str | os.PathLike | None, total_steps: int, *, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, stream: TextIO = sys.stderr) -> None:
        """run_dir None: log nothing (the processes other than 0 of a multi-host run)."""
        self._file = None
        if run_dir is not None:
            path = Path(run_dir) / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")
        self._writer = _tensorboard_writer(Path(run_dir) / "tensorboard") if tensorboard and run_dir else None
        self._bar = None
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, file=stream, dynamic_ncols=True,
                             disable=not stream.isatty() and os.environ.get("CI") is not None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{key: _plain(value) for key, value in metrics.items()}}
        self._write(record)
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def write_text(self, step: int, name: str, text: str) -> None:
        """A text record (e.g. a sample generation): into metrics.jsonl and above the progress bar."""
        if self._file is None:
            return
        self._write({"step": step, name: text})
        message = f"[step {step}] {name}: {text!r}"
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()


def _plain(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _tensorboard_writer(directory: Path):
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            writer_class = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
        except ImportError:
            continue
        return writer_class(str(directory))
    return None


class Throughput:
    """Tokens/s and MFU over the steps since the last call to `rates` (wall clock, host side)."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, devices: int) -> None:
        self.flops_per_token, self.peak_flops, self.devices = flops_per_token, peak_flops, devices
        self._start, self._tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def rates(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed
        rates = {"tokens_per_s": tokens_per_s}
        if self.peak_flops:
            rates["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.devices)
        self._start, self._tokens = time.perf_counter(), 0
        return rates
