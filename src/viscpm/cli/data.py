"""``viscpm data``: write training data (``viscpm data shapes``: a ShapesWorld corpus)."""
from __future__ import annotations


def add_parser(commands) -> None:
    from ..shapes.corpus import add_shapes_parser

    parser = commands.add_parser("data", help="write training data / 生成训练数据")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    add_shapes_parser(kinds)
