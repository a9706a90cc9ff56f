"""A tiny Stable Diffusion safety checker folder (shared with the CLI tests)."""
from __future__ import annotations

import torch


def sd_checker_folder(root, threshold: float, with_processor: bool = True):
    """A tiny StableDiffusionSafetyChecker; every concept threshold set to ``threshold``: -1 flags
    every image (cosine > -1), 2 flags none. With a 30-pixel preprocessor config, or none (then
    the model reads CLIP's standard 224 pixels)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = root / f"sd-checker-{threshold}-{with_processor}"
    config = CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=37, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=37, image_size=30 if with_processor else 224,
                                           patch_size=10 if with_processor else 32), projection_dim=16)
    torch.manual_seed(0)
    model = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
        model.concept_embeds_weights.fill_(threshold)
        model.special_care_embeds_weights.fill_(threshold)
    model.save_pretrained(folder)
    if with_processor:
        CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(folder)
    return folder
