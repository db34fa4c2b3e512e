"""Output-length estimates for new jobs: the predictor service, or a running mean.

The predictor is asked with a short deadline. When it is not configured, slow or down,
the estimate falls back to the running mean of observed output lengths (seeded with a
prior), and the state says so. While degraded, requests skip the predictor for
``retry_after_s`` (so a slow predictor does not add its deadline to every request), then
one request probes it again; the first success restores the normal path.

The requests that ask in one turn of the event loop share one Predict call (those with a
conversation in a call of their own): a burst's handlers resume together from the prompt
checks (``alise.common.batches.InOrderBatches``), so a burst of N is a few calls, not N.

Finished jobs go back to the predictor through an :class:`Observer` (the predictor link's
outbox: buffered, one long-lived stream), naming the prediction they answer
(:attr:`PredictedLength.prediction_id`) so the prompt is not sent again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from alise.common.batches import settle
from alise.core.job import LengthEstimate
from alise.core.policy import DEFAULT_ESTIMATE
from alise.predictor.context import PromptContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictedLength(LengthEstimate):
    """A length estimate from the predictor, with the id its Observe refers to."""

    prediction_id: str = ""


class Observer(Protocol):
    def add(self, prediction_id: str, prompt: str, prompt_tokens: int, output_tokens: int) -> None:
        """Queues one finished job for the predictor (never blocks)."""

    @property
    def num_buffered(self) -> int:
        """Observations queued and not yet taken by the predictor."""

    async def close(self) -> None: ...


class PredictFn(Protocol):
    async def __call__(self, prompts: list[str], prompt_tokens: list[int], timeout_s: float,
                       contexts: list[PromptContext] | None = None) -> list[LengthEstimate]:
        """One estimate per prompt; ``contexts``: one per prompt (the conversation it
        continues), or None."""


class LengthEstimator:
    def __init__(self, predict: PredictFn | None = None, observe: Observer | None = None, *,
                 timeout_s: float = 0.25, prior: LengthEstimate = DEFAULT_ESTIMATE,
                 retry_after_s: float = 1.0, on_state=None) -> None:
        self._predict = predict
        self._observe = observe
        self.timeout_s = timeout_s
        self._sum = prior.mean
        self._count = 1
        self._p90_ratio = prior.p90 / max(prior.mean, 1.0)
        self.state = "ok" if predict is not None else "disabled (no predictor configured)"
        self.last_error_s = 0.0
        self.retry_after_s = retry_after_s
        self.on_state = on_state
        #: Asked this turn of the loop, not yet sent: (prompt, its tokens, context, answer).
        self._asked: list[tuple[str, int, PromptContext | None, asyncio.Future]] = []
        self._sending: set[asyncio.Future] = set()

    async def warm_up(self, timeout_s: float = 30.0) -> None:
        """One prediction with a generous deadline, so the predictor's first-call costs
        (loading, compiling) are not paid by a client request; its outcome sets the state."""
        if self._predict is None:
            return
        try:
            await asyncio.wait_for(self._predict(["warm-up"], [2], timeout_s), timeout_s)
        except Exception as exc:
            logger.warning("predictor warm-up failed: %s: %s", type(exc).__name__, exc)
            self._set_state(f"degraded (warm-up: {type(exc).__name__}: {exc or 'timeout'})"[:200])
            self.last_error_s = time.monotonic()
            return
        if self.is_degraded:
            self._set_state("ok")

    @property
    def running_mean(self) -> LengthEstimate:
        mean = self._sum / self._count
        return LengthEstimate(mean=mean, p50=mean, p90=mean * self._p90_ratio, source="mean")

    async def estimate(self, prompt: str, prompt_tokens: int,
                       context: PromptContext | None = None) -> LengthEstimate:
        """``context``: the conversation the prompt continues, when the request gave one."""
        if self._predict is None:
            return self.running_mean
        if self.is_degraded and time.monotonic() - self.last_error_s < self.retry_after_s:
            return self.running_mean
        answer = asyncio.get_running_loop().create_future()
        self._asked.append((prompt, prompt_tokens, context, answer))
        if len(self._asked) == 1:
            asyncio.get_running_loop().call_soon(self._send_asked)
        try:
            result = await answer
        except Exception as exc:  # any failure means "use the fallback"
            if not self.state.startswith("degraded"):
                logger.warning("predictor unavailable (%s: %s); using the running mean",
                               type(exc).__name__, exc or f"no answer within {self.timeout_s:g} s")
            self._set_state(f"degraded ({type(exc).__name__}: {exc or 'timeout'})"[:200])
            self.last_error_s = time.monotonic()
            return self.running_mean
        if self.state != "ok":
            logger.info("predictor is back")
            self._set_state("ok")
        return result

    def _send_asked(self) -> None:
        """Sends what was asked this turn: one call without contexts, one with."""
        asked, self._asked = self._asked, []
        for group in ([a for a in asked if a[2] is None], [a for a in asked if a[2] is not None]):
            if group:
                sending = asyncio.ensure_future(self._predict_group(group))
                self._sending.add(sending)
                sending.add_done_callback(self._sending.discard)

    async def _predict_group(self, group: list[tuple[str, int, PromptContext | None, asyncio.Future]]) -> None:
        prompts, tokens, contexts, answers = map(list, zip(*group, strict=True))
        try:
            results = await asyncio.wait_for(self._predict(
                prompts, tokens, self.timeout_s, contexts=None if contexts[0] is None else contexts),
                self.timeout_s)
            if len(results) != len(prompts):
                raise ValueError(f"{len(results)} estimates for {len(prompts)} prompts")
        except Exception as exc:
            results = [exc] * len(answers)
        except BaseException:  # cancelled (the scheduler stops): no caller waits forever
            for answer in answers:
                answer.cancel()
            raise
        settle(answers, results)

    @property
    def is_degraded(self) -> bool:
        return self.state.startswith("degraded")

    def _set_state(self, state: str) -> None:
        changed = state.startswith("degraded") != self.is_degraded
        self.state = state
        if changed and self.on_state is not None:
            self.on_state(not self.is_degraded)

    def observe(self, prompt: str, prompt_tokens: int, output_tokens: int,
                estimate: LengthEstimate | None = None) -> None:
        """Records a finished job (running mean now; the predictor through the observer),
        naming ``estimate``'s prediction when it came from the predictor."""
        self._sum += output_tokens
        self._count += 1
        if self._observe is None:
            return
        prediction_id = estimate.prediction_id if isinstance(estimate, PredictedLength) else ""
        self._observe.add(prediction_id, prompt, prompt_tokens, output_tokens)

    async def close(self) -> None:
        if self._observe is not None:
            await self._observe.close()
