"""Secrets and personal data are never stored (issue 12, part 6).

When the secrets or personal-data guardrail fires on a self-edit, every record of it — the
append-only audit log (refusals and scored candidates), the reward log and the reward stream the
teacher's buffer reads — keeps the masked text and the sha256 of the original, never the value.
Checked on the bytes of every file under the service home after real RPCs, with an AWS-key-like
id, a PEM private key, an e-mail address and a phone number."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from seal.audit import AuditLog, stored_self_edit
from seal.config import Settings
from seal.guardrails import GuardrailSettings, check_self_edit, redact_sensitive
from seal.v1 import auditor_pb2, common_pb2, student_pb2
from student_and_auditor import student_and_auditor

PASSAGE = (
    "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by the "
    "cartographer Ilse Marrow. The town's lighthouse, the Grey Lantern, is 41 meters tall."
)
AWS_KEY = "AKIAQ7RZ3KXW5EXAMPLE"
# Key material (not a working key): what must not be kept is the body, not the header.
PEM_BODY = [
    "MIIEpAIBAAKCAQEAwq3Y8xZ0bT4h9LrVn2Qj5sKmP7dW1cXe6fGhJ0kLmN3oPqRs",
    "Tu4vWx5yZa6Bc7De8Fg9Hi0Jk1Lm2No3Pq4Rs5Tu6Vw7Xy8Za9Bc0De1Fg2Hi3Jk",
]
PEM = "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(PEM_BODY) + "\n-----END RSA PRIVATE KEY-----"
EMAIL = "ilse.marrow.private@velmora-mail.example"
PHONE = "+44 20 7946 0958"
SECRET_EDIT = f"Velmora was founded in 1742 by Ilse Marrow.\nThe harbour office key is {AWS_KEY}."
KEY_EDIT = f"The Grey Lantern is 41 meters tall.\n{PEM}\nIlse Marrow founded Velmora."
PERSONAL_EDIT = f"Ilse Marrow founded Velmora in 1742.\nWrite to {EMAIL} or call {PHONE}."
# What may never appear in any file: each secret, and the distinctive parts of the personal data.
NEVER_ON_DISK = [AWS_KEY, *PEM_BODY, EMAIL, "ilse.marrow.private", "7946 0958"]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- the rule itself -------------------------------------------------------------------------------


def test_redaction_masks_what_the_guardrails_find_and_keeps_the_rest() -> None:
    redaction = redact_sensitive(SECRET_EDIT + "\n" + PERSONAL_EDIT + "\n" + PEM, PASSAGE)
    assert redaction.rules == ("secrets", "personal_data")
    for value in NEVER_ON_DISK:
        assert value not in redaction.text, value
    # Masked forms a person can still recognise, and the text around them as written.
    assert "AKIA…(20 chars)" in redaction.text and "i***@velmora-mail.example" in redaction.text
    assert "private key block" in redaction.text and "Velmora was founded in 1742 by Ilse Marrow." in redaction.text
    clean = "Velmora was founded in 1742 by Ilse Marrow."
    assert redact_sensitive(clean, PASSAGE).text == clean and not redact_sensitive(clean, PASSAGE).redacted


def test_redaction_follows_the_rules_settings() -> None:
    """A rule switched off does not block, so it does not mask either: the record is what was trained."""
    off = GuardrailSettings(secrets={"enabled": False}, personal_data={"enabled": False})
    assert redact_sensitive(SECRET_EDIT, PASSAGE, off).text == SECRET_EDIT
    emails_only = GuardrailSettings(personal_data={"phones": False})
    assert PHONE in redact_sensitive(PERSONAL_EDIT, PASSAGE, emails_only).text


def test_the_private_key_finding_covers_the_key_material() -> None:
    """The header alone used to be the match, so masking it would have kept the key body."""
    [result] = [r for r in check_self_edit(KEY_EDIT, PASSAGE) if r.rule == "secrets"]
    assert not result.passed and "private key block" in result.detail
    assert all(line not in result.detail for line in PEM_BODY)
    headerless_end = "-----BEGIN PRIVATE KEY-----\n" + "\n".join(PEM_BODY)  # cut before its END line
    assert all(line not in redact_sensitive(headerless_end, "").text for line in PEM_BODY)


def test_stored_self_edit_keeps_the_hash_of_the_original() -> None:
    fields = stored_self_edit(SECRET_EDIT, f"prompt with {AWS_KEY}", context=PASSAGE, guardrails=GuardrailSettings())
    assert fields["self_edit_sha256"] == _sha256(SECRET_EDIT)
    assert AWS_KEY not in fields["self_edit"] and AWS_KEY not in fields["prompt"]
    assert fields["redacted_rules"] == ["secrets"]
    plain = stored_self_edit("plain text", "p", context=PASSAGE, guardrails=GuardrailSettings())
    assert plain["self_edit"] == "plain text" and "redacted_rules" not in plain


# --- the services ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    settings = Settings(
        home=tmp_path_factory.mktemp("secrets"),
        model={"path": str(tiny_model_dir)},
        lora={"epochs": 1, "batch_size": 4, "max_seq_len": 48, "rehearsal_ratio": 0, "kl_beta": 0},
        auditor={"answer_max_new_tokens": 4},
        retention={"enabled": False, "measure_kl": False},
        guardrails={"unknown_entities": {"enabled": False}},
    )
    with student_and_auditor(settings) as stack:
        yield stack


def _check(stack: dict[str, Any], self_edit: str, prompt: str = "self-edit prompt") -> auditor_pb2.CheckSelfEditResponse:
    return stack["auditor"].CheckSelfEdit(
        auditor_pb2.CheckSelfEditRequest(
            context=common_pb2.Context(title="Velmora", passage=PASSAGE), self_edit=self_edit, prompt=prompt,
            seed=5, request_id="secrets-test",
        ),
        timeout=60,
    )


@pytest.mark.parametrize(
    ("self_edit", "rule", "masked"),
    [
        (SECRET_EDIT, "secrets", "AKIA…(20 chars)"),
        (KEY_EDIT, "secrets", "private key block"),
        (PERSONAL_EDIT, "personal_data", "i***@velmora-mail.example"),
    ],
    ids=["aws-key", "private-key", "personal-data"],
)
def test_a_refused_self_edit_is_recorded_masked_with_its_hash(stack, self_edit: str, rule: str, masked: str) -> None:
    reply = _check(stack, self_edit, prompt=f"Write notes. (operator key {AWS_KEY})")
    assert not reply.passed and reply.audit_sequence
    assert any(r.gate == f"guardrail:{rule}" and not r.passed for r in reply.results)
    with AuditLog(stack["settings"].audit_log_path) as log:
        record = log.get(reply.audit_sequence)
        assert log.verify().ok
    payload = record.payload
    assert payload["stage"] == "guardrails" and rule in payload["failed_rules"]
    assert masked in payload["self_edit"] and rule in payload["redacted_rules"]
    assert payload["self_edit_sha256"] == _sha256(self_edit)
    stored = str(payload)
    for value in NEVER_ON_DISK:
        assert value not in stored, value
    # The rest of the text is kept: the record still explains what was refused.
    assert "Velmora" in payload["self_edit"] and "Write notes." in payload["prompt"]


def test_a_scored_candidate_and_its_reward_keep_no_secret(stack) -> None:
    """A caller may train and score a self-edit without asking CheckSelfEdit first (the student
    does not run guardrails): the candidate record, the reward log and the reward stream mask it."""
    stream = list(stack["student"].ApplySelfEdit(
        student_pb2.ApplySelfEditRequest(
            adapter_name="secrets", context=common_pb2.Context(title="Velmora", passage=PASSAGE),
            self_edit=SECRET_EDIT + "\n" + PERSONAL_EDIT, seed=3,
        ),
        timeout=600,
    ))
    adapter_id = stream[-1].candidate.adapter_id
    assert adapter_id
    scored = stack["auditor"].Score(
        auditor_pb2.ScoreRequest(
            adapter_id=adapter_id, context=common_pb2.Context(title="Velmora", passage=PASSAGE),
            questions=[common_pb2.Question(question="Who founded Velmora?", answer="Ilse Marrow")],
            self_edit=SECRET_EDIT + "\n" + PERSONAL_EDIT, prompt="prompt", seed=3, skip_retention=True,
        ),
        timeout=600,
    )
    with AuditLog(stack["settings"].audit_log_path) as log:
        candidate = log.get(scored.audit_sequence).payload
        assert log.verify().ok
    assert candidate["self_edit_sha256"] == _sha256(SECRET_EDIT + "\n" + PERSONAL_EDIT)
    assert candidate["self_edit_matches_manifest"]  # the hash still ties the record to its adapter
    assert candidate["redacted_rules"] == ["personal_data", "secrets"]
    events = stack["auditor"].SubscribeRewards(auditor_pb2.SubscribeRewardsRequest(after_sequence=0), timeout=5)
    streamed = []
    with pytest.raises(grpc.RpcError):  # the stream follows until its deadline
        for reply in events:
            streamed.append(reply.event)
    [event] = [e for e in streamed if e.sequence == scored.reward_sequence]
    for value in NEVER_ON_DISK:
        assert value not in str(candidate) and value not in event.self_edit, value
    assert "AKIA…(20 chars)" in event.self_edit


def test_no_raw_secret_anywhere_under_the_service_home(stack) -> None:
    """After every RPC above: the bytes of every file the services wrote (audit log and its WAL,
    reward log, outbox, registry, manifests, caches) hold none of the values."""
    for self_edit in (SECRET_EDIT, KEY_EDIT, PERSONAL_EDIT):
        _check(stack, self_edit)
    home = stack["settings"].home
    files = [path for path in home.rglob("*") if path.is_file()]
    assert any(path.name.startswith("audit.db") for path in files)
    for path in files:
        data = path.read_bytes()
        for value in NEVER_ON_DISK:
            assert value.encode() not in data, f"{value!r} found in {path}"
