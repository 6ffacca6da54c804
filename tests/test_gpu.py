"""GPU correctness: runs only where JAX sees a GPU (the H100 of the benchmark machine), skipped elsewhere.

Weights are random at the real SmolLM2-135M shapes and copied into transformers, so both sides compute the same
function on the same device. Tolerances: f32 with `highest` matmul precision agrees within 1e-3 on logits (cuBLAS
and XLA reduce in different orders over 30 layers); bf16 is compared through log-probabilities with a bf16-sized
bound, and cuDNN attention against the XLA reference within bf16 rounding.
"""

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


@pytest.fixture(scope="module")
def models():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = preset("SmolLM2-135M-Instruct")
    params = init_params(llama_specs(config), jax.random.key(0))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict()))
    hf.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in params_to_hf(params, config).items()},
                       strict=False)
    hf.tie_weights()
    return config, params, hf.eval().cuda()


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


@pytest.mark.parametrize("attn_impl", ["xla", "cudnn"])
def test_bf16_logprobs_match_transformers(models, attn_impl):
    config, params, hf = models
    import torch

    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 128))
    bf16 = cast_params(params, jnp.bfloat16)
    ours = jax.nn.log_softmax(smollm2.forward(bf16, jnp.asarray(tokens), config, attn_impl=attn_impl), -1)
    theirs = torch.log_softmax(torch.tensor(_hf_logits(hf, tokens, torch.bfloat16)), -1).numpy()
    # bf16 keeps 8 bits of mantissa: per-layer rounding differences reach a few 1e-2 in log-probs.
    assert np.mean(np.abs(np.asarray(ours) - theirs)) < 0.05


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


def test_ragged_batch_equals_single_runs_on_gpu(models):
    config, params, _ = models
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, config.vocab_size, n).tolist() for n in (5, 17, 40)]
    with jax.default_matmul_precision("highest"):
        batched = generation.generate(params, config, prompts, max_new_tokens=16, stop_tokens=[]).tokens
        singles = [generation.generate(params, config, [p], max_new_tokens=16, stop_tokens=[]).tokens[0]
                   for p in prompts]
    assert batched == singles
