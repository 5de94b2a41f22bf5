"""A quantized frozen base (QLoRA): 4-bit NF4/FP4 and 8-bit LLM.int8() weights via bitsandbytes.

QLoRA (Dettmers et al. 2023, section 3) stores the frozen base in 4 bits and trains LoRA
adapters in higher precision on top; each base matmul dequantizes the weight to the
compute dtype on the fly (again in backward, rather than keeping it). Here:
  nf4, fp4        blockwise 4-bit, one absmax per 64 weights (NormalFloat or FP4 code points)
  nf4-dq, fp4-dq  the same with double quantization: the absmaxes quantized to 8 bits in
                  blocks of 256 (QLoRA, section 3, "Double Quantization")
  int8            LLM.int8() (Dettmers et al. 2022): one scale per weight row, activations
                  quantized per row, outlier columns (> 6.0) kept in 16 bits
Embeddings, norms and the output head stay unquantized, as in QLoRA. model.load_model
quantizes each Linear's weight as soon as it is read from the checkpoint, so the
full-precision model never exists in memory at once.

This is the only file that imports bitsandbytes, and only once something is quantized.
"""
import functools
import logging

import torch
import torch.nn as nn

QUANT_TYPES = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")
BLOCKSIZE = 64                  # weights per 4-bit block (QLoRA's and bitsandbytes' default)
INT8_THRESHOLD = 6.0            # LLM.int8() outlier threshold (the paper's and transformers' default)


@functools.cache
def _bnb():
    # On CPUs with AVX512-BF16 bitsandbytes logs at import that the optional `kernels` package is
    # missing, then uses its own 4-bit CPU kernel: harmless. Set before the import, which logs it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage())
    import bitsandbytes
    # LLM.int8() quantizes activations through fp16 by design; bitsandbytes warns on every matmul.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda record: "will be cast from" not in record.getMessage())
    return bitsandbytes


@functools.cache
def _libc():
    import ctypes
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc


def _release_freed_memory():
    """Hand freed heap memory back to the OS (glibc's malloc_trim). Quantizing a layer frees
    large temporaries but keeps small packed tensors allocated between them, so without this
    the process would hold on to every layer's temporaries: RSS grew by ~4 bytes per weight."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def check_quant(quant: str | None) -> str | None:
    if quant is not None and quant not in QUANT_TYPES:
        raise ValueError(f"quant={quant!r}: expected null or one of {', '.join(QUANT_TYPES)}")
    return quant


class QuantLinear(nn.Module):
    """A frozen Linear whose weight is stored quantized; y = x dequant(W)^T + b.

    Has nn.Linear's in_features / out_features / bias, so lora.add_adapters wraps it the same way.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: str,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.quant = in_features, out_features, check_quant(quant)
        # Packed 4-bit pairs [out*in/2, 1] (uint8) or int8 rows [out, in], filled by quantize_.
        self.register_buffer("weight", torch.empty(0, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None
        self.quant_state = None   # 4-bit: bitsandbytes' QuantState (block absmaxes, code, shape, dtype)
        self.int8_state = None    # int8: bitsandbytes' MatmulLtState (int8 rows, row scales, threshold)
        self.dtype = dtype        # compute dtype: that of the weight given to quantize_

    @classmethod
    def like(cls, linear: nn.Linear, quant: str) -> "QuantLinear":
        """An empty QuantLinear of the same shape (on the meta device while loading)."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, quant,
                   device=linear.weight.device, dtype=linear.weight.dtype)

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor):
        """Quantize a full-precision weight [out, in] into this layer (its dtype is the compute dtype)."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"QuantLinear: weight {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
        F = _bnb().functional
        if self.quant == "int8":
            # LLM.int8(), section 3.1: vector-wise quantization, each row scaled by absmax / 127.
            rows, scales, _ = F.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
            state = _bnb().MatmulLtState()
            state.CB, state.SCB, state.has_fp16_weights, state.threshold = rows, scales, False, INT8_THRESHOLD
            self.weight, self.int8_state, self.dtype = rows, state, weight.dtype
        else:
            packed, self.quant_state = F.quantize_4bit(
                weight.contiguous(), blocksize=BLOCKSIZE, quant_type=self.quant.removesuffix("-dq"),
                compress_statistics=self.quant.endswith("-dq"))
            self.weight, self.dtype = packed, weight.dtype
        if weight.device.type == "cpu":
            _release_freed_memory()
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] as the matmuls see it, in dtype (default: the compute dtype)."""
        dtype = dtype or self.dtype
        if self.quant == "int8":
            # Row i times its scale / 127, in the order bitsandbytes' own dequantizing matmul uses.
            scales = self.int8_state.SCB[:, None] * (1.0 / 127.0)
            return (self.weight.to(dtype) * scales).to(dtype)
        return _bnb().functional.dequantize_4bit(self.weight, self.quant_state).to(dtype)

    def to_linear(self) -> nn.Linear:
        """A plain frozen nn.Linear holding the dequantized weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        linear.bias = self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        if self.quant == "int8":
            # bitsandbytes picks: int8 x int8 with the outlier columns in fp16 (eval, and
            # training on CUDA), or dequantize + matmul (training on CPU).
            self.int8_state.is_training = self.training
            return bnb.matmul(x, self.weight, bias=self.bias, state=self.int8_state)
        # One dequantize of W (in x's dtype) for all rows of the fused batch, one more in
        # backward (on CUDA a fused kernel may skip materializing it).
        return bnb.matmul_4bit(x, self.weight, self.quant_state, bias=self.bias)

    def nbytes(self) -> int:
        """Bytes of the quantized weight with its statistics (absmaxes, nested absmaxes, row scales)."""
        tensors = [self.weight]
        if self.int8_state is not None:
            tensors.append(self.int8_state.SCB)
        if self.quant_state is not None:
            tensors.append(self.quant_state.absmax)
            if self.quant_state.nested:
                tensors.append(self.quant_state.state2.absmax)
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, quant={self.quant}"


def quantize_linears(model: nn.Module, quant: str, skip: str) -> dict[str, QuantLinear]:
    """Swap every Linear but `skip` (the output head) for an empty QuantLinear (before loading).

    Returns {checkpoint key of its weight: layer}; the loader calls layer.quantize_ on each.
    """
    check_quant(quant)
    _bnb()  # imported now, not inside the loader's peak-memory window
    layers = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path != skip:
            parent_path, _, child = path.rpartition(".")
            layer = QuantLinear.like(module, quant)
            setattr(model.get_submodule(parent_path), child, layer)
            layers[f"{path}.weight"] = layer
    return layers


def dequantize(model: nn.Module) -> int:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight; returns how many.

    A model with LoRA layers goes through lora.dequantize, which does their bases first.
    """
    count = 0
    for path, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, module.to_linear())
            count += 1
    return count


def model_bytes(model: nn.Module) -> int:
    """Memory of all weights: parameters, buffers and quantization statistics."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.nbytes()
        else:
            total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return total
