"""`edge-qwen chat [MODEL]`: an interactive chat over a ChatSession, on a terminal or from a pipe.

On a terminal: a `>>> ` prompt with line editing and history (readline, saved in
$EDGE_QWEN_HOME/chat_history), the answer streamed as it comes, a stats line on stderr after it,
Ctrl-C to stop an answer (the conversation keeps what was said) or to clear the line, Ctrl-D to leave.
With stdin piped, each line is a turn (slash commands too), each answer goes to stdout followed by a
newline, there is no prompt, and the first error ends the run with a one-line message, as in a script.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import click

if TYPE_CHECKING:
    from edge_qwen.generation import StreamPiece
    from edge_qwen.session import ChatSession, TurnStats

log = logging.getLogger(__name__)

PROMPT = ">>> "
HISTORY_FILE = "chat_history"  # under EDGE_QWEN_HOME
HISTORY_LENGTH = 1000
OVERFLOW = "truncate-oldest"  # a long chat drops its oldest turns rather than stopping

HELP = """\
/help          this list
/reset         forget the conversation (the system prompt stays)
/system TEXT   set the system prompt and start a new conversation (/system alone shows it)
/stats         tokens, speed and cache use of this conversation
/save FILE     write the conversation to FILE as JSON (a list of messages)
/exit          leave (Ctrl-D too)
Ctrl-C stops an answer and keeps what was said; a line starting with // sends it with one /."""


@dataclass(frozen=True)
class Terminal:
    """Where the chat reads and writes, and what it may decorate."""

    stdin: TextIO
    out: TextIO  # answers and the output of commands
    err: TextIO  # notes: stats lines, [interrupted], confirmations, errors
    interactive: bool  # stdin is a terminal: a prompt, line editing, Ctrl-C clears the line
    color: bool  # ANSI dim on notes: err is a terminal, NO_COLOR is unset and TERM is not dumb

    @classmethod
    def detect(cls) -> Terminal:
        plain = bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"
        return cls(sys.stdin, sys.stdout, sys.stderr, sys.stdin.isatty(), sys.stderr.isatty() and not plain)

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def note(self, text: str) -> None:
        self.err.write(f"\x1b[2m{text}\x1b[0m\n" if self.color else f"{text}\n")
        self.err.flush()


class ChatError(ValueError):
    """A bad command line in the chat: a note at a terminal, the end of a piped script."""


class ChatRepl:
    """The loop: read a line, run a slash command or a turn, print."""

    def __init__(self, session: ChatSession, term: Terminal, quiet: bool = False) -> None:
        self.session = session
        self.term = term
        self.quiet = quiet
        self.commands: dict[str, Callable[[str], bool]] = {
            "/help": self.show_help,
            "/reset": self.reset,
            "/system": self.set_system,
            "/stats": self.show_stats,
            "/save": self.save,
            "/exit": self.leave,
        }

    def run(self) -> None:
        """Until /exit or the end of the input (Ctrl-D)."""
        if self.term.interactive and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            # Started with Ctrl-C ignored, as the children of a shell's background job are: on a
            # terminal it must still drop the line at the prompt, as it stops an answer.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        while (line := self.read_line()) is not None:
            try:
                if not self.handle(line):
                    return
            except KeyboardInterrupt:  # outside an answer (a slash command, a stats line): back to the prompt
                if not self.term.interactive:
                    raise
                self.term.note("\n[interrupted]")

    def read_line(self) -> str | None:
        """The next line, or None at the end of the input; Ctrl-C at the prompt gives a fresh one."""
        if not self.term.interactive:
            line = self.term.stdin.readline()
            return line.rstrip("\r\n") if line else None
        while True:
            try:
                return input(PROMPT)  # readline's line editing and history, once imported
            except KeyboardInterrupt:  # as in Python's REPL: drop the line, prompt again
                self.term.write("\n")
            except EOFError:
                self.term.write("\n")
                return None

    def handle(self, line: str) -> bool:
        """Run one line; False when the chat should end. Errors end a piped script, not a terminal chat."""
        from edge_qwen.errors import EdgeQwenError

        text = line.strip()
        try:
            if text.startswith("/") and not text.startswith("//"):
                return self.command(text)
            if text:
                self.answer(text.removeprefix("/"))
        except (EdgeQwenError, ValueError) as e:
            if not self.term.interactive:
                raise
            self.term.note(f"error: {e}")
        return True

    def command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        run = self.commands.get(name.lower())
        if run is None:
            raise ChatError(f"unknown command {name}: the commands are {', '.join(self.commands)}")
        return run(arg.strip())

    def answer(self, text: str) -> None:
        """Stream the reply to `text`. At a terminal, Ctrl-C stops it; the session keeps the reply so far."""
        turns = len(self.session.stats)
        with _deferred_interrupt(self.term.interactive) as pressed:
            # A turn that cannot fit fails here, before any output. The stream is a generator: its
            # close() is how the session learns the reply was cut short.
            stream = cast("Generator[StreamPiece, None, None]", self.session.stream(text))
            interrupted = self.show(stream, pressed)
        self.term.write("\n")
        if interrupted:
            self.term.note("[interrupted]")
        if not self.quiet and len(self.session.stats) > turns:
            self.term.note(turn_line(self.session.stats[-1]))

    def show(self, stream: Generator[StreamPiece, None, None], pressed: Callable[[], bool]) -> bool:
        """Write the pieces as they come; True when Ctrl-C stopped them."""
        try:
            for piece in stream:
                self.term.write(piece.text)
                if pressed() and piece.finish_reason is None:
                    return True
            return False
        except KeyboardInterrupt:  # a second Ctrl-C, during a long prefill that yields no token
            if not self.term.interactive:
                raise
            return True
        finally:
            stream.close()  # the session records the partial reply, finish_reason "interrupted"

    # -- slash commands: each takes the text after the command, returns False to end the chat ----

    def show_help(self, arg: str) -> bool:
        self.term.write(HELP + "\n")
        return True

    def reset(self, arg: str) -> bool:
        self.session.reset()
        self.term.note("[conversation cleared]")
        return True

    def set_system(self, arg: str) -> bool:
        if not arg:
            current = next((m["content"] for m in self.session.messages if m["role"] == "system"), None)
            self.term.write(f"{current if current is not None else '(no system prompt)'}\n")
            return True
        from edge_qwen.session import ChatSession

        old = self.session
        old.cache.reset()  # the new session takes over the cache: no second allocation
        self.session = ChatSession(old.model, arg, old.config, old.cache, old.overflow, old.tools)
        self.term.note("[system prompt set; conversation cleared]")
        return True

    def show_stats(self, arg: str) -> bool:
        self.term.write("\n".join(session_lines(self.session)) + "\n")
        return True

    def save(self, arg: str) -> bool:
        if not arg:
            raise ChatError("/save needs a file name: /save FILE")
        path = Path(arg).expanduser()
        try:
            save_messages(path, self.session.messages)
        except OSError as e:
            raise ChatError(f"cannot save to {path}: {e.strerror or e}") from None
        self.term.note(f"[saved {_count(len(self.session.messages), 'message')} to {path}]")
        return True

    def leave(self, arg: str) -> bool:
        return False


def turn_line(stats: TurnStats) -> str:
    """One answer's cost: `[12 tokens, 21.3 tok/s, prefill 14 tok in 0.12 s, 52 cached]`."""
    parts = [
        _count(stats.generated_tokens, "token"),
        f"{_decode_speed(stats.generated_tokens, stats.decode_seconds):.1f} tok/s",
        f"prefill {stats.prefilled_tokens} tok in {stats.prefill_seconds:.2f} s",
    ]
    if stats.reused_tokens:
        parts.append(f"{stats.reused_tokens} cached")
    if stats.dropped_messages:
        parts.append(f"dropped the {stats.dropped_messages} oldest messages to fit the context")
    if stats.finish_reason == "length":
        parts.append("cut at --max-tokens")
    return f"[{', '.join(parts)}]"


def session_lines(session: ChatSession) -> list[str]:
    """The conversation's totals, for /stats."""
    turns = session.stats
    generated = sum(t.generated_tokens for t in turns)
    steps = sum(max(t.generated_tokens - 1, 0) for t in turns)  # the first token of a turn is prefill's
    decode = sum(t.decode_seconds for t in turns)
    prompt = sum(t.prompt_tokens for t in turns)
    reused = sum(t.reused_tokens for t in turns)
    cache = session.cache
    return [
        f"turns      {len(turns)}, {_count(len(session.messages), 'message')} in the conversation",
        f"generated  {generated} tokens, {steps / decode if decode > 0 else 0.0:.1f} tok/s on average",
        f"prefill    {prompt - reused} of {prompt} prompt tokens run, {reused} reused from the cache"
        f" ({100 * reused / prompt if prompt else 0.0:.0f}%)",
        f"cache      {cache.length} of {cache.max_len} tokens",
    ]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _decode_speed(generated_tokens: int, decode_seconds: float) -> float:
    return (generated_tokens - 1) / decode_seconds if decode_seconds > 0 else 0.0


def save_messages(path: Path, messages: list[dict[str, Any]]) -> None:
    """Write the messages as JSON atomically: a temporary file beside `path`, renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(messages, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _deferred_interrupt(active: bool) -> Iterator[Callable[[], bool]]:
    """Within, when active: the first Ctrl-C only sets a flag, which the caller reads between tokens.

    Stopping between tokens (closing the stream) leaves the cache and the model's lock in a known
    state, which an exception raised anywhere inside the runtime would not. A second Ctrl-C raises
    KeyboardInterrupt, for a long prefill that yields no token to stop at. Inactive (a piped script),
    Ctrl-C interrupts as usual and ends the run.
    """
    if not active:
        yield lambda: False
        return
    pressed = False

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal pressed
        if pressed:
            raise KeyboardInterrupt
        pressed = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: pressed
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _line_history(path: Path) -> Iterator[None]:
    """Line editing and a history kept in `path`, through the standard library's readline."""
    try:
        import readline
    except ImportError:  # Python builds without readline: input() still works, without history
        yield
        return
    with contextlib.suppress(OSError):  # none yet, or unreadable: start empty
        readline.read_history_file(path)
    readline.set_history_length(HISTORY_LENGTH)
    try:
        yield
    finally:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError as e:
            log.warning("could not save the chat history to %s: %s", path, e)


@click.command()
@click.argument("model", required=False)
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True, help="0 means greedy.")
@click.option("--top-k", type=int, default=20, show_default=True, help="0 disables.")
@click.option("--top-p", type=float, default=0.8, show_default=True, help="1 disables.")
@click.option("--min-p", type=float, default=0.0, show_default=True, help="0 disables.")
@click.option("--repetition-penalty", type=float, default=1.05, show_default=True, help="1 disables.")
@click.option("--presence-penalty", type=float, default=0.0, show_default=True)
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed each answer's sampling [default: random].")
@click.option("--provider", default="cpu", show_default=True, help="cpu, xnnpack, qnn, nnapi, coreml.")
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: physical cores]."
)
@click.option(
    "--max-context",
    type=click.IntRange(min=1),
    default=None,
    help="KV cache size in tokens [default: the package's, within half the free memory].",
)
@click.option("-q", "--quiet", is_flag=True, help="No stats line after each answer.")
def chat(
    model: str | None,
    system: str | None,
    provider: str,
    threads: int | None,
    max_context: int | None,
    quiet: bool,
    **options: Any,
) -> None:
    """Chat with MODEL: a package folder or a catalog name [default: the catalog's default model].

    A catalog model is downloaded and exported on first use, then cached. The sampling defaults are
    Qwen2.5 Instruct's own (temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05). Type /help
    in the chat for its commands. With stdin piped, each line is a turn and the answers go to stdout.
    """
    import edge_qwen
    from edge_qwen import prepacked
    from edge_qwen.hub import catalog
    from edge_qwen.providers import ort_provider_name

    config = edge_qwen.GenerationConfig(**options)  # bad values fail before any download
    ort_provider_name(provider)
    path = catalog.resolve(model if model is not None else catalog.default_name())
    term = Terminal.detect()
    if term.interactive and not prepacked.is_written(path):
        term.note("packing the weights for this CPU (once per model and machine)")
    loaded = edge_qwen.load(path, provider=provider, threads=threads)
    if loaded.chat_template is None:
        raise edge_qwen.PackageError(f"{path} has no chat template: chat with an Instruct model")
    session = loaded.chat(system, config, max_context=max_context, overflow=OVERFLOW)
    if not term.interactive:
        ChatRepl(session, term, quiet).run()
        return
    threads_used = loaded.session.get_session_options().intra_op_num_threads
    term.note(
        f"{path.name} ({loaded.manifest.precision}, {', '.join(loaded.providers)}, {threads_used} threads, "
        f"context {session.cache.max_len}): /help for commands, Ctrl-D to leave"
    )
    with _line_history(catalog.home() / HISTORY_FILE):
        ChatRepl(session, term, quiet).run()
