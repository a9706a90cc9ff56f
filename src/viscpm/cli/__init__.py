"""The ``viscpm`` command: a thin shell over the pipelines, one module per command.

    viscpm chat --image cat.png "What is in the image?"     # one question
    viscpm chat --image cat.png                              # interactive, streamed
    viscpm paint "海上生明月，唯美风格" -o moon.png            # text to image
    viscpm serve                                             # API + web page on http://127.0.0.1:8000

Flags take their defaults and choices from the library (``ChatOptions``, the server's limits, the
paint pipeline's presets, the training recipes), so the command line never retypes them. Building
the parser imports nothing heavy: each command loads what it needs when it runs.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..extras import MissingExtra
from . import chat, convert, data, evaluate, paint, plot, serve, train

REFUSED_STATUS = 3  # exit status when a safety checker refused the prompt or image
COMMANDS = (chat, paint, serve, train, plot, data, evaluate, convert)  # in `viscpm --help`'s order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viscpm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Bilingual multimodal VisCPM models: chat about images, paint from text.\n"
                    "中英双语多模态 VisCPM 模型：图片对话、文字生成图片。",
        epilog="Run `viscpm COMMAND --help` for a command's options. 各命令的选项见 `viscpm 命令 --help`。")
    parser.add_argument("--version", action="version", version=f"viscpm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    from ..safety.base import Refused

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
