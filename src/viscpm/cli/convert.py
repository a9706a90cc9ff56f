"""``viscpm convert``: an official checkpoint rewritten as a folder of safetensors shards."""
from __future__ import annotations

import argparse

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def add_parser(commands) -> None:
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
        from ..pipelines.chat import VisCPMChat

        model = VisCPMChat(args.source, args.config, args.vocab, image_safety_checker=False)
    else:
        from ..pipelines.paint import VisCPMPaint

        model = VisCPMPaint(args.source, image_safety_checker=False, prompt_safety_checker=False, add_ranker=False,
                            vocab_path=args.vocab, vae_path=args.vae, config_path=args.config)
    folder = model.save_pretrained(args.output, dtype=dtype, max_shard_size=args.max_shard_size)
    print(f"wrote {folder}")
    return 0
