"""Text a user hands the runtime: hostile chat templates, bytes that are not UTF-8, control
characters, and a 1 MB prompt. Each is either handled or one clear error, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edge_qwen
from edge_qwen.chat_template import ChatTemplate, ChatTemplateError
from edge_qwen.errors import ContextFullError
from edge_qwen.package import read_manifest
from tests.conftest import export_tiny
from tests.test_cli import assert_one_line_error, run
from tests.tiny import make_tiny_checkpoint

REAL_PACKAGE = Path.home() / ".cache/edge-qwen-bench/compare/qwen2.5-coder-0.5b-instruct-int4"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("text")
    return export_tiny(make_tiny_checkpoint(root / "hf", tied=True, seed=4), root / "pkg")


@pytest.fixture(scope="module")
def model(package: Path) -> edge_qwen.Model:
    return edge_qwen.load(package)


# -- templates -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ("{% include '/etc/passwd' %}", "TemplateNotFound"),
        ("{% import '/etc/hostname' as h %}{{ h }}", "TemplateNotFound"),
        ("{% extends '/etc/passwd' %}", "TemplateNotFound"),
        ("{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}", "undefined|unsafe"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "undefined|unsafe"),
        (
            "{{ joiner.__init__.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
            "undefined|unsafe",
        ),
        ("{{ 'a' * 10**10 }}", "repeats a value"),
        ("{{ [0] * 10**9 }}", "repeats a value"),
        ("{{ 7 ** 1000000 }}", "to the power"),
        ("{% for i in range(10**9) %}{% endfor %}", "Range too big"),
    ],
)
def test_hostile_templates_fail_safely(template: str, needle: str, tmp_path: Path) -> None:
    marker = tmp_path / "the-template-ran"
    chat = ChatTemplate(template.replace("{marker}", str(marker)), None, None)
    with pytest.raises(ChatTemplateError, match=needle):
        chat.render([{"role": "user", "content": "x"}])
    assert not marker.exists()


def test_a_package_with_a_hostile_template_is_one_line_in_the_cli(package: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(package, tmp_path / "pkg"))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% include '/etc/passwd' %}"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    manifest = json.loads((copy / "edge_qwen.json").read_text())  # as if the manifest were redone too
    manifest["files"]["tokenizer_config.json"]["size"] = (copy / "tokenizer_config.json").stat().st_size
    (copy / "edge_qwen.json").write_text(json.dumps(manifest))
    read_manifest(copy)
    result = run("generate", str(copy), "hello", "--max-tokens", "2")
    assert_one_line_error(result, "chat template failed", "TemplateNotFound")
    assert result.stdout == "" and "root:" not in result.stderr


# -- bytes and characters --------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "raw"])
def test_a_prompt_that_is_not_utf8_is_a_value_error_naming_the_byte(
    model: edge_qwen.Model, chat: bool
) -> None:
    bad = b"caf\xc3".decode("utf-8", "surrogateescape")  # how Python hands over such an argument
    with pytest.raises(ValueError, match="not valid UTF-8: byte 0xc3 after .*caf"):
        model.generate(bad, chat=chat, max_tokens=2)
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800"):
        model.generate("a\ud800b", chat=chat, max_tokens=2)
    session = model.chat(max_tokens=2)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        session.send(bad)
    assert session.messages == []  # and the session goes on
    session.send("café")


def test_a_prompt_argument_that_is_not_utf8_is_one_line(package: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "edge_qwen.apps.cli",
        "generate",
        str(package),
        b"caf\xc3".decode("utf-8", "surrogateescape"),
    ]
    result = subprocess.run(cmd, capture_output=True, timeout=300)
    assert result.returncode == 1 and result.stdout == b""
    lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
    assert len(lines) == 1 and "not valid UTF-8: byte 0xc3" in lines[0] and "Traceback" not in lines[0]


CONTROL = "nul\x00 bell\x07 esc\x1b[31m cr\r del\x7f sep\u2028 bom\ufeff zw\u200b rtl\u202e end"


def test_control_characters_are_text_like_any_other(model: edge_qwen.Model) -> None:
    ids = model.encode_prompt(CONTROL, chat=False)
    assert model.tokenizer.decode(ids, skip_special_tokens=False) == CONTROL
    assert isinstance(model.generate(CONTROL, max_tokens=4), str)
    assert isinstance(model.chat(max_tokens=4).send(CONTROL), str)


def test_a_1mb_prompt_is_a_clean_context_error(model: edge_qwen.Model) -> None:
    for prompt in ("word " * (1 << 18), "巴黎" * (1 << 18)):  # 1 MiB of words, 1.5 MiB of CJK
        with pytest.raises(ContextFullError, match="longer than the context of 1024 tokens"):
            model.generate(prompt, max_tokens=1)
    with pytest.raises(ContextFullError):
        model.chat(max_tokens=1).send("x" * (1 << 20))


@pytest.mark.slow
def test_a_1mb_prompt_on_the_real_tokenizer_is_a_clean_context_error() -> None:
    if not REAL_PACKAGE.is_dir():
        pytest.skip(f"the real package is not at {REAL_PACKAGE}")
    model = edge_qwen.load(REAL_PACKAGE, prepack=False)
    for prompt in ("a" * (1 << 20), "def f(x):\n    return x\n" * (1 << 15), "巴黎" * (1 << 18)):
        with pytest.raises(ContextFullError, match="longer than the context of 4096 tokens"):
            model.generate(prompt, max_tokens=1)
