"""Write every generated file of the Helm chart; ``--check`` only reports drift.

    python -m seal.deploy            # regenerate helm/seal/{values.yaml,values.schema.json,files/…}
    python -m seal.deploy --check    # exit 1 and name the stale files
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from seal.deploy import alerts, chart, dashboard

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "seal"


def generated_files() -> dict[str, Callable[[], str]]:
    """Chart-relative path → function rendering its content."""
    return {
        "values.yaml": chart.render_values_yaml,
        "values.schema.json": chart.render_values_schema,
        "files/grafana/seal-dashboard.json": dashboard.render_dashboard_json,
        "files/prometheus/seal-alerts.yaml": alerts.render_rules_yaml,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chart-dir", type=Path, default=CHART_DIR)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for relative, render in generated_files().items():
        path = args.chart_dir / relative
        content = render()
        if path.is_file() and path.read_text(encoding="utf-8") == content:
            continue
        stale.append(relative)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
    verb = "stale" if args.check else "written"
    print("\n".join(f"{verb}: {args.chart_dir / r}" for r in stale) or "up to date")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
