"""python -m training quality-table: the README's quality table, written from the evaluation reports."""

import json
from pathlib import Path

import pytest

from MRISynthesisLib.errors import InputError
from training.cli import main as training_main
from training.quality_table import BEGIN, END, between_markers, load_report, render, replace_between_markers

REPO = Path(__file__).resolve().parents[2]
# The reports the README's table is written from, in its order (scripts/finalize_default_models.sh).
README_REPORTS = ("t1_t2_to_flair", "t1_to_flair", "t1_t2_t1c_to_flair")


def report(folder: Path, shipped: str, sharpness=None) -> Path:
    """An evaluation folder as `python -m training evaluate` writes it, two methods, 3 subjects."""
    summary = {
        shipped: {"psnr_masked": {"mean": 18.234, "std": 1.01, "n": 3}, "ssim_masked": {"mean": 0.5, "std": 0.05, "n": 3},
                  "lesion_conspicuity": {"mean": 0.97, "std": 0.2, "n": 2}},
        "linear(t1+t2)": {"psnr_masked": {"mean": 16.5, "std": 1.2, "n": 3}},
    }
    per_subject = {}
    if sharpness is not None:
        summary[shipped]["sharpness"] = {"mean": sharpness, "std": 0.05, "n": 3}
        per_subject = {s: {shipped: {"blanked_brain": v}} for s, v in zip("abc", (0.25, 3.125, 0.5))}
    metrics = {"per_subject": per_subject, "subjects_from": "test subjects of docs/split.json", "slices_per_subject": 0,
               "subjects": ["a", "b", "c"], "lesion_labels": {"a": "seg", "b": "seg"}, "summary": summary,
               "methods": [{"label": shipped, "kind": "model", "sources": ["t1", "t2"]},
                           {"label": "linear(t1+t2)", "kind": "linear", "sources": ["t1", "t2"]}]}
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_rows_figures_and_absent_figures(tmp_path):
    table = render([load_report(report(tmp_path / "t1_t2_to_flair", "t1_t2_to_flair", sharpness=0.912))])
    rows = [line for line in table.splitlines() if line.startswith("| T1+T2")]
    assert len(rows) == 2
    assert "**`t1_t2_to_flair`**" in rows[0] and "18.23 ± 1.01" in rows[0] and "0.912 ± 0.050" in rows[0]
    assert rows[0].endswith("| 3.12 |")  # blanked brain: the worst subject, not the mean
    assert "3 (2 with lesion labels)" in rows[0]
    assert "per-voxel linear fit" in rows[1] and "**" not in rows[1]
    assert "every brain slice" in table and "test subjects of docs/split.json" in table
    # A figure a report lacks shows as "-", and the table says why.
    assert "| - |" in rows[1] and "no such figure" in table
    assert "3 (2 with lesion labels) |" in rows[0]  # one kind of slices: not repeated per row


def test_rows_on_different_slices_say_which(tmp_path):
    folder = report(tmp_path / "t1_to_flair", "t1_to_flair")
    metrics = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({**metrics, "slices_per_subject": 80}))
    table = render([load_report(report(tmp_path / "t1_t2_to_flair", "t1_t2_to_flair")), load_report(folder)])
    rows = [line for line in table.splitlines() if line.startswith("| T1")]
    assert all("every brain slice" in row for row in rows[:2]) and all("the middle 80 brain slices" in row for row in rows[2:])
    assert "as each row says" in table


def test_a_report_must_evaluate_the_model_it_is_named_after(tmp_path):
    folder = report(tmp_path / "t1_to_flair", "t1_t2_to_flair")
    with pytest.raises(InputError, match="t1_to_flair"):
        render([load_report(folder)])
    with pytest.raises(InputError, match="no evaluation metrics"):
        load_report(tmp_path / "absent")


def test_readme_block_replaced_and_nothing_else(tmp_path):
    text = f"# Title\n\nbefore\n\n{BEGIN}\nold table\n{END}\n\nafter\n"
    new = replace_between_markers(text, "| new |")
    assert new == f"# Title\n\nbefore\n\n{BEGIN}\n| new |\n{END}\n\nafter\n"
    assert between_markers(new) == "| new |"
    with pytest.raises(InputError, match="markers"):
        replace_between_markers("no markers here", "| new |")
    with pytest.raises(InputError, match="markers"):
        replace_between_markers(text + BEGIN, "| new |")
    with pytest.raises(InputError, match="before its begin"):
        replace_between_markers(f"{END}\n{BEGIN}\n", "| new |")


def test_command_line_writes_the_readme(tmp_path, capsys):
    folder = report(tmp_path / "t1_t2_to_flair", "t1_t2_to_flair", sharpness=0.9)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\n{END}\nrest\n")
    assert training_main(["quality-table", str(folder), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\nrest\n") and "0.900 ± 0.050" in text
    # Without markers: a one-line error, and the file is left as it was.
    readme.write_text("no markers\n")
    assert training_main(["quality-table", str(folder), "--readme", str(readme)]) == 2
    assert "markers" in capsys.readouterr().err and readme.read_text() == "no markers\n"


def test_the_readme_table_is_the_one_the_committed_reports_give():
    """Regenerating an evaluation without the README's table fails here: run the command the
    README names (python -m training quality-table ... --readme README.md)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = between_markers(readme)
    assert shown is not None, "README.md lost its quality-table markers"
    expected = render([load_report(REPO / "docs" / "evaluation" / name) for name in README_REPORTS])
    assert shown == expected, "README.md's quality table is stale: run python -m training quality-table " \
        + " ".join(f"docs/evaluation/{n}" for n in README_REPORTS) + " --readme README.md"
