"""A Python client of the nlpserve REST API: ``pip install 'nlpserve[client]'`` (httpx only;
importing it loads none of the server: no FastAPI, ONNX Runtime or uvicorn).

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as c:
        c.polarity("A charming, funny and moving film.").label

It calls the API as docs/deploy.md ("How clients should call it") says a client should:
an ``X-Request-ID`` per call, kept across its retries; retries on no answer and on 429, 502
and 503, honouring ``Retry-After``, else exponential backoff with jitter, capped in number
and total time; never a retry of another 4xx. docs/service.md, "Python client", has more.
"""

from service.client._calls import CallOptions, ClientOptions
from service.client._client import AsyncClient, Client
from service.client.errors import (
    AuthenticationError,
    ClientError,
    DeadlineExceeded,
    ErrorLimit,
    IncompleteBatch,
    NlpserveError,
    RetriesExhausted,
    ServerError,
    TransportError,
)
from service.client.retry import RetryPolicy
from service.client.types import (
    BatchLimits,
    DetectResult,
    DetectWindow,
    ExplainLimits,
    Explanation,
    Health,
    ModelInfo,
    Models,
    PolarityResult,
    PosResult,
    QAResult,
    QASpan,
    Ready,
    ResponseMeta,
)

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "BatchLimits",
    "CallOptions",
    "Client",
    "ClientError",
    "ClientOptions",
    "DeadlineExceeded",
    "DetectResult",
    "DetectWindow",
    "ErrorLimit",
    "ExplainLimits",
    "Explanation",
    "Health",
    "IncompleteBatch",
    "ModelInfo",
    "Models",
    "NlpserveError",
    "PolarityResult",
    "PosResult",
    "QAResult",
    "QASpan",
    "Ready",
    "ResponseMeta",
    "RetriesExhausted",
    "RetryPolicy",
    "ServerError",
    "TransportError",
]
