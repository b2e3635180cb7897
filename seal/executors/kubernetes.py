"""Candidate training scaled out as Kubernetes Indexed Jobs (``student.executor = "kubernetes"``).

Design. A batch of N candidates becomes one ``batch/v1`` Job in Indexed completion mode with
ceil(N / ``candidates_per_index``) completions. Before creating it, the student writes the batch
spec (the candidates' self-edits and update overrides) and a snapshot of its own settings into
its home volume (seal.executors.batch). Every pod mounts that volume as its ``SEAL_HOME``, reads
the spec, takes the shard of ``JOB_COMPLETION_INDEX``, loads the base model once and trains its
candidates with the class the student trains with in process (seal.student.CandidateTrainer),
saving each through the registry's own atomic, checksummed, flock-guarded code. The student
polls the Job's status until a Complete or Failed condition (or until every index is listed in
``completedIndexes``/``failedIndexes``), up to ``wait_timeout_seconds``; then it reads the
per-index result files, loads and re-verifies each new adapter's checksums from the registry,
and deletes the Job (propagation Background, which also removes its pods). A candidate that
fails fails alone: ``backoffLimitPerIndex`` retries only the index that crashed, a retried pod
skips the candidates its earlier attempt finished, ``maxFailedIndexes`` equals the completions so
no number of failed indexes stops the others, and the ``podFailurePolicy`` maps the worker's exit
codes: 42 (a candidate's recipe is unusable) → FailIndex, 43 (the batch cannot run in this
image) → FailJob, and a DisruptionTarget condition (preemption, eviction, node drain) → Ignore,
so a disruption costs no retry. Kueue needs nothing of ours: with ``queue_name`` set the Job
carries the ``kueue.x-k8s.io/queue-name`` label and, with ``suspend``, is created suspended;
Kueue admits it by unsuspending it when the ClusterQueue's GPU quota and fair sharing allow.
On the wait deadline, or when the caller leaves, the Job is deleted and every unfinished
candidate fails with that reason (a suspended Job is reported as never admitted).

The student's service account needs, in the Job namespace, API group ``batch``: ``create`` and
``delete`` on ``jobs``, and ``get`` on ``jobs/status`` (:data:`REQUIRED_RBAC`); the garbage
collector, not the student, deletes the pods. Training pods never call the API: no token is
mounted in them.

What was not exercised without a cluster (none can run on the machines this was built on): a
real API server's admission and defaulting of the manifest (it is validated against the
Kubernetes OpenAPI schemas of several versions with kubernetes-validate instead), the real Job
controller's handling of ``podFailurePolicy``/``backoffLimitPerIndex`` (the tests' stand-in
applies the documented rules), Kueue admission, GPU scheduling, the in-cluster service-account
configuration (``load_incluster_config``), and the file locking of the registry on a
ReadWriteMany volume (NFS and CephFS provide the ``flock`` the registry relies on; other RWX
backends must too). The tests run every pod command for real, as local processes, against a local
HTTP server that speaks the Job API the executor uses.

Known limits: a pod killed after saving an adapter but before recording it leaves an orphan
candidate version in the registry (never served; a retried pod trains the candidate again), and
a Job deleted at the deadline may still finish writing a version while its pods terminate.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import urllib3

from seal.executors import (
    CandidateJob,
    CandidateOutcome,
    CandidateResult,
    ExecutorError,
    StepCallback,
)
from seal.executors.batch import (
    EXIT_BAD_RECIPE,
    EXIT_BAD_SPEC,
    BatchSpec,
    CandidateRecord,
    IndexResult,
    new_batch_id,
    read_index_result,
    remove_stale_batches,
    write_batch,
)
from seal.registry import AdapterRegistry, RegistryError

if TYPE_CHECKING:
    from seal.config import KubernetesExecutorSettings, Settings

# urllib3 (the client's transport) raises its own HTTPError family for connection failures.
_CONNECTION_ERRORS: tuple[type[Exception], ...] = (OSError, urllib3.exceptions.HTTPError)

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
JOB_NAME_PREFIX = "seal-train-"
CONTAINER_NAME = "train"
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
BATCH_LABEL = "seal-batch"
REQUIRED_RBAC = (
    "a Role with, in API group batch, verbs create and delete on jobs and get on jobs/status, "
    "bound to the student's service account by a RoleBinding"
)
_TMP_DIR = "/tmp"  # the pod's own emptyDir, not the host's /tmp
# Per API call: a hung API server must not hold a training RPC beyond its own wait deadline.
API_TIMEOUT_SECONDS = 30.0


# --- the manifest ---------------------------------------------------------------------------------


def pod_path(options: KubernetesExecutorSettings, relative_to_home: Path) -> str:
    """Where a file under the student's home is seen inside a training pod."""
    return str(PurePosixPath(options.home_mount_path) / PurePosixPath(*relative_to_home.parts))


def _resources(options: KubernetesExecutorSettings) -> dict[str, dict[str, str]]:
    requests, limits = dict(options.requests), dict(options.limits)
    if options.gpus:
        # An extended resource is requested through its limit; both are set so they cannot differ.
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(options.gpus)
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _toleration(toleration: Any) -> dict[str, Any]:
    spelled = {
        "key": toleration.key,
        "operator": toleration.operator,
        "value": toleration.value,
        "effect": toleration.effect,
        "tolerationSeconds": toleration.toleration_seconds,
    }
    return {key: value for key, value in spelled.items() if value not in ("", None)}


def _labels(options: KubernetesExecutorSettings, batch_id: str) -> dict[str, str]:
    return {
        **options.labels,
        "app.kubernetes.io/name": "seal",
        "app.kubernetes.io/component": "training",
        "app.kubernetes.io/managed-by": "seal-student",
        BATCH_LABEL: batch_id,
    }


def _on_exit_code(code: int) -> dict[str, Any]:
    return {"containerName": CONTAINER_NAME, "operator": "In", "values": [code]}


def _pod_failure_policy() -> dict[str, Any]:
    return {
        "rules": [
            # Every index would fail alike (another seal version or base model in the image).
            {"action": "FailJob", "onExitCodes": _on_exit_code(EXIT_BAD_SPEC)},
            # This shard's recipe is bad: retrying the same self-edit cannot help; the others go on.
            {"action": "FailIndex", "onExitCodes": _on_exit_code(EXIT_BAD_RECIPE)},
            # Preemption, eviction, a node drain: not the candidate's fault, so no retry is spent.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def job_manifest(
    options: KubernetesExecutorSettings,
    *,
    name: str,
    namespace: str,
    batch_id: str,
    completions: int,
    spec_file: str,
    settings_file: str,
) -> dict[str, Any]:
    """The ``batch/v1`` Job of one batch: the one place its manifest is built. ``spec_file`` and
    ``settings_file`` are paths inside the pod (see :func:`pod_path`)."""
    labels = _labels(options, batch_id)
    job_labels = {**labels, **({QUEUE_NAME_LABEL: options.queue_name} if options.queue_name else {})}
    mounts: list[dict[str, Any]] = [
        {"name": "home", "mountPath": options.home_mount_path},
        {"name": "tmp", "mountPath": _TMP_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "home", "persistentVolumeClaim": {"claimName": options.home_claim_name}},
        {"name": "tmp", "emptyDir": {"sizeLimit": options.tmp_size_limit}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size_limit}},
    ]
    if options.model_claim_name:
        models = {"name": "models", "mountPath": options.model_mount_path, "readOnly": True}
        mounts.append({**models, "subPath": options.model_sub_path} if options.model_sub_path else models)
        claim = {"claimName": options.model_claim_name, "readOnly": True}
        volumes.append({"name": "models", "persistentVolumeClaim": claim})
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "command": ["python", "-m", "seal.executors.worker", "--spec", spec_file],
        "env": [
            {"name": "SEAL_HOME", "value": options.home_mount_path},
            {"name": "SEAL_CONFIG_FILE", "value": settings_file},
            # Libraries cache under $HOME; the root filesystem is read-only.
            {"name": "HOME", "value": _TMP_DIR},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "resources": _resources(options),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # podFailurePolicy requires it: a retry is a new pod, seen by the Job
        # The pods only train and write files: no API token, no Service environment variables.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": options.run_as_user,
            "runAsGroup": options.run_as_group,
            "fsGroup": options.fs_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if options.service_account:
        pod_spec["serviceAccountName"] = options.service_account
    if options.node_selector:
        pod_spec["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        pod_spec["tolerations"] = [_toleration(t) for t in options.tolerations]
    if options.runtime_class_name:
        pod_spec["runtimeClassName"] = options.runtime_class_name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": job_labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": min(options.parallelism, completions),
            "backoffLimitPerIndex": options.backoff_limit_per_index,
            # Every index may fail without failing the others.
            "maxFailedIndexes": completions,
            "podFailurePolicy": _pod_failure_policy(),
            "activeDeadlineSeconds": options.active_deadline_seconds,
            "ttlSecondsAfterFinished": options.ttl_seconds_after_finished,
            "suspend": options.suspend,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


# --- the Job's status -----------------------------------------------------------------------------


def parse_indexes(text: str | None) -> frozenset[int]:
    """``"0,2-4"`` (the format of completedIndexes and failedIndexes) → {0, 2, 3, 4}."""
    indexes: set[int] = set()
    for part in (text or "").split(","):
        if not part.strip():
            continue
        first, _, last = part.partition("-")
        indexes.update(range(int(first), int(last or first) + 1))
    return frozenset(indexes)


@dataclass(frozen=True)
class JobProgress:
    """What the student knows of its Job when it stops waiting."""

    completed: frozenset[int] = frozenset()
    failed: frozenset[int] = frozenset()
    finished: bool = False
    suspended: bool = False
    # "Reason: message" of the Failed condition, when the Job failed as a whole.
    failure: str = ""
    # Why the wait ended before the Job did: "" (it did not), "deadline", "cancelled", "vanished".
    stopped: str = ""


def job_progress(status: dict[str, Any], spec: dict[str, Any], completions: int) -> JobProgress:
    """The Job's ``status`` and ``spec`` (API JSON) summarised."""
    conditions = {c.get("type"): c for c in status.get("conditions") or () if c.get("status") == "True"}
    completed, failed = parse_indexes(status.get("completedIndexes")), parse_indexes(status.get("failedIndexes"))
    failure = conditions.get("Failed") or conditions.get("FailureTarget")
    return JobProgress(
        completed=completed,
        failed=failed,
        # The conditions come once every pod has terminated; the index lists already say it all.
        finished="Complete" in conditions or "Failed" in conditions or len(completed | failed) >= completions,
        suspended=bool(spec.get("suspend")) or "Suspended" in conditions,
        failure=f"{failure.get('reason', '')}: {failure.get('message', '')}".strip(": ") if failure else "",
    )


# --- API errors -----------------------------------------------------------------------------------


def _api_message(exc: Any) -> str:
    """The ``message`` of the Kubernetes Status object in an ApiException's body, else its reason."""
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(exc.reason or exc)


def api_error(exc: Any, *, action: str, namespace: str, job: str) -> ExecutorError:
    """An ApiException from ``action`` (create/get/delete) turned into an error that says what to do."""
    status, message = exc.status, _api_message(exc)
    if status == 403:
        return ExecutorError(
            f"the Kubernetes API refused to {action} Job {namespace}/{job} (403 Forbidden: {message}); the student's "
            f"service account needs {REQUIRED_RBAC} in namespace {namespace}",
            "permission_denied",
        )
    if status == 401:
        return ExecutorError(
            f"the Kubernetes API did not accept the student's credentials to {action} Job {namespace}/{job} (401: "
            f"{message}); the student pod needs its service-account token mounted (automountServiceAccountToken)",
            "permission_denied",
        )
    if status == 404:
        return ExecutorError(
            f"cannot {action} Job {namespace}/{job}: not found (404: {message}); check that namespace {namespace} "
            "exists (student.kubernetes.namespace)",
            "not_found",
        )
    if status == 409:
        return ExecutorError(
            f"cannot {action} Job {namespace}/{job}: a Job of that name already exists (409: {message}); batch names "
            "are random, so another student may be sharing this home volume",
            "aborted",
        )
    if status == 422:
        return ExecutorError(
            f"the API server rejected Job {namespace}/{job} (422 Invalid: {message}); check the student.kubernetes "
            "settings, and that the cluster runs Kubernetes 1.29 or later (backoffLimitPerIndex, FailIndex)",
            "failed_precondition",
        )
    return ExecutorError(f"cannot {action} Job {namespace}/{job}: HTTP {status} from the Kubernetes API: {message}")


# --- collecting outcomes --------------------------------------------------------------------------


def _unfinished_reason(
    record: CandidateRecord | None, index: int, progress: JobProgress, *, job: str, wait_timeout: float, queue: str
) -> tuple[str, str]:
    """(reason, code) for a candidate that has no final record."""
    if progress.stopped == "deadline":
        waited = f"student.kubernetes.wait_timeout_seconds={wait_timeout:g}s"
        if not progress.suspended:
            return f"the training Job {job} did not finish within {waited}; the Job was deleted", "deadline_exceeded"
        if queue:
            why = f"Kueue did not admit it from queue {queue!r}: check that ClusterQueue's quota"
        else:
            why = "no Kueue queue is set (student.kubernetes.queue_name) to unsuspend it"
        return f"the training Job {job} stayed suspended for {waited} ({why}); the Job was deleted", "deadline_exceeded"
    if progress.stopped == "cancelled":
        return f"the caller stopped waiting before the training Job {job} finished; the Job was deleted", "cancelled"
    if progress.stopped == "vanished":
        return f"the training Job {job} was deleted by someone else before it finished", "aborted"
    where = f"index {index} of the training Job {job}"
    if record is not None and record.status == "running":
        what = f"its pod died while training this candidate (attempt {record.attempt}: killed, out of memory, or crashed)"
    elif record is not None and record.status == "failed":
        what = f"attempt {record.attempt} failed: {record.failure}"
    else:
        what = "no pod of it recorded this candidate"
    if index in progress.failed:
        return f"{where} failed: {what}", "aborted"
    if index in progress.completed:
        # A completed index without a record: the pod wrote somewhere the student does not read.
        volume = "student.kubernetes.home_claim_name"
        return f"{where} completed but its result never reached the student's home: do both mount {volume}?", "data_loss"
    ended = f" ({progress.failure})" if progress.failure else ""
    return f"{where} did not run to the end: the Job ended{ended}; {what}", "aborted"


def collect_outcomes(
    spec: BatchSpec,
    results: dict[int, IndexResult],
    progress: JobProgress,
    registry: AdapterRegistry,
    *,
    job: str,
    wait_timeout: float,
    queue: str,
) -> list[CandidateOutcome]:
    """One outcome per candidate of ``spec``, from the indexes' records and the Job's progress.
    A trained candidate's adapter is read back from the registry and its checksums verified."""
    outcomes = []
    for position in range(len(spec.jobs)):
        index = spec.index_of(position)
        record = results[index].records.get(position) if index in results else None
        if record is not None and record.status == "trained":
            try:
                manifest = registry.get(record.adapter_id)
                registry.verify(manifest)
            except RegistryError as exc:
                outcomes.append(CandidateOutcome.failed(
                    position, f"{record.adapter_id}, trained by index {index} of {job}, is not usable here: {exc}",
                    getattr(exc, "code", "data_loss"),
                ))
                continue
            result = CandidateResult(manifest, record.training_sequences, list(record.losses), record.seconds)
            outcomes.append(CandidateOutcome(position, result=result))
        elif record is not None and record.status == "refused":
            outcomes.append(CandidateOutcome.failed(position, record.failure, record.code))
        else:
            reason, code = _unfinished_reason(record, index, progress, job=job, wait_timeout=wait_timeout, queue=queue)
            outcomes.append(CandidateOutcome.failed(position, reason, code))
    return outcomes


# --- the executor ---------------------------------------------------------------------------------


def current_namespace(options: KubernetesExecutorSettings, namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE_FILE) -> str:
    if options.namespace:
        return options.namespace
    try:
        return namespace_file.read_text(encoding="utf-8").strip()
    except OSError:
        raise ExecutorError(
            f"student.kubernetes.namespace is empty and {namespace_file} cannot be read (is the student running in a "
            "pod with a service-account token?); set SEAL_STUDENT__KUBERNETES__NAMESPACE",
            "failed_precondition",
        ) from None


def check_options(options: KubernetesExecutorSettings) -> None:
    missing = [name for name in ("image", "home_claim_name") if not getattr(options, name)]
    if missing:
        raise ExecutorError(
            "student.executor=kubernetes needs " + " and ".join(f"student.kubernetes.{m}" for m in missing)
            + ": the image the training pods run (the student's) and the PersistentVolumeClaim of the student's home",
            "failed_precondition",
        )


def incluster_api_client() -> Any:
    """An ApiClient configured from the pod's service account (token, CA, API server address)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException as exc:
        raise ExecutorError(
            f"student.executor=kubernetes needs to run in a Kubernetes pod with a service-account token: {exc}",
            "failed_precondition",
        ) from exc
    return client.ApiClient()


class KubernetesExecutor:
    """Runs a batch of candidate trainings as one Indexed Job (see the module's documentation)."""

    name = "kubernetes"

    def __init__(
        self,
        settings: Settings,
        registry: AdapterRegistry,
        *,
        base_model_fingerprint: str,
        api_client: Any = None,
        namespace_file: Path = SERVICE_ACCOUNT_NAMESPACE_FILE,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``api_client``: a ``kubernetes.client.ApiClient``; None = in-cluster configuration."""
        from kubernetes import client

        self._settings = settings
        self._options = settings.student.kubernetes
        check_options(self._options)
        self._registry = registry
        self._fingerprint = base_model_fingerprint
        self.namespace = current_namespace(self._options, namespace_file)
        # Left by a student that died mid-batch; twice the wait, so no live waiter can be affected.
        remove_stale_batches(settings.home, older_than=2 * self._options.wait_timeout_seconds)
        self._jobs = client.BatchV1Api(api_client if api_client is not None else incluster_api_client())
        self._job_model = client.V1Job
        self._sleep, self._clock = sleep, clock

    def run(
        self,
        jobs: Sequence[CandidateJob],
        *,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[CandidateOutcome]:
        """Train ``jobs`` in one Job. No step progress: the steps happen in the pods."""
        if not jobs:
            return []
        home = self._settings.home
        spec = BatchSpec(new_batch_id(), self._fingerprint, self._options.candidates_per_index, tuple(jobs))
        paths = write_batch(home, spec, self._settings.model_dump(mode="json"))
        name = JOB_NAME_PREFIX + spec.batch_id
        try:
            manifest = job_manifest(
                self._options, name=name, namespace=self.namespace, batch_id=spec.batch_id,
                completions=spec.completions,
                spec_file=pod_path(self._options, paths.spec.relative_to(home)),
                settings_file=pod_path(self._options, paths.settings.relative_to(home)),
            )
            self._create(manifest)
            log.info("created training Job %s/%s: %d candidates in %d indexes",
                     self.namespace, name, len(jobs), spec.completions)
            try:
                progress = self._wait(name, spec.completions, should_stop)
            finally:
                self._delete(name)
            results = {i: r for i in range(spec.completions) if (r := read_index_result(paths, i)) is not None}
            return collect_outcomes(
                spec, results, progress, self._registry, job=f"{self.namespace}/{name}",
                wait_timeout=self._options.wait_timeout_seconds, queue=self._options.queue_name,
            )
        finally:
            shutil.rmtree(paths.directory, ignore_errors=True)

    # --- API calls --------------------------------------------------------------------------

    def _create(self, manifest: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        name = manifest["metadata"]["name"]
        try:
            self._jobs.create_namespaced_job(
                self.namespace, self._job_model.from_dict(manifest), _request_timeout=API_TIMEOUT_SECONDS
            )
        except ApiException as exc:
            raise api_error(exc, action="create", namespace=self.namespace, job=name) from exc
        except _CONNECTION_ERRORS as exc:
            raise ExecutorError(f"cannot reach the Kubernetes API to create Job {self.namespace}/{name}: {exc}") from exc

    def _read(self, name: str, completions: int) -> JobProgress | None:
        """The Job's progress; None after a transient error (the next poll tries again)."""
        from kubernetes.client.exceptions import ApiException

        try:
            # Raw JSON, not the client's models: only a few status fields are read, and a newer API
            # server's additions must not fail the parse.
            response = self._jobs.read_namespaced_job_status(
                name, self.namespace, _preload_content=False, _request_timeout=API_TIMEOUT_SECONDS
            )
            job = json.loads(response.data)
        except ApiException as exc:
            if exc.status == 404:
                return JobProgress(finished=True, stopped="vanished")
            if exc.status in (401, 403):
                raise api_error(exc, action="get", namespace=self.namespace, job=name) from exc
            log.warning("reading Job %s/%s: HTTP %s, trying again", self.namespace, name, exc.status)
            return None
        except (*_CONNECTION_ERRORS, ValueError) as exc:
            log.warning("reading Job %s/%s: %s, trying again", self.namespace, name, exc)
            return None
        return job_progress(job.get("status") or {}, job.get("spec") or {}, completions)

    def _wait(self, name: str, completions: int, should_stop: Callable[[], bool] | None) -> JobProgress:
        deadline = self._clock() + self._options.wait_timeout_seconds
        last = JobProgress()
        while True:
            progress = self._read(name, completions)
            if progress is not None:
                if progress.finished:
                    return progress
                last = progress
            if should_stop is not None and should_stop():
                return replace(last, stopped="cancelled")
            left = deadline - self._clock()
            if left <= 0:
                return replace(last, stopped="deadline")
            self._sleep(min(self._options.poll_seconds, left))

    def _delete(self, name: str) -> None:
        """Delete the Job and, in the background, its pods. A failure is logged, not raised: the
        results are already on the volume, and ttlSecondsAfterFinished removes the Job later."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._jobs.delete_namespaced_job(
                name, self.namespace, propagation_policy="Background", _request_timeout=API_TIMEOUT_SECONDS
            )
        except ApiException as exc:
            if exc.status != 404:
                log.error("%s", api_error(exc, action="delete", namespace=self.namespace, job=name))
        except _CONNECTION_ERRORS as exc:
            log.error("cannot reach the Kubernetes API to delete Job %s/%s: %s", self.namespace, name, exc)
