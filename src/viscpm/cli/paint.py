"""``viscpm paint``: text to image (and image-to-image, inpainting), written as PNG files."""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from ..pipelines.defaults import DEFAULT_PRESET, RANKER_CANDIDATES, SAMPLING_PRESETS, SCHEDULERS
from .options import add_model_options, add_paint_checker_options, paint_checkers, placement

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

def attention_slice(text: str) -> str | int:
    """--attention-slicing: auto, max or a number of heads per slice."""
    if text in ("auto", "max"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected auto, max or a positive number of heads, got {text!r}")


def add_candidates_option(parser, what: str) -> None:
    parser.add_argument("--candidates", type=int, metavar="K",
                        help=f"candidates per {what} when ranking (default {RANKER_CANDIDATES}, the official count)")


def add_parser(commands) -> None:
    parser = commands.add_parser("paint", help="text to image / 文生图", description=PAINT_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="what to paint")
    parser.add_argument("-o", "--output", default="paint.png",
                        help="image file to write (default paint.png); several images: NAME-1.png … NAME-N.png")
    add_model_options(parser)
    parser.add_argument("--vae", help="diffusers AutoencoderKL folder (default: vae/ beside the checkpoint)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--negative", help="negative prompt")
    sampling.add_argument("--preset", choices=tuple(SAMPLING_PRESETS),
                          help=f"sampler and steps (default {DEFAULT_PRESET}; official: DDPM, 50 steps, as in VisCPM; "
                               "fast: SDE-DPM-Solver++, 20 steps, 2.5x quicker, same ShapesWorld adherence); "
                               "--scheduler/--steps override it")
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
    sampling.add_argument("--scheduler", choices=tuple(SCHEDULERS),
                          help="sampler (default: the preset's; ddpm is the official one)")
    edit = parser.add_argument_group("editing an image / 改图")
    edit.add_argument("--image", help="start from this image (image-to-image; resized to the painting's size)")
    edit.add_argument("--mask", help="repaint only where this mask is white (inpainting; same size as --image)")
    edit.add_argument("--strength", type=float,
                      help="0 keeps the image, 1 repaints it all (default 0.8 with --image, 1 with --mask)")
    memory = parser.add_argument_group("memory (diffusers' switches; slower, for big images or small machines)")
    memory.add_argument("--attention-slicing", type=attention_slice, metavar="{auto,max,N}",
                        help="UNet attention a slice of heads at a time")
    memory.add_argument("--vae-slicing", action="store_true", help="decode the images one at a time")
    memory.add_argument("--vae-tiling", action="store_true",
                        help="decode large images in overlapping tiles (pixels change slightly at the seams)")
    safety = parser.add_argument_group("safety and ranking")
    add_paint_checker_options(safety)
    add_candidates_option(safety, "image")
    parser.set_defaults(run=run_paint)


def given(**flags) -> dict:
    """The flags the user set; the others are left to the pipeline's defaults."""
    return {name: value for name, value in flags.items() if value is not None}


def run_paint(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    from pathlib import Path

    from ..pipelines.paint import MemoryOptions, VisCPMPaint

    stdout = stdout or sys.stdout
    painter = VisCPMPaint(args.model, **paint_checkers(args), vocab_path=args.vocab, vae_path=args.vae,
                          config_path=args.config,
                          memory=MemoryOptions(args.attention_slicing, args.vae_slicing, args.vae_tiling),
                          device=args.device, quant=args.quant, **placement(args))
    results = painter.paint(args.prompt, args.negative, num_images_per_prompt=args.num_images,
                            guidance_scale=args.guidance, num_inference_steps=args.steps,
                            height=args.height or args.size, width=args.width or args.size,
                            scheduler=args.scheduler, seed=args.seed, image=args.image, mask_image=args.mask,
                            strength=args.strength, **given(preset=args.preset, num_candidates=args.candidates))
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
