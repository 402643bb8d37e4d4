"""`offload check-gpu` as a dry run on the CPU (--tiny): the synthetic checkpoints it draws are
models transformers reads like ours, and its table has every row; bad options are one clean error."""

import torch
from click.testing import CliRunner

import offload
from offload.cli import main
from conftest import reference


def test_tiny_dry_run_prints_every_row(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path / "cache"))  # where --experts int8 quantizes to
    result = CliRunner().invoke(main, ["check-gpu", "--device", "cpu", "--tiny", "--no-accelerate", "--tokens", "4",
                                       "--repeats", "1", "--dir", str(tmp_path), "--experts", "int8"])
    assert result.exit_code == 0, result.output
    rows = [line.split()[:2] for line in result.output.splitlines() if line.startswith(("mixtral ", "128x8 "))]
    assert rows.count(["mixtral", "transformers,"]) == 1 and rows.count(["128x8", "ours,"]) == 2
    assert sum(1 for line in result.output.splitlines() if "a quarter of the experts" in line) == 3
    assert sum(1 for line in result.output.splitlines() if "int8 experts" in line) == 3  # 2 resident, 1 offloaded
    for shape in ("mixtral-tiny", "128x8-tiny"):  # the random checkpoints: transformers computes what we do
        path = tmp_path / shape
        ids = torch.randint(3, 900, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            theirs = reference(path, torch.bfloat16)(ids).logits.float()
        assert (offload.load(path, device="cpu").logits(ids) - theirs).abs().max().item() <= 1e-2


def test_bad_options_are_one_clean_error(tmp_path):
    for args in (["--shapes", "bogus", "--device", "cpu", "--tiny"], ["--device", "cpu"], ["--tokens", "0"],
                 ["--device", "cpu", "--tiny", "--experts", "int3"]):
        result = CliRunner().invoke(main, ["check-gpu", "--dir", str(tmp_path), *args])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
