from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class WorkflowPredictionsRequest(_message.Message):
    __slots__ = ("workflow_name", "input", "workflow_version")
    class InputEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    WORKFLOW_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    workflow_name: str
    input: _containers.ScalarMap[str, bytes]
    workflow_version: str
    def __init__(self, workflow_name: _Optional[str] = ..., input: _Optional[_Mapping[str, bytes]] = ..., workflow_version: _Optional[str] = ...) -> None: ...

class WorkflowPredictionResponse(_message.Message):
    __slots__ = ("prediction", "content_type")
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    prediction: bytes
    content_type: str
    def __init__(self, prediction: _Optional[bytes] = ..., content_type: _Optional[str] = ...) -> None: ...
