"""The shipped demo model: intact, loadable with no argument, equal to transformers
on held-out text, deterministic, Shakespearean, and its trace is real routing."""

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import offload
from offload.cli import main
from offload.demo import DEMO_DIR
from offload.predictors.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "tests" / "data" / "demo_trace"
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def llm():
    return offload.load(device="cpu")


@pytest.fixture(scope="module")
def trace():
    return load_trace(TRACE)


def test_files_match_the_checksums_in_the_card():
    card = (DEMO_DIR / "README.md").read_text()
    sums = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})\s+\*?(\S+)$", card, re.M))
    shipped = {p.name for p in DEMO_DIR.iterdir() if p.is_file() and p.name != "README.md"}
    assert shipped and set(sums) == shipped
    for name, digest in sums.items():
        assert hashlib.sha256((DEMO_DIR / name).read_bytes()).hexdigest() == digest, name
    size = sum((DEMO_DIR / n).stat().st_size for n in shipped)
    assert size <= 30 * 2**20


def test_loads_with_no_argument_and_matches_transformers_loss(llm, trace):
    transformers = pytest.importorskip("transformers")
    assert llm.path == DEMO_DIR and llm.config.family.architecture == "MixtralForCausalLM"
    ids = torch.tensor([trace.token_ids[trace.sequences()[0]].tolist()])  # held-out text, never trained on
    logits = llm.logits(ids)
    ours = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    ref = transformers.AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(ids, labels=ids).loss.item()
    assert abs(ours - theirs) <= 1e-3
    assert ours < 5.0  # far below uniform guessing over the vocabulary (ln 4096 = 8.3)


def test_greedy_generation_is_deterministic_and_made_of_corpus_words(llm):
    first = llm.generate("ROMEO:\n", max_new_tokens=60)
    again = llm.generate("ROMEO:\n", max_new_tokens=60)
    assert first.token_ids == again.token_ids and first.text == again.text
    words = re.findall(r"[A-Za-z']+", first.text)
    assert len(words) >= 8
    if not CORPUS.exists():
        pytest.skip(f"{CORPUS} is not here to check the vocabulary against")
    vocabulary = set(re.findall(r"[A-Za-z']+", CORPUS.read_text()))
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= 0.9, (known, first.text)


def test_chat_replies_with_the_template(llm):
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "user", "content": "Who art thou?"}]
    hf = transformers.AutoTokenizer.from_pretrained(DEMO_DIR)
    assert llm.tokenizer.encode_chat(messages) == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                          tokenize=True, return_dict=False)
    reply = llm.chat(messages, max_new_tokens=40)
    assert reply.text.strip() and reply.finish_reason in ("eos", "length")


def test_demo_cli_needs_no_model_argument():
    result = CliRunner().invoke(main, ["generate", "-p", "ROMEO:", "-n", "12", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "demo model" in result.output and "tok/s" in result.output


def test_trace_is_the_model_s_real_routing(llm, trace):
    seqs = trace.sequences()[:2]
    replay = llm.trace([trace.token_ids[s].tolist() for s in seqs])
    recorded = np.concatenate([trace.topk_ids[s] for s in seqs])
    same = (np.sort(replay.topk_ids, -1) == np.sort(recorded, -1)).all(-1).mean()
    assert same >= 0.999  # up to floating-point ties


def test_every_expert_gets_more_than_two_percent_of_the_routing(trace):
    for layer in range(trace.num_layers):
        usage = np.bincount(trace.topk_ids[:, layer].ravel(), minlength=trace.num_experts) / trace.topk_ids[:, layer].size
        assert usage.min() > 0.02, (layer, usage)
