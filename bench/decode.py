"""Decode speed against the hardware bound, and beam-3 against the official VisCPM code.

    python bench/decode.py                 # fp32, bf16, int8, int4 (+ bf16 models) on the mid-size config
    python bench/decode.py --tokens 16     # a quick look

At batch 1, every generated token reads all the language model's weights once, so the fastest
possible decode is ``read bandwidth ÷ bytes of weights``. This script measures the read bandwidth
(a sum over a large tensor) and our tokens/s in the same run, on the mid-size model the official
code was timed on (``../shared/reference/timings.json``: CPM-Bee d=1024 × 8 layers, vocab 86,583;
BEiT-3 d=192 × 4; 64 queries; random weights), and prints ``achieved/bound``. It then runs the
official beam search settings (3 beams, max_length 64 → 66 decode steps) and compares our
decode-only tokens/s with the official 5.40 (fp32, 2 threads), timed the same way: the sum of the
language-model calls after the prefill. Quality per precision: the prefill logits against fp32.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mid_size import MID_LLM, write_mid_models
from viscpm.pipelines.chat import VisCPMChat
from viscpm.quantization import Int8Embedding, quantized_bytes

REPO = Path(__file__).resolve().parents[1]
TIMINGS = REPO.parent / "shared" / "reference" / "timings.json"
OFFICIAL_DECODE_TOKENS_PER_S = 5.40  # timings.json: fp32, 2 threads, decode only (read from the file when present)
OFFICIAL_PREFILL_S = 0.97  # timings.json: the beam-3 prefill (3 rows of the 91-token prompt), median
QUESTION = "What is in the picture? Describe the shapes, their colours and where they are."
# int8 / int4 = quantized LLM weights in an fp32 model (the pipeline's default with quant): its
# prefill GEMMs run in fp32; "+bf16" = the same weights in a bf16 model: bf16 GEMMs, bf16 logits
PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
              "int8": (torch.float32, "int8"), "int4": (torch.float32, "int4"),
              "int8+bf16": (torch.bfloat16, "int8"), "int4+bf16": (torch.bfloat16, "int4")}
# Quality: relative L2 of the prompt logits against fp32. Top-1 agreement is printed but not
# required: random weights give nearly tied logits, so any rounding flips many of them (a trained
# model's quality under int8 is checked on ShapesWorld in tests/test_default_model.py).
LOGITS_TOLERANCE = 0.05


def read_bandwidth_gbs(gib: float = 2.0, repeats: int = 5) -> float:
    """Best-of-N read bandwidth: a sum over a tensor far larger than the caches."""
    data = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    data.sum()  # fault the pages in
    best = min(_timed(lambda: data.sum()) for _ in range(repeats))
    return data.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class LLMCallTimer:
    """Wall time of every language-model call (the first is the prefill)."""

    def __init__(self, llm: torch.nn.Module):
        self.durations: list[float] = []
        llm.register_forward_pre_hook(self._start)
        llm.register_forward_hook(self._stop)

    def reset(self) -> None:
        self.durations = []

    def _start(self, module, args) -> None:
        self._began = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        self.durations.append(time.perf_counter() - self._began)


@torch.no_grad()
def prompt_logits(chat: VisCPMChat, image: Image.Image) -> torch.Tensor:
    """Logits at every prompt position (one full forward with the image), as fp32."""
    prompt, embeds, _ = chat._prepare([image], [QUESTION], [""], [None], image_safety_checker=False)
    return chat.model.llm(prompt.inputs, inputs_embeds=embeds).logits[0].float()


def vocabulary_lookup_bytes(llm: torch.nn.Module) -> int:
    """The int8 vocabulary's plain copy, which decoding only looks rows up in (0 when not int8)."""
    return llm.embed.weight.numel() if isinstance(llm.embed, Int8Embedding) and llm.embed.packed is not None else 0


def measure(chat: VisCPMChat, timer: LLMCallTimer, image: Image.Image, tokens: int, runs: int, **options) -> dict:
    """Median decode-only tokens/s (official method: sum of LLM calls after the prefill),
    end-to-end decode tokens/s (wall time from the end of the prefill to the answer) and the
    prefill's seconds."""
    states = chat.encode_image(image, image_safety_checker=False)
    decode_only, wall, prefill = [], [], []
    for _ in range(runs + 1):  # the first run warms up
        timer.reset()
        start = time.perf_counter()
        chat.chat(None, QUESTION, vision_hidden_states=states, **options)
        total = time.perf_counter() - start
        steps = len(timer.durations) - 1
        decode_only.append(steps / sum(timer.durations[1:]))
        wall.append(steps / (total - timer.durations[0]))
        prefill.append(timer.durations[0])
    return {"decode_only": statistics.median(decode_only[1:]), "wall": statistics.median(wall[1:]), "steps": steps,
            "prefill": statistics.median(prefill[1:])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated: {','.join(PRECISIONS)}")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per batch-1 run (default 64)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement, median reported (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as the official timing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    official, official_prefill = OFFICIAL_DECODE_TOKENS_PER_S, OFFICIAL_PREFILL_S
    if TIMINGS.is_file():
        timings = json.loads(TIMINGS.read_text())["chat_beam_search"]
        official, official_prefill = timings["new_tokens_per_s_decode_only (median)"], timings["prefill_s_median"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))

    rows, reference_logits = [], None
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_mid_models(Path(scratch), ("chat",))["chat"]
        for name in args.precisions.split(","):
            dtype, quant = PRECISIONS[name]
            chat = VisCPMChat(folder, dtype=dtype, quant=quant, image_safety_checker=False)
            timer = LLMCallTimer(chat.model.llm)
            bandwidth = read_bandwidth_gbs()  # re-measured beside each precision: the machine drifts
            greedy = measure(chat, timer, image, args.tokens, args.runs, num_beams=1, max_new_tokens=args.tokens)
            logits = prompt_logits(chat, image)
            reference_logits = logits if reference_logits is None else reference_logits
            error = ((logits - reference_logits).norm() / reference_logits.norm()).item()
            same_top1 = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
            beams = measure(chat, timer, image, args.tokens, args.runs, num_beams=3, max_length=64,
                            repetition_penalty=1.1, length_penalty=3.0, temperature=0.7)
            # every weight once (FBGEMM's packed int8 matrices included; the vocabulary counted once,
            # though an int8 model holds it twice: the lookup reads a row, the projection the packed copy)
            bytes_per_token = quantized_bytes(chat.model.llm) - vocabulary_lookup_bytes(chat.model.llm)
            bound = bandwidth * 1e9 / bytes_per_token
            rows.append({
                "precision": name, "weights_mb": bytes_per_token / 1e6, "bandwidth_gbs": bandwidth,
                "bound": bound, "greedy": greedy["decode_only"], "greedy_wall": greedy["wall"],
                "ratio": greedy["wall"] / bound, "beam3": beams["decode_only"], "beam3_wall": beams["wall"],
                "beam_steps": beams["steps"], "vs_official": beams["decode_only"] / official,
                "beam3_prefill": beams["prefill"], "prefill_vs_official": official_prefill / beams["prefill"],
                "logits_rel_err": error, "same_top1": same_top1,
                "ok": error <= LOGITS_TOLERANCE,
            })
            del chat, timer

    print(f"threads {args.threads}, cores {torch.get_num_threads()} used of {len(__import__('os').sched_getaffinity(0))}; "
          f"mid-size CPM-Bee ({MID_LLM.num_layers}×{MID_LLM.dim_model}, vocab {MID_LLM.vocab_size:,}), "
          f"prompt {len(reference_logits)} tokens; official beam-3 decode {official:.2f} tok/s, "
          f"prefill {official_prefill:.2f} s (the prompt once per beam)")
    header = (f"{'prec':9} {'LLM MB':>7} {'GB/s':>5} {'bound':>6} {'greedy':>7} {'achieved/bound':>14} "
              f"{'beam3':>6} {'beam3 wall':>10} {'vs official':>11} {'prefill s':>9} {'speedup':>7} "
              f"{'logit err':>9} {'top1':>5}")
    print(header)
    for r in rows:
        print(f"{r['precision']:9} {r['weights_mb']:7.0f} {r['bandwidth_gbs']:5.1f} {r['bound']:6.1f} {r['greedy_wall']:7.1f} "
              f"{r['ratio']:14.2f} {r['beam3']:6.1f} {r['beam3_wall']:10.1f} {r['vs_official']:10.2f}x "
              f"{r['beam3_prefill']:9.2f} {r['prefill_vs_official']:6.2f}x "
              f"{r['logits_rel_err']:9.4f} {r['same_top1']:5.2f}{'' if r['ok'] else '  (out of tolerance)'}")
    print("tokens/s; greedy = batch 1, wall time per decode step incl. sampling; beam3 = official method "
          f"(sum of LLM calls after prefill, {rows[0]['beam_steps']} steps); beam3 wall includes the search's own work; "
          "prefill s = beam-3's prompt pass (once, then copied to the beams), speedup = official prefill / ours. "
          f"Tolerance: prompt logits within {LOGITS_TOLERANCE:.0%} of fp32 (relative L2); top1 = share of "
          "positions with fp32's argmax (random weights: near ties).")
    fastest = max((r for r in rows if r["ok"]), key=lambda r: r["beam3"])
    print(f"fastest within tolerance: {fastest['precision']} beam-3 {fastest['beam3']:.1f} tok/s = "
          f"{fastest['vs_official']:.2f}x the official code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
