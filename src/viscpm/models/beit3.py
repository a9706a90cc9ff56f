"""BEiT-3 multiway encoder as VisCPM-Chat uses it: image patches in, learnable-query outputs out.

VisCPM-Chat appends Q learnable query vectors after the image tokens (cls + patches) and runs the
BEiT-3 encoder over the joined sequence. Every projection and norm is *multiway*: two experts of the
same shape, one for the image tokens and one for the query tokens. Attention still mixes all tokens
jointly. Only the Q query outputs are returned; they become the LLM's image embeddings.

This matches torchscale 0.2.0 as the official VisCPM configures it (see SPEC.md §3): pre-LN layers
with sub-LN inside attention and the FFN, no embedding scale, no embedding LayerNorm, final
LayerNorm on, LayerNorm eps 1e-5, no relative position bias, dropout 0.

Official key names differ from ours; ``BEIT3_KEY_RULES`` maps them both ways. In the official
checkpoint expert ``A`` is our ``image`` expert and ``B`` is our ``query`` expert.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from viscpm.models.keymap import KeyRules

# ------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class BEiT3Config:
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    dim: int
    num_heads: int
    ffn_dim: int
    num_layers: int
    max_text_positions: int = 1024  # rows of the query ("text") positional table
    layernorm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """cls token + patches: the position where the query tokens start (the multiway split)."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BEiT3Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown BEiT3Config fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str) -> BEiT3Config:
        if name not in BEIT3_PRESETS:
            raise ValueError(f"unknown BEiT-3 preset {name!r}; choose one of {sorted(BEIT3_PRESETS)}")
        return BEIT3_PRESETS[name]

    @classmethod
    def from_official(cls, official: dict[str, Any]) -> BEiT3Config:
        """Read a torchscale ``EncoderConfig``-style dict (``encoder_embed_dim``, ``img_size``, ...).

        Keys this encoder has no use for (``vocab_size``, ``drop_path_rate``, ...) are ignored, but a
        key that would change the math away from what is implemented here raises ``ValueError``.
        """
        for key, supported in _OFFICIAL_FIXED_SETTINGS.items():
            if key in official and official[key] != supported:
                raise ValueError(
                    f"official BEiT-3 config has {key}={official[key]!r}; only {key}={supported!r} "
                    "(the VisCPM setting) is implemented"
                )
        optional = {
            "img_size": "image_size",
            "patch_size": "patch_size",
            "in_chans": "in_channels",
            "max_source_positions": "max_text_positions",
            "layernorm_eps": "layernorm_eps",
        }
        required = {
            "encoder_embed_dim": "dim",
            "encoder_attention_heads": "num_heads",
            "encoder_ffn_embed_dim": "ffn_dim",
            "encoder_layers": "num_layers",
        }
        missing = sorted(set(required) - set(official))
        if missing:
            raise ValueError(f"official BEiT-3 config is missing {missing}")
        names = {**optional, **required}
        return cls(**{ours: official[theirs] for theirs, ours in names.items() if theirs in official})


# torchscale EncoderConfig fields whose other values would need code this module does not have.
_OFFICIAL_FIXED_SETTINGS: dict[str, Any] = {
    "multiway": True,
    "subln": True,
    "encoder_normalize_before": True,
    "normalize_output": True,
    "deepnorm": False,
    "no_scale_embedding": True,
    "layernorm_embedding": False,
    "rel_pos_buckets": 0,
    "max_rel_pos": 0,
    "xpos_rel_pos": False,
    "moe_freq": 0,
}

BEIT3_PRESETS: dict[str, BEiT3Config] = {
    # The VisCPM-Chat vision encoder (`beit3_large_patch16_224` in the official code).
    "beit3-large-patch16-224": BEiT3Config(dim=1024, num_heads=16, ffn_dim=4096, num_layers=24),
}

# ------------------------------------------------------------------------------------------------
# Modules, leaf first


class Multiway(nn.Module):
    """Two experts of the same shape: tokens ``[:split]`` go to ``image``, ``[split:]`` to ``query``."""

    def __init__(self, make_expert: Callable[[], nn.Module]):
        super().__init__()
        self.image = make_expert()
        self.query = make_expert()

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        # x: (B, T, C) -> (B, T, C'); each token's output depends on that token only.
        return torch.cat([self.image(x[:, :split]), self.query(x[:, split:])], dim=1)


def _layer_norm(config: BEiT3Config, width: int) -> Callable[[], nn.Module]:
    return lambda: nn.LayerNorm(width, eps=config.layernorm_eps)


def _linear(in_features: int, out_features: int) -> Callable[[], nn.Module]:
    return lambda: nn.Linear(in_features, out_features)


class MultiwayAttention(nn.Module):
    """Bidirectional self-attention over all tokens; projections and the sub-LN are per expert."""

    def __init__(self, config: BEiT3Config):
        super().__init__()
        d = config.dim
        self.num_heads = config.num_heads
        self.scale = config.head_dim**-0.5
        self.q_proj = Multiway(_linear(d, d))
        self.k_proj = Multiway(_linear(d, d))
        self.v_proj = Multiway(_linear(d, d))
        self.sub_norm = Multiway(_layer_norm(config, d))  # sub-LN between attention and out_proj
        self.out_proj = Multiway(_linear(d, d))

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        B, T, C = x.shape
        H = self.num_heads
        q = self.q_proj(x, split) * self.scale  # scaled after the bias, as torchscale does
        k = self.k_proj(x, split)
        v = self.v_proj(x, split)
        q = q.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hd)
        v = v.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hd)
        # The official code takes softmax(q @ k^T) in fp32 (no mask, no position bias). SDPA with
        # scale=1 (q is already scaled) agrees within 4e-7 in fp32; in fp16 the official code first
        # rounds the scores to fp16, so the two differ by about one fp16 ulp of the output.
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C), heads merged
        y = self.sub_norm(y, split)
        return self.out_proj(y, split)


class FeedForward(nn.Module):
    """One expert's FFN: fc1 -> GELU (erf, in fp32) -> sub-LN -> fc2."""

    def __init__(self, config: BEiT3Config):
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.ffn_dim)
        self.sub_norm = nn.LayerNorm(config.ffn_dim, eps=config.layernorm_eps)
        self.fc2 = nn.Linear(config.ffn_dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h.float()).to(h.dtype)
        return self.fc2(self.sub_norm(h))


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer; every norm and sub-block is multiway."""

    def __init__(self, config: BEiT3Config):
        super().__init__()
        self.attn_norm = Multiway(_layer_norm(config, config.dim))
        self.attn = MultiwayAttention(config)
        self.ffn_norm = Multiway(_layer_norm(config, config.dim))
        # Unlike attention, the whole FFN is one expert (official keys `ffn.A.fc1`, not `ffn.fc1.A`).
        self.ffn = Multiway(lambda: FeedForward(config))

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x, split), split)
        x = x + self.ffn(self.ffn_norm(x, split), split)
        return x


def sincos_2d_positions(side: int, dim: int) -> torch.Tensor:
    """[side*side, dim] row-major grid positions: half the channels encode the row, half the
    column, each as sines and cosines at geometrically spaced frequencies (MAE's fixed table)."""
    if dim % 4:
        raise ValueError(f"sine-cosine positions need dim divisible by 4, got {dim}")
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (d/4,)
    coords = torch.arange(side, dtype=torch.float64)[:, None] * frequencies  # (side, d/4)
    axis = torch.cat([coords.sin(), coords.cos()], dim=1)  # (side, d/2)
    rows = axis[:, None, :].expand(side, side, -1)
    cols = axis[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, dim).float()


class BEiT3VisionEncoder(nn.Module):
    """Image + learnable queries -> query outputs ``[B, Q, dim]``.

    The queries themselves are a parameter of the chat model, passed in at call time.
    """

    # Positional tables start at row 2 for both token kinds: fairseq's padding offset, kept by
    # torchscale's PositionalEmbedding. Rows 0 and 1 exist in the checkpoint but are never read.
    POSITION_OFFSET = 2

    def __init__(self, config: BEiT3Config):
        super().__init__()
        self.config = config
        d = config.dim
        p = config.patch_size
        self.patch_embed = nn.Conv2d(config.in_channels, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        # One row per image token plus the two unused offset rows: [num_patches + 3, d].
        self.image_positions = nn.Parameter(torch.empty(config.num_image_tokens + self.POSITION_OFFSET, d))
        self.query_positions = nn.Parameter(torch.empty(config.max_text_positions, d))
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.norm = Multiway(_layer_norm(config, d))
        for param in (self.cls_token, self.image_positions, self.query_positions):
            nn.init.trunc_normal_(param, std=0.02)
        # Training from scratch (ShapesWorld): patch positions start as a 2-D sine-cosine grid, as in
        # MAE, instead of noise — a small encoder then tells where a shape is from the first step.
        # Loaded checkpoints overwrite this.
        with torch.no_grad():
            side = config.image_size // p
            start = self.POSITION_OFFSET + 1  # after the cls row
            self.image_positions[start : start + side * side] = sincos_2d_positions(side, d)

    def forward(self, pixel_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        self._check_inputs(pixel_values, queries)
        dtype = self.patch_embed.weight.dtype
        B, Q = pixel_values.shape[0], queries.shape[0]
        split = self.config.num_image_tokens
        offset = self.POSITION_OFFSET

        # 1. Image tokens: cls + patches (row-major), each plus its image position.
        patches = self.patch_embed(pixel_values.to(dtype))  # (B, d, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, d)
        image = torch.cat([self.cls_token.expand(B, -1, -1), patches], dim=1)  # (B, N+1, d)
        image = image + self.image_positions[offset : offset + split]

        # 2. Query tokens: the same queries for every image, positions restarting at the offset.
        query = queries.to(dtype) + self.query_positions[offset : offset + Q]  # (Q, d)
        x = torch.cat([image, query.expand(B, -1, -1)], dim=1)  # (B, N+1+Q, d)

        # 3. Encoder layers over the joined sequence.
        for layer in self.layers:
            x = layer(x, split)

        # 4. Final norm. Only the query outputs are returned, so only the query expert is needed;
        #    the image expert stays for checkpoint parity.
        return self.norm.query(x[:, split:])  # (B, Q, d)

    def _check_inputs(self, pixel_values: torch.Tensor, queries: torch.Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {list(pixel_values.shape)}"
            )
        if queries.ndim != 2 or queries.shape[1] != c.dim:
            raise ValueError(f"queries must have shape [Q, {c.dim}], got {list(queries.shape)}")
        if queries.shape[0] + self.POSITION_OFFSET > c.max_text_positions:
            raise ValueError(
                f"{queries.shape[0]} queries need {queries.shape[0] + self.POSITION_OFFSET} query positions, "
                f"but max_text_positions is {c.max_text_positions}"
            )


# ------------------------------------------------------------------------------------------------
# Official checkpoint names (relative to the `vpm.` prefix) <-> ours (relative to BEiT3VisionEncoder)

# Official parameters the forward never reads; a loader accepts and drops them.
UNUSED_OFFICIAL_KEYS: frozenset[str] = frozenset(
    {
        "beit3.text_embed.weight",  # text token embedding; only used to initialise the queries
        "beit3.vision_embed.mask_token",  # masked-image-modelling pre-training only
        "mim_head.weight",  # masked-image-modelling head, hard-coded Linear(1024, 8192)
        "mim_head.bias",
    }
)

# Official expert letters -> our expert names.
_EXPERTS = (("A", "image"), ("B", "query"))


def _per_expert(official: str, ours: str) -> KeyRules:
    """One rule per expert; ``<e>`` stands for the expert (official ``A``/``B``, our ``image``/``query``)."""
    return tuple((official.replace("<e>", a), ours.replace("<e>", b)) for a, b in _EXPERTS)


BEIT3_KEY_RULES: KeyRules = (
    ("beit3.vision_embed.proj.{p}", "patch_embed.{p}"),
    ("beit3.vision_embed.cls_token", "cls_token"),
    ("beit3.encoder.embed_positions.A.weight", "image_positions"),
    ("beit3.encoder.embed_positions.B.weight", "query_positions"),
    *_per_expert("beit3.encoder.layers.{i}.self_attn_layer_norm.<e>.{p}", "layers.{i}.attn_norm.<e>.{p}"),
    *_per_expert("beit3.encoder.layers.{i}.self_attn.q_proj.<e>.{p}", "layers.{i}.attn.q_proj.<e>.{p}"),
    *_per_expert("beit3.encoder.layers.{i}.self_attn.k_proj.<e>.{p}", "layers.{i}.attn.k_proj.<e>.{p}"),
    *_per_expert("beit3.encoder.layers.{i}.self_attn.v_proj.<e>.{p}", "layers.{i}.attn.v_proj.<e>.{p}"),
    *_per_expert(
        "beit3.encoder.layers.{i}.self_attn.inner_attn_ln.<e>.{p}", "layers.{i}.attn.sub_norm.<e>.{p}"
    ),
    *_per_expert("beit3.encoder.layers.{i}.self_attn.out_proj.<e>.{p}", "layers.{i}.attn.out_proj.<e>.{p}"),
    *_per_expert("beit3.encoder.layers.{i}.final_layer_norm.<e>.{p}", "layers.{i}.ffn_norm.<e>.{p}"),
    *_per_expert("beit3.encoder.layers.{i}.ffn.<e>.fc1.{p}", "layers.{i}.ffn.<e>.fc1.{p}"),
    *_per_expert("beit3.encoder.layers.{i}.ffn.<e>.ffn_layernorm.{p}", "layers.{i}.ffn.<e>.sub_norm.{p}"),
    *_per_expert("beit3.encoder.layers.{i}.ffn.<e>.fc2.{p}", "layers.{i}.ffn.<e>.fc2.{p}"),
    *_per_expert("beit3.encoder.layer_norm.<e>.{p}", "norm.<e>.{p}"),
)
