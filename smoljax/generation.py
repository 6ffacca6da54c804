"""Generation: prefill plus a decode loop that runs entirely inside one `jax.jit` (`lax.while_loop`).

Prompts are left-padded to a bucketed length, so new prompt lengths reuse compiled programs. The loop stops as soon
as every row has produced a stop token. Streaming sends each step's tokens to the host with an ordered
`io_callback`, from inside the same compiled loop.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from smoljax.attention import Implementation
from smoljax.cache import KVCache, init_cache, whole_blocks
from smoljax.config import LlamaConfig, VLMConfig
from smoljax.errors import InputError
from smoljax.models import smollm2, smolvlm2
from smoljax.sampling import Sampler

TokenSampler = Callable[[jax.Array, jax.Array], jax.Array]
MIN_BUCKET = 16


LINEAR_BUCKETS_FROM = 512
LINEAR_BUCKET_STEP = 256


def bucket_length(length: int, minimum: int = MIN_BUCKET) -> int:
    """Lengths that share a bucket share a compilation: the next power of two >= length (at least `minimum`) up to
    512, then the next multiple of 256, so a long prompt (an image prompt is ~1,100 tokens) pads by at most 256
    tokens rather than nearly doubling its prefill."""
    if length > LINEAR_BUCKETS_FROM:
        return -(-length // LINEAR_BUCKET_STEP) * LINEAR_BUCKET_STEP
    return max(minimum, 1 << max(0, length - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """New tokens per row (each ends at its first stop token, included) and decoding speed."""

    tokens: list[list[int]]
    prompt_tokens: list[list[int]]
    seconds: float = 0.0          # prefill + decode, compilation excluded
    compile_seconds: float = 0.0  # tracing + compilation (near zero when the program was cached)

    @property
    def tokens_per_second(self) -> float:
        return self.num_new_tokens / self.seconds if self.seconds else 0.0

    @property
    def num_new_tokens(self) -> int:
        return sum(len(row) for row in self.tokens)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts to `length`. Returns tokens and segment ids [B, length] (segment 0 = padding)."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    segments = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, length - len(prompt):] = prompt
            segments[row, length - len(prompt):] = 1
    return tokens, segments


def prepare_prompts(prompts: Sequence[Sequence[int]], config: LlamaConfig, max_new_tokens: int,
                    truncate: str | None = None) -> list[list[int]]:
    """Validates prompts against the vocabulary and the context length, truncating on the left if asked to."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens >= config.max_position_embeddings:
        raise InputError(f"max_new_tokens ({max_new_tokens}) must be below the context length "
                         f"({config.max_position_embeddings})")
    if not prompts:
        raise InputError("no prompts given: pass at least one prompt")
    budget = config.max_position_embeddings - max_new_tokens
    prepared = []
    for prompt in prompts:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise InputError("a prompt is empty: give at least one token (e.g. the BOS token)")
        smollm2.check_token_ids(prompt, config.vocab_size)
        if len(prompt) > budget:
            if truncate != "left":
                raise InputError(
                    f"prompt of {len(prompt)} tokens plus max_new_tokens={max_new_tokens} exceeds the context "
                    f"length {config.max_position_embeddings}: shorten the prompt, lower max_new_tokens, or "
                    "truncate the prompt on the left (truncate='left', --truncate left)")
            prompt = prompt[-budget:]
        prepared.append(prompt)
    return prepared


def prefill(params: dict, tokens: jax.Array, segments: jax.Array, cache: KVCache, config: LlamaConfig,
            attn_impl: Implementation = "auto", embeds: jax.Array | None = None,
            empty_cache: bool = False) -> tuple[jax.Array, KVCache]:
    """Writes left-padded prompts [B, P] into the cache. Returns last-token logits [B, V] (f32) and the cache.

    `embeds` [B, P, hidden] replaces the token embeddings (a VLM's prompt with its image features merged in).
    `empty_cache=True` promises a cache that holds nothing yet (as `init_cache` makes it) and one prompt per row
    (segments 0 then 1, as `left_pad` makes them). The prompts then attend only to themselves: each row runs with
    its padding moved to the end, so plain causal attention is exact (cuDNN's causal kernel on GPUs) and no cache
    slot is scanned; the cache gets the same contents as without it. generate() always passes it.
    """
    positions = smollm2.segment_positions(segments)
    x = smollm2.embed(params, tokens) if embeds is None else embeds.astype(params["embed"].dtype)
    if not empty_cache:
        hidden, cache = smollm2.decoder_stack(params, x, config, positions=positions,
                                              segments=segments, cache=cache, attn_impl=attn_impl)
        return smollm2.lm_logits(params, hidden[:, -1:], config)[:, 0], cache
    _check_empty(cache)
    lengths = jnp.sum(segments != 0, axis=1).astype(jnp.int32)
    pad_counts = segments.shape[1] - lengths
    hidden, cache = smollm2.decoder_stack(params, smollm2.shift_rows(x, -pad_counts), config, positions=positions,
                                          segments=segments, cache=cache, attn_impl=attn_impl,
                                          pad_counts=pad_counts)
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)
    return smollm2.lm_logits(params, last, config)[:, 0], cache


def _check_empty(cache: KVCache) -> None:
    """Raises if a cache known outside jit already holds tokens (inside jit its fill is not known)."""
    if isinstance(cache.end, jax.core.Tracer):
        return
    if int(cache.end) != 0:
        raise InputError(f"prefill(empty_cache=True) got a cache that already holds {int(cache.end)} tokens; "
                         "pass empty_cache=False to append a prompt to a filled cache")


def decode_step(params: dict, tokens: jax.Array, positions: jax.Array, cache: KVCache, config: LlamaConfig,
                attn_impl: Implementation = "auto", unroll_layers: bool = False,
                fused_layers: bool = False) -> tuple[jax.Array, KVCache]:
    """Appends one token per row. tokens, positions: [B] -> next-token logits [B, V] (f32) and the cache.
    `fused_layers`: one row through the fused layer kernels (see `use_fused_layers`)."""
    if fused_layers:
        logits, cache = smollm2.fused_decode_forward(params, tokens[:, None], cache, config,
                                                     positions=positions[:, None])
        return logits[:, 0], cache
    logits, cache = smollm2.forward_with_cache(
        params, tokens[:, None], cache, config, positions=positions[:, None],
        segment_ids=jnp.ones_like(tokens)[:, None], attn_impl=attn_impl, unroll=unroll_layers)
    return logits[:, 0], cache


# Jitted entry points for hand-written loops: the cache buffer is donated, so each step updates it in place.
prefill_jit = jax.jit(prefill, static_argnames=("config", "attn_impl", "empty_cache"), donate_argnames=("cache",))
decode_step_jit = jax.jit(decode_step, static_argnames=("config", "attn_impl", "unroll_layers", "fused_layers"),
                          donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("config", "sampler", "stop_ids", "out_length", "cache_length",
                                             "attn_impl", "unroll_layers", "fuse", "unstack", "fused_layers",
                                             "stream"))
def _generate_loop(params: dict, tokens: jax.Array, segments: jax.Array, key: jax.Array,
                   max_new_tokens: jax.Array, embeds: jax.Array | None, *, config: LlamaConfig,
                   sampler: TokenSampler,
                   stop_ids: tuple[int, ...], out_length: int, cache_length: int, attn_impl: Implementation,
                   unroll_layers: bool, fuse: bool, unstack: bool, fused_layers: bool, stream: bool,
                   ) -> tuple[jax.Array, jax.Array]:
    """Prefill and decode inside one program. Returns new tokens [B, out_length] and counts [B]."""
    batch = tokens.shape[0]
    fuse, unstack = fuse or fused_layers, unstack or fused_layers  # the fused kernels read the serving layout
    if fuse:
        params = smollm2.fuse_projections(params)
    # Unstacked layers are sliced here, once, outside the decode loop (an unrolled decode step; see
    # `smollm2.unstack_layers`). The prefill keeps the stacked weights and its layer scan.
    decode_params = smollm2.unstack_layers(params) if unstack else params
    unroll_layers = unroll_layers or unstack
    cache = init_cache(config, batch, cache_length, params["embed"].dtype, per_layer=unroll_layers)
    logits, cache = prefill(params, tokens, segments, cache, config, attn_impl, embeds, empty_cache=True)
    next_positions = jnp.sum(segments != 0, axis=1).astype(jnp.int32)
    stop_array = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    pad_id = stop_ids[0] if stop_ids else 0

    def cond(state):
        step, _, _, _, done, _, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, logits, positions, done, out, counts, key = state
        key, step_key = jax.random.split(key)
        token = sampler(logits, step_key)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        counts = counts + (~done).astype(jnp.int32)
        if stream:
            io_callback(_STREAM_SINK.emit, None, token, done, ordered=True)
        done = done | jnp.isin(token, stop_array)
        logits, cache = decode_step(decode_params, token, positions, cache, config, attn_impl, unroll_layers,
                                    fused_layers)
        return step + 1, cache, logits, positions + 1, done, out, counts, key

    state = (jnp.zeros((), jnp.int32), cache, logits, next_positions, jnp.zeros((batch,), bool),
             jnp.full((batch, out_length), pad_id, jnp.int32), jnp.zeros((batch,), jnp.int32), key)
    state = jax.lax.while_loop(cond, body, state)
    return state[5], state[6]


def use_fused_layers(config: LlamaConfig, batch: int, requested: bool | None, attn_impl: Implementation = "auto",
                     params: dict | None = None) -> bool:
    """Whether decoding runs the fused layer kernels (`smoljax.kernels.decode_layer`). By default (None) they run
    for one row on a GPU, where they measured faster than the XLA fusions (`benchmarks/NOTES-kernels.md` §20), when
    the attention implementation is left to choose and the weights sit on one device; elsewhere only when asked."""
    from smoljax.kernels.decode_layer import supported

    if requested and (batch != 1 or not supported(config)):
        raise InputError("fused_layers=True decodes one row of a model with a power-of-two head_dim: use batch 1, "
                         "or fused_layers=False")
    if requested is not None:
        return requested
    one_device = all(len(leaf.sharding.device_set) == 1 for leaf in jax.tree.leaves(params)
                     if isinstance(leaf, jax.Array))
    return (batch == 1 and jax.default_backend() == "gpu" and attn_impl in ("auto", "pallas")
            and supported(config) and one_device)


class _StreamSink:
    """Hands tokens from the compiled loop to the current listener. Streaming generations run one at a time (under
    `_STREAM_LOCK`), because the compiled program is shared and cannot tell callers apart."""

    listener: Callable[[np.ndarray, np.ndarray], None] | None = None

    def emit(self, token: np.ndarray, done: np.ndarray) -> None:
        if self.listener is not None:
            self.listener(np.asarray(token), np.asarray(done))


_STREAM_SINK = _StreamSink()
_STREAM_LOCK = threading.Lock()


def generate(params: dict, config: LlamaConfig | VLMConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int = 128, sampler: TokenSampler = Sampler(), seed: int | jax.Array = 0,
             stop_tokens: Sequence[int] | None = None, truncate: str | None = None,
             pixel_values: np.ndarray | None = None, pixel_attention_mask: np.ndarray | None = None,
             attn_impl: Implementation = "auto", unroll_layers: bool | None = None,
             fuse_projections: bool | None = None, unstack_layers: bool | None = None,
             fused_layers: bool | None = None,
             on_token: Callable[[np.ndarray, np.ndarray], None] | None = None) -> GenerationResult:
    """Generates up to `max_new_tokens` tokens for each prompt (lists of token ids; lengths may differ).

    For a SmolVLM2 (`VLMConfig`), prompts are the processor's expanded ids and `pixel_values` [B, N, 3, H, W] /
    `pixel_attention_mask` [B, N, H, W] its padded tiles (`smoljax.processor.VLMProcessor` gives all three); the
    image features replace the `<image>` embeddings for the prefill, then decoding runs as for text.

    `sampler` is any `(logits [B, V], key) -> tokens [B]` callable; `Sampler(temperature=..., top_k=..., ...)` gives
    the usual ones. `seed` is an int or a PRNG key: the same seed gives the same tokens. Rows stop at their first stop
    token (default: the config's EOS ids). `on_token(tokens [B], finished [B])` receives each step's tokens as they
    are produced. `truncate='left'` drops the oldest prompt tokens when a prompt would not fit the context.
    `unroll_layers` unrolls the layer loop inside each decode step: a longer compile for less per-step overhead;
    the default (None) unrolls on accelerators, where a decode step is bound by kernel launches, and not on CPU.
    `fuse_projections` runs q/k/v and gate/up as one matmul each (`smollm2.fuse_projections`), at the cost of a
    second copy of those weights while generating; the default (None) fuses on accelerators.
    `unstack_layers` slices the stacked layer weights into per-layer buffers once per call, ahead of an unrolled
    decode loop (`smollm2.unstack_layers`), at the cost of a second copy of the layer weights while generating;
    the default (None) does so on CPU, where a loop slicing stacked weights copies them on every step.
    `fused_layers` decodes a single row with five Pallas kernels per layer (`smoljax.kernels.decode_layer`); the
    default (None) does so for one row on a GPU, where they measured faster than XLA's fusions (`use_fused_layers`).
    """
    vlm_config = config if isinstance(config, VLMConfig) else None
    if vlm_config is not None:
        config = vlm_config.text
        if pixel_values is not None:
            truncate = None  # cutting a prompt could split an image's placeholders from its features
    elif pixel_values is not None:
        raise InputError("pixel_values were given but the model is a text model: images need a SmolVLM2")
    prompts = prepare_prompts(prompts, config, max_new_tokens, truncate)
    if unroll_layers is None:
        unroll_layers = jax.default_backend() != "cpu"
    if fuse_projections is None:
        fuse_projections = jax.default_backend() != "cpu"
    if unstack_layers is None:
        unstack_layers = jax.default_backend() == "cpu"
    stop_ids = tuple(sorted(set(config.eos_token_ids if stop_tokens is None else stop_tokens)))
    prompt_length = bucket_length(max(len(p) for p in prompts))
    out_length = bucket_length(max_new_tokens)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    tokens, segments = left_pad(prompts, prompt_length, pad_id)
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    compile_start = time.perf_counter()
    # Lowering and compiling ahead of the call keeps compilation out of the measured decoding time; both are
    # cached, so a second call with the same shapes and settings compiles nothing.
    embeds = None
    if vlm_config is not None:
        # Encoded before the clock starts: `seconds` is the text model's prefill and decoding, as for text.
        embeds = jax.block_until_ready(
            prompt_embeddings(params, vlm_config, tokens, pixel_values, pixel_attention_mask, attn_impl))
        params = params["text"]
    args = (params, jnp.asarray(tokens), jnp.asarray(segments), key, jnp.asarray(max_new_tokens, jnp.int32),
            embeds)
    compiled = _generate_loop.lower(
        *args, config=config, sampler=sampler, stop_ids=stop_ids, out_length=out_length,
        cache_length=whole_blocks(prompt_length + out_length), attn_impl=attn_impl, unroll_layers=unroll_layers,
        fuse=fuse_projections, unstack=unstack_layers,
        fused_layers=use_fused_layers(config, len(prompts), fused_layers, attn_impl, params),
        stream=on_token is not None).compile()
    start = time.perf_counter()
    if on_token is None:
        out, counts = jax.block_until_ready(compiled(*args))
    else:
        with _STREAM_LOCK:
            _STREAM_SINK.listener = on_token
            try:
                out, counts = jax.block_until_ready(compiled(*args))
            finally:
                _STREAM_SINK.listener = None
    seconds = time.perf_counter() - start
    out, counts = np.asarray(out), np.asarray(counts)
    new_tokens = [out[row, :counts[row]].tolist() for row in range(len(prompts))]
    return GenerationResult(tokens=new_tokens, prompt_tokens=prompts, seconds=seconds,
                            compile_seconds=start - compile_start)


@functools.partial(jax.jit, static_argnames=("config", "attn_impl"))
def _vlm_embeddings(params: dict, tokens: jax.Array, pixel_values: jax.Array | None, pixel_mask: jax.Array | None,
                    config: VLMConfig, attn_impl: Implementation) -> jax.Array:
    return smolvlm2.embed_inputs(params, tokens, pixel_values, pixel_mask, config, attn_impl)


def _real_tiles(pixel_values: np.ndarray, probe: int = 1024) -> np.ndarray:
    """[B, N, C, H, W] -> bool [B, N]: which tiles hold anything (HF's rule: an all-zero tile is padding).

    A tile with a non-zero value among its first `probe` values is real; only the others are scanned whole, so a
    batch of real images costs a few kB of reads instead of a pass over every pixel."""
    flat = pixel_values.reshape(*pixel_values.shape[:2], -1)
    real = np.any(flat[..., :probe] != 0, axis=-1)
    for index in zip(*np.nonzero(~real)):
        real[index] = np.any(flat[index] != 0)
    return real


def prompt_embeddings(params: dict, config: VLMConfig, tokens: np.ndarray, pixel_values: np.ndarray | None,
                      pixel_mask: np.ndarray | None, attn_impl: Implementation = "auto") -> jax.Array:
    """Embeddings [B, P, hidden] of left-padded VLM prompts [B, P] with their image features merged in.

    The real tiles of the padded batch (HF's rule: a tile of all zeros is padding) run through the encoder, and
    only those: each blank tile would cost a full encoder pass, so a new tile count compiles the (small, scanned)
    encoder once instead.
    """
    if pixel_values is None:
        return _vlm_embeddings(params, jnp.asarray(tokens), None, None, config, attn_impl)
    pixel_values = np.asarray(pixel_values, np.float32)
    if pixel_values.ndim != 5:
        raise InputError(f"pixel_values must be [batch, images, 3, height, width], got shape {pixel_values.shape}")
    if pixel_mask is None:
        pixel_mask = np.ones(pixel_values.shape[:2] + pixel_values.shape[3:], bool)
    real = _real_tiles(pixel_values)
    if real.all():  # the usual case: no copy of the (tens of MB) pixel array
        tiles = pixel_values.reshape(-1, *pixel_values.shape[2:])
        masks = np.asarray(pixel_mask, bool).reshape(-1, *pixel_values.shape[3:])
    else:
        tiles = pixel_values[real]
        masks = np.asarray(pixel_mask, bool)[real]
    smolvlm2.check_image_token_count(tokens, len(tiles), config)
    return _vlm_embeddings(params, jnp.asarray(tokens), jnp.asarray(tiles), jnp.asarray(masks), config, attn_impl)


def stream(params: dict, config: LlamaConfig, prompts: Sequence[Sequence[int]], **kwargs: Any,
           ) -> Iterator[list[int | None]]:
    """Like `generate`, but yields each step's tokens as they are produced: one entry per row, None once a row
    has finished. The generation runs on a background thread; the iterator ends when it does."""
    steps: queue.Queue = queue.Queue()
    finished = object()

    def on_token(tokens: np.ndarray, done: np.ndarray) -> None:
        steps.put([None if d else int(t) for t, d in zip(tokens, done)])

    def run() -> None:
        try:
            generate(params, config, prompts, on_token=on_token, **kwargs)
            steps.put(finished)
        except BaseException as err:  # handed to the consuming thread
            steps.put(err)

    threading.Thread(target=run, daemon=True).start()
    while (item := steps.get()) is not finished:
        if isinstance(item, BaseException):
            raise item
        yield item
