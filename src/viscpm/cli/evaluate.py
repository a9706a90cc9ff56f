"""``viscpm eval``: scores on ShapesWorld's held-out sets (``shapes``, ``rerank``) and the benchmarks
of :mod:`viscpm.evaluation.commands` (``llava-bench``, ``paint``, ``compare``)."""
from __future__ import annotations

import argparse

from .options import add_quant_option, add_report_options, report_metrics
from .paint import add_candidates_option

SHAPES_DATA_HELP = "a ShapesWorld folder from `viscpm data shapes` (default: build one, seed 0)"


def add_parser(commands) -> None:
    from ..evaluation.commands import add_benchmark_parsers

    parser = commands.add_parser("eval", help="evaluate models / 评测")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    shapes = kinds.add_parser("shapes", help="QA, caption and paint scores on ShapesWorld's held-out sets",
                              description="Score chat and paint models on ShapesWorld's held-out sets: QA accuracy "
                              "(EN/ZH), answer-language match, caption accuracy, paint adherence (EN/ZH).")
    shapes.add_argument("--chat", help="chat model (default: the packaged one)")
    shapes.add_argument("--paint", help="paint model (default: the packaged one)")
    shapes.add_argument("--skip-chat", action="store_true")
    shapes.add_argument("--skip-paint", action="store_true")
    shapes.add_argument("--data", help=SHAPES_DATA_HELP)
    shapes.add_argument("--limit", type=int, default=None, help="use only the first N items of each set")
    # the protocol of docs/shapesworld.md's tables, not the library's defaults
    shapes.add_argument("--beams", type=int, default=1,
                        help="chat beam size (default 1, greedy as when streaming; 3 is one-shot viscpm chat's)")
    shapes.add_argument("--guidance", type=float, default=4.0,
                        help="paint guidance scale (default 4, as in README's tables, whatever the model's default)")
    add_report_options(shapes)
    add_quant_option(shapes)
    shapes.set_defaults(run=run_eval_shapes)
    rerank = kinds.add_parser(
        "rerank", help="paint adherence on ShapesWorld with and without reranking",
        description="Paint each held-out ShapesWorld prompt K times and report adherence for the first candidate, "
                    "the mean over candidates (no reranking), the candidate each ranker picks, and the oracle.")
    rerank.add_argument("--paint", help="paint model (default: the packaged one)")
    rerank.add_argument("--chat", help="chat model for self-reranking (default: the packaged one)")
    rerank.add_argument("--clip", help="also rank with Chinese-CLIP from this folder")
    add_candidates_option(rerank, "prompt")
    rerank.add_argument("--data", help=SHAPES_DATA_HELP)
    rerank.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    add_report_options(rerank)
    rerank.set_defaults(run=run_eval_rerank)
    add_benchmark_parsers(kinds)


def shapes_eval_root(args: argparse.Namespace, scratch: str, **corpus_options):
    """The ShapesWorld folder to score on: --data, or one built with seed 0 in ``scratch``."""
    from pathlib import Path

    from ..shapes.corpus import build_corpora

    return Path(args.data) if args.data else build_corpora(Path(scratch) / "shapes", seed=0, **corpus_options).root


def run_eval_shapes(args: argparse.Namespace) -> int:
    import tempfile

    from ..shapes.evaluate import evaluate_chat, evaluate_paint

    with tempfile.TemporaryDirectory() as scratch:
        root = shapes_eval_root(args, scratch, robust=True)
        eval_dir = root / "eval"
        metrics: dict = {"data": str(root) if args.data else "built with seed 0"}
        if not args.skip_chat:
            from ..pipelines.chat import VisCPMChat

            chat = VisCPMChat(args.chat, image_safety_checker=False, quant=args.quant)
            metrics.update(evaluate_chat(chat, eval_dir, args.limit, args.beams))
        if not args.skip_paint:
            from ..pipelines.paint import VisCPMPaint

            painter = VisCPMPaint(args.paint, image_safety_checker=False, prompt_safety_checker=False,
                                  add_ranker=False, progress_bar=False, quant=args.quant)
            metrics.update(evaluate_paint(painter, eval_dir, args.limit, guidance_scale=args.guidance))
    report_metrics(metrics, args)
    return 0


def run_eval_rerank(args: argparse.Namespace) -> int:
    import tempfile

    from ..pipelines.chat import VisCPMChat
    from ..pipelines.paint import RANKER_CANDIDATES, VisCPMPaint
    from ..rerank import ChatSelfRanker, ChineseCLIPRanker
    from ..shapes.evaluate import evaluate_reranking

    painter = VisCPMPaint(args.paint, image_safety_checker=False, prompt_safety_checker=False, add_ranker=False,
                          progress_bar=False)
    rankers = {"self": ChatSelfRanker(VisCPMChat(args.chat, image_safety_checker=False))}
    if args.clip:
        rankers["chinese-clip"] = ChineseCLIPRanker.from_pretrained(args.clip)
    with tempfile.TemporaryDirectory() as scratch:
        metrics = evaluate_reranking(painter, rankers, shapes_eval_root(args, scratch) / "eval", args.limit,
                                     args.candidates or RANKER_CANDIDATES)
    report_metrics(metrics, args)
    return 0
