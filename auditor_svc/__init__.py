"""gRPC entry point of the auditor: thin wrapper over ``seal.auditor`` and ``seal.guardrails``."""
