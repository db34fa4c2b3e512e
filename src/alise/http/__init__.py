"""The OpenAI-compatible HTTP door: ``/v1/completions``, ``/v1/chat/completions`` (whole or
streamed as Server-Sent Events), ``/v1/models``, ``/health``, ``/metrics``, ``/version``.

A thin adapter over the scheduler's gRPC ``SchedulerService`` through the async SDK
(``alise.client.AsyncClient``): it parses and type-checks the JSON, renders chat messages,
applies stop strings to the text and translates gRPC statuses into HTTP ones. It never
schedules, queues or tokenizes for the scheduler; every request takes the real path
(prediction, priority queue, preemption, streaming), and closing the connection cancels it.

Built on Starlette + uvicorn (httptools parser). Starlette, rather than FastAPI on top of it,
because the door's only request model is OpenAI's and its rules are the scheduler's: FastAPI's
pydantic validation would answer in its own 422 shape and duplicate checks whose messages must
be the scheduler's, and its dependency and OpenAPI machinery would run per request for nothing.
Starlette gives routing, request bodies and exception handling, and lets the two streaming
endpoints be plain ASGI (see ``endpoints``); uvicorn is the ASGI server the Python serving
stacks (vLLM, SGLang) run on.
"""
