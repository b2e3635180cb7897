"""Who may call which RPC: the scope table, the principals file and bearer tokens.

Transport-free: seal/rpc.py turns what this module decides into gRPC statuses
(UNAUTHENTICATED, PERMISSION_DENIED) and credentials; docs/auth.md is the operator's guide.

A **principal** is a caller with a name and scopes. It proves who it is with a bearer token
(``authorization: Bearer <token>`` metadata; the principals file holds only the token's sha256)
or with a TLS client certificate whose name the principals file lists. Each RPC needs one of the
scopes :data:`METHOD_SCOPES` gives it, keyed by the full gRPC method name; a method missing from
the table is refused (a service that registers one does not start), and
tests/test_auth.py walks every RPC of the proto descriptors against it.

>>> required_scopes("/seal.v1.StudentService/Promote") == {"admin", "service:teacher"}
True
>>> required_scopes("/grpc.health.v1.Health/Check") is None  # open: probes carry no credentials
True
>>> principals = Principals.parse({"principals": [
...     {"name": "ops", "scopes": ["admin", "read"], "token_sha256": token_sha256("s3cret-token-for-docs")}]})
>>> principals.by_token("s3cret-token-for-docs").name, principals.by_token("guess")
('ops', None)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from seal.config import AuthSettings

log = logging.getLogger(__name__)

# --- scopes and the table -----------------------------------------------------------------------

ADAPT, GENERATE, READ, ADMIN = "adapt", "generate", "read", "admin"
SERVICE_TEACHER, SERVICE_STUDENT, SERVICE_AUDITOR = "service:teacher", "service:student", "service:auditor"
SCOPES: dict[str, str] = {
    ADAPT: "ask the teacher to adapt the student to a passage (Adapt, ProposeSelfEdits)",
    GENERATE: "generate with the student (Generate, GenerateMixed)",
    READ: "read adapters, the reward stream and the API's schema (ListAdapters, GetAdapter, SubscribeRewards, "
    "reflection)",
    ADMIN: "change what is served or trained: Promote, Rollback, Reject (with weight deletion), Train, Recheck",
    SERVICE_TEACHER: "the teacher service: trains, scores, promotes and rejects candidates during Adapt and Train, "
    "and reports its own policy's status changes to the audit trail (RecordEvent, policy_* kinds only)",
    SERVICE_STUDENT: "the student service: reports promote/reject/rollback events to the audit trail (RecordEvent)",
    SERVICE_AUDITOR: "the auditor service: asks the student for answers, manifests and rollbacks when it scores "
    "and re-checks",
}

# Services whose every method is open: Kubernetes probes carry no credentials.
OPEN_SERVICES = ("grpc.health.v1.Health",)

# Full gRPC method name → the scopes of which a caller needs one. Written once, here; a method of a
# registered service that is not listed is refused (fail closed) and fails tests/test_auth.py.
METHOD_SCOPES: dict[str, frozenset[str]] = {
    # teacher
    "/seal.v1.TeacherService/Adapt": frozenset({ADAPT}),
    "/seal.v1.TeacherService/ProposeSelfEdits": frozenset({ADAPT}),
    "/seal.v1.TeacherService/Train": frozenset({ADMIN}),
    # student: the teacher trains, promotes and rejects during Adapt and Train; the auditor answers
    # questions, reads manifests and rolls back after a failed re-check.
    "/seal.v1.StudentService/ApplySelfEdit": frozenset({SERVICE_TEACHER}),
    "/seal.v1.StudentService/ApplySelfEdits": frozenset({SERVICE_TEACHER}),
    "/seal.v1.StudentService/Generate": frozenset({GENERATE, SERVICE_TEACHER, SERVICE_AUDITOR}),
    "/seal.v1.StudentService/GenerateMixed": frozenset({GENERATE, SERVICE_TEACHER, SERVICE_AUDITOR}),
    "/seal.v1.StudentService/ListAdapters": frozenset({READ, SERVICE_TEACHER, SERVICE_AUDITOR}),
    "/seal.v1.StudentService/GetAdapter": frozenset({READ, SERVICE_TEACHER, SERVICE_AUDITOR}),
    "/seal.v1.StudentService/Promote": frozenset({ADMIN, SERVICE_TEACHER}),
    "/seal.v1.StudentService/Reject": frozenset({ADMIN, SERVICE_TEACHER}),
    "/seal.v1.StudentService/Rollback": frozenset({ADMIN, SERVICE_AUDITOR}),
    # auditor: guardrails and scores are the teacher's; audit events come from the student (its
    # adapters) and the teacher (its policy; the auditor checks which kinds each may report).
    "/seal.v1.AuditorService/CheckSelfEdit": frozenset({SERVICE_TEACHER}),
    "/seal.v1.AuditorService/Score": frozenset({SERVICE_TEACHER}),
    "/seal.v1.AuditorService/ScoreMany": frozenset({SERVICE_TEACHER}),
    "/seal.v1.AuditorService/SubscribeRewards": frozenset({READ, SERVICE_TEACHER}),
    "/seal.v1.AuditorService/RecordEvent": frozenset({SERVICE_STUDENT, SERVICE_TEACHER}),
    "/seal.v1.AuditorService/Recheck": frozenset({ADMIN}),
    # reflection tells the API's shape: readers only.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": frozenset({READ}),
}

SERVICE_IDENTITIES = ("teacher", "student", "auditor")
TOKEN_ENV = "SEAL_TOKEN"


class AuthError(Exception):
    """A refused call; ``code`` is ``unauthenticated`` or ``permission_denied``. The message
    says what to do and never contains a token."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class AuthConfigError(ValueError):
    """Settings or a principals file that cannot be used; raised at start-up."""


def _service_of(method: str) -> str:
    return method.lstrip("/").rpartition("/")[0]


def is_open(method: str) -> bool:
    return _service_of(method) in OPEN_SERVICES


def required_scopes(method: str) -> frozenset[str] | None:
    """The scopes of which a caller of ``method`` needs one; None for an open method.
    KeyError for a method the table does not list (the caller refuses it)."""
    if is_open(method):
        return None
    return METHOD_SCOPES[method]


def unlisted_methods(full_method_names: Iterable[str]) -> list[str]:
    """Those of ``full_method_names`` that are neither open nor in :data:`METHOD_SCOPES`."""
    return [m for m in full_method_names if not is_open(m) and m not in METHOD_SCOPES]


# --- principals ---------------------------------------------------------------------------------

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def token_sha256(token: str) -> str:
    """What the principals file stores for a token: the hex sha256 of its UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random bearer token (256 bits): plain sha256 is enough for tokens this random."""
    return "seal_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]


class _PrincipalEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME)
    scopes: list[str] = Field(min_length=1)
    token_sha256: str = ""
    certificate_names: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _no_plain_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("token" in data or "bearer_token" in data):
            raise ValueError(
                "holds a plain token: store only its sha256 as token_sha256 (`seal auth hash < token-file`), "
                "and give the token itself to the caller"
            )
        return data

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, scopes: list[str]) -> list[str]:
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scope(s) {unknown}; known: {sorted(SCOPES)}")
        return scopes

    @field_validator("token_sha256")
    @classmethod
    def _hex_sha256(cls, value: str) -> str:
        value = value.strip().lower()
        if value and not _SHA256.match(value):
            raise ValueError("token_sha256 must be 64 hex digits (the sha256 of the token, `seal auth hash`)")
        return value

    @model_validator(mode="after")
    def _some_credential(self) -> _PrincipalEntry:
        if not self.token_sha256 and not self.certificate_names:
            raise ValueError("needs token_sha256 or certificate_names: otherwise nobody can act as it")
        return self


class _PrincipalsDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    principals: list[_PrincipalEntry]


class Principals:
    """The principals a service admits, looked up by token (constant time) or certificate name."""

    def __init__(self, entries: list[_PrincipalEntry]) -> None:
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise AuthConfigError(f"principal names must be unique: {sorted({n for n in names if names.count(n) > 1})}")
        hashes = [e.token_sha256 for e in entries if e.token_sha256]
        if len(set(hashes)) != len(hashes):
            raise AuthConfigError("two principals share a token_sha256: give each caller its own token")
        self._by_hash = [(bytes.fromhex(e.token_sha256), Principal(e.name, frozenset(e.scopes)))
                         for e in entries if e.token_sha256]
        self._by_certificate: dict[str, Principal] = {}
        for entry in entries:
            for cert_name in entry.certificate_names:
                if cert_name in self._by_certificate:
                    raise AuthConfigError(f"certificate name {cert_name!r} belongs to two principals")
                self._by_certificate[cert_name] = Principal(entry.name, frozenset(entry.scopes))
        self.names = tuple(names)

    @classmethod
    def parse(cls, document: Any, source: str = "principals") -> Principals:
        if isinstance(document, list):
            document = {"principals": document}
        try:
            parsed = _PrincipalsDocument.model_validate(document)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or 'file'}: {error['msg']}" for error in exc.errors()
            )
            raise AuthConfigError(f"{source}: {problems}") from None
        return cls(parsed.principals)

    @classmethod
    def load(cls, path: str | Path) -> Principals:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AuthConfigError(f"cannot read the principals file {path} (auth.principals_file): {exc}") from exc
        try:
            if path.suffix == ".json":
                document = json.loads(text)
            else:
                import yaml

                document = yaml.safe_load(text)  # YAML is a superset of JSON
        except ValueError as exc:  # json and yaml errors
            raise AuthConfigError(f"{path} (auth.principals_file) is not valid JSON/YAML: {exc}") from None
        return cls.parse(document, str(path))

    @property
    def uses_certificates(self) -> bool:
        return bool(self._by_certificate)

    def by_token(self, token: str) -> Principal | None:
        """The principal whose token this is. Compares against every entry in constant time
        (hmac.compare_digest), so timing tells nothing about which hash came close."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for expected, principal in self._by_hash:
            if hmac.compare_digest(digest, expected):
                found = principal
        return found

    def by_certificate(self, names: Iterable[str]) -> Principal | None:
        """The principal of a client certificate, by its CN or any DNS/URI SAN."""
        for name in names:
            if name in self._by_certificate:
                return self._by_certificate[name]
        return None


class PrincipalStore:
    """A principals file re-read when it changes (a Secret or ConfigMap update, a new token). A
    file that no longer parses keeps the last good table, logged once per change."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._principals = Principals.load(self._path)  # at start a bad file is fatal

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = self._path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def current(self) -> Principals:
        stamp = self._stat()
        if stamp == self._stamp or stamp is None:
            return self._principals
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._principals = Principals.load(self._path)
                    log.info("principals file %s reloaded: %d principals", self._path, len(self._principals.names))
                except AuthConfigError as exc:
                    log.error("principals file changed but cannot be used, keeping the previous one: %s", exc)
        return self._principals


# --- deciding a call ------------------------------------------------------------------------------

CREDENTIALS_HINT = (
    "send 'authorization: Bearer <token>' metadata (the seal CLI: --token-file, auth.token_file or $SEAL_TOKEN) "
    "or a client certificate listed in the service's principals file"
)


def bearer_token(metadata: Iterable[tuple[str, Any]]) -> str | None:
    """The token of the ``authorization`` metadata; None when there is none. AuthError when it is
    there but not ``Bearer <token>``."""
    values = [value for key, value in metadata if key.lower() == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise AuthError("unauthenticated", "more than one authorization header: send exactly one 'Bearer <token>'")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("unauthenticated", "the authorization metadata must read 'Bearer <token>' (scheme Bearer, "
                        "then one space and the token)")
    return token.strip()


def authenticate_token(principals: Principals, token: str) -> Principal:
    principal = principals.by_token(token)
    if principal is None:
        raise AuthError(
            "unauthenticated",
            "the bearer token matches no principal of this service (revoked, mistyped, or from another "
            "deployment): ask an operator for a token whose sha256 is in auth.principals_file",
        )
    return principal


def unlisted_message(method: str) -> str:
    return f"{method} has no entry in seal.auth.METHOD_SCOPES, so nobody may call it (fail closed)"


def authorize(method: str, principal: Principal) -> None:
    """Raise AuthError(permission_denied) unless ``principal`` holds a scope ``method`` needs."""
    try:
        needed = required_scopes(method)
    except KeyError:
        raise AuthError("permission_denied", unlisted_message(method)) from None
    if needed is None or principal.scopes & needed:
        return
    raise AuthError(
        "permission_denied",
        f"principal {principal.name!r} has scope(s) {sorted(principal.scopes)} but {method} needs one of "
        f"{sorted(needed)}: ask an operator to add one to {principal.name!r} in the principals file, or call "
        f"as a principal that has it",
    )


# --- configuration checks -----------------------------------------------------------------------


def _readable(setting: str, path: str) -> str:
    if not Path(path).is_file():
        raise AuthConfigError(f"auth.{setting} = {path!r}: no such file")
    if not os.access(path, os.R_OK):
        raise AuthConfigError(f"auth.{setting} = {path!r}: not readable by this process")
    return path


def check_server_settings(auth: AuthSettings) -> None:
    """Raise AuthConfigError, naming the setting to change, unless a service can start securely
    with ``auth`` (or ``auth.insecure`` says it may start without)."""
    if auth.insecure:
        return
    how = ("set auth.principals_file and either auth.tls_cert_file + auth.tls_key_file (+ auth.tls_ca_file) or "
           "auth.plaintext=true; or, for a local demo only, auth.insecure=true (SEAL_AUTH__INSECURE=true). "
           "See docs/auth.md")
    if not auth.principals_file:
        raise AuthConfigError(f"authentication is on but auth.principals_file is empty: {how}")
    _readable("principals_file", auth.principals_file)
    tls = bool(auth.tls_cert_file or auth.tls_key_file)
    if tls and auth.plaintext:
        raise AuthConfigError("auth.plaintext is true but TLS files are set: choose one (plaintext sends tokens in clear)")
    if not tls and not auth.plaintext:
        raise AuthConfigError(f"authentication is on but no TLS certificate is set and auth.plaintext is false: {how}")
    if tls:
        if not (auth.tls_cert_file and auth.tls_key_file):
            raise AuthConfigError("auth.tls_cert_file and auth.tls_key_file go together: set both")
        _readable("tls_cert_file", auth.tls_cert_file)
        _readable("tls_key_file", auth.tls_key_file)
        if auth.require_client_cert and not auth.tls_ca_file:
            raise AuthConfigError(
                "auth.require_client_cert needs auth.tls_ca_file (the CA that signs client certificates); "
                "or set auth.require_client_cert=false for server-only TLS with tokens"
            )
        if auth.tls_ca_file:
            _readable("tls_ca_file", auth.tls_ca_file)


# --- the caller's side ----------------------------------------------------------------------------


class TokenSource:
    """The bearer token a caller sends, read from a file (re-read when it changes, so a rotated
    Secret takes effect without a restart) or given as is."""

    def __init__(self, *, path: str = "", token: str = "", origin: str = "") -> None:
        self._path = Path(path) if path else None
        self._token = token.strip()
        self._stamp: tuple[int, int] | None = None
        self.origin = origin or (f"file {path}" if path else "a token")
        self._lock = threading.Lock()
        if self._path is not None:
            self.token()  # a missing or empty file fails at start, not at the first call

    def token(self) -> str:
        if self._path is None:
            return self._token
        try:
            stat = self._path.stat()
        except OSError as exc:
            raise AuthConfigError(f"cannot read the token file {self._path}: {exc}") from exc
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            with self._lock:
                token = self._path.read_text(encoding="utf-8").strip()
                if not token:
                    raise AuthConfigError(f"the token file {self._path} is empty")
                if any(c.isspace() for c in token):
                    raise AuthConfigError(f"the token file {self._path} holds more than one word: put the token alone")
                self._token, self._stamp = token, stamp
        return self._token


def client_token(
    auth: AuthSettings, *, identity: str | None = None, token_file: str = "", environ: Mapping[str, str] | None = None
) -> TokenSource | None:
    """The token a caller sends: a service's own (``identity`` teacher/student/auditor: its
    ``auth.<identity>_token_file``), else ``token_file`` (the CLI's --token-file), else
    ``auth.token_file``, else ``$SEAL_TOKEN``; None when there is none."""
    if identity is not None:
        if identity not in SERVICE_IDENTITIES:
            raise ValueError(f"unknown service identity {identity!r}")
        path = getattr(auth, f"{identity}_token_file")
        return TokenSource(path=path, origin=f"auth.{identity}_token_file") if path else None
    if token_file:
        return TokenSource(path=token_file, origin="--token-file")
    if auth.token_file:
        return TokenSource(path=auth.token_file, origin="auth.token_file")
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_ENV, "").strip():
        return TokenSource(token=environ[TOKEN_ENV], origin=f"${TOKEN_ENV}")
    return None
