"""Every results CSV under bench/results/ has one layout (bench/common.py's long form) and reads back."""

from __future__ import annotations

import csv
from pathlib import Path

import accuracy
import axolotl_run
import common
import consistency
import host_cost
import llama_factory
import low_resource
import pytest
import record_growth
import soak
import step_cost
from gpu_parts.kernels import KERNEL_LAYOUT
from gpu_parts.step import STEP_LAYOUT

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
# Each CSV a bench script writes and the layout it writes it with (gpu_* under the GPU run's --out).
LAYOUTS = {
    "fgm.csv": common.SHAPE_LAYOUT,
    "gradient_penalty.csv": common.SHAPE_LAYOUT,
    "pgd.csv": common.SHAPE_LAYOUT,
    "step_cost.csv": step_cost.LAYOUT,
    "record_growth.csv": record_growth.LAYOUT,
    "soak.csv": soak.LAYOUT,
    "accuracy.csv": accuracy.LAYOUT,
    "low_resource.csv": low_resource.LAYOUT,
    "consistency.csv": consistency.LAYOUT,
    "host_cost.csv": host_cost.LAYOUT,
    "llamafactory.csv": llama_factory.LAYOUT,
    "axolotl.csv": axolotl_run.LAYOUT,
    "gpu_attack.csv": common.SHAPE_LAYOUT,
    "gpu_step.csv": STEP_LAYOUT,
    "gpu_step_cost.csv": step_cost.LAYOUT,
    "gpu_kernels.csv": KERNEL_LAYOUT,
    "gpu_host_cost.csv": host_cost.LAYOUT,
}


def provenance_row(**row: object) -> dict:
    return dict.fromkeys(common.PROVENANCE, "p") | row


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.csv")), ids=lambda path: path.name)
def test_committed_results_are_long_form_and_read_back(path: Path) -> None:
    assert path.name in LAYOUTS, f"{path.name}: no layout known for it; add the script's Layout to LAYOUTS"
    layout = LAYOUTS[path.name]
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == common.RESULT_COLUMNS
        stored = list(reader)
    assert stored, f"{path.name} holds no rows"
    wide = common.read_rows(path, layout)
    written = [long_row for row in wide for long_row in layout.long_rows(row)]
    key = lambda r: tuple(r[c] for c in common.RESULT_COLUMNS)  # noqa: E731
    assert sorted(map(key, written)) == sorted(map(key, stored)), f"{path.name} does not read back as it was written"


def test_a_row_round_trips_through_a_file(tmp_path: Path) -> None:
    layout = common.Layout(config=("vocab", "batch"), metrics=("median_s", "peak"))
    rows = [
        provenance_row(benchmark="b", vocab=250000, batch="16x32", impl="fgm", median_s="0.5", peak=7, notes="n"),
        provenance_row(benchmark="b", vocab=250000, batch="16x32", impl="plain", median_s="0.25", notes="n"),
    ]
    common.append_rows(rows, tmp_path / "r.csv", layout)
    common.append_rows(rows[:1], tmp_path / "r.csv", layout)  # appended, the header once
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 + 2 and "vocab=250000; batch=16x32" in lines[1]
    back = common.read_rows(tmp_path / "r.csv", layout)
    as_strings = [{k: str(v) for k, v in row.items()} for row in rows]
    assert back == [as_strings[0], as_strings[1]]  # the repeated row has the same key: merged into the first


def test_a_row_the_layout_does_not_place_is_refused(tmp_path: Path) -> None:
    layout = common.Layout(config=("vocab",), metrics=("median_s",))
    row = provenance_row(benchmark="b", vocab=1, impl="fgm", median_s="0.5", notes="", speed="fast")
    with pytest.raises(ValueError, match=r"\['speed'\].*add them to the Layout"):
        common.append_rows([row], tmp_path / "r.csv", layout)
    with pytest.raises(ValueError, match="separates them"):
        layout.long_rows(provenance_row(benchmark="b", vocab="1; 2", impl="fgm", median_s="0.5", notes=""))


def test_a_file_of_another_layout_is_not_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "old.csv"
    path.write_text("date,vocab,median_s\n2026-11-01,1,0.5\n")
    row = provenance_row(benchmark="b", vocab=1, impl="fgm", median_s="0.5", notes="")
    with pytest.raises(SystemExit, match="expected"):
        common.append_rows([row], path, common.SHAPE_LAYOUT)
    assert path.read_text() == "date,vocab,median_s\n2026-11-01,1,0.5\n"
