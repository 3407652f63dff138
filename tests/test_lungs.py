import numpy as np
import pytest

from featstore.lungs import VARIANTS, MaskError, check, classical_mask
from featstore.preprocess import PREPROCESSINGS


@pytest.fixture(scope="module")
def chest():
    from featstore.synth import chest as draw

    return draw(np.random.default_rng(0), 256, 1.0, "normal", 0.1)


def test_mask_finds_two_dark_lungs_inside_the_body(chest):
    m = classical_mask(chest)
    assert 0.05 < m.fraction < 0.45 and m.method == "classical-v1"
    assert chest[m.mask].mean() < chest[~m.mask].mean() - 0.1  # the lungs are the dark fields
    t, b, l, r = m.bbox
    assert l < 128 < r  # both sides of the midline
    from scipy import ndimage

    assert ndimage.label(m.mask)[1] == 2


def test_variants_hide_and_seek(chest):
    m = classical_mask(chest)
    t, b, l, r = m.bbox
    iso, rem = VARIANTS["lungs-isolated"](chest, m.mask), VARIANTS["lungs-removed"](chest, m.mask)
    assert (iso[~m.mask] == 0).all() and np.allclose(iso[m.mask], chest[m.mask])
    assert (rem[m.mask] == 0).all() and np.allclose(rem[~m.mask], chest[~m.mask])
    fr, bo = VARIANTS["lungs-framed"](chest, m.mask), VARIANTS["lungs-boxed-out"](chest, m.mask)
    assert (bo[t:b, l:r] == 0).all() and np.allclose(fr[t:b, l:r], chest[t:b, l:r]) and fr[:t].sum() == 0
    assert VARIANTS["lung-crop"](chest, m.mask).shape == (b - t, r - l)
    # a mask made at another resolution is fitted onto the image
    big = np.kron(chest, np.ones((2, 2), np.float32))
    assert VARIANTS["lung-crop"](big, m.mask).shape == (2 * (b - t), 2 * (r - l))
    assert set(VARIANTS) <= set(PREPROCESSINGS)


def _blob(side):
    x = np.full((256, 256), 0.8, np.float32)
    x[128 - side // 2:128 + side // 2, 128 - side // 2:128 + side // 2] = 0.2
    return x


@pytest.mark.parametrize("img, reason", [
    (np.full((200, 200), 0.7, np.float32), "empty mask"),
    (_blob(72), "smaller than half"),
    (_blob(200), "leaks beyond the lungs"),
])
def test_untrustworthy_masks_are_refused(img, reason):
    with pytest.raises(MaskError, match=reason):
        classical_mask(img)


def test_a_failed_mask_is_recorded_and_the_run_goes_on(ingested, tmp_path):
    from PIL import Image

    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.jobs import EmbedJob

    con, _ = ingested
    # point one image at a featureless copy; the session's synthetic files stay untouched
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((128, 128), 180, np.uint8)).save(blank, format="PNG")
    img = con.execute("SELECT image_id FROM images ORDER BY image_id LIMIT 1").fetchone()[0]
    con.execute("UPDATE images SET path = ? WHERE image_id = ?", [str(blank), img])
    assert con.execute("SELECT count(*) FROM lung_masks").fetchone()[0] == 0
    # `featstore embed` makes the missing masks first, then embeds
    rep = EmbedJob("pixelstats", preprocess="lungs-removed", batch_size=32, workers=0,
                   db=tmp_path / "fs.duckdb").run()
    errs = con.execute("SELECT reason FROM embed_errors WHERE preprocess = 'lungs-removed'").fetchall()
    assert rep.n_embedded + len(rep.failed) == rep.n_todo and rep.n_embedded > 0
    assert errs and all("lung mask failed" in e and "[mask method classical-v1]" in e for (e,) in errs)
    assert img in {i for i, _, _ in rep.failed}
    ok, method = con.execute("SELECT ok, method FROM lung_masks WHERE image_id = ?", [img]).fetchone()
    assert (ok, method) == (False, "classical-v1")
    # masks are made once: a second variant reuses them, and refuses the same image for the same reason
    n_masks = con.execute("SELECT count(*) FROM lung_masks").fetchone()[0]
    rep2 = embed(con, create_backbone("pixelstats"), "lung-crop", batch_size=32, workers=0)
    assert con.execute("SELECT count(*) FROM lung_masks").fetchone()[0] == n_masks == rep.n_todo
    assert {i for i, _, _ in rep2.failed} == {i for i, _, _ in rep.failed}


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_embed_reads_masks_and_makes_none(ingested, engine, tmp_path):
    """The embed stage (either engine) only reads stored masks: without them every image of a lung
    variant is recorded as failed, and nothing is added to lung_masks; once made, a rerun embeds them."""
    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.embed_ray import embed_ray
    from featstore.masks import ensure_masks

    con, _ = ingested
    bb = create_backbone("pixelstats")
    if engine == "local":
        rep = embed(con, bb, "lungs-isolated", batch_size=32, workers=0, limit=5)
    else:  # nothing left to embed once the maskless are refused: Ray is not even started
        rep = embed_ray(con, bb, dict(name="pixelstats"), "lungs-isolated", shards=tmp_path / "shards", limit=5)
    assert rep.n_todo == 5 and rep.n_embedded == 0 and rep.status == "completed"
    assert {r for _, _, r in rep.failed} == {"no lung mask [mask method none]"}
    assert con.execute("SELECT count(*) FROM lung_masks").fetchone()[0] == 0
    assert con.execute("SELECT count(*), min(reason), max(embed_run) FROM embed_errors").fetchall() == [
        (5, "no lung mask [mask method none]", rep.run_id)]
    if engine == "ray":
        return
    ids = [i for i, _, _ in rep.failed]
    ensure_masks(con, ids, workers=1)
    again = embed(con, bb, "lungs-isolated", batch_size=32, workers=0, limit=5)
    refused = {i for (i,) in con.execute("SELECT image_id FROM lung_masks WHERE NOT ok").fetchall()}
    assert {i for i, _, _ in again.failed} == refused and again.n_embedded == 5 - len(refused) > 0


def test_checks_apply_to_any_method():
    m = np.zeros((100, 100), bool)
    m[20:80, 10:45] = True
    lm = check(m, "manifest")
    assert lm.method == "manifest" and lm.bbox == (20, 80, 10, 45) and abs(lm.fraction - 0.21) < 1e-9
    with pytest.raises(MaskError, match="empty"):
        check(np.zeros((100, 100), bool), "xrv-pspnet")


def _manifest_with_masks(tmp_path):
    """Six synthetic images; four name a mask file: two good, one empty, one missing."""
    import csv

    from PIL import Image

    from featstore.synth import generate

    m = generate(tmp_path / "data", n_per_source=3, size=96, seed=2)
    rows = list(csv.DictReader(m.open()))[:6]
    box = np.zeros((96, 96), np.uint8)
    box[20:80, 10:45] = 255      # 23% of the image, box 60 rows tall: passes the checks
    (tmp_path / "data" / "masks").mkdir()
    Image.fromarray(box).save(tmp_path / "data" / "masks" / "good.png")
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(tmp_path / "data" / "masks" / "empty.png")
    for r, mp in zip(rows, ["masks/good.png", "masks/good.png", "masks/empty.png", "masks/missing.png", "", ""]):
        r["mask_path"] = mp
    with m.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return m


def test_masks_from_the_manifest_come_first_and_are_checked(con, tmp_path):
    from featstore import ingest as I
    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.masks import decode, ensure_masks

    m = _manifest_with_masks(tmp_path)
    I.ingest_rows(con, I.manifest_rows(m)[0], str(m), workers=1)
    rep = ensure_masks(con, workers=1)
    assert rep.by_method == {"manifest": 4, "classical-v1": 2} and rep.n_todo == 6
    rows = con.execute("SELECT method, ok, reason, made_from, fraction, box_top, box_left, mask FROM lung_masks "
                       "WHERE method = 'manifest' ORDER BY made_from, ok").fetchall()
    reasons = sorted(r[2] or "" for r in rows)
    assert [r[1] for r in rows].count(True) == 2
    assert any("empty mask" in x and "empty.png" in x for x in reasons)
    assert any("missing.png" in x and "unreadable" in x for x in reasons)
    good = [r for r in rows if r[1]][0]
    assert good[3].endswith("masks/good.png") and abs(good[4] - 2100 / 9216) < 1e-6 and abs(good[5] - 20 / 96) < 1e-6
    assert decode(good[7]).sum() == 60 * 35
    # a lung variant uses exactly the stored mask and leaves the refused images out, listed
    emb = embed(con, create_backbone("pixelstats"), "lungs-isolated", batch_size=8, workers=0)
    refused = con.execute("SELECT count(*) FROM lung_masks WHERE NOT ok").fetchone()[0]
    assert len(emb.failed) == refused >= 2 and emb.n_embedded == 6 - refused
    assert all("[mask method" in r for _, _, r in emb.failed)
    # nothing left to do; redo re-makes them and (the embed stage, in the same transaction) drops the
    # embeddings built on the old masks
    from featstore.embed import forget_lung_variants

    assert ensure_masks(con, workers=1).n_todo == 0
    forgot = []
    again = ensure_masks(con, method="classical-v1", workers=1, redo=True,
                         on_replace=lambda c, ids: forgot.append(forget_lung_variants(c, ids)))
    assert forgot == [emb.n_embedded] and again.by_method == {"classical-v1": 6} and len(again.remade) == 6
    assert con.execute("SELECT count(*) FROM embeddings WHERE preprocess = 'lungs-isolated'").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM embed_errors WHERE preprocess = 'lungs-isolated'").fetchone()[0] == 0
    assert con.execute("SELECT count(*), count(*) FILTER (method = 'classical-v1') FROM lung_masks").fetchone() == (6, 6)


def _masked_and_embedded(con, tmp_path):
    """The six manifest-mask images with masks (4 manifest, 2 classical) and pixelstats embeddings for
    original and two lung variants (refused masks: embed_errors rows)."""
    from featstore import ingest as I
    from featstore.backbones import create_backbone
    from featstore.embed import embed
    from featstore.masks import ensure_masks

    m = _manifest_with_masks(tmp_path)
    I.ingest_rows(con, I.manifest_rows(m)[0], str(m), workers=1)
    ensure_masks(con, workers=1)
    bb = create_backbone("pixelstats")
    for p in ("original", "lungs-isolated", "lung-crop"):
        embed(con, bb, p, batch_size=8, workers=0)


def _snapshot(con) -> dict[str, list]:
    q = {"lung_masks": "SELECT * FROM lung_masks ORDER BY image_id",
         "embeddings": "SELECT image_id, preprocess, vector FROM embeddings ORDER BY ALL",
         "embed_errors": "SELECT image_id, preprocess, reason FROM embed_errors ORDER BY ALL"}
    return {k: con.execute(v).fetchall() for k, v in q.items()}


@pytest.mark.parametrize("where", ["making", "replacing"])
def test_a_redo_that_fails_keeps_every_old_mask_and_embedding(con, tmp_path, monkeypatch, where):
    from featstore import masks as M
    from featstore.embed import forget_lung_variants

    _masked_and_embedded(con, tmp_path)
    before = _snapshot(con)
    assert any(p == "lungs-isolated" for _, p, _ in before["embeddings"]) and before["embed_errors"]

    def on_replace(c, ids):
        forget_lung_variants(c, ids)
        if where == "replacing":
            raise RuntimeError("killed while replacing")

    if where == "making":  # the manifest masks are made, then the classical method dies
        def boom(item):
            raise RuntimeError("killed while making")
        monkeypatch.setattr(M, "_classical_one", boom)
    with pytest.raises(RuntimeError, match=f"killed while {where}"):
        M.ensure_masks(con, workers=1, redo=True, on_replace=on_replace)
    assert _snapshot(con) == before
    # the store takes the next redo: nothing half-done is left on the connection
    monkeypatch.undo()
    assert len(M.ensure_masks(con, workers=1, redo=True).remade) == 6


def test_a_redo_drops_exactly_the_lung_variant_rows_of_the_remade_images(con, tmp_path):
    from featstore.embed import forget_lung_variants
    from featstore.masks import ensure_masks

    _masked_and_embedded(con, tmp_path)
    before = _snapshot(con)
    ids = sorted(r[0] for r in before["lung_masks"])[:3]
    forgot = []
    rep = ensure_masks(con, ids, method="classical-v1", workers=1, redo=True,
                       on_replace=lambda c, x: forgot.append(forget_lung_variants(c, x)))
    after = _snapshot(con)
    assert rep.remade == ids and rep.n_todo == 3

    def kept(rows):  # what must stay: other images' rows, and every row that is no lung variant
        return [r for r in rows if r[0] not in ids or r[1] == "original"]

    assert after["embeddings"] == kept(before["embeddings"])
    assert after["embed_errors"] == kept(before["embed_errors"])
    gone = len(before["embeddings"]) - len(after["embeddings"])
    assert forgot == [gone] and gone > 0
    assert any(r[0] in ids for r in before["embed_errors"]) and not any(r[0] in ids for r in after["embed_errors"])
    # the other images keep their masks as they were; the remade ones are new rows
    assert [r for r in after["lung_masks"] if r[0] not in ids] == [r for r in before["lung_masks"] if r[0] not in ids]
    assert [r[1] for r in after["lung_masks"] if r[0] in ids] == ["classical-v1"] * 3


def test_masks_manifest_only_refuses_images_without_a_file(con, tmp_path):
    from featstore import ingest as I
    from featstore.masks import ensure_masks

    m = _manifest_with_masks(tmp_path)
    I.ingest_rows(con, I.manifest_rows(m)[0], str(m), workers=1)
    rep = ensure_masks(con, method="manifest", workers=1)
    assert rep.by_method == {"manifest": 6}
    assert sum("no mask file" in r for _, _, r in rep.refused) == 2


def test_pspnet_weights_missing_says_where_to_put_them(con, tmp_path):
    from featstore.masks import PSPNET_FILE, ensure_masks
    from featstore.weights import WeightsMissingError

    with pytest.raises(WeightsMissingError, match=PSPNET_FILE) as e:
        ensure_masks(con, method="xrv-pspnet", weights_dir=tmp_path / "w")
    assert str(tmp_path / "w" / PSPNET_FILE) in str(e.value)


@pytest.mark.slow
def test_pspnet_is_used_when_its_weights_are_present(con, tmp_path):
    """Auto picks torchxrayvision's real PSPNet class when the weights file is in the weights dir
    (random weights here: the masks are garbage, so the checks must refuse or pass them on record)."""
    import torch
    from torchxrayvision.baseline_models.chestx_det.ptsemseg.pspnet import pspnet

    from featstore import ingest as I
    from featstore.masks import PSPNET_FILE, ensure_masks
    from featstore.synth import generate
    from featstore.weights import weights_identity

    torch.manual_seed(0)
    wdir = tmp_path / "w"
    wdir.mkdir()
    torch.save({"module." + k: v for k, v in pspnet(14).state_dict().items()}, wdir / PSPNET_FILE)
    m = generate(tmp_path / "data", n_per_source=1, size=64, seed=4)
    # one image: PSPNet takes about 8 CPU s an image at 512 px on this machine
    I.ingest_rows(con, I.manifest_rows(m)[0][:1], str(m), workers=1)
    rep = ensure_masks(con, weights_dir=wdir)
    assert rep.by_method == {"xrv-pspnet": 1} and not rep.note
    made = con.execute("SELECT DISTINCT method, made_from FROM lung_masks").fetchall()
    assert made == [("xrv-pspnet", weights_identity(wdir / PSPNET_FILE))]


def test_the_pspnet_file_is_looked_for_in_torchxrayvisions_cache_without_importing_it(tmp_path):
    """masks.XRV_CACHE is torchxrayvision's own folder; finding (or missing) the file loads no torch, so an
    ONNX embed of a lung variant stays torch-free."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from torchxrayvision.utils import get_cache_dir

    from featstore.masks import XRV_CACHE

    assert XRV_CACHE.expanduser() == Path(get_cache_dir()).expanduser()
    code = ("import sys; from featstore.masks import pspnet_weights; "
            f"print(pspnet_weights({str(tmp_path)!r}), 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.split() == ["None", "False"], r.stdout + r.stderr
