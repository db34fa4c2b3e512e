from alise.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("prompts", "prompt_tokens", "contexts")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    contexts: _containers.RepeatedCompositeFieldContainer[PromptContext]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., contexts: _Optional[_Iterable[_Union[PromptContext, _Mapping]]] = ...) -> None: ...

class PromptContext(_message.Message):
    __slots__ = ("previous_output_tokens", "query")
    PREVIOUS_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    previous_output_tokens: _containers.RepeatedScalarFieldContainer[int]
    query: str
    def __init__(self, previous_output_tokens: _Optional[_Iterable[int]] = ..., query: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "truncated", "prediction_ids")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_IDS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[_common_pb2.LengthPrediction]
    truncated: _containers.RepeatedScalarFieldContainer[int]
    prediction_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, predictions: _Optional[_Iterable[_Union[_common_pb2.LengthPrediction, _Mapping]]] = ..., truncated: _Optional[_Iterable[int]] = ..., prediction_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Observation(_message.Message):
    __slots__ = ("prompt", "output_tokens", "prompt_tokens", "model", "prediction_id", "sequence", "sender")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    output_tokens: int
    prompt_tokens: int
    model: str
    prediction_id: str
    sequence: int
    sender: str
    def __init__(self, prompt: _Optional[str] = ..., output_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., model: _Optional[str] = ..., prediction_id: _Optional[str] = ..., sequence: _Optional[int] = ..., sender: _Optional[str] = ...) -> None: ...

class ObserveResponse(_message.Message):
    __slots__ = ("num_accepted", "num_rejected", "durable_sequence", "unknown_sequences")
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NUM_REJECTED_FIELD_NUMBER: _ClassVar[int]
    DURABLE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    num_accepted: int
    num_rejected: int
    durable_sequence: int
    unknown_sequences: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, num_accepted: _Optional[int] = ..., num_rejected: _Optional[int] = ..., durable_sequence: _Optional[int] = ..., unknown_sequences: _Optional[_Iterable[int]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PredictorStats(_message.Message):
    __slots__ = ("num_entries", "index_type", "encoder", "embedding_dim", "num_predictions", "num_observations", "mean_abs_error", "bucket_edges", "head_fitted_at", "head_num_samples", "num_logged", "last_snapshot_at", "history_observations")
    NUM_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    BUCKET_EDGES_FIELD_NUMBER: _ClassVar[int]
    HEAD_FITTED_AT_FIELD_NUMBER: _ClassVar[int]
    HEAD_NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_LOGGED_FIELD_NUMBER: _ClassVar[int]
    LAST_SNAPSHOT_AT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    num_entries: int
    index_type: str
    encoder: str
    embedding_dim: int
    num_predictions: int
    num_observations: int
    mean_abs_error: float
    bucket_edges: _containers.RepeatedScalarFieldContainer[int]
    head_fitted_at: float
    head_num_samples: int
    num_logged: int
    last_snapshot_at: float
    history_observations: int
    def __init__(self, num_entries: _Optional[int] = ..., index_type: _Optional[str] = ..., encoder: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., num_predictions: _Optional[int] = ..., num_observations: _Optional[int] = ..., mean_abs_error: _Optional[float] = ..., bucket_edges: _Optional[_Iterable[int]] = ..., head_fitted_at: _Optional[float] = ..., head_num_samples: _Optional[int] = ..., num_logged: _Optional[int] = ..., last_snapshot_at: _Optional[float] = ..., history_observations: _Optional[int] = ...) -> None: ...
