"""``prepare`` on study folders with several DICOM series (real DICOM written with pydicom): one
series per study by the documented rule, the others listed as skipped with the reason;
``--all-series`` keeps them all."""

from __future__ import annotations

import datasets
import numpy as np
from pydicom.uid import generate_uid

from ctpa_vq.data.phantom import make_phantom
from ctpa_vq.data.prepare import prepare_dataset

from dicom_series import write_series

CORONAL = (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0]))


def _study(folder, mixed: bool) -> None:
    """A CTPA study: localizer, the thin axial CTPA series, a same-length 2 mm recon, a thick axial recon,
    a coronal series with more slices, a MIP; all in one folder (``mixed``) or one sub-folder each."""
    study = generate_uid()
    where = (lambda name: folder) if mixed else (lambda name: folder / name)
    series = [
        ("localizer", make_phantom((2, 20, 24), seed=1), dict(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))),
        ("ctpa", make_phantom((12, 20, 24), seed=2), dict(steps=np.full(11, 1.0), slice_thickness=1.0)),
        ("soft", make_phantom((12, 20, 24), seed=3), dict(steps=np.full(11, 2.0), slice_thickness=2.0)),
        ("thick", make_phantom((4, 20, 24), seed=4), dict(steps=np.full(3, 3.0), slice_thickness=3.0)),
        ("coronal", make_phantom((20, 12, 24), seed=5), dict(orientation=CORONAL, slice_thickness=1.0)),
        ("mip", make_phantom((6, 20, 24), seed=6), dict(image_type=("DERIVED", "SECONDARY", "MIP"))),
    ]
    for number, (name, hu, options) in enumerate(series, start=1):
        write_series(where(name), hu, study_uid=study, series_number=number, file_prefix=name, **options)


def test_one_series_per_study_by_the_rule_and_the_others_skipped_with_reasons(tmp_path):
    _study(tmp_path / "in" / "patient01", mixed=True)
    _study(tmp_path / "in" / "patient02", mixed=False)
    report = prepare_dataset(tmp_path / "in", tmp_path / "out", val_fraction=0.0, progress=False,
                             keep_identifiers=True)
    rows = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    assert rows["source"] == ["patient01#2", "patient02/ctpa"]  # the thin axial series of each study
    assert all(shape == [12, 20, 24] for shape in rows["shape"])
    np.testing.assert_allclose([s[0] for s in rows["spacing"]], [1.0, 1.0])

    reasons = {reason.split(": ")[0].split("in/")[-1]: reason for _, reason in report.skipped}  # by series name
    assert len(reasons) == 10
    for patient, number in (("patient01#", 3), ("patient02/soft", None)):
        key = f"{patient}{number}" if number else patient
        assert "another series of the study was chosen" in reasons[key]
        assert "12 axial slices of 1 mm) over this one (12 axial slices of 2 mm)" in reasons[key]
    assert "over this one (4 axial slices of 3 mm)" in reasons["patient02/thick"]
    assert "over this one (20 non-axial slices of 1 mm)" in reasons["patient02/coronal"]
    assert "localizer" in reasons["patient02/localizer"] and "derived" in reasons["patient02/mip"]
    assert "--all-series keeps every series" in reasons["patient02/thick"]


def test_all_series_keeps_every_ct_series(tmp_path):
    _study(tmp_path / "in" / "patient02", mixed=False)
    report = prepare_dataset(tmp_path / "in", tmp_path / "out", val_fraction=0.0, progress=False,
                             keep_identifiers=True, all_series=True)
    rows = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    assert rows["source"] == ["patient02/coronal", "patient02/ctpa", "patient02/soft", "patient02/thick"]
    assert len(report.skipped) == 2  # the localizer and the MIP are never volumes
