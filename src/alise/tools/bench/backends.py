"""Where `alise bench` sends its requests: ALISE's gRPC door, or any OpenAI-compatible server.

A backend's ``stream`` yields, as each chunk of output arrives, the number of tokens it holds
(1 when a server does not say: an OpenAI chunk is about one token), then one ``StreamEnd`` with
the request's token count (the server's ``usage`` when it gives one) and finish reason. The
caller stamps the time of each yield, so every backend is measured by the same clock code.

Each request generates a known number of tokens: ``ignore_eos`` always, and either
``oracle_output_tokens`` (ALISE's trace-replay field, with a generous common ``max_tokens``,
so the scheduler's policy never sees the true length) or ``max_tokens`` = the length (what
vLLM's benchmark sends; the only way for servers without the oracle field).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Send:
    """One request as a backend sends it."""

    prompt: str
    max_tokens: int
    oracle_output_tokens: int   # 0 = not sent
    request_id: str
    timeout_s: float


@dataclass(frozen=True)
class StreamEnd:
    num_tokens: int
    finish_reason: str


class BenchError(Exception):
    """A request the server refused or broke off (recorded per request; the run goes on)."""


class GrpcBackend:
    name = "grpc"

    def __init__(self, address: str, *, token: str | None = None) -> None:
        self.target = address
        self.token = token
        self._client = None

    async def __aenter__(self) -> GrpcBackend:
        from alise.client import AsyncClient

        self._client = AsyncClient(self.target, token=self.token)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.close()

    async def stream(self, send: Send) -> AsyncIterator[int | StreamEnd]:
        num_tokens, finish = 0, ""
        async for chunk in self._client.generate(
                send.prompt, max_tokens=send.max_tokens, ignore_eos=True,
                oracle_output_tokens=send.oracle_output_tokens, request_id=send.request_id,
                timeout_s=send.timeout_s):
            num_tokens += len(chunk.token_ids)
            finish = chunk.finish_reason or finish
            if chunk.token_ids:
                yield len(chunk.token_ids)
        yield StreamEnd(num_tokens, finish)


class OpenAIBackend:
    """``/v1/completions`` (or ``/v1/chat/completions`` with ``chat``), streamed, over aiohttp.

    aiohttp, as vLLM's own benchmark client uses: its C HTTP parser costs the measured stream
    about half a millisecond less per first token than httpx's pure-Python one on the same
    server (docs/http.md), so what the table shows is the server's, not the client's.
    """

    def __init__(self, base_url: str, *, chat: bool = False, model: str | None = None,
                 token: str | None = None, token_ids: bool = False) -> None:
        self.target = base_url.rstrip("/")
        self.chat = chat
        self.name = "openai-chat" if chat else "openai"
        self.model = model
        self.token = token
        #: Ask for vLLM's ``return_token_ids`` so each chunk says how many tokens it holds.
        self.token_ids = token_ids
        self._http = None

    async def __aenter__(self) -> OpenAIBackend:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        # No connection cap (a run's concurrency is the harness's to set) and no session-wide
        # timeout: each request carries its own.
        self._http = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0),
                                           timeout=aiohttp.ClientTimeout(total=None))
        if self.model is None:
            try:
                async with self._http.get(f"{self.target}/v1/models") as reply:
                    if reply.status != 200:
                        raise BenchError(f"GET {self.target}/v1/models: {reply.status} {(await reply.text())[:200]}")
                    self.model = (await reply.json())["data"][0]["id"]
            except aiohttp.ClientError as exc:  # nothing there, or not a URL
                await self._http.close()
                raise BenchError(f"GET {self.target}/v1/models: {type(exc).__name__}: {exc}") from None
            except BaseException:
                await self._http.close()
                raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.close()

    def _body(self, send: Send) -> dict:
        body = {"model": self.model, "max_tokens": send.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True}
        if self.chat:
            body["messages"] = [{"role": "user", "content": send.prompt}]
        else:
            body["prompt"] = send.prompt
        if send.oracle_output_tokens:
            body["oracle_output_tokens"] = send.oracle_output_tokens
        if self.token_ids:
            body["return_token_ids"] = True
        return body

    async def stream(self, send: Send) -> AsyncIterator[int | StreamEnd]:
        import aiohttp

        path = "/v1/chat/completions" if self.chat else "/v1/completions"
        num_chunks, usage_tokens, finish = 0, None, ""
        timeout = aiohttp.ClientTimeout(total=send.timeout_s)
        async with self._http.post(f"{self.target}{path}", json=self._body(send), timeout=timeout) as reply:
            if reply.status != 200:
                text = (await reply.read()).decode(errors="replace")
                raise BenchError(f"HTTP {reply.status}: {text[:300]}")
            async for raw in reply.content:  # one line at a time
                line = raw.rstrip(b"\r\n")
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise BenchError(f"error event: {event['error'].get('message')}")
                if event.get("usage"):
                    usage_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or ():
                    finish = choice.get("finish_reason") or finish
                    text = choice["delta"].get("content") if self.chat else choice.get("text")
                    count = len(choice["token_ids"]) if "token_ids" in choice else int(bool(text))
                    if count:
                        num_chunks += count
                        yield count
        yield StreamEnd(usage_tokens if usage_tokens is not None else num_chunks, finish)
