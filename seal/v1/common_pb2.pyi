import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATUS_UNSPECIFIED: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_CANDIDATE: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_PROMOTED: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_SUPERSEDED: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_REJECTED: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_ROLLED_BACK: _ClassVar[AdapterStatus]
ADAPTER_STATUS_UNSPECIFIED: AdapterStatus
ADAPTER_STATUS_CANDIDATE: AdapterStatus
ADAPTER_STATUS_PROMOTED: AdapterStatus
ADAPTER_STATUS_SUPERSEDED: AdapterStatus
ADAPTER_STATUS_REJECTED: AdapterStatus
ADAPTER_STATUS_ROLLED_BACK: AdapterStatus

class Context(_message.Message):
    __slots__ = ("title", "passage")
    TITLE_FIELD_NUMBER: _ClassVar[int]
    PASSAGE_FIELD_NUMBER: _ClassVar[int]
    title: str
    passage: str
    def __init__(self, title: _Optional[str] = ..., passage: _Optional[str] = ...) -> None: ...

class GridRow(_message.Message):
    __slots__ = ("cells",)
    CELLS_FIELD_NUMBER: _ClassVar[int]
    cells: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cells: _Optional[_Iterable[int]] = ...) -> None: ...

class Grid(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[GridRow]
    def __init__(self, rows: _Optional[_Iterable[_Union[GridRow, _Mapping]]] = ...) -> None: ...

class GridPair(_message.Message):
    __slots__ = ("input", "output")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    input: Grid
    output: Grid
    def __init__(self, input: _Optional[_Union[Grid, _Mapping]] = ..., output: _Optional[_Union[Grid, _Mapping]] = ...) -> None: ...

class FewShotTask(_message.Message):
    __slots__ = ("task_id", "train", "test_inputs", "test_outputs")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    TEST_INPUTS_FIELD_NUMBER: _ClassVar[int]
    TEST_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    train: _containers.RepeatedCompositeFieldContainer[GridPair]
    test_inputs: _containers.RepeatedCompositeFieldContainer[Grid]
    test_outputs: _containers.RepeatedCompositeFieldContainer[Grid]
    def __init__(self, task_id: _Optional[str] = ..., train: _Optional[_Iterable[_Union[GridPair, _Mapping]]] = ..., test_inputs: _Optional[_Iterable[_Union[Grid, _Mapping]]] = ..., test_outputs: _Optional[_Iterable[_Union[Grid, _Mapping]]] = ...) -> None: ...

class Question(_message.Message):
    __slots__ = ("question", "answer")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    question: str
    answer: str
    def __init__(self, question: _Optional[str] = ..., answer: _Optional[str] = ...) -> None: ...

class UpdateOverrides(_message.Message):
    __slots__ = ("learning_rate", "epochs", "lora_rank", "lora_alpha", "batch_size", "include_passage", "update_rule")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PASSAGE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_RULE_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    epochs: int
    lora_rank: int
    lora_alpha: int
    batch_size: int
    include_passage: bool
    update_rule: str
    def __init__(self, learning_rate: _Optional[float] = ..., epochs: _Optional[int] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[int] = ..., batch_size: _Optional[int] = ..., include_passage: _Optional[bool] = ..., update_rule: _Optional[str] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("step", "total_steps", "loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    loss: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class QuestionOutcome(_message.Message):
    __slots__ = ("question", "gold_answer", "prediction", "correct", "exact_match", "f1", "contains_answer")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    GOLD_ANSWER_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    EXACT_MATCH_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    CONTAINS_ANSWER_FIELD_NUMBER: _ClassVar[int]
    question: str
    gold_answer: str
    prediction: str
    correct: bool
    exact_match: bool
    f1: float
    contains_answer: bool
    def __init__(self, question: _Optional[str] = ..., gold_answer: _Optional[str] = ..., prediction: _Optional[str] = ..., correct: _Optional[bool] = ..., exact_match: _Optional[bool] = ..., f1: _Optional[float] = ..., contains_answer: _Optional[bool] = ...) -> None: ...

class GateResult(_message.Message):
    __slots__ = ("gate", "passed", "value", "threshold", "reason")
    GATE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    gate: str
    passed: bool
    value: float
    threshold: float
    reason: str
    def __init__(self, gate: _Optional[str] = ..., passed: _Optional[bool] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class StatusChange(_message.Message):
    __slots__ = ("status", "at", "reason")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    status: AdapterStatus
    at: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, status: _Optional[_Union[AdapterStatus, str]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class AdapterManifest(_message.Message):
    __slots__ = ("adapter_id", "adapter_name", "version", "status", "base_model", "base_model_fingerprint", "context_id", "self_edit_sha256", "files", "seed", "hyperparameters", "metrics", "created_at", "history", "path")
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    SELF_EDIT_SHA256_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    adapter_name: str
    version: int
    status: AdapterStatus
    base_model: str
    base_model_fingerprint: str
    context_id: str
    self_edit_sha256: str
    files: _containers.ScalarMap[str, str]
    seed: int
    hyperparameters: _struct_pb2.Struct
    metrics: _struct_pb2.Struct
    created_at: _timestamp_pb2.Timestamp
    history: _containers.RepeatedCompositeFieldContainer[StatusChange]
    path: str
    def __init__(self, adapter_id: _Optional[str] = ..., adapter_name: _Optional[str] = ..., version: _Optional[int] = ..., status: _Optional[_Union[AdapterStatus, str]] = ..., base_model: _Optional[str] = ..., base_model_fingerprint: _Optional[str] = ..., context_id: _Optional[str] = ..., self_edit_sha256: _Optional[str] = ..., files: _Optional[_Mapping[str, str]] = ..., seed: _Optional[int] = ..., hyperparameters: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., metrics: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., history: _Optional[_Iterable[_Union[StatusChange, _Mapping]]] = ..., path: _Optional[str] = ...) -> None: ...
