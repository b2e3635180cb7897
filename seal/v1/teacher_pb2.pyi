from seal.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeepRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEEP_RULE_UNSPECIFIED: _ClassVar[KeepRule]
    KEEP_RULE_BEST_OF_K: _ClassVar[KeepRule]
    KEEP_RULE_BEST_POSITIVE: _ClassVar[KeepRule]
KEEP_RULE_UNSPECIFIED: KeepRule
KEEP_RULE_BEST_OF_K: KeepRule
KEEP_RULE_BEST_POSITIVE: KeepRule

class AdaptRequest(_message.Message):
    __slots__ = ("context", "questions", "k", "overrides", "prompt_style", "adapter_name", "seed", "fewshot")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_STYLE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.Context
    questions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Question]
    k: int
    overrides: _common_pb2.UpdateOverrides
    prompt_style: str
    adapter_name: str
    seed: int
    fewshot: _common_pb2.FewShotTask
    def __init__(self, context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., questions: _Optional[_Iterable[_Union[_common_pb2.Question, _Mapping]]] = ..., k: _Optional[int] = ..., overrides: _Optional[_Union[_common_pb2.UpdateOverrides, _Mapping]] = ..., prompt_style: _Optional[str] = ..., adapter_name: _Optional[str] = ..., seed: _Optional[int] = ..., fewshot: _Optional[_Union[_common_pb2.FewShotTask, _Mapping]] = ...) -> None: ...

class SelfEdit(_message.Message):
    __slots__ = ("index", "prompt", "text", "completion_tokens")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    index: int
    prompt: str
    text: str
    completion_tokens: int
    def __init__(self, index: _Optional[int] = ..., prompt: _Optional[str] = ..., text: _Optional[str] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class SelfEditsProposed(_message.Message):
    __slots__ = ("self_edits", "seconds")
    SELF_EDITS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    self_edits: _containers.RepeatedCompositeFieldContainer[SelfEdit]
    seconds: float
    def __init__(self, self_edits: _Optional[_Iterable[_Union[SelfEdit, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class CandidateProgress(_message.Message):
    __slots__ = ("index", "training")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    index: int
    training: _common_pb2.TrainingProgress
    def __init__(self, index: _Optional[int] = ..., training: _Optional[_Union[_common_pb2.TrainingProgress, _Mapping]] = ...) -> None: ...

class CandidateTrained(_message.Message):
    __slots__ = ("index", "adapter", "seconds")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    adapter: _common_pb2.AdapterManifest
    seconds: float
    def __init__(self, index: _Optional[int] = ..., adapter: _Optional[_Union[_common_pb2.AdapterManifest, _Mapping]] = ..., seconds: _Optional[float] = ...) -> None: ...

class QuestionsWritten(_message.Message):
    __slots__ = ("held_out", "training_prompts", "written", "dropped", "seconds")
    HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    TRAINING_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    held_out: _containers.RepeatedCompositeFieldContainer[_common_pb2.Question]
    training_prompts: _containers.RepeatedScalarFieldContainer[str]
    written: int
    dropped: int
    seconds: float
    def __init__(self, held_out: _Optional[_Iterable[_Union[_common_pb2.Question, _Mapping]]] = ..., training_prompts: _Optional[_Iterable[str]] = ..., written: _Optional[int] = ..., dropped: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class BaselineScored(_message.Message):
    __slots__ = ("accuracy", "outcomes")
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    accuracy: float
    outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.QuestionOutcome]
    def __init__(self, accuracy: _Optional[float] = ..., outcomes: _Optional[_Iterable[_Union[_common_pb2.QuestionOutcome, _Mapping]]] = ...) -> None: ...

class CandidateScored(_message.Message):
    __slots__ = ("index", "adapter_id", "accuracy", "reward", "passed_gates", "gates", "seconds")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    PASSED_GATES_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    index: int
    adapter_id: str
    accuracy: float
    reward: float
    passed_gates: bool
    gates: _containers.RepeatedCompositeFieldContainer[_common_pb2.GateResult]
    seconds: float
    def __init__(self, index: _Optional[int] = ..., adapter_id: _Optional[str] = ..., accuracy: _Optional[float] = ..., reward: _Optional[float] = ..., passed_gates: _Optional[bool] = ..., gates: _Optional[_Iterable[_Union[_common_pb2.GateResult, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class CandidateFailed(_message.Message):
    __slots__ = ("index", "reason", "gates")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: str
    gates: _containers.RepeatedCompositeFieldContainer[_common_pb2.GateResult]
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[str] = ..., gates: _Optional[_Iterable[_Union[_common_pb2.GateResult, _Mapping]]] = ...) -> None: ...

class PromotionDecided(_message.Message):
    __slots__ = ("promoted", "adapter_id", "reason")
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    promoted: bool
    adapter_id: str
    reason: str
    def __init__(self, promoted: _Optional[bool] = ..., adapter_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CandidateSummary(_message.Message):
    __slots__ = ("index", "adapter_id", "self_edit", "training_sequences", "accuracy", "reward", "passed_gates", "gates", "failure", "train_seconds", "outcomes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SELF_EDIT_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    PASSED_GATES_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    index: int
    adapter_id: str
    self_edit: str
    training_sequences: int
    accuracy: float
    reward: float
    passed_gates: bool
    gates: _containers.RepeatedCompositeFieldContainer[_common_pb2.GateResult]
    failure: str
    train_seconds: float
    outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.QuestionOutcome]
    def __init__(self, index: _Optional[int] = ..., adapter_id: _Optional[str] = ..., self_edit: _Optional[str] = ..., training_sequences: _Optional[int] = ..., accuracy: _Optional[float] = ..., reward: _Optional[float] = ..., passed_gates: _Optional[bool] = ..., gates: _Optional[_Iterable[_Union[_common_pb2.GateResult, _Mapping]]] = ..., failure: _Optional[str] = ..., train_seconds: _Optional[float] = ..., outcomes: _Optional[_Iterable[_Union[_common_pb2.QuestionOutcome, _Mapping]]] = ...) -> None: ...

class AdaptResult(_message.Message):
    __slots__ = ("request_id", "context_id", "promoted", "adapter_id", "version", "baseline_accuracy", "adapted_accuracy", "candidates", "baseline_outcomes", "adapted_outcomes", "decision_reason", "phase_seconds", "questions_written")
    class PhaseSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ADAPTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BASELINE_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    ADAPTED_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    DECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context_id: str
    promoted: bool
    adapter_id: str
    version: int
    baseline_accuracy: float
    adapted_accuracy: float
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateSummary]
    baseline_outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.QuestionOutcome]
    adapted_outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.QuestionOutcome]
    decision_reason: str
    phase_seconds: _containers.ScalarMap[str, float]
    questions_written: bool
    def __init__(self, request_id: _Optional[str] = ..., context_id: _Optional[str] = ..., promoted: _Optional[bool] = ..., adapter_id: _Optional[str] = ..., version: _Optional[int] = ..., baseline_accuracy: _Optional[float] = ..., adapted_accuracy: _Optional[float] = ..., candidates: _Optional[_Iterable[_Union[CandidateSummary, _Mapping]]] = ..., baseline_outcomes: _Optional[_Iterable[_Union[_common_pb2.QuestionOutcome, _Mapping]]] = ..., adapted_outcomes: _Optional[_Iterable[_Union[_common_pb2.QuestionOutcome, _Mapping]]] = ..., decision_reason: _Optional[str] = ..., phase_seconds: _Optional[_Mapping[str, float]] = ..., questions_written: _Optional[bool] = ...) -> None: ...

class AdaptResponse(_message.Message):
    __slots__ = ("request_id", "self_edits_proposed", "candidate_progress", "candidate_trained", "baseline_scored", "candidate_scored", "candidate_failed", "promotion_decided", "result", "questions_written")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SELF_EDITS_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_TRAINED_FIELD_NUMBER: _ClassVar[int]
    BASELINE_SCORED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SCORED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FAILED_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_DECIDED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    self_edits_proposed: SelfEditsProposed
    candidate_progress: CandidateProgress
    candidate_trained: CandidateTrained
    baseline_scored: BaselineScored
    candidate_scored: CandidateScored
    candidate_failed: CandidateFailed
    promotion_decided: PromotionDecided
    result: AdaptResult
    questions_written: QuestionsWritten
    def __init__(self, request_id: _Optional[str] = ..., self_edits_proposed: _Optional[_Union[SelfEditsProposed, _Mapping]] = ..., candidate_progress: _Optional[_Union[CandidateProgress, _Mapping]] = ..., candidate_trained: _Optional[_Union[CandidateTrained, _Mapping]] = ..., baseline_scored: _Optional[_Union[BaselineScored, _Mapping]] = ..., candidate_scored: _Optional[_Union[CandidateScored, _Mapping]] = ..., candidate_failed: _Optional[_Union[CandidateFailed, _Mapping]] = ..., promotion_decided: _Optional[_Union[PromotionDecided, _Mapping]] = ..., result: _Optional[_Union[AdaptResult, _Mapping]] = ..., questions_written: _Optional[_Union[QuestionsWritten, _Mapping]] = ...) -> None: ...

class ProposeSelfEditsRequest(_message.Message):
    __slots__ = ("context", "k", "prompt_style", "seed")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    PROMPT_STYLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.Context
    k: int
    prompt_style: str
    seed: int
    def __init__(self, context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., k: _Optional[int] = ..., prompt_style: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class ProposeSelfEditsResponse(_message.Message):
    __slots__ = ("self_edits",)
    SELF_EDITS_FIELD_NUMBER: _ClassVar[int]
    self_edits: _containers.RepeatedCompositeFieldContainer[SelfEdit]
    def __init__(self, self_edits: _Optional[_Iterable[_Union[SelfEdit, _Mapping]]] = ...) -> None: ...

class TrainingContext(_message.Message):
    __slots__ = ("context", "questions", "fewshot")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    FEWSHOT_FIELD_NUMBER: _ClassVar[int]
    context: _common_pb2.Context
    questions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Question]
    fewshot: _common_pb2.FewShotTask
    def __init__(self, context: _Optional[_Union[_common_pb2.Context, _Mapping]] = ..., questions: _Optional[_Iterable[_Union[_common_pb2.Question, _Mapping]]] = ..., fewshot: _Optional[_Union[_common_pb2.FewShotTask, _Mapping]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("contexts", "k", "seeds_per_edit", "keep_rule", "prompt_style", "seed", "overrides", "restart", "domain")
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SEEDS_PER_EDIT_FIELD_NUMBER: _ClassVar[int]
    KEEP_RULE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_STYLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    contexts: _containers.RepeatedCompositeFieldContainer[TrainingContext]
    k: int
    seeds_per_edit: int
    keep_rule: KeepRule
    prompt_style: str
    seed: int
    overrides: _common_pb2.UpdateOverrides
    restart: bool
    domain: str
    def __init__(self, contexts: _Optional[_Iterable[_Union[TrainingContext, _Mapping]]] = ..., k: _Optional[int] = ..., seeds_per_edit: _Optional[int] = ..., keep_rule: _Optional[_Union[KeepRule, str]] = ..., prompt_style: _Optional[str] = ..., seed: _Optional[int] = ..., overrides: _Optional[_Union[_common_pb2.UpdateOverrides, _Mapping]] = ..., restart: _Optional[bool] = ..., domain: _Optional[str] = ...) -> None: ...

class RoundStarted(_message.Message):
    __slots__ = ("round", "round_id", "contexts", "contexts_done", "samples_done", "resumed", "k", "seeds_per_edit", "keep_rule", "policy_adapter_id", "domain")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_DONE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_DONE_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SEEDS_PER_EDIT_FIELD_NUMBER: _ClassVar[int]
    KEEP_RULE_FIELD_NUMBER: _ClassVar[int]
    POLICY_ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    round: int
    round_id: str
    contexts: int
    contexts_done: int
    samples_done: int
    resumed: bool
    k: int
    seeds_per_edit: int
    keep_rule: KeepRule
    policy_adapter_id: str
    domain: str
    def __init__(self, round: _Optional[int] = ..., round_id: _Optional[str] = ..., contexts: _Optional[int] = ..., contexts_done: _Optional[int] = ..., samples_done: _Optional[int] = ..., resumed: _Optional[bool] = ..., k: _Optional[int] = ..., seeds_per_edit: _Optional[int] = ..., keep_rule: _Optional[_Union[KeepRule, str]] = ..., policy_adapter_id: _Optional[str] = ..., domain: _Optional[str] = ...) -> None: ...

class ContextSampled(_message.Message):
    __slots__ = ("context_index", "context_id", "self_edits", "seconds", "reused")
    CONTEXT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    SELF_EDITS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    context_index: int
    context_id: str
    self_edits: _containers.RepeatedCompositeFieldContainer[SelfEdit]
    seconds: float
    reused: bool
    def __init__(self, context_index: _Optional[int] = ..., context_id: _Optional[str] = ..., self_edits: _Optional[_Iterable[_Union[SelfEdit, _Mapping]]] = ..., seconds: _Optional[float] = ..., reused: _Optional[bool] = ...) -> None: ...

class SampleScored(_message.Message):
    __slots__ = ("context_index", "context_id", "edit_index", "seed_index", "seed", "reward", "adapter_id", "failure", "source", "seconds")
    CONTEXT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    EDIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SEED_INDEX_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    context_index: int
    context_id: str
    edit_index: int
    seed_index: int
    seed: int
    reward: float
    adapter_id: str
    failure: str
    source: str
    seconds: float
    def __init__(self, context_index: _Optional[int] = ..., context_id: _Optional[str] = ..., edit_index: _Optional[int] = ..., seed_index: _Optional[int] = ..., seed: _Optional[int] = ..., reward: _Optional[float] = ..., adapter_id: _Optional[str] = ..., failure: _Optional[str] = ..., source: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class ContextDone(_message.Message):
    __slots__ = ("context_index", "context_id", "mean_rewards", "kept", "kept_edit_index", "kept_reward")
    CONTEXT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    MEAN_REWARDS_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    KEPT_EDIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    KEPT_REWARD_FIELD_NUMBER: _ClassVar[int]
    context_index: int
    context_id: str
    mean_rewards: _containers.RepeatedScalarFieldContainer[float]
    kept: bool
    kept_edit_index: int
    kept_reward: float
    def __init__(self, context_index: _Optional[int] = ..., context_id: _Optional[str] = ..., mean_rewards: _Optional[_Iterable[float]] = ..., kept: _Optional[bool] = ..., kept_edit_index: _Optional[int] = ..., kept_reward: _Optional[float] = ...) -> None: ...

class RoundReport(_message.Message):
    __slots__ = ("round", "round_id", "keep_rule", "contexts", "k", "seeds_per_edit", "samples_scored", "samples_failed", "samples_resumed", "edits_scored", "mean_reward", "max_reward", "kept", "mean_kept_reward", "positive_kept", "policy_adapter_id", "policy_version", "policy_sft_first_loss", "policy_sft_final_loss", "policy_sft_steps", "hot_loaded", "phase_seconds", "wall_seconds", "domain")
    class PhaseSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_RULE_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SEEDS_PER_EDIT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_SCORED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FAILED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_RESUMED_FIELD_NUMBER: _ClassVar[int]
    EDITS_SCORED_FIELD_NUMBER: _ClassVar[int]
    MEAN_REWARD_FIELD_NUMBER: _ClassVar[int]
    MAX_REWARD_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    MEAN_KEPT_REWARD_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_KEPT_FIELD_NUMBER: _ClassVar[int]
    POLICY_ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_SFT_FIRST_LOSS_FIELD_NUMBER: _ClassVar[int]
    POLICY_SFT_FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    POLICY_SFT_STEPS_FIELD_NUMBER: _ClassVar[int]
    HOT_LOADED_FIELD_NUMBER: _ClassVar[int]
    PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    round: int
    round_id: str
    keep_rule: KeepRule
    contexts: int
    k: int
    seeds_per_edit: int
    samples_scored: int
    samples_failed: int
    samples_resumed: int
    edits_scored: int
    mean_reward: float
    max_reward: float
    kept: int
    mean_kept_reward: float
    positive_kept: int
    policy_adapter_id: str
    policy_version: int
    policy_sft_first_loss: float
    policy_sft_final_loss: float
    policy_sft_steps: int
    hot_loaded: bool
    phase_seconds: _containers.ScalarMap[str, float]
    wall_seconds: float
    domain: str
    def __init__(self, round: _Optional[int] = ..., round_id: _Optional[str] = ..., keep_rule: _Optional[_Union[KeepRule, str]] = ..., contexts: _Optional[int] = ..., k: _Optional[int] = ..., seeds_per_edit: _Optional[int] = ..., samples_scored: _Optional[int] = ..., samples_failed: _Optional[int] = ..., samples_resumed: _Optional[int] = ..., edits_scored: _Optional[int] = ..., mean_reward: _Optional[float] = ..., max_reward: _Optional[float] = ..., kept: _Optional[int] = ..., mean_kept_reward: _Optional[float] = ..., positive_kept: _Optional[int] = ..., policy_adapter_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., policy_sft_first_loss: _Optional[float] = ..., policy_sft_final_loss: _Optional[float] = ..., policy_sft_steps: _Optional[int] = ..., hot_loaded: _Optional[bool] = ..., phase_seconds: _Optional[_Mapping[str, float]] = ..., wall_seconds: _Optional[float] = ..., domain: _Optional[str] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("round_id", "round_started", "context_sampled", "sample_scored", "context_done", "policy_progress", "report")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_STARTED_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SCORED_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_DONE_FIELD_NUMBER: _ClassVar[int]
    POLICY_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    round_started: RoundStarted
    context_sampled: ContextSampled
    sample_scored: SampleScored
    context_done: ContextDone
    policy_progress: _common_pb2.TrainingProgress
    report: RoundReport
    def __init__(self, round_id: _Optional[str] = ..., round_started: _Optional[_Union[RoundStarted, _Mapping]] = ..., context_sampled: _Optional[_Union[ContextSampled, _Mapping]] = ..., sample_scored: _Optional[_Union[SampleScored, _Mapping]] = ..., context_done: _Optional[_Union[ContextDone, _Mapping]] = ..., policy_progress: _Optional[_Union[_common_pb2.TrainingProgress, _Mapping]] = ..., report: _Optional[_Union[RoundReport, _Mapping]] = ...) -> None: ...
