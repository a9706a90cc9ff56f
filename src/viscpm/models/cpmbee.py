"""CPM-Bee: the bilingual LLM behind VisCPM, written out top to bottom.

No library implements CPM-Bee, so it lives here. It is a pre-norm decoder with a few particulars
that the official weights depend on (see ``shared/reference/SPEC.md`` §1):

* every projection divides by sqrt(fan-in) — *after* the matmul, except the FFN output projection
  which scales its input *before*;
* residuals are ``(h + f(h)) / 1.05``;
* token embeddings carry a rotary rotation by their *sub id* (how the structured prompt tells apart
  several unknown/ext tokens that share one vocab id), over the full model width;
* attention has no rotary; instead a learned bias per head, looked up from a bucketed relative
  position (inside a segment) or from a segment-relation bucket (across segments of the prompt);
* logits are tied to the embedding and extended by an "ext table" of (id, sub) rows.

Key names are ours; ``CPMBEE_KEY_RULES`` maps the official ones (loading and saving both use it).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .keymap import KeyRules

RESIDUAL_SCALE = 1.05
SUB_ID_DISTANCE_SCALE = 16  # official: each sub id is worth 16 rotary "positions"


@dataclass(frozen=True)
class CPMBeeConfig:
    vocab_size: int = 86583
    dim_model: int = 4096
    dim_ff: int = 10240
    num_layers: int = 48
    num_heads: int = 32
    dim_head: int = 128
    position_bias_num_buckets: int = 256
    position_bias_num_segment_buckets: int = 256
    position_bias_max_distance: int = 2048
    eps: float = 1e-6

    @classmethod
    def from_dict(cls, data: dict) -> "CPMBeeConfig":
        """Read our saved config or the official ``cpm-bee-*.json`` (its ``half``/``dropout_p``/
        ``mask_modules`` are run-time choices, not architecture, and are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


CPMBEE_PRESETS: dict[str, CPMBeeConfig] = {
    "cpm-bee-10b": CPMBeeConfig(),
}

CPMBEE_KEY_RULES: KeyRules = (
    ("input_embedding.weight", "embed.weight"),
    ("position_bias.relative_attention_bias", "position_bias.weight"),
    ("encoder.output_layernorm.weight", "final_norm.weight"),
    ("encoder.layers.{i}.self_att.layernorm_before_attention.weight", "layers.{i}.attn_norm.weight"),
    ("encoder.layers.{i}.self_att.self_attention.project_q.weight", "layers.{i}.attn.q.weight"),
    ("encoder.layers.{i}.self_att.self_attention.project_k.weight", "layers.{i}.attn.k.weight"),
    ("encoder.layers.{i}.self_att.self_attention.project_v.weight", "layers.{i}.attn.v.weight"),
    ("encoder.layers.{i}.self_att.self_attention.attention_out.weight", "layers.{i}.attn.out.weight"),
    ("encoder.layers.{i}.ffn.layernorm_before_ffn.weight", "layers.{i}.ffn_norm.weight"),
    ("encoder.layers.{i}.ffn.ffn.w_in.w_0.weight", "layers.{i}.ffn.gate.weight"),
    ("encoder.layers.{i}.ffn.ffn.w_in.w_1.weight", "layers.{i}.ffn.up.weight"),
    ("encoder.layers.{i}.ffn.ffn.w_out.weight", "layers.{i}.ffn.down.weight"),
)


# ---------------------------------------------------------------------------------------------
# Leaf modules


class RMSNorm(nn.Module):
    """RMS norm whose statistics are always fp32, then cast back before the weight (bit-exact)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class TiedEmbedding(nn.Embedding):
    """The vocabulary matrix, for the input lookup and (``project=True``) the output logits. Both
    go through ``forward`` so that hooks (accelerate's offloading) see every use."""

    def forward(self, x: torch.Tensor, project: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight) if project else super().forward(x)


class ScaledLinear(nn.Linear):
    """Bias-free linear layer divided by sqrt(fan-in); ``scale_input`` moves the division before
    the matmul (the official FFN output does this, and rounding depends on it). A ``nn.Linear``
    subclass so that adapters (peft LoRA) and quantizers recognise it."""

    def __init__(self, dim_in: int, dim_out: int, scale_input: bool = False):
        super().__init__(dim_in, dim_out, bias=False)
        self.scale = math.sqrt(dim_in)
        self.scale_input = scale_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_input:
            return F.linear(x / self.scale, self.weight)
        return F.linear(x, self.weight) / self.scale


def rotate_by_sub_ids(x: torch.Tensor, sub_ids: torch.Tensor) -> torch.Tensor:
    """Rotary ("rotate half") over the full width of ``x`` [..., d], angle from ``sub_ids`` [...].

    Sub id 0 gives the identity, so ordinary tokens are untouched.
    """
    dim = x.size(-1)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))).to(x.dtype)
    angle = (sub_ids * SUB_ID_DISTANCE_SCALE).to(x.dtype)[..., None] * inv_freq  # (..., d/2)
    angle = torch.cat([angle, angle], dim=-1)  # (..., d)
    rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], dim=-1)
    return x * angle.cos() + rotated * angle.sin()


class SegmentPositionBias(nn.Module):
    """Per-head attention bias: bucketed relative position inside a segment, else a learned
    bucket per segment relation (the structured prompt's tree distance)."""

    def __init__(self, config: CPMBeeConfig):
        super().__init__()
        self.num_buckets = config.position_bias_num_buckets
        self.max_distance = config.position_bias_max_distance
        self.weight = nn.Parameter(
            torch.empty(config.position_bias_num_buckets + config.position_bias_num_segment_buckets, config.num_heads)
        )

    def relative_position_bucket(self, relative_position: torch.Tensor) -> torch.Tensor:
        """Bidirectional buckets: half for keys at/before the query, half for later keys;
        exact up to a quarter of the buckets, logarithmic beyond, saturating at max_distance."""
        half = self.num_buckets // 2
        exact = half // 2
        bucket = (relative_position > 0).to(torch.int32) * half
        distance = relative_position.abs()
        log_bucket = exact + (
            torch.log(distance.float() / exact) / math.log(self.max_distance / exact) * (half - exact)
        ).to(torch.int32)
        log_bucket = torch.clamp(log_bucket, max=half - 1)
        return bucket + torch.where(distance < exact, distance.to(torch.int32), log_bucket)

    def forward(self, query_pos: torch.Tensor, key_pos: torch.Tensor, segment_bucket: torch.Tensor) -> torch.Tensor:
        # query_pos (B, Lq), key_pos (B, Lk), segment_bucket (B, Lq, Lk) -> bias (B, H, Lq, Lk)
        inside = self.relative_position_bucket(key_pos[:, None, :] - query_pos[:, :, None])
        across = segment_bucket + (self.num_buckets - 1)
        row = torch.where(segment_bucket == 0, inside, across)
        return F.embedding(row, self.weight).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# Attention context: which keys each query sees, and with what bias


class SegmentState(NamedTuple):
    """Per-token prompt structure that attention needs, for queries and (cached) keys alike."""

    position: torch.Tensor  # (B, L) position inside the segment's numbering
    context: torch.Tensor  # (B, L) bool: True = given, False = to be predicted
    sample_ids: torch.Tensor  # (B, L) 0 = shared; k>0 = in-context sample k
    num_segments: torch.Tensor  # (B, L) 0 marks padding
    segment_ids: torch.Tensor  # (B, L)

    def index_select(self, index: torch.Tensor) -> "SegmentState":
        return SegmentState(*(t.index_select(0, index) for t in self))


def attention_mask_and_bias(
    position_bias: SegmentPositionBias,
    query: SegmentState,
    key: SegmentState,
    segment_rel_offset: torch.Tensor,
    segment_rel: torch.Tensor,
    span: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean mask (B, Lq, Lk) and additive bias (B, H, Lq, Lk) of the official model.

    ``span`` (training-time packing) only applies when queries and keys are the same tokens.
    """
    same = query.sample_ids[:, :, None] == key.sample_ids[:, None, :]
    if span is not None:
        same = same & (span[:, :, None] == span[:, None, :])
    # segment_rel is a flattened (num_segments x num_segments) table per row
    flat = query.segment_ids[:, :, None] * query.num_segments[:, :, None] + key.segment_ids[:, None, :]
    flat = (flat + segment_rel_offset[:, :, None]).masked_fill(~same, 0)
    batch, len_q, len_k = flat.shape
    segment_bucket = torch.gather(segment_rel, 1, flat.view(batch, len_q * len_k)).view(batch, len_q, len_k)
    segment_bucket = segment_bucket.masked_fill(~same, 1)  # bucket 1: different sample/span

    # given tokens see every given token; predicted tokens also see earlier predicted ones
    earlier = key.position[:, None, :] <= query.position[:, :, None]
    mask = key.context[:, None, :] | (~query.context[:, :, None] & earlier)
    mask = mask & ((query.sample_ids[:, :, None] == 0) | same)
    if span is not None:
        mask = mask & (span[:, :, None] == span[:, None, :])
    valid_key = key.num_segments != 0
    valid_query = query.num_segments != 0
    mask = mask & valid_key[:, None, :] & valid_query[:, :, None]

    bias = position_bias(query.position, key.position, segment_bucket)
    return mask, bias


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys/values of every layer plus the segment state of every cached token.

    Grows by doubling when full, so decoding never copies the whole cache per token; beam search
    reorders rows with ``reorder``.
    """

    def __init__(self, config: CPMBeeConfig, batch_size: int, capacity: int, dtype: torch.dtype, device):
        shape = (config.num_layers, batch_size, config.num_heads, capacity, config.dim_head)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        state_shape = (batch_size, capacity)
        self.state = SegmentState(
            position=torch.zeros(state_shape, dtype=torch.long, device=device),
            context=torch.zeros(state_shape, dtype=torch.bool, device=device),
            sample_ids=torch.zeros(state_shape, dtype=torch.long, device=device),
            num_segments=torch.zeros(state_shape, dtype=torch.long, device=device),
            segment_ids=torch.zeros(state_shape, dtype=torch.long, device=device),
        )
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.size(3)

    @property
    def batch_size(self) -> int:
        return self.keys.size(1)

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        pad = capacity - self.capacity
        self.keys = F.pad(self.keys, (0, 0, 0, pad))
        self.values = F.pad(self.values, (0, 0, 0, pad))
        self.state = SegmentState(*(F.pad(t, (0, pad)) for t in self.state))

    def append_state(self, new: SegmentState) -> SegmentState:
        """Store the new tokens' segment state; return the state of all cached tokens."""
        start, end = self.length, self.length + new.position.size(1)
        if end > self.capacity:
            self._grow(end)
        for buffer, values in zip(self.state, new):
            buffer[:, start:end] = values
        return SegmentState(*(t[:, :end] for t in self.state))

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # key, value (B, H, Lq, dh) -> all cached (B, H, Lp+Lq, dh)
        start, end = self.length, self.length + key.size(2)
        self.keys[layer, :, :, start:end] = key
        self.values[layer, :, :, start:end] = value
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search): row i becomes old row index[i]."""
        self.keys = self.keys.index_select(1, index)
        self.values = self.values.index_select(1, index)
        self.state = self.state.index_select(index)


# ---------------------------------------------------------------------------------------------
# Transformer blocks


class Attention(nn.Module):
    def __init__(self, config: CPMBeeConfig):
        super().__init__()
        self.num_heads, self.dim_head = config.num_heads, config.dim_head
        inner = config.num_heads * config.dim_head
        self.q = ScaledLinear(config.dim_model, inner)
        self.k = ScaledLinear(config.dim_model, inner)
        self.v = ScaledLinear(config.dim_model, inner)
        self.out = ScaledLinear(inner, config.dim_model)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor,
        valid_rows: torch.Tensor,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        split = lambda t: t.view(batch, length, self.num_heads, self.dim_head).transpose(1, 2)  # (B, H, L, dh)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # (B, H, Lq, dh)
        # the official model zeroes the attention of fully masked (padding) rows
        out = out * valid_rows
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.dim_head)
        return self.out(out)


class FeedForward(nn.Module):
    """Gated GELU: GELU(gate(x)) * up(x), projected down."""

    def __init__(self, config: CPMBeeConfig):
        super().__init__()
        self.gate = ScaledLinear(config.dim_model, config.dim_ff)
        self.up = ScaledLinear(config.dim_model, config.dim_ff)
        self.down = ScaledLinear(config.dim_ff, config.dim_model, scale_input=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: CPMBeeConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim_model, config.eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.dim_model, config.eps)
        self.ffn = FeedForward(config)

    def forward(self, h, attn_bias, valid_rows, cache, layer):
        h = (h + self.attn(self.attn_norm(h), attn_bias, valid_rows, cache, layer)) / RESIDUAL_SCALE
        h = (h + self.ffn(self.ffn_norm(h))) / RESIDUAL_SCALE
        return h


# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class CPMBeeInputs:
    """A batch of CPM-Bee inputs, as ``viscpm.prompt`` builds them from structured prompts. Integer
    arrays are int64 (``context`` bool); padding is marked by ``num_segments == 0``.

    ``segment_rel`` rows are per-sample flattened bucket matrices (zero-padded), R ≥ the number of
    segments squared; ``segment_rel_offset`` points a token at its sample's block.
    ``ext_table_ids``/``_sub`` list the ``(id, sub)`` pairs that get extra output columns
    ``vocab_size + k``. The last fields are for the parts around the LLM and training, not read by
    ``CPMBee``: ``image_bound`` gives ``[begin, end)`` of each image's placeholder run (a prompt
    with fewer images than others in the batch has empty ``[0, 0)`` rows), ``target`` the labels.
    """

    input_ids: torch.Tensor  # (B, L)
    input_id_subs: torch.Tensor  # (B, L) sub id: tells apart ext tokens sharing one vocab id
    position: torch.Tensor  # (B, L) position inside the segment's numbering
    context: torch.Tensor  # (B, L) bool: True = given, False = to be predicted
    sample_ids: torch.Tensor  # (B, L) 0 = shared; k>0 = in-context sample k
    num_segments: torch.Tensor  # (B, L), 0 on padding
    segment_ids: torch.Tensor  # (B, L)
    segment_rel_offset: torch.Tensor  # (B, L)
    segment_rel: torch.Tensor  # (B, R)
    ext_table_ids: torch.Tensor  # (E,)
    ext_table_sub: torch.Tensor  # (E,)
    span: torch.Tensor | None = None  # (B, L) training-time packing; None = one span per row
    length: torch.Tensor | None = None  # (B,) tokens of each prompt, padding excluded
    image_bound: torch.Tensor | None = None  # (B, n_img, 2)
    target: torch.Tensor | None = None  # (B, L) next-token labels, prompt.IGNORE_INDEX where none

    def to(self, device: torch.device | str) -> CPMBeeInputs:
        """A copy with every tensor on ``device``."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: t.to(device) for name, t in tensors.items() if t is not None})


class CPMBeeOutput(NamedTuple):
    logits: torch.Tensor  # (B, L, V + E)
    hidden_states: torch.Tensor  # (B, L, d), after the final norm


class CPMBee(nn.Module):
    def __init__(self, config: CPMBeeConfig):
        super().__init__()
        self.config = config
        self.embed = TiedEmbedding(config.vocab_size, config.dim_model)
        self.position_bias = SegmentPositionBias(config)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.dim_model, config.eps)
        self.gradient_checkpointing = False  # recompute layer activations in backward (big models)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init for training from scratch. Every projection divides by sqrt(fan-in), so
        unit-variance weights give unit-variance outputs; the embedding is divided by sqrt(d) too."""
        for module in self.modules():
            if isinstance(module, ScaledLinear):
                nn.init.normal_(module.weight, std=1.0)
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.position_bias.weight, std=0.02)

    def embed_tokens(self, input_ids: torch.Tensor, input_id_subs: torch.Tensor) -> torch.Tensor:
        """Token embedding / sqrt(d), rotated by the sub id."""
        embeds = self.embed(input_ids) / math.sqrt(self.config.dim_model)
        return rotate_by_sub_ids(embeds, input_id_subs)

    def logits(self, hidden_states: torch.Tensor, ext_table_ids: torch.Tensor, ext_table_sub: torch.Tensor) -> torch.Tensor:
        """Tied vocab logits, then one column per ext-table row (its rows already carry 1/sqrt(d))."""
        vocab = self.embed(hidden_states / math.sqrt(self.config.dim_model), project=True)
        if ext_table_ids.numel() == 0:
            return vocab
        ext = F.linear(hidden_states, self.embed_tokens(ext_table_ids, ext_table_sub))
        return torch.cat([vocab, ext], dim=-1)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (norms are never quantized, unlike the embedding)."""
        return self.final_norm.weight.dtype

    def new_cache(self, batch_size: int, capacity: int, device: torch.device | None = None) -> KVCache:
        """``device``: where attention runs (needed when accelerate keeps some weights on disk)."""
        return KVCache(self.config, batch_size, capacity, self.dtype, device or self.final_norm.weight.device)

    def forward(
        self,
        inputs: CPMBeeInputs,
        *,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        compute_logits: bool = True,
    ) -> CPMBeeOutput:
        """Full forward (no cache: training, Paint's text encoder, prefill) or incremental decoding
        (with ``cache``: the new tokens attend to everything cached before them).

        ``inputs`` holds the new tokens; ``inputs_embeds`` (B, L, d) replaces their token embeddings
        (Chat writes the image states into them). ``inputs.span`` applies without a cache only.
        """
        query = SegmentState(inputs.position, inputs.context.bool(), inputs.sample_ids, inputs.num_segments,
                             inputs.segment_ids)
        key = cache.append_state(query) if cache is not None else query
        mask, bias = attention_mask_and_bias(self.position_bias, query, key, inputs.segment_rel_offset,
                                             inputs.segment_rel.long(), inputs.span if cache is None else None)
        # rows with no visible key (padding) would give NaN in softmax; open them and zero the output
        valid_rows = mask.any(dim=-1)  # (B, Lq)
        mask = mask | ~valid_rows[:, :, None]
        attn_bias = bias.masked_fill(~mask[:, None], float("-inf"))
        valid_rows = valid_rows[:, None, :, None].to(bias.dtype)  # (B, 1, Lq, 1)

        h = self.embed_tokens(inputs.input_ids, inputs.input_id_subs) if inputs_embeds is None else inputs_embeds
        for index, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                h = torch.utils.checkpoint.checkpoint(layer, h, attn_bias, valid_rows, None, index, use_reentrant=False)
            else:
                h = layer(h, attn_bias, valid_rows, cache, index)
        if cache is not None:
            cache.advance(inputs.input_ids.size(1))
        h = self.final_norm(h)
        logits = self.logits(h, inputs.ext_table_ids, inputs.ext_table_sub) if compute_logits else None
        return CPMBeeOutput(logits, h)
