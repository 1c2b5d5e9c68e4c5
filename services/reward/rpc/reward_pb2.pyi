from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_STATUS_UNSPECIFIED: _ClassVar[ScoreStatus]
    SCORE_STATUS_SCORED: _ClassVar[ScoreStatus]
    SCORE_STATUS_CANNOT_SCORE: _ClassVar[ScoreStatus]
    SCORE_STATUS_TIMED_OUT: _ClassVar[ScoreStatus]
SCORE_STATUS_UNSPECIFIED: ScoreStatus
SCORE_STATUS_SCORED: ScoreStatus
SCORE_STATUS_CANNOT_SCORE: ScoreStatus
SCORE_STATUS_TIMED_OUT: ScoreStatus

class ScoreRequest(_message.Message):
    __slots__ = ("task", "completion", "answers", "labels", "timeout_s")
    TASK_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    task: str
    completion: bytes
    answers: _containers.RepeatedScalarFieldContainer[bytes]
    labels: _containers.RepeatedScalarFieldContainer[bytes]
    timeout_s: float
    def __init__(self, task: _Optional[str] = ..., completion: _Optional[bytes] = ..., answers: _Optional[_Iterable[bytes]] = ..., labels: _Optional[_Iterable[bytes]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("score",)
    SCORE_FIELD_NUMBER: _ClassVar[int]
    score: CompletionScore
    def __init__(self, score: _Optional[_Union[CompletionScore, _Mapping]] = ...) -> None: ...

class ScoreBatchRequest(_message.Message):
    __slots__ = ("task", "completions", "answers", "labels", "timeout_s")
    TASK_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    task: str
    completions: _containers.RepeatedScalarFieldContainer[bytes]
    answers: _containers.RepeatedScalarFieldContainer[bytes]
    labels: _containers.RepeatedScalarFieldContainer[bytes]
    timeout_s: float
    def __init__(self, task: _Optional[str] = ..., completions: _Optional[_Iterable[bytes]] = ..., answers: _Optional[_Iterable[bytes]] = ..., labels: _Optional[_Iterable[bytes]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ScoreBatchResponse(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[CompletionScore]
    def __init__(self, scores: _Optional[_Iterable[_Union[CompletionScore, _Mapping]]] = ...) -> None: ...

class CompletionScore(_message.Message):
    __slots__ = ("reward", "success", "terms", "status", "message")
    class TermsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REWARD_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reward: float
    success: bool
    terms: _containers.ScalarMap[str, float]
    status: ScoreStatus
    message: str
    def __init__(self, reward: _Optional[float] = ..., success: _Optional[bool] = ..., terms: _Optional[_Mapping[str, float]] = ..., status: _Optional[_Union[ScoreStatus, str]] = ..., message: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("name", "max_reward", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_REWARD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_reward: float
    description: str
    def __init__(self, name: _Optional[str] = ..., max_reward: _Optional[float] = ..., description: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskInfo]
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskInfo, _Mapping]]] = ...) -> None: ...
