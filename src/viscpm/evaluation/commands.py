"""``viscpm eval llava-bench | paint | compare``: the command lines over :mod:`viscpm.evaluation`.

Kept apart from ``viscpm/cli/evaluate.py`` (which only calls :func:`add_benchmark_parsers`); nothing heavy is
imported until a command runs, so ``viscpm --help`` stays quick.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..pipelines.defaults import DEFAULT_PRESET, SAMPLING_PRESETS

LLAVA_BENCH_HELP = """LLaVA-Bench (COCO) as in VisCPM's chat table: the model answers 90 questions about 30 COCO
val2014 images; a judge behind any OpenAI-compatible endpoint scores its answer against GPT-4's
(LLaVA's protocol and rules); the relative score is model / reference x 100 per category.

The data is read from the folders you give: --en-data holds LLaVA's qa90_questions.jsonl,
qa90_gpt4_answer.jsonl, caps_boxes_coco2014_val_80.jsonl and rule.json; --zh-data VisCPM's
translated_LLaVA_qa90 folder. --images holds the COCO val2014 images (000000441147.jpg or
COCO_val2014_000000441147.jpg). Everything is written to --out as it is made; run the same command
again to resume. The judge's key is read from the environment variable --judge-key-env names.

LLaVA-Bench 评测（COCO，英文与 VisCPM 的中文译本）：由任意兼容 OpenAI 接口的评审模型打分，可断点续跑。

examples / 示例:
  OPENAI_API_KEY=... viscpm eval llava-bench --model viscpm_chat_balance_checkpoint.pt --lang both \\
      --en-data LLaVA/qa90 --zh-data VisCPM/data/translated_LLaVA_qa90 --images coco/val2014 \\
      --judge-url https://api.openai.com/v1 --judge-model gpt-4-0613 --out runs/balance
  viscpm eval llava-bench --lang zh --zh-data translated_LLaVA_qa90 --images val2014 \\
      --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen2.5-72B-Instruct --out runs/local"""

PAINT_HELP = """Score a paint model. Without --prompts: ShapesWorld's held-out prompts scored offline by the
pixel analyser (adherence, EN/ZH). With --prompts FILE (one prompt a line, or JSONL with "prompt"):
paint each prompt once and report per language the time per image, CLIP score with --clip (a
local CLIP or Chinese-CLIP folder) and FID with --fid-features (a TorchScript feature network such as
clean-fid's inception-2015-12-05.pt) against --reference-images. Nothing is downloaded.

examples / 示例:
  viscpm eval paint                                          # ShapesWorld, offline
  viscpm eval paint --model viscpm_paint_zhplus_checkpoint.pt --prompts coco_30k_zh.txt \\
      --clip chinese-clip-vit-huge-patch14 --fid-features inception-2015-12-05.pt \\
      --reference-images coco/val2014 --out runs/paint_zh"""


def add_benchmark_parsers(kinds) -> None:
    """Add llava-bench, paint and compare to ``viscpm eval``'s subcommands."""
    _add_llava_bench_parser(kinds)
    _add_paint_parser(kinds)
    compare = kinds.add_parser("compare", help="per-category difference of two reports (e.g. fp16 vs int8)")
    compare.add_argument("first", metavar="A.json", help="report of the baseline")
    compare.add_argument("second", metavar="B.json", help="report to compare with it (B - A is printed)")
    compare.set_defaults(run=run_compare)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="official .pt checkpoint or a saved folder (default: the packaged model)")
    parser.add_argument("--config", help="config JSON, when the checkpoint has none beside it")
    parser.add_argument("--vocab", help="CPM-Bee vocab (default: vocab.txt beside the checkpoint)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    from ..quantization import QUANT_HELP, QUANT_MODES

    parser.add_argument("--quant", choices=QUANT_MODES, help=QUANT_HELP)


def _add_llava_bench_parser(kinds) -> None:
    from .judge import DEFAULT_KEY_ENV, DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE

    parser = kinds.add_parser("llava-bench", help="LLaVA-Bench (COCO) EN/ZH with an OpenAI-compatible judge",
                              description=LLAVA_BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_flags(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--lang", choices=("en", "zh", "both"), default="both", help="which set(s) to run (default both)")
    data.add_argument("--en-data", metavar="DIR", help="folder with LLaVA's English qa90 files and rule.json")
    data.add_argument("--zh-data", metavar="DIR", help="VisCPM's translated_LLaVA_qa90 folder")
    data.add_argument("--images", metavar="DIR", required=True, help="folder of COCO val2014 images")
    data.add_argument("--limit", type=int, help="only the first N questions of each language (a quick check)")
    data.add_argument("--out", metavar="DIR", required=True,
                      help="where answers, judge replies and report.json go; an existing run resumes")
    judge = parser.add_argument_group("judge (any OpenAI-compatible chat-completions endpoint)")
    judge.add_argument("--judge-url", required=True, help="base URL, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    judge.add_argument("--judge-model", required=True, help="model name to request, e.g. gpt-4-0613")
    judge.add_argument("--judge-key-env", default=DEFAULT_KEY_ENV, metavar="NAME",
                       help=f"environment variable holding the API key (default {DEFAULT_KEY_ENV}; unset: no key)")
    judge.add_argument("--judge-temperature", type=float, default=DEFAULT_TEMPERATURE,
                       help=f"judge sampling temperature (default {DEFAULT_TEMPERATURE}, LLaVA's)")
    judge.add_argument("--judge-max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    judge.add_argument("--judge-attempts", type=int, default=3,
                       help="replies asked for per question before it counts as unparseable (default 3)")
    from ..pipelines.chat_options import ChatOptions

    official = ChatOptions()  # the library's defaults: the official VisCPM-Chat decoding
    decoding = parser.add_argument_group("decoding (defaults: the library's, as in VisCPM)")
    decoding.add_argument("--beams", type=int, default=official.num_beams, help="beam size (default %(default)s)")
    decoding.add_argument("--sample", action="store_true", help="sample instead of beam search")
    decoding.add_argument("--temperature", type=float, default=official.temperature, help="(default %(default)s)")
    decoding.add_argument("--top-p", type=float, default=official.top_p, help="(default %(default)s)")
    decoding.add_argument("--seed", type=int, default=official.seed, help="random seed for --sample")
    decoding.add_argument("--max-new-tokens", type=int, default=official.max_new_tokens,
                          help=f"cap answers (default: the official max_length {official.max_length})")
    decoding.add_argument("--repetition-penalty", type=float, default=official.repetition_penalty,
                          help="(default %(default)s)")
    decoding.add_argument("--batch-size", type=int, default=4, help="questions answered together (default 4)")
    parser.set_defaults(run=run_llava_bench_command)


def _model_record(args: argparse.Namespace) -> dict:
    """What identifies the answering model in run.json and the report."""
    return {"path": str(Path(args.model).resolve()) if args.model else "packaged", "config": args.config,
            "vocab": args.vocab, "quant": args.quant}


def run_llava_bench_command(args: argparse.Namespace) -> int:
    from .judge import Judge, JudgeSettings, JudgeUnavailable
    from .llava_bench import format_table, load_bench_set, run_llava_bench

    langs = ("en", "zh") if args.lang == "both" else (args.lang,)
    folders = {"en": args.en_data, "zh": args.zh_data}
    missing = [f"--{lang}-data" for lang in langs if not folders[lang]]
    if missing:
        raise ValueError(f"--lang {args.lang} needs {' and '.join(missing)} (the folder(s) of the LLaVA-Bench files)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    benches = [load_bench_set(folders[lang], lang) for lang in langs]
    judge = Judge(JudgeSettings(args.judge_url, args.judge_model, args.judge_temperature, args.judge_max_tokens,
                                args.judge_attempts, args.judge_key_env))
    generation = {"num_beams": args.beams, "do_sample": args.sample, "temperature": args.temperature,
                  "top_p": args.top_p, "seed": args.seed, "repetition_penalty": args.repetition_penalty}
    if args.max_new_tokens is not None:
        generation["max_new_tokens"] = args.max_new_tokens
    settings = {"model": _model_record(args), "generation": generation, "judge": judge.settings.record()}

    from .llava_bench import resolve_images

    resolve_images(args.images, [i for b in benches for i in b.items[: args.limit]])  # before minutes of loading
    from ..pipelines.chat import VisCPMChat

    chat = VisCPMChat(args.model, args.config, args.vocab, device=args.device, quant=args.quant,
                      image_safety_checker=False)

    def answer(images, questions):
        return chat.batch_chat(images, questions, **generation)

    try:
        report = run_llava_bench(benches, args.images, answer, judge, args.out, settings, args.limit, args.batch_size)
    except JudgeUnavailable as error:  # nothing is lost: the answers and verdicts so far are on disk
        print(f"viscpm eval llava-bench: error: {error}", file=sys.stderr)
        return 1
    print(format_table(report))
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def _add_paint_parser(kinds) -> None:
    parser = kinds.add_parser("paint", help="paint scores: ShapesWorld adherence, or CLIP score / FID / time per image",
                              description=PAINT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_flags(parser)
    parser.add_argument("--vae", help="diffusers AutoencoderKL folder (default: vae/ beside the checkpoint)")
    parser.add_argument("--prompts", metavar="FILE", help="prompts to paint (default: ShapesWorld's held-out prompts)")
    parser.add_argument("--data", metavar="DIR",
                        help="without --prompts: a ShapesWorld folder from `viscpm data shapes` (default: build one, "
                             "seed 0, as viscpm eval shapes does)")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--clip", metavar="DIR", help="CLIP or Chinese-CLIP folder for the CLIP score")
    parser.add_argument("--fid-features", metavar="FILE", help="TorchScript feature network for FID (Inception)")
    parser.add_argument("--reference-images", metavar="DIR", help="real images FID compares with")
    parser.add_argument("--max-reference-images", type=int, help="use only the first N reference images")
    parser.add_argument("--out", metavar="DIR", help="where images and report.json go (an existing run resumes); "
                                                     "needed with --prompts")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--preset", choices=tuple(SAMPLING_PRESETS), default=DEFAULT_PRESET,
                          help=", ".join(f"{name} ({scheduler}, {steps} steps)"
                                         for name, (scheduler, steps) in SAMPLING_PRESETS.items())
                          + " (default %(default)s)")
    sampling.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    sampling.add_argument("--guidance", type=float, help="guidance scale (default: the model's; officially 7.5)")
    sampling.add_argument("--size", type=int, help="image size (default: the model's)")
    sampling.add_argument("--seed", type=int, default=0, help="prompt k is painted with seed + k (default 0)")
    parser.set_defaults(run=run_paint_command)


def run_paint_command(args: argparse.Namespace) -> int:
    import time

    from ..pipelines.paint import VisCPMPaint

    if args.prompts is None and (args.clip or args.fid_features or args.reference_images):
        raise ValueError("--clip, --fid-features and --reference-images score the images of --prompts FILE")
    if bool(args.fid_features) != bool(args.reference_images):
        raise ValueError("FID needs both --fid-features (the feature network) and --reference-images (real images)")
    if args.prompts is not None and not args.out:
        raise ValueError("--prompts needs --out DIR for the painted images and the report")
    painter = VisCPMPaint(args.model, image_safety_checker=False, prompt_safety_checker=False, add_ranker=False,
                          progress_bar=False, vocab_path=args.vocab, vae_path=args.vae, config_path=args.config,
                          device=args.device, quant=args.quant)
    options = {"preset": args.preset, "num_inference_steps": args.steps, "guidance_scale": args.guidance,
               "height": args.size, "width": args.size}
    settings = {"model": _model_record(args), "sampling": {**options, "seed": args.seed}}
    if args.prompts is None:
        import tempfile

        from ..shapes.corpus import build_corpora
        from ..shapes.evaluate import evaluate_paint

        with tempfile.TemporaryDirectory() as scratch:
            root = Path(args.data) if args.data else build_corpora(Path(scratch) / "shapes", seed=0).root
            begun = time.perf_counter()
            # evaluate_paint's own sampler (SDE-DPM-Solver++, 20 steps) unless --steps says otherwise
            steps = {"num_inference_steps": args.steps} if args.steps else {}
            metrics = evaluate_paint(painter, root / "eval", args.limit, guidance_scale=args.guidance, seed=args.seed,
                                     **steps)
            seconds = (time.perf_counter() - begun) / max(1, metrics["paint_items"])
        scores = {lang: {"adherence": rate} for lang, rate in metrics["paint_adherence"].items()}
        scores["all"] = {"seconds_per_image": round(seconds, 3)}
        report = {"benchmark": "paint-shapes", **settings, "scores": scores, "details": metrics}
    else:
        report = _score_prompts(args, painter, options, settings)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "report.json").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def _score_prompts(args: argparse.Namespace, painter, options: dict, settings: dict) -> dict:
    from .paint_scores import (
        clip_score_metric, fid_metric, file_sha256, load_fid_features, load_prompts, paint_prompts, reference_images,
        score_images,
    )

    from .llava_bench import check_settings

    prompts = load_prompts(args.prompts)[: args.limit]
    # the images in --out are painted by these settings and prompts: a re-run with others is refused
    check_settings(Path(args.out), {**settings, "prompts_sha256": file_sha256(args.prompts)})
    clip = clip_score_metric(args.clip) if args.clip else None  # loaded before painting: a bad folder fails fast
    fid = fid_metric(load_fid_features(args.fid_features)) if args.fid_features else None
    references = reference_images(args.reference_images, args.max_reference_images) if fid is not None else []
    paths, seconds = paint_prompts(painter, prompts, Path(args.out) / "images", args.seed,
                                   **{k: v for k, v in options.items() if v is not None})
    scores = score_images(prompts, paths, clip, fid, references)
    for lang, part in scores.items():
        timed = [s for number, s in seconds.items() if prompts[number].lang == lang]
        part["seconds_per_image"] = round(sum(timed) / len(timed), 3) if timed else None
    return {"benchmark": "paint-prompts", **settings, "scores": scores, "prompts": str(Path(args.prompts).resolve()),
            "clip": str(Path(args.clip).resolve()) if args.clip else None,
            "fid_features": {"path": str(Path(args.fid_features).resolve()),
                             "sha256": file_sha256(args.fid_features)} if args.fid_features else None,
            "reference_images": {"folder": str(Path(args.reference_images).resolve()), "count": len(references)}
            if references else None}


def run_compare(args: argparse.Namespace) -> int:
    from .compare import compare, load_report

    a, b = load_report(args.first), load_report(args.second)
    paths = Path(args.first), Path(args.second)
    # runs/int8/report.json vs runs/bf16/report.json: name the columns by folder
    names = tuple(p.parent.name if paths[0].stem == paths[1].stem else p.stem for p in paths)
    print(compare(a, b, names), file=sys.stdout)
    return 0
