"""The held-out evaluation suite and the calibration mix (edge_qwen.quant.suite): pinned, and disjoint.

The texts come from Debian's package mirror (cached under EDGE_QWEN_TEXTS, ~46 MB, fetched once).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edge_qwen.quant import suite
from edge_qwen.quant.texts import builtin_text
from tests.conftest import TinyModel, export_tiny

WINDOW = 64  # tokens


def words(text: str) -> list[str]:
    """A tokenizer-free token stream: words, each CJK character, and each other symbol."""
    return re.findall(
        r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]|[^\W\u3040-\u30ff\u3400-\u9fff]+|[^\w\s]", text
    )


def windows(text: str) -> set[int]:
    tokens = words(text)
    return {hash(tuple(tokens[i : i + WINDOW])) for i in range(max(0, len(tokens) - WINDOW + 1))}


@pytest.fixture(scope="module")
def calibration_windows() -> set[int]:
    found: set[int] = set()
    for parts in suite.calibration_parts().values():
        for _, text in parts:
            found |= windows(text)
    found |= windows(builtin_text("calibration").text)
    return found


@pytest.mark.parametrize("domain", suite.DOMAINS)
def test_no_evaluation_window_is_in_the_calibration_texts(domain: str, calibration_windows: set[int]) -> None:
    text = suite.domain_text(domain)
    shared = windows(text.text) & calibration_windows
    assert not shared, f"{domain}: {len(shared)} windows of {WINDOW} tokens are also calibration text"
    assert len(words(text.text)) > 16 * 512 // 2  # enough text for 16 chunks of 512 model tokens


def test_the_check_sees_an_overlap() -> None:
    """The window check itself: a calibration text that quotes 64 tokens of an evaluation text."""
    evaluation = suite.domain_text("en-legal").text
    quoted = " ".join(words(evaluation)[1000 : 1000 + WINDOW])
    assert windows(evaluation) & windows("Some other text. " + quoted + " And more.")


def test_a_package_that_is_not_the_pinned_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = suite.fetch(suite.FAQ_ZH)
    monkeypatch.setenv("EDGE_QWEN_TEXTS", str(tmp_path))
    copy = tmp_path / suite.FAQ_ZH.name
    copy.write_bytes(real.read_bytes()[:-1] + b"\0")  # the same size, one byte changed
    with pytest.raises(ValueError, match="not the pinned"):
        suite.fetch(suite.FAQ_ZH)


def test_faq_pages_become_chat_turns() -> None:
    html = (
        b'<html><head><title>t</title></head><body><h2 class="title">1.1. What is this FAQ?</h2>'
        b"<p>A list of\n questions.</p><p>With answers.</p><h2>1.2. Credits</h2><p>People.</p>"
        b"<h3>2.3. Why not?</h3><p>Because.</p></body></html>"
    )
    turns = suite.faq_turns(html)
    assert turns == [("What is this FAQ?", "A list of questions.\n\nWith answers."), ("Why not?", "Because.")]
    chat = suite.chat_transcript(turns)
    assert chat.count("<|im_start|>user\n") == 2 and chat.count("<|im_start|>system\n") == 1
    assert "<|im_start|>assistant\nBecause.<|im_end|>\n" in chat


def test_eval_reports_each_domain_and_the_macro_average(tiny_fp32: Path) -> None:
    from click.testing import CliRunner

    from edge_qwen.apps.cli import cli

    args = ["eval", str(tiny_fp32), "--reference", str(tiny_fp32), "--ctx", "64", "--chunks", "2", "--json"]
    result = CliRunner().invoke(cli, [*args, "--text", "suite:en-legal,zh"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report["domains"]) == ["en-legal", "zh"]
    assert all(r["tokens_scored"] == 2 * 31 and r["mean_kld"] == 0.0 for r in report["domains"].values())
    assert report["macro"]["top1_agreement"] == 1.0
    bad = CliRunner().invoke(cli, [*args, "--text", "suite:klingon"])
    assert bad.exit_code == 1 and "unknown domain 'klingon'" in bad.stderr


def test_export_calibrated_on_the_mix_takes_every_domain(tiny: TinyModel, tmp_path: Path) -> None:
    pkg = export_tiny(tiny.hf_dir, tmp_path / "mix", precision="int4", algo="imatrix", calibration="suite")
    record = json.loads((pkg / "edge_qwen.json").read_text())["quantization"]["calibration"]
    assert record["name"] == "suite-calibration"
    assert [s.split(":")[0] for s in record["sources"]] == list(suite.DOMAINS)


def test_calibration_runs_are_spread_over_the_whole_text() -> None:
    text = "".join(f"<{i:04d}>" for i in range(1000))  # 6,000 characters, each position readable
    runs = suite.spread_runs(text, 600, 4, len)  # characters stand in for tokens
    assert [len(r) for r in runs] == [150] * 4
    assert [text.index(r) for r in runs] == [0, 1500, 3000, 4500]


def test_the_calibration_mix_gives_each_domain_its_share() -> None:
    mix = suite.calibration_text(len, total_tokens=11_000)
    whole = sum(suite.CALIBRATION_SHARES.values())
    assert suite.CALIBRATION_SHARES["code"] > max(
        v for k, v in suite.CALIBRATION_SHARES.items() if k != "code"
    )
    budgets = [11_000 * suite.CALIBRATION_SHARES[d] // whole for d in suite.DOMAINS]
    # Domains are joined by a blank line, and so are the 4 runs within each.
    assert len(mix.text) == sum(b // 4 * 4 for b in budgets) + 2 * (4 * len(budgets) - 1)
    assert [s.split(":")[0] for s in mix.sources] == list(suite.DOMAINS)


def test_auto_calibration_falls_back_to_the_builtin_text_when_the_mix_cannot_be_had(
    tiny: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from edge_qwen.export.options import default_options
    from edge_qwen.export.readers import read_checkpoint
    from edge_qwen.export.writer import choose_calibration_text

    assert default_options("int4").calibration == "auto"
    ckpt = read_checkpoint(tiny.hf_dir)
    assert choose_calibration_text(ckpt, "auto").name == "suite-calibration"  # the texts are cached
    suite._calibration_parts.cache_clear()  # read again, from where the texts are now:
    monkeypatch.setenv("EDGE_QWEN_TEXTS", str(tmp_path / "empty"))  # nothing cached, and no mirror:
    monkeypatch.setattr(suite, "MIRROR", "http://127.0.0.1:9/debian")  # a closed port
    with caplog.at_level("WARNING"):
        assert choose_calibration_text(ckpt, "auto").name == "calibration"
    assert "instead of the multi-domain mix" in caplog.text and "connect to the network" in caplog.text
    with pytest.raises(OSError, match="cannot download"):
        choose_calibration_text(ckpt, "suite")  # asked for by name: no fallback
