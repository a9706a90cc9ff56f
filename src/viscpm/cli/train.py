"""``viscpm train``: one stage of the VisCPM recipe from a TOML config."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .options import LibraryChoices

TRAIN_HELP = """Train one stage of the VisCPM recipe from a TOML config.

Stages: lm (text → a bilingual CPM-Bee), chat-align (LLM frozen; vision learns from captions),
chat-sft (instructions; all parameters or LoRA), paint-bridge, paint-xattn, vae.
Runs on one CPU as is; for several processes or GPUs, or FSDP/DeepSpeed, start it with
`accelerate launch [--config_file FILE] -m viscpm.cli train STAGE --config FILE`."""


def add_parser(commands) -> None:
    parser = commands.add_parser("train", help="train a stage / 训练", description=TRAIN_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # the recipes' own names, read when needed (the training stack loads only to train); a metavar is
    # given, as argparse would otherwise read the choices to build one
    parser.add_argument("stage", choices=LibraryChoices("viscpm.train.recipes", "STAGES"), metavar="STAGE",
                        help="which stage to run: %(choices)s")
    parser.add_argument("--config", required=True, help="the stage's TOML config")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output_dir from its last complete checkpoint (same settings and data)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a non-empty output_dir (removes its checkpoints, final/ and metrics)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..train.config import TrainConfig
    from ..train.engine import train
    from ..train.recipes import build_recipe
    from ..train.state import check_output_dir, run_fingerprint

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
