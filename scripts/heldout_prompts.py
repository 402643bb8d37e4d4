"""Write held-out Tiny Shakespeare text as prompts, one per line, for traces and benchmarks.

    python scripts/heldout_prompts.py > prompts.txt              # 60 chunks of about 1200 characters
    python scripts/heldout_prompts.py --first 30 > fit.txt       # the first 30 (to fit predictors on)
    python scripts/heldout_prompts.py --skip 30 > bench.txt      # the last 30 (to measure on)

The held-out part is the last 10% of the text, as in scripts/train_demo_model.py:
never seen by the demo model or its tokenizer. It ships in the repository as
tests/data/tinyshakespeare-heldout.txt (111,540 characters), which is read by
default; --corpus takes the whole tinyshakespeare.txt (karpathy/char-rnn's
data/tinyshakespeare/input.txt) and cuts its last 10% the same way. Speeches are
joined, newlines become spaces, until a chunk would pass --chars.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "tests" / "data" / "tinyshakespeare-heldout.txt"


def heldout_text(corpus: str | None) -> str:
    """The held-out split: the shipped file, or the last 10% of the characters of `corpus`."""
    path = Path(corpus) if corpus else HELDOUT
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        sys.exit(f"error: cannot read {path} ({exc.strerror}); "
                 + ("pass the whole Tiny Shakespeare text (karpathy/char-rnn's data/tinyshakespeare/input.txt)"
                    if corpus else "it ships in the repository: run this from a complete checkout"))
    return text[int(len(text) * 0.9):] if corpus else text


def chunks(held: str, chars: int) -> list[str]:
    out, current = [], ""
    for speech in (p.strip() for p in held.split("\n\n") if p.strip()):
        if current and len(current) + len(speech) > chars:
            out.append(current)
            current = ""
        current = (current + " " + speech.replace("\n", " ")).strip()
    out.append(current)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", "--data", dest="corpus", default=None, metavar="FILE",
                        help="the whole tinyshakespeare.txt, whose last 10%% is used "
                             "(default: the shipped held-out split, tests/data/tinyshakespeare-heldout.txt)")
    parser.add_argument("--chars", type=int, default=1200)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--first", type=int, default=None, help="keep only the first N of the --count chunks")
    parser.add_argument("--skip", type=int, default=0, help="drop the first N of the --count chunks")
    args = parser.parse_args()
    selected = chunks(heldout_text(args.corpus), args.chars)[: args.count][args.skip:]
    print("\n".join(selected[: args.first] if args.first is not None else selected))


if __name__ == "__main__":
    main()
