"""VisCPM-Paint at the official size on a CPU: seconds per 512 px image, fp32 against bf16.

    python bench/paint_official.py                                    # UNet + VAE, fp32 and bf16
    python bench/paint_official.py --llm-checkpoint /tmp/viscpm-10b/viscpm_chat_10b.pt   # + the 10B text encoder

Synthetic weights in the official shapes: Stable Diffusion 2.1-base's UNet (866 M parameters,
``viscpm.models.paint.SD21_BASE_UNET``) and VAE (diffusers' ``AutoencoderKL`` with SD's widths), random.
The text encoder is the 10B CPM-Bee: the chat checkpoint's language model has the paint model's
shape (both are CPM-Bee 10B), so ``--llm-checkpoint`` takes a 10B chat checkpoint (e.g. the one
``bench/load_10b.py`` writes), loads it with ``quant`` and times the prompt encoding (``[negative;
prompt]``, the paint prompt format, padded as officially).

Each part is timed on its own (median of ``--repeats`` calls after a warm-up): one UNet call under
classifier-free guidance (a batch of 2 at 64×64 latents), one VAE decode to 512×512, one prompt
encoding; seconds per image = encoding + steps × UNet call + decode, for the official sampler (DDPM,
50 steps) and the fast preset (SDE-DPM-Solver++, 20 steps). A scheduler step costs microseconds
beside a UNet call, so it is left out. Not part of CI (a few minutes; ~13 GB with the text encoder).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from viscpm import VisCPMPaint
from viscpm.models.paint import SD21_BASE_UNET
from viscpm.pipelines.defaults import SAMPLING_PRESETS

PROMPT = "A cat sitting on a sofa by the window, oil painting"
# Stable Diffusion 2.x's VAE (`vae/config.json`): 4 latent channels, 8x downscaling
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
          "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "sample_size": 768}


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocators, oneDNN primitive caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def time_unet_and_vae(dtype: torch.dtype, text_length: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SD21_BASE_UNET).eval().to(dtype)
    vae = AutoencoderKL.from_config(SD_VAE).eval().to(dtype)
    latents = torch.randn(2, 4, 64, 64, dtype=dtype)  # [negative; prompt] under guidance
    context = torch.randn(2, text_length, SD21_BASE_UNET["cross_attention_dim"], dtype=dtype)
    step = torch.tensor(500)
    unet_s = median_seconds(lambda: unet(latents, step, encoder_hidden_states=context).sample, repeats)
    vae_s = median_seconds(lambda: vae.decode(latents[:1] / 0.18215).sample, repeats)
    return {"unet_s": unet_s, "vae_s": vae_s,
            "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6}


@torch.no_grad()
def time_text_encoder(checkpoint: str, vocab: str | None, quant: str, repeats: int) -> tuple[float, int]:
    """The 10B CPM-Bee (from a chat checkpoint) encoding the paint prompt's [negative; prompt] batch."""
    from viscpm.pipelines.chat import VisCPMChat

    inputs = VisCPMPaint(progress_bar=False).prompt_inputs(PROMPT)  # the paint prompt format, padded
    chat = VisCPMChat(checkpoint, vocab_path=vocab, quant=quant, image_safety_checker=False)
    llm = chat.model.llm
    seconds = median_seconds(lambda: llm(inputs, compute_logits=False), repeats)
    return seconds, inputs.input_ids.size(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="UNet/VAE dtypes to time (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llm-checkpoint", help="a 10B chat checkpoint whose CPM-Bee stands in for the text encoder")
    parser.add_argument("--vocab", help="its vocab.txt (default: beside it)")
    parser.add_argument("--quant", default="int8", choices=("int8", "int4"), help="the text encoder's (default int8)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    text_s, text_length = None, VisCPMPaint(progress_bar=False).prompt_inputs(PROMPT).input_ids.size(1)
    if args.llm_checkpoint:
        vocab = args.vocab or str(Path(args.llm_checkpoint).with_name("vocab.txt"))
        text_s, text_length = time_text_encoder(args.llm_checkpoint, vocab, args.quant, args.repeats)
    results = {name: time_unet_and_vae(getattr(torch, name), text_length, args.repeats) for name in args.dtypes.split(",")}

    flags = [f for f in ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
             if f in Path("/proc/cpuinfo").read_text()] if os.path.exists("/proc/cpuinfo") else []
    print(f"threads {args.threads}; CPU flags: {' '.join(flags) or 'n/a'}; 512x512, guidance on (UNet batch 2), "
          f"prompt {text_length} tokens; median of {args.repeats}")
    text = f"{text_s:.2f} s ({args.quant}, 10B)" if text_s is not None else "not timed (no --llm-checkpoint)"
    print(f"text encoding: {text}")
    presets = {f"official ({SAMPLING_PRESETS['official'][0]} {SAMPLING_PRESETS['official'][1]})": SAMPLING_PRESETS["official"][1],
               f"fast ({SAMPLING_PRESETS['fast'][0]} {SAMPLING_PRESETS['fast'][1]})": SAMPLING_PRESETS["fast"][1]}
    print(f"{'UNet/VAE':9} {'UNet call s':>11} {'VAE decode s':>12} " + " ".join(f"{p + ' s/image':>26}" for p in presets))
    for name, r in results.items():
        per_image = [(text_s or 0.0) + steps * r["unet_s"] + r["vae_s"] for steps in presets.values()]
        print(f"{name:9} {r['unet_s']:11.2f} {r['vae_s']:12.2f} " + " ".join(f"{s:26.1f}" for s in per_image))
    if "float32" in results and "bfloat16" in results:
        print(f"bf16 / fp32: UNet {results['bfloat16']['unet_s'] / results['float32']['unet_s']:.2f}, "
              f"VAE {results['bfloat16']['vae_s'] / results['float32']['vae_s']:.2f}")
    if text_s is None:
        print("s/image above leaves out the text encoding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
