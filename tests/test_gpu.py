"""GPU correctness: runs only where JAX sees a GPU (the H100 of the benchmark machine), skipped elsewhere.

Weights are random at the real SmolLM2-135M shapes and copied into transformers, so both sides compute the same
function on the same device. Tolerances: f32 with `highest` matmul precision agrees within 1e-3 on logits (cuBLAS
and XLA reduce in different orders over 30 layers); bf16 is compared through log-probabilities with a bf16-sized
bound, and cuDNN attention against the XLA reference within bf16 rounding.
"""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

from smoljax import generation
from smoljax.attention import attention
from smoljax.checkpoints.hf_layout import params_to_hf
from smoljax.config import preset
from smoljax.models import smollm2
from smoljax.params import cast_params, init_params, llama_specs


def _hf_model(config, params):
    """transformers' LlamaForCausalLM on the GPU with `params` (f32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict()))
    hf.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in params_to_hf(params, config).items()},
                       strict=False)
    hf.tie_weights()
    return hf.eval().cuda()


@pytest.fixture(scope="module")
def models():
    """The shared HF model is cast in place by the bf16 tests; a test that needs f32 weights builds its own."""
    config = preset("SmolLM2-135M-Instruct")
    params = init_params(llama_specs(config), jax.random.key(0))
    return config, params, _hf_model(config, params)


def _hf_logits(hf, tokens, dtype):
    import torch

    with torch.no_grad():
        return hf.to(dtype)(torch.tensor(tokens).cuda()).logits.float().cpu().numpy()


def test_f32_logits_match_transformers(models):
    config, params, hf = models
    import torch

    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 128))
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(smollm2.forward, static_argnames="config")(params, jnp.asarray(tokens), config))
    torch.backends.cuda.matmul.allow_tf32 = False
    theirs = _hf_logits(hf, tokens, torch.float32)
    assert np.max(np.abs(ours - theirs)) < 1e-3


@pytest.mark.parametrize("attn_impl", ["xla", "cudnn", "pallas"])
def test_bf16_logprobs_match_transformers(models, attn_impl):
    config, params, hf = models
    import torch

    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 128))
    bf16 = cast_params(params, jnp.bfloat16)
    ours = jax.nn.log_softmax(smollm2.forward(bf16, jnp.asarray(tokens), config, attn_impl=attn_impl), -1)
    theirs = torch.log_softmax(torch.tensor(_hf_logits(hf, tokens, torch.bfloat16)), -1).numpy()
    # bf16 keeps 8 bits of mantissa: per-layer rounding differences reach a few 1e-2 in log-probs.
    assert np.mean(np.abs(np.asarray(ours) - theirs)) < 0.05


def test_bf16_long_prompt_prefill_matches_transformers(models):
    """generate()'s prefill of long prompts in bf16 (RMSNorm folded into the projections, cuDNN's causal kernel,
    per-layer cache) against HF's f32 forward: the last position's log-probs. (HF's own bf16 forward lies further
    from its f32 one at this length, 0.088 mean absolute difference where ours measured 0.034.)"""
    config, params, _ = models
    import torch

    hf = _hf_model(config, params)  # f32 weights: the shared model may have been cast to bf16 already
    tokens = np.random.RandomState(5).randint(3, config.vocab_size, (2, 640))
    assert tokens.size >= smollm2.FOLD_NORM_MIN_TOKENS
    bf16 = smollm2.fuse_projections(cast_params(params, jnp.bfloat16))
    cache = generation.init_cache(config, 2, 768, jnp.bfloat16, per_layer=True)
    logits, _ = generation.prefill_jit(bf16, jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32), cache, config,
                                       empty_cache=True)
    ours = np.asarray(jax.nn.log_softmax(logits, -1))
    torch.backends.cuda.matmul.allow_tf32 = False
    theirs = torch.log_softmax(torch.tensor(_hf_logits(hf, tokens, torch.float32)[:, -1]), -1).numpy()
    assert np.mean(np.abs(ours - theirs)) < 0.05


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_cudnn_attention_matches_xla(dtype):
    rng = np.random.RandomState(2)
    batch, length, q_heads, kv_heads, head_dim = 2, 77, 9, 3, 64
    q = jnp.asarray(rng.randn(batch, length, q_heads, head_dim), dtype)
    k = jnp.asarray(rng.randn(batch, length, kv_heads, head_dim), dtype)
    v = jnp.asarray(rng.randn(batch, length, kv_heads, head_dim), dtype)
    segments = jnp.asarray(np.concatenate([np.zeros((batch, 5)), np.ones((batch, length - 5))], 1), jnp.int32)
    positions = smollm2.segment_positions(segments)
    kwargs = dict(q_segments=segments, kv_segments=segments, q_positions=positions, kv_positions=positions)
    reference = attention(q, k, v, implementation="xla", **kwargs)
    fused = attention(q, k, v, implementation="cudnn", **kwargs)
    tolerance = 2e-2 if dtype == jnp.bfloat16 else 4e-3
    np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(reference, np.float32), atol=tolerance)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal, packed, length", [(True, True, 1001), (True, False, 1001), (False, True, 1001),
                                                    (False, False, 1024)])
def test_pallas_flash_attention_matches_xla_on_gpu(dtype, causal, packed, length):
    """The Triton kernels natively, forward and gradients, at head_dim 64 with 9/3 heads, causal or not, at an odd
    length and at whole tiles (bidirectional without segment ids is its own kernel variant)."""
    from smoljax.kernels.flash_attention import flash_attention

    rng = np.random.RandomState(6)
    batch = 2
    q = jnp.asarray(rng.randn(batch, length, 9, 64), dtype)
    k, v = (jnp.asarray(rng.randn(batch, length, 3, 64), dtype) for _ in range(2))
    segments = None
    if packed:
        segments = np.ones((batch, length), np.int32)
        segments[0, 400:] = 2
        segments[1, 900:] = 0
        segments = jnp.asarray(segments)
    weights = jnp.asarray(rng.randn(*q.shape), jnp.float32)
    ones = jnp.ones((batch, length), jnp.int32)
    positions = smollm2.segment_positions(ones if segments is None else segments)
    mask_segments = ones if segments is None else segments

    def reference(q, k, v):
        return attention(q, k, v, q_segments=mask_segments, kv_segments=mask_segments, q_positions=positions,
                         kv_positions=positions, causal=causal, implementation="xla")

    def kernel(q, k, v):
        return flash_attention(q, k, v, q_segments=segments, kv_segments=segments, causal=causal)

    def with_grads(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)  # noqa: E731
        return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))

    with jax.default_matmul_precision("highest"):
        expected = with_grads(reference)(q, k, v)
        actual = with_grads(kernel)(q, k, v)
    tolerance = 3e-2 if dtype == jnp.bfloat16 else 2e-3
    # Outputs and each gradient within the tolerance relative to that array's largest entry.
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   atol=tolerance * scale)


@pytest.mark.parametrize("batch", [1, 64])
def test_pallas_decode_attention_matches_xla_on_gpu(batch):
    from smoljax.kernels.decode_attention import decode_attention

    rng = np.random.RandomState(7)
    slots = 2304
    q = jnp.asarray(rng.randn(batch, 9, 64), jnp.bfloat16)
    k, v = (jnp.asarray(rng.randn(batch, slots, 3, 64), jnp.bfloat16) for _ in range(2))
    start = rng.randint(0, 300, batch)
    end = np.minimum(start + rng.randint(1, 2000, batch), slots)
    segments = (np.arange(slots)[None] >= start[:, None]) & (np.arange(slots)[None] < end[:, None])
    out = decode_attention(q, k, v, jnp.asarray(segments, jnp.int32), jnp.asarray(start), jnp.asarray(end))
    from smoljax.attention import xla_attention
    expected = xla_attention(q[:, None], k, v, jnp.asarray(segments)[:, None, :])[:, 0]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=2e-2)


@pytest.mark.parametrize("batch", [1, 4, 64])
def test_pallas_decode_with_cache_write_matches_xla_on_gpu(batch):
    """RoPE, the cache write and split-K attention in one kernel against the XLA ops, at SmolLM2's head shapes, on
    several random caches."""
    from smoljax import nn
    from smoljax.kernels.decode_attention import append_and_attend, append_and_attend_reference

    rng = np.random.RandomState(9)
    slots, slot = 2304, 1500
    step = jax.jit(append_and_attend, static_argnames="q_heads")
    for trial in range(5):
        qkv = jnp.asarray(rng.randn(batch, 15, 64), jnp.bfloat16)
        cos, sin = nn.rope_cos_sin(jnp.asarray(rng.randint(0, 8000, (batch, 1))), 64, 100000.0, jnp.bfloat16)
        k, v = (jnp.asarray(rng.randn(batch, slots, 3, 64), jnp.bfloat16) for _ in range(2))
        start = rng.randint(0, 300, batch)
        segments = (np.arange(slots)[None] >= start[:, None]) & (np.arange(slots)[None] <= slot)
        case = (qkv, cos[:, 0], sin[:, 0], k, v, jnp.asarray(segments, jnp.int32), jnp.asarray(start, jnp.int32),
                jnp.full((batch,), slot + 1, jnp.int32))
        want = append_and_attend_reference(*case, q_heads=9)
        got = step(*case, q_heads=9)
        # rtol: the kernel rounds RoPE once from f32, the eager reference twice in bf16, so a rotated key can
        # differ by one bf16 step (1/32 between 4 and 8).
        for actual, expected in zip(got, want):
            np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), atol=3e-2,
                                       rtol=1e-2, err_msg=f"trial {trial}")


def _prefill_and_decode(params, config, tokens, segments, positions, *, prefill_impl, decode_impl,
                        per_layer=False, empty_cache=False, unroll_layers=False, fused=False):
    """Logits [9, B, V] of a prefill and 8 decode steps fed the tokens 5, 6, ..., 12 (bf16 cache of 128 slots)."""
    batch = tokens.shape[0]
    cache = generation.init_cache(config, batch, 128, jnp.bfloat16, per_layer=per_layer)
    step_logits, cache = generation.prefill_jit(params, jnp.asarray(tokens), jnp.asarray(segments), cache, config,
                                                prefill_impl, empty_cache=empty_cache)
    steps = [step_logits]
    decode_params = smollm2.unstack_layers(params) if fused else params
    for step in range(8):
        token = jnp.full((batch,), 5 + step, jnp.int32)
        step_logits, cache = generation.decode_step_jit(decode_params, token, positions + step, cache, config,
                                                        decode_impl, unroll_layers, fused)
        steps.append(step_logits)
    return np.stack([np.asarray(x) for x in steps])


def test_bf16_generation_through_the_pallas_kernels_on_gpu(models):
    """Prefill (flash with a query offset; cuDNN's causal kernel into an empty cache) and decode (split-K) against
    the XLA path in bf16: the logits of every step agree within bf16 rounding while both are fed the same tokens."""
    config, params, _ = models
    bf16 = smollm2.fuse_projections(cast_params(params, jnp.bfloat16))
    rng = np.random.RandomState(8)
    prompts = [rng.randint(3, config.vocab_size, n).tolist() for n in (7, 50, 31)]
    tokens, segments = generation.left_pad(prompts, 64, 0)
    positions = jnp.asarray([len(p) for p in prompts], jnp.int32)
    run = functools.partial(_prefill_and_decode, bf16, config, tokens, segments, positions)
    logits = {impl: run(prefill_impl=impl, decode_impl=impl) for impl in ("xla", "pallas")}
    # Unrolled layers on per-layer caches: decode through the kernel with RoPE and the cache write folded in.
    logits["appending"] = run(prefill_impl="pallas", decode_impl="pallas", per_layer=True, unroll_layers=True)
    # generate()'s prefill of an empty cache: the prompts attend to themselves through cuDNN's causal kernel.
    logits["empty_cache"] = run(prefill_impl="cudnn", decode_impl="pallas", per_layer=True, unroll_layers=True,
                                empty_cache=True)
    # The fused layer kernels on the first row alone (they decode one row).
    logits["fused"] = _prefill_and_decode(bf16, config, tokens[:1], segments[:1], positions[:1], prefill_impl="pallas",
                                          decode_impl="pallas", per_layer=True, unroll_layers=True, fused=True)
    probs = {impl: jax.nn.log_softmax(jnp.asarray(x), -1) for impl, x in logits.items()}
    assert float(jnp.mean(jnp.abs(probs["pallas"] - probs["xla"]))) < 0.05
    assert float(jnp.mean(jnp.abs(probs["appending"] - probs["xla"]))) < 0.05
    assert float(jnp.mean(jnp.abs(probs["empty_cache"] - probs["xla"]))) < 0.05
    assert float(jnp.mean(jnp.abs(probs["fused"] - probs["xla"][:, :1]))) < 0.05


def test_ragged_batch_equals_single_runs_on_gpu(models):
    config, params, _ = models
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, config.vocab_size, n).tolist() for n in (5, 17, 40)]
    with jax.default_matmul_precision("highest"):
        batched = generation.generate(params, config, prompts, max_new_tokens=16, stop_tokens=[]).tokens
        singles = [generation.generate(params, config, [p], max_new_tokens=16, stop_tokens=[]).tokens[0]
                   for p in prompts]
    assert batched == singles


def test_serving_layout_decode_equals_the_scan_path_on_gpu(models):
    """The accelerator default (unrolled layers, per-layer cache, fused [out, in] projections) against the plain
    scan over stacked weights: the same greedy tokens in f32 with `highest` precision."""
    config, params, _ = models
    rng = np.random.RandomState(5)
    prompts = [rng.randint(3, config.vocab_size, n).tolist() for n in (9, 30)]
    with jax.default_matmul_precision("highest"):
        serving = generation.generate(params, config, prompts, max_new_tokens=24, stop_tokens=[]).tokens
        plain = generation.generate(params, config, prompts, max_new_tokens=24, stop_tokens=[],
                                    unroll_layers=False, fuse_projections=False).tokens
    assert serving == plain


def test_smolvlm2_logits_match_transformers_on_gpu():
    """SmolVLM2 at the real 500M widths (two layers per tower), random weights, on the GPU in f32: an image prompt's
    logits within 1e-3 of transformers' (same tolerance and reasoning as the text model above)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from smoljax.checkpoints.hf_layout import vlm_params_to_hf
    from smoljax.config import VisionConfig
    from smoljax.models import smolvlm2
    from smoljax.params import vlm_specs

    config = preset("SmolVLM2-500M-Video-Instruct")
    # torch_dtype float32: transformers builds the image-merge buffers in the config's dtype.
    config = config.replace(text=config.text.replace(num_hidden_layers=2, torch_dtype="float32"),
                            vision=VisionConfig(num_hidden_layers=2))
    params = init_params(vlm_specs(config), jax.random.key(1))
    hf = transformers.SmolVLMForConditionalGeneration(transformers.SmolVLMConfig(**config.to_hf_dict()))
    hf.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in vlm_params_to_hf(params, config).items()})
    hf = hf.eval().cuda()
    rng = np.random.RandomState(0)
    tiles = 3
    pixels = rng.uniform(-1, 1, (1, tiles, 3, 512, 512)).astype(np.float32)
    mask = np.ones((1, tiles, 512, 512), bool)
    mask[0, -1, 300:, :] = False  # a padded global image
    pixels[0, -1][:, 300:, :] = 0.0
    ids = [1, 2, 3] + [config.image_token_id] * (tiles * config.image_seq_len) + [4, 5, 6]
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([ids]).cuda(), pixel_values=torch.tensor(pixels).cuda(),
                      pixel_attention_mask=torch.tensor(mask).cuda()).logits.float().cpu().numpy()
    with jax.default_matmul_precision("highest"):
        logits = smolvlm2.forward(params, jnp.asarray([ids]), config, pixel_values=jnp.asarray(pixels[0]),
                                  pixel_mask=jnp.asarray(mask[0]))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("packed", [True, False], ids=["segment-mask", "causal-only"])
def test_bf16_train_step_on_gpu_matches_the_f32_reference(models, packed):
    """One bf16 train step with cuDNN attention (dense segment mask, or its causal kernel for unpacked rows) against
    the f32 XLA step: loss within 2e-2 (bf16 compute over 30 layers, loss ~10.8) and gradient norms within 5%."""
    from smoljax.training.optimizer import OptimizerConfig, lr_schedule, make_optimizer
    from smoljax.training.step import StepOptions, init_state, make_train_step

    config, params, _ = models
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, config.vocab_size, (4, 257)).astype(np.int32)
    lengths = [256, 200, 256, 130]  # rows padded at the end
    mask = (np.arange(256)[None, :] < np.asarray(lengths)[:, None])
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask.astype(np.float32),
             "segment_ids": mask.astype(np.int32), "positions": np.tile(np.arange(256, dtype=np.int32), (4, 1))}
    opt_config = OptimizerConfig(warmup_steps=0)
    optimizer = make_optimizer(opt_config, 10)

    def run(options):
        step = jax.jit(make_train_step(config, optimizer, lr_schedule(opt_config, 10), options))
        _, metrics = step(init_state(params, optimizer), {}, batch)
        return {key: float(value) for key, value in metrics.items()}

    reference = run(StepOptions(compute_dtype="float32", attn_impl="xla", remat="none"))
    # Packed: the scanned layers with remat "dots"; unpacked: the benchmark's set-up (layers unrolled, the cuDNN
    # forward's outputs kept by "dots_attention").
    fast = run(StepOptions(compute_dtype="bfloat16", attn_impl="cudnn", packed=packed,
                           remat="dots" if packed else "dots_attention", unroll_layers=not packed))
    assert abs(fast["loss"] - reference["loss"]) < 2e-2
    assert abs(fast["grad_norm"] - reference["grad_norm"]) < 0.05 * reference["grad_norm"]
    assert fast["tokens"] == reference["tokens"] == sum(lengths)  # every unmasked target trained
