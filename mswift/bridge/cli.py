"""Command lines of the conversion tools: ``checkpoint_convert/*.py`` and ``mswift convert``.

    python checkpoint_convert/hf_to_mcore.py --hf-dir IN --out OUT [--format torch_dist|legacy]
        [--tp N] [--pp N] [--ep N] [--etp N] [--dtype bf16|fp32]
    python checkpoint_convert/mcore_to_hf.py --mcore-dir IN --out OUT [--dtype bf16|fp32]
    python checkpoint_convert/reshard.py --mcore-dir IN --out OUT --tp N --pp N --ep N
    mswift convert hf-to-mcore|mcore-to-hf|reshard ...   (the same options)

Each runs as one process or under torchrun. A mistake in the input ends the run with exit code
2 and one message listing every problem; nothing is left at ``--out``. An ``--out`` that exists
(even an empty folder), or a stale ``OUT.tmp``, is refused the same way and left as it is.
"""
from __future__ import annotations

import argparse
import os
import sys

# Before torch is imported (if it is: conversions that copy bytes do without it): its CPU
# allocator then asks for transparent huge pages, which halves the time a conversion spends
# faulting in fresh tensor memory (torch reads it once).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from mswift.config.schema import ConfigError
from mswift.models.errors import ModelError
from mswift.runtime.launch_env import LaunchEnvError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive integer")
    return value


def _size(text: str) -> int:
    """``5GB`` / ``500MB`` / a byte count -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def _layout_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    default = None if required else 1
    parser.add_argument("--tp", type=positive_int, default=default, required=required,
                        help="tensor-parallel size")
    parser.add_argument("--pp", type=positive_int, default=default, required=required,
                        help="pipeline-parallel size")
    parser.add_argument("--ep", type=positive_int, default=default, required=required,
                        help="expert-parallel size")


def hf_to_mcore_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="HF model directory -> megatron "
                                     "checkpoint (torch_dist, reshardable; or legacy per-rank).")
    parser.add_argument("--hf-dir", required=True, help="HF model dir: config.json + safetensors")
    parser.add_argument("--out", required=True, help="new checkpoint directory (must not exist)")
    parser.add_argument("--format", default="torch_dist", choices=("torch_dist", "legacy"))
    _layout_options(parser)
    parser.add_argument("--etp", type=positive_int, default=None,
                        help="expert tensor-parallel size (default: --tp)")
    parser.add_argument("--vpp", type=positive_int, default=None,
                        help="legacy: virtual pipeline stages per rank (model0, model1, ...)")
    _uneven_options(parser)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="weights' dtype in the checkpoint (default: the HF checkpoint's)")
    parser.add_argument("--moe-grouped-gemm", action="store_true",
                        help="legacy: expert weights named as moe_grouped_gemm models hold them "
                        "(torch_dist checkpoints load either way)")
    parser.add_argument("--mtp-num-layers", type=positive_int, default=None,
                        help="map the multi-token-prediction layers (DeepSeek-V3) to megatron-"
                             "core's MTP block, for a run with this mtp_num_layers (default: "
                             "carry them through untouched)")
    return parser


def mcore_to_hf_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="megatron checkpoint (torch_dist or "
                                     "legacy) -> HF model directory.")
    parser.add_argument("--mcore-dir", required=True, help="checkpoint root (with the tracker)")
    parser.add_argument("--out", required=True, help="new HF model directory (must not exist)")
    parser.add_argument("--hf-dir", default=None, help="HF dir giving config.json + tokenizer "
                        "(default: the copy a converted checkpoint carries in hf/)")
    parser.add_argument("--max-shard-size", type=_size, default=None,
                        help="largest safetensors shard, e.g. 5GB (default)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="every tensor in this dtype, unquantized (default: the original "
                        "HF dtypes; an FP8 model as FP8, an AWQ model as bf16)")
    return parser


def reshard_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="legacy checkpoint at one TP/PP/EP "
                                     "layout -> the same weights at another.")
    parser.add_argument("--mcore-dir", required=True)
    parser.add_argument("--out", required=True, help="new checkpoint directory (must not exist)")
    _layout_options(parser, required=True)
    parser.add_argument("--vpp", type=positive_int, default=None,
                        help="virtual pipeline stages per rank in the output")
    _uneven_options(parser)
    parser.add_argument("--hf-dir", default=None, help="HF config dir, if the input carries none")
    return parser


def _uneven_options(parser: argparse.ArgumentParser) -> None:
    for end in ("first", "last"):
        parser.add_argument(f"--decoder-{end}-pipeline-num-layers", type=positive_int,
                            default=None, help=f"legacy: layers of the {end} pipeline stage "
                            "(Megatron-LM's option; default: an even split)")


def _run(prog: str, work) -> int:
    try:
        work()
    except (ModelError, ConfigError, LaunchEnvError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    finally:
        if "megatron.core" in sys.modules or _dist_initialized():
            from mswift.runtime import destroy_distributed

            destroy_distributed()
    return 0


def _dist_initialized() -> bool:
    if "torch.distributed" not in sys.modules:  # never imported (byte copies): no group
        return False
    import torch.distributed as dist

    return dist.is_initialized()


def hf_to_mcore_main(argv: list[str] | None = None, prog: str = "hf_to_mcore") -> int:
    from mswift.bridge.convert import hf_to_mcore

    a = hf_to_mcore_parser(prog).parse_args(argv)
    return _run(prog, lambda: hf_to_mcore(
        a.hf_dir, a.out, a.format, a.tp, a.pp, a.ep, a.etp, a.vpp, a.dtype,
        first=a.decoder_first_pipeline_num_layers, last=a.decoder_last_pipeline_num_layers,
        grouped_experts=a.moe_grouped_gemm, mtp_num_layers=a.mtp_num_layers))


def mcore_to_hf_main(argv: list[str] | None = None, prog: str = "mcore_to_hf") -> int:
    from mswift.bridge.convert import mcore_to_hf

    a = mcore_to_hf_parser(prog).parse_args(argv)
    return _run(prog, lambda: mcore_to_hf(a.mcore_dir, a.out, a.hf_dir, a.max_shard_size,
                                          dtype=a.dtype))


def reshard_main(argv: list[str] | None = None, prog: str = "reshard") -> int:
    from mswift.bridge.convert import reshard

    a = reshard_parser(prog).parse_args(argv)
    return _run(prog, lambda: reshard(a.mcore_dir, a.out, a.tp, a.pp, a.ep, a.vpp, a.hf_dir,
                                      first=a.decoder_first_pipeline_num_layers,
                                      last=a.decoder_last_pipeline_num_layers))


TOOLS = {
    "hf-to-mcore": (hf_to_mcore_main, "HF model directory -> megatron checkpoint"),
    "mcore-to-hf": (mcore_to_hf_main, "megatron checkpoint -> HF model directory"),
    "reshard": (reshard_main, "legacy checkpoint -> another TP/PP/EP layout"),
}


def convert_main(argv: list[str]) -> int:
    """``mswift convert hf-to-mcore|mcore-to-hf|reshard ...``"""
    if not argv or argv[0] not in TOOLS:
        lines = ["usage: mswift convert <tool> [options]", "", "tools:"]
        lines += [f"  {name:<12} {summary}" for name, (_, summary) in TOOLS.items()]
        lines += ["", "Run 'mswift convert <tool> --help' for the options of one tool."]
        asked = not argv or argv[0] in ("-h", "--help")
        if not asked:
            lines.insert(0, f"mswift convert: unknown tool {argv[0]!r}")
        print("\n".join(lines), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    main, _ = TOOLS[argv[0]]
    return main(argv[1:], prog=f"mswift convert {argv[0]}")
