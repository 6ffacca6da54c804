"""AdamW with warmup and decay, global-norm clipping and a weight-decay mask, as one optax transformation."""

from __future__ import annotations

import dataclasses
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
        if not self.learning_rate > 0:
            raise ConfigError(f"optimizer.learning_rate must be positive, got {self.learning_rate!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"optimizer.max_grad_norm must be positive or null, got {self.max_grad_norm!r}")


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
