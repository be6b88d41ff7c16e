"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Literal
from urllib.parse import quote

import httpx

from rlpips_client._inputs import ImageInput
from rlpips_client._protocol import (
    JSON,
    Call,
    auth_headers,
    bank_add_call,
    bank_create_call,
    bank_item_call,
    bank_search_call,
    distance_call,
    error_from,
    json_of,
    new_request_id,
    robustness_call,
    transport_error,
)
from rlpips_client._retry import RetryPolicy
from rlpips_client.banks import BankInfo, BankSearchResult, statuses
from rlpips_client.models import DistanceResult, ModelInfo, RobustnessResult


class Client:
    """A client of one R-LPIPS service (or of the load balancer in front of its replicas).

    ``api_key`` is sent as ``Authorization: Bearer``; ``timeout`` (seconds, or an ``httpx.Timeout``)
    bounds each attempt (default 90 s: above the service's 60 s robustness-check deadline, so that its
    own 504 arrives); ``retries``, ``backoff`` and ``max_backoff`` make the :class:`RetryPolicy`
    (429, 502, 503 and failed connections are retried, honouring ``Retry-After``). ``transport``,
    ``headers`` and ``sleep`` are for tests and special set-ups. Use it as a context manager, or call
    :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 90.0,
        retries: int = 3,
        backoff: float = 0.5,
        *,
        max_backoff: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.retry = RetryPolicy(retries, backoff, max_backoff)
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            transport=transport,
            headers=auth_headers(api_key, headers),
        )

    def distance(
        self,
        reference: ImageInput,
        candidates: ImageInput | Sequence[ImageInput],
        model: str | None = None,
        threshold: float | None = None,
        *,
        spatial: bool = False,
        spatial_scale: Literal["pair", "shared"] | None = None,
        per_layer: bool = False,
        invariance: Sequence[Literal["hflip"]] | None = None,
    ) -> DistanceResult:
        """Distances from ``reference`` to each of ``candidates`` (one image or a sequence).

        ``model``: a name from :meth:`models` (default: the service's); ``threshold``: the
        near-duplicate threshold (default: the model's); ``spatial``: heat maps
        (``PairResult.spatial_png``), each scaled to its own peak or, with ``spatial_scale="shared"``,
        to the request's largest (``PairResult.spatial_max``); ``per_layer``: per-layer distances;
        ``invariance=["hflip"]``: the distance ignores mirroring (``PairResult.mirrored``)."""
        call = distance_call(
            reference,
            candidates,
            model=model,
            threshold=threshold,
            spatial=spatial or None,
            spatial_scale=spatial_scale,
            per_layer=per_layer or None,
            invariance=invariance or None,
        )
        return DistanceResult.from_json(self._json(call))

    def robustness_check(
        self,
        reference: ImageInput,
        candidate: ImageInput | None = None,
        *,
        models: Sequence[str] | None = None,
        attack: Literal["linf", "l2"] | None = None,
        epsilon: float | None = None,
        steps: int | None = None,
        step_size: float | None = None,
        goal: Literal["evade", "impersonate"] | None = None,
        random_start: bool | None = None,
        seed: int | None = None,
        threshold: float | None = None,
        return_adversarial: bool = False,
        invariance: Sequence[Literal["hflip"]] | None = None,
    ) -> RobustnessResult:
        """White-box PGD within an ε-ball against each model: how far does the distance move?

        ``candidate`` absent: the reference itself is attacked. Every option left ``None`` takes the
        service's default (see its ``/docs``)."""
        call = robustness_call(
            reference,
            candidate,
            models=models,
            attack=attack,
            epsilon=epsilon,
            steps=steps,
            step_size=step_size,
            goal=goal,
            random_start=random_start,
            seed=seed,
            threshold=threshold,
            return_adversarial=return_adversarial or None,
            invariance=invariance or None,
        )
        return RobustnessResult.from_json(self._json(call))

    def models(self) -> list[ModelInfo]:
        """Every model of the service's store (``loaded`` ones can be used)."""
        return [ModelInfo.from_json(m) for m in self._json(Call("GET", "/models"))["models"]]

    def health(self) -> bool:
        """Whether the service answers ``/healthz`` (no retries)."""
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def ready(self) -> bool:
        """Whether the service answers ``/readyz`` with 200: models loaded, not draining (no retries)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    # -- known-items banks ---------------------------------------------------------------------

    def bank_create(
        self, bank: str, model: str | None = None, threshold: float | None = None
    ) -> BankInfo:
        """Create ``bank`` (defaults: the service's model, the model's threshold); an existing bank
        with the same settings is returned as it is, one with others raises (409 ``conflict``)."""
        return BankInfo.from_json(self._json(bank_create_call(bank, model, threshold)))

    def bank_info(self, bank: str) -> BankInfo:
        """The bank's settings, item count and stored bytes."""
        return BankInfo.from_json(self._json(Call("GET", f"/banks/{quote(bank, safe='')}")))

    def bank_delete(self, bank: str) -> None:
        """Delete the bank and its items."""
        self._send(Call("DELETE", f"/banks/{quote(bank, safe='')}"), new_request_id())

    def bank_add(self, bank: str, items: Mapping[str, ImageInput]) -> dict[str, str]:
        """Add ``{id: image}`` (idempotent per id, so retried safely); each id's status."""
        return statuses(self._json(bank_add_call(bank, items)))

    def bank_remove(self, bank: str, item: str) -> None:
        """Remove one item."""
        self._send(bank_item_call(bank, item), new_request_id())

    def bank_search(
        self,
        bank: str,
        image: ImageInput,
        threshold: float | None = None,
        limit: int | None = None,
        *,
        max_checked: int | None = None,
        mirror: bool = False,
    ) -> BankSearchResult:
        """The bank's items within ``threshold`` of ``image``, nearest first."""
        call = bank_search_call(
            bank,
            image,
            threshold=threshold,
            limit=limit,
            max_checked=max_checked,
            mirror=mirror or None,
        )
        return BankSearchResult.from_json(self._json(call))

    def _json(self, call: Call) -> JSON:
        request_id = new_request_id()
        return json_of(self._send(call, request_id), request_id)

    def _send(self, call: Call, request_id: str) -> httpx.Response:
        """The first successful response, retrying as the policy says; raises an ``RLPIPSError``."""
        repeat = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, **call.send_args(request_id))
            except httpx.TransportError as exc:
                wait = self.retry.after_error(repeat, exc)
                if wait is None:
                    raise transport_error(exc, request_id) from exc
            else:
                if response.is_success:
                    return response
                wait = self.retry.after_response(repeat, response)
                if wait is None:
                    raise error_from(response, request_id)
            self._sleep(wait)
            repeat += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
