"""Dataset adapters run torchxrayvision's own dataset classes over a tiny fake download."""
import numpy as np
import pytest
from PIL import Image

from featstore import ingest as I
from featstore.adapters import adapter_rows


def _img(path, v):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32), v, np.uint8)).save(path)


@pytest.mark.slow
def test_nih_uses_the_bundled_label_file(tmp_path, con):
    imgs = tmp_path / "nih" / "images"
    for i, name in enumerate(["00000001_000.png", "00000001_001.png", "00000002_000.png"]):
        _img(imgs / name, 10 + i)
    rows, missing = adapter_rows("nih", imgs)
    assert len(rows) == 3 and missing > 100_000  # the rest of ChestX-ray14 is not downloaded here
    by = {r.display: r for r in rows}
    r = by["00000001_000.png"]
    assert (r.source, r.label, r.class_, r.patient_id, r.view, r.sex, r.age) == \
        ("nih_cxr14", "non_covid", "other", "1", "PA", "M", 57.0)
    assert r.extra["findings"] == ["Cardiomegaly"]
    rep = I.ingest_rows(con, rows, "nih")
    assert rep.ok and rep.n_new_images == 3


def test_covid19_collection_from_its_metadata(tmp_path, con):
    root = tmp_path / "covid-chestxray-dataset"
    meta = root / "metadata.csv"
    root.mkdir()
    meta.write_text(
        "patientid,offset,sex,age,finding,RT_PCR_positive,survival,view,modality,filename\n"
        "1,0,M,65,Pneumonia/Viral/COVID-19,Y,,PA,X-ray,a.jpg\n"
        "2,0,F,40,Pneumonia/Bacterial/Streptococcus,,,AP,X-ray,b.jpg\n"
        "3,0,F,30,No Finding,,,PA,X-ray,c.jpg\n"
        "4,0,M,50,Pneumonia/Viral/COVID-19,Y,,L,X-ray,d.jpg\n")
    for i, n in enumerate("abcd"):
        _img(root / "images" / f"{n}.jpg", 50 + i)
    (tmp_path / "elsewhere" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="needs the dataset's metadata.csv"):
        adapter_rows("covid19", tmp_path / "elsewhere" / "images")
    rows, missing = adapter_rows("covid19", root / "images", meta)
    got = sorted((r.display, r.label, r.class_) for r in rows)
    # the lateral view (d.jpg) is dropped by torchxrayvision's view filter
    assert got == [("a.jpg", "covid", "covid"), ("b.jpg", "non_covid", "pneumonia"), ("c.jpg", "non_covid", "normal")]
    assert I.ingest_rows(con, rows, "covid19").ok


def test_unknown_adapter():
    with pytest.raises(ValueError, match="unknown dataset adapter"):
        adapter_rows("mimic", ".")
