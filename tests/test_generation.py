"""The jitted decode loop on a tiny random model: early stopping, streaming, bucketing, context limits.

Greedy tokens are compared with a plain full-forward greedy loop, which is the definition of greedy decoding; both run
the same f32 math, so the tokens must be identical.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smoljax import generation
from smoljax.config import LlamaConfig
from smoljax.errors import InputError
from smoljax.models import smollm2
from smoljax.params import llama_specs

CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                     eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), jnp.float32),
                        llama_specs(CONFIG), is_leaf=lambda x: hasattr(x, "axes"))


def _greedy_by_full_forward(params, prompt, steps):
    sequence = list(prompt)
    for _ in range(steps):
        logits = smollm2.forward(params, jnp.asarray([sequence]), CONFIG)
        sequence.append(int(jnp.argmax(logits[0, -1])))
    return sequence[len(prompt):]


def test_greedy_equals_full_forward_loop(params):
    prompt = [5, 17, 33, 9]
    result = generation.generate(params, CONFIG, [prompt], max_new_tokens=12, stop_tokens=[])
    assert result.tokens[0] == _greedy_by_full_forward(params, prompt, 12)


# (True, True, False) is the accelerator default and the CPU default (unstacked) runs in the test above.
@pytest.mark.parametrize("unroll, fuse, unstack", [(False, False, False), (True, True, False), (False, True, True)])
def test_decode_layouts_give_the_reference_tokens(params, unroll, fuse, unstack):
    """The decode layouts (scan over stacked layers; unrolled layers with per-layer cache buffers; fused [out, in]
    projections; layers unstacked once per call) rearrange the same math: greedy tokens equal the plain
    full-forward loop on a ragged batch."""
    prompts = [[5, 17, 33, 9], [40, 41]]
    result = generation.generate(params, CONFIG, prompts, max_new_tokens=10, stop_tokens=[],
                                 unroll_layers=unroll, fuse_projections=fuse, unstack_layers=unstack)
    assert result.tokens == [_greedy_by_full_forward(params, p, 10) for p in prompts]


def test_fused_projection_logits_match_within_f32_rounding(params):
    """Fused weights change only the summation order of each matmul: logits agree to 1e-5 (f32)."""
    tokens = jnp.asarray([[5, 17, 33, 9, 60, 2]])
    fused = smollm2.fuse_projections(params)
    assert set(fused["layers"]) == {"attn_norm", "mlp_norm", "qkv_proj_t", "o_proj_t", "gate_up_proj_t",
                                    "down_proj_t"}
    np.testing.assert_allclose(smollm2.forward(fused, tokens, CONFIG), smollm2.forward(params, tokens, CONFIG),
                               atol=1e-5, rtol=0)


def test_rows_stop_at_their_stop_token_and_the_loop_ends_early(params):
    prompts = [[5, 17, 33, 9], [40, 41]]
    free_run = generation.generate(params, CONFIG, prompts, max_new_tokens=12, stop_tokens=[]).tokens
    # Make each row's 3rd and 5th free-running tokens the stop tokens: rows must end there, stop token included.
    stops = [free_run[0][2], free_run[1][4]]
    result = generation.generate(params, CONFIG, prompts, max_new_tokens=12, stop_tokens=stops)
    for row, tokens in enumerate(result.tokens):
        first_stop = next(i for i, t in enumerate(free_run[row]) if t in stops)
        assert tokens == free_run[row][:first_stop + 1]
    # The loop ended once both rows had stopped: no callback for steps after that.
    steps = []
    generation.generate(params, CONFIG, prompts, max_new_tokens=12, stop_tokens=stops,
                        on_token=lambda tokens, done: steps.append(done.copy()))
    assert len(steps) == max(len(t) for t in result.tokens) < 12


def test_streaming_callback_and_iterator_see_the_final_tokens(params):
    prompts = [[5, 17, 33, 9], [40, 41, 42]]
    result = generation.generate(params, CONFIG, prompts, max_new_tokens=10, stop_tokens=[])
    seen = []
    generation.generate(params, CONFIG, prompts, max_new_tokens=10, stop_tokens=[],
                        on_token=lambda tokens, done: seen.append(tokens.tolist()))
    assert [list(row) for row in zip(*seen)] == result.tokens
    streamed = list(generation.stream(params, CONFIG, prompts, max_new_tokens=10, stop_tokens=[]))
    assert [list(row) for row in zip(*streamed)] == result.tokens


def test_stream_raises_errors_in_the_consumer(params):
    with pytest.raises(InputError):
        list(generation.stream(params, CONFIG, [[1, 999]], max_new_tokens=4))


def test_prompt_lengths_in_one_bucket_share_a_compilation(params):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None)
    # A batch size no other test uses, so the first call must compile.
    generation.generate(params, CONFIG, [[5, 6, 7]] * 5, max_new_tokens=6, stop_tokens=[])
    before = len(compiles)
    assert before > 0  # the listener does see compilations
    generation.generate(params, CONFIG, [[5, 6, 7, 8, 9, 10, 11], [8, 9]] * 2 + [[4]], max_new_tokens=5,
                        stop_tokens=[])
    assert generation.bucket_length(3) == generation.bucket_length(7)
    assert len(compiles) == before


def test_same_seed_same_tokens_and_sampling_respects_seed(params):
    sampler = generation.Sampler(temperature=1.0)
    runs = [generation.generate(params, CONFIG, [[5, 6]], max_new_tokens=16, sampler=sampler, seed=s,
                                stop_tokens=[]).tokens[0] for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_context_overflow_is_an_error_or_truncates_left(params):
    prompt = list(range(3, 63))  # 60 tokens; context is 64
    with pytest.raises(InputError, match="exceeds the context length"):
        generation.generate(params, CONFIG, [prompt], max_new_tokens=8)
    truncated = generation.generate(params, CONFIG, [prompt], max_new_tokens=8, truncate="left", stop_tokens=[])
    assert truncated.prompt_tokens[0] == prompt[-56:]
    expected = generation.generate(params, CONFIG, [prompt[-56:]], max_new_tokens=8, stop_tokens=[])
    assert truncated.tokens == expected.tokens


@pytest.mark.parametrize("prompts, message", [
    ([[1, 128]], "out of range"), ([[-1, 2]], "out of range"), ([[]], "empty"), ([], "no prompts")])
def test_bad_prompts_give_clear_errors(params, prompts, message):
    with pytest.raises(InputError, match=message):
        generation.generate(params, CONFIG, prompts, max_new_tokens=4)


def test_zero_new_tokens_is_an_error(params):
    with pytest.raises(InputError, match="max_new_tokens"):
        generation.generate(params, CONFIG, [[1, 2]], max_new_tokens=0)


@pytest.mark.parametrize("per_layer, attn_impl", [(False, "xla"), (True, "xla"), (True, "pallas")])
def test_prefill_into_an_empty_cache_equals_the_prefill_over_the_cache(params, per_layer, attn_impl):
    """`empty_cache=True` runs each row with its padding moved to the end and plain causal attention, then writes
    the K/V behind the padding: last-token logits and every live cache slot equal the general prefill's (which
    attends over the cache), on left-padded rows of different lengths, one of them unpadded."""
    prompts = [[5, 17, 33, 9, 60, 2, 7], [40, 41], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    tokens, segments = generation.left_pad(prompts, 16, CONFIG.pad_token_id)
    tokens, segments = jnp.asarray(tokens), jnp.asarray(segments)
    results = {}
    for empty in (False, True):
        cache = generation.init_cache(CONFIG, len(prompts), 24, jnp.float32, per_layer=per_layer)
        results[empty] = generation.prefill(params, tokens, segments, cache, CONFIG, attn_impl, empty_cache=empty)
    (logits, cache), (general_logits, general_cache) = results[True], results[False]
    np.testing.assert_allclose(logits, general_logits, atol=2e-5, rtol=0)
    live = np.asarray(segments != 0)
    for ours, theirs in zip(jax.tree.leaves((cache.k, cache.v)), jax.tree.leaves((general_cache.k, general_cache.v))):
        np.testing.assert_allclose(np.asarray(ours)[..., :16, :, :][..., live, :, :],
                                   np.asarray(theirs)[..., :16, :, :][..., live, :, :], atol=2e-5, rtol=0)
    for name in ("positions", "segments", "end"):
        np.testing.assert_array_equal(getattr(cache, name), getattr(general_cache, name))


def test_prefill_marked_empty_refuses_a_filled_cache(params):
    tokens, segments = generation.left_pad([[5, 17]], 16, CONFIG.pad_token_id)
    cache = generation.init_cache(CONFIG, 1, 32, jnp.float32)
    _, cache = generation.prefill(params, jnp.asarray(tokens), jnp.asarray(segments), cache, CONFIG,
                                  empty_cache=True)
    with pytest.raises(InputError, match="already holds 16 tokens; pass empty_cache=False"):
        generation.prefill(params, jnp.asarray(tokens), jnp.asarray(segments), cache, CONFIG, empty_cache=True)
