from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NONE: _ClassVar[Compression]
    ZSTD: _ClassVar[Compression]
NONE: Compression
ZSTD: Compression

class SnapshotRef(_message.Message):
    __slots__ = ("snapshot_id", "namespace", "name")
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    snapshot_id: str
    namespace: str
    name: str
    def __init__(self, snapshot_id: _Optional[str] = ..., namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class GetChainRequest(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: SnapshotRef
    def __init__(self, snapshot: _Optional[_Union[SnapshotRef, _Mapping]] = ...) -> None: ...

class ChainLayer(_message.Message):
    __slots__ = ("id", "parent", "size", "digest", "tar_size", "chain_id", "created", "origin")
    ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    TAR_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    id: str
    parent: str
    size: int
    digest: str
    tar_size: int
    chain_id: str
    created: float
    origin: str
    def __init__(self, id: _Optional[str] = ..., parent: _Optional[str] = ..., size: _Optional[int] = ..., digest: _Optional[str] = ..., tar_size: _Optional[int] = ..., chain_id: _Optional[str] = ..., created: _Optional[float] = ..., origin: _Optional[str] = ...) -> None: ...

class GetChainResponse(_message.Message):
    __slots__ = ("layers", "driver", "node_id")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[ChainLayer]
    driver: str
    node_id: str
    def __init__(self, layers: _Optional[_Iterable[_Union[ChainLayer, _Mapping]]] = ..., driver: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class ChangesRequest(_message.Message):
    __slots__ = ("snapshot", "base")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    snapshot: SnapshotRef
    base: str
    def __init__(self, snapshot: _Optional[_Union[SnapshotRef, _Mapping]] = ..., base: _Optional[str] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("path", "kind")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Change.Kind]
        ADDED: _ClassVar[Change.Kind]
        MODIFIED: _ClassVar[Change.Kind]
        DELETED: _ClassVar[Change.Kind]
    KIND_UNSPECIFIED: Change.Kind
    ADDED: Change.Kind
    MODIFIED: Change.Kind
    DELETED: Change.Kind
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    path: str
    kind: Change.Kind
    def __init__(self, path: _Optional[str] = ..., kind: _Optional[_Union[Change.Kind, str]] = ...) -> None: ...

class ChangesResponse(_message.Message):
    __slots__ = ("changes",)
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[Change]
    def __init__(self, changes: _Optional[_Iterable[_Union[Change, _Mapping]]] = ...) -> None: ...

class DiffSizeRequest(_message.Message):
    __slots__ = ("snapshot", "base")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    snapshot: SnapshotRef
    base: str
    def __init__(self, snapshot: _Optional[_Union[SnapshotRef, _Mapping]] = ..., base: _Optional[str] = ...) -> None: ...

class DiffSizeResponse(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...

class ExportDiffRequest(_message.Message):
    __slots__ = ("snapshot", "base", "starting_offset", "compression")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    STARTING_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    snapshot: SnapshotRef
    base: str
    starting_offset: int
    compression: Compression
    def __init__(self, snapshot: _Optional[_Union[SnapshotRef, _Mapping]] = ..., base: _Optional[str] = ..., starting_offset: _Optional[int] = ..., compression: _Optional[_Union[Compression, str]] = ...) -> None: ...

class ExportSummary(_message.Message):
    __slots__ = ("media_type", "diff_id", "uncompressed_size", "digest", "size", "bytes_sent")
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DIFF_ID_FIELD_NUMBER: _ClassVar[int]
    UNCOMPRESSED_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    media_type: str
    diff_id: str
    uncompressed_size: int
    digest: str
    size: int
    bytes_sent: int
    def __init__(self, media_type: _Optional[str] = ..., diff_id: _Optional[str] = ..., uncompressed_size: _Optional[int] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., bytes_sent: _Optional[int] = ...) -> None: ...

class ExportDiffResponse(_message.Message):
    __slots__ = ("data", "offset", "bytes_done", "bytes_total", "summary")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    bytes_done: int
    bytes_total: int
    summary: ExportSummary
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., summary: _Optional[_Union[ExportSummary, _Mapping]] = ...) -> None: ...

class ExportTicket(_message.Message):
    __slots__ = ("ticket", "port")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    port: int
    def __init__(self, ticket: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class ImportHeader(_message.Message):
    __slots__ = ("parent", "diff_id", "media_type", "digest", "capacity_bytes")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    DIFF_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    parent: str
    diff_id: str
    media_type: str
    digest: str
    capacity_bytes: int
    def __init__(self, parent: _Optional[str] = ..., diff_id: _Optional[str] = ..., media_type: _Optional[str] = ..., digest: _Optional[str] = ..., capacity_bytes: _Optional[int] = ...) -> None: ...

class ImportDiffRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ImportHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ImportHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImportDiffResponse(_message.Message):
    __slots__ = ("layer_id", "chain_id", "diff_id", "size", "existed")
    LAYER_ID_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    DIFF_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    layer_id: str
    chain_id: str
    diff_id: str
    size: int
    existed: bool
    def __init__(self, layer_id: _Optional[str] = ..., chain_id: _Optional[str] = ..., diff_id: _Optional[str] = ..., size: _Optional[int] = ..., existed: _Optional[bool] = ...) -> None: ...
