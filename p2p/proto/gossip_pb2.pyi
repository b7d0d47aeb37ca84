from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_DENSE: _ClassVar[Layout]
    LAYOUT_SPARSE: _ClassVar[Layout]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT8: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_UINT8: DType
LAYOUT_DENSE: Layout
LAYOUT_SPARSE: Layout

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "layout", "nnz", "byte_length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    layout: Layout
    nnz: int
    byte_length: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., layout: _Optional[_Union[Layout, str]] = ..., nnz: _Optional[int] = ..., byte_length: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("tensor_index", "offset", "data")
    TENSOR_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tensor_index: int
    offset: int
    data: bytes
    def __init__(self, tensor_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("update_id", "origin", "sender", "round", "model_version", "num_samples", "defence", "mixing_weight", "tensors", "sent_at", "kind", "mix_round")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DEFENCE_FIELD_NUMBER: _ClassVar[int]
    MIXING_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MIX_ROUND_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    origin: str
    sender: str
    round: int
    model_version: int
    num_samples: int
    defence: str
    mixing_weight: float
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    sent_at: float
    kind: str
    mix_round: int
    def __init__(self, update_id: _Optional[str] = ..., origin: _Optional[str] = ..., sender: _Optional[str] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., num_samples: _Optional[int] = ..., defence: _Optional[str] = ..., mixing_weight: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., sent_at: _Optional[float] = ..., kind: _Optional[str] = ..., mix_round: _Optional[int] = ...) -> None: ...

class UpdateFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("update_id", "bytes_received")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    bytes_received: int
    def __init__(self, update_id: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class BulkOffer(_message.Message):
    __slots__ = ("ticket", "port")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    port: int
    def __init__(self, ticket: _Optional[bytes] = ..., port: _Optional[int] = ...) -> None: ...

class BulkResult(_message.Message):
    __slots__ = ("code", "details", "ack")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    code: str
    details: str
    ack: PushAck
    def __init__(self, code: _Optional[str] = ..., details: _Optional[str] = ..., ack: _Optional[_Union[PushAck, _Mapping]] = ...) -> None: ...

class ModelOffer(_message.Message):
    __slots__ = ("header", "ticket", "port")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    ticket: bytes
    port: int
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., ticket: _Optional[bytes] = ..., port: _Optional[int] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("peer_id", "model_version", "tensors")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    model_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, peer_id: _Optional[str] = ..., model_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class ModelFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...
