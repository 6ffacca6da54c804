"""Samplers on random logits: which tokens each filter keeps, against a float64 numpy reference and against
transformers' logits warpers, plus seeding through `smoljax.generation.generate`.

Which tokens survive a filter is compared exactly (set equality). That is only well defined when no token sits on a
filter's boundary within float32 rounding, so every reference check first asserts a margin of 1e-5 (relative
probability mass) around the boundary; the logits come from numpy's seeded generator, so the margins are fixed.
Surviving logit values are compared with rtol 1e-6: both sides divide the same f32 logits by the temperature.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smoljax import generation
from smoljax.config import LlamaConfig
from smoljax.errors import InputError
from smoljax.params import abstract_params, llama_specs
from smoljax.sampling import Sampler, greedy

SEEDS = (0, 1, 2)
BATCH, VOCAB = 4, 512
MARGIN = 1e-5


def random_logits(seed: int, scale: float = 3.0) -> np.ndarray:
    """[BATCH, VOCAB] f32 logits; the scale makes distributions peaked enough that the filters keep few tokens."""
    return (scale * np.random.default_rng(seed).standard_normal((BATCH, VOCAB))).astype(np.float32)


def kept(filtered) -> np.ndarray:
    """The surviving tokens of filtered logits, as a boolean mask."""
    return np.isfinite(np.asarray(filtered))


def probs64(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    e = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest set of most likely tokens whose probability mass is >= top_p (float64)."""
    mask = np.zeros(probs.shape, bool)
    for row, p in enumerate(probs):
        order = np.argsort(-p)
        mass = np.cumsum(p[order])
        size = int(np.argmax(mass >= top_p)) + 1
        assert np.min(np.abs(mass - top_p)) > MARGIN, "a prefix mass sits on the boundary; pick another seed"
        mask[row, order[:size]] = True
    return mask


def reference_min_p(probs: np.ndarray, min_p: float) -> np.ndarray:
    ratio = probs / probs.max(axis=-1, keepdims=True)
    assert np.min(np.abs(ratio - min_p)) > MARGIN, "a token sits on the boundary; pick another seed"
    return ratio >= min_p


@functools.partial(jax.jit, static_argnums=(0, 3))
def _draw(sampler: Sampler, logits: jax.Array, key: jax.Array, draws: int) -> jax.Array:
    return jax.vmap(lambda k: sampler(logits, k))(jax.random.split(key, draws))


def sample_many(sampler: Sampler, logits: np.ndarray, draws: int, seed: int = 0) -> np.ndarray:
    """[draws, BATCH] tokens, one independent key per draw (compiled once per sampler setting)."""
    return np.asarray(_draw(sampler, jnp.asarray(logits), jax.random.key(seed), draws))


# --- top-k ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 5, 40])
def test_top_k_samples_never_leave_the_top_k(top_k):
    for seed in SEEDS:
        logits = random_logits(seed, scale=1.0)
        samples = sample_many(Sampler(temperature=1.0, top_k=top_k), logits, draws=2000, seed=seed)
        top = np.argsort(-logits, axis=-1)[:, :top_k]
        for row in range(BATCH):
            assert np.isin(samples[:, row], top[row]).all()
            if top_k > 1:  # it samples rather than always taking the argmax
                assert len(np.unique(samples[:, row])) > 1


def test_top_k_samples_follow_the_renormalised_distribution():
    # 4000 draws: each empirical frequency is within 5 standard errors of its probability (deterministic keys).
    logits = random_logits(3, scale=1.0)
    top_k, draws = 8, 4000
    samples = sample_many(Sampler(temperature=1.0, top_k=top_k), logits, draws=draws, seed=3)
    for row in range(BATCH):
        top = np.argsort(-logits[row])[:top_k]
        p = probs64(logits[row][top][None])[0]
        freq = np.array([(samples[:, row] == token).mean() for token in top])
        assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / draws) + 1e-3)


# --- top-p and min-p against float64 references ------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.8, 0.95])
def test_top_p_keeps_exactly_the_smallest_nucleus(seed, top_p):
    logits = random_logits(seed)
    ours = kept(Sampler(temperature=1.0, top_p=top_p).filter(jnp.asarray(logits)))
    np.testing.assert_array_equal(ours, reference_nucleus(probs64(logits), top_p))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_top_p_applies_to_the_tempered_distribution(seed, temperature):
    logits = random_logits(seed)
    ours = kept(Sampler(temperature=temperature, top_p=0.9).filter(jnp.asarray(logits)))
    np.testing.assert_array_equal(ours, reference_nucleus(probs64(logits, temperature), 0.9))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_keeps_exactly_tokens_above_the_scaled_threshold(seed, min_p):
    logits = random_logits(seed)
    ours = kept(Sampler(temperature=1.0, min_p=min_p).filter(jnp.asarray(logits)))
    expected = reference_min_p(probs64(logits), min_p)
    np.testing.assert_array_equal(ours, expected)
    assert expected.sum() > BATCH  # some rows keep more than their top token


def test_samples_stay_inside_the_filtered_support():
    sampler = Sampler(temperature=1.0, top_p=0.8, min_p=0.05)
    for seed in SEEDS:
        logits = random_logits(seed)
        support = kept(sampler.filter(jnp.asarray(logits)))
        samples = sample_many(sampler, logits, draws=1000, seed=seed)
        for row in range(BATCH):
            assert support[row, samples[:, row]].all()


# --- greedy limits -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_temperature_zero_and_top_k_one_are_greedy(seed):
    logits = jnp.asarray(random_logits(seed))
    argmax = np.argmax(np.asarray(logits), axis=-1)
    for sampler in (Sampler(), Sampler(temperature=0.0, top_k=5, top_p=0.5), Sampler(temperature=1.0, top_k=1)):
        assert sampler.is_greedy
        for key_seed in range(5):
            np.testing.assert_array_equal(np.asarray(sampler(logits, jax.random.key(key_seed))), argmax)
    np.testing.assert_array_equal(np.asarray(greedy(logits)), argmax)


def test_tiny_temperature_equals_greedy():
    for seed in SEEDS:
        logits = random_logits(seed)
        ordered = np.sort(logits, axis=-1)
        # At T = 1e-4 a gap of 1e-2 between the two best logits becomes 100, far beyond any Gumbel noise
        # difference in these draws (|noise| < 20 for 10^5 samples), so sampling must return the argmax.
        assert np.min(ordered[:, -1] - ordered[:, -2]) > 1e-2
        samples = sample_many(Sampler(temperature=1e-4), logits, draws=200, seed=seed)
        np.testing.assert_array_equal(samples, np.broadcast_to(np.argmax(logits, axis=-1), samples.shape))


# --- agreement with transformers' warpers --------------------------------------------------------------------------

WARPER_SETTINGS = [
    dict(temperature=0.7, top_k=20),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02),
    dict(temperature=1.5, top_k=100, min_p=0.1),
]


def transformers_filter(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
                        min_p: float = 0.0) -> np.ndarray:
    """The warpers transformers' `generate` builds for these settings, in its order."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(transformers.TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(transformers.MinPLogitsWarper(min_p))
    scores = torch.from_numpy(logits.copy())
    input_ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    for warper in warpers:
        scores = warper(input_ids, scores)
    return scores.numpy()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("settings", WARPER_SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_filters_agree_with_transformers_warpers(seed, settings):
    logits = random_logits(seed)
    ours = np.asarray(Sampler(**settings).filter(jnp.asarray(logits)))
    theirs = transformers_filter(logits, **settings)
    np.testing.assert_array_equal(kept(ours), kept(theirs))
    assert kept(ours).sum(axis=-1).min() >= 1
    assert kept(ours).sum() < logits.size  # the settings actually filter something
    np.testing.assert_allclose(ours[kept(ours)], theirs[kept(theirs)], rtol=1e-6)


def test_top_k_keeps_ties_like_transformers():
    logits = np.full((2, 16), -1.0, np.float32)
    logits[:, 0] = 3.0
    logits[:, [3, 7, 9]] = 2.0  # three-way tie at the 2nd-largest value
    ours = kept(Sampler(temperature=1.0, top_k=2).filter(jnp.asarray(logits)))
    np.testing.assert_array_equal(ours, kept(transformers_filter(logits, 1.0, top_k=2)))
    assert ours.sum(axis=-1).tolist() == [4, 4]


# --- seeding through generate --------------------------------------------------------------------------------------

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def tiny_params():
    # numpy-drawn weights: jax's random init costs seconds of compilation on a small CPU for no extra coverage here.
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), jnp.float32),
                        abstract_params(llama_specs(TINY)))


def test_same_seed_same_tokens_different_seed_different_tokens(tiny_params):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    sampler = Sampler(temperature=1.0)

    def run(seed):
        return generation.generate(tiny_params, TINY, prompts, max_new_tokens=16, sampler=sampler, seed=seed,
                                   stop_tokens=[]).tokens

    first = run(0)
    assert [len(row) for row in first] == [16, 16]
    assert run(0) == first
    assert run(jax.random.key(0)) == first  # an int seed and the key it names are the same seed
    # The tiny random model's next-token distribution is close to uniform over 256 tokens, so two seeds giving
    # the same 32 tokens would mean the seed is ignored.
    assert run(1) != first
    # Temperature 0 ignores the seed.
    greedy_runs = [generation.generate(tiny_params, TINY, prompts, max_new_tokens=16, seed=seed,
                                       stop_tokens=[]).tokens for seed in (0, 1)]
    assert greedy_runs[0] == greedy_runs[1]


# --- bad settings --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=1.0), "min_p"),
    (dict(min_p=-0.1), "min_p"),
])
def test_bad_settings_raise_input_error(settings, field):
    with pytest.raises(InputError) as excinfo:
        Sampler(**settings)
    message = str(excinfo.value)
    assert field in message and "\n" not in message


def test_sampler_is_hashable_by_value():
    assert hash(Sampler(temperature=0.7, top_k=5)) == hash(Sampler(temperature=0.7, top_k=5))
    assert Sampler(temperature=0.7, top_k=5) != Sampler(temperature=0.7, top_k=6)
