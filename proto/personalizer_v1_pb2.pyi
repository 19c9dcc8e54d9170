from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_FULL: _ClassVar[Mode]
    MODE_RERANKER: _ClassVar[Mode]
    MODE_ADAPTER: _ClassVar[Mode]
MODE_UNSPECIFIED: Mode
MODE_FULL: Mode
MODE_RERANKER: Mode
MODE_ADAPTER: Mode

class HistoryItem(_message.Message):
    __slots__ = ("id", "fields")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    fields: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., fields: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PersonalizeRequest(_message.Message):
    __slots__ = ("user_id", "task", "input", "mode")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    task: str
    input: str
    mode: Mode
    def __init__(self, user_id: _Optional[str] = ..., task: _Optional[str] = ..., input: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("text", "score", "chosen")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    text: str
    score: float
    chosen: bool
    def __init__(self, text: _Optional[str] = ..., score: _Optional[float] = ..., chosen: _Optional[bool] = ...) -> None: ...

class LlmUsage(_message.Message):
    __slots__ = ("calls", "cache_hits", "prompt_tokens", "completion_tokens")
    CALLS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    calls: int
    cache_hits: int
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, calls: _Optional[int] = ..., cache_hits: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class PersonalizeResponse(_message.Message):
    __slots__ = ("answer", "candidates", "items", "llm", "reranker_head", "adapter_head", "model_version", "task", "elapsed_ms")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    RERANKER_HEAD_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_HEAD_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    answer: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    items: _containers.RepeatedCompositeFieldContainer[HistoryItem]
    llm: LlmUsage
    reranker_head: str
    adapter_head: str
    model_version: str
    task: str
    elapsed_ms: float
    def __init__(self, answer: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., items: _Optional[_Iterable[_Union[HistoryItem, _Mapping]]] = ..., llm: _Optional[_Union[LlmUsage, _Mapping]] = ..., reranker_head: _Optional[str] = ..., adapter_head: _Optional[str] = ..., model_version: _Optional[str] = ..., task: _Optional[str] = ..., elapsed_ms: _Optional[float] = ...) -> None: ...

class AddHistoryRequest(_message.Message):
    __slots__ = ("user_id", "items")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    items: _containers.RepeatedCompositeFieldContainer[HistoryItem]
    def __init__(self, user_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[HistoryItem, _Mapping]]] = ...) -> None: ...

class AddHistoryResponse(_message.Message):
    __slots__ = ("item_ids", "history_size")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    history_size: int
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., history_size: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UserStatus(_message.Message):
    __slots__ = ("user_id", "role", "history_size", "reranker_head", "adapter_head")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    RERANKER_HEAD_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_HEAD_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    role: str
    history_size: int
    reranker_head: bool
    adapter_head: bool
    def __init__(self, user_id: _Optional[str] = ..., role: _Optional[str] = ..., history_size: _Optional[int] = ..., reranker_head: _Optional[bool] = ..., adapter_head: _Optional[bool] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("module", "version", "heads", "saved_at")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    SAVED_AT_FIELD_NUMBER: _ClassVar[int]
    module: str
    version: str
    heads: int
    saved_at: float
    def __init__(self, module: _Optional[str] = ..., version: _Optional[str] = ..., heads: _Optional[int] = ..., saved_at: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("task", "users", "models", "llm_backend", "llm", "server_version", "api_version", "requests_served", "model_version")
    TASK_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LLM_BACKEND_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    task: str
    users: _containers.RepeatedCompositeFieldContainer[UserStatus]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    llm_backend: str
    llm: LlmUsage
    server_version: str
    api_version: str
    requests_served: int
    model_version: str
    def __init__(self, task: _Optional[str] = ..., users: _Optional[_Iterable[_Union[UserStatus, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., llm_backend: _Optional[str] = ..., llm: _Optional[_Union[LlmUsage, _Mapping]] = ..., server_version: _Optional[str] = ..., api_version: _Optional[str] = ..., requests_served: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...
