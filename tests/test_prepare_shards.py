"""``prepare`` at scale: shards written as it goes, a SIGKILLed run resumed, worker processes, ``--shard``
parts combined, ``accelerate launch``: each must give exactly the rows of one uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import nibabel as nib
import numpy as np
import pytest

from ctpa_vq.data.phantom import write_phantom_dir, write_phantom_nifti
from ctpa_vq.data.prepare import prepare_dataset
from ctpa_vq.data.privacy import KEY_FILE_ENV, PseudonymKey

SHAPE = (12, 16, 20)
PATIENTS = 9
ACCELERATE_CPU = Path(__file__).resolve().parents[1] / "accelerate_configs" / "cpu.yaml"


def _rows(path: Path) -> dict[str, list[dict]]:
    loaded = datasets.load_from_disk(str(path))
    return {split: loaded[split].to_list() for split in loaded}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ctpa_vq.cli", "prepare", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    """One pseudonymisation key for every run of the module (module fixtures run before conftest's)."""
    path = tmp_path_factory.mktemp("key") / "pseudonym.key"
    PseudonymKey.load(path)
    return path


@pytest.fixture(autouse=True)
def _use_the_key(key_file, monkeypatch):
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Nine patients (one with two scans in its own folder) and a broken file."""
    root = tmp_path_factory.mktemp("shards") / "in"
    write_phantom_dir(root, PATIENTS - 1, SHAPE)
    write_phantom_nifti(root / "zpatient" / "a.nii.gz", SHAPE, seed=50)
    write_phantom_nifti(root / "zpatient" / "b.nii.gz", SHAPE, seed=51)
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), root / "flat.nii.gz")
    return root


@pytest.fixture(scope="module")
def reference(inputs, key_file, tmp_path_factory) -> Path:
    """One uninterrupted run, one process."""
    output = tmp_path_factory.mktemp("reference") / "out"
    prepare_dataset(inputs, output, val_fraction=0.3, progress=False, patients_per_shard=2,
                    key=PseudonymKey.load(key_file))
    return output


def test_shards_report_and_the_dataset_train_reads(inputs, reference):
    rows = _rows(reference)
    assert sum(len(r) for r in rows.values()) == PATIENTS + 1
    shards = sorted(p.name for p in (reference / "shards").iterdir())
    assert shards == [f"shard-{k:06d}.json" for k in range(5)]  # 10 entries (9 patients + flat) in 2s
    report = json.loads((reference / "prepare_report.json").read_text())
    assert report["prepared"]["volumes"] == PATIENTS + 1
    assert report["prepared"]["volumes_per_split"] == {split: len(rows.get(split, [])) for split in
                                                       ("train", "validation")}
    assert report["skipped"]["count"] == 1 and report["skipped"]["by_reason"] == {"unreadable or not a regular grid": 1}
    assert "2D" in report["skipped"]["volumes"][0]["problem"]
    text = b"".join(p.read_bytes() for p in reference.rglob("*.json"))
    assert b"flat" not in text and str(inputs).encode() not in text  # pseudonyms, never a path


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_to_the_same_dataset(inputs, reference, tmp_path):
    """A real `ctpa-vq prepare` is SIGKILLed while it waits on a file that never comes (a FIFO in
    zpatient's folder, listed after 4 finished shards); re-run on the real file, it equals the reference."""
    staged = tmp_path / "in"
    subprocess.run(["cp", "-r", str(inputs), str(staged)], check=True)
    real = (staged / "zpatient" / "b.nii.gz").read_bytes()
    (staged / "zpatient" / "b.nii.gz").unlink()
    os.mkfifo(staged / "zpatient" / "b.dcm")  # reading its DICOM preamble blocks
    output = tmp_path / "out"
    run = subprocess.Popen(_cli("--input", str(staged), "--output", str(output), "--val-fraction", "0.3",
                                "--patients-per-shard", "2", "--no-progress"), env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(list((output / "shards").glob("shard-*.json"))) < 4 and time.monotonic() < deadline:
            assert run.poll() is None, run.communicate()
            time.sleep(0.05)
        time.sleep(0.3)
        assert run.poll() is None  # stuck on the FIFO, mid-way
        os.kill(run.pid, signal.SIGKILL)
    finally:
        run.kill()
        run.wait()
    assert not (output / "dataset_dict.json").exists()
    assert len(list((output / "shards").glob("shard-*.json"))) == 4
    (output / "train").mkdir(exist_ok=True)
    (output / "train" / ".shard-000004.arrow.k1ll3d.arrow").write_bytes(b"half a shard")  # a killed write

    (staged / "zpatient" / "b.dcm").unlink()
    (staged / "zpatient" / "b.nii.gz").write_bytes(real)
    resumed = subprocess.run(_cli("--input", str(staged), "--output", str(output), "--val-fraction", "0.3",
                                  "--patients-per-shard", "2", "--no-progress"), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "4 shard(s) were already done" in resumed.stdout
    assert _rows(output) == _rows(reference)
    assert not [p for p in output.rglob(".*")]  # no temporary file left


def test_worker_processes_give_the_same_dataset(inputs, reference, tmp_path):
    prepare_dataset(inputs, tmp_path / "out", val_fraction=0.3, progress=False, patients_per_shard=2, num_proc=2)
    assert _rows(tmp_path / "out") == _rows(reference)


def test_shard_parts_combine_to_the_same_dataset(inputs, reference, tmp_path, capsys):
    from ctpa_vq.cli import main

    for part in ("0/2", "1/2"):
        assert main(["prepare", "--input", str(inputs), "--output", str(tmp_path / f"part{part[0]}"),
                     "--val-fraction", "0.3", "--patients-per-shard", "2", "--shard", part, "--no-progress"]) == 0
    assert "combine the parts" in capsys.readouterr().out
    assert not (tmp_path / "part0" / "dataset_dict.json").exists()
    assert main(["prepare", "--combine", str(tmp_path / "part1"), "--output", str(tmp_path / "joined")]) == 2
    assert "not finished in any part (shard-000000" in capsys.readouterr().err
    assert main(["prepare", "--combine", str(tmp_path / "part0"), str(tmp_path / "part1"),
                 "--output", str(tmp_path / "joined")]) == 0
    assert f"used {PATIENTS + 1} volume(s)" in capsys.readouterr().out
    assert _rows(tmp_path / "joined") == _rows(reference)
    assert json.loads((tmp_path / "joined" / "prepare_report.json").read_text())["skipped"]["count"] == 1


def test_other_settings_into_an_unfinished_output_are_refused(inputs, tmp_path):
    prepare_dataset(inputs, tmp_path / "out", val_fraction=0.3, progress=False, patients_per_shard=2, shard=(0, 2))
    with pytest.raises(ValueError, match="other inputs or settings \\(differs in val_fraction\\)"):
        prepare_dataset(inputs, tmp_path / "out", val_fraction=0.2, progress=False, patients_per_shard=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_splits_the_shards(inputs, reference, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CPU),
               "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "ctpa_vq.cli", "prepare",
               "--input", str(inputs), "--output", str(tmp_path / "out"), "--val-fraction", "0.3",
               "--patients-per-shard", "2", "--no-progress"]
    run = subprocess.run(command, env={**_env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("used ") == 1  # rank 0 reports
    assert _rows(tmp_path / "out") == _rows(reference)


def test_one_progress_bar_counts_every_worker(inputs, tmp_path, capsys):
    from ctpa_vq.cli import main

    assert main(["prepare", "--input", str(inputs), "--output", str(tmp_path / "out"), "--val-fraction", "0.3",
                 "--patients-per-shard", "2", "--num-proc", "2"]) == 0
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "prepare: 100%" in bar and "10/10" in bar  # patients (with an ETA while running)
    assert f"{PATIENTS + 1} volumes, " in bar and " GB" in bar
