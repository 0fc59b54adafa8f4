"""``mswift plan``: a training layout proven on paper before any GPU is booked.

For a run's config and a cluster size, the model chunks of one rank of every pipeline stage
are built by megatron-core itself, on the ``meta`` device (shapes only, no memory), in this one
process: a fake process group (torch's ``fake`` backend, which hallucinates collectives) gives
the process the rank and world size of the place being planned, so megatron-core's
``parallel_state`` hands out exactly the tensor / pipeline / expert shards, layer offsets and
embedding / output layers that rank builds in a real run. Tensor-parallel and expert-parallel
ranks of one stage hold equally sized shards, so one rank per pipeline stage covers every
distinct place. Parameters are counted from those chunks, and memory per GPU follows from them:

* weights: the parameter dtype (bf16 with ``bf16=true``);
* gradients: fp32, in megatron-core DDP's contiguous grad buffer (mswift's trainer sets
  ``grad_reduce_in_fp32=True``: bf16 params accumulate and reduce their gradients in fp32);
* optimizer: Adam's fp32 main params (bf16/fp16 training only) and its two fp32 moments,
  sharded by the distributed optimizer over the data-parallel ranks (x context-parallel) for
  dense parameters and over the expert-data-parallel ranks for expert parameters (unsharded
  with ``use_distributed_optimizer=false``);
* activations: see :func:`layer_activation_bytes`, times the micro-batches a stage holds at
  once under megatron-core's 1F1B (or interleaved) schedule, for the recompute setting of the
  config (:func:`held_activation_bytes`), and for comparison without recompute and with full
  recompute of every layer;
* a fixed reserve (``--reserve-gb``) for the CUDA context, NCCL buffers and allocator
  fragmentation, which no formula here predicts.

Published parameter counts are for the unpadded vocabulary and count a tied output layer
once; the totals here do the same (the padded rows are reported separately).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

from mswift.config import ConfigError, load_config
from mswift.runtime.layout_checks import data_parallel_size, layout_problems

GIB = 1024**3
KINDS = ("embedding", "output", "attention", "dense_mlp", "experts", "shared_experts",
         "router", "norms")
KIND_NAMES = {"embedding": "embedding", "output": "output layer", "attention": "attention",
              "dense_mlp": "dense MLP", "experts": "routed experts",
              "shared_experts": "shared experts", "router": "router", "norms": "norms"}
DEFAULT_GPUS_GB = (80.0, 141.0)

USAGE = """\
%(prog)s --config FILE.yaml --nnodes N [--nproc-per-node 8] [key=value ...]

Builds the model of one rank of every pipeline stage on the meta device (no memory) and prints
parameters and memory per GPU for the layout in the config (the YAML `mswift train` takes;
key=value overrides as there). A layout that does not divide is refused with the messages
`mswift train` gives.
"""


def param_kind(name: str) -> str:
    """The kind of a megatron-core GPTModel parameter, by its name."""
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "output"
    if "norm" in name:  # input/pre_mlp/final layernorm, q/k layernorm, TE's fused layer_norm_*
        return "norms"
    if ".mlp.router." in name:
        return "router"
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".self_attention." in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    raise ValueError(f"parameter {name}: of no kind mswift plan knows")


@dataclass
class Chunk:
    """One model chunk (virtual pipeline stage) of a rank."""

    layers: list[int]  # global layer numbers, from 0
    moe_layers: int
    params: Counter  # kind -> parameters on this rank
    layer_bytes: list[int]  # per layer, one micro-batch, no recompute
    selective_bytes: list[int]  # the same with the config's selective recompute modules
    layer_input_bytes: int  # what full recompute keeps of a group of layers (its input)


@dataclass
class Place:
    """One rank of a pipeline stage (its TP / EP peers hold shards of the same size)."""

    stages: list[int]  # pipeline stages with this place's breakdown
    chunks: list[Chunk]
    dense_params: int  # on this rank, not expert-parallel
    expert_params: int  # on this rank, sharded over expert parallelism
    last: bool  # the last pipeline stage (final norm, output layer, loss)
    output_bytes: int  # last stage: final norm, output layer and loss of one micro-batch
    in_flight: list[int]  # chunk micro-batches held at once, per stage of ``stages``
    memory: dict = field(default_factory=dict)  # name -> bytes (worst stage of ``stages``)

    @property
    def params(self) -> Counter:
        total = Counter()
        for chunk in self.chunks:
            total.update(chunk.params)
        return total


@dataclass
class Plan:
    cfg: object
    world_size: int
    nnodes: int
    nproc_per_node: int
    places: list[Place]
    totals: Counter  # kind -> whole-model parameters as built (padded vocabulary)
    padded_rows_params: int  # parameters of padded vocabulary rows in ``totals``
    total_params: int  # whole model, unpadded vocabulary, tied output counted once
    active_params: int  # per token: routed experts counted top-k / num_experts
    build_seconds: float


def layer_activation_bytes(shapes: dict, tokens: int, hidden: int, tp: int, sp: bool, etp: int,
                           topk: int, recomputed: frozenset = frozenset()) -> tuple[int, int]:
    """Bytes one transformer layer keeps for backward for one micro-batch, and its input.

    ``tokens`` = seq_length x micro_batch_size / context_parallel_size; ``shapes`` are this
    rank's weight shapes of the layer (so TP / expert-TP splits and GQA come out exactly).
    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models")
    give, for a GPT layer with 16-bit activations, TP t and sequence parallelism,
    ``s*b*h*(34/t + 5*a*s/(h*t))`` bytes without recompute, ``s*b*h*34/t`` with selective
    recompute (the attention softmax recomputed; the ``5as/h`` term is the softmax, its dropout
    mask and the attention over values) and ``2*s*b*h/t`` per layer with full recompute (the
    layer's input only). Megatron-LM's theoretical_memory_usage uses the same terms. Here the
    terms are itemised for the layers mswift builds: no dropout (no masks), a flash-style
    attention kernel that keeps q, k, v, its output and a per-row log-sum-exp but never the
    ``s x s`` matrix (so selective recompute saves nothing more), GQA, gated MLPs. 2 bytes per
    element, ``T`` tokens, ``t_sp`` = t with sequence parallelism else 1:

    * each norm (mswift's :class:`~mswift.models.norm.Norm`, measured): its fp32 input copy,
      the normalised x and its output (the next linear's input), ``4*T*h/t_sp`` elements;
    * attention: q, k, v and the attention output (= the projection's input),
      ``T*(q+2kv)/t + T*q/t``; q/k norms ``3*T*(q+kv)/t`` when the model has them;
      multi-latent attention (DeepSeek-V3) keeps q and k of ``heads x (nope+rope)``, v and the
      output of ``heads x v_head_dim`` (all ``/t``) and the Norms of its q and kv latents,
      ``4*T*(q_lora_rank+kv_lora_rank)/t_sp`` (:func:`_attention_elements`);
    * dense MLP: fc1's output (gate and up), silu(gate) and fc2's input ``T*4F/t`` (megatron-
      core's unfused SwiGLU; ``2F/t`` without a gate);
    * MoE MLP: the norm's input and the router's input ``2*T*h/t_sp``; fp32 router logits and
      scores ``8*(T/t_sp)*E``; each token copy routed to this rank (``T/t_sp*k*etp`` copies
      with balanced routing, top-k, gathered over expert-TP) keeps its dispatched input and
      expert output (the all-to-all buffers, ``2*h`` elements) plus its MLP's ``4Fe/etp``; a
      shared expert keeps ``T*4Fs/t``.

    Routing is assumed balanced: a skewed router puts more token copies on some ranks.
    Group-limited routing (DeepSeek-V3: top-k experts from the best ``topk_group`` groups)
    changes which ranks a token's k copies go to, not how many there are.

    ``recomputed``: the selective recompute modules (``training.recompute_modules``). A
    recomputed part keeps only its input, which is a tensor counted above already (the norms'
    outputs, the layer input), except ``layernorm``: a norm then keeps its input (``T*h/t_sp``)
    instead of its three tensors, and the next module's copy of its output is dropped with it.
    ``mlp``, ``moe`` (everything of the MoE MLP above) and ``shared_experts`` drop their terms;
    with ``layernorm`` too, a recomputed ``mlp`` / ``moe`` keeps an input of its own
    (``T*h/t_sp``, measured: it outlives the norm output that is dropped);
    ``core_attn`` changes nothing here (the flash-style kernel's q, k, v and output are kept by
    the projections around it; its per-row log-sum-exp is not counted).
    """
    t_sp = tp if sp else 1
    # mswift's Norm: fp32 input, normalised x, output; recomputed: its input only
    norm = (1 if "layernorm" in recomputed else 4) * tokens * hidden // t_sp
    elems = norm + _attention_elements(shapes, tokens, tp, sp)
    elems += norm  # the MLP's norm
    fc1, fc2 = shapes.get("mlp.linear_fc1.weight"), shapes.get("mlp.linear_fc2.weight")
    if fc1 is not None and "mlp" not in recomputed:
        elems += tokens * _mlp_elements(fc1, fc2)
    own_input = tokens * hidden // t_sp if "layernorm" in recomputed else 0
    if fc1 is not None and "mlp" in recomputed:
        elems += own_input
    extra = 0
    router = shapes.get("mlp.router.weight")
    if router is not None and "moe" in recomputed:
        elems += own_input
    elif router is not None:
        local_tokens = tokens // t_sp
        extra += 8 * local_tokens * router[0]
        e1 = shapes.get("mlp.experts.local_experts.0.linear_fc1.weight")
        e2 = shapes.get("mlp.experts.local_experts.0.linear_fc2.weight")
        if e1 is not None:
            elems += local_tokens * topk * etp * (2 * hidden + _mlp_elements(e1, e2))
        s1 = shapes.get("mlp.shared_experts.linear_fc1.weight")
        s2 = shapes.get("mlp.shared_experts.linear_fc2.weight")
        if s1 is not None and "shared_experts" not in recomputed:
            elems += tokens * _mlp_elements(s1, s2)
    return 2 * elems + extra, 2 * tokens * hidden // t_sp


def _attention_elements(shapes: dict, tokens: int, tp: int, sp: bool) -> int:
    """Elements one layer's attention keeps for backward (see layer_activation_bytes).

    GQA: q, k, v and the attention output, plus the q/k norms' tensors when the model has them.
    Multi-latent attention (DeepSeek-V3), as megatron-core 0.16.1 computes it: the up
    projections make q (``heads x (nope + rope)`` / t) and k/v, the key gets the rope part
    copied to every head, so core attention keeps q, k (both ``heads x (nope + rope)`` / t), v
    and its output (``heads x v_head_dim`` / t); the q and kv latents (q_lora_rank,
    kv_lora_rank wide, whole on every rank, sequence-split with SP) each pass a Norm, which
    keeps its three tensors (4 elements each). The down projections' outputs are not kept:
    the norms copy them to fp32 and the rope part is copied into k.
    """
    proj = shapes.get("self_attention.linear_proj.weight")
    if proj is None:
        return 0
    out = proj[1]  # attention output (value) width on this rank: heads x v_head_dim / t
    kv_up = shapes.get("self_attention.linear_kv_up_proj.weight")
    if kv_up is not None:  # multi-latent attention
        q_up = (shapes.get("self_attention.linear_q_up_proj.weight")
                or shapes["self_attention.linear_q_proj.weight"])
        latents = shapes["self_attention.kv_layernorm.weight"][0]
        if "self_attention.q_layernorm.weight" in shapes:  # q LoRA
            latents += shapes["self_attention.q_layernorm.weight"][0]
        return (tokens * (2 * q_up[0] + 2 * out)
                + 4 * tokens * latents // (tp if sp else 1))
    qkv = shapes.get("self_attention.linear_qkv.weight")
    if qkv is None:
        return 0
    kv = (qkv[0] - out) // 2
    elems = tokens * (qkv[0] + out)
    if "self_attention.q_layernorm.weight" in shapes:
        elems += 3 * tokens * (out + kv)  # the same Norm on q and k heads
    return elems


def _mlp_elements(fc1: tuple, fc2: tuple) -> int:
    """Per token: fc1's output and fc2's input, plus ``silu(gate)`` when fc1 is gated (twice
    fc2's input width): megatron-core's unfused SwiGLU (mswift sets bias_activation_fusion
    off) keeps gate, up, silu(gate) and their product."""
    gated = fc1[0] == 2 * fc2[1]
    return fc1[0] + fc2[1] * (2 if gated else 1)


def in_flight_micro_batches(pp: int, vpp: int, stage: int, micro_batches: int) -> int:
    """Chunk micro-batches whose activations a pipeline stage holds at once (its peak).

    megatron-core's schedules: 1F1B runs ``min(pp - stage - 1, M)`` warm-up forwards before its
    first backward, so ``pp - stage`` micro-batches (at most M) are held; the interleaved
    schedule runs ``(pp - stage - 1) * 2 + (vpp - 1) * pp`` warm-up chunk forwards (at most
    ``M * vpp``), each holding one chunk's activations.
    """
    if pp == 1:
        return 1
    if vpp == 1:
        return min(pp - stage, micro_batches)
    total = micro_batches * vpp
    return min((pp - stage - 1) * 2 + (vpp - 1) * pp + 1, total)


def held_activation_bytes(chunk: "Chunk", granularity: str | None, method: str | None,
                          num_layers: int | None) -> tuple[int, int]:
    """(bytes a chunk holds per micro-batch in flight, bytes of the recompute working set) under
    megatron-core's recompute of a TransformerBlock: full uniform checkpoints each group of
    ``num_layers`` layers (keeps one input per group; backward runs one group again at a time),
    full block checkpoints each of the first ``num_layers`` layers alone and keeps the rest."""
    layers = chunk.layer_bytes
    if granularity == "selective":
        return sum(chunk.selective_bytes), 0
    if granularity != "full" or not layers:
        return sum(layers), 0
    if method == "uniform":
        groups = [layers[i:i + num_layers] for i in range(0, len(layers), num_layers)]
        return len(groups) * chunk.layer_input_bytes, max(sum(g) for g in groups)
    recomputed = min(num_layers, len(layers))
    return (recomputed * chunk.layer_input_bytes + sum(layers[recomputed:]),
            max(layers[:recomputed], default=0))


def _layer_shapes(layer) -> dict:
    """Parameter shapes by name, grouped experts' weights by their per-expert names."""
    from mswift.models.weight_map import local_spec_name

    return {local_spec_name(name): tuple(p.shape) for name, p in layer.named_parameters()}


def _chunk(chunk_model, cfg, tokens: int) -> tuple[Chunk, int, int]:
    """A built GPTModel chunk -> its Chunk record, dense and expert parameter counts."""
    par, m = cfg.parallel, cfg.model
    tp = par.tensor_model_parallel_size
    etp = par.expert_tensor_parallel_size or tp
    params, dense, expert = Counter(), 0, 0
    for name, p in chunk_model.named_parameters():
        params[param_kind(name)] += p.numel()
        if getattr(p, "allreduce", True):
            dense += p.numel()
        else:
            expert += p.numel()
    tr = cfg.training
    selective = frozenset(tr.recompute_modules or ["core_attn"]
                          if tr.recompute_granularity == "selective" else [])
    layers, moe, plain, reduced, layer_input = [], 0, [], [], 0
    for layer in chunk_model.decoder.layers:
        layers.append(layer.layer_number - 1)
        shapes = _layer_shapes(layer)
        moe += "mlp.router.weight" in shapes
        args = (shapes, tokens, m.hidden_size, tp, par.sequence_parallel, etp, m.moe_router_topk)
        act, layer_input = layer_activation_bytes(*args)
        plain.append(act)
        reduced.append(layer_activation_bytes(*args, recomputed=selective)[0])
    return Chunk(layers, moe, params, plain, reduced, layer_input), dense, expert


def _output_bytes(cfg, tokens: int, padded_vocab: int) -> int:
    """Last stage, one micro-batch: final norm and output-layer inputs (bf16) and the logits:
    bf16 logits, the fp32 copy megatron-core's vocab-parallel cross entropy makes and the fp32
    softmax it keeps for backward (10 bytes per logit of this rank's vocabulary shard)."""
    tp = cfg.parallel.tensor_model_parallel_size
    t_sp = tp if cfg.parallel.sequence_parallel else 1
    return 2 * 2 * tokens * cfg.model.hidden_size // t_sp + 10 * tokens * padded_vocab // tp


def build_places(cfg, world_size: int) -> tuple[list[tuple[int, list[Chunk], int, int, bool]],
                                                float]:
    """Per pipeline stage: (stage, chunks, dense params, expert params, is last stage), built on
    the meta device at a fake rank of that stage; and the seconds the building took."""
    import torch
    import torch.distributed as dist
    # Importing this torch module registers the "fake" backend: collectives that do nothing,
    # one process standing for any rank of any world size.
    from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401
    from megatron.core import parallel_state

    from mswift.models.build import build_model, transformer_config
    from mswift.runtime.cpu_layer import enable_cpu_layer
    from mswift.runtime.mcore_fixes import apply_mcore_fixes
    from mswift.runtime.parallel import initialize_parallel_state

    enable_cpu_layer()  # megatron-core's MoE dispatcher asks for a CUDA stream while built
    apply_mcore_fixes()  # as a run: without it MLA's check for TE fails without TE (DeepSeek-V3)
    par = cfg.parallel
    tokens = cfg.data.seq_length * cfg.training.micro_batch_size // par.context_parallel_size
    if dist.is_initialized():
        raise RuntimeError("mswift plan builds in a process without a process group")
    start = time.perf_counter()
    stages, out = None, []
    rank = 0
    while True:
        dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
        try:
            initialize_parallel_state(cfg, gloo_groups=False)
            if stages is None:  # the first rank of each stage: rank 0's pipeline group
                stages = dist.get_process_group_ranks(
                    parallel_state.get_pipeline_model_parallel_group())
            stage = parallel_state.get_pipeline_model_parallel_rank()
            with warnings.catch_warnings():  # advice on training numerics, not on sizes
                warnings.filterwarnings("ignore", message=".*without fp32 routing")
                # expert layers at expert_tensor_parallel_size 1 run without SP, as they should
                warnings.filterwarnings("ignore", message=".*tensor model parallel size is 1")
                config = transformer_config(cfg)
            config.perform_initialization = False  # shapes only
            with torch.device("meta"):
                chunks = build_model(cfg, config)
            not_meta = [n for c in chunks for n, p in c.named_parameters()
                        if p.device.type != "meta"]
            assert not not_meta, f"built off the meta device: {not_meta[:3]}"
            records, dense, expert = [], 0, 0
            for chunk in chunks:
                record, d, e = _chunk(chunk, cfg, tokens)
                records.append(record)
                dense, expert = dense + d, expert + e
            last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            out.append((stage, records, dense, expert, last))
            del chunks
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        if len(out) == len(stages):
            break
        rank = stages[len(out)]
    return out, time.perf_counter() - start


def replication(kind: str, tp: int, etp: int, ep: int) -> int:
    """How many ranks of one pipeline stage hold different shards of a kind of parameter."""
    if kind in ("embedding", "output", "attention", "dense_mlp", "shared_experts"):
        return tp
    if kind == "experts":
        return ep * etp
    return 1  # norms, router: the same copy on every rank of the stage


def make_plan(cfg, nnodes: int, nproc_per_node: int) -> Plan:
    """The plan of ``cfg`` (model section filled from hf_model) on ``nnodes x nproc_per_node``
    GPUs; ConfigError listing every way the layout does not fit (as ``mswift train``)."""
    from mswift.models.registry import padded_vocab_for

    world = nnodes * nproc_per_node
    problems = layout_problems(cfg, world)
    if problems:
        raise ConfigError(problems)
    par, m, tr = cfg.parallel, cfg.model, cfg.training
    tp, pp, ep = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                  par.expert_model_parallel_size)
    etp = par.expert_tensor_parallel_size or tp
    vpp = par.virtual_pipeline_model_parallel_size or 1
    dp = data_parallel_size(cfg, world)
    dp_cp = dp * par.context_parallel_size
    expert_dp = world // (etp * ep * pp)
    micro_batches = (tr.global_batch_size or tr.micro_batch_size * dp) // (tr.micro_batch_size
                                                                            * dp)
    tokens = cfg.data.seq_length * tr.micro_batch_size // par.context_parallel_size
    padded = padded_vocab_for(m, tp)
    built, seconds = build_places(cfg, world)

    totals = Counter()
    for _, chunks, _, _, _ in built:
        for chunk in chunks:
            for kind, n in chunk.params.items():
                totals[kind] += n * replication(kind, tp, etp, ep)
    tied = not m.untie_embeddings_and_output_weights
    if tied:  # the last stage's copy of the embedding (pp > 1) is no parameter of its own
        totals.pop("output", None)
    padded_rows = (padded - m.vocab_size) * m.hidden_size * (1 if tied else 2)
    total = sum(totals.values()) - padded_rows
    active = total
    if m.num_experts:
        active -= totals["experts"] * (m.num_experts - m.moe_router_topk) // m.num_experts

    weight_bytes = 4 if not (tr.bf16 or tr.fp16) else 2
    state_bytes = 12 if weight_bytes == 2 else 8  # (fp32 main param +) Adam m and v
    places: dict[tuple, Place] = {}
    for stage, chunks, dense, expert, last in built:
        in_flight = in_flight_micro_batches(pp, vpp, stage, micro_batches)
        key = (tuple((tuple(sorted(c.params.items())), c.moe_layers, tuple(c.layer_bytes))
                     for c in chunks), dense, expert, last)
        place = places.get(key)
        if place is None:
            place = places[key] = Place([], chunks, dense, expert, last,
                                        _output_bytes(cfg, tokens, padded) if last else 0, [])
        place.stages.append(stage)
        place.in_flight.append(in_flight)
    for place in places.values():
        place.memory = _memory(place, cfg, weight_bytes, state_bytes, dp_cp, expert_dp)
    return Plan(cfg, world, nnodes, nproc_per_node, list(places.values()), totals, padded_rows,
                total, active, seconds)


def _memory(place: Place, cfg, weight_bytes: int, state_bytes: int, dp_cp: int,
            expert_dp: int) -> dict:
    par, tr = cfg.parallel, cfg.training
    params = place.dense_params + place.expert_params
    if par.use_distributed_optimizer:
        optimizer = state_bytes * (place.dense_params / dp_cp + place.expert_params / expert_dp)
    else:
        optimizer = state_bytes * params
    in_flight = max(place.in_flight)  # the first stage of a group holds the most

    def activations(*setting) -> int:
        # Without interleaving a "chunk micro-batch" is a whole micro-batch of the rank's
        # layers; backward recomputes one group of one chunk at a time.
        held = [held_activation_bytes(c, *setting) for c in place.chunks]
        return (in_flight * max(h for h, _ in held) + max(w for _, w in held)
                + place.output_bytes)

    memory = {
        "weights": params * weight_bytes,
        "grads": params * 4,
        "optimizer": int(optimizer),
        "activations": activations(tr.recompute_granularity, tr.recompute_method,
                                   tr.recompute_num_layers),
        "activations_no_recompute": activations(None, None, None),
        "activations_full_recompute": activations("full", "uniform", 1),
    }
    states = memory["weights"] + memory["grads"] + memory["optimizer"]
    for key in ("", "_no_recompute", "_full_recompute"):
        memory["total" + key] = states + memory["activations" + key]
    memory["chunks"] = len(place.chunks)
    return memory


def _b(n: int | float) -> str:
    """A parameter count for people: 30.53B, 151.9M."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _g(n: float) -> str:
    return f"{n / GIB:.1f}"


def _ranges(numbers: list[int]) -> str:
    if len(numbers) == 1:
        return str(numbers[0])
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}"
    return ",".join(map(str, numbers))


def recompute_name(tr) -> str:
    """The training section's recompute setting, in words."""
    if tr.recompute_granularity == "full":
        n = tr.recompute_num_layers
        return (f"full recompute, {tr.recompute_method}, {n} layer{'s' if n > 1 else ''}"
                + (" per stage" if tr.recompute_method == "block" else " per group"))
    if tr.recompute_granularity == "selective":
        return f"selective recompute of {', '.join(tr.recompute_modules or ['core_attn'])}"
    return "no recompute"


def _uneven(par) -> str:
    """An uneven pipeline split, as the layout line names it ('' for an even one)."""
    ends = [f"{end} stage {n} layers" for end, n in (
        ("first", par.decoder_first_pipeline_num_layers),
        ("last", par.decoder_last_pipeline_num_layers)) if n is not None]
    return f" ({', '.join(ends)})" if ends else ""


def format_plan(plan: Plan, gpus_gb: tuple[float, ...], reserve_gb: float) -> str:
    cfg = plan.cfg
    par, m, tr = cfg.parallel, cfg.model, cfg.training
    tp, pp, ep, cp = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                      par.expert_model_parallel_size, par.context_parallel_size)
    etp = par.expert_tensor_parallel_size or tp
    vpp = par.virtual_pipeline_model_parallel_size
    dp = data_parallel_size(cfg, plan.world_size)
    expert_dp = plan.world_size // (etp * ep * pp)
    micro = (tr.global_batch_size or tr.micro_batch_size * dp) // (tr.micro_batch_size * dp)
    dtype = "bf16" if tr.bf16 else "fp16" if tr.fp16 else "fp32"
    lines = [
        f"model: {m.hf_model or 'model section of the config'}: {m.num_layers} layers, hidden "
        f"{m.hidden_size}, {m.num_attention_heads} heads / {m.num_query_groups or m.num_attention_heads}"
        f" KV groups, vocab {m.vocab_size}"
        + (f", {m.num_experts} experts top-{m.moe_router_topk}" if m.num_experts else ""),
        f"parameters: {_b(plan.total_params)} total ({plan.total_params:,}), "
        f"{_b(plan.active_params)} active per token ({plan.active_params:,})"
        + ("; routed experts counted top-k / experts" if m.num_experts else ""),
        "  by kind: " + ", ".join(f"{KIND_NAMES[k]} {_b(plan.totals[k])}" for k in KINDS
                                  if plan.totals.get(k)),
        f"  padded vocabulary rows (not counted above): {_b(plan.padded_rows_params)}",
        f"layout: {plan.world_size} GPUs = {plan.nnodes} node(s) x {plan.nproc_per_node}; TP {tp}"
        f"{' (SP)' if par.sequence_parallel else ''} x PP {pp}"
        f"{f' (VPP {vpp})' if vpp else ''}{_uneven(par)} x CP {cp} x DP {dp}"
        + (f"; experts: EP {ep} x expert-TP {etp} x expert-DP {expert_dp}"
           if m.num_experts else ""),
        f"batch: seq_length {cfg.data.seq_length} x micro_batch_size {tr.micro_batch_size}, "
        f"{micro} micro-batch(es) per step per data-parallel rank",
        f"memory per GPU in GiB: weights {dtype}; grads fp32 (DDP grad buffer, "
        f"grad_reduce_in_fp32); optimizer = "
        + ("fp32 main params + " if dtype != "fp32" else "")
        + "Adam m, v in fp32, "
        + (f"sharded over DP x CP {dp * cp}"
           + (f" (experts: over expert-DP {expert_dp})" if m.num_experts else "")
           if par.use_distributed_optimizer else "not sharded (use_distributed_optimizer=false)")
        + f"; reserve {reserve_gb:g} GiB (CUDA context, NCCL, fragmentation)",
    ]
    verdicts = {g: [True, True] for g in gpus_gb}
    for place in plan.places:
        mem = place.memory
        first = 0 in place.stages
        role = ", ".join(r for r, on in (("embedding", first), ("output layer", place.last))
                         if on)
        lines.append("")
        lines.append(f"pipeline stage{'s' if len(place.stages) > 1 else ''} "
                     f"{_ranges(place.stages)}{f' ({role})' if role else ''}: one GPU of "
                     f"{tp * cp * dp} per stage (TP/EP ranks hold equal shards)")
        for v, chunk in enumerate(place.chunks):
            layers = (f"layers {chunk.layers[0]}-{chunk.layers[-1]}" if chunk.layers
                      else "no layers")
            kinds = ", ".join(f"{KIND_NAMES[k]} {_b(chunk.params[k])}" for k in KINDS
                              if chunk.params.get(k))
            prefix = f"  virtual stage {v}: " if len(place.chunks) > 1 else "  "
            lines.append(f"{prefix}{layers} ({chunk.moe_layers} MoE): "
                         f"{_b(sum(chunk.params.values()))} parameters = {kinds}")
        lines.append(f"  on this GPU: {_b(place.dense_params + place.expert_params)} parameters"
                     + (f" ({_b(place.expert_params)} of them experts)"
                        if place.expert_params else ""))
        in_flight = max(place.in_flight)
        unit = "chunk micro-batch(es)" if len(place.chunks) > 1 else "micro-batch(es)"
        lines.append(
            f"  weights {_g(mem['weights'])} + grads {_g(mem['grads'])} + optimizer "
            f"{_g(mem['optimizer'])} + activations ({in_flight} {unit} in flight, "
            f"{recompute_name(tr)}: the config's) {_g(mem['activations'])} = "
            f"{_g(mem['total'])} GiB")
        lines.append(
            "  for comparison: " + "; ".join(
                f"{name}: activations {_g(mem['activations' + key])}, total "
                f"{_g(mem['total' + key])} GiB"
                for name, key in (("no recompute", "_no_recompute"),
                                  ("full recompute, uniform, 1 layer", "_full_recompute"))))
        fits = []
        for gb in gpus_gb:
            room = gb * GIB - reserve_gb * GIB
            plain, full = mem["total"] <= room, mem["total_full_recompute"] <= room
            verdicts[gb][0] &= plain
            verdicts[gb][1] &= full
            fits.append(f"{gb:g} GiB: " + ("fits" if plain else
                                           "fits with full recompute" if full else
                                           "does NOT fit"))
        lines.append("  " + "; ".join(fits))
    lines.append("")
    summary = []
    for gb, (plain, full) in verdicts.items():
        summary.append(f"{gb:g} GiB GPUs: " + ("fits" if plain else
                                               "fits only with full recompute" if full else
                                               "does NOT fit"))
    lines.append("verdict: " + "; ".join(summary))
    lines.append(f"(built {sum(len(p.stages) for p in plan.places)} pipeline stage(s) on the "
                 f"meta device in {plan.build_seconds:.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "mswift plan") -> int:
    parser = argparse.ArgumentParser(prog=prog, usage=USAGE)
    parser.add_argument("--config", required=True,
                        help="the training YAML (as for `mswift train`); hf_model needs only its "
                             "config.json")
    parser.add_argument("--nnodes", type=int, required=True, help="nodes in the cluster")
    parser.add_argument("--nproc-per-node", type=int, default=8, help="GPUs per node (8)")
    parser.add_argument("--gpu-memory-gb", type=float, action="append",
                        help="GPU memory in GiB to check against; repeat for several "
                             "(default: 80 and 141, i.e. H100 and H200)")
    parser.add_argument("--reserve-gb", type=float, default=4.0,
                        help="GiB per GPU kept for the CUDA context, NCCL buffers and allocator "
                             "fragmentation (4)")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from mswift.runtime.quiet import quiet_known_warnings
    from mswift.train.preflight import filled_from_hf_model

    quiet_known_warnings()
    problems = [f"--{name}={value}: expected a positive number"
                for name, value in (("nnodes", args.nnodes),
                                    ("nproc-per-node", args.nproc_per_node))
                if value < 1]
    try:
        cfg = load_config(args.config, overrides)
        filled, more = filled_from_hf_model(cfg)
        if problems or more:
            raise ConfigError(problems + more)
        plan = make_plan(filled, args.nnodes, args.nproc_per_node)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan, tuple(args.gpu_memory_gb or DEFAULT_GPUS_GB), args.reserve_gb))
    return 0
