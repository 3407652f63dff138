"""SYNTHETIC multi-source chest-X-ray-like images with planted, documented source confounders.

Not real X-rays. They let the demo and the tests run anywhere, and they have a known
answer: each source has its own acquisition "fingerprint" (the confounders below) and
its own COVID prevalence, as real COVID collections do, while the disease itself is a
weak signal (faint bilateral peripheral opacities) shared by all sources.

Planted confounders, per source (switched off by confounders=False, when every source
uses the neutral setting):

| source       | covid share | contrast (gamma) | corner marker | border        | noise sd | field of view | file          |
|--------------|-------------|------------------|---------------|---------------|----------|---------------|---------------|
| synthetic-a  | 0.85        | 0.70             | top-left      | none          | 0.010    | 1.00          | PNG 8-bit     |
| synthetic-b  | 0.80        | 1.00             | top-right     | 10 px black   | 0.035    | 0.85 (wide)   | PNG 8-bit     |
| synthetic-c  | 0.10        | 1.45             | none          | none          | 0.020    | 1.15 (tight)  | PNG 16-bit    |
| synthetic-d  | 0.05        | 1.00             | bottom-left   | 6 px white    | 0.005    | 1.00          | JPEG q90      |
"""
from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SourceStyle:
    name: str
    covid_share: float
    gamma: float = 1.0
    marker: str | None = None      # top-left | top-right | bottom-left | None
    border: int = 0
    border_value: float = 0.0
    noise: float = 0.02
    fov: float = 1.0
    fmt: str = "png8"              # png8 | png16 | jpeg


SOURCES = (
    SourceStyle("synthetic-a", 0.85, gamma=0.70, marker="top-left", noise=0.010, fov=1.00, fmt="png8"),
    SourceStyle("synthetic-b", 0.80, gamma=1.00, marker="top-right", border=10, border_value=0.0, noise=0.035,
                fov=0.85, fmt="png8"),
    SourceStyle("synthetic-c", 0.10, gamma=1.45, noise=0.020, fov=1.15, fmt="png16"),
    SourceStyle("synthetic-d", 0.05, gamma=1.00, marker="bottom-left", border=6, border_value=0.95, noise=0.005,
                fov=1.00, fmt="jpeg"),
)
NEUTRAL = dict(gamma=1.0, marker=None, border=0, border_value=0.0, noise=0.02, fov=1.0)


def chest(rng: np.random.Generator, size: int, fov: float, disease: str, signal: float,
          return_lungs: bool = False):
    """One chest-like image in [0, 1]: body, two lungs, spine, ribs, optional opacities; with
    return_lungs, (image, the lungs' true mask) (the known answer of attribution tests)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    yy, xx = yy / fov, xx / fov
    img = np.full((size, size), 0.08, np.float32)
    body = ((xx / 0.46) ** 2 + (yy / 0.55) ** 2) < 1
    img[body] = 0.62 + rng.normal(0, 0.03)
    lw, lh = 0.15 * rng.uniform(0.9, 1.1), 0.30 * rng.uniform(0.9, 1.1)
    lungs = np.zeros_like(img, dtype=bool)
    for side in (-1, 1):
        cx = side * 0.19 * rng.uniform(0.95, 1.05)
        lungs |= (((xx - cx) / lw) ** 2 + ((yy + 0.02) / lh) ** 2) < 1
    img[lungs] = 0.22 + rng.normal(0, 0.02)
    ribs = 0.05 * (np.sin((yy * 38 + np.abs(xx) * 9) + rng.uniform(0, 6.28)) > 0.6)
    img += np.where(lungs, ribs, 0)
    img += np.where(np.abs(xx) < 0.035, 0.25, 0) * body
    heart = (((xx + 0.05) / 0.13) ** 2 + ((yy - 0.12) / 0.13) ** 2) < 1
    img[heart & body] = np.maximum(img[heart & body], 0.55)
    if disease == "covid":  # bilateral, peripheral, lower: ground-glass blobs
        for side in (-1, 1):
            for _ in range(rng.integers(2, 4)):
                cx, cy = side * rng.uniform(0.22, 0.30), rng.uniform(0.02, 0.22)
                img += signal * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.05 ** 2))) * lungs
    elif disease == "pneumonia":  # one-sided lobar consolidation
        side = rng.choice([-1, 1])
        cx, cy = side * 0.19, rng.uniform(-0.1, 0.15)
        img += 1.5 * signal * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.07 ** 2))) * lungs
    return (np.clip(img, 0, 1), lungs) if return_lungs else np.clip(img, 0, 1)


def acquire(img: np.ndarray, st: SourceStyle, rng: np.random.Generator) -> np.ndarray:
    """Apply a source's acquisition fingerprint."""
    size = img.shape[0]
    out = np.clip(img, 0, 1) ** st.gamma
    out = out + rng.normal(0, st.noise, out.shape).astype(np.float32)
    if st.border:
        b = st.border
        out[:b, :] = out[-b:, :] = st.border_value
        out[:, :b] = out[:, -b:] = st.border_value
    m = max(4, size // 24)
    if st.marker == "top-left":
        out[4:4 + m, 4:4 + m] = 1.0
    elif st.marker == "top-right":
        out[4:4 + m, -4 - m:-4] = 1.0  # drawn over the border, as burnt-in labels are
    elif st.marker == "bottom-left":
        out[-4 - m:-4, 4:4 + 2 * m] = 0.9
    return np.clip(out, 0, 1)


def _encode(img: np.ndarray, fmt: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if fmt == "png16":
        Image.fromarray((img * 65535).round().astype(np.uint16)).save(buf, format="PNG")
        return buf.getvalue(), ".png"
    im = Image.fromarray((img * 255).round().astype(np.uint8))
    if fmt == "jpeg":
        im.save(buf, format="JPEG", quality=90)
        return buf.getvalue(), ".jpg"
    im.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def generate(out: str | Path, n_per_source: int = 120, size: int = 256, seed: int = 0, confounders: bool = True,
             signal: float = 0.10, plant_bad: bool = False, plant_duplicates: int = 0,
             sources: tuple[SourceStyle, ...] = SOURCES) -> Path:
    """Write images under out/images/<source>/ and out/manifest.csv; return the manifest path.

    plant_bad adds the bad inputs ingest must record (truncated, empty, not an image,
    missing file, empty and unknown label, duplicate row). plant_duplicates copies that many
    files of the first source byte-for-byte into the second, one of them relabelled.
    """
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    rows = []
    for s_idx, st in enumerate(sources):
        if not confounders:
            st = SourceStyle(st.name, st.covid_share, fmt="png8", **NEUTRAL)
        rng = np.random.default_rng([seed, s_idx])
        folder = out / "images" / st.name
        folder.mkdir(parents=True)
        n_covid = int(round(n_per_source * st.covid_share))
        labels = ["covid"] * n_covid + ["non_covid"] * (n_per_source - n_covid)
        rng.shuffle(labels)
        patient = 0
        i = 0
        while i < len(labels):
            patient += 1
            pid = f"{st.name}-p{patient:04d}"
            sex, age = rng.choice(["M", "F"]), int(rng.integers(20, 85))
            # some patients have two images, same label (a follow-up)
            n_img = 2 if rng.random() < 0.2 and i + 1 < len(labels) and labels[i + 1] == labels[i] else 1
            for _ in range(n_img):
                lab = labels[i]
                class_ = "covid" if lab == "covid" else ("pneumonia" if rng.random() < 0.4 else "normal")
                img = acquire(chest(rng, size, st.fov, class_, signal), st, rng)
                data, ext = _encode(img, st.fmt)
                rel = f"images/{st.name}/{st.name}-{i:05d}{ext}"
                (out / rel).write_bytes(data)
                rows.append(dict(path=rel, source=st.name, label=lab, class3=class_, patient_id=pid, view="PA",
                                 sex=sex, age=age, synthetic="true"))
                i += 1
    if plant_duplicates and len(sources) > 1:
        a = [r for r in rows if r["source"] == sources[0].name][:plant_duplicates]
        for k, r in enumerate(a):
            rel = f"images/{sources[1].name}/copied-from-a-{k}{Path(r['path']).suffix}"
            shutil.copyfile(out / r["path"], out / rel)
            lab = r["label"] if k else ("non_covid" if r["label"] == "covid" else "covid")  # one conflict
            rows.append({**r, "path": rel, "source": sources[1].name, "label": lab,
                         "patient_id": f"{sources[1].name}-copy{k}"})
    if plant_bad:
        bad = out / "images" / "synthetic-bad"
        bad.mkdir(parents=True)
        good = (out / rows[0]["path"]).read_bytes()
        (bad / "truncated.png").write_bytes(good[: len(good) // 3])
        (bad / "empty.png").write_bytes(b"")
        (bad / "notes.png").write_text("this is a text file, not an image\n")
        base = dict(source="synthetic-bad", class3="", patient_id="", view="PA", sex="", age="", synthetic="true")
        rows += [
            {**base, "path": "images/synthetic-bad/truncated.png", "label": "covid"},
            {**base, "path": "images/synthetic-bad/empty.png", "label": "covid"},
            {**base, "path": "images/synthetic-bad/notes.png", "label": "non_covid"},
            {**base, "path": "images/synthetic-bad/missing.png", "label": "non_covid"},
            {**rows[1], "label": ""},                      # empty label
            {**rows[2], "label": "maybe"},                 # unknown label
            dict(rows[3]),                                 # duplicate manifest row
        ]
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return manifest


def oof_scores(prevalence, n_per_source=150, *, signal: float = 0.0, shift: float = 0.0, shortcut: float = 0.0,
               patient_sd: float = 0.5, images_per_patient: int = 3, seed: int = 0, names=None) -> dict:
    """SIMULATED out-of-fold scores of a model over several sources, with a known answer: what the verdict
    must say without fitting anything. Per source s (positive share `prevalence[s]`, `n_per_source` images,
    a scalar or one per source), patients of 1..`images_per_patient` images with one label each and a
    shared random effect (sd `patient_sd`); an image's score is

        signal * y  +  shift * z_s  +  shortcut * (prevalence[s] - mean prevalence) * 4  +  patient  +  N(0, 1)

    z_s ~ N(0, 1) independent of the label (an acquisition shift: the source moves the score, not the
    disease); the shortcut term scores the source by its positive rate (what a model that recognises the
    source learns). Returns dict(y, score, source, patient) as numpy arrays (patient: integer ids, unique
    over sources)."""
    rng = np.random.default_rng(seed)
    prevalence = np.asarray(prevalence, dtype=float)
    K = len(prevalence)
    ns = np.broadcast_to(np.asarray(n_per_source), (K,))
    names = names or [f"src{k}" for k in range(K)]
    z = rng.normal(0, 1, K)
    ys, ss, srcs, pats = [], [], [], []
    for k in range(K):
        n = int(ns[k])
        sizes = rng.integers(1, images_per_patient + 1, n)  # more patients than needed, cut at n images
        cut = int(np.searchsorted(np.cumsum(sizes), n)) + 1
        sizes = sizes[:cut]
        sizes[-1] -= int(sizes.sum()) - n
        lab = (rng.random(cut) < prevalence[k]).astype(int)
        u = rng.normal(0, patient_sd, cut)
        y = np.repeat(lab, sizes)
        ys.append(y)
        ss.append(signal * y + shift * z[k] + shortcut * (prevalence[k] - prevalence.mean()) * 4
                  + np.repeat(u, sizes) + rng.normal(size=n))
        srcs.append(np.full(n, names[k], dtype=object))
        pats.append(len(np.concatenate(pats)) + np.repeat(np.arange(cut), sizes) if pats else
                    np.repeat(np.arange(cut), sizes))  # ids unique over sources
    return dict(y=np.concatenate(ys), score=np.concatenate(ss), source=np.concatenate(srcs),
                patient=np.concatenate(pats))
