"""The `smoljax` command: generate, chat, score, convert, info, train, export.

User errors print one line to stderr and exit with status 2, with no traceback. `--json` output is a contract that
scripts rely on; see the README.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Sequence

EXIT_USER_ERROR = 2


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id, model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="parameter dtype (default float32)")


def _add_image_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image for a SmolVLM2 model (repeatable); an <image> marker in the prompt places "
                             "each one, otherwise the images go before the text")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truncate", choices=("left",), help="drop the oldest prompt tokens if it is too long")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoljax",
                                     description="SmolLM2 and SmolVLM2 in JAX: generate, chat, score, convert.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete a raw prompt")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    _add_image_flag(generate)
    _add_model_flags(generate)
    _add_sampling_flags(generate)

    chat = commands.add_parser("chat", help="chat with the model's template (interactive without MESSAGE)")
    chat.add_argument("message", nargs="?", help="answer this one message and exit")
    chat.add_argument("--system", help="system prompt")
    _add_image_flag(chat)
    _add_model_flags(chat)
    _add_sampling_flags(chat)

    score = commands.add_parser("score", help="per-token log-probabilities and perplexity of a text")
    source = score.add_mutually_exclusive_group(required=True)
    source.add_argument("--text")
    source.add_argument("--file", help="read the text from this file")
    score.add_argument("--json", action="store_true")
    _add_image_flag(score)
    _add_model_flags(score)

    convert = commands.add_parser("convert", help="write a GGUF or HF model as an HF safetensors directory")
    convert.add_argument("source", help="hub id, model directory or .gguf file")
    convert.add_argument("output", help="directory to write (must not hold a model already)")
    convert.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    convert.add_argument("--revision")

    info = commands.add_parser("info", help="the config and a parameter count by component")
    _add_model_flags(info)

    train = commands.add_parser("train", help="run a training recipe (a YAML file, see configs/)")
    train.add_argument("recipe", help="the recipe YAML file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override a recipe value (dotted keys, YAML values), e.g. --set steps=100 "
                            "--set optimizer.learning_rate=1e-4; repeatable")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")

    export = commands.add_parser("export", help="write a training run's weights as an HF model directory")
    export.add_argument("run_dir", help="the run's out_dir")
    export.add_argument("--out", help="directory to write (default: RUN_DIR/export)")
    export.add_argument("--step", type=int, help="checkpoint step to export (default: the newest)")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="stored dtype (default f32)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from smoljax.errors import SmolJaxError

    try:
        return COMMANDS[args.command](args)
    except SmolJaxError as err:
        print(f"smoljax: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


# ---- commands ------------------------------------------------------------------------------------------------------


def _load(args: argparse.Namespace):
    import smoljax
    from smoljax.config import VLMConfig
    from smoljax.errors import CheckpointError, InputError

    loaded = smoljax.load(args.model, dtype=args.dtype, revision=args.revision)
    if loaded.tokenizer is None:
        raise CheckpointError(f"{loaded.source} has no tokenizer.json: the CLI needs the model's tokenizer")
    if getattr(args, "image", None) and not isinstance(loaded.config, VLMConfig):
        raise InputError(f"--image needs a vision-language model, but {loaded.source} is a text model: "
                         "pass --model HuggingFaceTB/SmolVLM2-500M-Video-Instruct (or another SmolVLM2)")
    return loaded


def _text_config(config):
    """The decoder's config: the model's own, or a SmolVLM2's text tower."""
    return getattr(config, "text", config)


def _encode(loaded, text: str, images: list[str]) -> tuple[list[int], Any]:
    """Prompt ids (and the processor's image batch, or None). A SmolVLM2's processor expands the image markers."""
    from smoljax.config import VLMConfig

    if not isinstance(loaded.config, VLMConfig):
        return loaded.tokenizer.encode(text, add_special_tokens=True), None
    from smoljax.processor import place_image_markers

    batch = loaded.processor([place_image_markers(text, len(images))], [images])
    return batch.input_ids[0], batch


def _sampler(args: argparse.Namespace):
    from smoljax.sampling import Sampler

    return Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)


def _run_generation(loaded, prompt_ids: list[int], args: argparse.Namespace, stream_to_tty: bool,
                    images=None) -> dict:
    """Generates for one prompt; streams text to stdout when asked. Returns the JSON contract's object.
    `images` is the processor's batch for a SmolVLM2 prompt with images."""
    from smoljax.generation import generate

    tokenizer = loaded.tokenizer
    stop = sorted(set(_text_config(loaded.config).eos_token_ids) | tokenizer.stop_token_ids())
    printer = _StreamPrinter(tokenizer) if stream_to_tty else None
    pixels = {} if images is None or images.pixel_values is None else {
        "pixel_values": images.pixel_values, "pixel_attention_mask": images.pixel_attention_mask}
    result = generate(loaded.params, loaded.config, [prompt_ids], max_new_tokens=args.max_new_tokens,
                      sampler=_sampler(args), seed=args.seed, stop_tokens=stop, truncate=args.truncate,
                      on_token=printer.on_token if printer else None, **pixels)
    new_tokens = result.tokens[0]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    if printer:
        printer.finish(text)
    return {"prompt_tokens": result.prompt_tokens[0], "tokens": new_tokens, "text": text,
            "tokens_per_s": round(result.tokens_per_second, 3)}


class _StreamPrinter:
    """Prints text as tokens arrive, holding back incomplete UTF-8 (decoded text ending in U+FFFD)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def on_token(self, tokens, done) -> None:
        if done[0]:
            return
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def finish(self, text: str) -> None:
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
        sys.stdout.write("\n")
        sys.stdout.flush()


def _emit(result: dict, args: argparse.Namespace, streamed: bool) -> None:
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif not streamed:
        print(result["text"])


def cmd_generate(args: argparse.Namespace) -> int:
    loaded = _load(args)
    prompt_ids, images = _encode(loaded, args.prompt, args.image)
    stream = sys.stdout.isatty() and not args.json
    if stream:
        sys.stdout.write(args.prompt)
    _emit(_run_generation(loaded, prompt_ids, args, stream, images), args, stream)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    loaded = _load(args)
    messages: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    if args.image and args.message is None:
        from smoljax.errors import InputError
        raise InputError("--image works with a one-shot chat: give the MESSAGE on the command line")
    if args.message is not None:
        content: Any = args.message
        if args.image:
            content = [{"type": "image"} for _ in args.image] + [{"type": "text", "text": args.message}]
        messages.append({"role": "user", "content": content})
        stream = sys.stdout.isatty() and not args.json
        _emit(_chat_turn(loaded, messages, args, stream), args, stream)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:  # EOF ends the conversation
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        stream = sys.stdout.isatty() and not args.json
        result = _chat_turn(loaded, messages, args, stream)
        _emit(result, args, stream)
        messages.append({"role": "assistant", "content": result["text"]})


def _chat_turn(loaded, messages: list[dict[str, Any]], args: argparse.Namespace, stream: bool) -> dict:
    from smoljax.config import VLMConfig

    if not isinstance(loaded.config, VLMConfig):
        prompt_ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return _run_generation(loaded, prompt_ids, args, stream)
    processor = loaded.processor
    batch = processor([processor.apply_chat_template(messages)], [args.image])
    return _run_generation(loaded, batch.input_ids[0], args, stream, batch)


def cmd_score(args: argparse.Namespace) -> int:
    import numpy as np

    from smoljax.errors import InputError
    from smoljax.scoring import token_logprobs

    text = args.text if args.text is not None else _read_text(args.file)
    loaded = _load(args)
    tokens, images = _encode(loaded, text, args.image)
    context = _text_config(loaded.config).max_position_embeddings
    if len(tokens) < 2:
        raise InputError("the text has fewer than 2 tokens: there is nothing to score")
    if len(tokens) > context:
        raise InputError(f"the text has {len(tokens)} tokens, more than the context length "
                         f"{context}: score a shorter text")
    if images is not None:
        from smoljax.scoring import vlm_token_logprobs
        logprobs = vlm_token_logprobs(loaded.params, loaded.config, tokens, images.pixel_values,
                                      images.pixel_attention_mask)
    else:
        logprobs = token_logprobs(loaded.params, _text_config(loaded.config), tokens)
    perplexity = float(math.exp(-np.mean(logprobs)))
    if args.json:
        print(json.dumps({"tokens": tokens, "logprobs": [None] + [float(x) for x in logprobs],
                          "perplexity": perplexity}))
    else:
        for token, logprob in zip(tokens[1:], logprobs):
            print(f"{logprob:10.4f}  {loaded.tokenizer.decode([token])!r}")
        print(f"perplexity {perplexity:.4f} over {len(logprobs)} tokens")
    return 0


def _read_text(path: str) -> str:
    from smoljax.errors import InputError

    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"{path} does not exist: pass an existing text file to --file") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text: score takes a text file") from None


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    import smoljax
    from smoljax.errors import SmolJaxError

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise SmolJaxError(f"{output} is not empty: convert into a new or empty directory so nothing is overwritten")
    from tqdm import tqdm

    with tqdm(total=3, desc="convert", unit="step", disable=None) as progress:
        progress.set_postfix_str("reading")
        loaded = smoljax.load(args.source, dtype="float32", revision=args.revision)
        progress.update()
        progress.set_postfix_str("writing")
        from smoljax.config import VLMConfig
        processor = loaded.processor if isinstance(loaded.config, VLMConfig) else None
        smoljax.save_pretrained(output, loaded.config, loaded.params, loaded.tokenizer, processor=processor,
                                dtype=args.dtype)
        progress.update()
        progress.set_postfix_str("done")
        progress.update()
    print(f"wrote {output} ({args.dtype})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import smoljax
    from smoljax.params import count_params, param_breakdown

    loaded = smoljax.load(args.model, dtype=args.dtype, revision=args.revision)
    print(f"model: {loaded.source}")
    for key, value in loaded.config.to_hf_dict().items():
        print(f"  {key}: {value}")
    print("parameters:")
    for name, count in param_breakdown(loaded.params).items():
        print(f"  {name:20s} {count:>14,}")
    print(f"  {'total':20s} {count_params(loaded.params):>14,}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from smoljax.training.recipe import load_recipe
    from smoljax.training.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    metrics = train(recipe, resume=args.resume)
    summary = ", ".join(f"{key} {value:.4g}" for key, value in metrics.items()
                        if key in ("loss", "grad_norm", "tokens_per_s", "mfu"))
    print(f"trained {recipe.out_dir} to step {recipe.steps}" + (f": {summary}" if summary else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from smoljax.training.trainer import export_run

    written = export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype)
    print(f"wrote {written}")
    return 0


COMMANDS: dict[str, Any] = {"generate": cmd_generate, "chat": cmd_chat, "score": cmd_score,
                            "convert": cmd_convert, "info": cmd_info, "train": cmd_train, "export": cmd_export}

if __name__ == "__main__":
    sys.exit(main())
