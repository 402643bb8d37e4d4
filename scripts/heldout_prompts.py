"""Write held-out Tiny Shakespeare text as prompts, one per line, for traces and benchmarks.

    python scripts/heldout_prompts.py > prompts.txt              # 60 chunks of about 1200 characters
    python scripts/heldout_prompts.py --first 30 > fit.txt       # the first 30 (to fit predictors on)
    python scripts/heldout_prompts.py --skip 30 > bench.txt      # the last 30 (to measure on)

The held-out part is the last 10% of the text, as in scripts/train_demo_model.py:
never seen by the demo model or its tokenizer. Speeches are joined, newlines
become spaces, until a chunk would pass --chars.
"""

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--chars", type=int, default=1200)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--first", type=int, default=None, help="keep only the first N of the --count chunks")
    parser.add_argument("--skip", type=int, default=0, help="drop the first N of the --count chunks")
    args = parser.parse_args()
    text = Path(args.data).read_text(encoding="utf-8")
    held = text[int(len(text) * 0.9):]
    chunks, current = [], ""
    for speech in (p.strip() for p in held.split("\n\n") if p.strip()):
        if current and len(current) + len(speech) > args.chars:
            chunks.append(current)
            current = ""
        current = (current + " " + speech.replace("\n", " ")).strip()
    chunks.append(current)
    chunks = chunks[: args.count][args.skip:]
    print("\n".join(chunks[: args.first] if args.first is not None else chunks))


if __name__ == "__main__":
    main()
