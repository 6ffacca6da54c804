"""AdamW with warmup and decay, global-norm clipping and a weight-decay mask, as one optax transformation."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import optax

from smoljax.errors import ConfigError

DECAYS = ("cosine", "linear", "constant")
# Leaves whose name ends with one of these are never decayed: norm scales and biases (as HF's Trainer and nanoGPT do).
NO_DECAY_SUFFIXES = ("norm", "bias", "scale")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters and the learning-rate schedule (warmup from 0, then `decay` to min_lr_ratio * peak)."""

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ConfigError(f"optimizer.decay must be one of {DECAYS}, got {self.decay!r}")
        checks = {
            "learning_rate": (self.learning_rate, "a finite number > 0", lambda v: v > 0),
            "min_lr_ratio": (self.min_lr_ratio, "a number in [0, 1]", lambda v: 0 <= v <= 1),
            "weight_decay": (self.weight_decay, "a finite number >= 0", lambda v: v >= 0),
            "b1": (self.b1, "a number in [0, 1)", lambda v: 0 <= v < 1),
            "b2": (self.b2, "a number in [0, 1)", lambda v: 0 <= v < 1),
            "eps": (self.eps, "a finite number > 0", lambda v: v > 0),
        }
        if self.max_grad_norm is not None:
            checks["max_grad_norm"] = (self.max_grad_norm, "a finite number > 0 or null", lambda v: v > 0)
        for name, (value, wanted, valid) in checks.items():
            if not _is_finite_number(value) or not valid(value):
                raise ConfigError(f"optimizer.{name} must be {wanted}, got {value!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lr_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_steps`, then cosine, linear or no decay until `total_steps`."""
    peak, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    warmup = max(config.warmup_steps, 0)
    decay_steps = max(total_steps - warmup, 1)
    if config.decay == "cosine":
        decayed = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    elif config.decay == "linear":
        decayed = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decayed = optax.constant_schedule(peak)
    if warmup == 0:
        return decayed
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decayed], [warmup])


def decay_mask(params: Any) -> Any:
    """A tree of bools like `params`: True where weight decay applies (matrices), False for norms and biases."""
    def decays(path, _leaf) -> bool:
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        return not name.endswith(NO_DECAY_SUFFIXES)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm (when `max_grad_norm` is set), then AdamW with the schedule and the decay mask."""
    adamw = optax.adamw(lr_schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=decay_mask)
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
