"""docs/config.md is generated from the config dataclasses and must match them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

from areal_hpc.config import Config
from areal_hpc.config.loader import all_keys
from areal_hpc.config.reference import COMMAND, render

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "config.md"


def test_docs_config_md_is_up_to_date() -> None:
    assert DOC.is_file(), f"docs/config.md is missing; generate it with: {COMMAND}"
    assert DOC.read_text(encoding="utf-8") == render(), (
        f"docs/config.md is stale (the config dataclasses changed); regenerate it with: {COMMAND}")


def test_every_key_has_help_and_appears_in_the_reference() -> None:
    text = render()
    for key in all_keys():
        assert f"**`{key}`**" in text, key
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        fields = dataclasses.fields(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else [f]
        for sf in fields:
            assert sf.metadata.get("help", "").strip(), f"{f.name}.{sf.name} has no help text"


def test_reference_runs_as_a_module() -> None:
    proc = subprocess.run([sys.executable, "-m", "areal_hpc.config.reference"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == render()
