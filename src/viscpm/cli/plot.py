"""``viscpm plot``: a training run's loss and learning-rate curves as a PNG."""
from __future__ import annotations

import argparse


def add_parser(commands) -> None:
    parser = commands.add_parser("plot", help="plot a run's loss and lr curves / 画训练曲线")
    parser.add_argument("run_dir", help="a training output_dir (holds metrics.jsonl)")
    parser.add_argument("-o", "--output", help="PNG to write (default: RUN_DIR/curves.png)")
    parser.set_defaults(run=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from ..train.plot import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0
