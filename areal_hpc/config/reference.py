"""docs/config.md, generated from the config dataclasses: every key with its type, default, choices and help.

    python -m areal_hpc.config.reference > docs/config.md

The page is made only from the schema (the sections' docstrings, each field's ``help`` and ``choices``),
so it cannot drift from what the loader accepts; tests/test_config_reference.py fails when the checked-in
page differs from what this prints.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any

import yaml

from areal_hpc.config.loader import REMOVED, type_name
from areal_hpc.config.schema import Config

COMMAND = "python -m areal_hpc.config.reference > docs/config.md"

INTRO = f"""\
# Configuration reference

<!-- Generated from areal_hpc/config/*.py by `{COMMAND}`; do not edit by hand. -->

A run is configured by one YAML file (start from `configs/quickstart.yaml`, or `configs/gpu-synthetic.yaml`
on a GPU) and `section.key=value` overrides after it on the command line, e.g.
`areal-hpc train configs/quickstart.yaml trainer.lr=2e-5 rollout.eta=2`. Every key has a default, so a
file need only name what it changes. A key the schema does not know, a value of the wrong type or out
of range stops the run at start-up with one line naming the key and what to do. The run folder keeps
the resolved config as `config.yaml`.
"""


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _yaml(value: Any) -> str:
    """A value as it would be written in the YAML file."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("...").strip()


def _key_line(name: str, f: dataclasses.Field, tp: Any) -> str:
    line = f"- **`{name}`** ({type_name(tp)}, default `{_yaml(_default(f))}`"
    choices = f.metadata.get("choices")
    if choices:
        line += "; one of " + ", ".join(f"`{c}`" for c in choices)
    return line + f"): {f.metadata['help']}"


def render() -> str:
    """The whole page, as docs/config.md holds it."""
    hints = typing.get_type_hints(Config)
    top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(hints[f.name])]
    sections = [f for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])]
    out = [INTRO, "Sections: " + ", ".join(f"[`{f.name}`](#{f.name})" for f in sections) + ".", ""]
    out += ["## Top level", ""]
    out += [_key_line(f.metadata.get("yaml_key", f.name), f, hints[f.name]) for f in top]
    for f in sections:
        cls = hints[f.name]
        doc = " ".join((cls.__doc__ or "").split())
        out += ["", f"## {f.name}", "", f"{doc} (`{cls.__module__}.{cls.__name__}`)", ""]
        sub_hints = typing.get_type_hints(cls)
        out += [_key_line(f"{f.name}.{sf.metadata.get('yaml_key', sf.name)}", sf, sub_hints[sf.name])
                for sf in dataclasses.fields(cls)]
    out += ["", "## Removed keys", "",
            "An older config that still sets one of these stops with an unknown-key error; delete the line.", ""]
    out += [f"- `{key}`: {why}" for key, why in REMOVED.items()]
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
