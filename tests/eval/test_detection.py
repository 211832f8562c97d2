"""The detection evaluation harness and ``diffmem eval detection``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from diffmem.cli import main
from diffmem.eval.detection import detection_metrics, evaluate_detection, labelled_testbed_prompts
from diffmem.eval.metrics import roc_auc_score
from diffmem.runtime.errors import PromptError

LABELLED = [("the narwhal zanzibar poster", "verbatim"), ("memories of quasar walrus", "template"),
            ("a cat sleeping", "heldout"), ("a purple triangle on teal", "heldout"),
            ("pencil sketch of a dragon", "heldout")]


@pytest.fixture
def labelled(tmp_path):
    f = tmp_path / "labelled.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "kind": k}) + "\n" for p, k in LABELLED),
                 encoding="utf-8")
    return f


def test_evaluate_detection_writes_report_roc_and_scores(tiny_dir, labelled, tmp_path):
    out = tmp_path / "rep" / "report.json"
    report = evaluate_detection("noise_magnitude", model=tiny_dir, prompts=labelled, out=out,
                                steps=2, generations=2, num_inference_steps=4)
    saved = json.loads(out.read_text())
    for key in ("auc", "tpr_at_1pct_fpr", "tpr_at_3pct_fpr", "n_positive", "n_negative"):
        assert saved[key] == report[key]
    assert (saved["n_positive"], saved["n_negative"]) == (2, 3)
    png = tmp_path / "rep" / "report_roc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "rep" / "report_scores.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == [p for p, _ in LABELLED]
    y = [r["memorized"] == "True" for r in rows]
    assert report["auc"] == pytest.approx(roc_auc_score(y, [float(r["score"]) for r in rows]))


def test_cli_eval_detection(tiny_dir, labelled, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["eval", "detection", "--detector", "attention_entropy", "--steps", "all",
               "--generations", "1", "--sampling-steps", "3", "--model", str(tiny_dir),
               "--prompts", str(labelled), "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["steps"] == "all" and 0 <= report["auc"] <= 1
    assert (tmp_path / "report_roc.png").is_file()


def test_cli_one_class_labels_is_one_clear_error(tiny_dir, tmp_path, capsys):
    f = tmp_path / "all_mem.jsonl"
    f.write_text('{"prompt": "a", "memorized": true}\n{"prompt": "b", "memorized": true}\n',
                 encoding="utf-8")
    rc = main(["eval", "detection", "--model", str(tiny_dir), "--prompts", str(f),
               "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "all 2 labelled prompts are memorized" in err
    assert not (tmp_path / "r.json").exists()


def test_detection_metrics_one_class_raises():
    with pytest.raises(PromptError, match="non-memorized"):
        detection_metrics([False, False], [0.1, 0.2])
    m = detection_metrics([True, False, False], np.array([3.0, 1.0, 2.0]))
    rule = m.pop("tpr_at_fpr_rule")
    assert "FPR <= f" in rule and "FPR < f" in rule  # the report says which reading
    assert m == {"auc": 1.0, "tpr_at_1pct_fpr": 1.0, "tpr_at_3pct_fpr": 1.0,
                 "tpr_at_1pct_fpr_strict": 1.0, "tpr_at_3pct_fpr_strict": 1.0,
                 "n_positive": 1, "n_negative": 2}


def test_roc_plot_marks_the_operating_point(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from diffmem.eval.detection import plot_roc

    marked = []
    real_plot = Axes.plot

    def spy(self, *args, **kwargs):
        marked.append((args, kwargs))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    y = [0] * 100 + [1, 1]
    s = [*range(100), 98.5, 50.5]
    path = plot_roc(y, s, tmp_path / "roc.png")
    assert path.is_file() and path.stat().st_size > 1000
    points = [(a, k) for a, k in marked
              if isinstance(a[0], list) and a[0] == [0.01] and a[1] == [0.5]]
    assert len(points) == 1 and "threshold 98.5" in points[0][1]["label"]


def test_testbed_labels_follow_kinds():
    prompts, labels, kinds = labelled_testbed_prompts(None)
    assert len(prompts) == len(labels) == len(kinds) > 0
    assert all(lab == (k in ("verbatim", "template")) for lab, k in zip(labels, kinds,
                                                                          strict=True))
    assert 0 < sum(labels) < len(labels)


GROUPED = [("the narwhal zanzibar poster", "caption", "dev", True),
           ("narwhal zanzibar in a long sentence about a quiet room", "sentence", "dev", True),
           ("zanzibar in a long sentence about a busy street", "sentence", "test", False),
           ("the poster", "frame", "test", True),
           ("a cat sleeping", "clean", "dev", False),
           ("a purple triangle on teal", "clean", "test", False),
           ("pencil sketch of a dragon", "clean", "dev", False)]


def test_per_group_and_split_report(tiny_dir, tmp_path):
    f = tmp_path / "broad.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "group": g, "split": s, "memorized": m})
                         + "\n" for p, g, s, m in GROUPED), encoding="utf-8")
    out = tmp_path / "r.json"
    report = evaluate_detection("noise_magnitude", model=tiny_dir, prompts=f, out=out,
                                num_inference_steps=3, fpr=0.01)
    with open(tmp_path / "r_scores.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    scores = np.array([float(r["score"]) for r in rows])
    y = np.array([m for *_, m in GROUPED])
    groups = np.array([g for _, g, _, _ in GROUPED])
    # threshold: the clean controls' highest score (3 prompts < 1/fpr), the sentence negative
    # is not a calibration prompt
    assert report["threshold"] == pytest.approx(scores[groups == "clean"].max())
    assert report["n_calibration"] == 3
    assert set(report["groups"]) == {"caption", "sentence", "frame", "clean"}
    sent = report["groups"]["sentence"]
    assert (sent["n"], sent["n_copying"], sent["n_clean"]) == (2, 1, 1)
    rows_s = (groups == "sentence") & y | ~y  # the group's copying prompts vs ALL clean prompts
    assert sent["auc"] == pytest.approx(roc_auc_score(y[rows_s], scores[rows_s]))
    assert sent["tpr_at_threshold"] == float(scores[1] > report["threshold"])
    assert sent["fpr_at_threshold"] == float(scores[2] > report["threshold"])
    assert "auc" not in report["groups"]["clean"]  # no copying prompt there
    assert report["groups"]["clean"]["fpr_at_threshold"] == 0.0
    assert set(report["splits"]) == {"dev", "test"}
    assert report["unet_rows_per_prompt"] == 2.0  # one cond + uncond call at the first step
    only = evaluate_detection("noise_magnitude", model=tiny_dir, prompts=f, split="test",
                              num_inference_steps=3)
    assert only["n_positive"] + only["n_negative"] == 3
    with pytest.raises(PromptError, match="no prompts of split"):
        evaluate_detection("noise_magnitude", model=tiny_dir, prompts=f, split="val")


def test_per_duplicate_count_rows(tiny_dir, tmp_path):
    """Labels that carry ``duplicates`` (the graded testbed's) get per-count rows, computed as the
    groups' (a count's copying prompts against ALL clean prompts); others get none."""
    dups = [16, 16, 4, 16, 0, 0, 0]
    f = tmp_path / "graded.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "group": g, "split": s, "memorized": m,
                                     "duplicates": d}) + "\n"
                         for (p, g, s, m), d in zip(GROUPED, dups, strict=True)), encoding="utf-8")
    report = evaluate_detection("noise_magnitude", model=tiny_dir, prompts=f,
                                out=tmp_path / "r.json", num_inference_steps=3)
    assert list(report["duplicates"]) == ["0", "4", "16"]
    sixteen, four = report["duplicates"]["16"], report["duplicates"]["4"]
    assert (sixteen["n"], sixteen["n_copying"], sixteen["n_clean"]) == (3, 3, 0)
    assert (four["n"], four["n_copying"], four["n_clean"]) == (1, 0, 1)
    with open(tmp_path / "r_scores.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    scores = np.array([float(r["score"]) for r in rows])
    assert [int(r["duplicates"]) for r in rows] == dups
    flagged = scores[[0, 1, 3]] > report["threshold"]
    assert sixteen["tpr_at_threshold"] == pytest.approx(flagged.mean())
    test_only = evaluate_detection("noise_magnitude", model=tiny_dir, prompts=f, split="test",
                                   num_inference_steps=3)
    assert {k: v["n"] for k, v in test_only["duplicates"].items()} == {"0": 1, "4": 1, "16": 1}
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": p, "group": g, "split": s, "memorized": m})
                             + "\n" for p, g, s, m in GROUPED), encoding="utf-8")
    assert "duplicates" not in evaluate_detection("noise_magnitude", model=tiny_dir,
                                                  prompts=plain, num_inference_steps=3)


def test_graded_model_default_labels_report_per_count(graded_model, tmp_path, capsys):
    """Once the graded testbed's labels are installed beside its weights, ``eval detection
    --model testbed-graded`` reads them by default and reports per duplicate count, and
    ``eval dose`` reads the same file (labels here: synthetic, copies growing with the count)."""
    from diffmem.testbed.broad import broad_prompts
    from diffmem.testbed.install import install_labels, labels_path
    from diffmem.testbed.locate import testbed_spec_of

    prompts = broad_prompts(testbed_spec_of(graded_model))
    rows = []
    for i, p in enumerate(prompts):
        copies = 0 if p.duplicates == 0 else min(4, p.duplicates // 4 + i % 2)
        rows.append({**p.to_dict(), "memorized": copies > 0, "copies": copies, "seeds": 4})
    labels = labels_path("testbed-graded")
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    install_labels("testbed-graded", labels)
    out = tmp_path / "det.json"
    assert main(["eval", "detection", "--model", "testbed-graded", "--detector", "noise_magnitude",
                 "--sampling-steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["prompts"] == str(labels.resolve()) and report["n_positive"] > 0
    assert list(report["duplicates"]) == ["0", "1", "4", "16"]
    assert all("tpr_at_threshold" in report["duplicates"][k] for k in ("4", "16"))
    dose = tmp_path / "dose.json"
    assert main(["eval", "dose", "--labels", str(labels), "--out", str(dose)]) == 0
    counts = json.loads(dose.read_text())["methods"]["broad_labels"]["counts"]
    rates = [r["copy_rate"] for r in counts]
    assert [r["duplicates"] for r in counts] == [1, 4, 16] and rates == sorted(rates)
