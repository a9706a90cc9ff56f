"""int8 / int4 quantization of linear layers (and the tied vocabulary embedding).

Decoding at batch 1 is bound by reading the weights, so storing them in 8 or 4 bits and
multiplying without first widening them back to floats is what makes it faster.

* CPU: PyTorch's own packed kernels ``torch._weight_int8pack_mm`` (int8, one scale per output
  channel) and ``torch._weight_int4pack_mm_for_cpu`` (int4, asymmetric, one scale and zero per
  group of input channels), fed bf16 activations. We measured the maintained libraries first on
  this machine (torch 2.13, 1 thread, a 2816×1024 linear at batch 1): torchao 0.18's
  ``Int8WeightOnlyConfig`` streamed 1.2–1.4 GB/s and optimum-quanto 0.2.7's ``qint8`` 7.7 GB/s
  (as fast as plain bf16, i.e. no gain), while ``_weight_int8pack_mm`` streamed 14.5 GB/s of int8
  weights (2× bf16's tokens/s). Hence these thin modules around the PyTorch kernels.
  Where FBGEMM is built in (every x86 build of torch), int8 layers keep only FBGEMM's packed
  matrix and run its dynamic int8 GEMM (W8A8: VNNI dot products) for every row count, with a scale
  per row and outlier channels kept out of 8 bits (``w8a8_matmul``): weights streamed ~1.5× faster
  than the weight-only kernel and prefill 1.5–6× faster than a widened float GEMM (numbers in
  docs/performance.md). Layers that read the same input (q, k, v; gate, up) share one packed
  matrix and one call (``SharedInputInt8``). Elsewhere (ARM) int8 stays weight-only: the kernel
  for few rows, the weight widened block by block into a float GEMM for many.
* CUDA: bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` (NF4) when bitsandbytes is installed.

CPM-Bee's ``ScaledLinear`` divides by sqrt(fan-in); the division is folded into the scales, so a
quantized layer computes the same function with no extra step.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .models.cpmbee import Attention, CPMBee, FeedForward, ScaledLinear

QUANT_MODES = ("int8", "int4")
QUANT_HELP = ("quantize the language model's linear layers while loading: int8 (W8A8 on x86 CPUs, weight-only "
              "elsewhere) or int4 (weight-only); less memory, faster CPU inference (default: off)")
COMPUTE_DTYPE = torch.bfloat16  # the packed CPU kernels are fast with bf16 activations only
INT4_GROUP_SIZES = (128, 64, 32)  # largest group that divides the input width is used
# The int8 kernel is a matrix-vector kernel: its time grows with every row, and beyond ~16 rows
# (prefill, the vision encoder) dequantizing blocks of the weight for a bf16 GEMM is faster.
INT8_KERNEL_MAX_ROWS = 16
QUANT_BLOCK_ROWS = 256  # rows quantized at a time
# an activation beyond this many standard deviations of its row is quantized apart from the rest
# (LLM.int8()'s outliers are ~20x typical; a Gaussian channel passes 6 sigma with probability ~2e-9). Sigma comes from the mean |x| (x1.2533 for a Gaussian): a handful of outliers
# among thousands of channels barely moves it, and it costs one pass where a median costs a sort.
OUTLIER_SIGMAS = 6.0
# FBGEMM's activations use the full 8 bits where the CPU has VNNI (its int32 dot products cannot
# saturate); without VNNI, u8*s8 pairs summed into int16 can, so 7 bits, as torch.ao does
FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines  # every x86 build of torch; not ARM
_VNNI = bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())
# weights widened at a time for a GEMM (16 MB of bf16, inside the L3): few, large GEMMs, as every
# parallel region costs a thread hand-off, which on a busy machine outweighs smaller blocks' cache hits
INT8_WIDEN_BLOCK_ELEMENTS = 1 << 23


def _output_scale(linear: nn.Linear) -> float:
    """The factor the layer applies after W·x (ScaledLinear's 1/sqrt(fan-in), else 1)."""
    return 1.0 / linear.scale if isinstance(linear, ScaledLinear) else 1.0


def _float_rows(weight: torch.Tensor, factor: float = 1.0):
    """(start, fp32 block × factor) over blocks of rows: the fp32 temporaries of quantizing stay
    small (a 10B vocabulary matrix in fp32 alone would be 1.4 GB)."""
    for start in range(0, weight.size(0), QUANT_BLOCK_ROWS):
        yield start, weight[start : start + QUANT_BLOCK_ROWS].detach().float() * factor


class _QuantizedLinear(nn.Module):
    """Shared plumbing: flatten leading dims, run the matmul, add the bias, cast back."""

    # scales live in buffers that a later ``model.to(dtype)`` may cast; the kernels want bf16,
    # hence the ``.to(COMPUTE_DTYPE)`` in each matmul (a no-op when nothing was cast)

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:  # added in the activations' dtype, whatever the buffer was cast to
            out = out + self.bias.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8_rows(weight: torch.Tensor, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of ``weight × factor``: (int8 q, fp32 scale per row), ≈ q · scale."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.size(0), dtype=torch.float32)
    for start, block in _float_rows(weight, factor):
        block_scale = block.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q[start : start + len(block)] = block.div_(block_scale[:, None]).round_().clamp_(-127, 127)
        scale[start : start + len(block)] = block_scale
    return q, scale


class Int8Linear(_QuantizedLinear):
    """y = (q · s) x + b with int8 q and one scale per output channel: FBGEMM's packed matrix and
    W8A8 (``w8a8_matmul``) where FBGEMM is built in, else the int8 matrix, weight-only."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, linear.bias)
        weight, scale = quantize_int8_rows(linear.weight, _output_scale(linear))
        self.packed = _fbgemm_pack(weight, scale)  # not state: quantized models are never saved
        self.packed_bytes = 0 if self.packed is None else weight.numel()  # ~1 byte per weight, measured
        if self.packed is None:
            self.register_buffer("weight", weight)
            self.register_buffer("scales", scale.to(COMPUTE_DTYPE))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return int8_matmul(x, self.weight, self.scales)
        return w8a8_matmul(x.float(), self.packed)


class SharedInputInt8:
    """Sibling layers that always read the same input (CPM-Bee's q, k and v; the FFN's gate and up)
    packed as one int8 matrix and computed in one FBGEMM call: per-output-channel scales and the
    per-row activation scale make the result identical to separate calls, while a decode step makes
    4 calls per layer instead of 7 (at mid size three q/k/v calls took 0.23 ms, one shared 0.10 ms:
    the work around each call, not the GEMM, dominates there). The model file stays as written: each sibling
    is a :class:`SharedInputInt8Linear` that asks this group for its slice; the first sibling to
    see a new input computes all of them, the others take theirs."""

    def __init__(self, linears: list[nn.Linear]):
        quantized = [quantize_int8_rows(linear.weight, _output_scale(linear)) for linear in linears]
        weight = torch.cat([q for q, _ in quantized])
        self.packed = _fbgemm_pack(weight, torch.cat([scale for _, scale in quantized]))
        self.packed_bytes = weight.numel()
        self.in_features, self.widths = linears[0].in_features, [linear.out_features for linear in linears]
        self._input, self._version, self._outputs, self._waiting = None, -1, (), set()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling ``index``'s output (rows, width) in fp32 for input ``x``."""
        if x is not self._input or x._version != self._version or index not in self._waiting:
            rows = w8a8_matmul(x.reshape(-1, self.in_features).float(), self.packed)
            self._input, self._version, self._waiting = x, x._version, set(range(len(self.widths)))
            self._outputs = rows.split(self.widths, dim=-1)
        out = self._outputs[index]
        self._waiting.discard(index)
        if not self._waiting:  # every sibling has its slice: hold no activations between calls
            self._input, self._outputs = None, ()
        return out


class SharedInputInt8Linear(nn.Module):
    """One sibling of a :class:`SharedInputInt8` group, in place of its bias-free linear layer."""

    def __init__(self, group: SharedInputInt8, index: int):
        super().__init__()
        self.group, self.index = group, index
        self.in_features, self.out_features = group.in_features, group.widths[index]
        self.packed_bytes = group.packed_bytes if index == 0 else 0  # the group's matrix, counted once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous: elementwise kernels round differently on strided inputs (GELU's vector path
        # vs its scalar one), and the result must equal the separate layers' to the bit
        out = self.group.output(x, self.index).to(x.dtype).contiguous()
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, shared call {self.index}"


# the sibling layers of each CPM-Bee block that read the same input
SHARED_INPUT_LAYERS = {Attention: ("q", "k", "v"), FeedForward: ("gate", "up")}


def _fuse_siblings(module: nn.Module, mode: str, on_replaced: Callable[[nn.Module], None] | None) -> None:
    """int8 with FBGEMM: replace ``module``'s shared-input siblings by one :class:`SharedInputInt8`."""
    names = SHARED_INPUT_LAYERS.get(type(module), ())
    siblings = [getattr(module, name) for name in names]
    if mode != "int8" or not FBGEMM or not siblings or not all(
            type(s) is ScaledLinear and s.weight.device.type == "cpu" for s in siblings):
        return  # without FBGEMM (ARM) each layer goes weight-only; LoRA-wrapped layers keep their own path
    group = SharedInputInt8(siblings)
    for index, (name, sibling) in enumerate(zip(names, siblings)):
        setattr(module, name, SharedInputInt8Linear(group, index))
        if on_replaced is not None:
            on_replaced(sibling)


def w8a8_matmul(x: torch.Tensor, packed) -> torch.Tensor:
    """x (rows, in) fp32 @ Wᵀ for FBGEMM's packed per-channel int8 W, activations in 8 bits.

    FBGEMM quantizes its input with one range for the whole call; dividing each row by its largest
    magnitude first (and multiplying the output back: the product is linear) gives every row, i.e.
    every token, its own scale. Values beyond OUTLIER_SIGMAS of their row (LLM.int8()'s outlier
    channels, the heavy tail of the FFN's GELU·up product) would leave the rest of the row a few
    levels, so such a row is split in two, the outlying values and the rest, and both halves go
    through the same call as separate rows, each with its own scale: the rest keeps its fine steps
    and the outliers' 8 bits are relative to their own size. One more row in a call that
    streams the weight anyway costs little; no float copy of the weight is needed."""
    rows, width = x.shape
    magnitude = x.abs()  # (torch.linalg.vector_norm over rows measured 10-20x slower than these)
    largest = magnitude.amax(dim=1, keepdim=True)
    total = magnitude.sum(dim=1, keepdim=True)  # sigma ≈ 1.2533 · total / width
    if (largest / total).max().item() * width <= OUTLIER_SIGMAS * 1.2533:  # one check (and sync) per call
        if rows == 1:  # FBGEMM's range for the call is the row's own
            return torch.ops.quantized.linear_dynamic(x, packed, not _VNNI)
        scale = largest.clamp_(min=1e-30)  # an all-zero row (padding) stays zero
        return torch.ops.quantized.linear_dynamic(x / scale, packed, not _VNNI).mul_(scale)
    outlying = magnitude > total * (OUTLIER_SIGMAS * 1.2533 / width)
    # the rows, then their outliers, written into one buffer (fresh multi-MB temporaries cost page
    # faults on every call); a row's outliers include its largest value, which is their scale
    stacked = x.new_empty(2 * rows, width)
    torch.mul(x, ~outlying, out=stacked[:rows])
    torch.mul(x, outlying, out=stacked[rows:])
    scale = torch.cat([magnitude.masked_fill_(outlying, 0.0).amax(dim=1, keepdim=True), largest]).clamp_(min=1e-30)
    out = torch.ops.quantized.linear_dynamic(stacked.div_(scale), packed, not _VNNI).mul_(scale)
    return out[:rows] + out[rows:]


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (rows, in) @ (weight · scales)ᵀ for int8 weight (out, in) with a scale per output.

    Few rows: the int8 kernel in bf16 (its fp32 path is not vectorized: 100× slower). Many rows:
    a GEMM in the activations' dtype, so an fp32 model's prefill keeps fp32 logits (bf16 ones
    flip near-tied argmaxes) and a bf16 model's runs at bf16 GEMM speed."""
    if x.size(0) <= INT8_KERNEL_MAX_ROWS:
        return torch._weight_int8pack_mm(x.to(COMPUTE_DTYPE), weight, scales.to(COMPUTE_DTYPE))
    dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else COMPUTE_DTYPE
    return _widened_matmul(x.to(dtype), weight, scales.to(dtype))


def _widened_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Many rows (prefill): a GEMM (MKL / oneDNN) over the int8 weight widened to ``x``'s dtype one
    block of output channels at a time, the scales applied to the (smaller) output. Widening the
    whole matrix per call ran at ~1 GB/s, mostly page faults of the fresh float copy; a reused
    block that stays in cache costs one pass over the int8 bytes."""
    block_rows = max(16, INT8_WIDEN_BLOCK_ELEMENTS // weight.size(1))
    widened = torch.empty(min(block_rows, weight.size(0)), weight.size(1), dtype=x.dtype)
    blocks = []
    for start in range(0, weight.size(0), block_rows):
        rows = weight[start : start + block_rows]
        blocks.append(F.linear(x, widened[: len(rows)].copy_(rows)))  # int8 -> bf16 / fp32 is exact
    return torch.cat(blocks, dim=1).mul_(scales)


class Int4Linear(_QuantizedLinear):
    """Asymmetric int4 in groups along the input: w ≈ (q - 8) · s + z per group (the kernel's
    convention), weights packed by PyTorch for its CPU kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, linear.bias)
        group = next((g for g in INT4_GROUP_SIZES if linear.in_features % g == 0), None)
        if group is None:
            raise ValueError(f"int4 needs an input width divisible by 32; this layer has {linear.in_features}")
        rows, groups = linear.out_features, linear.in_features // group
        q = torch.empty(rows, groups, group, dtype=torch.uint8)
        low, scale = torch.empty(rows, groups), torch.empty(rows, groups)
        for start, block in _float_rows(linear.weight, _output_scale(linear)):
            block = block.view(len(block), groups, group)
            block_low, block_high = block.amin(dim=-1), block.amax(dim=-1)
            block_scale = ((block_high - block_low) / 15).clamp(min=1e-12)
            end = start + len(block)
            q[start:end] = block.sub_(block_low[..., None]).div_(block_scale[..., None]).round_().clamp_(0, 15)
            low[start:end], scale[start:end] = block_low, block_scale
        self.group_size = group
        self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(q.view(rows, -1).to(torch.int32), 1))
        # (groups, out, 2): scale and the value that code 8 stands for
        zeros = low + 8 * scale
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zeros.t()], dim=-1).to(COMPUTE_DTYPE).contiguous())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x.to(COMPUTE_DTYPE), self.weight, self.group_size, self.scales_and_zeros.to(COMPUTE_DTYPE))


class Int8Embedding(nn.Module):
    """The tied vocabulary matrix in int8 (one scale per token): looked up for the input and used
    as the output projection (``project=True``), which at mid sizes is half of the bytes read per token.

    The projection runs FBGEMM's dynamic int8 GEMM (``w8a8_matmul``) on a second, packed int8 copy
    of the matrix (+1 byte per weight: 355 MB at 10B, 3.5 % of the model; the lookup needs the
    plain one): PyTorch's weight-only kernel streamed this 1024-wide matrix at ~1.5 GB/s on a Zen 4
    against FBGEMM's ~20 (bench/linear_kernels.py)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        weight, scale = quantize_int8_rows(embedding.weight)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scale.to(embedding.weight.dtype))
        self.packed = _fbgemm_pack(weight, scale)  # not state: rebuilt from the buffers
        self.packed_bytes = 0 if self.packed is None else weight.numel()  # ~1 byte per weight, measured

    def forward(self, x: torch.Tensor, project: bool = False) -> torch.Tensor:
        if project:  # hidden states -> vocabulary logits
            rows = x.reshape(-1, self.embedding_dim)
            if self.packed is not None:
                out = w8a8_matmul(rows.float(), self.packed)
            else:
                out = int8_matmul(rows, self.weight, self.scales)
            return out.view(*x.shape[:-1], self.num_embeddings).to(x.dtype)
        # looked-up rows come out in the scales' dtype: the model's, once the model is cast
        return F.embedding(x, self.weight).to(self.scales.dtype) * F.embedding(x, self.scales[:, None])


def _fbgemm_pack(weight: torch.Tensor, scale: torch.Tensor):
    """FBGEMM's packed copy of a per-row int8 matrix, or None where FBGEMM is not built in."""
    if not FBGEMM:
        return None
    with warnings.catch_warnings():
        # PyTorch marks its quantized tensor type deprecated (in favour of torchao, whose CPU
        # int8 kernels we measured slower); the packed weight is the only use of it here
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        quantized = torch._make_per_channel_quantized_tensor(
            weight, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(quantized, None)


def _bitsandbytes_linear(linear: nn.Linear, mode: str) -> nn.Module:
    """bitsandbytes' 8-bit (LLM.int8) or NF4 layer holding this layer's weights (CUDA only)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise RuntimeError(f"--quant {mode} on CUDA needs bitsandbytes: pip install bitsandbytes") from None
    device = linear.weight.device
    weight = (linear.weight.detach().float() * _output_scale(linear)).to(torch.float16)
    bias = linear.bias is not None
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                  compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(torch.float16), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes when the parameters move to the GPU


def quantize_linear(linear: nn.Linear, mode: str) -> nn.Module:
    """The quantized replacement of one linear layer."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if linear.weight.device.type == "cuda":
        return _bitsandbytes_linear(linear, mode)
    if linear.weight.device.type != "cpu":
        raise ValueError(f"weight-only {mode} runs on CPU (PyTorch kernels) or CUDA (bitsandbytes), "
                         f"not on {linear.weight.device.type}")
    return Int8Linear(linear) if mode == "int8" else Int4Linear(linear)


def quantize_module(module: nn.Module, mode: str, *,
                    on_replaced: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` under ``module`` (in place, one layer at a time, so no second
    full copy of the weights ever exists; int8 siblings that read one input as one group) and every
    CPM-Bee tied embedding by int8 (CPU only: the output projection needs the int8 kernel).
    ``on_replaced(old)`` is called after each replacement (the loader releases the old weights'
    file pages there).
    Returns ``module``."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    _fuse_siblings(module, mode, on_replaced)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            replacement = quantize_linear(child, mode)
        elif isinstance(module, CPMBee) and child is module.embed and child.weight.device.type == "cpu":
            replacement = Int8Embedding(child)
        else:
            quantize_module(child, mode, on_replaced=on_replaced)
            continue
        setattr(module, name, replacement)
        if on_replaced is not None:
            on_replaced(child)
    return module


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer, and of FBGEMM's packed copies (the model's resident size)."""
    tensors = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    return tensors + sum(getattr(m, "packed_bytes", 0) for m in module.modules())


def refuse_quantized(quant: str | None) -> None:
    """Saved folders hold float weights: quantization is applied when loading (``quant=``)."""
    if quant is not None:
        raise ValueError(f"this model was loaded with quant={quant!r}; save float weights instead (load it without "
                         "quant) and quantize when loading the saved folder")
