"""Fixtures and helpers shared by the server's tests: a tiny package, a server over it, the same
package loaded in-process (what a request should answer), and small HTTP helpers."""

from __future__ import annotations

import http.client
import json
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
