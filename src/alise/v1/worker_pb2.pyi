from alise.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "report")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    hello: WorkerHello
    report: StepReport
    def __init__(self, hello: _Optional[_Union[WorkerHello, _Mapping]] = ..., report: _Optional[_Union[StepReport, _Mapping]] = ...) -> None: ...

class SchedulerMessage(_message.Message):
    __slots__ = ("plan", "shutdown", "abort")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    plan: StepPlan
    shutdown: Shutdown
    abort: AbortJobs
    def __init__(self, plan: _Optional[_Union[StepPlan, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ..., abort: _Optional[_Union[AbortJobs, _Mapping]] = ...) -> None: ...

class WorkerHello(_message.Message):
    __slots__ = ("worker_id", "model", "device", "block_size", "num_device_blocks", "num_host_blocks", "max_model_len", "vocab_size", "block_bytes", "latency_profile_json", "max_num_seqs", "max_num_batched_tokens", "model_id", "held_jobs", "weights_fingerprint", "held_from_scheduler_id", "prefix_caching", "kv_cache_dtype", "tensor_parallel_size")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_DEVICE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_JOBS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HELD_FROM_SCHEDULER_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model: str
    device: str
    block_size: int
    num_device_blocks: int
    num_host_blocks: int
    max_model_len: int
    vocab_size: int
    block_bytes: int
    latency_profile_json: str
    max_num_seqs: int
    max_num_batched_tokens: int
    model_id: str
    held_jobs: _containers.RepeatedCompositeFieldContainer[HeldJob]
    weights_fingerprint: str
    held_from_scheduler_id: str
    prefix_caching: bool
    kv_cache_dtype: str
    tensor_parallel_size: int
    def __init__(self, worker_id: _Optional[str] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., block_size: _Optional[int] = ..., num_device_blocks: _Optional[int] = ..., num_host_blocks: _Optional[int] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., block_bytes: _Optional[int] = ..., latency_profile_json: _Optional[str] = ..., max_num_seqs: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., model_id: _Optional[str] = ..., held_jobs: _Optional[_Iterable[_Union[HeldJob, _Mapping]]] = ..., weights_fingerprint: _Optional[str] = ..., held_from_scheduler_id: _Optional[str] = ..., prefix_caching: _Optional[bool] = ..., kv_cache_dtype: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ...) -> None: ...

class HeldJob(_message.Message):
    __slots__ = ("job_id", "token_ids", "num_generated", "sampling", "num_computed")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_generated: int
    sampling: _common_pb2.SamplingParams
    num_computed: int
    def __init__(self, job_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_generated: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., num_computed: _Optional[int] = ...) -> None: ...

class StepPlan(_message.Message):
    __slots__ = ("step_id", "commands", "run_step", "chunks", "census", "scheduler_id")
    class ChunksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    RUN_STEP_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CENSUS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_ID_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    commands: _containers.RepeatedCompositeFieldContainer[WorkerCommand]
    run_step: bool
    chunks: _containers.ScalarMap[str, int]
    census: bool
    scheduler_id: str
    def __init__(self, step_id: _Optional[int] = ..., commands: _Optional[_Iterable[_Union[WorkerCommand, _Mapping]]] = ..., run_step: _Optional[bool] = ..., chunks: _Optional[_Mapping[str, int]] = ..., census: _Optional[bool] = ..., scheduler_id: _Optional[str] = ...) -> None: ...

class AbortJobs(_message.Message):
    __slots__ = ("job_ids", "through_step_id")
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    THROUGH_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    through_step_id: int
    def __init__(self, job_ids: _Optional[_Iterable[str]] = ..., through_step_id: _Optional[int] = ...) -> None: ...

class WorkerCommand(_message.Message):
    __slots__ = ("admit", "pause", "resume")
    ADMIT_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    admit: AdmitJob
    pause: PauseJob
    resume: ResumeJob
    def __init__(self, admit: _Optional[_Union[AdmitJob, _Mapping]] = ..., pause: _Optional[_Union[PauseJob, _Mapping]] = ..., resume: _Optional[_Union[ResumeJob, _Mapping]] = ...) -> None: ...

class AdmitJob(_message.Message):
    __slots__ = ("job_id", "prompt_token_ids", "sampling", "num_generated", "num_cached_tokens")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    num_generated: int
    num_cached_tokens: int
    def __init__(self, job_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., num_generated: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class PauseJob(_message.Message):
    __slots__ = ("job_id", "kv_action", "num_reusable_tokens")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KV_ACTION_FIELD_NUMBER: _ClassVar[int]
    NUM_REUSABLE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kv_action: _common_pb2.KvAction
    num_reusable_tokens: int
    def __init__(self, job_id: _Optional[str] = ..., kv_action: _Optional[_Union[_common_pb2.KvAction, str]] = ..., num_reusable_tokens: _Optional[int] = ...) -> None: ...

class ResumeJob(_message.Message):
    __slots__ = ("job_id", "num_cached_tokens")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    num_cached_tokens: int
    def __init__(self, job_id: _Optional[str] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("step_id", "outputs", "step_duration_s", "num_free_device_blocks", "refused", "num_seqs", "num_context_tokens", "chunk_starts", "chunk_tokens", "census_job_ids", "num_admit_stand_in_tokens", "num_resume_stand_in_tokens")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STEP_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    NUM_FREE_DEVICE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    NUM_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_STARTS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CENSUS_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_ADMIT_STAND_IN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_RESUME_STAND_IN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    outputs: _containers.RepeatedCompositeFieldContainer[JobOutput]
    step_duration_s: float
    num_free_device_blocks: int
    refused: _containers.RepeatedCompositeFieldContainer[CommandResult]
    num_seqs: int
    num_context_tokens: int
    chunk_starts: _containers.RepeatedScalarFieldContainer[int]
    chunk_tokens: _containers.RepeatedScalarFieldContainer[int]
    census_job_ids: _containers.RepeatedScalarFieldContainer[str]
    num_admit_stand_in_tokens: int
    num_resume_stand_in_tokens: int
    def __init__(self, step_id: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[JobOutput, _Mapping]]] = ..., step_duration_s: _Optional[float] = ..., num_free_device_blocks: _Optional[int] = ..., refused: _Optional[_Iterable[_Union[CommandResult, _Mapping]]] = ..., num_seqs: _Optional[int] = ..., num_context_tokens: _Optional[int] = ..., chunk_starts: _Optional[_Iterable[int]] = ..., chunk_tokens: _Optional[_Iterable[int]] = ..., census_job_ids: _Optional[_Iterable[str]] = ..., num_admit_stand_in_tokens: _Optional[int] = ..., num_resume_stand_in_tokens: _Optional[int] = ...) -> None: ...

class JobOutput(_message.Message):
    __slots__ = ("job_id", "token_ids", "finish_reason", "num_tokens", "logprobs")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    num_tokens: int
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    def __init__(self, job_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., num_tokens: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("job_id", "command", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    command: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., command: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...
