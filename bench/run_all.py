"""`make bench`: run every benchmark, then write bench/RESULTS.md (machine, date, figures)."""
import datetime
import sys
from pathlib import Path

import arrays
import cpu
import dispatch
import drain
import fairness
import gpus
import idle
import makespan
import outputs
import scale
import slowclients
import submit
import waiters
from common import machine

HERE = Path(__file__).resolve().parent


def main():
    only = set(sys.argv[1:])
    rows = []
    for name, module in (("dispatch", dispatch), ("submit", submit), ("drain", drain),
                         ("scale", scale), ("makespan", makespan),
                         ("fairness", fairness), ("idle", idle),
                         ("slowclients", slowclients), ("gpus", gpus), ("outputs", outputs),
                         ("arrays", arrays), ("cpu", cpu), ("waiters", waiters)):
        if not only or name in only:
            rows += module.run()
    if only:
        return  # a partial run does not replace the table

    def fmt(v):
        return "–" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {machine()}. Date: {datetime.date.today().isoformat()}. "
        "Everything on loopback; SSH figures through the jump host of the loopback sshd "
        "cluster. Reproduce with `make bench`.",
        "",
        "| benchmark | metric | baseline | gpuqueue | unit | ratio | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['bench']} | {r['metric']} | {fmt(r['baseline'])} | {fmt(r['value'])} "
                     f"| {r['unit']} | {fmt(r['ratio'])} | {r['target']} |")
    # The sections below the table (before-and-after comparisons, profiles, notes) are
    # written by hand, each about one change: a fresh table keeps them.
    results = HERE / "RESULTS.md"
    kept = results.read_text().partition("\n## ") if results.exists() else ("", "", "")
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n" + (
        "\n## " + kept[2] if kept[1] else ""))
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
