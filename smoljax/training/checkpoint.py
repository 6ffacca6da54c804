"""Train-state checkpoints with orbax: async saves, keep-N, and restore onto any mesh.

A checkpoint at step N is a directory `<run>/checkpoints/N/` holding
- `state/`: the TrainState (step, skipped count, trained f32 params, optimizer state, PRNG key), as orbax arrays;
- `data/`: the data iterator's position, JSON, so the batches after a resume are the ones that would have come.

orbax writes each checkpoint into a temporary directory and renames it only once every file is complete, so a save
cut off part-way (SIGKILL, a lost node) leaves the previous checkpoints as they were and `latest_step` ignores it.
Restoring takes the abstract state with the shardings wanted now: a checkpoint written on one mesh restores onto
another (orbax reshards on read).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

from smoljax.errors import CheckpointError


def _orbax():
    import orbax.checkpoint as ocp  # heavy: imported when a checkpoint is first touched
    return ocp


class Checkpointer:
    """Saves and restores `(TrainState, data_state)` under `directory` (created if missing)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True) -> None:
        ocp = _orbax()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Starts saving (returns once the arrays are copied off the devices; files are written in the background)."""
        ocp = _orbax()
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         data=ocp.args.JsonSave(data_state)))

    def latest_step(self) -> int | None:
        """The newest checkpoint's step, or None. It may still be being written by this process's async save:
        `restore` waits for that save to finish first. Checkpoints cut off by a crash are never listed."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """The state at `step` (default: the latest), laid out like `abstract_state` (a tree of
        jax.ShapeDtypeStruct with shardings, e.g. from `abstract_like`), and the saved data position."""
        ocp = _orbax()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}: start without --resume")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f"checkpoint {step} in {self.directory} does not match this run's model and "
                                  f"optimizer ({reason}); resume with the recipe that wrote it") from None
        return restored.state, dict(restored.data)

    def wait(self) -> None:
        """Blocks until background saves have finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """jax.ShapeDtypeStruct leaves with the shapes and dtypes of `tree` and the given shardings (or the arrays' own)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
