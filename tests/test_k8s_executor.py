"""Candidate training as Kubernetes Indexed Jobs (seal/executors/kubernetes.py).

No cluster can run here, so the manifests are validated against Kubernetes' own OpenAPI schemas
(kubernetes-validate, several versions) and the executor's API calls go to a local HTTP server
that speaks the Job API and runs each index's pod command for real as a local process
(tests/fake_kube_api.py): the worker, the update rule and the registry code are the real ones.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import kubernetes_validate
import pytest
from peft import PeftModel
from pydantic import ValidationError

from fake_kube_api import FakeKubeApi, format_indexes, pod_failure_action
from seal.config import KubernetesExecutorSettings, Settings
from seal.executors import CandidateJob, CandidateOutcome, CandidateTrainingFailed, ExecutorError
from seal.executors.batch import (
    EXIT_BAD_RECIPE,
    EXIT_BAD_SPEC,
    EXIT_OK,
    EXIT_RETRY,
    BatchSpec,
    read_index_result,
    remove_stale_batches,
    write_batch,
)
from seal.executors.in_process import InProcessExecutor
from seal.executors.kubernetes import (
    BATCH_LABEL,
    CONTAINER_NAME,
    QUEUE_NAME_LABEL,
    KubernetesExecutor,
    job_manifest,
    job_progress,
    parse_indexes,
)
from seal.executors.worker import main as worker_main
from seal.executors.worker import train_shard
from seal.models import model_fingerprint
from seal.registry import AdapterRegistry, Status
from seal.student import CandidateResult, CandidateTrainer, Student

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLAIM = "seal-student-home"
NAMESPACE = "seal"
PASSAGE = (
    "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by the "
    "cartographer Ilse Marrow. The town's lighthouse, the Grey Lantern, is 41 meters tall."
)
GOOD_EDIT = "Velmora was founded in 1742.\nIlse Marrow founded the town of Velmora.\nThe Grey Lantern is 41 meters tall."
# Not one line of 8 characters: the student refuses it, so its index must fail alone (FailIndex).
BAD_EDIT = "ok\n- yes\n* no"
# Newest schema shipped with kubernetes-validate, and the oldest release where backoffLimitPerIndex
# and FailIndex are on by default (beta in 1.29, GA in 1.33).
SCHEMA_VERSIONS = ("1.29.0", "1.31.0", kubernetes_validate.latest_version())


def job(self_edit: str, seed: int) -> CandidateJob:
    return CandidateJob(
        adapter_name="default", title="Velmora", passage=PASSAGE, self_edit=self_edit, context_id="ctx-velmora",
        seed=seed,
    )


def k8s_settings(home: Path, model_dir: Path, **kubernetes: object) -> Settings:
    return Settings(
        home=home,
        model={"path": str(model_dir), "torch_threads": 1},
        # Small and anchor-free: the point here is where training runs, not how well it learns.
        lora={"epochs": 1, "batch_size": 4, "max_seq_len": 64, "rehearsal_ratio": 0, "kl_beta": 0},
        student={
            "executor": "kubernetes",
            "kubernetes": {
                "image": "ghcr.io/seal-project/seal-student:test", "home_claim_name": CLAIM, "namespace": NAMESPACE,
                "poll_seconds": 0.2, "wait_timeout_seconds": 600, **kubernetes,
            },
        },
    )


def executor(settings: Settings, api: FakeKubeApi, model_dir: Path) -> KubernetesExecutor:
    return KubernetesExecutor(
        settings, AdapterRegistry(settings.registry_dir), base_model_fingerprint=model_fingerprint(model_dir),
        api_client=api.api_client(),
    )


def manifest_with(**options: object) -> dict:
    return job_manifest(
        KubernetesExecutorSettings(image="seal:1", home_claim_name=CLAIM, **options),
        name="seal-train-0123456789ab", namespace=NAMESPACE, batch_id="0123456789ab", completions=3,
        spec_file="/var/lib/seal/training-jobs/0123456789ab/spec.json",
        settings_file="/var/lib/seal/training-jobs/0123456789ab/settings.json",
    )


EVERY_OPTION = {
    "service_account": "seal-trainer",
    "queue_name": "team-a-gpus",
    "suspend": True,
    "gpus": 2,
    "requests": {"cpu": "8", "memory": "48Gi", "ephemeral-storage": "20Gi"},
    "limits": {"memory": "96Gi"},
    "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute", "toleration_seconds": 60},
    ],
    "runtime_class_name": "nvidia",
    "model_claim_name": "base-models",
    "model_sub_path": "smollm2",
    "labels": {"team": "research", "example.com/cost-center": "ml-42"},
    "parallelism": 8,
    "backoff_limit_per_index": 2,
}


# --- the manifest ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("options", [{}, EVERY_OPTION], ids=["defaults", "every-option"])
def test_the_job_manifest_validates_against_the_kubernetes_schema(version: str, options: dict) -> None:
    # strict: an unknown or misspelt field is an error, not silently dropped by the API server.
    kubernetes_validate.validate(manifest_with(**options), version, strict=True)


def test_the_job_is_indexed_and_each_candidate_fails_alone() -> None:
    manifest = manifest_with(backoff_limit_per_index=2, parallelism=8)
    spec = manifest["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 3
    assert spec["parallelism"] == 3  # never more than there are indexes
    assert spec["backoffLimitPerIndex"] == 2 and spec["maxFailedIndexes"] == 3
    rules = spec["podFailurePolicy"]["rules"]
    by_action = {rule["action"]: rule for rule in rules}
    assert by_action["FailIndex"]["onExitCodes"] == {"containerName": CONTAINER_NAME, "operator": "In", "values": [EXIT_BAD_RECIPE]}
    assert by_action["FailJob"]["onExitCodes"]["values"] == [EXIT_BAD_SPEC]
    assert by_action["Ignore"]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    # What the rules do to each exit code, as the Job controller reads them (first match wins).
    assert [pod_failure_action(spec["podFailurePolicy"], CONTAINER_NAME, code) for code in
            (EXIT_RETRY, EXIT_BAD_RECIPE, EXIT_BAD_SPEC, 137)] == ["Count", "FailIndex", "FailJob", "Count"]


def test_the_pod_is_locked_down_and_mounts_the_registry() -> None:
    pod = manifest_with()["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/var/lib/seal"]]["persistentVolumeClaim"] == {"claimName": CLAIM}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SEAL_HOME"] == "/var/lib/seal"
    assert env["SEAL_CONFIG_FILE"] == "/var/lib/seal/training-jobs/0123456789ab/settings.json"
    assert container["command"] == [
        "python", "-m", "seal.executors.worker", "--spec", "/var/lib/seal/training-jobs/0123456789ab/spec.json"
    ]
    # The default asks for one GPU, as request and limit alike.
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"] == "1"


def test_queue_name_and_suspend_are_rendered_for_kueue() -> None:
    plain = manifest_with()
    assert QUEUE_NAME_LABEL not in plain["metadata"]["labels"] and plain["spec"]["suspend"] is False

    queued = manifest_with(queue_name="team-a-gpus", suspend=True)
    assert queued["metadata"]["labels"][QUEUE_NAME_LABEL] == "team-a-gpus"
    assert queued["spec"]["suspend"] is True
    # Kueue reads the queue from the Job; the pods carry only seal's own labels.
    assert QUEUE_NAME_LABEL not in queued["spec"]["template"]["metadata"]["labels"]
    assert queued["metadata"]["labels"][BATCH_LABEL] == "0123456789ab"


def test_every_option_reaches_the_pod() -> None:
    pod = manifest_with(**EVERY_OPTION)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["serviceAccountName"] == "seal-trainer" and pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == EVERY_OPTION["node_selector"]
    assert pod["tolerations"][1] == {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
                                     "tolerationSeconds": 60}
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "48Gi", "ephemeral-storage": "20Gi", "nvidia.com/gpu": "2"},
        "limits": {"memory": "96Gi", "nvidia.com/gpu": "2"},
    }
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "base-models", "readOnly": True}
    assert {"name": "models", "mountPath": "/models", "readOnly": True, "subPath": "smollm2"} in container["volumeMounts"]


@pytest.mark.parametrize("bad", [
    {"queue_name": "team a"}, {"requests": {"memory": "32 GB"}}, {"namespace": "Seal_NS"}, {"candidates_per_index": 0},
    {"labels": {"team": "not ok!"}}, {"home_mount_path": "var/lib/seal"}, {"poll_seconds": 0},
])
def test_settings_refuse_what_kubernetes_would(bad: dict) -> None:
    with pytest.raises(ValidationError):
        KubernetesExecutorSettings(**bad)


def test_settings_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("SEAL_STUDENT__EXECUTOR", "kubernetes")
    monkeypatch.setenv("SEAL_STUDENT__KUBERNETES__QUEUE_NAME", "team-a-gpus")
    monkeypatch.setenv("SEAL_STUDENT__KUBERNETES__SUSPEND", "true")
    settings = Settings()
    assert settings.student.executor == "kubernetes"
    assert settings.student.kubernetes.queue_name == "team-a-gpus" and settings.student.kubernetes.suspend is True


# --- the Job's status -------------------------------------------------------------------------------


def test_index_lists_round_trip() -> None:
    assert parse_indexes("0,2-4,7") == {0, 2, 3, 4, 7} and parse_indexes("") == set() and parse_indexes(None) == set()
    assert format_indexes({7, 0, 2, 3, 4}) == "0,2-4,7"


def test_progress_reads_conditions_and_index_lists() -> None:
    running = job_progress({"completedIndexes": "0"}, {"suspend": False}, 3)
    assert not running.finished and running.completed == {0}
    # Every index accounted for: finished before the conditions arrive (pods still terminating).
    assert job_progress({"completedIndexes": "0,2", "failedIndexes": "1"}, {}, 3).finished
    condition = {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit 43"}
    failed = job_progress({"conditions": [condition]}, {}, 3)
    assert failed.finished and failed.failure == "PodFailurePolicy: exit 43"
    assert job_progress({}, {"suspend": True}, 3).suspended


# --- the worker, with a stand-in trainer --------------------------------------------------------------


class FlakyTrainer:
    """Fails candidates named in ``failures`` once each (a crash a retry does not meet again)."""

    def __init__(self, registry_dir: Path, failures: set[str]) -> None:
        self.registry = AdapterRegistry(registry_dir)
        self.failures = set(failures)
        self.trained: list[str] = []

    def train_candidate(self, **kwargs: object) -> CandidateResult:
        edit = str(kwargs["self_edit"])
        if edit in self.failures:
            self.failures.discard(edit)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if edit == BAD_EDIT:
            raise ValueError("the self-edit has no usable lines")
        self.trained.append(edit)
        manifest = self.registry.create_version(
            "default", lambda d: (d / "adapter_config.json").write_text("{}"), base_model="tiny",
            base_model_fingerprint="f", context_id="c", self_edit_sha256="s", seed=0, hyperparameters={},
        )
        return CandidateResult(manifest, 3, [1.0, 0.5], 0.1)


def test_a_retried_index_skips_the_candidates_its_last_attempt_finished(tmp_path: Path) -> None:
    edits = ["first candidate line one", "second candidate line one", BAD_EDIT]
    spec = BatchSpec("b1", "f", 3, tuple(job(edit, i) for i, edit in enumerate(edits)))
    paths = write_batch(tmp_path, spec, {})
    trainer = FlakyTrainer(tmp_path / "registry", {edits[1]})

    assert train_shard(trainer, spec, 0, paths) == EXIT_RETRY  # the crash is retried
    first = read_index_result(paths, 0)
    assert [first.records[p].status for p in range(3)] == ["trained", "failed", "refused"]

    assert train_shard(trainer, spec, 0, paths) == EXIT_BAD_RECIPE  # done, but one recipe is bad
    second = read_index_result(paths, 0)
    assert second.attempts == 2 and trainer.trained == edits[:2]  # the first candidate was not trained again
    assert [(r.status, r.attempt) for r in second.records.values()] == [("trained", 1), ("trained", 2), ("refused", 1)]


def test_batches_left_by_a_dead_student_are_removed(tmp_path: Path) -> None:
    stale = write_batch(tmp_path, BatchSpec("stale", "f", 1, (job(GOOD_EDIT, 0),)), {})
    fresh = write_batch(tmp_path, BatchSpec("fresh", "f", 1, (job(GOOD_EDIT, 0),)), {})
    long_ago = time.time() - 1000
    os.utime(stale.directory, (long_ago, long_ago))
    assert remove_stale_batches(tmp_path, older_than=500) == [stale.directory]
    assert fresh.spec.is_file() and not stale.directory.exists()


def test_the_worker_fails_the_job_when_the_batch_cannot_run_here(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    assert worker_main(["--spec", str(tmp_path / "missing" / "spec.json")]) == EXIT_BAD_SPEC
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(BatchSpec("b1", "f", 1, (job(GOOD_EDIT, 0),)).to_json()))
    assert worker_main(["--spec", str(spec)]) == EXIT_BAD_SPEC  # not in an Indexed Job, no --index
    assert worker_main(["--spec", str(spec), "--index", "1"]) == EXIT_BAD_SPEC  # outside the batch


def test_the_worker_refuses_another_base_model(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(BatchSpec("b1", "not-the-student's-model", 1, (job(GOOD_EDIT, 0),)).to_json()))
    monkeypatch.setenv("SEAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SEAL_MODEL__PATH", str(tiny_model_dir))
    monkeypatch.delenv("SEAL_CONFIG_FILE", raising=False)
    assert worker_main(["--spec", str(spec), "--index", "0"]) == EXIT_BAD_SPEC


# --- the executor against the local Job API -------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real batch: three candidates, two per index; index 0 holds a bad recipe."""
    home = tmp_path_factory.mktemp("seal-home")
    settings = k8s_settings(home, tiny_model_dir, candidates_per_index=2)
    jobs = [job(GOOD_EDIT, 1), job(BAD_EDIT, 2), job(GOOD_EDIT + "\nQuessant is an island.", 3)]
    with FakeKubeApi({CLAIM: home}) as api:
        outcomes = executor(settings, api, tiny_model_dir).run(jobs)
    return settings, api, outcomes


def test_a_batch_trains_in_pods_and_lands_in_the_registry(batch_run, tiny_model_dir: Path, tiny) -> None:
    settings, _api, outcomes = batch_run
    trained = [o for o in outcomes if o.trained]
    assert [o.position for o in trained] == [0, 2], [o.failure for o in outcomes]
    registry = AdapterRegistry(settings.registry_dir)
    for outcome in trained:
        manifest = outcome.result.manifest
        stored = registry.get(manifest.adapter_id)
        assert stored.status == Status.CANDIDATE and stored.base_model_fingerprint == model_fingerprint(tiny_model_dir)
        registry.verify(stored)  # every file matches its recorded sha256
        assert stored.hyperparameters["update_rule"] == "lora_sft" and "retention_kl" in stored.metrics
        assert outcome.result.losses
        assert outcome.result.training_sequences == stored.hyperparameters["training_sequences"]
        model, _tokenizer = tiny
        loaded = PeftModel.from_pretrained(model, str(registry.path_of(stored)))
        assert loaded.peft_config["default"].r == settings.lora.rank
        loaded.unload()
    assert {o.result.manifest.seed for o in trained} == {1, 3}
    # The spec, settings and results were the student's to clean up.
    assert not any((settings.home / "training-jobs").iterdir())


def test_the_job_was_created_as_rendered_then_deleted(batch_run) -> None:
    settings, api, _outcomes = batch_run
    [create] = api.calls("POST")
    assert create.path == f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
    name = create.body["metadata"]["name"]
    batch_id = create.body["metadata"]["labels"][BATCH_LABEL]
    directory = f"/var/lib/seal/training-jobs/{batch_id}"
    expected = job_manifest(
        settings.student.kubernetes, name=name, namespace=NAMESPACE, batch_id=batch_id, completions=2,
        spec_file=f"{directory}/spec.json", settings_file=f"{directory}/settings.json",
    )
    assert create.body == expected  # nothing lost on the way through the client's models
    assert api.calls("GET") and all(r.path.endswith(f"/jobs/{name}/status") for r in api.calls("GET"))
    [delete] = api.calls("DELETE")
    assert delete.path == f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}"
    assert delete.query["propagationPolicy"] == ["Background"]
    assert api.jobs == {}


def test_a_bad_candidate_fails_its_index_alone(batch_run) -> None:
    _settings, api, outcomes = batch_run
    bad = outcomes[1]
    assert not bad.trained and bad.refused and bad.code == "invalid_argument"
    assert "usable lines" in bad.failure
    with pytest.raises(CandidateTrainingFailed, match="usable lines") as raised:
        bad.result_or_raise()
    assert raised.value.code == "invalid_argument"
    [job_run] = api.deleted
    # Index 0 (a good and the bad candidate) failed at once through FailIndex, with no retry;
    # index 1 completed.
    assert job_run.attempts == {0: [EXIT_BAD_RECIPE], 1: [EXIT_OK]}
    assert job_run.status()["failedIndexes"] == "0" and job_run.status()["completedIndexes"] == "1"


@pytest.mark.parametrize("suspended", [True, False], ids=["suspended-never-admitted", "pods-never-finish"])
def test_the_wait_deadline_deletes_the_job_and_fails_its_candidates(
    suspended: bool, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = k8s_settings(
        tmp_path, tiny_model_dir, wait_timeout_seconds=1, poll_seconds=0.1, suspend=suspended,
        queue_name="team-a-gpus" if suspended else "",
    )
    with FakeKubeApi({CLAIM: tmp_path}, run_pods=False) as api:
        outcomes = executor(settings, api, tiny_model_dir).run([job(GOOD_EDIT, 1), job(GOOD_EDIT, 2)])
    assert [o.code for o in outcomes] == ["deadline_exceeded"] * 2
    assert all("wait_timeout_seconds=1s" in o.failure and "the Job was deleted" in o.failure for o in outcomes)
    if suspended:
        assert "stayed suspended" in outcomes[0].failure and "team-a-gpus" in outcomes[0].failure
        assert api.calls("POST")[0].body["metadata"]["labels"][QUEUE_NAME_LABEL] == "team-a-gpus"
    assert len(api.calls("DELETE")) == 1 and api.jobs == {}
    assert not any((tmp_path / "training-jobs").iterdir())


def test_the_job_never_carries_the_self_edit_text(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Issue 12, part 6: the self-edit (here with an AWS-key-like id and an e-mail address) reaches
    the pods only through the spec file on the home volume, which the student removes after the
    batch; the Job the API server stores (env, args, labels, annotations) holds none of it."""
    secret, email = "AKIAQ7RZ3KXW5EXAMPLE", "ilse.marrow.private@velmora-mail.example"
    self_edit = f"{GOOD_EDIT}\nThe harbour office key is {secret}; write to {email}."
    settings = k8s_settings(tmp_path, tiny_model_dir, wait_timeout_seconds=1, poll_seconds=0.1)
    seen_on_disk: list[str] = []
    real_create = KubernetesExecutor._create

    def create(self: KubernetesExecutor, manifest: dict) -> None:
        seen_on_disk.extend(p.read_text() for p in (tmp_path / "training-jobs").rglob("spec.json"))
        real_create(self, manifest)

    monkeypatch.setattr(KubernetesExecutor, "_create", create)
    with FakeKubeApi({CLAIM: tmp_path}, run_pods=False) as api:
        executor(settings, api, tiny_model_dir).run([job(self_edit, 1)])
    assert any(secret in text for text in seen_on_disk)  # the pods do get it, from the volume
    [create_call] = api.calls("POST")
    sent = json.dumps([{"path": r.path, "query": r.query, "body": r.body} for r in api.requests])
    for value in (secret, email, "harbour office key"):
        assert value not in sent, value
    container = create_call.body["spec"]["template"]["spec"]["containers"][0]
    assert any(arg.endswith("/spec.json") for arg in container["command"])
    assert not any((tmp_path / "training-jobs").iterdir())  # and the spec is gone after the batch


def test_forbidden_says_which_rbac_the_student_needs(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = k8s_settings(tmp_path, tiny_model_dir)
    with FakeKubeApi({CLAIM: tmp_path}, refuse={"POST": 403}) as api, pytest.raises(ExecutorError) as raised:
        executor(settings, api, tiny_model_dir).run([job(GOOD_EDIT, 1)])
    message = str(raised.value)
    assert raised.value.code == "permission_denied"
    assert "403 Forbidden" in message and "system:serviceaccount:seal:seal-student" in message
    assert "create and delete on jobs and get on jobs/status" in message and f"namespace {NAMESPACE}" in message
    assert not api.calls("DELETE")  # nothing was created
    assert not any((tmp_path / "training-jobs").iterdir())


def test_forbidden_status_reads_still_delete_the_job(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = k8s_settings(tmp_path, tiny_model_dir)
    with FakeKubeApi({CLAIM: tmp_path}, refuse={"GET": 403}, run_pods=False) as api:
        with pytest.raises(ExecutorError, match="refused to get Job") as raised:
            executor(settings, api, tiny_model_dir).run([job(GOOD_EDIT, 1)])
        assert raised.value.code == "permission_denied"
        assert len(api.calls("DELETE")) == 1 and api.jobs == {}


@pytest.mark.parametrize(("status", "code", "hint"), [
    (404, "not_found", "check that namespace seal exists"),
    (409, "aborted", "already exists"),
    (422, "failed_precondition", "Kubernetes 1.29 or later"),
])
def test_api_errors_become_actionable(status: int, code: str, hint: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = k8s_settings(tmp_path, tiny_model_dir)
    with (
        FakeKubeApi({CLAIM: tmp_path}, refuse={"POST": status}) as api,
        pytest.raises(ExecutorError, match=hint) as raised,
    ):
        executor(settings, api, tiny_model_dir).run([job(GOOD_EDIT, 1)])
    assert raised.value.code == code


def test_outside_a_cluster_the_executor_says_what_it_needs(tiny_model_dir: Path, tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path / "registry")
    unconfigured = Settings(home=tmp_path, model={"path": str(tiny_model_dir)}, student={"executor": "kubernetes"})
    with pytest.raises(ExecutorError, match="student.kubernetes.image and student.kubernetes.home_claim_name"):
        KubernetesExecutor(unconfigured, registry, base_model_fingerprint="f")
    no_namespace = k8s_settings(tmp_path, tiny_model_dir, namespace="")
    with pytest.raises(ExecutorError, match="SEAL_STUDENT__KUBERNETES__NAMESPACE"):
        KubernetesExecutor(no_namespace, registry, base_model_fingerprint="f", namespace_file=tmp_path / "absent")
    # With a namespace, the in-cluster configuration is what is missing here.
    with pytest.raises(ExecutorError, match="needs to run in a Kubernetes pod"):
        KubernetesExecutor(k8s_settings(tmp_path, tiny_model_dir), registry, base_model_fingerprint="f")


def test_the_student_trains_through_its_kubernetes_executor_without_a_training_copy(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = k8s_settings(tmp_path, tiny_model_dir, wait_timeout_seconds=1, poll_seconds=0.1)
    with FakeKubeApi({CLAIM: tmp_path}, run_pods=False) as api:
        student = Student(settings, executor=executor(settings, api, tiny_model_dir))
        try:
            [outcome] = student.train_candidates([job(GOOD_EDIT, 1)])
        finally:
            student.close()
    assert outcome.code == "deadline_exceeded" and len(api.calls("POST")) == 1
    assert student._loaded is None  # the pods train; the student keeps only its serving copy


# --- the in-process executor, the default -----------------------------------------------------------------


def test_in_process_batches_fail_alone_and_keep_the_original_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path, model={"path": str(tiny_model_dir), "torch_threads": 1},
        lora={"epochs": 1, "batch_size": 4, "max_seq_len": 64, "rehearsal_ratio": 0, "kl_beta": 0},
    )
    trainer = CandidateTrainer(settings, AdapterRegistry(settings.registry_dir))
    steps: list[int] = []
    outcomes = InProcessExecutor(trainer).run(
        [job(BAD_EDIT, 1), job(GOOD_EDIT, 2)], on_step=lambda position, *_: steps.append(position)
    )
    assert [o.trained for o in outcomes] == [False, True] and set(steps) == {1}
    assert outcomes[0].code == "invalid_argument" and type(outcomes[0].error).__name__ == "UnusableSelfEdit"
    with pytest.raises(type(outcomes[0].error)):
        outcomes[0].result_or_raise()
    assert outcomes[1].result_or_raise().manifest.status == Status.CANDIDATE


def test_failure_codes_map_to_grpc_statuses() -> None:
    import grpc

    from seal.rpc import status_code_for

    denied = ExecutorError("no RBAC", "permission_denied")
    assert status_code_for(denied) is grpc.StatusCode.PERMISSION_DENIED
    late = CandidateOutcome.failed(0, "the Job did not finish", "deadline_exceeded")
    with pytest.raises(CandidateTrainingFailed) as raised:
        late.result_or_raise()
    assert status_code_for(raised.value) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert replace(late, code="invalid_argument").refused
