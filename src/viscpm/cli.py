"""The ``viscpm`` command: a thin shell over the pipelines.

    viscpm chat --image cat.png "What is in the image?"     # one question
    viscpm chat --image cat.png                              # interactive, streamed
    viscpm paint "海上生明月，唯美风格" -o moon.png            # text to image
    viscpm serve                                             # API + web page on http://127.0.0.1:8000
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from . import __version__
from .extras import MissingExtra, require

REFUSED_STATUS = 3  # exit status when a safety checker refused the prompt or image

CHAT_HELP = """Chat about an image, in Chinese or English.

With a question: print one answer. Without: an interactive conversation where answers stream as
they are written. Commands there: `:image PATH` load or switch the image (the conversation is
kept; `:image` alone drops the image), `clear` start over, `stop` or Ctrl-D quit. Ctrl-C stops
the answer being written and keeps the conversation; Ctrl-C twice at the prompt quits. Without an
image the model answers from the text alone (and may describe a scene it cannot see): the chat
says so.

对图片提问（中文或英文）。不带问题时进入多轮对话，回答逐字输出：`:image 路径` 加载或换图（保留对话），
`clear` 清空，`stop` 或 Ctrl-D 退出；Ctrl-C 中断当前回答并保留对话，在提示符处连按两次 Ctrl-C 退出。
未加载图片时模型只根据文字回答（可能臆造画面），对话中会提示。

examples / 示例:
  viscpm chat --image cat.png "What is in the image?"
  viscpm chat --image cat.png "图片里有什么？" --sample --temperature 0.8 --seed 1
  viscpm chat --image cat.png                      # interactive / 多轮对话"""

CONTEXT_BUDGET_HELP = ("most tokens one conversation may hold: prompt + image queries + the longest answer asked "
                       "for (default 4096); a longer one is refused before any memory is allocated")
QUIT_COMMANDS = {"stop", "退出"}
NO_IMAGE_NOTICE = ("no image loaded / 未加载图片: answers come from the text alone and may describe a scene the model "
                   "cannot see / 回答仅依据文字，可能臆造画面")
LOAD_IMAGE_HINT = f"({NO_IMAGE_NOTICE}; load one with / 加载图片: `:image PATH`)"
CLEAR_COMMANDS = {"clear", "清空"}


def _or_default(value, default):
    """A flag's value, or the library default it leaves out (defaults live in modules --help must not import)."""
    return default if value is None else value


def _add_quant_option(parser) -> None:
    parser.add_argument("--quant", choices=("int8", "int4"),
                        help="weight-only quantization of the language model's linear layers (chat: also the "
                             "vision encoder): less memory, faster CPU decoding (default: off)")


def _add_placement_options(parser) -> None:
    parser.add_argument("--device-map", metavar="auto|JSON",
                        help="spread the model over GPUs, CPU and disk with accelerate: auto (fill --max-memory "
                             "in order, the rest on disk) or a JSON file {module: device or \"disk\"}")
    parser.add_argument("--max-memory", action="append", metavar="DEVICE=SIZE",
                        help="with --device-map auto: what a device may hold, e.g. 0=20GiB or cpu=30GiB (repeatable)")
    parser.add_argument("--offload-folder", metavar="DIR", help="where --device-map writes the layers it puts on disk")


def _placement(args: argparse.Namespace) -> dict:
    """The pipelines' device_map / max_memory / offload_folder from the placement flags."""
    import json
    from pathlib import Path

    if args.device_map is None:
        if args.max_memory or args.offload_folder:
            raise ValueError("--max-memory and --offload-folder need --device-map")
        return {}
    device_map = args.device_map
    if device_map != "auto":
        try:
            device_map = json.loads(Path(device_map).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--device-map {args.device_map}: not JSON ({error})") from None
    max_memory = None
    if args.max_memory:
        max_memory = {}
        for item in args.max_memory:
            device, _, size = item.partition("=")
            if not device or not size:
                raise ValueError(f"--max-memory {item!r}: write DEVICE=SIZE, e.g. cpu=30GiB or 0=20GiB")
            max_memory[int(device) if device.isdigit() else device] = size
    return dict(device_map=device_map, max_memory=max_memory, offload_folder=args.offload_folder)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="official .pt checkpoint or a saved folder (default: the packaged model)")
    parser.add_argument("--config", help="config JSON, when the checkpoint has none beside it")
    parser.add_argument("--vocab", help="CPM-Bee vocab (default: vocab.txt beside the checkpoint)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    _add_quant_option(parser)
    _add_placement_options(parser)


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
    decoding.add_argument("--max-context-tokens", type=int, default=None, metavar="N",
                          help=CONTEXT_BUDGET_HELP)
    decoding.add_argument("--language", choices=("auto", "zh", "en", "off"), default=None,
                          help="answer language / 回答语言: auto answers in the question's language (the interactive "
                               "default), zh/en force one, off leaves the model free (the official behaviour; the "
                               "default for one question)")
    safety = parser.add_argument_group("safety")
    _add_image_checker_option(safety)
    parser.set_defaults(run=run_chat)


def _add_image_checker_option(group) -> None:
    group.add_argument("--image-checker", default="default", metavar="{default,nudenet,off,FOLDER}",
                       help="image safety checker: NudeNet when installed with `pip install 'viscpm[safety]'` "
                            "(default; else none), off, or a folder with the official Stable Diffusion safety checker")


def _generation_options(args: argparse.Namespace) -> dict:
    options = dict(do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, max_new_tokens=args.max_new_tokens,
                   repetition_penalty=args.repetition_penalty, stop=tuple(args.stop))
    if args.beams is not None:
        options["num_beams"] = args.beams
    return options


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    from .pipelines.chat import DEFAULT_MAX_CONTEXT_TOKENS, ContextTooLong, VisCPMChat, append_turn

    chat = VisCPMChat(args.model, args.config, args.vocab, device=args.device, quant=args.quant, **_placement(args),
                      image_safety_checker=args.image_checker,
                      max_context_tokens=_or_default(args.max_context_tokens, DEFAULT_MAX_CONTEXT_TOKENS))
    options = _generation_options(args)
    # a conversation drifts to the previous turn's language (issue 24), so the interactive chat follows
    # each question's by default; one question keeps the official free choice unless told
    language = args.language or ("off" if args.question is not None else "auto")
    options["language"] = None if language == "off" else language
    if args.question is not None:
        if args.image is None:  # on stderr, so a script reading the answer from stdout is unaffected
            print(f"viscpm chat: {NO_IMAGE_NOTICE}; pass --image PATH to ask about an image", file=sys.stderr)
        answer, _, _ = chat.chat(args.image, args.question, **options)
        print(answer, file=stdout)
        return 0

    image, context, states = args.image, "", None
    print("viscpm chat — `:image PATH` 换图 / load an image, `clear` 清空 / reset, `stop` 退出 / quit, "
          "Ctrl-C 中断回答 / interrupt an answer", file=stdout)
    print(f"(image / 图片: {image})" if image else LOAD_IMAGE_HINT, file=stdout)
    interrupted_at_prompt = False
    while True:
        question, pieces = None, []
        try:  # Ctrl-C anywhere in a turn lands below, so it never ends the conversation by surprise
            print("User: ", end="", file=stdout, flush=True)
            line = stdin.readline()
            if not line or line.strip() in QUIT_COMMANDS:
                print(file=stdout)
                return 0
            interrupted_at_prompt = False
            question = line.strip()
            if not question:
                continue
            if question in CLEAR_COMMANDS:
                context, states = "", None
                print("(conversation cleared / 已清空)", file=stdout)
                continue
            if question.startswith(":image"):
                path = question[len(":image"):].strip() or None
                try:  # encode now, so a bad file is reported at once and the old image stays
                    image, states = path, chat.encode_image(path) if path else None
                    print(f"(image / 图片: {image})" if image else LOAD_IMAGE_HINT, file=stdout)
                except ValueError as error:
                    print(f"error: {error}", file=stdout)
                continue
            if states is None and image is not None:
                states = chat.encode_image(image)
            print("AI: ", end="", file=stdout, flush=True)
            for piece in chat.stream_chat(image, question, context, states, **options):
                pieces.append(piece)
                print(piece, end="", file=stdout, flush=True)
            print(file=stdout)
            context = append_turn(context, question, "".join(pieces))
        except KeyboardInterrupt:
            if question is None:  # at the prompt: the first Ctrl-C only clears the line
                if interrupted_at_prompt:
                    print(file=stdout)
                    return 0
                interrupted_at_prompt = True
                print("\n(Ctrl-C again or Ctrl-D to quit / 再按 Ctrl-C 或 Ctrl-D 退出)", file=stdout)
                continue
            # an answer (or an image being loaded) stopped: keep what was written, so the conversation reads as
            # the user saw it; stopped before a word, the question is dropped and the conversation stays as it was
            print(" (interrupted / 已中断)", file=stdout)
            if pieces:
                context = append_turn(context, question, "".join(pieces))
        except ContextTooLong as error:  # only a new conversation helps here
            print(f"\nerror: {error}\n(type `clear` to start a new conversation / 输入 clear 开始新对话)", file=stdout)
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
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output_dir from its last complete checkpoint (same settings and data)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a non-empty output_dir (removes its checkpoints, final/ and metrics)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig
    from .train.engine import train
    from .train.recipes import build_recipe
    from .train.state import check_output_dir, run_fingerprint

    logging.getLogger("viscpm").setLevel(logging.INFO)
    config = TrainConfig.from_file(args.config, args.set)
    # refuse a used output_dir before spending minutes loading the model (train() checks again)
    check_output_dir(config.train.output_dir, run_fingerprint(args.stage, config), resume=args.resume,
                     overwrite=args.overwrite)
    train(build_recipe(args.stage, config), config, resume=args.resume, overwrite=args.overwrite)
    import torch

    if torch.distributed.is_initialized():  # skip gloo's teardown, which can deadlock (see train())
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
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

Safety and ranking, all offline (switch each off with `off`, or point it at the official model's folder):
  prompt  a bilingual word list (default; add terms with --word-list), or the official BERT classifier;
          a flagged prompt is refused (exit status 3) and nothing is painted
  images  NudeNet when installed (`pip install 'viscpm[safety]'`), or the official Stable Diffusion
          safety checker; flagged images are written black and reported
  ranker  with the packaged model: each image is the best of 4, scored by the packaged chat model
          (self-reranking); or the official Chinese-CLIP (a folder); or a chat model (a folder or .pt)

根据中文或英文描述生成图片。默认：词表检查提示词（被拒绝时退出码为 3），安装 viscpm[safety] 后用 NudeNet
检查图片（不安全的图片输出为黑图），使用内置模型时由内置对话模型从 4 张候选中选出最佳。

examples / 示例:
  viscpm paint "海上生明月，唯美风格" -o moon.png --seed 42
  viscpm paint "a cat on a sofa" -o cat.png --scheduler dpm++ --steps 25 --num-images 4
  viscpm paint "一只猫" --preset fast --attention-slicing auto --vae-tiling   # quicker, less memory"""


def _attention_slice(text: str) -> str | int:
    """--attention-slicing: auto, max or a number of heads per slice."""
    if text in ("auto", "max"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected auto, max or a positive number of heads, got {text!r}")


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
    # the names of pipelines.paint.SAMPLING_PRESETS, spelled out for the same reason as --scheduler's
    sampling.add_argument("--preset", default="official", choices=["official", "fast"],
                          help="sampler and steps: official (DDPM, 50 steps; default) or fast (SDE-DPM-Solver++, 20 "
                               "steps: 2.5x quicker, same ShapesWorld adherence); --scheduler/--steps override it")
    sampling.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    sampling.add_argument("--guidance", type=float,
                          help="classifier-free guidance scale; <= 1 turns it off (default: the model's "
                               "generation_config.json, else the official 7.5; the packaged model's is 4)")
    sampling.add_argument("--size", type=int,
                          help="square image size in pixels (default: the model's, 512 for the official one)")
    sampling.add_argument("--height", type=int, help="image height (overrides --size)")
    sampling.add_argument("--width", type=int, help="image width (overrides --size)")
    sampling.add_argument("--num-images", type=int, default=1)
    sampling.add_argument("--seed", type=int, help="random seed (default: a fresh one, stored in the PNG)")
    # the names of pipelines.paint.SCHEDULERS, spelled out so that `viscpm --help` need not import diffusers
    sampling.add_argument("--scheduler", choices=["ddpm", "ddim", "euler", "dpm++", "dpm++-sde"],
                          help="sampler (default: the preset's; ddpm is the official one)")
    edit = parser.add_argument_group("editing an image / 改图")
    edit.add_argument("--image", help="start from this image (image-to-image; resized to the painting's size)")
    edit.add_argument("--mask", help="repaint only where this mask is white (inpainting; same size as --image)")
    edit.add_argument("--strength", type=float,
                      help="0 keeps the image, 1 repaints it all (default 0.8 with --image, 1 with --mask)")
    memory = parser.add_argument_group("memory (diffusers' switches; slower, for big images or small machines)")
    memory.add_argument("--attention-slicing", type=_attention_slice, metavar="{auto,max,N}",
                        help="UNet attention a slice of heads at a time")
    memory.add_argument("--vae-slicing", action="store_true", help="decode the images one at a time")
    memory.add_argument("--vae-tiling", action="store_true",
                        help="decode large images in overlapping tiles (pixels change slightly at the seams)")
    safety = parser.add_argument_group("safety and ranking")
    _add_paint_checker_options(safety)
    safety.add_argument("--candidates", type=int, default=4, help="candidates per image when ranking (default 4)")
    parser.set_defaults(run=run_paint)


def _add_paint_checker_options(group) -> None:
    """The safety checker and ranker flags, shared by ``viscpm paint`` and ``viscpm serve``."""
    group.add_argument("--prompt-checker", default="default", metavar="{default,lexicon,off,FOLDER}",
                       help="prompt safety checker: the offline word list (default, = lexicon), off, or a folder "
                            "with the official BERT classifier")
    group.add_argument("--word-list", action="append", default=[], metavar="FILE",
                       help="more blocked terms for the word list checker, one per line; `!phrase` allows a phrase "
                            "(repeatable)")
    _add_image_checker_option(group)
    group.add_argument("--ranker", default="default", metavar="{default,self,off,FOLDER}",
                       help="rerank candidates: self-reranking with the packaged chat model when painting with the "
                            "packaged model (default; else off), off, a Chinese-CLIP folder, or a chat model to "
                            "self-rerank with")


def _paint_checkers(args: argparse.Namespace) -> dict:
    """VisCPMPaint's checker and ranker arguments from the flags of ``_add_paint_checker_options``."""
    from .safety import load_prompt_checker

    if args.word_list and args.prompt_checker.lower() not in ("default", "lexicon"):
        raise ValueError("--word-list adds terms to the word list checker; it cannot go with "
                         f"--prompt-checker {args.prompt_checker}")
    return dict(image_safety_checker=args.image_checker,
                prompt_safety_checker=load_prompt_checker(args.prompt_checker, args.word_list) or False,
                add_ranker=args.ranker)


def run_paint(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    from pathlib import Path

    from .pipelines.paint import MemoryOptions, VisCPMPaint

    stdout = stdout or sys.stdout
    painter = VisCPMPaint(args.model, **_paint_checkers(args), vocab_path=args.vocab, vae_path=args.vae,
                          config_path=args.config,
                          memory=MemoryOptions(args.attention_slicing, args.vae_slicing, args.vae_tiling),
                          device=args.device, quant=args.quant, **_placement(args))
    results = painter.paint(args.prompt, args.negative, num_images_per_prompt=args.num_images,
                            guidance_scale=args.guidance, num_inference_steps=args.steps,
                            height=args.height or args.size, width=args.width or args.size,
                            scheduler=args.scheduler, preset=args.preset, seed=args.seed,
                            num_candidates=args.candidates, image=args.image, mask_image=args.mask,
                            strength=args.strength)
    output = Path(args.output)
    for number, result in enumerate(results, start=1):
        path = output if len(results) == 1 else output.with_name(f"{output.stem}-{number}{output.suffix}")
        result.save(path)
        notes = [f"seed {result.seed}"]
        if "ranker" in result.metadata:
            ranked = result.metadata["ranker"]
            notes.append(f"best of {len(ranked['candidate_seeds'])} by {ranked['name']}")
        if result.flagged:
            notes.append(f"FLAGGED and written black: {result.flag_reason}")
        print(f"{path} ({'; '.join(notes)})", file=stdout)
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
    shapes.add_argument("--beams", type=int, default=1,
                        help="chat beam size (default 1, greedy as when streaming; 3 is one-shot viscpm chat's)")
    shapes.add_argument("--guidance", type=float, default=4.0,
                        help="paint guidance scale (default 4, as in README's tables, whatever the model's default)")
    _add_report_options(shapes)
    _add_quant_option(shapes)
    shapes.set_defaults(run=run_eval_shapes)
    rerank = kinds.add_parser(
        "rerank", help="paint adherence on ShapesWorld with and without reranking",
        description="Paint each held-out ShapesWorld prompt K times and report adherence for the first candidate, "
                    "the mean over candidates (no reranking), the candidate each ranker picks, and the oracle.")
    rerank.add_argument("--paint", help="paint model (default: the packaged one)")
    rerank.add_argument("--chat", help="chat model for self-reranking (default: the packaged one)")
    rerank.add_argument("--clip", help="also rank with Chinese-CLIP from this folder")
    rerank.add_argument("--candidates", type=int, default=4, help="candidates per prompt (default 4)")
    rerank.add_argument("--data", help="a ShapesWorld folder from `viscpm data shapes` (default: build one, seed 0)")
    rerank.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    _add_report_options(rerank)
    rerank.set_defaults(run=run_eval_rerank)
    # --- issue 23: llava-bench, paint and compare live in viscpm.evaluation.commands ---
    from .evaluation.commands import add_benchmark_parsers

    add_benchmark_parsers(kinds)


def _add_report_options(parser) -> None:
    parser.add_argument("--out", metavar="FILE", help="also write all metrics (examples included) as JSON here")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")


def _report_metrics(metrics: dict, args: argparse.Namespace) -> None:
    """The summary table (or, with --json, the JSON) on stdout; the JSON file with --out."""
    import json
    from pathlib import Path

    from .metrics_table import format_metrics

    text = json.dumps(metrics, indent=2, ensure_ascii=False)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text if args.json else format_metrics(metrics))


def run_eval_shapes(args: argparse.Namespace) -> int:
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

            chat = VisCPMChat(args.chat, image_safety_checker=False, quant=args.quant)
            metrics.update(evaluate_qa(chat, eval_dir, args.limit, args.beams))
            metrics.update(evaluate_captions(chat, eval_dir, args.limit, args.beams))
        if not args.skip_paint:
            from .pipelines.paint import VisCPMPaint

            painter = VisCPMPaint(args.paint, image_safety_checker=False, prompt_safety_checker=False,
                                  add_ranker=False, progress_bar=False, quant=args.quant)
            metrics.update(evaluate_paint(painter, eval_dir, args.limit, guidance_scale=args.guidance))
    _report_metrics(metrics, args)
    return 0


SERVE_HELP = """Serve the models: an OpenAI-compatible HTTP API and a web page, in one process.

  POST /v1/chat/completions   chat about images (OpenAI format; image_url parts as data URLs; stream)
  POST /v1/images/generations paint (OpenAI format; b64_json)
  POST /v1/images/edits       repaint an image or a masked part of it (OpenAI's multipart form)
  GET  /v1/models, /health, / (the web page: chat and paint)

Binds 127.0.0.1 (this machine only) unless --host says otherwise; any other address needs an API
key (--api-key or the VISCPM_API_KEY environment variable), which clients send as
`Authorization: Bearer KEY`.

启动服务：兼容 OpenAI 的接口与网页（对话、绘画）。默认只监听本机 127.0.0.1；监听其他地址时必须
设置 API 密钥（--api-key 或环境变量 VISCPM_API_KEY）。

examples / 示例:
  viscpm serve                                             # the packaged models / 内置模型
  viscpm serve --chat viscpm_chat_zhplus_checkpoint.pt --no-paint --port 8080
  VISCPM_API_KEY=secret viscpm serve --host 0.0.0.0"""


def _add_serve_parser(commands) -> None:
    from .serve import settings as limits

    parser = commands.add_parser("serve", help="API server and web page / 接口服务与网页", description=SERVE_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    models = parser.add_argument_group("models")
    models.add_argument("--chat", metavar="MODEL", help="chat model: official .pt or saved folder (default: packaged)")
    models.add_argument("--chat-config", metavar="JSON", help="config of --chat, when none is beside it")
    models.add_argument("--chat-vocab", metavar="FILE", help="vocab of --chat (default: vocab.txt beside it)")
    models.add_argument("--no-chat", action="store_true", help="serve no chat model")
    models.add_argument("--paint", metavar="MODEL",
                        help="paint model: official .pt or saved folder (default: packaged)")
    models.add_argument("--paint-config", metavar="JSON", help="config of --paint, when none is beside it")
    models.add_argument("--paint-vocab", metavar="FILE", help="vocab of --paint (default: vocab.txt beside it)")
    models.add_argument("--vae", help="VAE folder of --paint (default: vae/ beside it)")
    models.add_argument("--no-paint", action="store_true", help="serve no paint model")
    models.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    _add_quant_option(models)
    _add_placement_options(models)
    _add_paint_checker_options(parser.add_argument_group("paint safety and ranking (as in viscpm paint)"))
    network = parser.add_argument_group("network")
    network.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    network.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    network.add_argument("--api-key", help="required key (default: $VISCPM_API_KEY); needed to bind a non-local host")
    network.add_argument("--allow-remote-images", action="store_true",
                         help="let chat requests name http(s) image URLs for the server to fetch (default: "
                              "inline data URLs only; file:// is never read)")
    network.add_argument("--allow-image-network", metavar="CIDR", action="append", default=[],
                         help="with --allow-remote-images: a network images may also come from, e.g. 10.0.0.0/8 "
                              "(repeatable; by default public addresses only, never loopback or private ones)")
    network.add_argument("--allowed-hosts", metavar="NAMES", default="",
                         help="comma-separated host names the Host header may name besides localhost, 127.0.0.1, "
                              "::1 and --host (against DNS rebinding); '*' answers any (the default when --host is "
                              "0.0.0.0 or ::)")
    network.add_argument("--allow-safety-off", action="store_true",
                         help="let requests turn safety checkers off (e.g. \"prompt_safety_checker\": false); "
                              "refused with 403 by default")
    lim = parser.add_argument_group("limits")
    lim.add_argument("--max-queue", type=int, default=limits.MAX_QUEUE,
                     help=f"requests waiting or running per model before 429 (default {limits.MAX_QUEUE})")
    lim.add_argument("--timeout", type=float, default=limits.REQUEST_TIMEOUT_S,
                     help=f"seconds per request before 504 (default {limits.REQUEST_TIMEOUT_S:g})")
    lim.add_argument("--max-batch", type=int, default=limits.MAX_BATCH_SIZE,
                     help=f"chat requests decoded together (default {limits.MAX_BATCH_SIZE}; 1 turns batching off)")
    lim.add_argument("--max-tokens", type=int, default=limits.MAX_NEW_TOKENS,
                     help=f"largest max_tokens a request may ask (default {limits.MAX_NEW_TOKENS})")
    lim.add_argument("--max-context-tokens", type=int, default=None, metavar="N", help=CONTEXT_BUDGET_HELP)
    lim.add_argument("--max-request-mb", type=float, default=limits.MAX_REQUEST_BYTES / 2**20,
                     help=f"largest request body in MiB (default {limits.MAX_REQUEST_BYTES / 2**20:g})")
    parser.set_defaults(run=run_serve)


def build_serve_app(args: argparse.Namespace):
    """The app ``viscpm serve`` runs: settings from the flags, pipelines loaded now."""
    from .serve import ServeSettings, check_binding, create_app
    from .serve.settings import allowed_hosts_for

    api_key = args.api_key or os.environ.get("VISCPM_API_KEY") or None
    check_binding(args.host, api_key)  # before minutes of loading
    if args.no_chat and args.no_paint:
        raise ValueError("--no-chat and --no-paint leave nothing to serve")
    extra_hosts = tuple(name.strip() for name in args.allowed_hosts.split(",") if name.strip())
    settings = ServeSettings(api_key=api_key, allowed_hosts=allowed_hosts_for(args.host, extra_hosts),
                             allow_remote_images=args.allow_remote_images,
                             allowed_image_networks=tuple(args.allow_image_network),
                             allow_safety_off=args.allow_safety_off, max_queue=args.max_queue,
                             request_timeout=args.timeout, max_batch_size=args.max_batch,
                             max_new_tokens=args.max_tokens,
                             default_max_new_tokens=min(args.max_tokens, ServeSettings.default_max_new_tokens),
                             max_request_bytes=int(args.max_request_mb * 2**20))
    if args.device_map not in (None, "auto"):
        raise ValueError("viscpm serve places each model with --device-map auto (module names differ between "
                         "chat and paint); pass a JSON map to viscpm chat or viscpm paint")
    placement = _placement(args)  # each model fills --max-memory on its own

    def placed(model: str) -> dict:  # one offload subfolder per model: both have llm.* weights
        folder = placement.get("offload_folder")
        return {**placement, "offload_folder": os.path.join(folder, model)} if folder else placement

    chat = paint = None
    try:
        if not args.no_chat:
            from .pipelines.chat import DEFAULT_MAX_CONTEXT_TOKENS, VisCPMChat

            chat = VisCPMChat(args.chat, args.chat_config, args.chat_vocab, device=args.device, quant=args.quant,
                              max_context_tokens=_or_default(args.max_context_tokens, DEFAULT_MAX_CONTEXT_TOKENS),
                              **placed("chat"))
        if not args.no_paint:
            from .pipelines.paint import VisCPMPaint

            paint = VisCPMPaint(args.paint, **_paint_checkers(args), vocab_path=args.paint_vocab, vae_path=args.vae,
                                config_path=args.paint_config, device=args.device, quant=args.quant,
                                **placed("paint"), progress_bar=False)
    except FileNotFoundError as error:  # most often: no packaged model yet
        raise FileNotFoundError(f"{error} (viscpm serve: pass --chat/--paint MODEL, or --no-chat/--no-paint)") from None
    return create_app(chat=chat, paint=paint, settings=settings)


def run_serve(args: argparse.Namespace) -> int:
    uvicorn = require("uvicorn", "serve", "viscpm serve")  # before the models load, which takes a while
    app = build_serve_app(args)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"viscpm serve: page 网页 http://{host}:{args.port}/  ·  API 接口 http://{host}:{args.port}/v1", flush=True)
    _log_requests()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                access_log=False, timeout_graceful_shutdown=5)  # ours (serve.access_log) also times each request
    return 0


def _log_requests() -> None:
    """One timestamped line per request on stderr, with or without -v."""
    from .serve.access_log import logger

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not twice under -v


def run_eval_rerank(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from .pipelines.chat import VisCPMChat
    from .pipelines.paint import VisCPMPaint
    from .rerank import ChatSelfRanker, ChineseCLIPRanker
    from .shapes.evaluate import evaluate_reranking
    from .shapes.corpus import build_corpora

    painter = VisCPMPaint(args.paint, image_safety_checker=False, prompt_safety_checker=False, add_ranker=False,
                          progress_bar=False)
    rankers = {"self": ChatSelfRanker(VisCPMChat(args.chat, image_safety_checker=False))}
    if args.clip:
        rankers["chinese-clip"] = ChineseCLIPRanker.from_pretrained(args.clip)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.data) if args.data else build_corpora(Path(scratch) / "shapes", seed=0).root
        metrics = evaluate_reranking(painter, rankers, root / "eval", args.limit, args.candidates)
    _report_metrics(metrics, args)
    return 0


DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _add_convert_parser(commands) -> None:
    parser = commands.add_parser(
        "convert", help="official checkpoint -> sharded safetensors folder / 转换权重",
        description="Rewrite an official VisCPM .pt (or any checkpoint we read) as a folder of safetensors shards "
                    "with config.json and vocab.txt (and vae/ for paint). The source is memory-mapped and written "
                    "shard by shard; the folder then loads instantly (also memory-mapped), e.g. "
                    "`viscpm chat --model OUT --quant int8`.")
    parser.add_argument("kind", choices=("chat", "paint"), help="which model the checkpoint holds")
    parser.add_argument("source", help="official .pt checkpoint or a saved folder")
    parser.add_argument("output", help="folder to write")
    parser.add_argument("--config", help="config JSON, when the checkpoint has none beside it")
    parser.add_argument("--vocab", help="CPM-Bee vocab (default: vocab.txt beside the checkpoint)")
    parser.add_argument("--vae", help="paint: the VAE folder (default: vae/ beside the checkpoint)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating weights (default: keep the checkpoint's)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest shard (default 2GB)")
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    import torch

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    if args.kind == "chat":
        from .pipelines.chat import VisCPMChat

        model = VisCPMChat(args.source, args.config, args.vocab, image_safety_checker=False)
    else:
        from .pipelines.paint import VisCPMPaint

        model = VisCPMPaint(args.source, image_safety_checker=False, prompt_safety_checker=False, add_ranker=False,
                            vocab_path=args.vocab, vae_path=args.vae, config_path=args.config)
    folder = model.save_pretrained(args.output, dtype=dtype, max_shard_size=args.max_shard_size)
    print(f"wrote {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viscpm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Bilingual multimodal VisCPM models: chat about images, paint from text.\n"
                    "中英双语多模态 VisCPM 模型：图片对话、文字生成图片。",
        epilog="Run `viscpm COMMAND --help` for a command's options. 各命令的选项见 `viscpm 命令 --help`。")
    parser.add_argument("--version", action="version", version=f"viscpm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(commands)
    return parser


SUBCOMMANDS: list[Callable] = [
    _add_chat_parser, _add_paint_parser, _add_serve_parser, _add_train_parser, _add_plot_parser, _add_data_parser,
    _add_eval_parser, _add_convert_parser,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    from .safety.base import Refused

    try:
        return args.run(args)
    except Refused as error:  # a safety checker said no: a distinct status, so scripts can tell
        print(f"viscpm {args.command}: {error}", file=sys.stderr)
        return REFUSED_STATUS
    except (ValueError, FileNotFoundError, MissingExtra) as error:
        print(f"viscpm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
