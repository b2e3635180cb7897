"""Run a real ``tritonserver`` as a supervised child process serving the student model.

Two layouts of Triton are supported: the ``nvidia-pytriton`` wheel (tritonserver, its libraries and
one Python-backend stub per Python version inside a site-packages directory; used on CPU machines
and in tests), and a prefix such as ``/opt/tritonserver`` in NVIDIA's image (production, on a GPU
node). The Python-backend stub embeds an interpreter; which environment it runs in (and so which
torch/transformers/peft it imports) is chosen by ``python_executable``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import filecmp
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from seal.durable import abandoned_temporaries, atomic_write_json
from seal.serving.triton.model_repository import DEFAULT_MODEL_NAME, render_config, write_model
from seal.serving.triton.state import ServingState, write_state

if TYPE_CHECKING:
    from seal.serving.triton.client import TritonStudentClient

log = logging.getLogger(__name__)

ENV_BINARY = "SEAL_TRITONSERVER"
# The Makefile installs the wheel in a venv of its own (its client pins protobuf<7, the project's
# stubs need protobuf>=7); looked for beside the project when nothing else is configured.
SIDE_VENV = ".venv-triton"


class TritonError(RuntimeError):
    """Base class of the Triton layer's errors."""


class TritonNotInstalled(TritonError):
    """No ``tritonserver`` binary could be found."""


class TritonStartError(TritonError):
    """The server did not become ready; the message carries the tail of its log."""


@dataclass(frozen=True)
class TritonInstall:
    """Where a Triton installation keeps what a launch needs."""

    binary: Path
    backend_root: Path  # holds python/libtriton_python.so
    library_dirs: tuple[Path, ...] = ()
    # pytriton only: <dir>/<major.minor>/triton_python_backend_stub, one per Python version. In
    # NVIDIA's image the stub already sits in backend_root/python, built for the image's Python.
    stub_root: Path | None = None

    @classmethod
    def from_pytriton(cls, site_packages: str | os.PathLike[str]) -> TritonInstall:
        site = Path(site_packages)
        root = site / "pytriton" / "tritonserver"
        install = cls(
            binary=root / "bin" / "tritonserver",
            backend_root=root / "backends",
            library_dirs=(site / "nvidia_pytriton.libs",),
            stub_root=root / "python_backend_stubs",
        )
        install.check()
        return install

    @classmethod
    def from_prefix(cls, prefix: str | os.PathLike[str] = "/opt/tritonserver") -> TritonInstall:
        root = Path(prefix)
        install = cls(binary=root / "bin" / "tritonserver", backend_root=root / "backends",
                      library_dirs=(root / "lib",))
        install.check()
        return install

    @classmethod
    def from_binary(cls, binary: str | os.PathLike[str]) -> TritonInstall:
        path = Path(binary).resolve()
        if path.parent.parent.name == "tritonserver" and path.parent.parent.parent.name == "pytriton":
            return cls.from_pytriton(path.parent.parent.parent.parent)
        return cls.from_prefix(path.parent.parent)

    @classmethod
    def discover(cls) -> TritonInstall:
        """$SEAL_TRITONSERVER, then pytriton in this interpreter, then the project's side venv,
        then ``tritonserver`` on PATH or in /opt/tritonserver."""
        tried: list[str] = []
        explicit = os.environ.get(ENV_BINARY)
        if explicit:
            return cls.from_binary(explicit)
        spec = importlib.util.find_spec("pytriton")
        if spec is not None and spec.submodule_search_locations:
            site = Path(next(iter(spec.submodule_search_locations))).parent
            with contextlib.suppress(TritonNotInstalled):
                return cls.from_pytriton(site)
            tried.append(str(site))
        # seal/serving/triton/server.py -> the project root, where `make install` puts the side venv.
        project = Path(__file__).resolve().parents[3]
        for site in sorted((project / SIDE_VENV / "lib").glob("python3*/site-packages")):
            with contextlib.suppress(TritonNotInstalled):
                return cls.from_pytriton(site)
            tried.append(str(site))
        on_path = shutil.which("tritonserver")
        if on_path:
            return cls.from_binary(on_path)
        with contextlib.suppress(TritonNotInstalled):
            return cls.from_prefix("/opt/tritonserver")
        raise TritonNotInstalled(
            "no tritonserver found: set $SEAL_TRITONSERVER, or install the nvidia-pytriton wheel "
            f"(make triton installs it into {SIDE_VENV}); looked in {tried or 'nothing'}"
        )

    def check(self) -> None:
        if not os.access(self.binary, os.X_OK):
            raise TritonNotInstalled(f"{self.binary} is not an executable tritonserver")
        if not (self.backend_root / "python").is_dir():
            raise TritonNotInstalled(f"{self.backend_root} has no python backend")

    def stub_for(self, version: str) -> Path | None:
        if self.stub_root is None:
            return None
        stub = self.stub_root / version / "triton_python_backend_stub"
        if not stub.is_file():
            have = sorted(p.name for p in self.stub_root.iterdir()) if self.stub_root.is_dir() else []
            raise TritonNotInstalled(f"no Python-backend stub for Python {version} (have {have})")
        return stub


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now. Another process may take it before the server binds it; the
    start-up error then says so in the log tail (the tests accept that rare race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _python_facts(python: str) -> dict[str, Any]:
    probe = ("import json, sys, sysconfig; print(json.dumps({'version': '%d.%d' % sys.version_info[:2], "
             "'libdir': sysconfig.get_config_var('LIBDIR'), 'prefix': sys.prefix}))")
    out = subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after its closing one.
        fields = stat[stat.rindex(")") + 2:].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return sorted(members)


def _cmdline(pid: int) -> list[str]:
    """A process's arguments from /proc ([] if it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_our_tritonserver(pid: int, repository: Path) -> bool:
    """Whether ``pid`` is a tritonserver serving ``repository``: a pid from a pidfile may have been
    reused by anything since, and only a server of this working directory may be killed."""
    args = _cmdline(pid)
    return bool(args) and Path(args[0]).name == "tritonserver" and f"--model-repository={repository}" in args


def _processes_naming(text: str, pgid: int) -> list[int]:
    """Members of process group ``pgid`` whose command line mentions ``text`` (a server's stubs
    name its model repository)."""
    return [pid for pid in process_group_members(pgid) if any(text in arg for arg in _cmdline(pid))]


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive SIGTERM when its parent dies, SIGKILL
    included (Linux ``prctl(PR_SET_PDEATHSIG)``), so a killed student never leaves a tritonserver
    behind. SIGTERM rather than SIGKILL: Triton then shuts down as on ``stop()``, stopping the
    Python-backend stubs it forked (the signal setting is not inherited by them, and a stub whose
    server vanished can linger), and it exits after ``--exit-timeout-secs`` at the latest. The
    kernel sends it when the *thread* that forked exits: start the server from a thread that lives
    as long as the service (the main thread does)."""
    # Looked up here, before the fork: loading a library in the forked child could wait forever
    # on a loader lock another thread of the parent held at fork time.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def install_file(source: Path, target: Path) -> bool:
    """Put a copy of ``source`` at ``target`` unless an identical one is there; returns whether it
    copied. Never writes into ``target``: a running executable (a stub of a server that is still
    shutting down) cannot be opened for writing (ETXTBSY), but it can be replaced by a rename."""
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return False
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copy2(source, temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return True


def _is_noise(line: str) -> bool:
    # Logged as errors by every CPU-only start, and harmless there.
    return "CudaDriverHelper has not been initialized" in line


class TritonSupervisor:
    """Owns a model repository and one ``tritonserver`` child serving the student model.

    The server gets a process group of its own, so that the Python-backend stubs it forks can be
    found and, if the graceful shutdown fails, killed with it: ``stop()`` leaves no process behind.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        base_model: str | os.PathLike[str],
        *,
        model_name: str = DEFAULT_MODEL_NAME,
        serving_state: str | os.PathLike[str] | None = None,
        install: TritonInstall | str | os.PathLike[str] | None = None,
        python_executable: str | None = None,
        address: str = "127.0.0.1",
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        metrics_address: str | None = None,
        instance_count: int = 1,
        max_batch_size: int = 16,
        kind: str = "KIND_CPU",
        queue_delay_us: int = 2000,
        adapter_root: str | os.PathLike[str] | None = None,
        model_parameters: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        exit_timeout_s: int = 10,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.base_model = Path(base_model).resolve()
        self.model_name = model_name
        self.state_path = Path(serving_state).resolve() if serving_state else self.workdir / "serving_state.json"
        # A path is the tritonserver binary (either layout); None discovers one at first use.
        self._install = install if install is None or isinstance(install, TritonInstall) else \
            TritonInstall.from_binary(install)
        self.python_executable = python_executable or sys.executable
        self.address = address
        # Triton's own /metrics may listen wider than its gRPC port (0.0.0.0 in a pod, so that
        # Prometheus can scrape it) while seal keeps talking to it on ``address``.
        self.metrics_address = metrics_address or address
        self.grpc_port = grpc_port
        self.http_port = http_port  # None: HTTP endpoint off, nothing here uses it
        self.metrics_port = metrics_port
        self.instance_count = instance_count
        self.max_batch_size = max_batch_size
        self.kind = kind
        # How long the dynamic batcher holds a request for company: the whole Triton overhead
        # for a lone request on CPU (~2 ms), buys batching under concurrent load.
        self.queue_delay_us = queue_delay_us
        self.model_parameters = dict(model_parameters or {})
        if adapter_root is not None:
            # Adapters outside it are refused by the model (see model.py): the registry's root.
            self.model_parameters["adapter_root"] = str(Path(adapter_root).resolve())
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.exit_timeout_s = exit_timeout_s
        self.repository = self.workdir / "model_repository"
        self.log_path = self.workdir / "tritonserver.log"
        # Which server this working directory last started: a start after a kill reaps it.
        self.pidfile = self.workdir / "tritonserver.pid"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: BinaryIO | None = None

    # --- configuration ------------------------------------------------------------------------

    @property
    def install(self) -> TritonInstall:
        if self._install is None:
            self._install = TritonInstall.discover()
        return self._install

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def write_repository(self) -> Path:
        """Write the model repository, and an initial serving state (base model) if none exists."""
        self.repository.mkdir(parents=True, exist_ok=True)
        # Only the student that starts this server writes its serving state (its outbox lock makes
        # it the one student of this home), so a temporary beside the state is a killed one's.
        for leftover in abandoned_temporaries(self.state_path):
            leftover.unlink(missing_ok=True)
        if not self.state_path.exists():
            write_state(self.state_path, ServingState(reason="initial: base model"))
        config = render_config(
            name=self.model_name,
            base_model=self.base_model,
            serving_state=self.state_path,
            max_batch_size=self.max_batch_size,
            instance_count=self.instance_count,
            kind=self.kind,
            queue_delay_us=self.queue_delay_us,
            parameters=self.model_parameters,
        )
        return write_model(self.repository, config, self.model_name)

    def _backend_directory(self, python_version: str) -> Path:
        install = self.install
        stub = install.stub_for(python_version)
        if stub is None:
            return install.backend_root
        # The Python backend runs the stub that sits beside libtriton_python.so; the wheel keeps
        # stubs apart, one per Python version, so assemble a backend directory of our own rather
        # than writing into the installed package.
        backend = self.workdir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        source = install.backend_root / "python"
        for item in source.iterdir():
            if item.is_file():
                install_file(item, backend / item.name)
        install_file(stub, backend / "triton_python_backend_stub")
        return backend.parent

    def _environment(self, facts: Mapping[str, Any]) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        # The stub finds its site-packages through the first python on PATH; libpython of that
        # interpreter and the wheel's bundled libraries must be loadable, or the server can hang
        # waiting for a stub that never starts.
        bin_dir = str(Path(self.python_executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        lib_dirs = [str(facts["libdir"])] + [str(p) for p in self.install.library_dirs]
        if env.get("LD_LIBRARY_PATH"):
            lib_dirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.pop("PYTHONHOME", None)
        return env

    def command(self, backend_directory: Path) -> list[str]:
        cmd = [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            f"--load-model={self.model_name}",
            f"--backend-directory={backend_directory}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-address={self.metrics_address}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={int(self.exit_timeout_s)}",
            "--strict-readiness=true",
            "--exit-on-error=true",
        ]
        if self.kind == "KIND_CPU":
            # Without a GPU these only produce CUDA/NVML errors in the log and a failed pinned
            # allocation at start; a GPU deployment passes kind=KIND_GPU and keeps them.
            cmd += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]
        if self.http_port is None:
            cmd.append("--allow-http=false")
        else:
            cmd += [f"--http-address={self.address}", f"--http-port={self.http_port}"]
        return cmd + self.extra_args

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout_s: float = 120.0) -> TritonSupervisor:
        """Launch the server and wait until it and the model are ready.

        Raises ``TritonStartError`` with the log tail when the server exits or is not ready in
        ``timeout_s``; the process group is killed first, so a failed start leaves nothing behind.
        """
        if self._proc is not None and self._proc.poll() is None:
            raise TritonError(f"tritonserver already running (pid {self._proc.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.reap_leftover()
        facts = _python_facts(self.python_executable)
        backend_directory = self._backend_directory(facts["version"])
        self.write_repository()
        self.grpc_port = self.grpc_port or free_port(self.address)
        self.metrics_port = self.metrics_port or free_port(self.address)
        cmd = self.command(backend_directory)
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
        self._log_fh.flush()
        self._proc = subprocess.Popen(
            cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self._environment(facts), cwd=self.workdir, start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()) if sys.platform == "linux" else None,
        )
        atomic_write_json(self.pidfile, {"pid": self._proc.pid, "repository": str(self.repository)})
        atexit.register(self.stop)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop(timeout_s=5.0)
            raise
        return self

    def reap_leftover(self, timeout_s: float = 10.0) -> list[int]:
        """Kill what a previous process of this working directory left running (it was SIGKILLed,
        or its host lost it before the parent-death signal existed): the server named in the
        pidfile, if it really is a tritonserver of this repository, and its stubs. Returns the
        pids it killed."""
        try:
            pid = int(json.loads(self.pidfile.read_text())["pid"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return []
        if self._proc is not None and self._proc.pid == pid:
            return []  # our own, running server
        # start_new_session: the server led its own group, which its stubs share.
        victims = [pid] if is_our_tritonserver(pid, self.repository) else []
        victims += [p for p in _processes_naming(str(self.repository), pid) if p not in victims]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        # A killed process keeps its pid as a zombie until its parent (init, by now) reaps it; a
        # zombie's command line is empty, so this waits for the live ones only.
        while any(_cmdline(v) for v in victims) and time.monotonic() < deadline:
            time.sleep(0.05)
        if victims:
            log.warning("killed a tritonserver a previous process of %s left running (pids %s)", self.workdir, victims)
        self.pidfile.unlink(missing_ok=True)
        return victims

    def _wait_ready(self, timeout_s: float) -> None:
        from seal.serving.triton.client import TritonStudentClient

        deadline = time.monotonic() + timeout_s
        with TritonStudentClient(self.grpc_url, model_name=self.model_name, timeout_s=2.0) as client:
            while True:
                code = self._proc.poll() if self._proc else None
                if code is not None:
                    raise TritonStartError(
                        f"tritonserver exited with code {code} during start-up; log {self.log_path}:\n"
                        f"{self.log_tail()}"
                    )
                if client.is_ready():
                    return
                if time.monotonic() > deadline:
                    raise TritonStartError(
                        f"tritonserver not ready after {timeout_s:.0f}s (a missing library can make the "
                        f"Python stub hang rather than fail); log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.2)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (Triton drains in-flight requests, unloads models, stops the stubs), then
        SIGKILL to the whole process group if anything is still there after ``timeout_s``."""
        proc = self._proc
        if proc is None:
            return
        atexit.unregister(self.stop)
        pgid = proc.pid  # start_new_session: the server leads its own group
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Stubs notice their parent is gone and exit by themselves; give them a moment.
        deadline = time.monotonic() + 5.0
        while process_group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if process_group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while process_group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self._proc = None
        self.pidfile.unlink(missing_ok=True)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        self._last_pgid = pgid

    def leftover_processes(self) -> list[int]:
        """Processes of the last server's group still alive (empty after a clean ``stop``)."""
        pgid = self._proc.pid if self._proc is not None else getattr(self, "_last_pgid", None)
        return process_group_members(pgid) if pgid else []

    def log_tail(self, lines: int = 30) -> str:
        """The log's last lines, preceded by its last error lines: Triton prints a model's Python
        exception message first and the stack after it, so a plain tail can miss the message."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 256 * 1024))
                text = fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return "(no log written)"
        all_lines = text.splitlines()
        if "\n=== " in text:  # only this launch's part of an appended log
            all_lines = text[text.rindex("\n=== ") + 1:].splitlines()
        errors = [ln for ln in all_lines
                  if (ln[:1] == "E" and ln[1:5].isdigit() or ln.startswith("error:")) and not _is_noise(ln)]
        summary = [ln if len(ln) <= 800 else ln[:800] + " ..." for ln in errors[-4:]]
        tail = all_lines[-lines:]
        if summary:
            return "errors:\n" + "\n".join(summary) + "\n--- last lines:\n" + "\n".join(tail)
        return "\n".join(tail)

    def client(self, timeout_s: float = 60.0) -> TritonStudentClient:
        from seal.serving.triton.client import TritonStudentClient

        return TritonStudentClient(self.grpc_url, model_name=self.model_name, state_path=self.state_path,
                                   timeout_s=timeout_s)

    def __enter__(self) -> TritonSupervisor:
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
