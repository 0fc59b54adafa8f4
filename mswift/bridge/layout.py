"""An HF model at a parallel layout: the run config, its checks, and the built model chunks."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from mswift.bridge.errors import BridgeError
from mswift.config.schema import (
    ConfigError,
    DataConfig,
    ModelConfig,
    MswiftConfig,
    ParallelConfig,
    TrainingConfig,
)
from mswift.lazy_import import lazy_module
from mswift.models.family import ModelFamily
from mswift.models.hf_config import read_hf_config
from mswift.models.registry import dims_for, model_config_from_hf, padded_vocab_for
from mswift.models.weight_map import WeightMap

torch = lazy_module("torch")  # opening and checking a model does not need it


@dataclass(frozen=True)
class Layout:
    """How a model is split: Megatron-LM's sizes (etp None = tp; vpp None = no interleaving;
    first / last: the first / last pipeline stage's layers, None = an even split), for a run,
    a conversion, or the rank files of a legacy checkpoint (whose expert TP is TP)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    vpp: int | None = None
    sequence_parallel: bool = False
    first: int | None = None
    last: int | None = None
    # Legacy rank files only: expert weights under the grouped experts' names
    # (``mlp.experts.linear_fc1.weight{i}``, moe_grouped_gemm) instead of the per-expert ones.
    grouped_experts: bool = False

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline rank (virtual pipeline stages)."""
        return self.vpp or 1

    def ranks(self) -> list[tuple[int, int, int]]:
        """(tp, pp, ep) rank of every legacy rank file."""
        return [(t, p, e) for p in range(self.pp) for e in range(self.ep) for t in range(self.tp)]

    def rank_dir(self, tp_rank: int, pp_rank: int, ep_rank: int) -> str:
        """The legacy rank file's folder: ``mp_rank_TT[_PPP][_EEE]``."""
        name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if self.pp > 1 else "")
        return name + (f"_{ep_rank:03d}" if self.ep > 1 else "")

    def describe(self) -> str:
        text = f"TP{self.tp} PP{self.pp} EP{self.ep}"
        text += f" ETP{self.etp}" if self.etp else ""
        text += f" VPP{self.vpp}" if self.vpp else ""
        text += f" first stage {self.first}" if self.first is not None else ""
        text += f" last stage {self.last}" if self.last is not None else ""
        text += " grouped experts" if self.grouped_experts else ""
        return text + (" SP" if self.sequence_parallel else "")


@dataclass
class HFModel:
    """An HF model directory's family, mswift model config and the weight map's sizes."""

    hf_dir: Path
    config: dict
    family: ModelFamily
    model: ModelConfig

    @classmethod
    def open(cls, hf_dir: str | Path, **model_overrides) -> "HFModel":
        hf_dir = Path(hf_dir)
        config = read_hf_config(hf_dir)
        family, model = model_config_from_hf(config, where=str(hf_dir / "config.json"),
                                             **model_overrides)
        return cls(hf_dir, config, family, model)

    def weight_map(self, padded_vocab: int) -> WeightMap:
        return self.family.weight_map(self.config, dims_for(self.model, padded_vocab))

    @property
    def ignored_tensors(self) -> tuple[str, ...]:
        """Regexes of the checkpoint's tensors that the weight map does not read: buffers that
        hold no weights and the tensors carried through untouched (a vision tower)."""
        return self.family.ignored_tensors + self.family.hf_layout(
            self.config, self.model.mtp_num_layers or 0).all_carried

    def carried_tensors(self):
        """The tensors of this folder's checkpoint that megatron does not hold (a vision
        tower), which conversions carry through: :func:`carried_tensors`."""
        return carried_tensors(self.hf_dir, self.config, self.family,
                               self.model.mtp_num_layers or 0)


    def padded_vocab(self, tp: int) -> int:
        return padded_vocab_for(self.model, tp)

    def run_config(self, layout: Layout, dtype=None, seq_length: int = 128) -> MswiftConfig:
        """The config of a run of this model at ``layout`` (params in ``dtype``: a torch
        dtype, float32 (None) or bfloat16)."""
        name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
        if name not in ("float32", "bfloat16"):
            raise BridgeError(f"dtype {dtype}: expected torch.float32 or torch.bfloat16")
        try:
            parallel = ParallelConfig(
                tensor_model_parallel_size=layout.tp,
                pipeline_model_parallel_size=layout.pp,
                virtual_pipeline_model_parallel_size=layout.vpp,
                decoder_first_pipeline_num_layers=layout.first,
                decoder_last_pipeline_num_layers=layout.last,
                expert_model_parallel_size=layout.ep,
                expert_tensor_parallel_size=layout.etp,
                sequence_parallel=layout.sequence_parallel,
            )
        except ConfigError as err:
            raise BridgeError(err.problems, headline="parallel layout") from None
        return MswiftConfig(model=self.model, parallel=parallel,
                            data=DataConfig(seq_length=seq_length),
                            training=TrainingConfig(bf16=name == "bfloat16"))

    def check_layout(self, layout: Layout, world_size: int | None = None,
                     seq_length: int = 128) -> None:
        """Every way ``layout`` does not fit the model (and ``world_size`` ranks), at once."""
        from mswift.runtime.layout_checks import layout_problems, model_fit_problems

        cfg = self.run_config(layout, seq_length=seq_length)
        problems = model_fit_problems(cfg)
        if self.model.num_experts is None and layout.etp not in (None, 1):
            problems.append(f"expert_tensor_parallel_size={layout.etp}: needs an MoE model")
        if world_size is not None:
            problems += [p for p in layout_problems(cfg, world_size) if p not in problems]
        if problems:
            raise BridgeError(problems, headline=f"layout {layout.describe()} does not fit "
                                                 f"{self.hf_dir}")


def ensure_rendezvous_port() -> None:
    """A single process (no launcher) gets a free port, so two tools can run side by side."""
    from mswift.runtime.launch_env import detect_launch_env

    if detect_launch_env().launcher == "single" and "MASTER_PORT" not in os.environ:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


def launch_world_size() -> int:
    from mswift.runtime.launch_env import detect_launch_env

    return detect_launch_env().world_size


def _groups_match(cfg: MswiftConfig) -> bool:
    """megatron-core's process groups are already those of ``cfg``'s layout."""
    from megatron.core import parallel_state as ps

    par = cfg.parallel
    if not ps.model_parallel_is_initialized():
        return False
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size(),
            ps.get_context_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
            ps.get_expert_tensor_parallel_world_size()) == (
        par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
        par.virtual_pipeline_model_parallel_size, par.context_parallel_size,
        par.expert_model_parallel_size,
        par.expert_tensor_parallel_size or par.tensor_model_parallel_size)


def start_groups(cfg: MswiftConfig) -> None:
    """Start the process groups for ``cfg``; kept if already at its layout (building several
    models at one layout creates no new groups)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from mswift.runtime import init_distributed

    if not _groups_match(cfg):
        ensure_rendezvous_port()
        init_distributed(cfg)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)


def build_chunks(cfg: MswiftConfig):
    """Start the process groups for ``cfg`` and build this rank's model chunks."""
    from mswift.models.build import build_model

    start_groups(cfg)
    return build_model(cfg)


def carried_tensors(hf_dir: Path, config: dict, family: ModelFamily, mtp_layers: int = 0):
    """The tensors of ``hf_dir``'s checkpoint that megatron does not hold
    (:class:`~mswift.bridge.byte_copy.CarriedTensors`), None for an architecture that has
    none; refused when the architecture has them (``HFLayout.carried``, not
    ``carried_if_present``) and the folder holds none. ``mtp_layers``: the multi-token-
    prediction modules the model trains (those are in the weight map, not carried)."""
    from mswift.bridge.byte_copy import CarriedTensors
    from mswift.bridge.hf_io import HFCheckpoint

    layout = family.hf_layout(config, mtp_layers)
    patterns = layout.carried
    if not layout.all_carried:
        return None
    try:
        carried = CarriedTensors(HFCheckpoint(hf_dir), patterns)
        optional = CarriedTensors(HFCheckpoint(hf_dir), layout.all_carried)
    except BridgeError:
        carried = optional = None
    if not patterns:
        return optional if optional is not None and optional.names else None
    if carried is None or not carried.names:
        raise BridgeError(f"{hf_dir}: holds no tensors named like {' or '.join(patterns)}; "
                          f"a {'/'.join(config.get('architectures') or [])} checkpoint keeps "
                          "them beside the text model and mswift carries them through "
                          "untouched (pass --hf-dir with the original model's folder)")
    return optional
