from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServiceRef(_message.Message):
    __slots__ = ("namespace", "name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("subscribe", "unsubscribe", "grpc_services", "pod")
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    UNSUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    GRPC_SERVICES_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    subscribe: _containers.RepeatedCompositeFieldContainer[ServiceRef]
    unsubscribe: _containers.RepeatedCompositeFieldContainer[ServiceRef]
    grpc_services: _containers.RepeatedScalarFieldContainer[str]
    pod: PodRef
    def __init__(self, subscribe: _Optional[_Iterable[_Union[ServiceRef, _Mapping]]] = ..., unsubscribe: _Optional[_Iterable[_Union[ServiceRef, _Mapping]]] = ..., grpc_services: _Optional[_Iterable[str]] = ..., pod: _Optional[_Union[PodRef, _Mapping]] = ...) -> None: ...

class PodRef(_message.Message):
    __slots__ = ("namespace", "name")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("services", "claims", "selecting")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    SELECTING_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceUpdate]
    claims: _containers.RepeatedCompositeFieldContainer[GrpcServiceClaims]
    selecting: Selecting
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceUpdate, _Mapping]]] = ..., claims: _Optional[_Iterable[_Union[GrpcServiceClaims, _Mapping]]] = ..., selecting: _Optional[_Union[Selecting, _Mapping]] = ...) -> None: ...

class ServiceUpdate(_message.Message):
    __slots__ = ("service", "exists", "full", "endpoints", "removed", "policy", "ports", "ports_changed", "selector", "selector_changed")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    PORTS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_CHANGED_FIELD_NUMBER: _ClassVar[int]
    service: ServiceRef
    exists: bool
    full: bool
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    removed: _containers.RepeatedCompositeFieldContainer[EndpointKey]
    policy: Policy
    ports: _containers.RepeatedScalarFieldContainer[int]
    ports_changed: bool
    selector: _containers.ScalarMap[str, str]
    selector_changed: bool
    def __init__(self, service: _Optional[_Union[ServiceRef, _Mapping]] = ..., exists: _Optional[bool] = ..., full: _Optional[bool] = ..., endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., removed: _Optional[_Iterable[_Union[EndpointKey, _Mapping]]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., ports: _Optional[_Iterable[int]] = ..., ports_changed: _Optional[bool] = ..., selector: _Optional[_Mapping[str, str]] = ..., selector_changed: _Optional[bool] = ...) -> None: ...

class EndpointKey(_message.Message):
    __slots__ = ("address", "port")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("address", "port", "weight", "tls", "ready", "serving", "terminating", "zone", "pod")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    TERMINATING_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    weight: int
    tls: bool
    ready: bool
    serving: bool
    terminating: bool
    zone: str
    pod: str
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ..., weight: _Optional[int] = ..., tls: _Optional[bool] = ..., ready: _Optional[bool] = ..., serving: _Optional[bool] = ..., terminating: _Optional[bool] = ..., zone: _Optional[str] = ..., pod: _Optional[str] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("lb", "grpc_services", "allow", "allow_any", "timeout_seconds", "retry_on", "retry_budget", "export_grpc_services")
    LB_FIELD_NUMBER: _ClassVar[int]
    GRPC_SERVICES_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    ALLOW_ANY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RETRY_ON_FIELD_NUMBER: _ClassVar[int]
    RETRY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    EXPORT_GRPC_SERVICES_FIELD_NUMBER: _ClassVar[int]
    lb: str
    grpc_services: _containers.RepeatedScalarFieldContainer[str]
    allow: _containers.RepeatedScalarFieldContainer[str]
    allow_any: bool
    timeout_seconds: float
    retry_on: _containers.RepeatedScalarFieldContainer[str]
    retry_budget: float
    export_grpc_services: bool
    def __init__(self, lb: _Optional[str] = ..., grpc_services: _Optional[_Iterable[str]] = ..., allow: _Optional[_Iterable[str]] = ..., allow_any: _Optional[bool] = ..., timeout_seconds: _Optional[float] = ..., retry_on: _Optional[_Iterable[str]] = ..., retry_budget: _Optional[float] = ..., export_grpc_services: _Optional[bool] = ...) -> None: ...

class GrpcServiceClaims(_message.Message):
    __slots__ = ("grpc_service", "services")
    GRPC_SERVICE_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    grpc_service: str
    services: _containers.RepeatedCompositeFieldContainer[ServiceRef]
    def __init__(self, grpc_service: _Optional[str] = ..., services: _Optional[_Iterable[_Union[ServiceRef, _Mapping]]] = ...) -> None: ...

class Selecting(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceRef]
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceRef, _Mapping]]] = ...) -> None: ...
