"""Streaming JSON reading against `json.load` on a GQA-like questions file: throughput and peak memory.

    python benchmarks/bench_jsonstream.py [--mb 200] [--repeats 1] [--out benchmarks/results/bench_jsonstream.json]

The file has the official `*_balanced_questions.json` layout, with records like the released ones (question,
full answer, semantic program, annotations, types; about 1.2 KB each, the size of GQA's 943k train questions
in 1.3 GB). Every measurement runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own; `import only`
is the interpreter with the modules imported and nothing read. Times are medians over `--repeats` runs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "the",
    "a",
    "is",
    "are",
    "what",
    "color",
    "shape",
    "left",
    "right",
    "of",
    "on",
    "in",
    "man",
    "woman",
    "table",
    "chair",
    "sky",
    "dark",
    "white",
    "red",
    "small",
    "large",
]

# Each case imports what it needs, reads the file given as argv[1] and prints nothing: the parent times it.
CASES = {
    "import only": "import json, isubg.data.questions",
    "json.load": "import json; json.load(open(sys.argv[1], 'rb'))",
    "jsonstream.iter_object": (
        "from isubg.data.jsonstream import iter_object\nfor _ in iter_object(sys.argv[1]): pass"
    ),
    "load_gqa_questions": "from isubg.data.questions import load_gqa_questions; load_gqa_questions(sys.argv[1])",
}


def _record(rng: random.Random, index: int) -> dict:
    words = rng.choices(WORDS, k=rng.randint(5, 12))
    obj = str(rng.randint(1_000_000, 4_000_000))
    return {
        "semantic": [
            {"operation": "select", "dependencies": [], "argument": f"{words[0]} ({obj})"},
            {"operation": "relate", "dependencies": [0], "argument": f"{words[1]},on,s ({obj})"},
            {"operation": "query", "dependencies": [1], "argument": "color"},
        ],
        "entailed": [f"{rng.randint(0, 10**8):08d}" for _ in range(rng.randint(0, 6))],
        "equivalent": [f"{index:08d}"],
        "question": " ".join(words).capitalize() + "?",
        "imageId": str(rng.randint(2_300_000, 2_420_000)),
        "isBalanced": True,
        "groups": {"global": rng.choice(WORDS), "local": f"14-{words[0]}_{words[1]}"},
        "answer": rng.choice(WORDS),
        "semanticStr": f"select: {words[0]} ({obj})->relate: {words[1]},on,s ({obj})->query: color [1]",
        "annotations": {"answer": {"0": obj}, "question": {"3": obj}, "fullAnswer": {"1": obj}},
        "types": {"structural": "query", "semantic": "rel", "detailed": "relS"},
        "fullAnswer": " ".join(rng.choices(WORDS, k=8)).capitalize() + ".",
    }


def write_questions(path: Path, megabytes: float) -> int:
    """Write a GQA-like questions file of about `megabytes` MB, one record at a time; return its size."""
    rng = random.Random(0)
    target, size, index = megabytes * 1e6, 1, 0
    with path.open("w", encoding="utf-8") as handle:
        handle.write("{")
        while size < target:
            text = ("," if index else "") + json.dumps(f"{index:08d}") + ":" + json.dumps(_record(rng, index))
            handle.write(text)
            size, index = size + len(text), index + 1
        handle.write("}")
    return path.stat().st_size


def measure(case: str, path: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one case in a fresh interpreter."""
    code = (
        "import resource, sys, time\nstart = time.perf_counter()\n"
        + CASES[case]
        + "\nprint(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True)
    seconds, rss = out.stdout.split()
    return float(seconds), float(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="size of the generated file in MB")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_jsonstream.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_balanced_questions.json"
        size = write_questions(path, args.mb)
        rows = {}
        print(f"{size / 1e6:.0f} MB GQA-like questions file")
        print(f"{'case':<26}{'seconds':>9}{'MB/s':>8}{'peak RSS MiB':>14}")
        for case in CASES:
            runs = [measure(case, path) for _ in range(args.repeats)]
            seconds, rss = statistics.median(r[0] for r in runs), max(r[1] for r in runs)
            rate = None if case == "import only" else round(size / 1e6 / seconds, 1)
            rows[case] = {"seconds": round(seconds, 3), "mb_per_s": rate, "rss_mib": round(rss)}
            print(f"{case:<26}{seconds:>9.2f}{'-' if rate is None else rate:>8}{rss:>14.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"file_bytes": size, "python": sys.version.split()[0], "cases": rows, "time": time.strftime("%Y-%m-%d")}
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
