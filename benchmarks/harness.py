"""What the benchmark scripts share: child processes, memory probes, machine facts and the markdown table.

Each benchmark runs every (framework, workload) in its own child process (`spawn`), measures memory the same way on
both sides (`MemoryProbe`), and reports the machine's load, so figures from different scripts read alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_checkout_if_not_installed() -> None:
    """Imports smoljax from the checkout these scripts live in when it is not installed (`pip install --no-deps -e .`)."""
    if importlib.util.find_spec("smoljax") is None and os.path.isdir(os.path.join(REPO_ROOT, "smoljax")):
        sys.path.insert(0, REPO_ROOT)


def comma_subset(allowed: tuple[str, ...] | list[str]):
    """An argparse `type` for a comma-separated, non-empty subset of `allowed`, returned in `allowed`'s order."""
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        if not names or any(name not in allowed for name in names):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return [name for name in allowed if name in names]
    return parse


def read_proc_status(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so the next peak belongs to the phase that follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    peak = read_proc_status("VmHWM")
    if peak is None:  # not Linux: ru_maxrss is kB on Linux, bytes on macOS, and never resettable
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak if sys.platform == "darwin" else peak * 1024
    return peak


class MemoryProbe:
    """Memory once the weights are loaded, the peak of the first (compiling) calls, and the peak of the timed calls.

    CPU: the process's RSS; the high-water mark is reset after loading and again before the timed calls. GPU: the
    framework allocator's bytes in use and peak; torch's peak is reset the same way, JAX's cannot be, so for smoljax
    on GPU the driver takes the peak from a second process that loads its programs from the compilation cache."""

    def __init__(self, framework: str, device: Any):
        self.framework, self.device = framework, device
        self.kind = "rss"
        if framework == "jax" and device.platform != "cpu":
            self.kind = "device"
        if framework == "torch" and device.type == "cuda":
            self.kind = "device"
        self.resettable = self._reset()
        self.after_load = self._in_use()
        self.peak_first_calls: int | None = None

    def _reset(self) -> bool:
        if self.kind == "rss":
            return reset_peak_rss()
        if self.framework == "torch":
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        return False

    def _in_use(self) -> int | None:
        if self.kind == "rss":
            return read_proc_status("VmRSS")
        if self.framework == "jax":
            return (self.device.memory_stats() or {}).get("bytes_in_use")
        import torch
        return torch.cuda.memory_allocated(self.device)

    def _peak(self) -> int | None:
        if self.kind == "rss":
            return peak_rss()
        if self.framework == "jax":
            return (self.device.memory_stats() or {}).get("peak_bytes_in_use")
        import torch
        return torch.cuda.max_memory_allocated(self.device)

    def start_steady(self) -> None:
        self.peak_first_calls = self._peak()
        self._reset()

    def finish(self) -> dict[str, Any]:
        if self.kind == "rss":
            how = "peak RSS (VmHWM) of the process during the timed calls" if self.resettable \
                else "peak RSS of the whole process (VmHWM could not be reset)"
        elif self.framework == "jax":
            how = "JAX memory_stats peak_bytes_in_use of the whole process (compilation included)"
        else:
            how = "torch.cuda.max_memory_allocated during the timed calls"
        return {"kind": self.kind, "after_load_bytes": self.after_load,
                "peak_first_calls_bytes": self.peak_first_calls, "peak_bytes": self._peak(), "how": how}


def detect_device() -> str:
    """gpu when JAX sees a CUDA device. Probed in a child so the driver never takes GPU memory."""
    probe = ("import os; os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false'); import jax; "
             "print(any(d.platform == 'gpu' for d in jax.devices()))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
        return "gpu" if out.stdout.strip().endswith("True") else "cpu"
    except (subprocess.SubprocessError, OSError):
        return "cpu"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_busy_seconds() -> float | None:
    """CPU-seconds all processes on the machine have been busy (from /proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def parse_cpus(text: str, parser: argparse.ArgumentParser) -> list[int]:
    if not hasattr(os, "sched_setaffinity"):
        parser.error("--cpus needs Linux (os.sched_setaffinity)")
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        parser.error(f"--cpus expects a list like 0 or 0-3 or 0,2, got {text!r}")
    available = os.sched_getaffinity(0)
    if not cpus or not cpus <= available:
        parser.error(f"--cpus {text} names CPUs this process cannot use; available: {sorted(available)}")
    return sorted(cpus)


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def spawn(script: str, spec: dict[str, Any], label: str, timeout: float) -> dict[str, Any]:
    """Runs `script --child SPEC` and returns the result it wrote, or {'error': the last line of its log}."""
    fd, result_path = tempfile.mkstemp(suffix=".json", dir=spec["workdir"])
    os.close(fd)
    spec = dict(spec, result_path=result_path)
    print(f"  {label} ...", end="", flush=True, file=sys.stderr)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.abspath(script), "--child", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        log += f"\n(killed after {timeout:.0f} s: raise --child-timeout)"
    elapsed = time.perf_counter() - start
    if proc.returncode == 0 and os.path.getsize(result_path):
        with open(result_path) as f:
            result = json.load(f)
        print(f" {elapsed:.1f} s", file=sys.stderr)
    else:
        tail = "\n".join(log.strip().splitlines()[-15:])
        print(f" FAILED after {elapsed:.1f} s (exit {proc.returncode})\n{tail}", file=sys.stderr)
        last = tail.splitlines()[-1] if tail else f"exit {proc.returncode}"
        result = {"error": last}
    result["wall_s"] = elapsed
    return result


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit == "GiB":
        return f"{value / 2**30:.2f} GiB"
    if unit == "ms":
        return f"{value * 1e3:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if value < 10:
        return f"{value:.3g}"
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"

