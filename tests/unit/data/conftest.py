"""Fixtures of the data tests: real tokenizers (see data_tokenizers.py), built once per run."""
import shutil
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_tokenizers import write_tokenizer_folder  # noqa: E402


@pytest.fixture(scope="session")
def real_tokenizer(tmp_path_factory):
    """real_tokenizer(family, with_template=True) -> a transformers fast tokenizer loaded
    with AutoTokenizer from a folder; without the template, the same files minus
    chat_template.jinja."""
    folders, cache = {}, {}

    def get(family: str, with_template: bool = True):
        key = (family, with_template)
        if key in cache:
            return cache[key]
        if family not in folders:
            folders[family] = write_tokenizer_folder(
                family, tmp_path_factory.mktemp(f"tokenizer_{family}"))
        folder = folders[family]
        if not with_template:
            bare = tmp_path_factory.mktemp(f"tokenizer_{family}_bare")
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(folder / name, bare / name)
            folder = bare
        cache[key] = AutoTokenizer.from_pretrained(str(folder))
        return cache[key]

    return get
