"""Chat messages -> one prompt.

A model directory whose tokenizer has a chat template renders through it (the same rules the
model was tuned on), and the door sends the result as token ids, encoded without special tokens,
since the template already placed them. Everything else (the presets' WordPiece tokenizer, a
tokenizer without a template) uses the plain template, sent as text::

    System: <content>
    User: <content>
    Assistant: <content>
    Assistant:

one line per message with the role's name, then ``Assistant:`` for the reply.

A chat also tells the scheduler the conversation it continues, for its length estimate
(``ChatRenderer.conversation``): the latest user message, and the output tokens of the
assistant messages before it (the served model's tokenizer counts them; without one here, a
directory of another host, only the message is sent).

A request's ``chat_template_kwargs`` (vLLM's: ``{"enable_thinking": false}``, say) reach the
template as variables; a template that does not use one ignores it, as in vLLM, and the plain
template uses none. Messages are bounded in characters before anything renders or tokenizes
them (``check_length``), by the same rule as the scheduler's text prompts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alise.client import Conversation
from alise.http.errors import bad_request
from alise.http.logprobs import token_texts
from alise.scheduler.request_checks import MAX_PREVIOUS_ANSWERS, max_text_chars, text_too_long

logger = logging.getLogger(__name__)

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant",
              "tool": "Tool"}


def check_length(messages: list[dict], max_model_len: int) -> None:
    """Raises ApiError (400) when the messages hold more text than the context can."""
    num_chars = sum(len(m["content"]) for m in messages)
    if num_chars > max_text_chars(max_model_len):
        raise bad_request(text_too_long(num_chars, max_model_len, subject="messages have"), param="messages")


def render_plain(messages: list[dict]) -> str:
    return "".join(f"{ROLE_NAMES[m['role']]}: {m['content']}\n" for m in messages) + "Assistant:"


class ChatRenderer:
    """Renders chat messages with a tokenizer's template, or the plain one without; counts
    earlier answers' tokens with the served model's tokenizer (``counter``; None: unknown),
    and writes a token's text for logprobs with it (``token_text``)."""

    def __init__(self, tokenizer=None, counter=None) -> None:
        self.tokenizer = tokenizer
        self.counter = tokenizer if counter is None else counter
        self.token_text = token_texts(self.counter)

    @classmethod
    def for_model(cls, model: str | None) -> ChatRenderer:
        """The renderer for ``model`` as the scheduler names it (a directory or a preset)."""
        from alise.modelinfo.source import resolve_model
        from alise.modelinfo.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(resolve_model(model)) if model is not None else None
        except ValueError as exc:  # a directory on the scheduler's host, not here
            logger.info("no tokenizer for %s here (%s): chat uses the plain template, and earlier "
                        "answers' lengths are not sent", model, exc)
            return cls()
        if not Path(model).is_dir() or not getattr(tokenizer, "chat_template", None):
            if Path(model).is_dir():
                logger.info("%s has no chat template: chat uses the plain template", model)
            return cls(counter=tokenizer)
        logger.info("chat messages render with the chat template of %s", model)
        return cls(tokenizer)

    def conversation(self, messages: list[dict]) -> Conversation | None:
        """Blocking (a tokenizer runs). The latest user message and the output tokens of the
        assistant messages before it (the latest ``MAX_PREVIOUS_ANSWERS``); None without a
        user message."""
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None)
        if last is None:
            return None
        answers = [m["content"] for m in messages[:last] if m["role"] == "assistant"][-MAX_PREVIOUS_ANSWERS:]
        if self.counter is None or not answers:
            return Conversation(messages[last]["content"])
        ids = self.counter(answers, add_special_tokens=False)["input_ids"]
        return Conversation(messages[last]["content"], tuple(len(x) for x in ids))

    @property
    def template_name(self) -> str:
        return "plain" if self.tokenizer is None else "tokenizer"

    def render(self, messages: list[dict], template_kwargs: dict | None = None) -> str | list[int]:
        """Blocking (a template and a tokenizer run): call it off the event loop."""
        if self.tokenizer is None:
            return render_plain(messages)
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      **(template_kwargs or {}))
        except Exception as exc:  # a template refusing the messages is bad input
            raise bad_request(f"messages: the chat template refused them: {exc}", param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)
