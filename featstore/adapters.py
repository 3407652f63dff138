"""Public dataset adapters built on torchxrayvision's own dataset classes.

torchxrayvision parses each dataset's metadata (and ships the NIH, PadChest, CheXpert
and RSNA label files); we turn its table into ingest rows. Rows whose image file is
not under the user's folder are counted and skipped (a partial download is normal).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from featstore.ingest import Row


@dataclass
class Adapter:
    name: str
    source: str
    cls: str                       # torchxrayvision.datasets class name
    path_of: Callable              # (dataset, csv row) -> path relative to imgpath
    needs_csv: bool = False        # True when torchxrayvision ships no metadata for it
    kwargs: dict | None = None


def _chex_path(ds, row):
    return row["Path"].replace("CheXpert-v1.0-small/", "").replace("CheXpert-v1.0/", "")


ADAPTERS: dict[str, Adapter] = {a.name: a for a in [
    Adapter("covid19", "cohen_ieee8023", "COVID19_Dataset", lambda ds, r: r["filename"], needs_csv=True,
            kwargs={"views": ["PA", "AP", "AP Supine", "AP semi erect", "AP erect"]}),
    Adapter("nih", "nih_cxr14", "NIH_Dataset", lambda ds, r: r["Image Index"],
            kwargs={"views": ["PA", "AP"], "unique_patients": False}),
    Adapter("padchest", "padchest", "PC_Dataset", lambda ds, r: r["ImageID"],
            kwargs={"views": ["PA", "AP", "AP Supine"], "unique_patients": False}),
    Adapter("chexpert", "chexpert", "CheX_Dataset", _chex_path,
            kwargs={"views": ["PA", "AP"], "unique_patients": False}),
    Adapter("rsna", "rsna_pneumonia", "RSNA_Pneumonia_Dataset",
            lambda ds, r: r["patientId"] + ds.extension, kwargs={"views": ["PA", "AP"], "unique_patients": False}),
]}


def _class_of(pathologies: list[str], labels: np.ndarray) -> str:
    pos = {p for p, v in zip(pathologies, labels) if v == 1 and p != "No Finding"}
    if any("COVID" in p for p in pos):
        return "covid"
    if any("Pneumonia" in p for p in pos):
        return "pneumonia"
    if not pos:
        return "normal"
    return "other"


def adapter_rows(name: str, imgpath: str | Path, csvpath: str | Path | None = None,
                 source: str | None = None, extension: str | None = None) -> tuple[list[Row], int]:
    """(rows, n_metadata_rows_without_a_file)."""
    import torchxrayvision as xrv

    if name not in ADAPTERS:
        raise ValueError(f"unknown dataset adapter '{name}' (known: {', '.join(ADAPTERS)})")
    a = ADAPTERS[name]
    imgpath = Path(imgpath)
    if not imgpath.is_dir():
        raise ValueError(f"image folder {imgpath} not found")
    kwargs = dict(a.kwargs or {})
    if csvpath is not None:
        kwargs["csvpath"] = str(csvpath)
    elif a.needs_csv:
        guess = imgpath.parent / "metadata.csv"
        if not guess.exists():
            raise ValueError(f"the {name} adapter needs the dataset's metadata.csv: pass --csvpath "
                             f"(looked for {guess})")
        kwargs["csvpath"] = str(guess)
    if extension and name == "rsna":
        kwargs["extension"] = extension
    ds = getattr(xrv.datasets, a.cls)(imgpath=str(imgpath), **kwargs)
    csv = ds.csv.reset_index(drop=True)
    origin = f"{name}:{imgpath.resolve()}"
    rows, missing = [], 0
    pathologies = list(ds.pathologies)
    for i, rec in enumerate(csv.to_dict("records")):
        rel = a.path_of(ds, rec)
        full = imgpath / rel
        if not full.exists():
            missing += 1
            continue
        lab = ds.labels[i]
        class_ = _class_of(pathologies, lab)
        sex = "M" if rec.get("sex_male") is True else "F" if rec.get("sex_female") is True else None
        age = rec.get("age_years")
        rows.append(Row(
            path=str(full.resolve()), display=str(rel), source=source or a.source,
            label="covid" if class_ == "covid" else "non_covid", origin=origin, row_number=i + 1,
            class_=class_, patient_id=None if rec.get("patientid") is None else str(rec.get("patientid")),
            view=None if rec.get("view") is None else str(rec.get("view")), sex=sex,
            age=float(age) if age is not None and np.isfinite(age) else None,
            extra={"findings": [p for p, v in zip(pathologies, lab) if v == 1]},
        ))
    return rows, missing

