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

    from seal.cli import admin, render

    out = io.StringIO()
    monkeypatch.setattr(render, "console", Console(file=out, width=400, color_system=None))
    assert admin.cmd_config(argparse.Namespace(action="show", json=False), Settings()) == 0
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


# --- the teacher policy's LoRA: the same model as the inner loop's, its own values --------------


def _bounds(cls: type[BaseModel], name: str) -> dict[str, object]:
    schema = cls.model_json_schema()["properties"][name]
    return {key: value for key, value in schema.items() if key not in ("default", "description", "title")}


def test_the_policy_lora_shares_the_inner_loops_fields_and_bounds() -> None:
    from seal.config import LoraAdapterSettings, LoraSettings, PolicyLoraSettings, RestemSettings

    assert issubclass(LoraSettings, LoraAdapterSettings) and issubclass(PolicyLoraSettings, LoraAdapterSettings)
    assert set(PolicyLoraSettings.model_fields) == set(LoraAdapterSettings.model_fields)
    for name in LoraAdapterSettings.model_fields:
        assert _bounds(PolicyLoraSettings, name) == _bounds(LoraSettings, name), name
    # Only the defaults differ: a gentler LoRA, longer examples (prompt plus self-edit).
    policy = PolicyLoraSettings()
    assert (policy.learning_rate, policy.epochs, policy.batch_size, policy.max_seq_len) == (3e-4, 3, 4, 1024)
    assert (policy.rank, policy.alpha, policy.dropout) == (16, 32, 0.0)
    assert not any(name.startswith("policy_") and name != "policy_adapter_name" for name in RestemSettings.model_fields)


def test_restem_policy_values_reach_the_policy_sft_config() -> None:
    from seal.rl.policy import policy_sft_config

    settings = Settings(restem={"policy": {"rank": 8, "alpha": 16, "target_modules": "q_proj,v_proj"}},
                        lora={"rank": 32, "target_modules": "all-linear", "grad_clip": 0.5})
    config = policy_sft_config(settings, 7)
    assert (config.rank, config.alpha, config.target_modules, config.seed) == (8, 16, "q_proj,v_proj", 7)
    # The rest are the policy's own defaults, not the inner loop's ([lora] is left alone).
    assert (config.learning_rate, config.epochs, config.batch_size, config.max_seq_len, config.grad_clip) == (
        3e-4, 3, 4, 1024, 1.0
    )
    assert config.rehearsal_ratio == 0 and config.kl_beta == 0 and not config.uses_anchors
    assert config.target_module_list() == ["q_proj", "v_proj"]


def test_the_policy_lora_is_read_from_the_environment(monkeypatch) -> None:
    from seal.rl.policy import policy_sft_config

    monkeypatch.delenv("SEAL_CONFIG_FILE", raising=False)
    monkeypatch.setenv("SEAL_RESTEM__POLICY__RANK", "8")
    monkeypatch.setenv("SEAL_RESTEM__POLICY__LEARNING_RATE", "1e-4")
    settings = Settings()
    assert (settings.restem.policy.rank, settings.restem.policy.epochs) == (8, 3)
    assert settings.lora.rank == 16
    assert (policy_sft_config(settings, 0).rank, policy_sft_config(settings, 0).learning_rate) == (8, 1e-4)
    sources = {name: source for name, _value, source, _description in settings_with_sources(settings)}
    assert (sources["restem.policy.rank"], sources["restem.policy.epochs"]) == ("env", "default")


def test_the_old_flat_policy_keys_are_refused_with_their_new_name(monkeypatch) -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"restem\.policy_rank is now restem\.policy\.rank"):
        Settings(restem={"policy_rank": 8})
    monkeypatch.delenv("SEAL_CONFIG_FILE", raising=False)
    monkeypatch.setenv("SEAL_RESTEM__POLICY_MAX_SEQ_LEN", "256")
    with pytest.raises(ValidationError, match="SEAL_RESTEM__POLICY__MAX_SEQ_LEN"):
        Settings()
    # The policy's lineage name is not a LoRA knob and keeps its place.
    monkeypatch.delenv("SEAL_RESTEM__POLICY_MAX_SEQ_LEN")
    assert Settings(restem={"policy_adapter_name": "p2"}).restem.policy_adapter_name == "p2"


def test_policy_lora_bounds_are_enforced() -> None:
    import pytest
    from pydantic import ValidationError

    for bad in ({"rank": 0}, {"rank": 257}, {"learning_rate": 0}, {"epochs": 101}, {"max_seq_len": 8193}):
        with pytest.raises(ValidationError):
            Settings(restem={"policy": bad})
