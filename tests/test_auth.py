"""Authentication and authorisation of every RPC (seal/auth.py, seal/rpc.py; docs/auth.md).

Every RPC is walked from the proto descriptors against the real services (tiny model, loopback,
mutual TLS with certificates made here): no credentials → UNAUTHENTICATED, every scope it does
not accept → PERMISSION_DENIED, every scope it accepts → anything but an auth error. A new RPC
without an entry in seal.auth.METHOD_SCOPES fails here and keeps its service from starting.
Also: the TLS handshake (no client certificate, wrong CA), service identities end to end, the
plaintext-token mode, the CLI's tokens, and the concurrency limit that health checks skip."""

from __future__ import annotations

import datetime
import importlib
import ipaddress
import json
import logging
import pkgutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import seal.v1
from seal import auth as authz
from seal.config import AuthSettings, Settings
from seal.rpc import RpcMetrics, dial, start_service
from seal.v1 import (
    auditor_pb2,
    auditor_pb2_grpc,
    common_pb2,
    student_pb2,
    student_pb2_grpc,
    teacher_pb2,
    teacher_pb2_grpc,
)

AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# One principal per scope, so that "a wrong scope" is tried with every scope a method does not take.
USERS = {scope: f"only-{scope.replace(':', '-')}" for scope in authz.SCOPES}
SERVICE_PRINCIPALS = {"teacher": authz.SERVICE_TEACHER, "student": authz.SERVICE_STUDENT, "auditor": authz.SERVICE_AUDITOR}
PASSAGE = (
    "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by the "
    "cartographer Ilse Marrow. The town's lighthouse, the Grey Lantern, is 41 meters tall."
)


# --- certificates (a throwaway CA, made with the cryptography package) -----------------------------


def _certificates(directory: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def write(name: str, data: bytes) -> None:
        paths[name] = directory / name
        paths[name].write_bytes(data)

    def key_pem(key: Any) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def ca(name: str) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False),
                               critical=True)
                .sign(key, hashes.SHA256()))
        write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
        return key, cert

    def issue(ca_key: Any, ca_cert: Any, name: str, common_name: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.DNSName(common_name),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
        write(f"{name}.key", key_pem(key))

    ca_key, ca_cert = ca("seal-test-ca")
    issue(ca_key, ca_cert, "service", "seal-service")  # the services' server and client certificate
    issue(ca_key, ca_cert, "nobody", "nobody.example")  # valid, but no principal has its name
    issue(ca_key, ca_cert, "ops", "ops.example")  # a principal by certificate alone
    rogue_key, rogue_cert = ca("rogue-ca")
    issue(rogue_key, rogue_cert, "rogue", "ops.example")  # the right name, from the wrong CA
    return paths


@dataclass
class Credentials:
    directory: Path
    certs: dict[str, Path]
    tokens: dict[str, str]  # principal name → token
    token_files: dict[str, Path]
    principals_file: Path


def _credentials(directory: Path, *, certificates: bool = True) -> Credentials:
    certs = _certificates(directory / "tls") if certificates else {}
    names = [*USERS.values(), *SERVICE_PRINCIPALS]
    tokens = {name: authz.new_token() for name in names}
    token_files: dict[str, Path] = {}
    for name, token in tokens.items():
        token_files[name] = directory / "tokens" / name
        token_files[name].parent.mkdir(parents=True, exist_ok=True)
        token_files[name].write_text(token + "\n")
    entries: list[dict[str, Any]] = [
        {"name": user, "scopes": [scope], "token_sha256": authz.token_sha256(tokens[user])} for scope, user in USERS.items()
    ]
    entries += [{"name": service, "scopes": [scope], "token_sha256": authz.token_sha256(tokens[service])}
                for service, scope in SERVICE_PRINCIPALS.items()]
    entries.append({"name": "ops-by-certificate", "scopes": [authz.ADMIN, authz.READ], "certificate_names": ["ops.example"]})
    # YAML, as an operator would write it (JSON parses too).
    principals_file = directory / "principals.yaml"
    import yaml

    principals_file.write_text(yaml.safe_dump({"principals": entries}))
    return Credentials(directory, certs, tokens, token_files, principals_file)


def _mtls_auth(creds: Credentials) -> AuthSettings:
    return AuthSettings(
        insecure=False,
        principals_file=str(creds.principals_file),
        tls_cert_file=str(creds.certs["service.crt"]),
        tls_key_file=str(creds.certs["service.key"]),
        tls_ca_file=str(creds.certs["seal-test-ca.crt"]),
        **{f"{service}_token_file": str(creds.token_files[service]) for service in SERVICE_PRINCIPALS},
    )


def _client_auth(creds: Credentials, cert: str = "nobody", ca: str = "seal-test-ca") -> AuthSettings:
    """What a client outside the services holds: the CA, its own certificate, no service token."""
    return AuthSettings(
        insecure=False,
        tls_cert_file=str(creds.certs[f"{cert}.crt"]) if cert else "",
        tls_key_file=str(creds.certs[f"{cert}.key"]) if cert else "",
        tls_ca_file=str(creds.certs[f"{ca}.crt"]),
    )


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


# --- the table and its pieces, without a server ----------------------------------------------------


def _descriptor_methods() -> Iterator[Any]:
    """Every RPC of every proto under seal/v1, from the generated descriptors."""
    for module_info in pkgutil.iter_modules(seal.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"seal.v1.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            yield from service.methods


def _full_name(method: Any) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def test_every_rpc_of_the_protos_has_a_scope_entry() -> None:
    methods = [_full_name(m) for m in _descriptor_methods()]
    assert len(methods) >= 15
    assert authz.unlisted_methods(methods) == [], "add these to seal.auth.METHOD_SCOPES"
    for method, scopes in authz.METHOD_SCOPES.items():
        assert scopes and scopes <= set(authz.SCOPES), method
    # No stale entries: everything listed is a real RPC (or reflection).
    assert set(authz.METHOD_SCOPES) - set(methods) == {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}


def test_docs_auth_md_shows_the_table_as_it_is() -> None:
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "auth.md").read_text(encoding="utf-8")
    documented = {m: frozenset(s.strip() for s in scopes.split(","))
                  for m, scopes in re.findall(r"^\| `(/[^`*]+)` \| ([^|]+) \|$", text, flags=re.M)}
    assert documented == authz.METHOD_SCOPES


def test_the_default_is_secure_and_says_how_to_opt_out() -> None:
    assert AuthSettings().insecure is False
    with pytest.raises(authz.AuthConfigError) as refused:
        authz.check_server_settings(AuthSettings())
    assert "auth.principals_file" in str(refused.value) and "auth.insecure" in str(refused.value)
    authz.check_server_settings(AuthSettings(insecure=True))


def test_server_settings_are_checked_with_the_setting_to_change(tmp_path: Path) -> None:
    principals = tmp_path / "p.json"
    principals.write_text(json.dumps([{"name": "x", "scopes": ["read"], "token_sha256": "0" * 64}]))
    base = {"principals_file": str(principals)}
    with pytest.raises(authz.AuthConfigError, match="auth.plaintext"):
        authz.check_server_settings(AuthSettings(**base))
    authz.check_server_settings(AuthSettings(**base, plaintext=True))
    with pytest.raises(authz.AuthConfigError, match="tls_key_file = .*no such file"):
        authz.check_server_settings(AuthSettings(**base, tls_cert_file=str(principals), tls_key_file="/nope"))
    with pytest.raises(authz.AuthConfigError, match="require_client_cert needs auth.tls_ca_file"):
        authz.check_server_settings(AuthSettings(**base, tls_cert_file=str(principals), tls_key_file=str(principals)))
    with pytest.raises(authz.AuthConfigError, match="choose one"):
        authz.check_server_settings(AuthSettings(**base, plaintext=True, tls_cert_file=str(principals),
                                                 tls_key_file=str(principals)))


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "a", "scopes": ["read"], "token": "plain"}, "plain token"),
    ({"name": "a", "scopes": ["rread"], "token_sha256": "0" * 64}, "unknown scope"),
    ({"name": "a", "scopes": ["read"], "token_sha256": "xyz"}, "64 hex digits"),
    ({"name": "a", "scopes": ["read"]}, "needs token_sha256 or certificate_names"),
    ({"name": "a", "scopes": [], "token_sha256": "0" * 64}, "at least 1"),
    ({"name": "a b", "scopes": ["read"], "token_sha256": "0" * 64}, "pattern"),
])
def test_a_bad_principals_file_is_refused_with_the_reason(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(authz.AuthConfigError, match=message):
        authz.Principals.parse([entry])


def test_tokens_are_matched_by_hash_and_never_echoed() -> None:
    token = authz.new_token()
    principals = authz.Principals.parse(
        {"principals": [{"name": "ops", "scopes": ["admin"], "token_sha256": authz.token_sha256(token)}]})
    assert principals.by_token(token) == authz.Principal("ops", frozenset({"admin"}))
    assert principals.by_token(token + "x") is None
    with pytest.raises(authz.AuthError) as bad:
        authz.authenticate_token(principals, "guessed-token-123")
    assert bad.value.code == "unauthenticated" and "guessed-token-123" not in str(bad.value)
    with pytest.raises(authz.AuthError) as malformed:
        authz.bearer_token([("authorization", "Basic c2VjcmV0")])
    assert "c2VjcmV0" not in str(malformed.value)
    assert authz.bearer_token([("authorization", f"Bearer {token}")]) == token
    assert authz.bearer_token([("x-other", "1")]) is None
    with pytest.raises(authz.AuthError, match="needs one of \\['admin', 'service:teacher'\\]"):
        authz.authorize("/seal.v1.StudentService/Promote", authz.Principal("reader", frozenset({"read"})))
    with pytest.raises(authz.AuthError, match="fail closed"):
        authz.authorize("/seal.v1.StudentService/Unknown", authz.Principal("ops", frozenset(authz.SCOPES)))
    with pytest.raises(authz.AuthConfigError, match="share a token_sha256"):
        authz.Principals.parse([{"name": n, "scopes": ["read"], "token_sha256": "a" * 64} for n in ("x", "y")])


def test_the_principals_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "principals.json"
    first, second = authz.new_token(), authz.new_token()
    path.write_text(json.dumps([{"name": "a", "scopes": ["read"], "token_sha256": authz.token_sha256(first)}]))
    store = authz.PrincipalStore(path)
    assert store.current().by_token(first) is not None
    path.write_text(json.dumps([{"name": "b", "scopes": ["read"], "token_sha256": authz.token_sha256(second)}]) + " ")
    assert store.current().by_token(first) is None and store.current().by_token(second).name == "b"
    path.write_text("{not json")  # a broken update keeps the last good table
    assert store.current().by_token(second).name == "b"


def test_client_token_sources_and_their_order(tmp_path: Path) -> None:
    file = tmp_path / "token"
    file.write_text("from-file\n")
    auth = AuthSettings(token_file=str(file), teacher_token_file=str(file))
    assert authz.client_token(auth, environ={"SEAL_TOKEN": "env"}).token() == "from-file"
    assert authz.client_token(AuthSettings(), environ={"SEAL_TOKEN": "env"}).token() == "env"
    assert authz.client_token(AuthSettings(), environ={}) is None
    assert authz.client_token(AuthSettings(), identity="student", environ={"SEAL_TOKEN": "env"}) is None
    assert authz.client_token(auth, identity="teacher").token() == "from-file"
    file.write_text("rotated\n")
    assert authz.client_token(auth, identity="teacher").token() == "rotated"
    # A token never travels in clear unless auth.plaintext says so.
    with pytest.raises(authz.AuthConfigError, match="auth.plaintext"):
        dial("127.0.0.1:9", auth)
    dial("127.0.0.1:9", auth.model_copy(update={"plaintext": True})).close()
    dial("127.0.0.1:9", auth, with_token=False).close()


# --- the real services with mutual TLS and tokens ----------------------------------------------------


def _tiny_settings(home: Path, model_dir: Path, auth: AuthSettings) -> Settings:
    return Settings(
        home=home,
        model={"path": str(model_dir)},
        lora={"epochs": 1, "batch_size": 4, "max_seq_len": 64},
        teacher={"max_new_tokens": 24, "default_k": 1},
        auditor={"answer_max_new_tokens": 6},
        gates={"min_gain": -1.0},
        guardrails={"unknown_entities": {"enabled": False}},
        auth=auth,
    )


@pytest.fixture(scope="module")
def secure(one_torch_thread, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from seal.stack import local_stack

    root = tmp_path_factory.mktemp("secure")
    creds = _credentials(root / "creds")
    settings = _tiny_settings(root / "home", tiny_model_dir, _mtls_auth(creds))
    with local_stack(settings) as stack:
        yield {"stack": stack, "creds": creds}


def _hosts(stack: Any) -> dict[str, str]:
    return {"seal.v1.TeacherService": stack.teacher.address, "seal.v1.StudentService": stack.student.address,
            "seal.v1.AuditorService": stack.auditor.address}


def _call(channel: grpc.Channel, method: Any, token: str | None, timeout: float) -> grpc.StatusCode:
    """Call ``method`` with an empty request; the status code it ends with."""
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = _full_name(method)
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, request_class.SerializeToString, response_class.FromString)
            for _ in call(request_class(), metadata=_metadata(token), timeout=timeout):
                pass
        else:
            call = channel.unary_unary(path, request_class.SerializeToString, response_class.FromString)
            call(request_class(), metadata=_metadata(token), timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_rpc_refuses_no_credentials_and_wrong_scopes_and_admits_its_scopes(secure) -> None:
    stack, creds = secure["stack"], secure["creds"]
    hosts = _hosts(stack)
    channels = {address: dial(address, _client_auth(creds)) for address in hosts.values()}
    principal_of_scope = {**USERS, **{scope: service for service, scope in SERVICE_PRINCIPALS.items()}}
    outcomes: dict[str, dict[str, grpc.StatusCode]] = {}
    try:
        for method in _descriptor_methods():
            name = _full_name(method)
            service = method.containing_service.full_name
            assert service in hosts, f"{service} is served by none of the stack's services: extend this test"
            channel = channels[hosts[service]]
            allowed = authz.METHOD_SCOPES[name]
            seen = outcomes[name] = {}
            seen["none"] = _call(channel, method, None, 10)
            seen["bad token"] = _call(channel, method, "seal_not-a-real-token", 10)
            for scope in authz.SCOPES:
                seen[scope] = _call(channel, method, creds.tokens[principal_of_scope[scope]], 2 if
                                    method.server_streaming and scope in allowed else 60)
            assert seen["none"] is grpc.StatusCode.UNAUTHENTICATED, (name, seen)
            assert seen["bad token"] is grpc.StatusCode.UNAUTHENTICATED, (name, seen)
            for scope in authz.SCOPES:
                if scope in allowed:
                    assert seen[scope] not in AUTH_CODES, (name, scope, seen[scope])
                else:
                    assert seen[scope] is grpc.StatusCode.PERMISSION_DENIED, (name, scope, seen[scope])
    finally:
        for channel in channels.values():
            channel.close()
    assert len(outcomes) >= 15


def test_refusals_say_what_to_do_and_never_echo_the_token(secure) -> None:
    stack, creds = secure["stack"], secure["creds"]
    with dial(stack.student.address, _client_auth(creds)) as channel:
        stub = student_pb2_grpc.StudentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.Promote(student_pb2.PromoteRequest(adapter_id="default@v1"), timeout=10)
        assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer" in missing.value.details() and "--token-file" in missing.value.details()
        with pytest.raises(grpc.RpcError) as bad:
            stub.Promote(student_pb2.PromoteRequest(adapter_id="default@v1"), timeout=10,
                         metadata=_metadata("seal_leaky-guess"))
        assert bad.value.code() is grpc.StatusCode.UNAUTHENTICATED and "leaky-guess" not in bad.value.details()
        with pytest.raises(grpc.RpcError) as wrong:
            stub.Promote(student_pb2.PromoteRequest(adapter_id="default@v1"), timeout=10,
                         metadata=_metadata(creds.tokens[USERS["read"]]))
        assert wrong.value.code() is grpc.StatusCode.PERMISSION_DENIED
        details = wrong.value.details()
        assert "only-read" in details and "admin" in details and creds.tokens[USERS["read"]] not in details


def test_health_is_open_and_reflection_needs_read(secure) -> None:
    stack, creds = secure["stack"], secure["creds"]
    for address in _hosts(stack).values():
        with dial(address, _client_auth(creds), with_token=False) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as anonymous:
                list(stub.ServerReflectionInfo(iter([ask]), timeout=10))
            assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as generator:
                list(stub.ServerReflectionInfo(iter([ask]), timeout=10,
                                               metadata=_metadata(creds.tokens[USERS["generate"]])))
            assert generator.value.code() is grpc.StatusCode.PERMISSION_DENIED
            [answer] = list(stub.ServerReflectionInfo(iter([ask]), timeout=10,
                                                      metadata=_metadata(creds.tokens[USERS["read"]])))
            assert any(s.name.startswith("seal.v1.") for s in answer.list_services_response.service)


def _health(address: str, auth: AuthSettings) -> grpc.StatusCode:
    with dial(address, auth, with_token=False) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_mutual_tls_refuses_no_certificate_and_the_wrong_ca(secure) -> None:
    stack, creds = secure["stack"], secure["creds"]
    address = stack.student.address
    assert _health(address, _client_auth(creds)) is grpc.StatusCode.OK
    # No client certificate: the handshake itself fails.
    assert _health(address, _client_auth(creds, cert="")) is grpc.StatusCode.UNAVAILABLE
    # A certificate from another CA, even with a principal's name: refused too.
    assert _health(address, _client_auth(creds, cert="rogue")) is grpc.StatusCode.UNAVAILABLE
    # Trusting the wrong CA: the client refuses the service's certificate.
    assert _health(address, _client_auth(creds, ca="rogue-ca")) is grpc.StatusCode.UNAVAILABLE
    # Plaintext to a TLS port: nothing gets through.
    assert _health(address, AuthSettings(insecure=True)) is grpc.StatusCode.UNAVAILABLE


def test_a_client_certificate_named_in_the_principals_file_is_a_principal(secure) -> None:
    stack, creds = secure["stack"], secure["creds"]
    with dial(stack.student.address, _client_auth(creds, cert="ops")) as channel:
        stub = student_pb2_grpc.StudentServiceStub(channel)
        assert stub.ListAdapters(student_pb2.ListAdaptersRequest(), timeout=30) is not None  # read, by certificate
        with pytest.raises(grpc.RpcError) as denied:
            stub.Generate(student_pb2.GenerateRequest(prompts=["hi"]), timeout=30)
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED and "ops-by-certificate" in denied.value.details()
    with dial(stack.student.address, _client_auth(creds, cert="nobody")) as channel:
        with pytest.raises(grpc.RpcError) as unknown:
            student_pb2_grpc.StudentServiceStub(channel).ListAdapters(student_pb2.ListAdaptersRequest(), timeout=30)
        assert unknown.value.code() is grpc.StatusCode.UNAUTHENTICATED and "nobody.example" in unknown.value.details()


def test_service_identities_carry_a_whole_adapt_and_the_audit_names_who_asked(secure) -> None:
    """teacher→student (ApplySelfEdit, Generate, Promote/Reject), teacher→auditor (CheckSelfEdit,
    Score), auditor→student (Generate, GetAdapter), student→auditor (RecordEvent): each with its
    own token, over mutual TLS."""
    from seal.audit import AuditLog

    stack, creds = secure["stack"], secure["creds"]
    request = teacher_pb2.AdaptRequest(
        context=common_pb2.Context(title="Velmora", passage=PASSAGE),
        questions=[common_pb2.Question(question="Who founded Velmora?", answer="Ilse Marrow")], k=1, seed=3,
    )
    with dial(stack.teacher.address, _client_auth(creds)) as channel:
        events = list(teacher_pb2_grpc.TeacherServiceStub(channel).Adapt(
            request, timeout=600, metadata=_metadata(creds.tokens[USERS["adapt"]])))
    result = events[-1].result
    assert [c.adapter_id for c in result.candidates if c.adapter_id], [c.failure for c in result.candidates]
    assert result.promoted, result  # min_gain −1: the scored candidate passes
    with dial(stack.student.address, _client_auth(creds)) as channel:
        student_pb2_grpc.StudentServiceStub(channel).Rollback(
            student_pb2.RollbackRequest(reason="auth test", allow_base_model=True), timeout=60,
            metadata=_metadata(creds.tokens[USERS["admin"]]))
    deadline = time.monotonic() + 20
    while True:
        with AuditLog(stack.settings.audit_log_path) as log:
            promotes = log.records(kind="promote", adapter_id=result.adapter_id)
            rollbacks = log.records(kind="rollback", adapter_id=result.adapter_id)
            ok = log.verify().ok
        if (promotes and rollbacks) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ok and promotes and rollbacks, "the student's RecordEvent did not reach the auditor"
    assert promotes[0].payload["principal"] == "teacher" and promotes[0].payload["source"] == "student"
    assert rollbacks[0].payload["principal"] == USERS["admin"]


def test_the_cli_sends_its_token(secure, tmp_path: Path, monkeypatch, capsys) -> None:
    from seal import cli

    stack, creds = secure["stack"], secure["creds"]
    client = stack.settings.model_copy(update={"auth": _client_auth(creds)})
    monkeypatch.setattr(cli, "get_settings", lambda: client)
    monkeypatch.delenv("SEAL_TOKEN", raising=False)
    assert cli.main(["adapters", "list", "--token-file", str(creds.token_files[USERS["read"]])]) == 0
    assert cli.main(["adapters", "list"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().out
    monkeypatch.setenv("SEAL_TOKEN", creds.tokens[USERS["generate"]])
    assert cli.main(["adapters", "list"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().out
    assert cli.main(["generate", "hello", "--max-new-tokens", "2"]) == 0
    assert cli.main(["health", "--address", f"student={stack.student.address}"]) == 0  # open, over mutual TLS


# --- one service alone: plaintext tokens, failing closed, insecure, the limiter --------------------


def _auditor(home: Path, auth: AuthSettings, *, max_workers: int = 4, max_concurrent_rpcs: int = 8,
             configured: bool = False, probe_port: int | None = None, tracing: Any = None,
             metrics_port: Any = 0, services: dict[str, Any] | None = None):
    """The real auditor servicer on port 0 (its student is never called here)."""
    from auditor_svc.servicer import AuditorServicer
    from seal.rpc import start_configured_service

    settings = Settings(home=home, auth=auth, services=services or {})
    metrics = RpcMetrics("auditor")
    servicer = AuditorServicer(settings, grpc.insecure_channel("127.0.0.1:9"), metrics)

    def register(server: grpc.Server) -> list[str]:
        auditor_pb2_grpc.add_AuditorServiceServicer_to_server(servicer, server)
        return [auditor_pb2.DESCRIPTOR.services_by_name["AuditorService"].full_name]

    if configured:
        running = start_configured_service("auditor", register, settings.services, metrics, auth=auth, port=0,
                                           metrics_port=metrics_port)
    else:
        running = start_service("auditor", register, host="127.0.0.1", port=0, metrics=metrics, metrics_port=None,
                                max_workers=max_workers, max_concurrent_rpcs=max_concurrent_rpcs, auth=auth,
                                probe_port=probe_port, tracing=tracing)
    running.on_stop.append(servicer.core.close)
    return running


def _event(event_id: str = "e1") -> auditor_pb2.RecordEventRequest:
    return auditor_pb2.RecordEventRequest(event_id=event_id, kind="reject", adapter_id="default@v1",
                                          cause="auth test", source="student")


def test_plaintext_mode_still_checks_tokens_and_scopes(tmp_path: Path) -> None:
    creds = _credentials(tmp_path / "creds", certificates=False)
    server_auth = AuthSettings(principals_file=str(creds.principals_file), plaintext=True)
    auditor = _auditor(tmp_path / "home", server_auth)
    try:
        # The student's identity, sent by the client interceptor (grpc refuses call credentials here).
        as_student = AuthSettings(plaintext=True, student_token_file=str(creds.token_files["student"]))
        with dial(auditor.address, as_student, identity="student") as channel:
            reply = auditor_pb2_grpc.AuditorServiceStub(channel).RecordEvent(_event(), timeout=30)
            assert reply.sequence >= 1 and not reply.duplicate
        with dial(auditor.address, AuthSettings(plaintext=True, teacher_token_file=str(creds.token_files["teacher"])),
                  identity="teacher") as channel:
            with pytest.raises(grpc.RpcError) as forged:
                auditor_pb2_grpc.AuditorServiceStub(channel).RecordEvent(_event("e2"), timeout=30)
            assert forged.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "may report policy_promote" in forged.value.details()
            # The teacher reports its own policy's transitions, and only those.
            policy = _event("e4")
            policy.kind, policy.adapter_id = "policy_promote", "teacher-policy@v1"
            assert auditor_pb2_grpc.AuditorServiceStub(channel).RecordEvent(policy, timeout=30).sequence >= 1
        with dial(auditor.address, as_student, identity="student") as channel:
            policy.event_id = "e5"
            with pytest.raises(grpc.RpcError) as not_the_students:
                auditor_pb2_grpc.AuditorServiceStub(channel).RecordEvent(policy, timeout=30)
            assert not_the_students.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with grpc.insecure_channel(auditor.address) as channel:
            with pytest.raises(grpc.RpcError) as anonymous:
                auditor_pb2_grpc.AuditorServiceStub(channel).RecordEvent(_event("e3"), timeout=30)
            assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        auditor.stop(grace=0.5)


def test_tokens_compose_with_tracing_on_both_sides(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from seal.config import TracingSettings
    from seal.rpc import traced_channel
    from seal.tracing import build_tracing

    creds = _credentials(tmp_path / "creds", certificates=False)
    server_spans, client_spans = InMemorySpanExporter(), InMemorySpanExporter()
    auditor = _auditor(tmp_path / "home", AuthSettings(principals_file=str(creds.principals_file), plaintext=True),
                       tracing=build_tracing("auditor", TracingSettings(), exporter=server_spans))
    client_tracing = build_tracing("student", TracingSettings(), exporter=client_spans)
    try:
        as_student = AuthSettings(plaintext=True, student_token_file=str(creds.token_files["student"]))
        with traced_channel(dial(auditor.address, as_student, identity="student"), client_tracing) as channel:
            assert auditor_pb2_grpc.AuditorServiceStub(channel).RecordEvent(_event(), timeout=30).sequence >= 1
        with traced_channel(grpc.insecure_channel(auditor.address), client_tracing) as channel:
            with pytest.raises(grpc.RpcError) as anonymous:
                auditor_pb2_grpc.AuditorServiceStub(channel).RecordEvent(_event("e2"), timeout=30)
            assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        auditor.stop(grace=0.5)
        client_tracing.shutdown()
    spans = [span for span in server_spans.get_finished_spans() if span.name.endswith("RecordEvent")]
    codes = sorted(span.attributes.get("rpc.grpc.status_code") for span in spans)
    assert codes == [grpc.StatusCode.OK.value[0], grpc.StatusCode.UNAUTHENTICATED.value[0]]
    client_trace_ids = {span.context.trace_id for span in client_spans.get_finished_spans()}
    assert {span.context.trace_id for span in spans} <= client_trace_ids  # one trace across the call


def test_a_method_without_a_scope_entry_keeps_its_service_from_starting_and_is_refused(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    creds = _credentials(tmp_path / "creds", certificates=False)
    server_auth = AuthSettings(principals_file=str(creds.principals_file), plaintext=True)
    with monkeypatch.context() as patched:
        patched.delitem(authz.METHOD_SCOPES, "/seal.v1.AuditorService/RecordEvent")
        with pytest.raises(RuntimeError, match="RecordEvent"):
            _auditor(tmp_path / "home", server_auth)
    auditor = _auditor(tmp_path / "home2", server_auth)
    try:
        monkeypatch.delitem(authz.METHOD_SCOPES, "/seal.v1.AuditorService/RecordEvent")
        with grpc.insecure_channel(auditor.address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                auditor_pb2_grpc.AuditorServiceStub(channel).RecordEvent(
                    _event(), timeout=30, metadata=_metadata(creds.tokens["student"]))
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED and "fail closed" in refused.value.details()
    finally:
        auditor.stop(grace=0.5)


def test_kubernetes_probes_get_a_plaintext_health_only_port_beside_mutual_tls(tmp_path: Path) -> None:
    creds = _credentials(tmp_path / "creds")
    auditor = _auditor(tmp_path / "home", _mtls_auth(creds), probe_port=0)
    try:
        assert auditor.probe_port and auditor.probe_port != auditor.port
        probe_address = f"127.0.0.1:{auditor.probe_port}"
        with grpc.insecure_channel(probe_address) as channel:  # what the kubelet does: plaintext, no credentials
            for service in ("", "seal.v1.AuditorService"):
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                   timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as nothing_else:
                auditor_pb2_grpc.AuditorServiceStub(channel).RecordEvent(_event(), timeout=10)
            assert nothing_else.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert _health(auditor.address, AuthSettings(insecure=True)) is grpc.StatusCode.UNAVAILABLE
        auditor.health.enter_graceful_shutdown()  # the probe port says so too
        with grpc.insecure_channel(probe_address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        auditor.stop(grace=0.5)


def test_the_default_settings_refuse_to_start(tmp_path: Path) -> None:
    with pytest.raises(authz.AuthConfigError, match="principals_file"):
        _auditor(tmp_path / "home", AuthSettings())


def test_metrics_port_none_means_no_endpoint_and_configured_means_the_setting(tmp_path: Path) -> None:
    """One meaning per value wherever a service starts: None = no /metrics, CONFIGURED = the
    settings' port (here a free one found first, never a default another process may hold)."""
    import socket

    from seal.rpc import CONFIGURED

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    auth = AuthSettings(insecure=True)
    without = _auditor(tmp_path / "a", auth, configured=True, metrics_port=None)
    try:
        assert without.metrics_port is None
    finally:
        without.stop(grace=0.5)
    configured = _auditor(tmp_path / "b", auth, configured=True, metrics_port=CONFIGURED,
                          services={"auditor_metrics_port": free})
    try:
        assert configured.metrics_port == free
        body = urllib.request.urlopen(f"http://127.0.0.1:{free}/metrics", timeout=5).read().decode()
        assert "seal_auditor_rpc_requests_total" in body
    finally:
        configured.stop(grace=0.5)


def test_insecure_warns_and_reflection_and_metrics_can_be_turned_off(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="seal.rpc")
    auditor = _auditor(tmp_path / "home", AuthSettings(insecure=True, reflection=False, metrics_endpoint=False),
                       configured=True)
    try:
        assert any("auth.insecure is on" in r.getMessage() for r in caplog.records)
        assert auditor.metrics_port is None
        with grpc.insecure_channel(auditor.address) as channel:
            with pytest.raises(grpc.RpcError) as no_reflection:
                list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            assert no_reflection.value.code() is grpc.StatusCode.UNIMPLEMENTED
            reply = auditor_pb2_grpc.AuditorServiceStub(channel).RecordEvent(_event(), timeout=30)
            assert reply.sequence >= 1
    finally:
        auditor.stop(grace=0.5)


def test_health_answers_while_the_rpc_limit_is_saturated(tmp_path: Path) -> None:
    """grpc's maximum_concurrent_rpcs counted health checks too: a flooded service failed its
    probes. Two standing streams fill a limit of 2 on one worker thread; health still answers."""
    auditor = _auditor(tmp_path / "home", AuthSettings(insecure=True), max_workers=1, max_concurrent_rpcs=2)
    channel = grpc.insecure_channel(auditor.address)
    stub = auditor_pb2_grpc.AuditorServiceStub(channel)
    streams = []
    try:
        streams = [stub.SubscribeRewards(auditor_pb2.SubscribeRewardsRequest(), timeout=120) for _ in range(2)]

        def third_call() -> grpc.StatusCode:
            try:
                stub.RecordEvent(auditor_pb2.RecordEventRequest(), timeout=10)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        deadline = time.monotonic() + 30
        while (code := third_call()) is not grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline:
            time.sleep(0.1)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        health_stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(10):
            reply = health_stub.Check(health_pb2.HealthCheckRequest(service="seal.v1.AuditorService"), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for stream in streams:
            stream.cancel()
        # Cancelled streams give their slots back: the next call is judged on its content again.
        deadline = time.monotonic() + 30
        while (code := third_call()) is grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline:
            time.sleep(0.1)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        for stream in streams:
            stream.cancel()
        channel.close()
        auditor.stop(grace=0.5)


def test_seal_up_refuses_an_unconfigured_secure_start_and_takes_insecure_explicitly(monkeypatch, capsys) -> None:
    from seal import cli
    from seal.cli.services import with_insecure

    monkeypatch.setattr(cli, "get_settings", lambda: Settings(auth=AuthSettings()))
    assert cli.main(["up"]) == 2  # before any child starts
    out = capsys.readouterr().out
    assert "auth.principals_file" in out and "insecure" in out
    assert cli.build_parser().parse_args(["up", "--insecure"]).insecure
    assert cli.build_parser().parse_args(["demo", "--insecure"]).insecure
    insecure = with_insecure(Settings(auth=AuthSettings()), True)
    assert insecure.auth.insecure and "authentication is OFF" in capsys.readouterr().out
