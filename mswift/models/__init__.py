"""Model families: HF config -> megatron-core config, layer spec and weight map; builders."""
