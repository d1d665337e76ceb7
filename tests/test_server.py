"""`edge-qwen serve` through the official openai client, against a real server process on loopback."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import edge_qwen
from edge_qwen.apps.server_openai import DEFAULT_SAMPLING
from tests.conftest import export_tiny
from tests.server_process import ServerProcess, serve
from tests.tiny import make_tiny_checkpoint

SEEDED = {"temperature": 1.0, "seed": 11, "max_tokens": 12}
SERVED = {**DEFAULT_SAMPLING, **SEEDED}  # omitted fields take the server's defaults
# Plain sampling: under top-k, top-p and the repetition penalty the tiny model pads JSON with spaces.
PLAIN = {**SEEDED, "max_tokens": 800, "top_p": 1.0, "extra_body": {"top_k": 0, "repetition_penalty": 1.0}}
LONG = 900  # tokens: the tiny model's greedy answers never stop early, so this keeps a request busy


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("served")
    return export_tiny(make_tiny_checkpoint(out / "hf", tied=True, seed=1), out / "tiny-fp32")


@pytest.fixture(scope="module")
def server(tiny_package: Path) -> Iterator[ServerProcess]:
    with serve(tiny_package, "--max-body", "4096", "--max-tokens", "1000") as running:
        yield running


@pytest.fixture(scope="module")
def model(tiny_package: Path) -> edge_qwen.Model:
    return edge_qwen.load(tiny_package)


def client(server: ServerProcess, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=options.pop("api_key", "none"), max_retries=0)


def alone(model: edge_qwen.Model, messages: list[dict[str, str]], **options: Any) -> str:
    """What the in-process API answers to the same conversation."""
    return "".join(p.text for p in model.chat().stream_messages(messages, **options))


def post(
    server: ServerProcess, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    status, data = response.status, json.loads(response.read())
    connection.close()
    return status, data


def get(server: ServerProcess, path: str) -> tuple[int, dict[str, Any]]:
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    status, data = response.status, json.loads(response.read())
    connection.close()
    return status, data


def test_chat_answers_as_the_library_does_streamed_and_not(
    server: ServerProcess, model: edge_qwen.Model
) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "The capital of France"},
    ]
    expected = alone(model, messages, **SERVED)
    api = client(server)
    reply = api.chat.completions.create(model="tiny", messages=messages, **SEEDED)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= SEEDED["max_tokens"]
    chunks = list(
        api.chat.completions.create(
            model="tiny",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            **SEEDED,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_resent_conversation_reuses_the_cache(server: ServerProcess, model: edge_qwen.Model) -> None:
    api = client(server)
    first = [{"role": "user", "content": "def f(x):"}]
    one = api.chat.completions.create(model="tiny", messages=first, **SEEDED)  # type: ignore[arg-type]
    answer = one.choices[0].message.content or ""
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "The capital"}]
    two = api.chat.completions.create(model="tiny", messages=second, **SEEDED)  # type: ignore[arg-type]
    assert two.choices[0].message.content == alone(model, second, **SERVED)
    assert one.usage is not None and two.usage is not None and two.usage.prompt_tokens_details is not None
    assert one.usage.prompt_tokens <= two.usage.prompt_tokens_details.cached_tokens < two.usage.prompt_tokens
    line = server.wait_for_log("/v1/chat/completions", 1)[-1]
    assert f"cached={two.usage.prompt_tokens_details.cached_tokens}" in line


def test_completions_continue_a_raw_prompt(server: ServerProcess, model: edge_qwen.Model) -> None:
    api = client(server)
    reply = api.completions.create(model="tiny", prompt="The capital of", **SEEDED)  # type: ignore[arg-type]
    assert reply.choices[0].text == model.generate("The capital of", chat=False, **SERVED)
    assert reply.object == "text_completion"


def test_models_and_health(server: ServerProcess, tiny_package: Path) -> None:
    assert [m.id for m in client(server).models.list()] == [tiny_package.name]
    status, health = get(server, "/health")
    assert status == 200 and health["status"] == "ok"
    assert get(server, "/v1/nothing")[0] == 404


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"extra_body": {"top_k": -1}}, "top_k"),
        ({"n": 2}, "n"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_bad_fields_are_400_naming_them(server: ServerProcess, options: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client(server).chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            **options,
        )
    assert raised.value.status_code == 400
    assert raised.value.param == param and param in raised.value.message


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b'{"model": "x"}', "application/json", 400, "messages"),
        (b"[1, 2]", "application/json", 400, "JSON object"),
        (b'{"messages": []}', "text/plain", 415, "Content-Type"),
        (b'{"messages": "' + b"x" * 5000 + b'"}', "application/json", 413, "over the limit"),
    ],
    ids=["malformed", "missing-field", "not-an-object", "content-type", "too-large"],
)
def test_bad_bodies_get_a_clear_4xx_and_the_server_lives_on(
    server: ServerProcess, body: bytes, content_type: str, status: int, words: str
) -> None:
    got, error = post(server, "/v1/chat/completions", body, {"Content-Type": content_type})
    assert got == status and words in error["error"]["message"]
    reply = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], **SEEDED
    )  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_api_key_is_required_when_set(tiny_package: Path) -> None:
    with serve(tiny_package, "--api-key", "sesame") as keyed:
        for key in ("wrong", "sesame-and-more", "Sesame"):
            with pytest.raises(openai.AuthenticationError) as raised:
                client(keyed, api_key=key).models.list()
            assert raised.value.status_code == 401
        for path in ("/health", "/v1/models"):  # no Authorization header at all
            status, error = get(keyed, path)
            assert status == 401 and "Authorization: Bearer" in error["error"]["message"]
        assert [m.id for m in client(keyed, api_key="sesame").models.list()] == [tiny_package.name]


def test_a_full_queue_answers_429(tiny_package: Path) -> None:
    with serve(tiny_package, "--queue", "1") as busy:
        results: list[int] = []

        def ask() -> None:
            try:
                reply = client(busy).completions.create(
                    model="tiny", prompt="The capital", max_tokens=LONG, temperature=0
                )
                results.append(
                    200 if reply.usage is not None and reply.usage.completion_tokens == LONG else 0
                )
            except openai.RateLimitError as e:
                results.append(e.status_code)

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # At most one runs and one waits while the others arrive: those are refused, none is lost.
        assert sorted(set(results)) == [200, 429] and results.count(200) >= 2


def test_client_leaving_mid_stream_stops_the_generation(
    server: ServerProcess, model: edge_qwen.Model
) -> None:
    api = client(server)
    before = len(server.request_lines("/v1/completions"))
    stream = api.completions.create(
        model="tiny", prompt="The capital", max_tokens=LONG, temperature=0, stream=True
    )
    for n, _chunk in enumerate(stream):
        if n == 3:
            break
    stream.close()
    line = server.wait_for_log("/v1/completions", before + 1)[before]
    generated = int(line.split("generated=")[1].split()[0])
    assert "(client gone)" in line and generated < LONG
    messages = [{"role": "user", "content": "The capital of France"}]
    reply = api.chat.completions.create(model="tiny", messages=messages, **SEEDED)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == alone(model, messages, **SERVED)


def test_eight_clients_at_once_each_get_their_own_answer(
    server: ServerProcess, model: edge_qwen.Model
) -> None:
    prompts = [
        "The capital",
        "def f(x):",
        "巴黎是",
        "return x",
        "The capital of France",
        "Paris",
        "x * 2",
        "of",
    ]
    expected = [
        model.generate(p, chat=False, **{**DEFAULT_SAMPLING, "max_tokens": 40, "temperature": 0})
        for p in prompts
    ]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        reply = client(server).completions.create(
            model="tiny", prompt=prompts[i], max_tokens=40, temperature=0
        )
        answers[i] = reply.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answers.get(i) for i in range(len(prompts))] == expected


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_stream_parses_as_server_sent_events(server: ServerProcess, model: edge_qwen.Model) -> None:
    body = {"messages": [{"role": "user", "content": "The capital"}], "stream": True, **SEEDED}
    cmd = ["curl", "-sN", f"{server.url}/v1/chat/completions", "-H", "Content-Type: application/json"]
    out = subprocess.run(
        [*cmd, "-d", json.dumps(body)], capture_output=True, text=True, timeout=60, check=True
    )
    events = out.stdout.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"  # each event ends with a blank line
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == alone(model, body["messages"], **SERVED)  # type: ignore[arg-type]


CITY = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["city", "n"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}


def test_response_format_with_a_schema(server: ServerProcess, model: edge_qwen.Model) -> None:
    messages = [{"role": "user", "content": "A city and a digit, as JSON"}]
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    options = {**SEEDED, "max_tokens": 800}  # the tiny model writes much whitespace
    reply = client(server).chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        response_format=response_format,  # type: ignore[arg-type]
        **options,
    )
    content = reply.choices[0].message.content or ""
    assert reply.choices[0].finish_reason == "stop"
    value = json.loads(content)
    assert set(value) == {"city", "n"} and value["city"] in ("Paris", "Rome") and 0 <= value["n"] <= 9
    assert content == alone(
        model, messages, **{**DEFAULT_SAMPLING, **options}, response_format=response_format
    )


def test_an_unsupported_schema_is_a_400_naming_it(server: ServerProcess) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "if": {"required": ["a"]},
        "then": {},
    }
    with pytest.raises(openai.BadRequestError) as raised:
        client(server).chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert raised.value.status_code == 400 and "if" in raised.value.message


def test_a_tool_call_round_trips_through_a_tool_message(server: ServerProcess) -> None:
    api = client(server)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "The weather in Paris?"}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    call = api.chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice=forced,  # type: ignore[arg-type]
        **PLAIN,
    )
    choice = call.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(tool_call.function.arguments)["city"] in ("Paris", "Rome")  # type: ignore[union-attr]
    assert tool_call.id.startswith("call_")
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": tool_call.id, "content": '{"celsius": 21}'},
    ]
    answer = api.chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        **SEEDED,
    )
    assert answer.choices[0].finish_reason in ("stop", "length") and not answer.choices[0].message.tool_calls
    assert (
        call.usage is not None and answer.usage is not None and answer.usage.prompt_tokens_details is not None
    )
    assert answer.usage.prompt_tokens_details.cached_tokens >= call.usage.prompt_tokens


def test_a_streamed_tool_call_arrives_whole(server: ServerProcess) -> None:
    chunks = list(
        client(server).chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "The weather in Rome?"}],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="required",
            stream=True,
            **PLAIN,
        )
    )
    calls = [d for c in chunks if c.choices and (d := c.choices[0].delta).tool_calls]
    assert len(calls) == 1 and calls[0].tool_calls is not None
    assert calls[0].tool_calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].tool_calls[0].function.arguments or "")["city"] in ("Paris", "Rome")  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_binding_beyond_loopback_without_a_key_warns(tiny_package: Path) -> None:
    with serve(tiny_package, "--host", "0.0.0.0") as open_server:
        assert client(open_server).models.list().data[0].id == tiny_package.name
        assert sum("without --api-key" in line for line in open_server.lines) == 1
    with serve(tiny_package, "--host", "0.0.0.0", "--api-key", "k") as keyed:
        assert not any("without --api-key" in line for line in keyed.lines)


def test_a_missing_model_is_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edge_qwen.apps.cli import cli

    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "nothing-here"), "--port", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "nothing-here" in result.output and len(result.output.strip().splitlines()) == 1


def test_keep_alive_survives_a_refused_body(tiny_package: Path) -> None:
    with serve(tiny_package, "--api-key", "k") as keyed:
        host, port = keyed.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        refused = connection.getresponse()
        assert refused.status == 401 and "Authorization" in json.loads(refused.read())["error"]["message"]
        # The unread body is not taken for a request: the next one (http.client reconnects) is answered.
        headers = {"Content-Type": "application/json", "Authorization": "Bearer k"}
        connection.request("POST", "/v1/chat/completions", body, headers)
        answered = connection.getresponse()
        assert answered.status == 200 and json.loads(answered.read())["object"] == "chat.completion"
        connection.close()
