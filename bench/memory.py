"""Peak resident memory of VisCPM-Chat and VisCPM-Paint per scenario, size and precision.

    python bench/memory.py                                   # everything (~10 min on 2 cores)
    python bench/memory.py --sizes tiny --precisions fp32 bf16

Scenarios: ``chat load``; ``chat 1 turn`` (image + question, the default beam search with 3
beams); ``chat 10 turns`` (one conversation, the context growing every turn, the image encoded
once); ``paint load``; ``paint 1 image``; ``paint 4 candidates`` (one image, best of 4: the 4
candidates are denoised and decoded together; the ranker is a constant function, so no ranker
model is counted). Sizes: ``tiny`` = the packaged models (``VisCPMChat()``, ``VisCPMPaint()``);
``mid`` = random weights at the size the official code was timed on (see ``mid_size.py``).
Precisions: fp32, bf16, and int8 (weight-only int8 linears, the rest in bf16).

Every row runs in a fresh Python process, so no row inherits another's high-water mark. The
process imports torch and viscpm, notes its resident size (``imports``), loads the pipeline, runs
the scenario, and reports:

* ``peak RSS``: the kernel's high-water mark of resident memory (``getrusage`` ``ru_maxrss``, the
  same as ``VmHWM``): all of it, torch's libraries and memory-mapped weight files included. This is
  what an OOM killer or a container limit sees.
* ``anon +``: how far ``RssAnon`` (memory the process allocated, not file pages) rose above its
  value after the imports, at its largest as seen by a thread reading ``/proc/self/status`` every
  2 ms (a spike shorter than that can be missed).
* ``weights``: the bytes of the pipeline's own tensors after loading (parameters and buffers; the
  VAE for Paint), next to ``added`` = peak RSS − imports, what loading and running added to the
  process. Weights loaded in their stored dtype stay memory-mapped from the file: resident only
  once touched (a prompt reads a few rows of the embedding) and never counted in ``anon +``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SCENARIOS = ("chat load", "chat 1 turn", "chat 10 turns", "paint load", "paint 1 image", "paint 4 candidates")
PRECISIONS = ("fp32", "bf16", "int8")
SIZES = ("tiny", "mid")
QUESTIONS = ["What is in the image?", "图片里有什么？", "What colour is the circle?", "正方形在哪里？",
             "How many shapes are there?"]
PAINT_PROMPT = "一个红色的圆形在左上角"
MIB = 2**20


# -- the measured process ---------------------------------------------------------------------------


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class AnonSampler(threading.Thread):
    """Reads RssAnon every ``interval`` seconds and keeps the largest value."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak_kib, self.running = interval, 0, True

    def run(self) -> None:
        while self.running:
            self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak_kib, status_kib("RssAnon"))


def tensor_bytes(*modules) -> int:
    """Bytes of the modules' parameters and buffers, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def test_image():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 30, 30), fill="red")
    draw.rectangle((36, 36, 58, 58), fill="blue")
    return image


def measure(size: str, precision: str, scenario: str, mid_root: Path, new_tokens: int, steps: int) -> dict:
    import torch

    from viscpm.pipelines.chat import VisCPMChat
    from viscpm.pipelines.paint import VisCPMPaint

    imports_kib, imports_anon_kib = status_kib("VmRSS"), status_kib("RssAnon")
    sampler = AnonSampler()
    sampler.start()
    kind = scenario.split()[0]
    options = {"fp32": dict(dtype=torch.float32), "bf16": dict(dtype=torch.bfloat16),
               "int8": dict(dtype=torch.bfloat16, quant="int8")}[precision]
    path = None if size == "tiny" else mid_root / kind
    if kind == "chat":
        chat = VisCPMChat(path, image_safety_checker=False, **options)
        weights = tensor_bytes(chat.model)
        image, context, states = test_image(), "", None
        turns = {"chat load": 0, "chat 1 turn": 1, "chat 10 turns": 10}[scenario]
        for turn in range(turns):
            _, context, states = chat.chat(image, QUESTIONS[turn % len(QUESTIONS)], context, states,
                                           max_new_tokens=new_tokens)
    else:
        paint = VisCPMPaint(path, image_safety_checker=False, prompt_safety_checker=False, add_ranker=False,
                            progress_bar=False, **options)
        weights = tensor_bytes(paint.model, paint.vae)
        if scenario == "paint 1 image":
            paint.paint(PAINT_PROMPT, num_inference_steps=steps, seed=0)
        elif scenario == "paint 4 candidates":
            def constant_scores(prompt, images):  # ranks nothing: keeps a ranker model out of the figure
                return [0.0] * len(images)

            paint.paint(PAINT_PROMPT, num_inference_steps=steps, seed=0, add_ranker=constant_scores, num_candidates=4)
    peak_anon_kib = sampler.stop()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"weights": weights, "imports": imports_kib * 1024, "peak_rss": peak_kib * 1024,
            "anon_growth": (peak_anon_kib - imports_anon_kib) * 1024}


# -- the driver -------------------------------------------------------------------------------------


def run_row(size: str, precision: str, scenario: str, args) -> dict | str:
    command = [sys.executable, __file__, "--child", size, precision, scenario, "--mid-root", str(args.mid_root),
               "--new-tokens", str(args.new_tokens), "--steps", str(args.steps)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
        return lines[-1][:120]
    return json.loads(result.stdout.strip().splitlines()[-1])


def quant_available() -> bool:
    import inspect

    from viscpm.pipelines.chat import VisCPMChat

    return "quant" in inspect.signature(VisCPMChat).parameters


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), metavar="SCENARIO",
                        help=f"any of {', '.join(repr(s) for s in SCENARIOS)}")
    parser.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens of every chat turn")
    parser.add_argument("--steps", type=int, default=4,
                        help="denoising steps per paint call (memory does not grow with them)")
    parser.add_argument("--mid-root", type=Path, help="where the mid-size models are written (default: a temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "PRECISION", "SCENARIO"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(measure(*args.child, args.mid_root, args.new_tokens, args.steps)))
        return 0

    precisions = list(args.precisions)
    if "int8" in precisions and not quant_available():
        print("int8 rows skipped: this viscpm has no quant= option yet")
        precisions.remove("int8")
    with tempfile.TemporaryDirectory(prefix="viscpm-memory-") as temp:
        if args.mid_root is None:
            args.mid_root = Path(temp)
        if "mid" in args.sizes:
            from mid_size import write_mid_models

            write_mid_models(args.mid_root, tuple(dict.fromkeys(s.split()[0] for s in args.scenarios)))
        print(f"viscpm memory: {os.cpu_count()} cores; MiB; every row a fresh process; chat turns "
              f"max_new_tokens={args.new_tokens} with 3 beams; paint {args.steps} steps at the model's size")
        print(f"{'size':<5} {'prec':<5} {'scenario':<19} {'weights':>8} {'imports':>8} {'peak RSS':>9} "
              f"{'added':>7} {'anon +':>7}")
        failures = 0
        for size in args.sizes:
            for precision in precisions:
                for scenario in args.scenarios:
                    row = run_row(size, precision, scenario, args)
                    if isinstance(row, str):
                        failures += 1
                        print(f"{size:<5} {precision:<5} {scenario:<19} failed: {row}", flush=True)
                        continue
                    added = row["peak_rss"] - row["imports"]
                    print(f"{size:<5} {precision:<5} {scenario:<19} {row['weights'] / MIB:>8.1f} "
                          f"{row['imports'] / MIB:>8.1f} {row['peak_rss'] / MIB:>9.1f} {added / MIB:>7.1f} "
                          f"{row['anon_growth'] / MIB:>7.1f}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
