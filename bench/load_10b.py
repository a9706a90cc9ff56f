"""Load the 10B VisCPM-Chat in int8 on a CPU machine, and measure what it costs.

    python bench/load_10b.py                      # int8 (writes a ~21 GB synthetic checkpoint once)
    python bench/load_10b.py --quant int4 --tokens 4
    python bench/load_10b.py --checkpoint viscpm_chat_zhplus_checkpoint.pt   # the real weights

There is no real checkpoint here, so the script writes a synthetic one in the exact official
layout: every key, shape and dtype (fp16) of ``../shared/reference/manifest/viscpm_chat_10b.json``,
random values, streamed into a ``.safetensors`` file under the official key names (the loader reads
it as it reads the official ``.pt``, memory-mapped), so this script never holds the 21 GB itself.

Each measurement runs in a fresh process: load with ``VisCPMChat(path, quant=...)`` (memory-mapped,
quantized layer by layer, each float layer's pages given back), then answer one question about an
image greedily. Reported: load time, peak resident memory (``ru_maxrss``: anonymous *and* mapped
file pages) against the quantized model's own size, the first token's latency (image encoding +
prompt prefill: what a user waits for) and seconds per generated token, beside the figures issue
21 measured before the fast paths (Intel Xeon with AMX, 2 threads).
Not part of CI (it needs ~21 GB of disk and minutes).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mid_size import write_vocab

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO.parent / "shared" / "reference" / "manifest" / "viscpm_chat_10b.json"
ISSUE_21_INT8 = {"first_token_s": 40.0, "s_per_token": 0.76}  # before the fast paths, on an AMX machine


def write_synthetic_checkpoint(path: Path) -> None:
    """Random fp16 tensors with the official 10B keys and shapes, streamed into one ``.safetensors``
    file (official key names: the loader treats it as the official ``.pt``). A ``torch.save``'d
    ``.pt`` would need the values in memory or a second 21 GB scratch file on disk; this needs
    neither (the header, then each tensor's bytes in chunks)."""
    keys = json.loads(MANIFEST.read_text())["keys"]
    header, offset = {}, 0
    for key, entry in keys.items():
        header[key] = {"dtype": "F16", "shape": entry["shape"], "data_offsets": [offset, offset + 2 * entry["numel"]]}
        offset += 2 * entry["numel"]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    rng = np.random.default_rng(0)
    chunk = 1 << 26
    partial = path.with_suffix(".tmp")
    with open(partial, "wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        for entry in keys.values():
            for start in range(0, entry["numel"], chunk):  # small random weights, chunk by chunk
                count = min(chunk, entry["numel"] - start)
                out.write((rng.standard_normal(count, dtype=np.float32) * 0.02).astype(np.float16).tobytes())
    partial.rename(path)


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def outlier_rows(chat, states) -> dict:
    """How many of the prefill's input rows W8A8 splits (a value beyond OUTLIER_SIGMAS of its row,
    so the row costs two in the GEMM), by input width: one more, untimed, question."""
    from viscpm import quantization

    counts, plain = {}, quantization.w8a8_matmul

    def counting(x, packed):
        magnitude = x.abs()
        sigmas = magnitude.amax(dim=1) / magnitude.sum(dim=1) * x.size(1) / 1.2533
        seen = counts.setdefault(str(x.size(1)), [0, 0])
        seen[0], seen[1] = seen[0] + x.size(0), seen[1] + int((sigmas > quantization.OUTLIER_SIGMAS).sum())
        return plain(x, packed)

    quantization.w8a8_matmul = counting
    try:
        chat.chat(None, "What is in the image?", vision_hidden_states=states, num_beams=1, max_new_tokens=1)
    finally:
        quantization.w8a8_matmul = plain
    return counts


def child(args) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    from PIL import Image

    from viscpm.pipelines.chat import VisCPMChat
    from viscpm.quantization import quantized_bytes

    torch.set_num_threads(args.threads)
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    chat = VisCPMChat(args.checkpoint, vocab_path=args.vocab, quant=args.quant, dtype=getattr(torch, args.dtype),
                      image_safety_checker=False)
    load_s = time.perf_counter() - start
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    after_load = {"rss": rss_mb("VmRSS"), "anon": rss_mb("RssAnon"), "file": rss_mb("RssFile")}
    size = quantized_bytes(chat.model) / 2**20
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    start = time.perf_counter()
    states = chat.encode_image(image)
    encode_s = time.perf_counter() - start
    steps, lengths = [], []
    hook = chat.model.llm.register_forward_hook(lambda *_: steps.append(time.perf_counter()))
    measure_prompt = chat.model.llm.register_forward_pre_hook(lambda _, args: lengths.append(args[0].input_ids.size(1)))
    start = time.perf_counter()
    chat.chat(None, "What is in the image?", vision_hidden_states=states, num_beams=1, max_new_tokens=args.tokens)
    first_steps, prefill_s = steps[:], steps[0] - start
    # a later question (a new image, a new prompt): what every question after the first waits for,
    # once the kernels' one-time set-up (FBGEMM's per-shape code, first touch of buffers) is done
    start = time.perf_counter()
    states = chat.encode_image(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    encode_again_s = time.perf_counter() - start
    steps.clear()
    start = time.perf_counter()
    chat.chat(None, "Describe the picture.", vision_hidden_states=states, num_beams=1, max_new_tokens=1)
    prefill_again_s = steps[0] - start
    steps[:] = first_steps
    hook.remove()
    measure_prompt.remove()
    split = outlier_rows(chat, states) if args.quant == "int8" else {}
    print(json.dumps({
        "encode_image_again_s": encode_again_s, "prefill_again_s": prefill_again_s, "outlier_rows": split,
        "quant": args.quant, "load_s": load_s, "model_mb": size, "rss_before_mb": before,
        "peak_rss_load_mb": peak_load, "after_load": after_load,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "encode_image_s": encode_s, "prefill_s": prefill_s, "prompt_tokens": lengths[0],
        "s_per_token": (steps[-1] - steps[0]) / max(len(steps) - 1, 1), "tokens": len(steps) - 1,
    }))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/viscpm-10b", help="where the synthetic checkpoint lives (reused)")
    parser.add_argument("--quant", default="int8", choices=("int8", "int4"))
    parser.add_argument("--tokens", type=int, default=8, help="tokens to generate (default 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the model's float dtype beside the quantized layers (default float32, the pipeline's)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help="an existing 10B chat checkpoint (the official .pt, or an earlier "
                        "synthetic .pt/.safetensors) instead of the synthetic one in --dir")
    parser.add_argument("--vocab", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint or folder / "viscpm_chat_10b.safetensors")
    vocab = folder / "vocab.txt"
    if not checkpoint.is_file() and args.checkpoint is None:
        start = time.perf_counter()
        write_synthetic_checkpoint(checkpoint)
        print(f"wrote {checkpoint} ({checkpoint.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - start:.0f} s")
    if not vocab.is_file():
        write_vocab(vocab, 86_583)
    command = [sys.executable, __file__, "--child", "--checkpoint", str(checkpoint), "--vocab", str(vocab),
               "--quant", args.quant, "--tokens", str(args.tokens), "--threads", str(args.threads), "--dtype", args.dtype]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    ratio = result["peak_rss_mb"] / result["model_mb"]
    print(f"checkpoint {checkpoint.stat().st_size / 2**30:.1f} GiB fp16; {args.threads} threads; model dtype {args.dtype}")
    print(f"{'quant':5} {'model MiB':>9} {'load s':>7} {'peak RSS MiB':>12} {'peak/model':>10} "
          f"{'RSS after load (anon+file)':>27} {'image s':>7} {'prefill s':>9} {'first token s':>13} {'s/token':>7}")
    after = result["after_load"]
    first_token = result["encode_image_s"] + result["prefill_s"]
    print(f"{args.quant:5} {result['model_mb']:9.0f} {result['load_s']:7.1f} {result['peak_rss_mb']:12.0f} {ratio:10.2f} "
          f"{after['rss']:10.0f} ({after['anon']:.0f}+{after['file']:.0f}) {result['encode_image_s']:7.1f} "
          f"{result['prefill_s']:9.1f} {first_token:13.1f} {result['s_per_token']:7.2f}")
    print(f"prompt {result['prompt_tokens']} tokens (the image's 64 queries included)")
    again = result["encode_image_again_s"] + result["prefill_again_s"]
    print(f"a later question (another image and prompt): image {result['encode_image_again_s']:.1f} s + prefill "
          f"{result['prefill_again_s']:.1f} s = first token {again:.1f} s")
    for width, (rows, split) in sorted(result["outlier_rows"].items(), key=lambda item: int(item[0])):
        print(f"W8A8 inputs {width} wide: {split} of {rows} rows split for outliers ({split / rows:.0%}: each costs two)")
    print(f"issue 21 (int8, AMX machine, before): first token ~{ISSUE_21_INT8['first_token_s']:.0f} s, "
          f"{ISSUE_21_INT8['s_per_token']:.2f} s/token; here: {first_token / ISSUE_21_INT8['first_token_s']:.2f}x and "
          f"{result['s_per_token'] / ISSUE_21_INT8['s_per_token']:.2f}x of those times")
    print(f"peak RSS includes the interpreter and torch ({result['rss_before_mb']:.0f} MiB before loading); "
          f"peak during loading alone: {result['peak_rss_load_mb']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
