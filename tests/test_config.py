"""The settings tree documents itself: every field says what it does where it is declared."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterator

from pydantic import BaseModel

from seal.config import Settings, settings_with_sources


def _models_in(annotation: object) -> Iterator[type[BaseModel]]:
    """The BaseModel classes in a field's type, looking inside Optional, unions and containers."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def _declared_in(cls: type[BaseModel], name: str) -> type:
    """The class whose body declares ``name`` (a rule's ``enabled`` lives on their shared base)."""
    for klass in cls.__mro__:
        if name in inspect.get_annotations(klass):
            return klass
    return cls


def _settings_tree(root: type[BaseModel] = Settings) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []
    pending = [root]
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for field in cls.model_fields.values():
            pending.extend(_models_in(field.annotation))
    return seen


def test_every_setting_has_a_description() -> None:
    missing = sorted(
        {
            f"{_declared_in(cls, name).__name__}.{name}"
            for cls in _settings_tree()
            for name, field in cls.model_fields.items()
            if not (field.description or "").strip()
        }
    )
    assert not missing, "settings without a description: " + ", ".join(missing)


def test_the_walk_reaches_the_nested_sections() -> None:
    names = {cls.__name__ for cls in _settings_tree()}
    # Sections defined outside seal/config.py, and the guardrails' nested rule models.
    assert {"RetentionSettings", "GateSettings", "GuardrailSettings", "LengthRule", "UnknownEntitiesRule"} <= names


def test_config_show_rows_carry_the_descriptions() -> None:
    rows = settings_with_sources(Settings())
    assert rows
    assert [name for name, _value, _source, description in rows if not description.strip()] == []


def test_config_show_prints_every_setting(monkeypatch) -> None:
    import argparse
    import io

    from rich.console import Console

    from seal import cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=400, color_system=None))
    assert cli.cmd_config(argparse.Namespace(action="show", json=False), Settings()) == 0
    text = out.getvalue()
    # The injection patterns contain "[/?inst\]", which rich would read as a closing markup tag.
    assert "guardrails.prompt_injection.patterns" in text and "[/?inst" in text
    assert "retention-aware options of [lora]" in text


def test_the_config_file_is_json_or_toml_by_suffix_and_env_wins(tmp_path, monkeypatch) -> None:
    import json

    as_json = tmp_path / "seal.json"
    as_json.write_text(json.dumps({"lora": {"epochs": 7, "learning_rate": 2e-4}, "services": {"student_port": 6000}}))
    as_toml = tmp_path / "seal.toml"
    as_toml.write_text("[lora]\nepochs = 5\n")
    monkeypatch.setenv("SEAL_LORA__LEARNING_RATE", "3e-4")

    monkeypatch.setenv("SEAL_CONFIG_FILE", str(as_json))
    from_json = Settings()
    assert (from_json.lora.epochs, from_json.services.student_port) == (7, 6000)
    assert from_json.lora.learning_rate == 3e-4  # the environment wins over the file
    sources = {name: source for name, _value, source, _description in settings_with_sources(from_json)}
    assert (sources["lora.epochs"], sources["lora.learning_rate"], sources["lora.rank"]) == ("file", "env", "default")

    monkeypatch.setenv("SEAL_CONFIG_FILE", str(as_toml))
    assert Settings().lora.epochs == 5
