"""Compare finished sweeps from MLflow: the study's Table 8 layout across them and the lambda-schedule figure.

    python sweeps/compare.py finetune-local                           # one sweep, by name
    python sweeps/compare.py finetune-paper finetune-schedules --out outputs/compare/study
    python sweeps/compare.py 3f2a...c9 --mlflow-uri http://127.0.0.1:5000    # a parent run id, another store

A SWEEP is a sweep's name (its MLflow parent run's name, the `vitreg.sweep` tag) or its parent run id. The trials
are read from MLflow (the parent's child runs), never from Ray's files, so any sweep logged to the store compares.
Written to --out (default outputs/compare/<sweeps>): table.txt, table.csv (every value at full precision),
accuracy_vs_artifacts.png and lambda_schedules.png (per schedule: lambda, the artifact measure and acc@1 against
the epoch, from each run's metric history). All of them are logged to a new MLflow run in experiment
`vitreg-compare` of the same store, tagged with the sweeps it compares and linked to their parent runs.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout's packages, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps import mlflow_runs, report
from train import tracking

COMPARE_EXPERIMENT = "vitreg-compare"
COMPARED_SWEEPS_TAG = "vitreg.compared_sweeps"
COMPARED_PARENTS_TAG = "vitreg.compared_parent_run_ids"
# The share of high-norm tokens (what the study counts) and how far the worst one stands out (what moves first).
DEFAULT_MEASURES = ("artifact/high_norm_fraction", "artifact/max_median_ratio")


@dataclass
class Comparison:
    """What `compare_sweeps` wrote and logged."""

    sweeps: list[mlflow_runs.ParentRun]
    table: report.SweepTable
    text: str
    files: list[Path]
    plotted: report.PlottedLines  # the lambda-schedule figure's lines, as drawn
    run_id: str


def compare_sweeps(
    refs: Sequence[str],
    out_dir: Path | None = None,
    tracking_uri: str | None = None,
    measures: Sequence[str] = DEFAULT_MEASURES,
    experiment: str = COMPARE_EXPERIMENT,
) -> Comparison:
    """Read the sweeps `refs` (names or parent run ids) from MLflow, write the table and figures, log them.

    Raises:
        mlflow_runs.SweepNotFound: a ref names no sweep, or a name is ambiguous.
        ValueError: no refs, or an unknown artifact measure.
    """
    if not refs:
        raise ValueError("sweeps: give at least one sweep name or parent run id")
    unknown = [m for m in measures if m not in report.METRIC_LABELS]
    if unknown or not measures:
        raise ValueError(f"measures: unknown {unknown or '(none)'}; allowed: {', '.join(report.METRIC_LABELS)}")
    uri = tracking.resolve_tracking_uri(tracking_uri)
    parents = list({p.run_id: p for p in (mlflow_runs.find_sweep(uri, ref) for ref in refs)}.values())
    names = [p.sweep or p.run_id for p in parents]
    out = Path(out_dir) if out_dir else Path("outputs", "compare", _slug("+".join(names)))
    out.mkdir(parents=True, exist_ok=True)

    rows = [row for parent in parents for row in mlflow_runs.trial_rows(uri, parent)]
    table = report.build_table(rows, report.ARTIFACT_METRICS)
    text = report.format_table(table)
    title = f"{' vs '.join(names)}"
    (out / "table.txt").write_text(text + "\n")
    files = [
        out / "table.txt",
        report.write_csv(table, out / "table.csv"),
        report.plot_accuracy_vs_artifacts(table, out / "accuracy_vs_artifacts.png", f"{title}: acc@1 vs artifacts"),
    ]
    histories = []
    labels: set[tuple[str, str]] = set()
    for row in table.rows:
        label = report.run_label(row, with_sweep=len(parents) > 1)
        if (str(row.get("schedule")), label) in labels:  # same settings twice: tell the lines apart by trial
            label += f" {row.get('trial')}"
        labels.add((str(row.get("schedule")), label))
        series = mlflow_runs.metric_histories(uri, row["run_id"], [report.LAMBDA_METRIC, *measures, report.ACC1_METRIC])
        histories.append(report.RunHistory(label, str(row.get("schedule")), series))
    figure = out / "lambda_schedules.png"
    plotted = report.plot_schedule_histories(histories, measures, figure, f"{title}: λ schedules")
    files.append(figure)
    run_id = _log(uri, experiment, parents, files, measures)
    return Comparison(parents, table, text, files, plotted, run_id)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text)[:120] or "compare"


def _log(
    uri: str, experiment: str, parents: list[mlflow_runs.ParentRun], files: list[Path], measures: Sequence[str]
) -> str:
    """A new run holding the comparison, tagged with the sweeps and linking to their parent runs."""
    client = tracking.tracking_client(uri)
    names = [p.sweep or p.run_id for p in parents]
    links = [
        f"- `{name}`: [{p.run_id}](#/experiments/{p.experiment_id}/runs/{p.run_id})"
        for name, p in zip(names, parents, strict=True)
    ]
    run = client.create_run(
        tracking.ensure_experiment(client, uri, experiment),
        run_name=f"compare-{'+'.join(names)}"[:240],
        tags={
            mlflow_runs.ROLE_TAG: "compare",
            COMPARED_SWEEPS_TAG: ",".join(names),
            COMPARED_PARENTS_TAG: ",".join(p.run_id for p in parents),
            tracking.RUN_NOTE_TAG: "\n".join(["Sweeps compared (parent runs):", "", *links]),
        },
    )
    run_id = run.info.run_id
    client.log_param(run_id, "sweeps", ",".join(names)[:6000])
    client.log_param(run_id, "measures", ",".join(measures))
    for path in files:
        client.log_artifact(run_id, str(path), "compare")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", metavar="SWEEP", help="sweep name or parent run id")
    tracking.add_mlflow_uri_argument(parser)
    parser.add_argument("--out", type=Path, help="output folder (default outputs/compare/<sweeps>)")
    parser.add_argument(
        "--measure",
        dest="measures",
        action="append",
        choices=list(report.METRIC_LABELS),
        help=f"artifact measure of the schedule figure; repeatable (default {' '.join(DEFAULT_MEASURES)})",
    )
    parser.add_argument("--experiment", default=COMPARE_EXPERIMENT, help="MLflow experiment of the comparison run")
    args = parser.parse_args(argv)
    try:
        result = compare_sweeps(
            args.sweeps, args.out, args.mlflow_uri, tuple(args.measures or DEFAULT_MEASURES), args.experiment
        )
    except (mlflow_runs.SweepNotFound, ValueError) as error:
        parser.error(str(error))
    print(f"{' vs '.join(p.sweep or p.run_id for p in result.sweeps)} ({len(result.table.rows)} trials)\n")
    print(result.text + "\n")
    print("files: " + ", ".join(str(path) for path in result.files))
    print(f"MLflow run: {result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
