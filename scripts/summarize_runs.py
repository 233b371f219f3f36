"""Tabulate training runs (results.json + metrics.jsonl per run folder) as Markdown and JSON.

python scripts/summarize_runs.py RUNS_DIR [RUNS_DIR ...] --out results/mnist/table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def collect(folder: Path) -> list[dict]:
    rows = []
    for run in sorted(p for p in folder.iterdir() if (p / "results.json").is_file()):
        res = json.loads((run / "results.json").read_text())
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = metrics[-1]
        rows.append(
            {
                "run": run.name,
                "source": str(folder),
                "epochs": res["epochs"],
                "test_log_likelihood": res["test_log_likelihood"],
                "test_elbo": res["test_elbo"],
                "num_samples": res["num_samples"],
                "num_test_images": res["num_test_images"],
                "seconds_per_epoch": res["seconds_per_epoch"],
                "device": res.get("device", "?"),
                "final_weights": [round(w, 3) for w in last.get("weights", [])],
                "final_kl": [
                    round(v, 2) for k, v in sorted(last.items()) if k.startswith("train_kl_")
                ],
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| run | epochs | test LL (S=5000) | test ELBO | gap LL−ELBO | s/epoch | final weights | "
        "KL(q_m‖Q) m=2..M |\n|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['run']} | {r['epochs']} | {r['test_log_likelihood']:.2f} | {r['test_elbo']:.2f} | "
        f"{r['test_log_likelihood'] - r['test_elbo']:.2f} | {r['seconds_per_epoch']:.1f} | "
        f"{r['final_weights']} | {r['final_kl']} |\n"
        for r in rows
    )
    return head + body


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="Markdown file; a .json beside it")
    args = parser.parse_args()
    rows = [r for folder in args.folders for r in collect(folder)]
    text = markdown(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
