"""`edge-qwen serve` through the official openai client, against a real server process on loopback."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import openai
import pytest

import edge_qwen
from edge_qwen.apps.server_openai import DEFAULT_SAMPLING
from tests.server_fixtures import LONG, SEEDED, SERVED, alone, client, get, model, post, server, tiny_package
from tests.server_process import ServerProcess, serve

__all__ = ["model", "server", "tiny_package"]  # fixtures


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
    before = len(server.request_lines("/v1/chat/completions"))
    first = [{"role": "user", "content": "def f(x):"}]
    one = api.chat.completions.create(model="tiny", messages=first, **SEEDED)  # type: ignore[arg-type]
    answer = one.choices[0].message.content or ""
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "The capital"}]
    two = api.chat.completions.create(model="tiny", messages=second, **SEEDED)  # type: ignore[arg-type]
    assert two.choices[0].message.content == alone(model, second, **SERVED)
    assert one.usage is not None and two.usage is not None and two.usage.prompt_tokens_details is not None
    assert one.usage.prompt_tokens <= two.usage.prompt_tokens_details.cached_tokens < two.usage.prompt_tokens
    lines = server.wait_for_log("/v1/chat/completions", before + 2)[before:]
    (line,) = [line for line in lines if f" prompt={two.usage.prompt_tokens} " in line]
    assert f"cached={two.usage.prompt_tokens_details.cached_tokens} " in line


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
    with serve(tiny_package, "--queue", "0") as busy:
        running = client(busy).completions.create(
            model="tiny", prompt="The capital", max_tokens=LONG, temperature=0, stream=True
        )
        next(iter(running))  # its generation has begun: it holds the model for hundreds of tokens more
        with pytest.raises(openai.RateLimitError) as raised:
            client(busy).completions.create(model="tiny", prompt="of", max_tokens=4)
        assert raised.value.status_code == 429 and "busy" in raised.value.message
        running.close()  # the running one leaves; the next request is served once the server sees it
        patient = openai.OpenAI(base_url=f"{busy.url}/v1", api_key="none", max_retries=8)  # backs off on 429
        reply = patient.completions.create(model="tiny", prompt="of", max_tokens=4, temperature=0)
        assert reply.usage is not None and reply.usage.completion_tokens == 4


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
