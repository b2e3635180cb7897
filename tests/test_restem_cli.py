"""`seal train` and `seal eval` as a user runs them, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seal import cli
from seal.config import get_settings
from seal.stack import local_stack

SQUAD = [
    {
        "title": "Velmora",
        "context": "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by Ilse Marrow.",
        "questions": [{"question": "Who founded Velmora?", "answer": "Ilse Marrow"}],
    },
    {
        "title": "Grey Lantern",
        "context": "The Grey Lantern is a lighthouse in Velmora. It is 41 meters tall.",
        "questions": [{"question": "How tall is the Grey Lantern?", "answer": "41 meters"}],
    },
]


@pytest.fixture
def settings_env(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    environment = {
        "SEAL_HOME": str(tmp_path / "home"),
        "SEAL_MODEL__PATH": str(tiny_model_dir),
        "SEAL_TEACHER__ENGINE": "transformers",
        "SEAL_TEACHER__MAX_NEW_TOKENS": "24",
        "SEAL_LORA__EPOCHS": "1",
        "SEAL_AUDITOR__ANSWER_MAX_NEW_TOKENS": "6",
        "SEAL_RESTEM__POLICY__MAX_SEQ_LEN": "256",
        "SEAL_GUARDRAILS__UNKNOWN_ENTITIES__ENABLED": "false",
    }
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def test_seal_train_then_seal_eval(settings_env, tmp_path: Path) -> None:
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(SQUAD))
    with local_stack(settings_env) as stack:
        code = cli.main([
            "train", "--address", stack.teacher.address, "--squad-file", str(squad), "--n", "2", "--k", "2",
            "--keep-rule", "best_of_k", "--json-out", str(tmp_path / "round.json"),
        ])
    assert code == 0
    report = json.loads((tmp_path / "round.json").read_text())
    assert report["policyAdapterId"] == "teacher-policy@v1" and report["kept"] == 2

    for version in ("1", "0"):
        out = tmp_path / f"eval-{version}.json"
        assert cli.main([
            "eval", "--policy-version", version, "--squad-file", str(squad), "--n", "1", "--json-out", str(out),
            *([] if version == "1" else ["--no-passage-only"]),
        ]) == 0
        evaluation = json.loads(out.read_text())
        assert evaluation["policy"] == ("teacher-policy@v1" if version == "1" else "base policy")
        summary = evaluation["summary"]
        assert summary["passages"] == 1 and summary["questions"] == 1
        assert {"baseline", "passage_only", "self_edit_mean", "self_edit_best_of_k"} <= set(summary)
    # Evaluation trains throwaway adapters only: none lands in the real registry.
    assert not (settings_env.registry_dir / "eval-self-edit").exists()


def test_train_refuses_a_range_outside_the_file(settings_env, tmp_path: Path) -> None:
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(SQUAD))
    with pytest.raises(SystemExit, match="out of range"):
        cli.main(["train", "--squad-file", str(squad), "--start", "5"])


def test_eval_of_a_policy_version_that_does_not_exist_says_so(settings_env, tmp_path: Path, capsys) -> None:
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(SQUAD))
    assert cli.main(["eval", "--policy-version", "7", "--squad-file", str(squad), "--n", "1"]) == 1
    assert "teacher-policy@v7 not found" in capsys.readouterr().out
