"""A chat's ``chat_template_kwargs`` are variables for the served model's template, never the
template renderer's own arguments: a request cannot swap in a template of its own (code the
door would run) through them, nor change how the template is applied."""

from __future__ import annotations

import inspect
import json

import pytest

from alise.http.chat import ChatRenderer
from alise.http.errors import ApiError
from alise.http.protocol import RENDERER_ARGUMENTS, parse_request

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
MESSAGES = [{"role": "user", "content": "hello"}]


def parse(kwargs: dict):
    return parse_request({"messages": MESSAGES, "chat_template_kwargs": kwargs}, chat=True)


@pytest.mark.parametrize("name, value", [
    ("chat_template", "owned {{ 7 * 6 }}"), ("continue_final_message", True), ("tools", []),
    ("documents", [{"title": "x", "text": "y"}]), ("return_dict", True), ("sanitize_control_tokens", False),
    ("tokenize", True), ("add_generation_prompt", False),
])
def test_the_renderers_own_arguments_are_refused(name, value):
    with pytest.raises(ApiError) as info:
        parse({name: value})
    error = info.value
    assert (error.status, error.param) == (400, "chat_template_kwargs")
    assert name in error.message


def test_every_argument_of_the_renderer_is_refused():
    # A transformers release that gives apply_chat_template a new argument fails here first.
    from transformers import PreTrainedTokenizerBase

    params = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    assert set(params) - {"self", "kwargs"} <= RENDERER_ARGUMENTS


@pytest.fixture(scope="module")
def renderer(tiny_llama_dir, tmp_path_factory) -> ChatRenderer:
    import shutil

    model_dir = tmp_path_factory.mktemp("templated") / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": TEMPLATE}))
    return ChatRenderer.for_model(str(model_dir))


def test_template_variables_reach_the_template(renderer):
    req = parse({"enable_thinking": False})
    thinking_off = renderer.tokenizer.decode(renderer.render(req.messages, req.template_kwargs))
    plain = renderer.tokenizer.decode(renderer.render(req.messages, {}))
    assert "think" in thinking_off and "think" not in plain
