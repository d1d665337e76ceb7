"""The chat template renders exactly as transformers' apply_chat_template, inside a sandbox."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import SecurityError

from edge_qwen.chat_template import ChatTemplate, ChatTemplateError

DATA = Path(__file__).parent / "data"
QWEN_CONFIG: dict[str, Any] = json.loads((DATA / "qwen2.5_instruct_tokenizer_config.json").read_text("utf-8"))

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city; answers in °C.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. 東京 or <Paris> & co"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "now", "description": "The time.", "parameters": {}}}

TOOL_CALL_TURN = {
    "role": "assistant",
    "content": None,  # as OpenAI clients send it; transformers drops None-valued keys
    "tool_calls": [
        {
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "東京", "unit": "celsius"}},
        },
        {"type": "function", "function": {"name": "now", "arguments": {}}},
    ],
}

CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], bool, list[dict[str, Any]] | None]] = {
    "system_user": (
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi! 你好 👋"}],
        True,
        None,
    ),
    "multi_turn": (
        [
            {"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Sort a list."},
            {"role": "assistant", "content": "```python\nsorted(xs)\n```"},
            {"role": "user", "content": "In place?"},
            {"role": "assistant", "content": "xs.sort()"},
        ],
        False,
        None,
    ),
    "default_system_prompt": ([{"role": "user", "content": "Who are you?"}], True, None),
    "tool_calls_and_tool_results": (
        [
            {"role": "user", "content": "Weather in Tokyo, and the time?"},
            TOOL_CALL_TURN,
            {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'},
            {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "21 °C and clear; it is noon."},
            {"role": "user", "content": "Thanks"},
        ],
        True,
        None,
    ),
    "assistant_text_with_tool_call": (
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}],
            },
            {"role": "tool", "content": "rain"},
        ],
        True,
        None,
    ),
    "tools_without_system": (
        [{"role": "user", "content": "What's the weather in Oslo?"}],
        True,
        [WEATHER_TOOL],
    ),
    "tools_with_system": (
        [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Time?"}],
        True,
        [WEATHER_TOOL, TIME_TOOL],
    ),
    "later_system_message": (
        [
            {"role": "user", "content": "a"},
            {"role": "system", "content": "Now answer in French."},
            {"role": "user", "content": "b"},
        ],
        True,
        None,
    ),
}


@pytest.fixture(scope="module")
def qwen() -> ChatTemplate:
    return ChatTemplate(QWEN_CONFIG["chat_template"], QWEN_CONFIG["bos_token"], QWEN_CONFIG["eos_token"])


def hf_tokenizer(chat_template: str, **special_tokens: str) -> Any:
    """transformers' tokenizer around a one-word vocabulary: only its chat template matters."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=chat_template, **special_tokens
    )


@pytest.fixture(scope="module")
def hf_qwen() -> Any:
    return hf_tokenizer(QWEN_CONFIG["chat_template"], eos_token=QWEN_CONFIG["eos_token"])


# -- parity with transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_qwen_template_matches_transformers(name: str, qwen: ChatTemplate, hf_qwen: Any) -> None:
    messages, add_generation_prompt, tools = CONVERSATIONS[name]
    expected = hf_qwen.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
    )
    assert qwen.render(messages, add_generation_prompt=add_generation_prompt, tools=tools) == expected


def test_qwen_rendering_spot_checks(qwen: ChatTemplate) -> None:
    text = qwen.render([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not qwen.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False).endswith(
        "assistant\n"
    )
    with_tools = qwen.render([{"role": "user", "content": "Hi"}], tools=[WEATHER_TOOL])
    assert '"description": "City name, e.g. 東京 or <Paris> & co"' in with_tools  # no \\u or &lt; escapes


def test_messages_are_not_modified(qwen: ChatTemplate) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "q"}, dict(TOOL_CALL_TURN)]
    before = json.dumps(messages)
    qwen.render(messages)
    assert json.dumps(messages) == before


def test_environment_matches_transformers_on_its_extras() -> None:
    # tojson options, loop controls, bos/eos tokens present or absent, documents, whitespace control.
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ documents is none }}|{{ tools is none }}\n"
        "  {% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson(indent=2) }}{{ m | tojson(sort_keys=true) }}{% endfor %}\n"
        "    {% if add_generation_prompt %}\n<go>{% endif %}"
    )
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": 'é <b> & "q"', "z": 1},
        {"role": "user", "content": "2nd"},
    ]
    for bos in ("<s>", None):
        ours = ChatTemplate(template, bos, "</s>")
        special = {"eos_token": "</s>", **({"bos_token": bos} if bos else {})}
        theirs = hf_tokenizer(template, **special)
        for gen in (True, False):
            expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.render(messages, add_generation_prompt=gen) == expected


def test_strftime_now() -> None:
    template = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}", None, None)
    before = datetime.now().strftime("%Y-%m-%d")
    rendered = template.render([{"role": "user", "content": "x"}])
    assert rendered in {before, datetime.now().strftime("%Y-%m-%d")}


# -- errors ---------------------------------------------------------------------------------------


def test_raise_exception_becomes_a_value_error() -> None:
    template = ChatTemplate(
        "{% if messages[0].role == 'assistant' %}"
        "{{ raise_exception('Conversations must start with a user') }}{% endif %}ok",
        None,
        None,
    )
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError) as info:
        template.render([{"role": "assistant", "content": "x"}])
    assert str(info.value) == "Conversations must start with a user"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "messages must not be empty"),
        ("hello", "messages must be a list"),
        ([{"role": "developer", "content": "x"}], r"messages\[0\] has unknown role 'developer'"),
        ([{"content": "x"}], r"messages\[0\] has unknown role None"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": 3}],
            r"messages\[1\] \(user\) content must be",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "content must be a string, got list",
        ),
        ([{"role": "user"}], r"messages\[0\] \(user\) has no content"),
        ([{"role": "assistant", "content": None}], "has no content"),
        (["user: hi"], r"messages\[0\] must be a mapping"),
        ([{"role": "user", "content": "x", "meta": object()}], "holds a object"),
    ],
)
def test_bad_messages_raise_value_error(qwen: ChatTemplate, messages: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        qwen.render(messages)


def test_bad_tools_raise_value_error(qwen: ChatTemplate) -> None:
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ValueError, match="tools must be a list"):
        qwen.render(messages, tools="get_weather")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tools\[0\] must be a mapping"):
        qwen.render(messages, tools=["get_weather"])  # type: ignore[list-item]


def test_template_is_compiled_when_made() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m.content }}", None, None)
    with pytest.raises(ValueError, match="non-empty string"):
        ChatTemplate("", None, None)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ strftime_now.__globals__['os'] }}",
        "{{ messages.__class__.__base__ }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ (messages | first).__class__ }}",
        "{{ messages.append({'role': 'system'}) }}",
        "{{ messages[0].update({'role': 'system'}) }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ ''.format.__self__ }}",
        "{{ '{0.__class__}'.format('') }}",
        "{{ self._TemplateReference__context }}",
    ],
)
def test_sandbox_keeps_python_internals_out_of_reach(template: str) -> None:
    chat = ChatTemplate(template, None, None)
    messages = [{"role": "user", "content": "x"}]
    try:
        rendered = chat.render(messages)
    except ChatTemplateError as exc:
        assert isinstance(exc.__cause__, SecurityError) or "undefined" in str(exc)
    else:
        for leak in ("class", "module", "function", "built-in", "globals", "uid="):
            assert leak not in rendered, rendered
    assert messages == [{"role": "user", "content": "x"}]


# -- the fixture is the real template ------------------------------------------------------------


@pytest.mark.slow
def test_fixture_is_the_real_qwen_template() -> None:
    default = Path.home() / ".cache/edge-qwen-peers/hf-qwen2.5-coder-0.5b-instruct"
    folder = Path(os.environ.get("EDGE_QWEN_HF_DIR", default))
    jinja_file, config_file = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    if jinja_file.is_file():
        real = jinja_file.read_text("utf-8")
    elif config_file.is_file() and "chat_template" in (config := json.loads(config_file.read_text("utf-8"))):
        real = config["chat_template"]
    else:
        pytest.skip(f"no Qwen2.5 chat template in {folder} (set EDGE_QWEN_HF_DIR to a Hugging Face folder)")
    assert QWEN_CONFIG["chat_template"] == real
