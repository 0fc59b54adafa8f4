"""Checkpoint conversions: HF -> megatron (torch_dist or legacy), megatron -> HF, legacy reshard.

Every tool checks all of its input first (config.json, tensor names and shapes, the layout) and
then writes into ``OUT.tmp``, renamed to ``OUT`` only when complete; on any error the partial
folder is removed. An existing ``OUT`` (even an empty folder) or ``OUT.tmp`` is refused, never
deleted or written over. A megatron output carries what the way back needs: ``OUT/hf/``
(config.json, generation_config.json, tokenizer files, ...) and ``OUT/mswift_bridge.json``
(format, layout, padded vocabulary, and every HF tensor's name, dtype and shape in the
original order).

Every conversion streams: it holds about one tensor at a time, whatever the model size. Legacy
conversions need no process group: one process writes or reads every rank file (under torchrun
the rank files are shared out). torch_dist conversions write the whole model at TP1 (the same
reshardable checkpoint a TP1 run saves; under torchrun the ranks share the files out) and read
a checkpoint saved at any layout. HF output is written in shards, shared out over the ranks
under torchrun.

Conversions copy bytes, file to file, without importing torch: legacy ones and reshards with
:mod:`mswift.bridge.byte_copy`, torch_dist ones with :mod:`mswift.bridge.dist_bytes` (the
checkpoint's keys and chunks derived from the weight map); same checks, same files. Where
``--dtype`` (or, on the way back, the original HF dtypes) differ from the stored dtype, the
bytes are cast between float32, bfloat16 and float16 on the way (:mod:`mswift.bridge.
dtype_cast`, bit for bit what torch's ``.to`` gives). Otherwise (another dtype, or a stored
chunk that is not plain) tensors are made: legacy files with torch, torch_dist with
megatron-core's ``dist_checkpointing`` save of a meta-device model and PyTorch's reader, one
tensor at a time (:mod:`mswift.bridge.torch_dist`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from mswift.bridge import dtypes
from mswift.bridge.errors import BridgeError
from mswift.bridge.head_padding import unpad_hf_dir_on_rank0
from mswift.bridge.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    HFCheckpoint,
    HFShardWriter,
    copy_aux_files,
    kind_from_name,
    write_index,
)
from mswift.bridge.layout import HFModel, Layout
from mswift.bridge.legacy import (
    LegacySource,
    is_legacy,
    megatron_args,
    write_legacy,
)
from mswift.bridge.model_io import HFSource, check_copies, hf_plan
from mswift.bridge.quantized import carry_fp8_scales, export_plan, open_checkpoint, plain_config
from mswift.bridge.tracker import write_tracker
from mswift.lazy_import import lazy_module

torch = lazy_module("torch")  # the byte copies never import it
dist = lazy_module("torch.distributed")

BRIDGE_METADATA = "mswift_bridge.json"
HF_SUBDIR = "hf"
FORMATS = ("torch_dist", "legacy")


def _group() -> bool:
    # No process group can exist before torch.distributed is imported (and importing it to
    # ask would cost the byte copies their speed).
    return "torch.distributed" in sys.modules and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _group() else 0


def world_size() -> int:
    return dist.get_world_size() if _group() else 1


def barrier() -> None:
    if _group():
        dist.barrier()


def staging_dir(out: Path) -> Path:
    """Where a conversion writes before its output is complete: ``OUT.tmp``."""
    return out.with_name(out.name + ".tmp")


def check_new_output(out: Path, sources: list[Path]) -> None:
    """Refuse an ``--out`` that exists (even empty) or whose ``OUT.tmp`` does: a conversion
    never deletes or writes over what it did not make in this run."""
    problems = []
    for src in sources:
        if out.resolve() == src.resolve():
            problems.append(f"--out {out}: is the input directory")
    if not problems and os.path.lexists(out):
        problems.append(f"--out {out}: already exists and is not written over; remove it or "
                        "choose another path")
    tmp = staging_dir(out)
    if os.path.lexists(tmp):
        problems.append(f"--out {out}: {tmp} exists (left by a conversion that stopped, or "
                        "not ours) and is not deleted; remove it or choose another path")
    if problems:
        raise BridgeError(problems)


@contextlib.contextmanager
def staged_output(out: Path):
    """Yield ``OUT.tmp`` to write into; rename it to ``OUT`` on success, remove it on error.

    :func:`check_new_output` has refused an existing ``OUT`` or ``OUT.tmp``, so the folder
    removed on error is the one this run made."""
    tmp = staging_dir(out)
    barrier()  # every rank has checked --out before rank 0 makes OUT.tmp
    if rank() == 0:
        tmp.mkdir(parents=True)
    barrier()
    try:
        yield tmp
        barrier()
    except BaseException:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank() == 0:
        if os.path.lexists(out):
            raise BridgeError(f"--out {out}: appeared while converting and is not written "
                              f"over; the finished conversion is in {tmp}")
        tmp.rename(out)


def ensure_process_group() -> None:
    """A plain gloo group under torchrun, for tools that only need barriers."""
    from mswift.bridge.layout import ensure_rendezvous_port
    from mswift.runtime.launch_env import detect_launch_env

    env = detect_launch_env()
    if env.world_size > 1 and not dist.is_initialized():
        ensure_rendezvous_port()
        dist.init_process_group("gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size)


def write_bridge_metadata(out: Path, hf: HFModel, fmt: str, layout: Layout,
                          padded_vocab: int, dtype, tensors: list, iteration: int = 0,
                          carried=None) -> None:
    """``OUT/hf/`` and ``OUT/mswift_bridge.json``: what the way back to HF needs; the
    ``carried`` tensors (megatron holds no part of them: a vision tower) go into ``OUT/hf/`` as
    a safetensors checkpoint of their own."""
    (out / HF_SUBDIR).mkdir(exist_ok=True)
    copy_aux_files(hf.hf_dir, out / HF_SUBDIR)
    carry_fp8_scales(hf.hf_dir, out / HF_SUBDIR)  # an FP8 model's scales, for the way back
    if carried is not None:
        carried.write(out / HF_SUBDIR)
    meta = {
        "format": fmt, "family": hf.family.name, "iteration": iteration,
        "layout": dataclasses.asdict(layout), "padded_vocab_size": padded_vocab,
        "dtype": dtypes.as_kind(dtype).name, "hf_tensors": tensors,
        "mtp_num_layers": hf.model.mtp_num_layers,
    }
    (out / BRIDGE_METADATA).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def read_bridge_metadata(root: Path) -> dict:
    """``mswift_bridge.json`` of a converted checkpoint; empty for one mswift did not convert."""
    path = root / BRIDGE_METADATA
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BridgeError(f"{path}: not valid JSON ({err})") from None


def _dtype_arg(dtype: str | None, ckpt: HFCheckpoint) -> dtypes.Dtype:
    if dtype is not None:
        return dtypes.BY_NAME[dtypes.ALIASES[dtype]]
    source = ckpt.model_kind()
    if source.name not in ("bfloat16", "float32"):
        raise BridgeError(f"{ckpt.dir}: weights are {source.name}; pass --dtype bf16 or fp32")
    return source


def conversion_layout(hf: HFModel, tp=1, pp=1, ep=1, etp=None, vpp=None, first=None,
                      last=None, grouped_experts: bool = False) -> Layout:
    # megatron-core runs MoE with TP only with sequence parallelism; it changes no weights.
    moe_tp = hf.model.num_experts is not None and tp > 1
    return Layout(tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp, sequence_parallel=moe_tp,
                  first=first, last=last, grouped_experts=grouped_experts)


# -- HF -> megatron -------------------------------------------------------------------------------


def hf_to_mcore(hf_dir, out, fmt: str = "torch_dist", tp: int = 1, pp: int = 1, ep: int = 1,
                etp: int | None = None, vpp: int | None = None, dtype: str | None = None,
                progress: bool = True, first: int | None = None,
                last: int | None = None, grouped_experts: bool = False,
                mtp_num_layers: int | None = None) -> Path:
    """Convert an HF model directory into a megatron checkpoint at ``out`` (``first`` /
    ``last``: an uneven pipeline's first / last stage layers, for the legacy format;
    ``grouped_experts``: legacy rank files with the state-dict names of ``moe_grouped_gemm``
    models -- a torch_dist checkpoint holds the same keys either way; ``mtp_num_layers``: the
    checkpoint's multi-token-prediction modules become megatron-core's MTP block, for a run
    that trains them; None: they are carried in ``OUT/hf/``)."""
    hf_dir, out = Path(hf_dir), Path(out)
    if fmt not in FORMATS:
        raise BridgeError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    hf = HFModel.open(hf_dir, mtp_num_layers=mtp_num_layers)
    ckpt = open_checkpoint(hf_dir)  # FP8 / AWQ weights dequantized slice by slice
    layout = conversion_layout(hf, tp, pp, ep, etp, vpp, first, last, grouped_experts)
    hf.check_layout(layout)
    if fmt == "legacy" and etp not in (None, tp):
        raise BridgeError(f"--etp {etp}: the legacy format needs expert TP equal to --tp {tp}")
    padded = hf.padded_vocab(tp)
    wmap = hf.weight_map(padded)
    ckpt.check_tensors(wmap.hf_shapes(), hf.family.name, hf.ignored_tensors)
    check_copies(ckpt, wmap)
    carried = hf.carried_tensors()
    kind = _dtype_arg(dtype, ckpt)
    check_new_output(out, [hf_dir])
    ensure_process_group()
    with staged_output(out) as tmp:
        if fmt == "legacy":
            _write_legacy_from_hf(hf, ckpt, wmap, layout, tmp, kind, progress)
        else:
            _write_torch_dist_from_hf(hf, ckpt, wmap, padded, tmp, kind, progress)
        if rank() == 0:
            write_bridge_metadata(tmp, hf, fmt, layout, padded, kind, ckpt.tensor_records(),
                                  carried=carried)
    return out


def _write_legacy_from_hf(hf, ckpt, wmap, layout: Layout, tmp: Path, kind: dtypes.Dtype,
                          progress) -> None:
    from mswift.bridge.byte_copy import HFBytes, hf_copy_applies, write_legacy_copying

    mine = layout.ranks()[rank()::world_size()]
    progress = progress and rank() == 0
    if hf_copy_applies(ckpt, wmap, kind):
        args = megatron_args(hf.model, layout, wmap.dims.padded_vocab, kind, iteration=0)
        write_legacy_copying(HFBytes(ckpt, wmap), wmap, layout, tmp, args, ranks=mine,
                             progress=progress, kind=kind)
    else:
        dtype = dtypes.torch_dtype(kind)
        args = megatron_args(hf.model, layout, wmap.dims.padded_vocab, dtype, iteration=0)
        write_legacy(HFSource(ckpt, wmap), wmap, layout, tmp, dtype, args, ranks=mine,
                     progress=progress)
    barrier()
    if rank() == 0:
        write_tracker(tmp, 0)


def _whole_model(hf: HFModel, padded: int) -> HFModel:
    """``hf`` with the vocabulary padded to ``padded`` rows when the model is built at TP1."""
    model = dataclasses.replace(hf.model, make_vocab_size_divisible_by=padded)
    return dataclasses.replace(hf, model=model)


def _write_torch_dist_from_hf(hf, ckpt, wmap, padded, tmp, kind: dtypes.Dtype,
                              progress) -> None:
    """The whole model at TP1 (megatron-core reshards on load); under torchrun each rank
    writes a share. Byte copies, cast where the dtype changes (:mod:`mswift.bridge.
    dist_bytes`), else megatron-core's own save of a meta-device model whose tensors are read
    from HF when written."""
    from mswift.bridge.byte_copy import HFBytes, hf_copy_applies

    if hf_copy_applies(ckpt, wmap, kind):
        from mswift.bridge.dist_bytes import write_torch_dist_copying

        write_torch_dist_copying(HFBytes(ckpt, wmap), wmap, tmp, rank=rank(),
                                 world=world_size(), progress=progress and rank() == 0,
                                 kind=kind)
        barrier()
        if rank() == 0:
            write_tracker(tmp, 0)
        return
    from mswift.bridge.torch_dist import meta_chunks, save_torch_dist_streaming

    # Pad the vocabulary as training at --tp will, whatever TP this conversion runs at.
    dtype = dtypes.torch_dtype(kind)
    whole = _whole_model(hf, padded)
    chunks = meta_chunks(whole.run_config(Layout(), dtype=dtype))
    source = HFSource(ckpt, whole.weight_map(padded))

    def produce(name: str) -> torch.Tensor:
        return source.local(name, 0, 1).to(dtype)

    save_torch_dist_streaming(chunks, tmp, produce)


# -- megatron -> HF -------------------------------------------------------------------------------


def _template(root: Path, hf_dir) -> HFModel:
    """The HF model a converted checkpoint came from (with its MTP setting)."""
    mtp = read_bridge_metadata(root).get("mtp_num_layers")
    if hf_dir:
        template = Path(hf_dir)
        if not (template / "config.json").is_file():
            raise BridgeError(f"--hf-dir {template}: no config.json there (expected the HF "
                              "model's config and tokenizer)")
        return HFModel.open(template, mtp_num_layers=mtp)
    template = root / HF_SUBDIR
    if not (template / "config.json").is_file():
        raise BridgeError(f"{root}: carries no {HF_SUBDIR}/config.json (not converted by mswift); "
                          "pass --hf-dir with the HF model's config and tokenizer")
    return HFModel.open(template, mtp_num_layers=mtp)


def _hf_dtypes(meta: dict, template: HFModel) -> dict[str, dtypes.Dtype]:
    """Each HF tensor's dtype: as in the original checkpoint, else config.json's dtype."""
    if meta.get("hf_tensors"):
        return {name: kind_from_name(dtype) for name, dtype, _ in meta["hf_tensors"]}
    name = template.config.get("dtype") or template.config.get("torch_dtype")
    if not name:
        return {}
    wmap = template.weight_map(template.padded_vocab(1))
    return {hf_name: kind_from_name(name) for hf_name in wmap.hf_shapes()}


def mcore_to_hf(mcore_dir, out, hf_dir=None, max_shard_bytes: int | None = None,
                progress: bool = True, dtype: str | None = None) -> Path:
    """Convert a megatron checkpoint (torch_dist or legacy) into an HF model directory.
    ``dtype``: every tensor in this dtype, unquantized (default: as the original; an FP8
    model as FP8, :mod:`mswift.bridge.quantized`)."""
    root, out = Path(mcore_dir), Path(out)
    if not root.is_dir():
        raise BridgeError(f"--mcore-dir {root}: not a directory")
    template = _template(root, hf_dir)
    carried = template.carried_tensors()
    meta = read_bridge_metadata(root)
    names = template.weight_map(template.padded_vocab(1)).hf_shapes()
    kinds, encoder, plain = export_plan(template.hf_dir, names, _hf_dtypes(meta, template),
                                        dtype)
    legacy = is_legacy(root)
    if not legacy and not _is_torch_dist(root):
        raise BridgeError(f"--mcore-dir {root}: neither a legacy nor a torch_dist checkpoint")
    check_new_output(out, [root])
    ensure_process_group()
    if legacy:
        source = LegacySource(root, template.weight_map(template.padded_vocab(1)))
    else:
        source = _torch_dist_source(template, root, kinds, copies=encoder is None)
    with staged_output(out) as tmp:
        _write_hf_from_source(source, tmp, kinds, max_shard_bytes, progress, encoder, carried)
        if rank() == 0:
            copy_aux_files(template.hf_dir, tmp)
            if plain:
                plain_config(tmp, plain)
        unpad_hf_dir_on_rank0(tmp)  # attention padded for TP: back to the original head counts
    return out


def _write_hf_from_source(source, tmp: Path, kinds: dict[str, dtypes.Dtype], max_shard_bytes,
                          progress: bool, encoder=None, carried=None) -> None:
    """Every rank calls this: the HF shards are shared out (rank r writes shards r, r + world,
    ...), each rank reads the megatron tensors its shards need; rank 0 writes the index.
    ``kinds``: the dtype of each HF tensor (others keep their megatron tensor's); ``encoder``:
    writes FP8 weights (:class:`mswift.bridge.quantized.Fp8Encoder`), with tensors;
    ``carried``: the tensors megatron does not hold, copied after the others."""
    from mswift.bridge.byte_copy import (
        COPY_THREADS,
        LegacyBytes,
        OpenFiles,
        legacy_to_hf_applies,
        write_hf_copying,
    )
    from mswift.bridge.dist_bytes import DistBytes

    if (isinstance(source, LegacySource) and encoder is None
            and legacy_to_hf_applies(source, kinds)):
        source = LegacyBytes(source)
    copying = isinstance(source, (LegacyBytes, DistBytes))
    plan = hf_plan(source.wmap, kinds, source.kind if copying else
                   lambda name: dtypes.as_kind(source.dtype(name)))
    stored = plan if encoder is None else encoder.plan(plan)
    stored += carried.plan() if carried is not None else []
    max_shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    shards = HFShardWriter.plan_shards(stored, max_shard_bytes)
    writer = HFShardWriter(tmp, stored, max_shard_bytes,
                           shards=range(rank(), len(shards), world_size()),
                           copy_threads=COPY_THREADS if copying else 1)
    shard_writer = writer
    if encoder is not None:
        writer = encoder.wrap(writer, plan)
    with OpenFiles() as files:
        if copying:
            write_hf_copying(source, writer, progress and rank() == 0, carried)
        else:
            _write_hf_tensors(source, writer, progress)
            if carried is not None:
                carried.add_to(shard_writer, files)
        writer.close()
    barrier()
    if rank() == 0:
        write_index(tmp, shards)


def _write_hf_tensors(source, writer: HFShardWriter, progress: bool) -> None:
    """The tensors ``writer`` expects, made from ``source``'s megatron tensors (a stacked
    HF tensor expert by expert)."""
    from mswift.bridge.byte_copy import hf_part

    todtype = {name: dtypes.torch_dtype(kind) for name, kind, _ in writer.plan_entries()}
    tensors = [t for t in source.wmap.hf_tensors() if t.name in todtype]
    if progress and rank() == 0:
        from tqdm import tqdm

        tensors = tqdm(tensors, desc="writing HF tensors", unit="tensor")
    last = (None, None)  # the previous megatron tensor's HF tensors (q, k, v: one read)
    for t in tensors:
        dtype = todtype[t.name]
        if t.stacked:
            writer.add_stacked(t.name, (hf_part(source, name, part).to(dtype)
                                        for name, part in t.sources))
            continue
        name, part = t.sources[0]
        if last[0] != name:
            rule, _ = source.wmap.lookup(name)
            last = (name, rule.transform.to_hf(source.full(name), source.wmap.dims))
        writer.add(t.name, last[1][part].to(dtype))


def _is_torch_dist(root: Path) -> bool:
    from mswift.bridge.dist_bytes import is_torch_dist

    return is_torch_dist(root)


def _torch_dist_source(template: HFModel, root: Path, kinds: dict[str, dtypes.Dtype],
                       copies: bool = True):
    """The checkpoint's chunks (saved at any layout) as byte blocks of the HF tensors, or, when
    dtypes change, a chunk is not stored plainly or ``copies`` is False (tensors are
    quantized), its tensors read one at a time."""
    from mswift.bridge.dist_bytes import DistBytes, stored_embedding

    padded, _ = stored_embedding(root)
    if padded < template.model.vocab_size:
        raise BridgeError(f"{root}: stored vocabulary of {padded} rows is smaller than "
                          f"vocab_size {template.model.vocab_size}")
    wmap = _whole_model(template, padded).weight_map(padded)
    source = DistBytes(root, wmap)
    if copies and source.applies(kinds):
        return source
    from mswift.bridge.torch_dist import TorchDistSource

    return TorchDistSource(source)


# -- legacy reshard -------------------------------------------------------------------------------


def reshard(mcore_dir, out, tp: int, pp: int, ep: int, vpp: int | None = None, hf_dir=None,
            progress: bool = True, first: int | None = None, last: int | None = None) -> Path:
    """Rewrite a legacy checkpoint at another TP/PP/EP (+ virtual PP) layout."""
    root, out = Path(mcore_dir), Path(out)
    if not is_legacy(root):
        raise BridgeError(f"--mcore-dir {root}: not a legacy (per-rank) checkpoint; torch_dist "
                          "checkpoints are resharded by megatron-core when loaded")
    template = _template(root, hf_dir)
    carried = template.carried_tensors()
    layout = conversion_layout(template, tp, pp, ep, vpp=vpp, first=first, last=last)
    template.check_layout(layout)
    padded = template.padded_vocab(tp)
    wmap = template.weight_map(padded)
    check_new_output(out, [root])
    ensure_process_group()
    from mswift.bridge.byte_copy import LegacyBytes, reshard_applies, write_legacy_copying

    source = LegacySource(root, wmap)
    # the output names expert weights as the input does (grouped or per expert)
    layout = dataclasses.replace(layout, grouped_experts=source.layout.grouped_experts)
    kind = next(iter(source.pieces.values())).kind
    copying = reshard_applies(source)
    args = megatron_args(template.model, layout, padded,
                         kind if copying else dtypes.torch_dtype(kind), source.iteration)
    mine, progress = layout.ranks()[rank()::world_size()], progress and rank() == 0
    with staged_output(out) as tmp:
        if copying:
            write_legacy_copying(LegacyBytes(source), wmap, layout, tmp, args,
                                 iteration=source.iteration, ranks=mine, progress=progress)
        else:
            write_legacy(source, wmap, layout, tmp, None, args, iteration=source.iteration,
                         ranks=mine, progress=progress)
        barrier()
        if rank() == 0:
            write_tracker(tmp, source.iteration)
            meta = read_bridge_metadata(root)
            write_bridge_metadata(tmp, template, "legacy", layout, padded, kind,
                                  meta.get("hf_tensors", []), source.iteration, carried)
    return out
