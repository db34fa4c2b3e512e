"""ALISE client SDK: grpcio + protobuf only (importing it never imports torch).

    from alise.client import Client
    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate("Tell me a story", max_tokens=64):
            print(chunk.text, end="", flush=True)
"""

from alise.client.aio import DEFAULT_ADDRESS, AsyncClient
from alise.client.errors import (
    AliseError,
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    Unauthenticated,
    Unavailable,
    WrongService,
)
from alise.client.sync import Client
from alise.client.types import Chunk, Completion, Conversation, Estimate, Status, TokenLogprobs, Usage

__all__ = [
    "DEFAULT_ADDRESS", "AliseError", "AsyncClient", "Cancelled", "Chunk", "Client", "Completion",
    "Conversation", "DeadlineExceeded", "Estimate", "InvalidRequest", "Overloaded", "Status", "TokenLogprobs",
    "Unauthenticated", "Unavailable", "Usage", "WrongService",
]
