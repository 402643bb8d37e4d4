"""The README's shell blocks run as written on a fresh clone: every `offload SUBCOMMAND` exists and
takes the options shown, scripts and files named exist, placeholders (MODEL, TRACE, ...) appear only
under a "# your ..." comment, and the cheap commands (generate, chat, plot, the prompts script) run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from offload.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SEPARATORS = {"&&", "||", ";", "|", "&", ">", "<", ">>", "2>"}
PLACEHOLDER = re.compile(r"[A-Z]{3,}[A-Z0-9_]*(-[A-Za-z0-9]+)?")  # MODEL, MODEL-int4, TRACE, FILE


def bash_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def commands() -> list[tuple[int, bool, list[str], str]]:
    """(block index, under a "# your ..." comment, argv, the line) of every command in the bash blocks,
    with redirections kept as tokens ('>' then the file)."""
    out = []
    for b, block in enumerate(bash_blocks()):
        yours, pending = False, ""
        for line in block.replace("\\\n", " ").splitlines():
            stripped = (pending + "\n" + line).strip() if pending else line.strip()
            if stripped.startswith("#"):
                yours = yours or "your" in stripped.lower()
                continue
            if not stripped:
                continue
            try:
                shlex.split(stripped, comments=True)
            except ValueError:  # a quoted string (a curl JSON body) goes on over the next lines
                pending = stripped
                continue
            pending = ""
            lexer = shlex.shlex(stripped, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            argv: list[str] = []
            for token in lexer:
                if token in SEPARATORS and token not in (">", "<", ">>", "2>"):
                    if argv:
                        out.append((b, yours, argv, stripped))
                    argv = []
                else:
                    argv.append(token)
            if argv:
                out.append((b, yours, argv, stripped))
    return out


def options_of(argv: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in argv if t.startswith("-") and not re.fullmatch(r"-[\d.]+", t)]


def offload_commands():
    return [(yours, argv, line) for _, yours, argv, line in commands() if argv[0] == "offload"]


def test_the_readme_has_bash_blocks_with_offload_commands():
    found = {argv[1] for _, argv, _ in offload_commands() if len(argv) > 1}
    assert {"chat", "generate", "trace", "train-predictor", "eval-predictor", "plot", "profile", "simulate",
            "bench", "serve", "quantize", "eval-quality"} <= found


def test_every_subcommand_and_option_exists():
    runner = CliRunner()
    helps = {}
    for _, argv, line in offload_commands():
        assert len(argv) > 1 and argv[1] in main.commands, f"no subcommand in: {line}"
        command = main.commands[argv[1]]
        known = {o for p in command.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
        known |= {"--help"}
        if argv[1] not in helps:
            result = runner.invoke(main, [argv[1], "--help"])
            assert result.exit_code == 0, result.output
            helps[argv[1]] = result.output
        for option in options_of(argv[2:]):
            assert option in known, f"{argv[1]} has no option {option}: {line}"
            assert option == "--help" or option in helps[argv[1]], f"{option} missing from {argv[1]} --help"


def test_placeholders_only_under_a_your_comment():
    for _, yours, argv, line in commands():
        if yours:
            continue
        words = [t for t in argv if PLACEHOLDER.fullmatch(t)]
        assert not words, f"placeholder {words} outside a '# your ...' part of its block: {line}"


def test_scripts_files_and_extras_named_exist():
    extras = re.search(r"\[project\.optional-dependencies\](.*?)\n\[", (ROOT / "pyproject.toml").read_text(),
                       re.S).group(1)
    for _, yours, argv, line in commands():
        if argv[0] == "python" and len(argv) > 1 and argv[1].startswith("scripts/"):
            script = ROOT / argv[1]
            assert script.is_file(), line
            source = script.read_text(encoding="utf-8")
            for option in options_of(argv[2:]):
                if option in (">", "2>"):
                    continue
                assert f'"{option}"' in source, f"{argv[1]} has no option {option}"
        if argv[0] == "cp" and not yours:
            assert (ROOT / argv[-2]).exists(), line
        if argv[:2] == ["pip", "install"]:
            for spec in argv[2:]:
                for extra in re.findall(r"\[(\w+)\]", spec):
                    assert re.search(rf"^{extra} = \[", extras, re.M), f"no extra {extra!r}: {line}"


@pytest.fixture
def clone(tmp_path, monkeypatch):
    """A working directory that looks like a fresh clone's root, where outputs land in tmp_path."""
    for name in ("offload", "tests", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_the_cheap_commands_run(clone):
    """generate, chat and plot (on the demo model, 4 tokens, one thread) and the prompts script, in the
    README's order; commands that need what a long step makes (a trained predictor, a quantized copy)
    or that take long (trace, bench, profile, eval-*) are only checked above."""
    runner = CliRunner()
    ran = []
    for _, yours, argv, line in commands():
        if yours:
            continue
        if argv[0] == "python" and argv[1] == "scripts/heldout_prompts.py":
            out = argv[argv.index(">") + 1]
            with open(clone / out, "w") as f:
                subprocess.run([sys.executable, *argv[1:argv.index(">")]], stdout=f, check=True, timeout=60)
            assert len((clone / out).read_text().splitlines()) == 60
            ran.append(line)
            continue
        if argv[0] != "offload" or argv[1] not in ("generate", "chat", "plot") or "--experts" in argv:
            continue
        args = argv[1:]
        positional = [a for i, a in enumerate(args[1:], 1) if not a.startswith("-") and not args[i - 1].startswith("-")]
        if any(not (clone / p).exists() for p in positional):
            continue  # made by a step not run here (e.g. demo/ with its trained predictor)
        if args[0] in ("generate", "chat"):
            for flag in ("-n", "--max-new-tokens"):
                if flag in args:
                    i = args.index(flag)
                    del args[i:i + 2]
            args += ["-n", "4", "--threads", "1", "--device", "cpu"]
        result = runner.invoke(main, args, input="Good morrow\n/exit\n" if args[0] == "chat" else None)
        assert result.exit_code == 0, f"{line}\n{result.output}"
        ran.append(line)
    assert any("plot" in r and "--stats" in r for r in ran) and any("generate" in r for r in ran)
    assert any("chat" in r for r in ran) and any("heldout_prompts" in r for r in ran)
    assert (clone / "usage.png").is_file() and (clone / "run.png").is_file()


def test_the_shipped_heldout_split_is_the_corpus_tail():
    """tests/data/tinyshakespeare-heldout.txt is the last 10% of the characters of Tiny Shakespeare, as
    scripts/train_demo_model.py holds out (checked where the corpus is at hand)."""
    corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    held = (ROOT / "tests" / "data" / "tinyshakespeare-heldout.txt").read_text(encoding="utf-8")
    assert len(held) == 111_540 and held.startswith("?\n\nGREMIO:")
    if not corpus.exists():
        pytest.skip("the Tiny Shakespeare corpus is not beside the repository")
    text = corpus.read_text(encoding="utf-8")
    assert held == text[int(len(text) * 0.9):]
