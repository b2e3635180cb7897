"""The Triton model the student serves: ``model.py`` (Python backend) and its ``config.pbtxt``.

The config is rendered here rather than shipped as a file so that the instance count, batch limit
and paths (which differ between a CPU test and a GPU node) are arguments, and so that a wheel
carries nothing but Python modules.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

MODEL_TEMPLATE = Path(__file__).with_name("model.py")
DEFAULT_MODEL_NAME = "seal_student"

# name, Triton type, whether a request must send it. Every input is per prompt ([batch, 1]); a
# single value is broadcast by the model, but Triton requires the same batch size on each input.
INPUTS = (
    ("prompt", "TYPE_STRING"),
    ("adapter", "TYPE_STRING"),  # '' = routing decides, 'base' = no adapter, else a version
    ("routing_key", "TYPE_STRING"),  # sticky canary membership; random when absent
    ("max_new_tokens", "TYPE_INT32"),
    ("temperature", "TYPE_FP32"),  # 0 = greedy
    ("top_p", "TYPE_FP32"),
    ("seed", "TYPE_INT64"),  # < 0: unseeded; a seed reproduces a sampled answer per request
    ("chat", "TYPE_BOOL"),  # wrap the prompt as one user message in the chat template
    ("control", "TYPE_STRING"),  # JSON: status / prepare / sync; used by the client's swap
)
OUTPUTS = (
    ("text", "TYPE_STRING"),
    ("prompt_tokens", "TYPE_INT32"),
    ("completion_tokens", "TYPE_INT32"),
    ("adapter_version", "TYPE_STRING"),  # the version that actually served, or 'base'
)


def _quote(value: str) -> str:
    return json.dumps(value)  # protobuf text format accepts JSON string escapes


def render_config(
    *,
    name: str,
    base_model: str | os.PathLike[str],
    serving_state: str | os.PathLike[str],
    max_batch_size: int = 16,
    instance_count: int = 1,
    kind: str = "KIND_CPU",
    queue_delay_us: int = 2000,
    parameters: Mapping[str, str] | None = None,
) -> str:
    """``config.pbtxt`` text. ``kind`` is KIND_CPU here; KIND_GPU / KIND_MODEL on a GPU node."""
    params = {
        "base_model": str(base_model),
        "serving_state": str(serving_state),
        **{k: str(v) for k, v in (parameters or {}).items()},
    }
    lines = [
        f"name: {_quote(name)}",
        'backend: "python"',
        f"max_batch_size: {int(max_batch_size)}",
        # Python-backend requests are not concatenated; the batcher hands ``execute`` several
        # queued requests at once, which the model groups by adapter into one generate() each.
        # Two priority levels: control requests (adapter swaps) are sent at level 1 and overtake
        # queued prompts, so a swap under load waits for the running batch only.
        f"dynamic_batching {{ max_queue_delay_microseconds: {int(queue_delay_us)} "
        "priority_levels: 2 default_priority_level: 2 }",
        "input [",
        ",\n".join(
            f'  {{ name: "{n}" data_type: {t} dims: [ 1 ] optional: true }}' for n, t in INPUTS
        ),
        "]",
        "output [",
        ",\n".join(f'  {{ name: "{n}" data_type: {t} dims: [ 1 ] }}' for n, t in OUTPUTS),
        "]",
        f"instance_group [ {{ count: {int(instance_count)} kind: {kind} }} ]",
        "parameters [",
        ",\n".join(
            f"  {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}" for k, v in sorted(params.items())
        ),
        "]",
    ]
    return "\n".join(lines) + "\n"


def write_model(repository: str | os.PathLike[str], config_text: str, name: str = DEFAULT_MODEL_NAME) -> Path:
    """Write ``<repository>/<name>/{config.pbtxt,1/model.py}``; return the model directory."""
    model_dir = Path(repository) / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODEL_TEMPLATE, version_dir / "model.py")
    (model_dir / "config.pbtxt").write_text(config_text)
    return model_dir
