"""Flags several commands share: model, placement, quantization, safety checkers, metrics reports."""
from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator

from ..pipelines.chat import DEFAULT_MAX_CONTEXT_TOKENS
from ..quantization import QUANT_HELP, QUANT_MODES


class LibraryChoices:
    """A flag's choices read from the library (``module``'s ``name``, e.g. the training stages) when
    argparse first needs them, to check a value or print help, so that building the parser imports
    nothing heavy: ``viscpm chat`` never loads the training stack to learn the stage names."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def _names(self) -> list[str]:
        return list(getattr(importlib.import_module(self.module), self.name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, value) -> bool:
        return value in self._names()


def add_quant_option(parser) -> None:
    parser.add_argument("--quant", choices=QUANT_MODES, help=QUANT_HELP)


def add_placement_options(parser) -> None:
    parser.add_argument("--device-map", metavar="auto|JSON",
                        help="spread the model over GPUs, CPU and disk with accelerate: auto (fill --max-memory "
                             "in order, the rest on disk) or a JSON file {module: device or \"disk\"}")
    parser.add_argument("--max-memory", action="append", metavar="DEVICE=SIZE",
                        help="with --device-map auto: what a device may hold, e.g. 0=20GiB or cpu=30GiB (repeatable)")
    parser.add_argument("--offload-folder", metavar="DIR", help="where --device-map writes the layers it puts on disk")


def placement(args: argparse.Namespace) -> dict:
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


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="official .pt checkpoint or a saved folder (default: the packaged model)")
    parser.add_argument("--config", help="config JSON, when the checkpoint has none beside it")
    parser.add_argument("--vocab", help="CPM-Bee vocab (default: vocab.txt beside the checkpoint)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    add_quant_option(parser)
    add_placement_options(parser)


def add_context_budget_option(group) -> None:
    group.add_argument("--max-context-tokens", type=int, default=DEFAULT_MAX_CONTEXT_TOKENS, metavar="N",
                       help="most tokens one conversation may hold: prompt + image queries + the longest answer "
                            "asked for (default %(default)s); a longer one is refused before any memory is allocated")


def add_image_checker_option(group) -> None:
    group.add_argument("--image-checker", default="default", metavar="{default,nudenet,off,FOLDER}",
                       help="image safety checker: NudeNet when installed with `pip install 'viscpm[safety]'` "
                            "(default; else none), off, or a folder with the official Stable Diffusion safety checker")


def add_paint_checker_options(group) -> None:
    """The safety checker and ranker flags, shared by ``viscpm paint`` and ``viscpm serve``."""
    group.add_argument("--prompt-checker", default="default", metavar="{default,lexicon,off,FOLDER}",
                       help="prompt safety checker: the offline word list (default, = lexicon), off, or a folder "
                            "with the official BERT classifier")
    group.add_argument("--word-list", action="append", default=[], metavar="FILE",
                       help="more blocked terms for the word list checker, one per line; `!phrase` allows a phrase "
                            "(repeatable)")
    add_image_checker_option(group)
    group.add_argument("--ranker", default="default", metavar="{default,self,off,FOLDER}",
                       help="rerank candidates: self-reranking with the packaged chat model when painting with the "
                            "packaged model (default; else off), off, a Chinese-CLIP folder, or a chat model to "
                            "self-rerank with")


def paint_checkers(args: argparse.Namespace) -> dict:
    """VisCPMPaint's checker and ranker arguments from the flags of ``add_paint_checker_options``."""
    from ..safety import load_prompt_checker

    if args.word_list and args.prompt_checker.lower() not in ("default", "lexicon"):
        raise ValueError("--word-list adds terms to the word list checker; it cannot go with "
                         f"--prompt-checker {args.prompt_checker}")
    return dict(image_safety_checker=args.image_checker,
                prompt_safety_checker=load_prompt_checker(args.prompt_checker, args.word_list) or False,
                add_ranker=args.ranker)


def add_report_options(parser) -> None:
    parser.add_argument("--out", metavar="FILE", help="also write all metrics (examples included) as JSON here")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")


def report_metrics(metrics: dict, args: argparse.Namespace) -> None:
    """The summary table (or, with --json, the JSON) on stdout; the JSON file with --out."""
    import json
    from pathlib import Path

    from ..metrics_table import format_metrics

    text = json.dumps(metrics, indent=2, ensure_ascii=False)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text if args.json else format_metrics(metrics))
