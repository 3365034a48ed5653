"""Per-GPU memory estimate of a LoRA/QLoRA training step, part by part.

An estimate for planning (which strategy, micro batch, checkpointing), not a guarantee. Every
part states its assumption; the activation formula was checked tensor by tensor against what
autograd saves for a Llama block with PEFT LoRA (tests/test_plan.py). Assumed throughout:

- Training runs on GPUs with bf16/fp16 mixed precision (autocast) or in fp32; base weights in
  `weight_dtype`. For bitsandbytes (nf4/fp4/int8) the trainer calls PEFT's
  `prepare_model_for_kbit_training`, which casts every non-quantized base parameter
  (embeddings, output head, norms) to fp32.
- Adapter parameters are fp32 (PEFT's `autocast_adapter_dtype`), their gradients too; under
  DeepSpeed, which casts the module to bf16/fp16, they are 16-bit with an fp32 master copy.
- Sharding: `fsdp`, `fsdp-qlora` and `deepspeed-zero3` divide weights, gradients and
  optimizer state by the world size; `deepspeed-zero2` divides gradients and optimizer state;
  `ddp` and `single` divide nothing. Activations are never sharded (data parallel only).
- Offload: `offload_params` (ZeRO-3/FSDP) keeps weights in CPU memory, gathering one layer
  at a time; `offload_optimizer` (ZeRO-2/3, FSDP) keeps optimizer state (and the fp32
  master copy) in CPU memory.

torch-free: it works from parameter counts and the model's config.json.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunefleet.launch.errors import RecipeError

GIB = 1024**3

CONTEXT_BYTES = 1 * GIB
"""Allowance for the CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation."""

SHARDED_WEIGHTS = ("fsdp", "fsdp-qlora", "deepspeed-zero3")
SHARDED_STATES = ("fsdp", "fsdp-qlora", "deepspeed-zero2", "deepspeed-zero3")
DEEPSPEED = ("deepspeed-zero2", "deepspeed-zero3")

OPTIMIZER_STATE_BYTES = {
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "paged_adamw_32bit": 8,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "sgd": 0,
}
"""Bytes of optimizer state per trainable parameter: AdamW keeps two fp32 moments; the 8-bit
AdamW of bitsandbytes two 8-bit ones (tensors under 4,096 elements keep 32-bit state: LoRA
matrices are larger); transformers' `sgd` is plain SGD without momentum."""


def quantized_bits(quantization: str, *, double_quant: bool = True) -> float:
    """Stored bits per quantized parameter, constants included.

    nf4/fp4: 4 bits plus one fp32 absmax per block of 64 (0.5 bit), or with double quantization
    an 8-bit absmax plus one fp32 constant per 256 blocks (0.127 bit). int8: 8 bits (the fp32
    per-row scales are negligible). mxfp4: 4 bits plus one 8-bit scale per 32 values.
    """
    if quantization in ("nf4", "fp4"):
        return 4 + (8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64)
    if quantization == "int8":
        return 8.0
    if quantization == "mxfp4":
        return 4 + 8 / 32
    raise ValueError(f"not a quantization: {quantization!r}")


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that activation memory depends on."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    """Width of the MLP, or of one expert for a mixture of experts."""
    vocab_size: int
    experts_per_token: int = 0
    """Experts each token is routed to; 0 for a dense MLP."""
    tie_word_embeddings: bool = False
    """Whether the output head shares the input embedding's weights."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Read the shape from a Hugging Face `config.json` (its `text_config` if nested)."""
        c = config.get("text_config") or config
        try:
            hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
            experts = int(c.get("num_experts_per_tok") or c.get("experts_per_token") or 0)
            width = c.get("moe_intermediate_size") if experts else None
            return cls(
                hidden_size=hidden,
                num_layers=int(c["num_hidden_layers"]),
                num_attention_heads=heads,
                num_kv_heads=int(c.get("num_key_value_heads") or heads),
                head_dim=int(c.get("head_dim") or hidden // heads),
                intermediate_size=int(width or c["intermediate_size"]),
                vocab_size=int(c["vocab_size"]),
                experts_per_token=experts,
                tie_word_embeddings=bool(
                    c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecipeError(
                f"the model's config.json lacks a decoder shape field ({exc})",
                "memory is estimated for decoder-only transformers with the usual config keys",
            ) from None


@dataclass(frozen=True, kw_only=True)
class MemoryPart:
    name: str
    bytes: int
    note: str


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Estimated peak memory of one GPU, as a sum of parts."""

    parts: tuple[MemoryPart, ...]

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes,
            "total_gib": round(self.total_bytes / GIB, 2),
            "parts": [dataclasses.asdict(p) for p in self.parts],
        }


# ----------------------------------------------------------------------------- activations


def _lora_inputs(shape: ModelShape, targets: str | Sequence[str]) -> list[tuple[str, int]]:
    """(module, in_features) of the adapted linear layers of one decoder layer."""
    q_width = shape.num_attention_heads * shape.head_dim
    known = {
        "q_proj": shape.hidden_size,
        "k_proj": shape.hidden_size,
        "v_proj": shape.hidden_size,
        "o_proj": q_width,
        "gate_proj": shape.hidden_size,
        "up_proj": shape.hidden_size,
        "down_proj": shape.intermediate_size,
    }
    if targets == "all-linear":
        # MoE experts are not nn.Linear modules: all-linear adapts attention only there
        names = list(known)[:4] if shape.experts_per_token else list(known)
    else:
        names = list(targets)
    # names outside the Llama/Qwen convention are assumed to read the hidden state
    return [(n, known.get(n, shape.hidden_size)) for n in names]


def activation_bytes_per_token_per_layer(
    shape: ModelShape,
    *,
    seq_len: int,
    compute_bytes: int,
    mixed_precision: bool,
    lora_targets: str | Sequence[str],
    lora_rank: int,
    lora_dropout: float,
    attn_implementation: str | None = None,
    quantization: str = "none",
    dropout_mask_bytes: int = 1,
) -> int:
    """Bytes autograd keeps per token for one decoder layer until the backward pass.

    Frozen linear layers keep no input (their weight gradient is not needed), except bitsandbytes
    int8 which keeps it anyway. Kept per token:
    - each RMSNorm: its fp32 input (4h) and the fp32 inverse RMS (4);
    - attention (SDPA/flash): q, k, v and the output (16-bit), the fp32 log-sum-exp per head;
      eager attention instead keeps q and the head-repeated k, v plus the probabilities in fp32
      (and their 16-bit cast under mixed precision), heads x seq_len each;
    - SwiGLU MLP: the gate input, its activation and the up projection (3 x intermediate);
      for a mixture of experts the same for each of the `experts_per_token` experts;
    - each adapted module: its input as lora_A sees it (under mixed precision a 16-bit copy per
      module, cast from the fp32 adapter input; in plain fp32 the shared input once, and none
      for o_proj behind SDPA, whose output is kept already), the
      dropout mask (`dropout_mask_bytes`: 1, as CUDA keeps bool masks; CPU keeps the input dtype)
      and the rank-r lora_A output.
    """
    h, a = shape.hidden_size, compute_bytes
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    norms = 2 * (4 * h + 4)
    if attn_implementation == "eager":
        probs = 4 + (a if a < 4 else 0)  # fp32 softmax, and its 16-bit cast under mixed precision
        attention = 3 * q * a + shape.num_attention_heads * seq_len * probs
    else:
        attention = (2 * q + 2 * kv) * a + 4 * shape.num_attention_heads
    mlp = 3 * shape.intermediate_size * a * max(1, shape.experts_per_token)
    lora = 0
    shared_inputs: set[int | str] = set()
    for name, width in _lora_inputs(shape, lora_targets):
        lora += lora_rank * a
        if lora_dropout > 0:
            lora += width * (a + dropout_mask_bytes)
        elif mixed_precision:
            lora += width * a
        elif name == "o_proj" and attn_implementation != "eager":
            pass  # its input is the attention output, which SDPA keeps already
        else:
            group = (
                "qkv"
                if name in ("q_proj", "k_proj", "v_proj")
                else "gate_up"
                if name in ("gate_proj", "up_proj")
                else name
            )
            if group not in shared_inputs:
                shared_inputs.add(group)
                lora += width * a
    int8_inputs = (2 * h + q + shape.intermediate_size) * a if quantization == "int8" else 0
    return norms + attention + mlp + lora + int8_inputs


def logits_bytes_per_token(shape: ModelShape, *, compute_bytes: int) -> int:
    """The output head's logits (16-bit, returned to the trainer), their fp32 copy kept by the
    log-softmax of the loss, and its fp32 gradient in the backward pass."""
    return shape.vocab_size * (compute_bytes + 4 + 4)


# ----------------------------------------------------------------------------- estimate


def estimate_memory(
    *,
    shape: ModelShape,
    base_params: int,
    adapter_params: int,
    trainable_params: int,
    quantized_params: int,
    quantization: str,
    double_quant: bool = True,
    precision: str,
    weight_bytes: int,
    strategy: str,
    world_size: int,
    micro_batch_size: int,
    max_length: int,
    gradient_checkpointing: bool,
    optimizer: str,
    lora_targets: str | Sequence[str],
    lora_rank: int,
    lora_dropout: float,
    attn_implementation: str | None = None,
    offload_params: bool = False,
    offload_optimizer: bool = False,
) -> MemoryEstimate:
    """Peak memory of one GPU during a training step, split into its parts.

    `precision` is `bf16`, `fp16` or `fp32`; `weight_bytes` the bytes per unquantized base
    parameter as loaded (2 for bfloat16/float16, 4 for float32); `quantized_params` how many
    base parameters `quantization` stores in low precision (0 for none, or for dequantized MXFP4).
    """
    if offload_params and strategy not in ("fsdp", "fsdp-qlora", "deepspeed-zero3"):
        raise RecipeError(
            f"parameter offload needs FSDP or ZeRO-3, not parallel.strategy={strategy}",
            "use parallel.strategy=deepspeed-zero3 or fsdp, or turn parameter offload off",
        )
    if offload_optimizer and strategy not in SHARDED_STATES:
        raise RecipeError(
            f"optimizer offload needs FSDP or ZeRO-2/3, not parallel.strategy={strategy}",
            "use a sharded strategy, or turn optimizer offload off",
        )
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    compute = 4 if precision == "fp32" else 2
    shard_weights = world_size if strategy in SHARDED_WEIGHTS else 1
    shard_states = world_size if strategy in SHARDED_STATES else 1
    kbit = quantization in ("nf4", "fp4", "int8")
    parts: list[MemoryPart] = []

    def add(name: str, nbytes: float, note: str) -> None:
        parts.append(MemoryPart(name=name, bytes=int(math.ceil(nbytes)), note=note))

    # weights
    plain_bytes = 4 if kbit else weight_bytes
    stored = quantized_params * (
        quantized_bits(quantization, double_quant=double_quant) / 8 if quantized_params else 0
    )
    stored += (base_params - quantized_params) * plain_bytes
    where = f"/ {shard_weights} ranks" if shard_weights > 1 else "replicated"
    quant_note = (
        f"{quantized_params:,} params at {quantized_bits(quantization, double_quant=double_quant):.3f} "
        f"bits, the rest at {plain_bytes} bytes"
        if quantized_params
        else f"{plain_bytes} bytes per param"
    )
    if offload_params:
        add("base weights", 0, f"offloaded to CPU ({stored / GIB:.1f} GiB there)")
    else:
        add("base weights", stored / shard_weights, f"{quant_note}; {where}")
    deepspeed = strategy in DEEPSPEED
    adapter_bytes = compute if deepspeed else 4
    add(
        "adapter weights",
        0 if offload_params else adapter_params * adapter_bytes / shard_weights,
        f"{adapter_params:,} params at {adapter_bytes} bytes; {where}",
    )
    if deepspeed and compute < 4:
        add(
            "fp32 master weights",
            0 if offload_optimizer else trainable_params * 4 / shard_states,
            "DeepSpeed's fp32 copy of the trainable params"
            + ("; offloaded" if offload_optimizer else f" / {shard_states}"),
        )
    # gradients and optimizer
    if offload_params and strategy in ("fsdp", "fsdp-qlora"):
        # FSDP's CPU offload moves each layer's reduce-scattered gradients to the CPU as it goes:
        # the GPU holds one layer's full-size gradients at a time
        layers = max(1, shape.num_layers)
        add(
            "gradients",
            trainable_params * 4 / layers,
            "one layer's fp32 gradients at a time; the rest offloaded",
        )
    else:
        add(
            "gradients",
            trainable_params * 4 / shard_states,
            f"fp32, {trainable_params:,} trainable params"
            + (f" / {shard_states}" if shard_states > 1 else ""),
        )
    if strategy == "ddp":
        add("DDP gradient buckets", trainable_params * 4, "a second copy of the gradients for the all-reduce")
    state = OPTIMIZER_STATE_BYTES.get(optimizer)
    if state is None:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    add(
        "optimizer state",
        0 if offload_optimizer else trainable_params * state / shard_states,
        f"{optimizer}: {state} bytes per trainable param"
        + ("; offloaded to CPU" if offload_optimizer else f" / {shard_states}" if shard_states > 1 else ""),
    )
    # activations
    tokens = micro_batch_size * max_length
    layer = activation_bytes_per_token_per_layer(
        shape,
        seq_len=max_length,
        compute_bytes=compute,
        mixed_precision=precision != "fp32",
        lora_targets=lora_targets,
        lora_rank=lora_rank,
        lora_dropout=lora_dropout,
        attn_implementation=attn_implementation,
        quantization=quantization,
    )
    if gradient_checkpointing:
        add(
            "activations",
            tokens * (shape.num_layers * shape.hidden_size * compute + layer),
            f"checkpointed: each layer's input ({shape.num_layers} x {shape.hidden_size} x {compute} bytes) "
            f"+ one layer recomputed ({layer:,} bytes) per token, {tokens:,} tokens",
        )
    else:
        add(
            "activations",
            tokens * shape.num_layers * layer,
            f"{shape.num_layers} layers x {layer:,} bytes per token, {tokens:,} tokens "
            f"(micro batch {micro_batch_size} x {max_length})",
        )
    add(
        "logits and loss",
        tokens * logits_bytes_per_token(shape, compute_bytes=compute),
        f"vocab {shape.vocab_size:,}: {compute}-byte logits, fp32 log-softmax and its gradient",
    )
    # transient working sets
    embed = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    per_layer = max(0, base_params - embed) / shape.num_layers
    if shard_weights > 1:
        add(
            "gathered layer",
            2 * per_layer * (stored / base_params),
            "one layer's full weights all-gathered, plus the next one prefetched",
        )
    if quantization in ("nf4", "fp4"):
        add(
            "dequantized weight",
            shape.hidden_size * shape.intermediate_size * compute,
            "the largest 4-bit weight dequantized for a backward matmul",
        )
    add(
        "CUDA context and workspace",
        CONTEXT_BYTES,
        "allowance: context, cuBLAS/NCCL workspaces, fragmentation",
    )
    return MemoryEstimate(parts=tuple(parts))
