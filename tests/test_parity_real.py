"""Parity with transformers on the real SmolLM2-135M-Instruct weights, in f32.

Tolerances: log-probabilities agree within 5e-4 (both sides compute in f32; the gap is accumulated rounding over
30 layers and a 49k-way softmax); decode logits equal full-forward logits within 1e-4 (same math, different
reduction order over the cache).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax
import jax.numpy as jnp

from smoljax import generation
from smoljax.models import smollm2
from smoljax.scoring import token_logprobs

TEXTS = {
    "prose": (
        "The history of the Roman Empire spans more than a thousand years, from the founding of the city to the "
        "fall of Constantinople. Historians debate the causes of its decline: economic troubles, overreliance on "
        "mercenaries, political corruption and the pressure of migrating peoples all played a part. Yet the empire "
        "left a legacy of law, language, engineering and architecture that still shapes Europe and the world. Roman "
        "roads, aqueducts and amphitheatres still stand from Britain to Syria, and Latin lives on in French, "
        "Spanish, Italian, Portuguese and Romanian, as well as in the vocabulary of science and medicine."),
    "code": (
        "def fibonacci(n: int) -> list[int]:\n    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n"
        "    numbers = [0, 1]\n    while len(numbers) < n:\n        numbers.append(numbers[-1] + numbers[-2])\n"
        "    return numbers[:n]\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
        "    def push(self, item):\n        self.items.append(item)\n\n    def pop(self):\n"
        "        return self.items.pop()\n"),
    "chat": (
        "<|im_start|>user\nCan you explain photosynthesis in simple terms, and say why it matters for life on "
        "Earth? Please keep it short and friendly.<|im_end|>\n<|im_start|>assistant\nSure! Photosynthesis is how "
        "plants, algae and some bacteria make their own food. They take in sunlight, water and carbon dioxide, "
        "and turn them into sugar and oxygen. It matters because it feeds nearly every food chain, and because the "
        "oxygen it releases is what we and most other living things breathe. Without it, Earth's atmosphere "
        "and its forests, oceans and farms would look very different.<|im_end|>\n"),
}


def _long_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    # About 1,500 tokens: past the 512-token buckets of `token_logprobs`, and quick enough for CI on 2 cores.
    return "\n\n".join(topics[name] for name in ("for", "while", "if", "with"))


def _hf_logprobs(hf_model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0].double()
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    return log_probs.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


@pytest.mark.parametrize("name", [*TEXTS, "long"])
def test_logprobs_match_transformers(real_model, hf_real_model, name):
    config, params, tokenizer, _ = real_model
    text = _long_text() if name == "long" else TEXTS[name]
    tokens = tokenizer.encode(text)
    assert len(tokens) >= (1000 if name == "long" else 100)
    ours = token_logprobs(params, config, tokens)
    theirs = _hf_logprobs(hf_real_model, tokens)
    assert np.max(np.abs(ours - theirs)) <= 5e-4


def test_long_prompt_prefill_matches_transformers(real_model, hf_real_model):
    """A prompt of 600 tokens, left-padded in a batch with a shorter one, goes through generate()'s prefill with
    RMSNorm folded into the projections (smollm2.FOLD_NORM_MIN_TOKENS); its next-token distribution is HF's."""
    config, params, tokenizer, _ = real_model
    long_prompt = tokenizer.encode(_long_text())[:600]
    assert len(long_prompt) * 2 >= smollm2.FOLD_NORM_MIN_TOKENS
    tokens, segments = generation.left_pad([long_prompt, long_prompt[:450]], 600, config.pad_token_id or 0)
    cache = generation.init_cache(config, 2, 640, jnp.float32)
    logits, _ = generation.prefill_jit(params, jnp.asarray(tokens), jnp.asarray(segments), cache, config,
                                       empty_cache=True)
    ours = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for row, prompt in enumerate([long_prompt, long_prompt[:450]]):
        with torch.no_grad():
            theirs = torch.log_softmax(hf_real_model(torch.tensor([prompt])).logits[0, -1].double(), -1).numpy()
        assert np.max(np.abs(ours[row] - theirs)) <= 5e-4


@pytest.mark.parametrize("question", ["What is the capital of France?",
                                      "Write a Python function that reverses a string."])
def test_greedy_continuation_matches_transformers(real_model, hf_real_model, question):
    config, params, tokenizer, _ = real_model
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True)
    ours = generation.generate(params, config, [prompt], max_new_tokens=64, stop_tokens=[]).tokens[0]
    with torch.no_grad():
        out = hf_real_model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                                     eos_token_id=None, pad_token_id=config.pad_token_id,
                                     attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    theirs = out[0, len(prompt):].tolist()
    assert len(ours) == 64
    assert ours == theirs


def test_decode_equals_full_forward(real_model):
    config, params, tokenizer, _ = real_model
    tokens = tokenizer.encode(TEXTS["prose"])[:40]
    prompt_len = 24
    full = np.asarray(smollm2.forward(params, jnp.asarray([tokens]), config))[0]
    cache = generation.init_cache(config, 1, 64, jnp.float32)
    prompt = jnp.asarray([tokens[:prompt_len]])
    logits, cache = generation.prefill_jit(params, prompt, jnp.ones_like(prompt), cache, config)
    stepped = [np.asarray(logits[0])]
    for position in range(prompt_len, len(tokens) - 1):
        logits, cache = generation.decode_step_jit(params, jnp.asarray([tokens[position]]),
                                                   jnp.asarray([position]), cache, config)
        stepped.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.stack(stepped), full[prompt_len - 1:len(tokens) - 1], atol=1e-4, rtol=0)


def test_ragged_batch_equals_single_runs(real_model):
    config, params, tokenizer, _ = real_model
    questions = ["Hi!", "What is 2 + 2?", "Name three colours of the rainbow, and say which one is your favourite."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in questions]
    assert len({len(p) for p in prompts}) == 3
    batched = generation.generate(params, config, prompts, max_new_tokens=24).tokens
    singles = [generation.generate(params, config, [p], max_new_tokens=24).tokens[0] for p in prompts]
    assert batched == singles


def test_chat_answers_the_question(real_model):
    config, params, tokenizer, _ = real_model
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=True)
    result = generation.generate(params, config, [prompt], max_new_tokens=32,
                                 stop_tokens=sorted(tokenizer.stop_token_ids()))
    assert "Paris" in tokenizer.decode(result.tokens[0], skip_special_tokens=True)
    assert result.tokens[0][-1] in tokenizer.stop_token_ids()


def test_decode_step_donates_the_cache(real_model):
    config, params, _, _ = real_model
    cache = generation.init_cache(config, 1, 32, jnp.float32)
    prompt = jnp.asarray([[1, 2, 3, 4]])
    _, new_cache = generation.prefill_jit(params, prompt, jnp.ones_like(prompt), cache, config)
    if jax.default_backend() != "cpu" or cache.k.is_deleted():
        assert cache.k.is_deleted()
    _, newer = generation.decode_step_jit(params, jnp.asarray([5]), jnp.asarray([4]), new_cache, config)
    assert int(newer.end) == 5
