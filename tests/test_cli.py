"""The ``sksegcal`` command: subcommands on small arrays, error paths, and the quick demo."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import extract_store
from sksegcal.cli import main

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["demo", "extract", "fit", "evaluate", "report"]


def _error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error:" in lines[0]
    return lines[0]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: sksegcal {command}" in out


def test_top_level_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in out
    assert main(["--version"]) == 0
    assert "sksegcal" in capsys.readouterr().out
    assert main([]) == 2  # a subcommand is required: usage error


def test_extract_fit_evaluate_report(arrays, capsys):
    store = extract_store(arrays)
    assert "12 images, 3 classes" in capsys.readouterr().out
    # resumable: a second run writes nothing new
    assert extract_store(arrays) == store
    assert "0 written now" in capsys.readouterr().out

    ts = arrays / "ts.joblib"
    assert main(["fit", str(store), "--method", "temperature", "-o", str(ts), "-q"]) == 0
    assert "temperature = " in capsys.readouterr().out
    sel = arrays / "selective.joblib"
    assert (
        main(
            [
                "fit",
                str(store),
                "--method",
                "selective",
                "--t1",
                "1",
                "--t2",
                "auto",
                "2",
                "-o",
                str(sel),
                "-q",
            ]
        )
        == 0
    )
    assert "chosen = t2=" in capsys.readouterr().out

    results = arrays / "results"
    # joblib files are pickles: they load only with --trusted
    assert (
        main(
            [
                "evaluate",
                str(store),
                "-c",
                str(ts),
                "-c",
                str(sel),
                "-o",
                str(results),
                "-q",
                "--trusted",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for name in ("uncalibrated", "ts", "selective", "ECE", "mIoU"):
        assert name in out
    metrics = json.loads((results / "metrics.json").read_text())
    test = metrics["results"]["test"]
    assert set(test) == {"uncalibrated", "ts", "selective"}
    # temperatures never change the argmax
    assert test["ts"]["accuracy"] == pytest.approx(test["uncalibrated"]["accuracy"])
    assert test["selective"]["accuracy"] == pytest.approx(test["uncalibrated"]["accuracy"])
    assert test["ts"]["nll"] < test["uncalibrated"]["nll"]
    assert "ece" in (results / "metrics.csv").read_text().splitlines()[0]
    # the saved accumulators are pickle-free: a JSON index and an .npz of plain arrays
    assert not (results / "accumulators.joblib").exists()
    index = json.loads((results / "accumulators.json").read_text())
    assert index["format"] == "sksegcal.evaluate-results"
    with np.load(results / "accumulators.npz", allow_pickle=False) as arrays_npz:
        assert all(arrays_npz[k].dtype != object for k in arrays_npz.files)

    pytest.importorskip("matplotlib")
    assert main(["report", str(results), "-q"]) == 0
    assert (results / "reliability_test.png").stat().st_size > 10_000
    report = (results / "report.md").read_text()
    assert "![reliability diagrams](reliability_test.png)" in report
    assert "class 0" not in report  # the old tie artefact is gone, and so is its note
    # the report's numbers are the evaluation's (the accumulators round-trip exactly)
    again = json.loads((results / "metrics.json").read_text())["results"]
    assert again == metrics["results"]
    assert not list(results.glob(".tmp-*"))  # atomic writes leave no temporary files


def test_fit_without_options_is_the_python_default(arrays, capsys):
    """``sksegcal fit STORE`` fits what ``SelectiveScalingCalibrator(random_state=0)`` fits."""
    from sksegcal import SelectiveScalingCalibrator
    from sksegcal.persistence import load
    from sksegcal.store import LogitStore

    store = extract_store(arrays)
    assert main(["fit", str(store), "-o", str(arrays / "cal.skops"), "-q"]) == 0
    cal = load(arrays / "cal.skops")
    opened = LogitStore.open(store)
    split = opened.split
    ids = np.concatenate([split.train, split.validation])
    X, y, groups = opened.sample(400_000, images=ids, random_state=0)
    ref = SelectiveScalingCalibrator(random_state=0).fit(X, y, groups=groups)
    assert cal.get_params(deep=False).keys() == ref.get_params(deep=False).keys()
    assert repr(cal) == repr(ref)  # every parameter at its default
    assert (cal.t1_, cal.t2_) == (ref.t1_, ref.t2_)
    assert cal.guard_choice_ == ref.guard_choice_
    np.testing.assert_equal(cal.guard_scores_, ref.guard_scores_)
    np.testing.assert_array_equal(cal.predict_proba(X), ref.predict_proba(X))


def test_the_old_classifier_name_warns(arrays):
    store = extract_store(arrays)
    with pytest.warns(FutureWarning, match="--classifier logistic is --classifier default"):
        assert (
            main(
                [
                    "fit",
                    str(store),
                    "--classifier",
                    "logistic",
                    "--t2",
                    "2",
                    "-o",
                    str(arrays / "s.skops"),
                    "-q",
                ]
            )
            == 0
        )


def test_a_library_error_keeps_its_traceback(arrays, monkeypatch, capsys):
    """Only the command's own usage errors become one line; a bug elsewhere shows itself."""
    import sksegcal.store

    store = extract_store(arrays)
    assert (
        main(["fit", str(store), "--method", "temperature", "-o", str(arrays / "t.skops"), "-q"])
        == 0
    )

    def broken(*args, **kwargs):
        raise ValueError("a bug in the library")

    monkeypatch.setattr(sksegcal.store, "evaluate_store", broken)
    with pytest.raises(ValueError, match="a bug in the library"):
        main(
            ["evaluate", str(store), "-c", str(arrays / "t.skops"), "-q", "-o", str(arrays / "r")]
        )


def test_skops_calibrators_need_no_trust(arrays, capsys):
    pytest.importorskip("skops")
    from sksegcal.persistence import detect_format

    store = extract_store(arrays)
    ts = arrays / "ts.skops"
    sel = arrays / "sel.skops"
    assert main(["fit", str(store), "--method", "temperature", "-o", str(ts), "-q"]) == 0
    assert main(["fit", str(store), "--t2", "2", "-o", str(sel), "-q"]) == 0
    assert "(skops)" in capsys.readouterr().out
    assert detect_format(ts) == detect_format(sel) == "skops"
    results = arrays / "results"
    assert (
        main(["evaluate", str(store), "-c", str(ts), "-c", str(sel), "-o", str(results), "-q"])
        == 0
    )
    test = json.loads((results / "metrics.json").read_text())["results"]["test"]
    assert set(test) == {"uncalibrated", "ts", "sel"}


class _Exploit:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _malicious_pickle(path, marker):
    path.write_bytes(pickle.dumps(_Exploit(f"touch {marker}")))
    return path


def test_malicious_calibrator_is_not_loaded(arrays, capsys):
    store = extract_store(arrays)
    capsys.readouterr()
    marker = arrays / "PWNED"
    evil = _malicious_pickle(arrays / "ts.joblib", marker)
    assert (
        main(
            [
                "evaluate",
                str(store),
                "--images",
                "all",
                "-c",
                str(evil),
                "-o",
                str(arrays / "results"),
            ]
        )
        == 1
    )
    assert not marker.exists()
    line = _error_line(capsys)
    assert str(evil) in line and "--trusted" in line


def test_old_pickled_results_are_not_loaded(arrays, capsys):
    results = arrays / "old-results"
    results.mkdir()
    marker = arrays / "PWNED"
    _malicious_pickle(results / "accumulators.joblib", marker)
    assert main(["report", str(results)]) == 1
    assert not marker.exists()
    line = _error_line(capsys)
    assert "accumulators.joblib" in line and "--trusted" in line


def test_old_pickled_results_load_when_trusted(arrays, capsys):
    import joblib

    from sksegcal.metrics import CalibrationAccumulator

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=500)
    p = rng.dirichlet(np.ones(3), size=500)
    acc = CalibrationAccumulator(n_classes=3).update(y, p)
    results = arrays / "old-results"
    results.mkdir()
    joblib.dump(
        {"accumulators": {"test": {"uncalibrated": acc}}, "meta": {"dataset": "x"}},
        results / "accumulators.joblib",
    )
    assert main(["report", str(results), "--trusted", "-q"]) == 0
    assert "uncalibrated" in capsys.readouterr().out
    assert (results / "report.md").is_file()


def test_corrupt_results(arrays, capsys):
    results = arrays / "results"
    results.mkdir()
    (results / "accumulators.json").write_text('{"format": "something else"}')
    assert main(["report", str(results)]) == 1
    line = _error_line(capsys)
    assert "accumulators.json" in line and "not a readable 'sksegcal evaluate' result" in line
    (results / "accumulators.json").write_text(
        '{"format": "sksegcal.evaluate-results", "version": 1, "accumulators": []}'
    )
    assert main(["report", str(results)]) == 1
    assert "accumulators.npz" in _error_line(capsys)


def test_same_calibrator_stem_twice(arrays, capsys):
    store = extract_store(arrays)
    for folder in ("a", "b"):
        assert (
            main(
                [
                    "fit",
                    str(store),
                    "--method",
                    "temperature",
                    "-o",
                    str(arrays / folder / "ts.joblib"),
                    "-q",
                ]
            )
            == 0
        )
    capsys.readouterr()
    results = arrays / "results"
    assert (
        main(
            [
                "evaluate",
                str(store),
                "-c",
                str(arrays / "a" / "ts.joblib"),
                "-c",
                str(arrays / "b" / "ts.joblib"),
                "-o",
                str(results),
                "-q",
                "--trusted",
            ]
        )
        == 0
    )
    metrics = json.loads((results / "metrics.json").read_text())
    assert set(metrics["results"]["test"]) == {"uncalibrated", "a/ts", "b/ts"}
    assert metrics["calibrators"] == {
        "a/ts": str(arrays / "a" / "ts.joblib"),
        "b/ts": str(arrays / "b" / "ts.joblib"),
    }
    # the same file twice is refused
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(store),
                "-c",
                str(arrays / "a" / "ts.joblib"),
                "-c",
                str(arrays / "a" / ".." / "a" / "ts.joblib"),
                "--trusted",
            ]
        )
        == 1
    )
    assert "given twice" in _error_line(capsys)


def test_demo_threads_must_not_be_negative(tmp_path, capsys):
    assert main(["demo", "--threads", "-1", "-o", str(tmp_path / "r")]) == 2
    line = _error_line(capsys)
    assert "--threads" in line and "-1" in line
    assert not (tmp_path / "r").exists()
    # usage errors are one line too
    assert main(["demo", "--dataset", "imagenet"]) == 2
    assert "imagenet" in _error_line(capsys)


def test_outputs_are_checked_before_the_work(arrays, monkeypatch, capsys):
    import sksegcal.datasets
    import sksegcal.store

    def no_work(*args, **kwargs):
        raise AssertionError("the job ran before the output was checked")

    monkeypatch.setattr(sksegcal.datasets, "load_dataset", no_work)
    taken = arrays / "taken"
    taken.write_text("a file, not a folder")
    assert main(["demo", "--quick", "-o", str(taken), "-q"]) == 1
    line = _error_line(capsys)
    assert str(taken) in line and "not a folder" in line and "--output" in line

    store = extract_store(arrays)
    ts = arrays / "ts.joblib"
    assert main(["fit", str(store), "--method", "temperature", "-o", str(ts), "-q"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(sksegcal.store, "evaluate_store", no_work)
    monkeypatch.setattr(sksegcal.store, "fit_store", no_work)
    assert main(["evaluate", str(store), "-c", str(ts), "--trusted", "-o", str(taken)]) == 1
    assert str(taken) in _error_line(capsys)
    assert main(["fit", str(store), "--method", "temperature", "-o", str(arrays)]) == 1
    assert "is a folder" in _error_line(capsys)
    assert (
        main(["fit", str(store), "--method", "temperature", "-o", str(taken / "ts.joblib")]) == 1
    )
    assert f"{taken} exists and is not a folder" in _error_line(capsys)


def test_messages_name_the_file_and_the_problem(arrays, capsys):
    notes = arrays / "notes.txt"
    notes.write_text("some notes, not an array\n")
    assert (
        main(
            [
                "extract",
                "--logits",
                str(notes),
                "--labels",
                str(arrays / "labels.npy"),
                "--store",
                str(arrays / "s"),
            ]
        )
        == 1
    )
    line = _error_line(capsys)
    assert str(notes) in line and ".npy" in line and "(N, C, H, W)" in line
    assert "allow_pickle" not in line

    store = extract_store(arrays)
    capsys.readouterr()
    garbage = arrays / "garbage"
    garbage.write_text("not a calibrator\n")  # joblib.load said KeyError(110)
    assert main(["evaluate", str(store), "--images", "all", "-c", str(garbage)]) == 1
    line = _error_line(capsys)
    assert str(garbage) in line and "not a calibrator file" in line and "skops" in line
    assert "KeyError" not in line


# ----------------------------------------------------------------- error paths
def test_missing_store(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in _error_line(capsys)
    assert main(["fit", str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in _error_line(capsys)


def test_missing_input_files(tmp_path, capsys):
    assert (
        main(
            [
                "extract",
                "--logits",
                str(tmp_path / "x.npy"),
                "--labels",
                str(tmp_path / "y.npy"),
                "--store",
                str(tmp_path / "s"),
            ]
        )
        == 1
    )
    assert "x.npy does not exist" in _error_line(capsys)
    assert main(["report", str(tmp_path / "results")]) == 1
    assert "does not exist" in _error_line(capsys)


def test_missing_calibrator(arrays, capsys):
    store = extract_store(arrays)
    capsys.readouterr()
    assert (
        main(["evaluate", str(store), "--images", "all", "-c", str(arrays / "nope.joblib")]) == 1
    )
    assert "nope.joblib does not exist" in _error_line(capsys)


def test_corrupt_store(arrays, capsys):
    store = extract_store(arrays)
    capsys.readouterr()
    (store / "manifest.json").write_text("{not json")
    assert main(["fit", str(store), "-q"]) == 1
    assert "corrupt" in _error_line(capsys)
    assert main(["evaluate", str(store)]) == 1
    assert "corrupt" in _error_line(capsys)


def test_corrupt_calibrator(arrays, capsys):
    store = extract_store(arrays)
    capsys.readouterr()
    bad = arrays / "bad.joblib"
    bad.write_bytes(b"this is not a pickle")
    assert main(["evaluate", str(store), "--images", "all", "-c", str(bad)]) == 1
    assert "cannot load the calibrator" in _error_line(capsys)
    # a truncated pickle, trusted: still one line naming the file
    bad.write_bytes(pickle.dumps({"a": list(range(100))})[:40])
    assert main(["evaluate", str(store), "--images", "all", "-c", str(bad), "--trusted"]) == 1
    line = _error_line(capsys)
    assert "cannot load the calibrator" in line and str(bad) in line


def test_wrong_class_count(arrays, capsys):
    store = extract_store(arrays)
    ts = arrays / "ts.joblib"
    assert main(["fit", str(store), "--method", "temperature", "-o", str(ts), "-q"]) == 0
    # a store of 5 classes, evaluated with a 3-class calibrator
    rng = np.random.default_rng(1)
    np.save(arrays / "logits5.npy", rng.normal(size=(4, 5, 8, 8)).astype(np.float32))
    np.save(arrays / "labels5.npy", rng.integers(0, 5, size=(4, 8, 8)).astype(np.uint8))
    store5 = arrays / "store5"
    assert (
        main(
            [
                "extract",
                "--logits",
                str(arrays / "logits5.npy"),
                "--labels",
                str(arrays / "labels5.npy"),
                "--store",
                str(store5),
                "-q",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["evaluate", str(store5), "--images", "all", "-c", str(ts), "--trusted"]) == 1
    assert "3 classes" in _error_line(capsys)
    # fit --n-classes checks the store
    assert main(["fit", str(store5), "--n-classes", "3", "-q"]) == 1
    assert "5 classes, not 3" in _error_line(capsys)
    # writing 5-class logits into the 3-class store
    assert (
        main(
            [
                "extract",
                "--logits",
                str(arrays / "logits5.npy"),
                "--labels",
                str(arrays / "labels5.npy"),
                "--store",
                str(store),
                "-q",
            ]
        )
        == 1
    )
    assert "n_classes" in _error_line(capsys)


def test_bad_arguments(arrays, capsys):
    assert (
        main(["extract", "--logits", str(arrays / "logits.npy"), "--store", str(arrays / "s")])
        == 1
    )
    assert "--labels" in _error_line(capsys)
    np.save(arrays / "flat.npy", np.zeros((3, 4), np.float32))
    assert (
        main(
            [
                "extract",
                "--logits",
                str(arrays / "flat.npy"),
                "--labels",
                str(arrays / "labels.npy"),
                "--store",
                str(arrays / "s"),
            ]
        )
        == 1
    )
    assert "(N, C, H, W)" in _error_line(capsys)
    store = extract_store(arrays)
    capsys.readouterr()
    assert main(["fit", str(store), "--t2", "hot", "-q"]) == 1
    assert "--t2" in _error_line(capsys)
    assert main(["evaluate", str(store)]) == 1  # no split recorded yet: no test part
    assert "no recorded split" in _error_line(capsys)
    assert main(["demo", "--dataset", "imagenet"]) == 2  # argparse usage error


def test_aal_missing_is_a_clean_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SKSEGCAL_MRICRON_DIR", str(tmp_path))
    assert (
        main(
            [
                "demo",
                "--dataset",
                "aal",
                "--quick",
                "-o",
                str(tmp_path / "r"),
                "--cache-dir",
                str(tmp_path / "cache"),
                "-q",
            ]
        )
        == 1
    )
    assert "apt-get install mricron-data" in _error_line(capsys)


def test_no_traceback_in_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SKSEGCAL_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "sksegcal.cli", "evaluate", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("sksegcal evaluate: error:")


def test_console_script_installed():
    exe = shutil.which("sksegcal", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("sksegcal is not installed (pip install -e .)")
    proc = subprocess.run([exe, "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--quick" in proc.stdout


# ----------------------------------------------------------------- the demo
@pytest.mark.slow
@pytest.mark.integration
def test_demo_quick(tmp_path, capsys):
    pytest.importorskip("nilearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    args = [
        "demo",
        "--quick",
        "-o",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "-q",
        "--classifier",
        "hgb",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for text in (
        "uncalibrated",
        "temperature scaling",
        "selective scaling",
        "calibrator search",
        "CalibratorSearchCV",
        "ECE",
        "MCE",
        "NLL",
        "Brier",
        "accuracy",
        "mIoU",
        "shifted test",
    ):
        assert text in printed
    for name in (
        "metrics.json",
        "metrics.csv",
        "calibrator.joblib",
        "search.joblib",
        "report.md",
        "reliability_test.png",
        "reliability_shifted-test.png",
        "examples.png",
    ):
        assert (out / name).is_file(), name
    _check_report_explains_the_maps_and_where_selective_is_worse(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"test", "shifted-test"}
    for split in metrics["results"].values():
        # every method is scored with the network's own prediction: temperatures (t2 = 1e10
        # included, whose rows are uniform) never change accuracy or mIoU
        for method in ("temperature scaling", "selective scaling", "calibrator search"):
            for key in ("accuracy", "miou"):
                assert split[method][key] == pytest.approx(split["uncalibrated"][key])
    assert metrics["network"]["shipped"] and not metrics["network"]["cached"]
    assert "class 0" not in (out / "report.md").read_text()

    from sksegcal.persistence import load

    cal = load(out / "calibrator.joblib", trusted=True)
    assert cal.n_features_in_ == 3

    # second run: the same shipped network, the same numbers
    assert main(args + ["--keep-stores"]) == 0
    capsys.readouterr()
    again = json.loads((out / "metrics.json").read_text())
    assert again["network"]["shipped"]
    assert again["results"] == metrics["results"]

    # the kept store (split recorded) works with the other subcommands and the saved calibrator
    results = tmp_path / "results"
    assert (
        main(
            [
                "evaluate",
                str(out / "stores" / "calibration"),
                "-c",
                str(out / "calibrator.joblib"),
                "-o",
                str(results),
                "-q",
                "--trusted",
            ]
        )
        == 0
    )
    evaluated = json.loads((results / "metrics.json").read_text())["results"]["test"]
    assert evaluated["calibrator"]["ece"] == pytest.approx(
        metrics["results"]["test"]["selective scaling"]["ece"], rel=1e-6
    )

    # extract from the embedded dataset with the cached network
    store = tmp_path / "extracted"
    assert (
        main(
            [
                "extract",
                "--dataset",
                "mni152-tissue",
                "--quick",
                "--subset",
                "shifted",
                "--store",
                str(store),
                "--cache-dir",
                str(tmp_path / "cache"),
                "-q",
            ]
        )
        == 0
    )
    assert "3 classes" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.integration
def test_demo_retrain_trains_once_then_uses_the_cache(tmp_path, capsys):
    pytest.importorskip("nilearn")
    out = tmp_path / "report"
    args = [
        "demo",
        "--quick",
        "--retrain",
        "-o",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "-q",
        "--classifier",
        "logistic",
    ]
    assert main(args) == 0
    first = json.loads((out / "metrics.json").read_text())["network"]
    assert not first["shipped"] and not first["cached"] and first["train_seconds"] > 0
    capsys.readouterr()
    # a second run takes the cached network: asked of the demo's one network function (the
    # rest of the demo does not depend on where the network came from)
    from sksegcal.cli._demo import _demo_network, demo_data
    from sksegcal.cli._main import _build_parser

    parsed = _build_parser().parse_args(args)
    _, second = _demo_network(parsed, demo_data(parsed))
    assert second["cached"] and not second["shipped"]


def _check_report_explains_the_maps_and_where_selective_is_worse(out):
    report = (out / "report.md").read_text()
    assert (out / "examples.png").is_file()
    for text in (
        "**Errors**",
        "**Detector P(correct)**",
        "**Temperature**",
        "of the flagged pixels are errors of the network",
        "median T",
    ):
        assert text in report, text
    lower_is_better = {
        "ece": True,
        "mce": True,
        "nll": True,
        "brier": True,
        "accuracy": False,
        "miou": False,
    }
    headers = {
        "ece": "ECE",
        "mce": "MCE",
        "nll": "NLL",
        "brier": "Brier",
        "accuracy": "accuracy",
        "miou": "mIoU",
    }
    split_titles = {
        "test": "## test (in-domain)",
        "shifted-test": "## shifted test (acquisition shift)",
    }
    results = json.loads((out / "metrics.json").read_text())["results"]
    for split, methods in results.items():
        # the section of this split: from its heading to the next one
        section = report.split(split_titles[split], 1)[1].split("\n## ", 1)[0]
        sel, ts = methods["selective scaling"], methods["temperature scaling"]
        for key, lower in lower_is_better.items():
            diff = (sel[key] - ts[key]) if lower else (ts[key] - sel[key])
            para = f"Why selective scaling's {headers[key]} is worse"
            if diff > 1e-6 * max(1.0, abs(ts[key])):
                assert para in section, (split, key)
                if key == "mce":
                    assert "pixels" in section and "bin [" in section
            elif diff < 0:
                assert para not in section, (split, key)
