import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from seal.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckSelfEditRequest(_message.Message):
    __slots__ = ("context", "self_edit", "prompt", "seed", "request_id", "fewshot")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SELF_EDIT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.Context
    self_edit: str
    prompt: str
    seed: int
    request_id: str
    fewshot: _common_pb2.FewShotTask
    def __init__(self, context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., self_edit: _Optional[str] = ..., prompt: _Optional[str] = ..., seed: _Optional[int] = ..., request_id: _Optional[str] = ..., fewshot: _Optional[_Union[_common_pb2.FewShotTask, _Mapping]] = ...) -> None: ...

class CheckSelfEditResponse(_message.Message):
    __slots__ = ("passed", "results", "audit_sequence")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    results: _containers.RepeatedCompositeFieldContainer[_common_pb2.GateResult]
    audit_sequence: int
    def __init__(self, passed: _Optional[bool] = ..., results: _Optional[_Iterable[_Union[_common_pb2.GateResult, _Mapping]]] = ..., audit_sequence: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("adapter_id", "context", "questions", "self_edit", "prompt", "seed", "guardrails", "request_id", "skip_retention", "fewshot")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    SELF_EDIT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GUARDRAILS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SKIP_RETENTION_FIELD_NUMBER: _ClassVar[int]
    FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    context: _common_pb2.Context
    questions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Question]
    self_edit: str
    prompt: str
    seed: int
    guardrails: _containers.RepeatedCompositeFieldContainer[_common_pb2.GateResult]
    request_id: str
    skip_retention: bool
    fewshot: _common_pb2.FewShotTask
    def __init__(self, adapter_id: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., questions: _Optional[_Iterable[_Union[_common_pb2.Question, _Mapping]]] = ..., self_edit: _Optional[str] = ..., prompt: _Optional[str] = ..., seed: _Optional[int] = ..., guardrails: _Optional[_Iterable[_Union[_common_pb2.GateResult, _Mapping]]] = ..., request_id: _Optional[str] = ..., skip_retention: _Optional[bool] = ..., fewshot: _Optional[_Union[_common_pb2.FewShotTask, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("baseline_accuracy", "adapted_accuracy", "reward", "baseline_outcomes", "adapted_outcomes", "gates", "passed_gates", "reward_sequence", "retention_accuracy", "baseline_retention_accuracy", "retention_probe_size", "retention_outcomes", "audit_sequence")
    BASELINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ADAPTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    BASELINE_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    ADAPTED_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    PASSED_GATES_FIELD_NUMBER: _ClassVar[int]
    REWARD_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RETENTION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BASELINE_RETENTION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    RETENTION_PROBE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RETENTION_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    baseline_accuracy: float
    adapted_accuracy: float
    reward: float
    baseline_outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.QuestionOutcome]
    adapted_outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.QuestionOutcome]
    gates: _containers.RepeatedCompositeFieldContainer[_common_pb2.GateResult]
    passed_gates: bool
    reward_sequence: int
    retention_accuracy: float
    baseline_retention_accuracy: float
    retention_probe_size: int
    retention_outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.QuestionOutcome]
    audit_sequence: int
    def __init__(self, baseline_accuracy: _Optional[float] = ..., adapted_accuracy: _Optional[float] = ..., reward: _Optional[float] = ..., baseline_outcomes: _Optional[_Iterable[_Union[_common_pb2.QuestionOutcome, _Mapping]]] = ..., adapted_outcomes: _Optional[_Iterable[_Union[_common_pb2.QuestionOutcome, _Mapping]]] = ..., gates: _Optional[_Iterable[_Union[_common_pb2.GateResult, _Mapping]]] = ..., passed_gates: _Optional[bool] = ..., reward_sequence: _Optional[int] = ..., retention_accuracy: _Optional[float] = ..., baseline_retention_accuracy: _Optional[float] = ..., retention_probe_size: _Optional[int] = ..., retention_outcomes: _Optional[_Iterable[_Union[_common_pb2.QuestionOutcome, _Mapping]]] = ..., audit_sequence: _Optional[int] = ...) -> None: ...

class ScoreManyRequest(_message.Message):
    __slots__ = ("context", "questions", "fewshot", "request_id", "skip_retention", "candidates")
    class Candidate(_message.Message):
        __slots__ = ("adapter_id", "self_edit", "prompt", "seed", "guardrails")
        ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
        SELF_EDIT_FIELD_NUMBER: _ClassVar[int]
        PROMPT_FIELD_NUMBER: _ClassVar[int]
        SEED_FIELD_NUMBER: _ClassVar[int]
        GUARDRAILS_FIELD_NUMBER: _ClassVar[int]
        adapter_id: str
        self_edit: str
        prompt: str
        seed: int
        guardrails: _containers.RepeatedCompositeFieldContainer[_common_pb2.GateResult]
        def __init__(self, adapter_id: _Optional[str] = ..., self_edit: _Optional[str] = ..., prompt: _Optional[str] = ..., seed: _Optional[int] = ..., guardrails: _Optional[_Iterable[_Union[_common_pb2.GateResult, _Mapping]]] = ...) -> None: ...
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SKIP_RETENTION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.Context
    questions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Question]
    fewshot: _common_pb2.FewShotTask
    request_id: str
    skip_retention: bool
    candidates: _containers.RepeatedCompositeFieldContainer[ScoreManyRequest.Candidate]
    def __init__(self, context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., questions: _Optional[_Iterable[_Union[_common_pb2.Question, _Mapping]]] = ..., fewshot: _Optional[_Union[_common_pb2.FewShotTask, _Mapping]] = ..., request_id: _Optional[str] = ..., skip_retention: _Optional[bool] = ..., candidates: _Optional[_Iterable[_Union[ScoreManyRequest.Candidate, _Mapping]]] = ...) -> None: ...

class ScoreManyResponse(_message.Message):
    __slots__ = ("results",)
    class Failed(_message.Message):
        __slots__ = ("index", "code", "message")
        INDEX_FIELD_NUMBER: _ClassVar[int]
        CODE_FIELD_NUMBER: _ClassVar[int]
        MESSAGE_FIELD_NUMBER: _ClassVar[int]
        index: int
        code: str
        message: str
        def __init__(self, index: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
    class Result(_message.Message):
        __slots__ = ("score", "failed")
        SCORE_FIELD_NUMBER: _ClassVar[int]
        FAILED_FIELD_NUMBER: _ClassVar[int]
        score: ScoreResponse
        failed: ScoreManyResponse.Failed
        def __init__(self, score: _Optional[_Union[ScoreResponse, _Mapping]] = ..., failed: _Optional[_Union[ScoreManyResponse.Failed, _Mapping]] = ...) -> None: ...
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreManyResponse.Result]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreManyResponse.Result, _Mapping]]] = ...) -> None: ...

class SubscribeRewardsRequest(_message.Message):
    __slots__ = ("after_sequence",)
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    after_sequence: int
    def __init__(self, after_sequence: _Optional[int] = ...) -> None: ...

class RewardEvent(_message.Message):
    __slots__ = ("sequence", "event_id", "context_id", "adapter_id", "prompt", "self_edit", "reward", "baseline_accuracy", "adapted_accuracy", "outcomes", "seed", "at")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SELF_EDIT_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ADAPTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    event_id: str
    context_id: str
    adapter_id: str
    prompt: str
    self_edit: str
    reward: float
    baseline_accuracy: float
    adapted_accuracy: float
    outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.QuestionOutcome]
    seed: int
    at: _timestamp_pb2.Timestamp
    def __init__(self, sequence: _Optional[int] = ..., event_id: _Optional[str] = ..., context_id: _Optional[str] = ..., adapter_id: _Optional[str] = ..., prompt: _Optional[str] = ..., self_edit: _Optional[str] = ..., reward: _Optional[float] = ..., baseline_accuracy: _Optional[float] = ..., adapted_accuracy: _Optional[float] = ..., outcomes: _Optional[_Iterable[_Union[_common_pb2.QuestionOutcome, _Mapping]]] = ..., seed: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SubscribeRewardsResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: RewardEvent
    def __init__(self, event: _Optional[_Union[RewardEvent, _Mapping]] = ...) -> None: ...

class RecordEventRequest(_message.Message):
    __slots__ = ("event_id", "kind", "adapter_id", "cause", "details", "at", "source")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    kind: str
    adapter_id: str
    cause: str
    details: _struct_pb2.Struct
    at: _timestamp_pb2.Timestamp
    source: str
    def __init__(self, event_id: _Optional[str] = ..., kind: _Optional[str] = ..., adapter_id: _Optional[str] = ..., cause: _Optional[str] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ...) -> None: ...

class RecordEventResponse(_message.Message):
    __slots__ = ("sequence", "duplicate")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    duplicate: bool
    def __init__(self, sequence: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class RecheckRequest(_message.Message):
    __slots__ = ("adapter_name", "dry_run")
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    adapter_name: str
    dry_run: bool
    def __init__(self, adapter_name: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RecheckResponse(_message.Message):
    __slots__ = ("adapter_id", "retention_accuracy", "baseline_retention_accuracy", "floor", "retention_probe_size", "rollback_needed", "rolled_back", "reason", "now_serving_adapter_id", "signals", "audit_sequence")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    RETENTION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BASELINE_RETENTION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    FLOOR_FIELD_NUMBER: _ClassVar[int]
    RETENTION_PROBE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_NEEDED_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NOW_SERVING_ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    retention_accuracy: float
    baseline_retention_accuracy: float
    floor: float
    retention_probe_size: int
    rollback_needed: bool
    rolled_back: bool
    reason: str
    now_serving_adapter_id: str
    signals: _containers.RepeatedCompositeFieldContainer[_common_pb2.GateResult]
    audit_sequence: int
    def __init__(self, adapter_id: _Optional[str] = ..., retention_accuracy: _Optional[float] = ..., baseline_retention_accuracy: _Optional[float] = ..., floor: _Optional[float] = ..., retention_probe_size: _Optional[int] = ..., rollback_needed: _Optional[bool] = ..., rolled_back: _Optional[bool] = ..., reason: _Optional[str] = ..., now_serving_adapter_id: _Optional[str] = ..., signals: _Optional[_Iterable[_Union[_common_pb2.GateResult, _Mapping]]] = ..., audit_sequence: _Optional[int] = ...) -> None: ...
