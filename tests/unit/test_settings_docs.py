"""Every setting is documented where it is defined, and --list-settings shows it."""
from dataclasses import fields

from mswift.config.loader import SECTIONS, describe_settings
from mswift.config.schema import field_doc


def test_every_setting_has_a_one_line_description():
    missing = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in fields(cls)
               if not field_doc(f).strip() or "\n" in field_doc(f)]
    assert not missing, f"settings without a one-line doc: {missing}"


def test_list_settings_shows_section_default_and_description():
    text = describe_settings()
    lines = text.splitlines()
    assert [line for line in lines if not line.startswith(" ")] == [f"{s}:" for s in SECTIONS]
    rows = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert len(rows) == sum(len(fields(cls)) for cls in SECTIONS.values())
    assert rows["lr"].split()[:2] == ["lr", "0.0003"] and "peak learning rate" in rows["lr"]
    assert rows["dataset"].split()[:2] == ["dataset", "[]"]
    assert rows["lr_decay_style"].endswith("[constant | linear | cosine]")
    assert rows["save"].split()[1] == "None"
    # the section a setting belongs to is the header above it
    assert lines.index("parallel:") < lines.index(rows["tensor_model_parallel_size"])
    assert lines.index(rows["tensor_model_parallel_size"]) < lines.index("data:")
