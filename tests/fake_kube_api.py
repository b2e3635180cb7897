"""A local stand-in for the part of the Kubernetes API the training executor uses, for tests.

No cluster can run on the machines these tests run on, so this module plays two parts:

- the API server, over real HTTP on a loopback port chosen by the OS: create, read (and read
  status) and delete of ``batch/v1`` Jobs under ``/apis/batch/v1/namespaces/{ns}/jobs``, with
  Kubernetes' Status objects for errors; every request is recorded;
- the Job controller and the kubelet: a created, unsuspended Indexed Job has its pod command run
  for real, as a local process per completion index (``JOB_COMPLETION_INDEX`` and the container's
  env set, each PersistentVolumeClaim mapped to a local directory, emptyDirs to fresh ones), and
  its status kept as the controller documents it: per-index retries up to ``backoffLimitPerIndex``,
  the ``podFailurePolicy`` rules on exit codes (FailJob, FailIndex, Ignore, Count),
  ``maxFailedIndexes``, ``completedIndexes``/``failedIndexes`` and the terminal conditions.

Simplifications, on purpose: indexes run one after another whatever ``parallelism`` says (the
test machines have two cores), a suspended Job stays suspended (there is no Kueue to admit it),
``activeDeadlineSeconds`` is not enforced, and pods never get a DisruptionTarget condition.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

_JOBS_PATH = re.compile(r"^/apis/batch/v1/namespaces/(?P<ns>[^/]+)/jobs(?:/(?P<name>[^/]+)(?P<status>/status)?)?$")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_indexes(indexes: set[int]) -> str:
    """{0, 2, 3, 4} → "0,2-4", the spelling of completedIndexes and failedIndexes."""
    runs: list[list[int]] = []
    for index in sorted(indexes):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def pod_failure_action(policy: dict[str, Any] | None, container: str, exit_code: int) -> str:
    """The action of the first podFailurePolicy rule matching a failed pod; Count when none does."""
    for rule in (policy or {}).get("rules", []):
        codes = rule.get("onExitCodes")
        if codes and codes.get("containerName") in (None, container):
            inside = exit_code in codes["values"]
            if inside == (codes["operator"] == "In"):
                return rule["action"]
    return "Count"


def status_object(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    return {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure" if code >= 400 else "Success",
        "message": message, "reason": reason, "details": details, "code": code,
    }


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: dict[str, Any] | None


@dataclass
class FakeJob:
    namespace: str
    body: dict[str, Any]
    completed: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    attempts: dict[int, list[int]] = field(default_factory=dict)  # index -> exit code of each pod
    conditions: list[dict[str, Any]] = field(default_factory=list)
    deleted: bool = False
    running: subprocess.Popen[bytes] | None = None
    logs: dict[int, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"active": 1 if self.running is not None else 0}
        if self.completed:
            status["completedIndexes"] = format_indexes(self.completed)
        if self.failed:
            status["failedIndexes"] = format_indexes(self.failed)
        status["succeeded"] = len(self.completed)
        status["failed"] = sum(1 for codes in self.attempts.values() for c in codes if c != 0)
        if self.conditions:
            status["conditions"] = self.conditions
        return status

    def as_json(self) -> dict[str, Any]:
        return {**self.body, "status": self.status()}


class FakeKubeApi:
    """``with FakeKubeApi({"seal-home": home}) as api: executor(api_client=api.api_client())``.

    ``claims`` maps PersistentVolumeClaim names to local directories. ``refuse`` maps an HTTP
    method (POST, GET, DELETE) to the error status the server answers it with (403, 404, 409…).
    ``run_pods=False`` leaves every Job's pods pending forever."""

    def __init__(self, claims: dict[str, Path], *, refuse: dict[str, int] | None = None, run_pods: bool = True) -> None:
        self.claims = {name: Path(path) for name, path in claims.items()}
        self.refuse = dict(refuse or {})
        self.run_pods = run_pods
        self.requests: list[Recorded] = []
        self.jobs: dict[tuple[str, str], FakeJob] = {}
        self.deleted: list[FakeJob] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._scratch = Path(tempfile.mkdtemp(prefix="fake-kubelet-"))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._serving = threading.Thread(target=self._server.serve_forever, name="fake-kube-api", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self._serving.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            for job in self.jobs.values():
                self._kill(job)
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=60)

    def api_client(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    def calls(self, method: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method]

    # --- the API server -----------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                api.requests.append(Recorded(self.command, url.path, parse_qs(url.query), body))
                match = _JOBS_PATH.match(url.path)
                if match is None:
                    self._reply(404, status_object(404, "NotFound", f"the server could not find {url.path}"))
                    return
                code, reply = api._route(self.command, match["ns"], match["name"], body)
                self._reply(code, reply)

            do_GET = do_POST = do_DELETE = _handle

        return Handler

    def _route(self, method: str, namespace: str, name: str | None, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        if method in self.refuse:
            return self._refusal(self.refuse[method], method, namespace, name or (body or {}).get("metadata", {}).get("name", ""))
        with self._lock:
            if method == "POST" and name is None and body is not None:
                return self._create(namespace, body)
            job = self.jobs.get((namespace, name or ""))
            if job is None:
                return 404, status_object(404, "NotFound", f'jobs.batch "{name}" not found', name=name, group="batch", kind="jobs")
            if method == "GET":
                return 200, job.as_json()
            if method == "DELETE":
                job.deleted = True
                self._kill(job)
                del self.jobs[(namespace, job.name)]
                self.deleted.append(job)
                return 200, status_object(200, "", "", name=job.name, group="batch", kind="jobs",
                                          uid=job.body["metadata"]["uid"])
        return 405, status_object(405, "MethodNotAllowed", f"{method} is not supported here")

    def _refusal(self, code: int, method: str, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        verb = {"POST": "create", "GET": "get", "DELETE": "delete"}[method]
        reasons = {403: "Forbidden", 404: "NotFound", 409: "AlreadyExists", 422: "Invalid", 500: "InternalError"}
        messages = {
            403: f'jobs.batch is forbidden: User "system:serviceaccount:{namespace}:seal-student" cannot {verb} '
                 f'resource "jobs" in API group "batch" in the namespace "{namespace}"',
            404: f'namespaces "{namespace}" not found',
            409: f'jobs.batch "{name}" already exists',
        }
        return code, status_object(code, reasons.get(code, "Unknown"), messages.get(code, f"refused with {code}"),
                                   name=name, group="batch", kind="jobs")

    def _create(self, namespace: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body["metadata"]["name"]
        if (namespace, name) in self.jobs:
            return self._refusal(409, "POST", namespace, name)
        stored = json.loads(json.dumps(body))
        stored["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion="1")
        job = FakeJob(namespace, stored)
        self.jobs[(namespace, name)] = job
        if self.run_pods and not stored["spec"].get("suspend"):
            thread = threading.Thread(target=self._control, args=(job,), name=f"fake-job-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return 201, job.as_json()

    # --- the Job controller and the kubelet ---------------------------------------------------

    def _kill(self, job: FakeJob) -> None:
        if job.running is not None and job.running.poll() is None:
            job.running.kill()

    def _control(self, job: FakeJob) -> None:
        spec = job.body["spec"]
        container = spec["template"]["spec"]["containers"][0]["name"]
        limit = spec.get("backoffLimitPerIndex", 0)
        for index in range(spec["completions"]):
            counted = 0
            while not job.deleted:
                exit_code = self._run_pod(job, index)
                with self._lock:
                    job.attempts.setdefault(index, []).append(exit_code)
                if job.deleted:
                    return
                if exit_code == 0:
                    job.completed.add(index)
                    break
                action = pod_failure_action(spec.get("podFailurePolicy"), container, exit_code)
                if action == "FailJob":
                    self._finish(job, "Failed", "PodFailurePolicy",
                                 f"Container {container} for pod of index {index} failed with exit code {exit_code} "
                                 "matching FailJob rule at index 0")
                    return
                if action == "FailIndex":
                    job.failed.add(index)
                    break
                if action == "Count":
                    counted += 1
                    if counted > limit:
                        job.failed.add(index)
                        break
            if len(job.failed) > spec.get("maxFailedIndexes", spec["completions"]):
                self._finish(job, "Failed", "MaxFailedIndexesExceeded", "Job has exceeded the specified maximal number of failed indexes")
                return
        if job.failed:
            self._finish(job, "Failed", "FailedIndexes", "Job has failed indexes")
        else:
            self._finish(job, "Complete", "CompletionsReached", "Reached expected number of succeeded pods")

    def _finish(self, job: FakeJob, kind: str, reason: str, message: str) -> None:
        interim = "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget"
        with self._lock:
            job.conditions = [
                {"type": t, "status": "True", "reason": reason, "message": message,
                 "lastProbeTime": _now(), "lastTransitionTime": _now()}
                for t in (interim, kind)
            ]

    def _run_pod(self, job: FakeJob, index: int) -> int:
        """One pod of ``index``: the container's command as a local process, volumes mapped."""
        pod_spec = job.body["spec"]["template"]["spec"]
        container = pod_spec["containers"][0]
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        scratch = Path(tempfile.mkdtemp(prefix=f"{job.name}-{index}-", dir=self._scratch))
        mounts: list[tuple[str, Path]] = []
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                local = self.claims[volume["persistentVolumeClaim"]["claimName"]]
            else:
                local = scratch / mount["name"]
                local.mkdir()
            mounts.append((mount["mountPath"], local))
        mounts.sort(key=lambda m: len(m[0]), reverse=True)

        def on_node(value: str) -> str:
            for mount_path, local in mounts:
                if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                    return str(local) + value[len(mount_path):]
            return value

        env = {
            # The "image": this interpreter's environment; one thread each on the shared test machine.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            **{e["name"]: on_node(e["value"]) for e in container.get("env", [])},
            "JOB_COMPLETION_INDEX": str(index),
        }
        log_path = scratch / "pod.log"
        with open(log_path, "wb") as log:
            with self._lock:
                if job.deleted:
                    return 137
                job.running = subprocess.Popen(
                    [on_node(arg) for arg in container["command"]], env=env, cwd=scratch, stdout=log,
                    stderr=subprocess.STDOUT,
                )
            exit_code = job.running.wait()
            with self._lock:
                job.running = None
        job.logs.setdefault(index, []).append(log_path.read_text(errors="replace"))
        return exit_code
