"""Serving the student through a real Triton Inference Server.

``TritonBackend`` is the student's ``seal.serving.ServingBackend`` over Triton.
``TritonSupervisor`` runs ``tritonserver`` with the student model (a base causal LM plus PEFT LoRA
adapters, ``model_repository/model.py``); ``TritonStudentClient`` generates and swaps adapters
without a restart by publishing a ``ServingState``. ``tritonclient`` is imported lazily, so the
pure parts (state, config rendering) work without it.
"""

from seal.serving.triton.state import BASE_VERSION, ServingState, ServingStateError, read_state, write_state

__all__ = [
    "BASE_VERSION",
    "ServingState",
    "ServingStateError",
    "read_state",
    "write_state",
    "TritonBackend",
    "TritonSupervisor",
    "TritonInstall",
    "TritonError",
    "TritonNotInstalled",
    "TritonStartError",
    "TritonStudentClient",
    "TritonGenerationEngine",
    "TritonClientError",
    "TritonUnavailable",
    "TritonRequestRejected",
    "AdapterSwapError",
    "Generation",
    "Health",
]

_SERVER = {"TritonSupervisor", "TritonInstall", "TritonError", "TritonNotInstalled", "TritonStartError"}
_CLIENT = {"TritonStudentClient", "TritonGenerationEngine", "TritonClientError", "TritonUnavailable", "TritonRequestRejected",
           "AdapterSwapError", "Generation", "Health"}


def __getattr__(name: str):
    if name == "TritonBackend":
        from seal.serving.triton import backend

        return backend.TritonBackend
    if name in _SERVER:
        from seal.serving.triton import server

        return getattr(server, name)
    if name in _CLIENT:
        from seal.serving.triton import client

        return getattr(client, name)
    raise AttributeError(name)
