"""docs/config.md lists exactly the keys of the config schema, section by section."""

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from auxloss.experiment.config import ExperimentConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def schema_sections() -> dict[str, set[str]]:
    """Section path (``data``, ``variants.taps.head``...) -> its keys, walking the pydantic models."""
    sections: dict[str, set[str]] = {}

    def walk(model: type[BaseModel], path: str) -> None:
        sections[path] = set(model.model_fields)
        for key, field in model.model_fields.items():
            candidates = [field.annotation, *typing.get_args(field.annotation)]
            for c in list(candidates):
                candidates += list(typing.get_args(c))
            for c in candidates:
                if isinstance(c, type) and issubclass(c, BaseModel):
                    walk(c, f"{path}.{key}" if path else key)
                    break

    walk(ExperimentConfig, "")
    return sections


def documented_sections() -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"^## (?:`(.+)`|\(top level\))$", line)
        if heading:
            current = heading.group(1) or ""
            sections[current] = set()
            continue
        row = re.match(r"^\| `([a-z_]+)` \|", line)
        if row and current is not None:
            sections[current].add(row.group(1))
    return sections


def test_every_schema_key_is_documented_and_nothing_else():
    assert documented_sections() == schema_sections()
