"""VisCPM-Paint: CPM-Bee reads the prompt, a small bridge maps its last hidden states to the
UNet's cross-attention width, and a Stable Diffusion 2.1-base UNet denoises under them.

    prompt ids --CPM-Bee (frozen)--> (B, L, d_llm) --bridge--> (B, L, d_cross) --> UNet cross-attention

The UNet (and the VAE and schedulers the pipeline uses) are stock diffusers modules; only the
bridge is ours. Parts are named for what they are (``llm``, ``bridge``, ``unet``); the official
checkpoint's ``trans_block`` is mapped by ``PAINT_KEY_RULES``. See ``shared/reference/SPEC.md`` §6.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .cpmbee import CPMBEE_KEY_RULES, CPMBEE_PRESETS, CPMBee, CPMBeeConfig, CPMBeeInputs
from .keymap import KeyRules, prefixed

# Stable Diffusion 2.1-base `unet/config.json` (the official Paint UNet). In diffusers,
# `attention_head_dim` here is really the number of heads per block (head dim 64), a historical
# misnomer that diffusers keeps for these configs.
SD21_BASE_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}

# Stable Diffusion 2.1-base `scheduler/scheduler_config.json`, which the official code reads into
# its DDPMScheduler. The pipeline builds every scheduler from this dict.
SD21_BASE_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# Keys of the reference's composite config (tests' tiny model) that hold the scheduler JSON.
_COMPOSITE_SCHEDULER_KEY = "scheduler_json_used"


@dataclass(frozen=True)
class BridgeConfig:
    dim_in: int = 4096  # the LLM width
    dim_out: int = 1024  # the UNet's cross_attention_dim
    eps: float = 1e-6  # the official block's default, not torch's 1e-5 (it shows at ~5e-5)


@dataclass(frozen=True)
class PaintConfig:
    llm: CPMBeeConfig
    unet: dict[str, Any] = field(default_factory=lambda: dict(SD21_BASE_UNET))  # as diffusers takes it
    bridge: BridgeConfig = BridgeConfig()
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD21_BASE_SCHEDULER))

    def __post_init__(self):
        if self.bridge.dim_in != self.llm.dim_model:
            raise ValueError(f"bridge dim_in {self.bridge.dim_in} must equal the LLM width {self.llm.dim_model}")
        cross = self.unet.get("cross_attention_dim")
        if self.bridge.dim_out != cross:
            raise ValueError(f"bridge dim_out {self.bridge.dim_out} must equal the UNet cross_attention_dim {cross}")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "viscpm-paint", "llm": self.llm.to_dict(), "unet": dict(self.unet),
                "bridge": asdict(self.bridge), "scheduler": dict(self.scheduler)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PaintConfig":
        """Our saved config, or the reference-style composite (``llm_config``,
        ``unet_config_resolved``, ``trans_block``, ``scheduler_json_used …``; other keys ignored)."""
        if "llm_config" in data or "trans_block" in data:
            missing = [k for k in ("llm_config", "unet_config_resolved", "trans_block") if k not in data]
            if missing:
                raise ValueError(f"paint config is missing {missing}")
            block = data["trans_block"]
            scheduler = next((v for k, v in data.items() if k.startswith(_COMPOSITE_SCHEDULER_KEY)),
                             SD21_BASE_SCHEDULER)
            return cls(CPMBeeConfig.from_dict(data["llm_config"]), _unet_config(data["unet_config_resolved"]),
                       BridgeConfig(int(block["dim_model"]), int(block["dim_out"]), float(block.get("eps", 1e-6))),
                       dict(scheduler))
        missing = [k for k in ("llm", "unet", "bridge") if k not in data]
        if missing:
            raise ValueError(f"paint config is missing {missing}")
        return cls(CPMBeeConfig.from_dict(data["llm"]), _unet_config(data["unet"]), BridgeConfig(**data["bridge"]),
                   dict(data.get("scheduler", SD21_BASE_SCHEDULER)))


def _unet_config(data: dict[str, Any]) -> dict[str, Any]:
    """Drop diffusers' bookkeeping (``_class_name``, ``_diffusers_version``, …)."""
    return {k: v for k, v in data.items() if not k.startswith("_")}


PAINT_PRESETS: dict[str, PaintConfig] = {
    # viscpm_paint_{balance,zhplus}_checkpoint.pt: CPM-Bee 10B + SD-2.1-base UNet, bridge 4096 -> 1024
    "viscpm-paint-10b": PaintConfig(CPMBEE_PRESETS["cpm-bee-10b"], dict(SD21_BASE_UNET), BridgeConfig(4096, 1024)),
}

# diffusers names the UNet's parameters the same in the official checkpoint (saved with diffusers
# 0.15) and in diffusers today (checked against the 10B manifest), so ``unet.*`` maps to itself.
UNET_KEY_RULES: KeyRules = (("unet.{rest*}", "unet.{rest*}"),)

PAINT_KEY_RULES: KeyRules = (
    ("trans_block.w_out_res.weight", "bridge.proj.weight"),
    ("trans_block.layernorm.{p}", "bridge.norm.{p}"),
    *prefixed(CPMBEE_KEY_RULES, "llm.", "llm."),
    *UNET_KEY_RULES,
)


class PaintBridge(nn.Module):
    """LLM hidden states -> UNet conditioning: bias-free projection, then LayerNorm.

    (The official block also holds a dropout with p=0 between the two, a no-op left out here.)
    """

    def __init__(self, config: BridgeConfig):
        super().__init__()
        self.proj = nn.Linear(config.dim_in, config.dim_out, bias=False)
        self.norm = nn.LayerNorm(config.dim_out, eps=config.eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (B, L, d_llm) -> (B, L, d_cross)
        return self.norm(self.proj(hidden_states))


class PaintModel(nn.Module):
    """Freeze flags pick what trains. Official recipe: the LLM stays frozen; stage 1 trains the
    bridge only (the defaults), stage 2 also the UNet's cross-attention
    (``unet_trainable="cross_attention"``); ``unet_trainable=True`` trains the whole UNet."""

    def __init__(
        self,
        config: PaintConfig,
        *,
        llm_trainable: bool = False,
        bridge_trainable: bool = True,
        unet_trainable: bool | Literal["cross_attention"] = False,
    ):
        super().__init__()
        if unet_trainable not in (True, False, "cross_attention"):
            raise ValueError(f"unet_trainable must be True, False or 'cross_attention', got {unet_trainable!r}")
        self.config = config
        self.llm = CPMBee(config.llm)
        self.bridge = PaintBridge(config.bridge)
        self.unet = UNet2DConditionModel.from_config(config.unet)
        self.llm.requires_grad_(llm_trainable)
        self.bridge.requires_grad_(bridge_trainable)
        self.unet.requires_grad_(unet_trainable is True)
        if unet_trainable == "cross_attention":
            for name, module in self.unet.named_modules():
                if name.endswith(".attn2"):  # diffusers' name for the text cross-attention
                    module.requires_grad_(True)

    def encode_text(self, inputs: CPMBeeInputs) -> torch.Tensor:
        """CPM-Bee's last hidden states (after its final norm) over the whole padded prompt:
        (B, L, d_llm). Padding rows are kept: the official UNet attends to them (no mask)."""
        return self.llm(inputs, compute_logits=False).hidden_states

    def encode_prompt(self, inputs: CPMBeeInputs) -> torch.Tensor:
        """UNet conditioning states (B, L, d_cross), in the bridge's dtype (the official code runs
        the LLM in fp16 and everything after it in fp32)."""
        hidden_states = self.encode_text(inputs)
        return self.bridge(hidden_states.to(self.bridge.proj.weight.dtype))

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        inputs: CPMBeeInputs | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training-style pass: noise prediction (B, C, h, w) for latents at ``timesteps``,
        conditioned on a prompt batch (or on precomputed ``encoder_hidden_states``)."""
        if encoder_hidden_states is None:
            if inputs is None:
                raise ValueError("pass the prompt inputs or encoder_hidden_states")
            encoder_hidden_states = self.encode_prompt(inputs)
        sample = noisy_latents.to(self.unet.dtype)
        return self.unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states.to(sample.dtype)).sample
