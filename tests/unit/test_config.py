import pytest

from mswift.config import ConfigError, all_keys, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_flat_and_sectioned_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "tensor_model_parallel_size: 2\ntraining:\n  lr: 1.0e-4\n"
                           "model: {num_layers: 4}\n")
    cfg = load_config(path, ["train_iters=7", "--micro-batch-size", "3",
                             "parallel.sequence_parallel=true", "--min-lr=1e-5"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.parallel.sequence_parallel is True
    assert cfg.training.lr == 1e-4 and cfg.training.min_lr == 1e-5
    assert cfg.training.train_iters == 7 and cfg.training.micro_batch_size == 3
    assert cfg.model.num_layers == 4


def test_override_beats_file(tmp_path):
    path = write(tmp_path, "lr: 0.1\n")
    assert load_config(path, ["lr=0.2"]).training.lr == 0.2


def test_every_problem_reported_at_once(tmp_path):
    path = write(tmp_path, "tensor_model_parallel_sise: 2\nnormalization: BatchNorm\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["lr=fast", "num_layers=2.5", "bf16=yes please"])
    text = str(err.value)
    assert "tensor_model_parallel_sise" in text and "did you mean tensor_model_parallel_size" in text
    assert "normalization='BatchNorm': expected one of RMSNorm, LayerNorm" in text
    assert "lr='fast'" in text and "expected a number" in text
    assert "num_layers=2.5" in text and "expected an integer" in text
    assert "bf16='yes please'" in text and "true or false" in text
    assert len(err.value.problems) == 5


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="num_query_groups=3: expected a positive divisor"):
        load_config(None, ["num_attention_heads=4", "num_query_groups=3"])
    with pytest.raises(ConfigError, match="sequence_parallel=true: needs tensor_model_parallel"):
        load_config(None, ["sequence_parallel=true"])
    with pytest.raises(ConfigError, match="hidden_size=0: expected a positive number"):
        load_config(None, ["hidden_size=0"])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected key=value or --key value"):
        load_config(None, ["lr"])


def test_megatron_lm_names_present():
    keys = set(all_keys())
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size", "expert_tensor_parallel_size", "sequence_parallel",
                 "micro_batch_size", "global_batch_size", "seq_length", "lr", "min_lr",
                 "lr_warmup_iters", "lr_decay_style", "train_iters", "save", "load",
                 "save_interval", "seed", "bf16"):
        assert name in keys, name
