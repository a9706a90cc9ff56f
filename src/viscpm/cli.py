"""The ``viscpm`` command: a thin shell over the pipelines.

    viscpm chat --image cat.png "What is in the image?"     # one question
    viscpm chat --image cat.png                              # interactive, streamed
    viscpm paint "海上生明月，唯美风格" -o moon.png            # text to image
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from . import __version__

CHAT_HELP = """Chat about an image, in Chinese or English.

With a question: print one answer. Without: an interactive conversation where answers stream as
they are written. Commands there: `:image PATH` switch to another image (the conversation is
kept), `clear` start over, `stop` or Ctrl-D quit.

对图片提问（中文或英文）。不带问题时进入多轮对话：`:image 路径` 换图，`clear` 清空，`stop` 退出。"""


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="official .pt checkpoint or a saved folder (default: the packaged model)")
    parser.add_argument("--config", help="config JSON, when the checkpoint has none beside it")
    parser.add_argument("--vocab", help="CPM-Bee vocab (default: vocab.txt beside the checkpoint)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _add_chat_parser(commands) -> None:
    parser = commands.add_parser("chat", help="chat about an image / 图片对话", description=CHAT_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", help="ask once and exit; omit for an interactive chat")
    parser.add_argument("--image", help="image file (omit for a text-only conversation)")
    _add_model_options(parser)
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--beams", type=int, default=None,
                          help="beam size (default 3 for one-shot answers as in VisCPM; interactive answers stream greedily)")
    decoding.add_argument("--sample", action="store_true", help="sample instead of beam search / greedy")
    decoding.add_argument("--temperature", type=float, default=0.7)
    decoding.add_argument("--top-p", type=float, default=1.0)
    decoding.add_argument("--top-k", type=int, default=0)
    decoding.add_argument("--seed", type=int, default=None, help="random seed for --sample")
    decoding.add_argument("--max-new-tokens", type=int, default=256)
    decoding.add_argument("--repetition-penalty", type=float, default=1.1)
    decoding.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    parser.set_defaults(run=run_chat)


def _generation_options(args: argparse.Namespace) -> dict:
    options = dict(do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, max_new_tokens=args.max_new_tokens,
                   repetition_penalty=args.repetition_penalty, stop=tuple(args.stop))
    if args.beams is not None:
        options["num_beams"] = args.beams
    return options


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    from .pipelines.chat import VisCPMChat, append_turn

    chat = VisCPMChat(args.model, args.config, args.vocab, device=args.device)
    options = _generation_options(args)
    if args.question is not None:
        answer, _, _ = chat.chat(args.image, args.question, **options)
        print(answer, file=stdout)
        return 0

    image, context, states = args.image, "", None
    print("viscpm chat — `:image PATH` 换图 / switch image, `clear` 清空 / reset, `stop` 退出 / quit", file=stdout)
    while True:
        print("User: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "stop":
            print(file=stdout)
            return 0
        question = line.strip()
        if not question:
            continue
        if question == "clear":
            context, states = "", None
            print("(conversation cleared / 已清空)", file=stdout)
            continue
        if question.startswith(":image"):
            path = question[len(":image"):].strip() or None
            try:  # encode now, so a bad file is reported at once and the old image stays
                image, states = path, chat.encode_image(path) if path else None
                print(f"(image: {image or 'none'})", file=stdout)
            except ValueError as error:
                print(f"error: {error}", file=stdout)
            continue
        try:
            if states is None and image is not None:
                states = chat.encode_image(image)
            print("AI: ", end="", file=stdout, flush=True)
            pieces = []
            for piece in chat.stream_chat(image, question, context, states, **options):
                pieces.append(piece)
                print(piece, end="", file=stdout, flush=True)
            print(file=stdout)
            context = append_turn(context, question, "".join(pieces))
        except ValueError as error:  # bad image or prompt: say so and keep the conversation
            print(f"\nerror: {error}", file=stdout)


TRAIN_HELP = """Train one stage of the VisCPM recipe from a TOML config.

Stages: lm (text → a bilingual CPM-Bee), chat-align (LLM frozen; vision learns from captions),
chat-sft (instructions; all parameters or LoRA), paint-bridge, paint-xattn, vae.
Runs on one CPU as is; for several processes or GPUs, or FSDP/DeepSpeed, start it with
`accelerate launch [--config_file FILE] -m viscpm.cli train STAGE --config FILE`."""


# the stage names, kept here so `viscpm --help` does not import the training stack (and diffusers)
TRAIN_STAGES = ("lm", "chat-align", "chat-sft", "vae", "paint-bridge", "paint-xattn")


def _add_train_parser(commands) -> None:
    parser = commands.add_parser("train", help="train a stage / 训练", description=TRAIN_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=TRAIN_STAGES, help="which stage to run")
    parser.add_argument("--config", required=True, help="the stage's TOML config")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig
    from .train.engine import train
    from .train.recipes import build_recipe

    logging.getLogger("viscpm").setLevel(logging.INFO)
    config = TrainConfig.from_file(args.config, args.set)
    train(build_recipe(args.stage, config), config, resume=args.resume)
    return 0


def _add_plot_parser(commands) -> None:
    parser = commands.add_parser("plot", help="plot a run's loss and lr curves / 画训练曲线")
    parser.add_argument("run_dir", help="a training output_dir (holds metrics.jsonl)")
    parser.add_argument("-o", "--output", help="PNG to write (default: RUN_DIR/curves.png)")
    parser.set_defaults(run=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0


PAINT_HELP = """Paint an image from a Chinese or English prompt.

The official release screens prompts and images with safety classifiers and picks the best of 4
images with a Chinese-CLIP ranker. Those are not bundled yet, so this command runs WITHOUT them
(the Python API, VisCPMPaint, accepts your own checker and ranker callables).

根据中文或英文描述生成图片。注意：安全检查与排序模型尚未内置，此命令不做安全检查。"""


def _add_paint_parser(commands) -> None:
    parser = commands.add_parser("paint", help="text to image / 文生图", description=PAINT_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="what to paint")
    parser.add_argument("-o", "--output", default="paint.png",
                        help="image file to write (default paint.png); several images: NAME-1.png … NAME-N.png")
    _add_model_options(parser)
    parser.add_argument("--vae", help="diffusers AutoencoderKL folder (default: vae/ beside the checkpoint)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--negative", help="negative prompt")
    sampling.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    sampling.add_argument("--guidance", type=float, default=7.5,
                          help="classifier-free guidance scale; <= 1 turns it off")
    sampling.add_argument("--size", type=int,
                          help="square image size in pixels (default: the model's, 512 for the official one)")
    sampling.add_argument("--height", type=int, help="image height (overrides --size)")
    sampling.add_argument("--width", type=int, help="image width (overrides --size)")
    sampling.add_argument("--num-images", type=int, default=1)
    sampling.add_argument("--seed", type=int, help="random seed (default: a fresh one, stored in the PNG)")
    # the names of pipelines.paint.SCHEDULERS, spelled out so that `viscpm --help` need not import diffusers
    sampling.add_argument("--scheduler", default="ddpm", choices=["ddpm", "ddim", "euler", "dpm++"],
                          help="sampler (default ddpm, the official one)")
    parser.set_defaults(run=run_paint)


def run_paint(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    from pathlib import Path

    from .pipelines.paint import VisCPMPaint

    stdout = stdout or sys.stdout
    painter = VisCPMPaint(args.model, image_safety_checker=False, prompt_safety_checker=False, add_ranker=False,
                          vocab_path=args.vocab, vae_path=args.vae, config_path=args.config, device=args.device)
    results = painter.paint(args.prompt, args.negative, num_images_per_prompt=args.num_images,
                            guidance_scale=args.guidance, num_inference_steps=args.steps,
                            height=args.height or args.size, width=args.width or args.size,
                            scheduler=args.scheduler, seed=args.seed)
    output = Path(args.output)
    for number, result in enumerate(results, start=1):
        path = output if len(results) == 1 else output.with_name(f"{output.stem}-{number}{output.suffix}")
        result.save(path)
        print(f"{path} (seed {result.seed})", file=stdout)
    return 0


def _add_data_parser(commands) -> None:
    from .shapes.corpus import add_shapes_parser

    parser = commands.add_parser("data", help="write training data / 生成训练数据")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    add_shapes_parser(kinds)


def _add_eval_parser(commands) -> None:
    parser = commands.add_parser("eval", help="evaluate models / 评测")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    shapes = kinds.add_parser("shapes", help="QA, caption and paint scores on ShapesWorld's held-out sets",
                              description="Score chat and paint models on ShapesWorld's held-out sets: QA accuracy "
                              "(EN/ZH), answer-language match, caption accuracy, paint adherence (EN/ZH).")
    shapes.add_argument("--chat", help="chat model (default: the packaged one)")
    shapes.add_argument("--paint", help="paint model (default: the packaged one)")
    shapes.add_argument("--skip-chat", action="store_true")
    shapes.add_argument("--skip-paint", action="store_true")
    shapes.add_argument("--data", help="a ShapesWorld folder from `viscpm data shapes` (default: build one, seed 0)")
    shapes.add_argument("--limit", type=int, default=None, help="use only the first N items of each set")
    shapes.add_argument("--out", help="write the metrics as JSON here")
    shapes.set_defaults(run=run_eval_shapes)


def run_eval_shapes(args: argparse.Namespace) -> int:
    import json
    import tempfile
    from pathlib import Path

    from .shapes.corpus import build_corpora
    from .shapes.evaluate import evaluate_captions, evaluate_paint, evaluate_qa

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.data) if args.data else build_corpora(Path(scratch) / "shapes", seed=0).root
        eval_dir = root / "eval"
        metrics: dict = {"data": str(root) if args.data else "built with seed 0"}
        if not args.skip_chat:
            from .pipelines.chat import VisCPMChat

            chat = VisCPMChat(args.chat)
            metrics.update(evaluate_qa(chat, eval_dir, args.limit))
            metrics.update(evaluate_captions(chat, eval_dir, args.limit))
        if not args.skip_paint:
            from .pipelines.paint import VisCPMPaint

            painter = VisCPMPaint(args.paint, image_safety_checker=False, prompt_safety_checker=False,
                                  add_ranker=False, progress_bar=False)
            metrics.update(evaluate_paint(painter, eval_dir, args.limit))
    text = json.dumps(metrics, indent=2, ensure_ascii=False)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viscpm", description="Bilingual multimodal VisCPM models: chat about images, paint from text.")
    parser.add_argument("--version", action="version", version=f"viscpm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(commands)
    return parser


SUBCOMMANDS: list[Callable] = [
    _add_chat_parser, _add_paint_parser, _add_train_parser, _add_plot_parser, _add_data_parser, _add_eval_parser,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"viscpm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
