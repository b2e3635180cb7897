"""How the CLI reaches a service: a channel with the caller's credentials, and the --token-file
argument of every command that calls one."""

from __future__ import annotations

import argparse

import grpc

from seal.config import AuthSettings


def add_token_arg(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--token-file", default="",
                     help="file holding the bearer token to send (default auth.token_file, then $SEAL_TOKEN)")


def client_channel(address: str, auth: AuthSettings | None, token_file: str = "") -> grpc.Channel:
    """A channel with the client's credentials (seal.rpc.dial: TLS per auth.tls_ca_file, the token
    of --token-file, auth.token_file or $SEAL_TOKEN); plaintext without a token when ``auth`` is
    None (benchmarks and tests that run their own insecure stack)."""
    from seal.rpc import dial

    return grpc.insecure_channel(address) if auth is None else dial(address, auth, token_file=token_file)
