"""The click CLI: generate, chat, one-line errors."""

import torch
from click.testing import CliRunner

from offload.cli import main


def test_help_explains_every_option():
    runner = CliRunner()
    for command in ([], ["generate"], ["chat"]):
        result = runner.invoke(main, [*command, "--help"])
        assert result.exit_code == 0
        options = [line for line in result.output.splitlines() if line.strip().startswith("--")]
        assert options and all(len(line.split("  ", 1)) == 2 or "--help" in line for line in options)


def test_generate_prints_text_and_stats(model_dir):
    torch.set_num_threads(2)  # --threads must change it
    try:
        result = CliRunner().invoke(main, ["generate", str(model_dir("mixtral")), "-p", "To be", "-n", "5",
                                           "--device", "cpu", "--stats", "--threads", "1"])
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)  # conftest's setting, for the tests after this one
    assert result.exit_code == 0, result.output
    assert "tok/s" in result.output and '"new_tokens"' in result.output
    assert threads == 1


def test_chat_multi_turn_reset_and_exit(model_dir):
    script = "hello there\nand again\n/reset\nfresh start\n/exit\n"
    result = CliRunner().invoke(main, ["chat", str(model_dir("qwen2_moe")), "-n", "4", "--device", "cpu"],
                                input=script)
    assert result.exit_code == 0, result.output
    assert result.output.count("model> ") == 3
    assert "(conversation cleared)" in result.output
    assert result.output.count("tok/s") == 3  # a stats line after each reply


def test_errors_are_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "missing"), "-p", "hi", "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and "does not exist" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["chat", str(tmp_path), "--cache-policy", "fifo"])
    assert result.exit_code == 2 and "cache_policy" in result.output
