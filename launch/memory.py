"""Per-GPU memory estimate of a training step, part by part: LoRA/QLoRA adapters, and full or
partial fine-tuning (`method` full/freeze: the trained weights in fp32, their gradients and
AdamW's moments, sharded by the strategy; every linear layer's input kept for its weight's
gradient in the layers that train).

An estimate for planning (which strategy, micro batch, checkpointing), not a guarantee. Every
part states its assumption; the activation formula was checked tensor by tensor against what
autograd saves for a Llama block with PEFT LoRA (tests/test_plan.py). Assumed throughout:

- Training runs on GPUs with bf16/fp16 mixed precision (autocast) or in fp32; base weights in
  `weight_dtype`. For bitsandbytes (nf4/fp4/int8) on a replicated base (single, ddp, ZeRO-2) the
  trainer calls PEFT's `prepare_model_for_kbit_training`, which casts every non-quantized base
  parameter (embeddings, output head, norms) to fp32; a sharded 4-bit base (fsdp-qlora, ZeRO-3)
  keeps them in `weight_dtype` (`compat.sharded_4bit`).
- Adapter parameters are fp32 (PEFT's `autocast_adapter_dtype`; `model.adapter_dtype` for a
  quantized base), their gradients too; under DeepSpeed, which casts the module to bf16/fp16,
  they are 16-bit with an fp32 master copy.
- Sharding: `fsdp`, `fsdp-qlora` and `deepspeed-zero3` divide weights, gradients and
  optimizer state by the world size; `deepspeed-zero2` divides gradients and optimizer state;
  `ddp` and `single` divide nothing. Activations are never sharded (data parallel only).
- Offload: `offload_params` (ZeRO-3/FSDP) keeps weights in CPU memory, gathering one layer
  at a time; `offload_optimizer` (ZeRO-2/3, FSDP) keeps optimizer state (and the fp32
  master copy) in CPU memory.

Loading has its own peak, before any of the above (`estimate_load_memory`): per GPU and in host
RAM per node, from how transformers, bitsandbytes and accelerate load (read in their source; the
FSDP host-RAM behaviour measured on CPU), stated part by part.

torch-free: it works from parameter counts and the model's config.json.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunefleet.launch.compat import BNB, sharded_4bit
from tunefleet.launch.core.errors import RecipeError

GIB = 1024**3

CONTEXT_BYTES = 1 * GIB
"""Allowance for the CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation."""

PROCESS_BASELINE_BYTES = int(0.55 * GIB)
"""A CPU training process before its model: Python with torch, transformers, TRL, PEFT, accelerate
and the tokenised data mapped in (measured: the demo's 1 M-parameter model peaks at 0.6 GiB)."""

ZERO3_DEFAULT_WINDOW = 1_000_000_000
"""DeepSpeed's stage3_max_live_parameters, stage3_max_reuse_distance and sub_group_size when the
recipe leaves them (`parallel.zero3_gathered_params`, `parallel.zero3_sub_group_size`) unset."""

ZERO3_STEP_TEMPORARY_BYTES = {("adamw_torch", "cpu"): 8, ("adamw_torch", "gpu"): 4}
"""Bytes per element of the sub-group the ZeRO-3 optimizer step is working on, beside its fp32
gradient (4): the temporaries of torch's AdamW (the square root and its quotient: 8 on CPU, where it
runs tensor by tensor, measured +0.62 GiB = 12.5 bytes per element of a 53 M-element sub-group,
tools/bench_memory.py; one, 4, for the foreach AdamW of a CUDA run, not measured). The fused AdamW
and bitsandbytes' optimizers update in their kernels: none."""

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


@dataclass(frozen=True, kw_only=True)
class MemoryInputs:
    """Everything the estimate depends on: the model's shape and parameter counts, and the run."""

    shape: ModelShape
    base_params: int
    """Parameters of the base model."""
    adapter_params: int
    """Parameters PEFT adds (LoRA A/B, DoRA magnitudes, modules_to_save copies)."""
    trainable_params: int
    quantized_params: int
    """Base parameters `quantization` stores in low precision (0 for none, or dequantized MXFP4)."""
    quantization: str
    double_quant: bool = True
    precision: str
    """`bf16`, `fp16` or `fp32`."""
    weight_bytes: int
    """Bytes per unquantized base parameter as loaded (2 for bfloat16/float16, 4 for float32)."""
    strategy: str
    world_size: int
    micro_batch_size: int
    max_length: int
    gradient_checkpointing: bool
    optimizer: str
    lora_targets: str | Sequence[str]
    lora_rank: int
    lora_dropout: float
    attn_implementation: str | None = None
    offload_params: bool = False
    offload_optimizer: bool = False
    procs_per_node: int = 1
    """Processes per node (host RAM at load is counted per node)."""
    rank0_loads_weights: bool = False
    """Only global rank 0 reads the base weights, the others start on the meta device
    (`loading.rank0_loads_weights`)."""
    placed_on_gpu_at_load: bool = False
    """The weights are loaded straight onto the rank's GPU (a device_map: MXFP4 on single/ddp/ZeRO-2,
    `distributed/model.py: load_kwargs`); bitsandbytes always is."""
    method: str = "lora"
    """`lora`/`dora` (an adapter over a frozen base) or `full`/`freeze` (the model's own weights train)."""
    trained_layers: int = 0
    """full/freeze: decoder layers whose weights train (every linear input there is kept)."""
    backward_layers: int = 0
    """full/freeze: decoder layers the backward pass runs through (from the lowest trained weight up;
    the frozen layers below keep nothing)."""
    device: str = "gpu"
    """`gpu` (the estimate of one GPU's memory) or `cpu` (CPU processes: one process's resident
    memory, where loading, training and Python share one address space)."""
    zero3_gathered_params: int = ZERO3_DEFAULT_WINDOW
    """ZeRO-3's stage3_max_live_parameters / stage3_max_reuse_distance (`parallel.zero3_gathered_params`)."""
    zero3_sub_group_size: int = ZERO3_DEFAULT_WINDOW
    """ZeRO-3's sub_group_size (`parallel.zero3_sub_group_size`)."""

    @property
    def trains_weights(self) -> bool:
        return self.method in ("full", "freeze")

    @property
    def compute_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def weight_shards(self) -> int:
        return self.world_size if self.strategy in SHARDED_WEIGHTS else 1

    @property
    def state_shards(self) -> int:
        return self.world_size if self.strategy in SHARDED_STATES else 1

    @property
    def stored_weight_bytes(self) -> float:
        """Bytes of the base weights as stored: quantized ones at their bits, the rest at
        `weight_bytes` (fp32 for bitsandbytes runs: PEFT's k-bit preparation upcasts them)."""
        bits = (
            quantized_bits(self.quantization, double_quant=self.double_quant) if self.quantized_params else 0
        )
        return (
            self.quantized_params * bits / 8 + (self.base_params - self.quantized_params) * self._plain_bytes
        )

    @property
    def _plain_bytes(self) -> int:
        """Bytes of a non-quantized base parameter in training: PEFT's k-bit preparation makes them
        fp32 on a replicated bitsandbytes base; a sharded 4-bit base keeps the model dtype."""
        if self.quantization in BNB and not sharded_4bit(self.strategy, self.quantization):
            return 4
        return self.weight_bytes

    @property
    def loaded_weight_bytes(self) -> float:
        """Bytes of the whole base as `from_pretrained` returns it (before any k-bit preparation)."""
        bits = (
            quantized_bits(self.quantization, double_quant=self.double_quant) if self.quantized_params else 0
        )
        return (
            self.quantized_params * bits / 8 + (self.base_params - self.quantized_params) * self.weight_bytes
        )

    @property
    def largest_tensor_bytes(self) -> int:
        """The embedding matrix in the load dtype: the largest tensor that passes through whole."""
        return self.shape.vocab_size * self.shape.hidden_size * self.weight_bytes

    def check(self) -> None:
        if self.offload_params and self.strategy not in ("fsdp", "fsdp-qlora", "deepspeed-zero3"):
            raise RecipeError(
                f"parameter offload needs FSDP or ZeRO-3, not parallel.strategy={self.strategy}",
                "use parallel.strategy=deepspeed-zero3 or fsdp, or turn parameter offload off",
            )
        if self.offload_optimizer and self.strategy not in SHARDED_STATES:
            raise RecipeError(
                f"optimizer offload needs FSDP or ZeRO-2/3, not parallel.strategy={self.strategy}",
                "use a sharded strategy, or turn optimizer offload off",
            )
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be bf16, fp16 or fp32, got {self.precision!r}")
        if self.optimizer not in OPTIMIZER_STATE_BYTES:
            raise ValueError(f"unknown optimizer {self.optimizer!r}")


def layer_span(
    method: str, num_layers: int, trainable_layers: int | None = None, extra_modules: Sequence[str] = ()
) -> tuple[int, int]:
    """(decoder layers whose weights train, decoder layers the backward pass runs through) for
    full/freeze: the gradient flows from the loss down to the lowest trained weight, and no lower
    (a trained input embedding takes it all the way down)."""
    if method == "full":
        return num_layers, num_layers
    n = trainable_layers or 0
    trained = min(abs(n), num_layers)
    embedding = any("embed" in m for m in extra_modules)
    backward = num_layers if (n < 0 or embedding) else trained
    return trained, backward


def _part(name: str, nbytes: float, note: str) -> MemoryPart:
    return MemoryPart(name=name, bytes=int(math.ceil(nbytes)), note=note)


def _weight_parts(i: MemoryInputs) -> list[MemoryPart]:
    """Base and adapter weights, and DeepSpeed's fp32 master copy of the trainable ones."""
    where = f"/ {i.weight_shards} ranks" if i.weight_shards > 1 else "replicated"
    if i.quantized_params:
        bits = quantized_bits(i.quantization, double_quant=i.double_quant)
        quant_note = f"{i.quantized_params:,} params at {bits:.3f} bits, the rest at {i._plain_bytes} bytes"
    else:
        quant_note = f"{i._plain_bytes} bytes per param"
    stored = i.stored_weight_bytes
    deepspeed = i.strategy in DEEPSPEED
    if i.trains_weights and deepspeed and i.compute_bytes < i.weight_bytes:
        # DeepSpeed casts the module to bf16/fp16; the fp32 master copy is the optimizer's (below)
        stored = i.base_params * i.compute_bytes
        quant_note = f"{i.compute_bytes} bytes per param (DeepSpeed's {i.precision} copy)"
    if i.offload_params:
        parts = [_part("base weights", 0, f"offloaded to CPU ({stored / GIB:.1f} GiB there)")]
    else:
        name = "model weights" if i.trains_weights else "base weights"
        note = f"{quant_note}; {where}"
        if i.method == "freeze" and not deepspeed and i.weight_bytes < 4:  # the trained ones in fp32
            stored += i.trainable_params * (4 - i.weight_bytes)
            note += f"; the {i.trainable_params:,} trained ones in fp32"
        elif i.method == "freeze":
            note += f"; {i.trainable_params:,} of them train"
        parts = [_part(name, stored / i.weight_shards, note)]
    if i.trains_weights:
        if deepspeed:  # ZeRO keeps an fp32 copy of the trained partitions (cloned even when fp32)
            parts.append(
                _part(
                    "fp32 master weights",
                    0 if i.offload_optimizer else i.trainable_params * 4 / i.state_shards,
                    "DeepSpeed's fp32 copy of the trained params"
                    + ("; offloaded" if i.offload_optimizer else f" / {i.state_shards}"),
                )
            )
        return parts
    adapter_bytes = i.compute_bytes if deepspeed else 4
    parts.append(
        _part(
            "adapter weights",
            0 if i.offload_params else i.adapter_params * adapter_bytes / i.weight_shards,
            f"{i.adapter_params:,} params at {adapter_bytes} bytes; {where}",
        )
    )
    if deepspeed:  # ZeRO keeps an fp32 copy of the trained partitions (cloned even when fp32)
        parts.append(
            _part(
                "fp32 master weights",
                0 if i.offload_optimizer else i.trainable_params * 4 / i.state_shards,
                "DeepSpeed's fp32 copy of the trainable params"
                + ("; offloaded" if i.offload_optimizer else f" / {i.state_shards}"),
            )
        )
    return parts


def _gradient_and_optimizer_parts(i: MemoryInputs) -> list[MemoryPart]:
    shards = i.state_shards
    if i.offload_params and i.strategy in ("fsdp", "fsdp-qlora"):
        # FSDP's CPU offload moves each layer's reduce-scattered gradients to the CPU as it goes:
        # the GPU holds one layer's full-size gradients at a time
        gradients = _part(
            "gradients",
            i.trainable_params * 4 / max(1, i.shape.num_layers),
            "one layer's fp32 gradients at a time; the rest offloaded",
        )
    else:
        grad_bytes = i.compute_bytes if i.trains_weights and i.strategy in DEEPSPEED else 4
        gradients = _part(
            "gradients",
            i.trainable_params * grad_bytes / shards,
            f"{'fp32' if grad_bytes == 4 else f'{grad_bytes}-byte'}, {i.trainable_params:,} trainable params"
            + (f" / {shards}" if shards > 1 else ""),
        )
    parts = [gradients]
    if i.strategy == "ddp":
        parts.append(
            _part(
                "DDP gradient buckets",
                i.trainable_params * 4,
                "a second copy of the gradients for the all-reduce",
            )
        )
    state = OPTIMIZER_STATE_BYTES[i.optimizer]
    parts.append(
        _part(
            "optimizer state",
            0 if i.offload_optimizer else i.trainable_params * state / shards,
            f"{i.optimizer}: {state} bytes per trainable param"
            + ("; offloaded to CPU" if i.offload_optimizer else f" / {shards}" if shards > 1 else ""),
        )
    )
    return parts


def _layer_bytes(i: MemoryInputs, *, trained: bool) -> int:
    """Per token, one decoder layer: an adapter's layer (`lora_*`); a layer whose weights train (every
    linear layer's input kept, as a rank-0, dropout-free adapter on all of them keeps it); or a frozen
    layer the gradient passes through (no input kept for a weight)."""
    if i.trains_weights:
        targets: str | Sequence[str] = "all-linear" if trained else ()
        rank, dropout = 0, 0.0
    else:
        targets, rank, dropout = i.lora_targets, i.lora_rank, i.lora_dropout
    return activation_bytes_per_token_per_layer(
        i.shape,
        seq_len=i.max_length,
        compute_bytes=i.compute_bytes,
        mixed_precision=i.precision != "fp32",
        lora_targets=targets,
        lora_rank=rank,
        lora_dropout=dropout,
        attn_implementation=i.attn_implementation,
        quantization=i.quantization,
    )


def _activation_parts(i: MemoryInputs) -> list[MemoryPart]:
    """What autograd keeps for the backward pass, and the logits of the loss."""
    shape, compute = i.shape, i.compute_bytes
    tokens = i.micro_batch_size * i.max_length
    layer = _layer_bytes(i, trained=True)
    if i.trains_weights and not i.gradient_checkpointing:
        frozen = max(0, i.backward_layers - i.trained_layers)
        kept = i.trained_layers * layer + frozen * _layer_bytes(i, trained=False)
        note = (
            f"{i.trained_layers} trained layer(s) x {layer:,} bytes"
            + (f" + {frozen} frozen layer(s) on the gradient's path" if frozen else "")
            + f" per token, {tokens:,} tokens (micro batch {i.micro_batch_size} x {i.max_length})"
        )
        return [_part("activations", tokens * kept, note), _logits_part(i, tokens)]
    if i.gradient_checkpointing:
        activations = _part(
            "activations",
            tokens * (shape.num_layers * shape.hidden_size * compute + layer),
            f"checkpointed: each layer's input ({shape.num_layers} x {shape.hidden_size} x {compute} bytes) "
            f"+ one layer recomputed ({layer:,} bytes) per token, {tokens:,} tokens",
        )
    else:
        activations = _part(
            "activations",
            tokens * shape.num_layers * layer,
            f"{shape.num_layers} layers x {layer:,} bytes per token, {tokens:,} tokens "
            f"(micro batch {i.micro_batch_size} x {i.max_length})",
        )
    return [activations, _logits_part(i, tokens)]


def _logits_part(i: MemoryInputs, tokens: int) -> MemoryPart:
    return _part(
        "logits and loss",
        tokens * logits_bytes_per_token(i.shape, compute_bytes=i.compute_bytes),
        f"vocab {i.shape.vocab_size:,}: {i.compute_bytes}-byte logits, fp32 log-softmax and its gradient",
    )


def _transient_parts(i: MemoryInputs) -> list[MemoryPart]:
    """Working sets that exist for a moment in forward and backward: a gathered layer, gradient
    buckets, a dequantized weight."""
    shape = i.shape
    parts = []
    if i.weight_shards > 1:
        embed = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
        per_layer = max(0, i.base_params - embed) / shape.num_layers
        gathered_bytes = i.stored_weight_bytes / i.base_params
        if (
            i.trains_weights
        ):  # FSDP's mixed-precision policy (ZeRO: its 16-bit copy) gathers in the compute dtype
            gathered_bytes = min(gathered_bytes, i.compute_bytes)
        if i.strategy == "deepspeed-zero3":
            # a parameter of the forward that the backward uses again stays gathered until then, within
            # the window: about the last window / 2 of them (a 107 M-parameter model under the default
            # window keeps all of it, measured on CPU, tools/bench_memory.py). The backward of a
            # partial fine-tune runs through its trained layers and the head only; the frozen layers
            # below are let go after their forward (measured: freeze keeps none of them)
            in_backward = (
                per_layer * i.backward_layers + shape.vocab_size * shape.hidden_size
                if i.method == "freeze"
                else i.base_params
            )
            kept = int(min(in_backward, i.zero3_gathered_params // 2))
            parts.append(
                _part(
                    "gathered parameters",
                    kept * gathered_bytes + per_layer * gathered_bytes,
                    f"ZeRO-3 keeps gathered what it uses again within stage3_max_reuse_distance "
                    f"({i.zero3_gathered_params:.0e}): ~{kept:,} parameters, plus the layer being gathered",
                )
            )
        else:
            parts.append(
                _part(
                    "gathered layer",
                    2 * per_layer * gathered_bytes,
                    "one layer's full weights all-gathered, plus the next one prefetched",
                )
            )
    if i.strategy in DEEPSPEED and i.trainable_params:
        buffers = 2 if i.strategy == "deepspeed-zero3" else 1  # ZeRO-3 overlaps communication: two
        grad_bytes = i.compute_bytes if i.trains_weights else 4
        parts.append(
            _part(
                "gradient buckets",
                buffers * min(i.trainable_params, shape.hidden_size**2) * grad_bytes,
                f"{buffers} x reduce_bucket_size (auto: hidden_size^2 elements) of gradients being reduced",
            )
        )
    if i.quantization in ("nf4", "fp4"):
        parts.append(
            _part(
                "dequantized weight",
                shape.hidden_size * shape.intermediate_size * i.compute_bytes,
                "the largest 4-bit weight dequantized for a backward matmul",
            )
        )
    return parts


def _context_part(i: MemoryInputs) -> MemoryPart:
    if i.device == "cpu":
        return _part(
            "Python and libraries",
            PROCESS_BASELINE_BYTES,
            "measured: the interpreter, torch, transformers, TRL, PEFT and their buffers in one process",
        )
    return _part(
        "CUDA context and workspace",
        CONTEXT_BYTES,
        "allowance: context, cuBLAS/NCCL workspaces, fragmentation",
    )


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True, kw_only=True)
class LoadEstimate:
    """Estimated peak memory while the model loads (before the first step): one GPU, host RAM of one node."""

    gpu: MemoryEstimate
    host_per_node: MemoryEstimate

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu.to_dict(), "host_per_node": self.host_per_node.to_dict()}


def _gpu_at_load(i: MemoryInputs) -> list[MemoryPart]:
    """The base on one GPU between `from_pretrained` and the first step."""
    quantized = i.quantization in BNB
    if quantized:
        # bitsandbytes places the whole quantized model on the rank's GPU (its quantizer's
        # device_map); FSDP and ZeRO-3 shard it only afterwards, and accelerate's RAM-efficient
        # loading is skipped when 4-bit parameters exist. A replicated base then gets PEFT's
        # fp32 copies of its non-quantized weights.
        whole = max(i.loaded_weight_bytes, i.stored_weight_bytes)
        why = "the whole quantized model on every GPU (bitsandbytes loads it there; sharding comes after)"
        parts = [_part("base weights at load", whole, why)]
    elif i.offload_params:
        parts = [_part("base weights at load", 0, "parameters offloaded to CPU memory")]
    elif i.strategy in SHARDED_WEIGHTS:
        how = (
            "broadcast from rank 0 into the shards"
            if i.rank0_loads_weights
            else "FSDP moves each unit's shard to the GPU"
            if i.strategy != "deepspeed-zero3"
            else "zero.Init builds the model partitioned"
        )
        parts = [
            _part(
                "base weights at load", i.loaded_weight_bytes / i.world_size, f"/ {i.world_size} ranks: {how}"
            ),
            _part(
                "tensor in flight",
                i.largest_tensor_bytes,
                "one whole tensor (the embedding) while it is sharded",
            ),
        ]
    else:
        where = "loaded there" if i.placed_on_gpu_at_load else "moved there whole by the trainer"
        parts = [
            _part("base weights at load", i.loaded_weight_bytes, f"the whole model on every GPU ({where})")
        ]
    parts.append(_part("CUDA context and workspace", CONTEXT_BYTES, "allowance"))
    return parts


def _host_at_load(i: MemoryInputs) -> list[MemoryPart]:
    """Host RAM of one node while loading (the page cache of the checkpoint files is not counted:
    it is shared by the processes and reclaimable)."""
    n = i.procs_per_node
    if i.quantization in BNB or i.placed_on_gpu_at_load:
        part = _part(
            "checkpoint tensors in flight",
            n * i.largest_tensor_bytes,
            f"{n} process(es) x one tensor: the weights go from the files to the GPU tensor by tensor",
        )
    elif i.rank0_loads_weights:
        part = _part(
            "base weights (rank 0)",
            i.loaded_weight_bytes,
            "only global rank 0 reads the weights (the others start on the meta device): one copy, on its node",
        )
    elif i.strategy == "deepspeed-zero3":
        part = _part(
            "checkpoint tensors in flight",
            n * i.largest_tensor_bytes,
            f"{n} process(es) x one tensor: zero.Init builds the model partitioned (not measured here)",
        )
    else:
        part = _part(
            "base weights",
            n * i.loaded_weight_bytes,
            f"{n} process(es) x the whole model: each rank reads the full checkpoint into host RAM "
            "(transformers 5 does so under FSDP too, measured on CPU)",
        )
    parts = [part]
    if i.offload_params:
        parts.append(
            _part(
                "offloaded weights",
                n * i.stored_weight_bytes / i.weight_shards,
                f"{n} process(es) x their offloaded shard of the base",
            )
        )
    return parts


def estimate_host_training(i: MemoryInputs) -> MemoryEstimate:
    """Host RAM of one node during training: what CPU offload keeps there (every process of the node
    holds its shard): the optimizer's state with the fp32 master copy and the gradients it steps on
    (ZeRO's CPU Adam, FSDP's offload), and the offloaded weights. Nothing without offload."""
    n, shards = i.procs_per_node, i.state_shards
    parts = []
    if i.offload_optimizer:
        per_param = OPTIMIZER_STATE_BYTES[i.optimizer] + 4 + 4  # the moments, the fp32 master, its gradient
        parts.append(
            _part(
                "offloaded optimizer state",
                n * i.trainable_params * per_param / shards,
                f"{n} process(es) x their shard of {i.trainable_params:,} trained params x {per_param} bytes "
                "(moments, fp32 master, gradient)",
            )
        )
    if i.offload_params:
        parts.append(
            _part(
                "offloaded weights",
                n * i.stored_weight_bytes / i.weight_shards,
                f"{n} process(es) x their shard of the weights",
            )
        )
    return MemoryEstimate(parts=tuple(parts))


def estimate_load_memory(inputs: MemoryInputs) -> LoadEstimate:
    """Peak memory while the model loads: one GPU and the host RAM of one node, split into parts."""
    inputs.check()
    return LoadEstimate(
        gpu=MemoryEstimate(parts=tuple(_gpu_at_load(inputs))),
        host_per_node=MemoryEstimate(parts=tuple(_host_at_load(inputs))),
    )


def estimate_cpu_process(inputs: MemoryInputs) -> MemoryEstimate:
    """Peak resident memory of the fullest process of a CPU run (`device="cpu"`): a process holds its
    model from loading to the end, so its peak is the larger of the training step and loading (the
    whole model as read, plus the shard being made of it, on a process that reads the weights).
    CPU offload moves nothing off a CPU process: what it would keep in host RAM is the process's own."""
    train = estimate_memory(inputs)
    offloaded = estimate_host_training(inputs).parts
    if offloaded:
        train = MemoryEstimate(
            parts=(
                *train.parts,
                *(
                    _part(p.name, p.bytes / inputs.procs_per_node, f"{p.note}; in this process on CPU")
                    for p in offloaded
                ),
            )
        )
    per_process_load = inputs.loaded_weight_bytes
    if inputs.weight_shards > 1:
        per_process_load += inputs.loaded_weight_bytes / inputs.weight_shards
    load = MemoryEstimate(
        parts=(
            _part(
                "weights at load",
                per_process_load,
                "the whole model as read (rank 0 alone under FSDP2's broadcast loading, every rank otherwise)"
                + (", plus the shard made of it" if inputs.weight_shards > 1 else ""),
            ),
            _context_part(inputs),
        )
    )
    return train if train.total_bytes >= load.total_bytes else load


def _optimizer_step_part(i: MemoryInputs, during_backward: float) -> list[MemoryPart]:
    """ZeRO-3's optimizer step works on one sub-group of the rank's partition at a time, with its
    fp32 gradient and the optimizer's temporaries, after forward and backward have let go of their
    activations and gathered parameters: what it needs beyond those (`during_backward`) is a part."""
    if i.strategy != "deepspeed-zero3" or i.offload_optimizer or not i.trainable_params:
        return []
    elements = min(i.trainable_params / i.state_shards, i.zero3_sub_group_size)
    per_element = 4 + ZERO3_STEP_TEMPORARY_BYTES.get((i.optimizer, i.device), 0)
    step = elements * per_element
    if step <= during_backward:
        return []
    return [
        _part(
            "optimizer step",
            step - during_backward,
            f"a sub-group of {elements:,.0f} elements (sub_group_size {i.zero3_sub_group_size:.0e}) with its fp32 "
            f"gradient and {i.optimizer}'s temporaries, {per_element} bytes each, beyond what forward and "
            "backward held",
        )
    ]


def estimate_memory(inputs: MemoryInputs) -> MemoryEstimate:
    """Peak memory of one GPU during a training step, split into its parts: the state it keeps, then
    the larger of forward/backward's working set and the optimizer step's (a part beyond the first)."""
    inputs.check()
    working = [*_activation_parts(inputs), *_transient_parts(inputs)]
    return MemoryEstimate(
        parts=(
            *_weight_parts(inputs),
            *_gradient_and_optimizer_parts(inputs),
            *working,
            _context_part(inputs),
            *_optimizer_step_part(inputs, sum(p.bytes for p in working)),
        )
    )
