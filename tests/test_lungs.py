import numpy as np
import pytest

from featstore.lungs import VARIANTS, MaskError, lung_mask
from featstore.preprocess import PREPROCESSINGS


@pytest.fixture(scope="module")
def chest():
    from featstore.synth import chest as draw

    return draw(np.random.default_rng(0), 256, 1.0, "normal", 0.1)


def test_mask_finds_two_dark_lungs_inside_the_body(chest):
    m = lung_mask(chest)
    assert 0.05 < m.fraction < 0.45 and m.method == "classical-v1"
    assert chest[m.mask].mean() < chest[~m.mask].mean() - 0.1  # the lungs are the dark fields
    t, b, l, r = m.bbox
    assert l < 128 < r  # both sides of the midline
    from scipy import ndimage

    assert ndimage.label(m.mask)[1] == 2


def test_variants_hide_and_seek(chest):
    m = lung_mask(chest)
    t, b, l, r = m.bbox
    iso, rem = VARIANTS["lungs-isolated"](chest), VARIANTS["lungs-removed"](chest)
    assert (iso[~m.mask] == 0).all() and np.allclose(iso[m.mask], chest[m.mask])
    assert (rem[m.mask] == 0).all() and np.allclose(rem[~m.mask], chest[~m.mask])
    fr, bo = VARIANTS["lungs-framed"](chest), VARIANTS["lungs-boxed-out"](chest)
    assert (bo[t:b, l:r] == 0).all() and np.allclose(fr[t:b, l:r], chest[t:b, l:r]) and fr[:t].sum() == 0
    assert VARIANTS["lung-crop"](chest).shape == (b - t, r - l)
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
        lung_mask(img)


def test_a_failed_mask_is_recorded_and_the_run_goes_on(ingested, tmp_path):
    from PIL import Image

    from featstore.backbones import create_backbone
    from featstore.embed import embed

    con, _ = ingested
    # point one image at a featureless copy; the session's synthetic files stay untouched
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((128, 128), 180, np.uint8)).save(blank, format="PNG")
    img = con.execute("SELECT image_id FROM images ORDER BY image_id LIMIT 1").fetchone()[0]
    con.execute("UPDATE images SET path = ? WHERE image_id = ?", [str(blank), img])
    rep = embed(con, create_backbone("pixelstats"), "lungs-removed", batch_size=32, workers=0)
    errs = con.execute("SELECT reason FROM embed_errors WHERE preprocess = 'lungs-removed'").fetchall()
    assert rep.n_embedded + len(rep.failed) == rep.n_todo and rep.n_embedded > 0
    assert errs and all("lung mask failed" in e or "not" in e for (e,) in errs)
