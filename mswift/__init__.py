"""mswift: Megatron-style training of large language models on megatron-core."""

__version__ = "0.1.0"
