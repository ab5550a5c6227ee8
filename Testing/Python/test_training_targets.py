"""python -m training targets: the T1+T2 model's quality targets on an evaluation."""

import json

from training.cli import main as training_main
from training.targets import check


def evaluation(new_sharpness, new_conspicuity, gains, slices=None):
    """metrics.json as evaluate writes it: 4 subjects, NEW's scale-free PSNR = OLD's + gains[0],
    = PIX2PIX's + gains[1]."""
    per_subject = {}
    for i in range(4):
        base = 17.0 + 0.3 * i
        jitter = 0.05 * (-1) ** i
        per_subject[f"s{i}"] = {
            "new": {"psnr_masked_scale_free": base + gains[0] + jitter, "sharpness": new_sharpness,
                    "lesion_conspicuity": new_conspicuity},
            "old": {"psnr_masked_scale_free": base},
            "pix": {"psnr_masked_scale_free": base + gains[0] - gains[1]},
        }
    summary = {"new": {"sharpness": {"mean": new_sharpness, "n": 4}, "lesion_conspicuity": {"mean": new_conspicuity, "n": 4}},
               "old": {}, "pix": {}}
    return {"summary": summary, "per_subject": per_subject, "slices_per_subject": slices,
            "subjects_from": "test subjects of docs/split.json"}


def test_targets_met_and_missed_with_margins():
    met = check(evaluation(0.95, 1.0, (2.5, 1.5)), "new", "old", "pix")
    assert [row[2] for row in met] == [True, True, True, True]
    missed = check(evaluation(0.66, 0.94, (0.76, 0.5)), "new", "old", "pix")
    assert [row[2] for row in missed] == [False, False, False, False]
    assert abs(missed[0][3] - (0.66 - 0.85)) < 1e-9 and abs(missed[2][3] - (0.76 - 2.0)) < 1e-9
    assert "n=4" in missed[2][1] and "p=" in missed[2][1]
    too_sharp = check(evaluation(1.2, 1.0, (2.5, 1.5)), "new", "old", "pix")
    assert not too_sharp[0][2] and abs(too_sharp[0][3] - (1.15 - 1.2)) < 1e-9


def test_targets_command_line(tmp_path, capsys):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(evaluation(0.95, 1.0, (2.5, 1.5))))
    assert training_main(["targets", str(path), "--model", "new", "--shipped", "old", "--baseline", "pix"]) == 0
    out = capsys.readouterr().out
    assert "test subjects of docs/split.json: 4 subjects" in out and out.count("| yes |") == 4
    path.write_text(json.dumps(evaluation(0.66, 1.0, (2.5, 1.5))))
    assert training_main(["targets", str(path), "--model", "new", "--shipped", "old", "--baseline", "pix"]) == 1
    assert training_main(["targets", str(path), "--model", "nope", "--shipped", "old", "--baseline", "pix"]) == 2
    assert "no method 'nope'" in capsys.readouterr().err
    path.write_text(json.dumps(evaluation(0.95, 1.0, (2.5, 1.5), slices=40)))
    assert training_main(["targets", str(path), "--model", "new", "--shipped", "old", "--baseline", "pix"]) == 2
    assert "--slices-per-subject 0" in capsys.readouterr().err


def test_median_scaled_sharpness_is_printed_beside_the_targets_and_decides_nothing(tmp_path, capsys):
    metrics = evaluation(0.83, 1.0, (2.5, 1.5))
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    assert training_main(["targets", str(path), "--model", "new", "--shipped", "old", "--baseline", "pix"]) == 1
    assert "median" not in capsys.readouterr().out  # an evaluation from before the figure
    metrics["summary"]["new"]["sharpness_median"] = {"mean": 0.88, "n": 4}
    path.write_text(json.dumps(metrics))
    # Inside the band, but the target is the percentile-scaled figure: still missed.
    assert training_main(["targets", str(path), "--model", "new", "--shipped", "old", "--baseline", "pix"]) == 1
    out = capsys.readouterr().out
    assert "| sharpness in [0.85, 1.15] | 0.830 (n=4) | **no** |" in out
    assert "not a target" in out and "0.880 (n=4; inside [0.85, 1.15])" in out
