"""`offload bench --against llama.cpp`: the GGUF writer (offload/llamacpp.py), read back with the gguf
package and loaded by our runtime; the bench's planning of llama.cpp's cases; the message when
llama-cpp-python is missing. The comparisons with llama.cpp itself are opt-in (-m gguf) at the end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import offload
from offload import bench
from offload.cli import main
from offload.errors import OffloadError

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
TINY = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_local_experts=4)
PROMPT = [1, 17, 45, 99, 3, 250, 7, 61, 12, 200, 33, 150, 8]
TEXTS = ("To be, or not to be: Héllo wörld, naïve café; 東京 🙂 <|user|>hi<|end|> 12345 !!", "To be",
         " leading space")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny(model_dir):
    return model_dir("mixtral", **TINY)


def export(src, tmp_path, qtype):
    from offload.llamacpp import export_gguf

    return export_gguf(src, tmp_path / f"m-{qtype}.gguf", qtype)


def logits(path, **kw):
    with offload.load(str(path), device="cpu", dtype="float32", **kw) as llm:
        return llm.logits([PROMPT])[0]


# ---- the writer --------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_gguf_written_reads_back_with_the_gguf_package(tiny, tmp_path, qtype):
    """llama.cpp's Mixtral layout: arch `llama`, stacked experts in the asked type, F16 matrices,
    F32 norms and routers; q and k rows permuted as llama.cpp's converter does."""
    from offload.llamacpp import llama_permute

    reader = gguf.GGUFReader(str(export(tiny, tmp_path, qtype)))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.expert_count"].contents() == 4
    assert reader.fields["llama.expert_used_count"].contents() == 2
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    got = {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}
    want = {"token_embd.weight": ("F16", (320, 64)), "output.weight": ("F16", (320, 64)),
            "output_norm.weight": ("F32", (64,))}
    for i in range(3):
        want.update({f"blk.{i}.attn_norm.weight": ("F32", (64,)), f"blk.{i}.ffn_norm.weight": ("F32", (64,)),
                     f"blk.{i}.attn_q.weight": ("F16", (64, 64)), f"blk.{i}.attn_k.weight": ("F16", (32, 64)),
                     f"blk.{i}.attn_v.weight": ("F16", (32, 64)), f"blk.{i}.attn_output.weight": ("F16", (64, 64)),
                     f"blk.{i}.ffn_gate_inp.weight": ("F32", (4, 64)),
                     f"blk.{i}.ffn_gate_exps.weight": (qtype, (4, 64, 64)),
                     f"blk.{i}.ffn_up_exps.weight": (qtype, (4, 64, 64)),
                     f"blk.{i}.ffn_down_exps.weight": (qtype, (4, 64, 64))})
    assert got == want
    from safetensors import safe_open

    with safe_open(tiny / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight").numpy()
        gate = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w1.weight").numpy()  # [I, H]
    tensors = {t.name: t for t in reader.tensors}
    stored_q = np.array(tensors["blk.1.attn_q.weight"].data)
    np.testing.assert_array_equal(stored_q, llama_permute(q.astype(np.float16), 4))
    experts = gguf.quants.dequantize(np.array(tensors["blk.1.ffn_gate_exps.weight"].data), T[qtype])
    step = {"F16": 2 ** -11, "Q8_0": 1 / 127, "Q4_0": 1 / 7}[qtype]  # half a step of the block's max, at most
    assert np.abs(experts[2] - gate).max() <= step * np.abs(gate).max()


@pytest.mark.parametrize("qtype,tolerance", [
    # F16: each weight rounded to 11 significant bits (relative 2^-12), on logits of about +-0.6
    ("F16", 1e-3),
    # Q8_0: blocks of 32 with an f16 scale, |error| <= max|w| / 254 per weight
    ("Q8_0", 4e-3),
])
def test_gguf_written_runs_in_our_runtime_like_the_checkpoint(tiny, tmp_path, qtype, tolerance):
    """offload.load(the GGUF) gives the logits of offload.load(the safetensors checkpoint), but for the
    GGUF type's rounding, and the tokenizer written encodes text to the same ids."""
    path = export(tiny, tmp_path, qtype)
    reference = logits(tiny)
    got = logits(path)
    err = (got - reference).abs().max().item()
    assert err < tolerance, err
    with offload.load(str(tiny), device="cpu") as ours, offload.load(str(path), device="cpu") as back:
        for text in TEXTS:
            assert back.tokenizer.encode(text) == ours.tokenizer.encode(text), text


def test_checkpoint_without_a_tokenizer_gets_placeholder_ids(tmp_path):
    """The bench's synthetic checkpoints have no tokenizer: the file carries a placeholder vocabulary
    (token ids only) that llama.cpp and our GGUF reader both accept."""
    from offload.bench import make_synthetic_mixtral
    from offload.llamacpp import export_gguf

    src = make_synthetic_mixtral(tmp_path / "syn", layers=2, hidden=64, intermediate=64, experts=4, vocab=300,
                                 heads=4, kv_heads=2, dtype=torch.float32)
    path = export_gguf(src, tmp_path / "syn.gguf", "F16")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 300
    err = (logits(path) - logits(src)).abs().max().item()
    assert err < 2e-3, err


def test_only_mixtral_architecture_is_written(model_dir, tmp_path):
    with pytest.raises(OffloadError, match="Mixtral-architecture models only"):
        export(model_dir("qwen3_moe"), tmp_path, "F16")
    with pytest.raises(OffloadError, match="Q5_K"):
        export(model_dir("mixtral", **TINY), tmp_path, "Q5_K")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_gguf_copy_is_made_once_in_the_cache(tiny, private_cache, monkeypatch):
    import offload.llamacpp as llamacpp

    first = llamacpp.gguf_copy(str(tiny), "Q4_0")
    assert first.is_file() and private_cache in first.parents and "llamacpp" in str(first)
    monkeypatch.setattr(llamacpp, "export_gguf", lambda *a, **k: pytest.fail("written again"))
    assert llamacpp.gguf_copy(str(tiny), "Q4_0") == first
    resident, per_expert = llamacpp.gguf_sizes(first, 3 * 4)
    assert per_expert == 3 * 64 * 64 // 32 * 18  # three 64 x 64 matrices of Q4_0 blocks (18 bytes per 32)
    assert resident == 2 * 320 * 64 * 2 + 3 * (2 * 64 * 64 + 2 * 32 * 64) * 2 + (3 * (2 * 64 + 4 * 64) + 64) * 4


# ---- the bench: arguments, the message without llama-cpp-python, the plan -----------------------

def test_against_names_llama_cpp_only():
    assert bench.parse_against(None) is None and bench.parse_against(" ") is None
    assert bench.parse_against("llama.cpp") == bench.parse_against("LLAMA-CPP") == "llama.cpp"
    with pytest.raises(OffloadError, match="llama.cpp"):
        bench.parse_against("vllm")


def test_missing_llama_cpp_python_is_one_line_and_exit_code_2(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "anything"), "--against", "llama.cpp"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and 'pip install "moe-offload[gguf]"' in lines[0] and "5 minutes" in lines[0], result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "anything"), "--against", "vllm"])
    assert result.exit_code == 2 and "the peer built is llama.cpp" in result.output


def test_prompt_ids_are_the_same_for_every_case_and_engine():
    first = bench.prompt_ids(320, 8, 3)
    assert first == bench.prompt_ids(320, 8, 3) and len(first) == 3 and all(len(p) == 8 for p in first)
    assert len({tuple(p) for p in first}) == 3 and all(3 <= t < 320 for p in first for t in p)
    encode = lambda text: [len(w) for w in text.split()]  # noqa: E731
    assert bench.prompt_ids(320, 2, 3, ["a bb ccc", "dddd"], encode) == [[1, 2], [4], [1, 2]]


def test_llama_cases_follow_ours_with_the_same_share_of_memory(tiny, monkeypatch):
    """Per case letter, ours then llama.cpp's; b runs confined for both; each llama.cpp limit holds its
    own other weights, as many experts as ours holds (in its bytes) and the overhead less torch's cost."""
    monkeypatch.setattr(bench, "CGROUP_ROOT", Path("/"))  # as if a memory controller were there
    monkeypatch.setattr(bench, "offload_baseline_rss", lambda: 400 << 20)
    monkeypatch.setattr(bench, "llama_baseline_rss", lambda: 100 << 20)
    formats = [bench.format_directory(str(tiny), e) for e in (None, "int4")]
    planned, infos = [], {}
    for path, name, option in formats:
        cases, info = bench.default_cases(str(path), "cpu", ("none",), option, fmt_name=name, threads=2,
                                          confine_b=True)
        planned.append(cases)
        infos[name] = info
    said = []
    order, pairs = bench.llama_cases(str(tiny), formats, planned, infos, bench.CASES, said.append)
    assert pairs == {"fp32": "F16", "int4-g32": "Q4_0"}
    assert [(c.engine, c.name[:2], c.format) for c in order[1]] == [
        ("offload", "a:", "int4-g32"), ("llama.cpp", "a:", "Q4_0"), ("offload", "b:", "int4-g32"),
        ("llama.cpp", "b:", "Q4_0"), ("offload", "c:", "int4-g32"), ("llama.cpp", "c:", "Q4_0")]
    ours_b, theirs_a, theirs_b, theirs_c = order[1][2], order[1][1], order[1][3], order[1][5]
    assert ours_b.memory_limit == infos["int4-g32"]["b_limit"] and ours_b.cold
    assert not theirs_a.mmap and theirs_a.memory_limit is None and theirs_a.threads == 2
    resident, per_expert = 2 * 320 * 64 * 2 + 3 * (2 * 64 * 64 + 2 * 32 * 64) * 2 + (3 * (2 * 64 + 4 * 64) + 64) * 4, \
        3 * 64 * 64 // 32 * 18
    overhead = bench.RUNTIME_OVERHEAD - (300 << 20)
    assert theirs_b.mmap and theirs_b.cold and theirs_b.memory_limit == resident + 6 * per_expert + overhead
    assert theirs_c.memory_limit == resident + 3 * 2 * per_expert + overhead  # a quarter, at least top_k a layer
    assert Path(theirs_c.model).is_file() and any("cgroup limit for c" in line for line in said)


def test_report_against_pairs_cases_and_checks_the_targets():
    def result(name, fmt, tps, engine="offload"):
        return bench.CaseResult(name=name, placement="x", load_seconds=0, tokens_per_second=tps,
                                time_to_first_token=0.1, hit_rate=0, bytes_from_disk_per_token=0,
                                bytes_to_device_per_token=0, misses_per_token=0, stall_seconds_per_token=0,
                                peak_rss=1 << 30, baseline_rss=0, format=fmt, engine=engine)

    ours = [result("a: resident", "bf16", 10), result("c: RAM 1/4, disk (cgroup), none", "bf16", 3)]
    theirs = [result("a: resident", "F16", 20, "llama.cpp"), result("c: RAM 1/4, disk (cgroup), mmap", "F16", 1,
                                                                    "llama.cpp")]
    said = []
    bench.report_against(ours, theirs, {"bf16": "F16"}, said.append)
    text = "\n".join(said)
    assert "0.50x" in text and "3.00x" in text
    assert "target 1.0x (resident, same format): a: resident [bf16 vs F16] 0.50x, not met" in text
    assert "[bf16 vs F16] 3.00x, met" in text


# ---- opt-in: against llama.cpp itself ------------------------------------------------------------

@pytest.mark.gguf
@pytest.mark.parametrize("qtype,tolerance", [("F16", 1e-3), ("Q8_0", 3e-3), ("Q4_0", 3e-3)])
def test_llama_cpp_runs_the_written_file_as_we_do(tiny, tmp_path, qtype, tolerance):
    """Opt-in (-m gguf, needs llama-cpp-python): llama.cpp's logits on the file written here against
    ours on the same file (F32 KV cache, so only the arithmetic differs: llama.cpp rounds activations
    to F16 / 8 bits inside its matmuls), and its tokenization against ours of the checkpoint."""
    pytest.importorskip("llama_cpp")
    from offload.llamacpp_child import open_llama

    path = export(tiny, tmp_path, qtype)
    theirs = open_llama(str(path), threads=1, n_ctx=64, logits_all=True, type_k=0, type_v=0)
    theirs.reset()
    theirs.eval(PROMPT)
    want = torch.tensor(np.array(theirs.scores[:len(PROMPT)]), dtype=torch.float32)
    got = logits(path)
    err = (got - want).abs().max().item()
    assert err < tolerance, err
    with offload.load(str(tiny), device="cpu") as ours:
        for text in TEXTS:
            assert theirs.tokenize(text.encode(), add_bos=True, special=True) == ours.tokenizer.encode(text), text
    theirs.close()


@pytest.mark.gguf
def test_llama_cpp_bench_child_generates_greedily(tiny, tmp_path):
    """Opt-in: the bench's llama.cpp child, by path and without torch, generates as many tokens as
    asked from each prompt, greedy: the first token is the argmax of our logits on the same file."""
    pytest.importorskip("llama_cpp")
    path = export(tiny, tmp_path, "F16")
    case = bench.Case("a: resident", {}, model=str(path), format="F16", engine="llama.cpp", mmap=False,
                      extra_bufts=True, threads=1)
    prompts = [PROMPT, PROMPT[:5]]
    result = bench.run_llama_child(case, prompts, 6)
    assert result.engine == "llama.cpp" and result.tokens_per_second > 0 and len(result.runs) == 2
    assert all(len(run["token_ids"]) == 6 for run in result.runs)
    with offload.load(str(path), device="cpu", dtype="float32") as llm:
        for prompt, run in zip(prompts, result.runs):
            assert run["token_ids"][0] == int(llm.logits([prompt])[0][-1].argmax())
    assert json.loads(json.dumps(result.runs))  # what --json writes
