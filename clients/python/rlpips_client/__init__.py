"""Python client of the R-LPIPS similarity service.

``Client`` (blocking) and ``AsyncClient`` (asyncio) call ``/distance``, ``/robustness-check`` and
``/models`` with multipart uploads, retry what is safe to retry (429, 502, 503, failed connections:
both endpoints are pure functions of their input) with exponential backoff that honours
``Retry-After``, and raise :class:`RLPIPSError` subclasses carrying the service's error code.
Depends on httpx only.
"""

from rlpips_client._async import AsyncClient
from rlpips_client._errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailed,
    RateLimitedError,
    RequestTimeout,
    RLPIPSError,
    ServerError,
    UnavailableError,
)
from rlpips_client._retry import RetryPolicy
from rlpips_client._sync import Client
from rlpips_client.banks import BankInfo, BankMatch, BankSearchResult
from rlpips_client.models import (
    AttackParams,
    DistanceResult,
    ModelFile,
    ModelInfo,
    ModelOutcome,
    PairResult,
    RobustnessResult,
    Timing,
)

__all__ = [
    "AsyncClient",
    "AttackParams",
    "AuthenticationError",
    "BankInfo",
    "BankMatch",
    "BankSearchResult",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "DistanceResult",
    "ModelFile",
    "ModelInfo",
    "ModelOutcome",
    "PairResult",
    "RLPIPSError",
    "RateLimitedError",
    "RequestTimeout",
    "RetryPolicy",
    "RobustnessResult",
    "ServerError",
    "Timing",
    "UnavailableError",
]
