from alise.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "sampling", "stream_text", "oracle_output_tokens", "resume_token_ids", "conversation", "strict_max_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STREAM_TEXT_FIELD_NUMBER: _ClassVar[int]
    ORACLE_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    STRICT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: TokenIds
    sampling: _common_pb2.SamplingParams
    stream_text: bool
    oracle_output_tokens: int
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    conversation: Conversation
    strict_max_tokens: bool
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., stream_text: _Optional[bool] = ..., oracle_output_tokens: _Optional[int] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ..., strict_max_tokens: _Optional[bool] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("query", "previous_output_tokens")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    query: str
    previous_output_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, query: _Optional[str] = ..., previous_output_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "index", "finish_reason", "usage", "estimate", "prompt_tokens", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    index: int
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    estimate: _common_pb2.LengthPrediction
    prompt_tokens: int
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., index: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., estimate: _Optional[_Union[_common_pb2.LengthPrediction, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "model", "device", "block_size", "num_device_blocks", "num_free_device_blocks", "num_host_blocks", "num_free_host_blocks", "num_running", "num_paused", "last_step_ms", "num_steps", "connected_s", "num_censuses", "num_ghost_jobs", "num_missing_jobs", "num_block_deficits", "tensor_parallel_size")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_DEVICE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_DEVICE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_PAUSED_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_S_FIELD_NUMBER: _ClassVar[int]
    NUM_CENSUSES_FIELD_NUMBER: _ClassVar[int]
    NUM_GHOST_JOBS_FIELD_NUMBER: _ClassVar[int]
    NUM_MISSING_JOBS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCK_DEFICITS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model: str
    device: str
    block_size: int
    num_device_blocks: int
    num_free_device_blocks: int
    num_host_blocks: int
    num_free_host_blocks: int
    num_running: int
    num_paused: int
    last_step_ms: float
    num_steps: int
    connected_s: float
    num_censuses: int
    num_ghost_jobs: int
    num_missing_jobs: int
    num_block_deficits: int
    tensor_parallel_size: int
    def __init__(self, worker_id: _Optional[str] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., block_size: _Optional[int] = ..., num_device_blocks: _Optional[int] = ..., num_free_device_blocks: _Optional[int] = ..., num_host_blocks: _Optional[int] = ..., num_free_host_blocks: _Optional[int] = ..., num_running: _Optional[int] = ..., num_paused: _Optional[int] = ..., last_step_ms: _Optional[float] = ..., num_steps: _Optional[int] = ..., connected_s: _Optional[float] = ..., num_censuses: _Optional[int] = ..., num_ghost_jobs: _Optional[int] = ..., num_missing_jobs: _Optional[int] = ..., num_block_deficits: _Optional[int] = ..., tensor_parallel_size: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("policy", "workers", "num_waiting", "num_running", "num_paused", "num_finished", "predictor_state", "uptime_s", "num_preemptions", "preemptions_by_action", "model", "max_model_len", "num_admitted_tokens", "num_cached_tokens", "num_prefill_tokens")
    class PreemptionsByActionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_PAUSED_FIELD_NUMBER: _ClassVar[int]
    NUM_FINISHED_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_STATE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_BY_ACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    NUM_ADMITTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    num_waiting: int
    num_running: int
    num_paused: int
    num_finished: int
    predictor_state: str
    uptime_s: float
    num_preemptions: int
    preemptions_by_action: _containers.ScalarMap[str, int]
    model: str
    max_model_len: int
    num_admitted_tokens: int
    num_cached_tokens: int
    num_prefill_tokens: int
    def __init__(self, policy: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., num_paused: _Optional[int] = ..., num_finished: _Optional[int] = ..., predictor_state: _Optional[str] = ..., uptime_s: _Optional[float] = ..., num_preemptions: _Optional[int] = ..., preemptions_by_action: _Optional[_Mapping[str, int]] = ..., model: _Optional[str] = ..., max_model_len: _Optional[int] = ..., num_admitted_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., num_prefill_tokens: _Optional[int] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMetricsResponse(_message.Message):
    __slots__ = ("text", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: str
    model: str
    def __init__(self, text: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...
