from google.protobuf import empty_pb2 as _empty_pb2
from seal.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApplySelfEditRequest(_message.Message):
    __slots__ = ("adapter_name", "context", "self_edit", "overrides", "seed", "training_prompts", "fewshot")
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SELF_EDIT_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRAINING_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    adapter_name: str
    context: _common_pb2.Context
    self_edit: str
    overrides: _common_pb2.UpdateOverrides
    seed: int
    training_prompts: _containers.RepeatedScalarFieldContainer[str]
    fewshot: _common_pb2.FewShotTask
    def __init__(self, adapter_name: _Optional[str] = ..., context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., self_edit: _Optional[str] = ..., overrides: _Optional[_Union[_common_pb2.UpdateOverrides, _Mapping]] = ..., seed: _Optional[int] = ..., training_prompts: _Optional[_Iterable[str]] = ..., fewshot: _Optional[_Union[_common_pb2.FewShotTask, _Mapping]] = ...) -> None: ...

class ApplySelfEditsRequest(_message.Message):
    __slots__ = ("adapter_name", "candidates")
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    adapter_name: str
    candidates: _containers.RepeatedCompositeFieldContainer[ApplySelfEditRequest]
    def __init__(self, adapter_name: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[ApplySelfEditRequest, _Mapping]]] = ...) -> None: ...

class ApplySelfEditsResponse(_message.Message):
    __slots__ = ("progress", "trained", "failed")
    class Progress(_message.Message):
        __slots__ = ("index", "progress")
        INDEX_FIELD_NUMBER: _ClassVar[int]
        PROGRESS_FIELD_NUMBER: _ClassVar[int]
        index: int
        progress: _common_pb2.TrainingProgress
        def __init__(self, index: _Optional[int] = ..., progress: _Optional[_Union[_common_pb2.TrainingProgress, _Mapping]] = ...) -> None: ...
    class Trained(_message.Message):
        __slots__ = ("index", "candidate")
        INDEX_FIELD_NUMBER: _ClassVar[int]
        CANDIDATE_FIELD_NUMBER: _ClassVar[int]
        index: int
        candidate: _common_pb2.AdapterManifest
        def __init__(self, index: _Optional[int] = ..., candidate: _Optional[_Union[_common_pb2.AdapterManifest, _Mapping]] = ...) -> None: ...
    class Failed(_message.Message):
        __slots__ = ("index", "code", "message")
        INDEX_FIELD_NUMBER: _ClassVar[int]
        CODE_FIELD_NUMBER: _ClassVar[int]
        MESSAGE_FIELD_NUMBER: _ClassVar[int]
        index: int
        code: str
        message: str
        def __init__(self, index: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    progress: ApplySelfEditsResponse.Progress
    trained: ApplySelfEditsResponse.Trained
    failed: ApplySelfEditsResponse.Failed
    def __init__(self, progress: _Optional[_Union[ApplySelfEditsResponse.Progress, _Mapping]] = ..., trained: _Optional[_Union[ApplySelfEditsResponse.Trained, _Mapping]] = ..., failed: _Optional[_Union[ApplySelfEditsResponse.Failed, _Mapping]] = ...) -> None: ...

class ApplySelfEditResponse(_message.Message):
    __slots__ = ("progress", "candidate")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.TrainingProgress
    candidate: _common_pb2.AdapterManifest
    def __init__(self, progress: _Optional[_Union[_common_pb2.TrainingProgress, _Mapping]] = ..., candidate: _Optional[_Union[_common_pb2.AdapterManifest, _Mapping]] = ...) -> None: ...

class AdapterSelector(_message.Message):
    __slots__ = ("base_model", "adapter_id", "promoted_of")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_OF_FIELD_NUMBER: _ClassVar[int]
    base_model: _empty_pb2.Empty
    adapter_id: str
    promoted_of: str
    def __init__(self, base_model: _Optional[_Union[_empty_pb2.Empty, _Mapping]] = ..., adapter_id: _Optional[str] = ..., promoted_of: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompts", "adapter", "max_new_tokens", "temperature", "top_p", "seed", "raw_prompt", "stop_after_first_sentence")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RAW_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STOP_AFTER_FIRST_SENTENCE_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    adapter: AdapterSelector
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    raw_prompt: bool
    stop_after_first_sentence: bool
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., adapter: _Optional[_Union[AdapterSelector, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., raw_prompt: _Optional[bool] = ..., stop_after_first_sentence: _Optional[bool] = ...) -> None: ...

class GenerateMixedRequest(_message.Message):
    __slots__ = ("prompts", "adapter_ids", "max_new_tokens", "temperature", "top_p", "seed", "raw_prompt", "stop_after_first_sentence")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RAW_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STOP_AFTER_FIRST_SENTENCE_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    raw_prompt: bool
    stop_after_first_sentence: bool
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., adapter_ids: _Optional[_Iterable[str]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., raw_prompt: _Optional[bool] = ..., stop_after_first_sentence: _Optional[bool] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("text", "prompt_tokens", "completion_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, text: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("completions", "served_adapter_id")
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    SERVED_ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    served_adapter_id: str
    def __init__(self, completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ..., served_adapter_id: _Optional[str] = ...) -> None: ...

class GenerateMixedResponse(_message.Message):
    __slots__ = ("completions",)
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    def __init__(self, completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("adapter_name", "status")
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    adapter_name: str
    status: _common_pb2.AdapterStatus
    def __init__(self, adapter_name: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.AdapterStatus, str]] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[_common_pb2.AdapterManifest]
    def __init__(self, adapters: _Optional[_Iterable[_Union[_common_pb2.AdapterManifest, _Mapping]]] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class GetAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.AdapterManifest
    def __init__(self, adapter: _Optional[_Union[_common_pb2.AdapterManifest, _Mapping]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("adapter_id", "reason")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    reason: str
    def __init__(self, adapter_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PromoteResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.AdapterManifest
    def __init__(self, adapter: _Optional[_Union[_common_pb2.AdapterManifest, _Mapping]] = ...) -> None: ...

class RejectRequest(_message.Message):
    __slots__ = ("adapter_id", "reason", "discard_weights")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DISCARD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    reason: str
    discard_weights: bool
    def __init__(self, adapter_id: _Optional[str] = ..., reason: _Optional[str] = ..., discard_weights: _Optional[bool] = ...) -> None: ...

class RejectResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: _common_pb2.AdapterManifest
    def __init__(self, adapter: _Optional[_Union[_common_pb2.AdapterManifest, _Mapping]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("adapter_name", "reason", "allow_base_model")
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ALLOW_BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    adapter_name: str
    reason: str
    allow_base_model: bool
    def __init__(self, adapter_name: _Optional[str] = ..., reason: _Optional[str] = ..., allow_base_model: _Optional[bool] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("rolled_back", "now_serving")
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    NOW_SERVING_FIELD_NUMBER: _ClassVar[int]
    rolled_back: _common_pb2.AdapterManifest
    now_serving: _common_pb2.AdapterManifest
    def __init__(self, rolled_back: _Optional[_Union[_common_pb2.AdapterManifest, _Mapping]] = ..., now_serving: _Optional[_Union[_common_pb2.AdapterManifest, _Mapping]] = ...) -> None: ...
