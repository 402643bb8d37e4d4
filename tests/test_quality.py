"""offload eval-quality: perplexity, KL and top-1 agreement of a model against a reference."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import CORPUS, reference, transformers

from offload.cli import main
from offload.demo import demo_model_path
from offload.errors import OffloadError
from offload.quality import compare

# Text the demo model never saw: Henry V is not part of Tiny Shakespeare.
VERSE = """KING HENRY V:
Once more unto the breach, dear friends, once more;
Or close the wall up with our English dead.
In peace there's nothing so becomes a man
As modest stillness and humility:
But when the blast of war blows in our ears,
Then imitate the action of the tiger;
Stiffen the sinews, summon up the blood,
Disguise fair nature with hard-favour'd rage;
Then lend the eye a terrible aspect.
"""


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(CORPUS[:6]), encoding="utf-8")
    return path


def test_a_model_against_itself_loses_nothing(model_dir, text_file):
    path = model_dir("mixtral")
    report = compare(path, path, text_file, window=32, device="cpu")
    assert report.windows > 1 and report.tokens > 40
    assert report.kl_mean == 0 and report.kl_max == 0
    assert report.top1_agreement == 1.0
    assert report.a.perplexity == report.b.perplexity and report.ratio == 1.0


def test_perplexity_matches_transformers(model_dir, text_file):
    path, window = model_dir("mixtral"), 32
    report = compare(path, path, text_file, window=window, device="cpu")
    # Independently: transformers' tokenizer and model, windows overlapping by one token.
    ids = transformers.AutoTokenizer.from_pretrained(path)(text_file.read_text(encoding="utf-8")).input_ids
    ref, nll = reference(path), 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window - 1):
            x = torch.tensor([ids[start:start + window]])
            nll += F.cross_entropy(ref(input_ids=x).logits[0, :-1], x[0, 1:], reduction="sum").item()
    assert report.tokens == len(ids) - 1
    assert report.a.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_max_tokens_caps_the_positions_scored(model_dir, text_file):
    path = model_dir("mixtral")
    report = compare(path, path, text_file, window=16, max_tokens=20, device="cpu")
    assert report.tokens == 20 and report.windows == 2  # 15 + 5 targets


def test_int8_experts_of_the_demo_model_differ_a_little(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path / "cache"))  # the quantized copy goes here
    text = tmp_path / "verse.txt"
    text.write_text(VERSE, encoding="utf-8")
    demo = demo_model_path()
    report = compare(demo, demo, text, experts_b="int8", device="cpu")
    assert (report.a.experts, report.b.experts) == ("fp32", "int8")
    assert report.b.expert_bytes < report.a.expert_bytes / 3
    assert 0 < report.kl_mean < 0.01 and report.kl_max < 1
    assert report.top1_agreement > 0.95
    assert report.ratio == pytest.approx(1, abs=0.02)


def test_different_vocabularies_are_refused(model_dir, tmp_path, text_file):
    a = model_dir("mixtral")
    with pytest.raises(OffloadError, match="different vocabularies"):
        compare(a, model_dir("mixtral", vocab_size=384), text_file, device="cpu")
    # Same size, but two token ids swapped: the same id would mean different text.
    b = tmp_path / "swapped"
    shutil.copytree(a, b)
    tok = json.loads((b / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    x, y = list(vocab)[100:102]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    (b / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    with pytest.raises(OffloadError, match="different tokenizers"):
        compare(a, b, text_file, device="cpu")


@pytest.mark.parametrize("window", [1, 129])
def test_window_outside_the_context_is_refused(model_dir, text_file, window):
    with pytest.raises(OffloadError, match="--window"):
        compare(model_dir("mixtral"), model_dir("mixtral"), text_file, window=window, device="cpu")


def test_cli_prints_the_table(model_dir, text_file):
    path = str(model_dir("mixtral"))
    result = CliRunner().invoke(main, ["eval-quality", path, path, "--text", str(text_file), "--window", "32",
                                       "--max-tokens", "0", "--device", "cpu", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "top-1 agreement: 100.00%" in result.output
    assert "mean 0 nats, max 0 nats" in result.output


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"caf\xe9 au lait", "not UTF-8"),
    (b"", "at least 2"),
])
def test_cli_bad_text_is_one_error_line(model_dir, tmp_path, content, message):
    path, text = str(model_dir("mixtral")), tmp_path / "text.txt"
    if content is not None:
        text.write_bytes(content)
    result = CliRunner().invoke(main, ["eval-quality", path, path, "--text", str(text), "--device", "cpu"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert "Traceback" not in result.output


def test_too_little_ram_for_the_reference_says_how_many_tokens_fit(model_dir, text_file, monkeypatch):
    class Memory:
        available = 100 * 320 * 4 * 2  # room for 100 positions' float32 log-probabilities, at half of it

    monkeypatch.setattr("offload.quality.psutil.virtual_memory", lambda: Memory)
    path = model_dir("mixtral")
    with pytest.raises(OffloadError, match=r"--max-tokens\) to 100 or less"):
        compare(path, path, text_file, window=32, device="cpu")


def test_help_explains_every_option():
    result = CliRunner().invoke(main, ["eval-quality", "--help"])
    assert result.exit_code == 0
    options = [line for line in result.output.splitlines() if line.strip().startswith("--")]
    assert len(options) == 9 and all(len(line.split("  ", 1)) == 2 for line in options)
