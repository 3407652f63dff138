import io

import numpy as np
import pytest
from PIL import Image

from featstore.decode import DecodeError, decode_bytes, decode_file

from conftest import CXR


def _png(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr, **kw).save(buf, format="PNG")
    return buf.getvalue()


def test_png_8bit():
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    d = decode_bytes(_png(a))
    assert (d.width, d.height, d.bit_depth, d.format) == (16, 16, 8, "PNG")
    np.testing.assert_allclose(d.pixels, a / 255.0, atol=1e-6)


def test_png_16bit_keeps_precision():
    a = (np.arange(64 * 64, dtype=np.uint32) * 16).astype(np.uint16).reshape(64, 64)
    d = decode_bytes(_png(a))
    assert d.bit_depth == 16
    np.testing.assert_allclose(d.pixels, a / 65535.0, atol=1e-6)
    assert len(np.unique(d.pixels)) == 4096  # more levels than 8 bits could hold


def test_jpeg():
    a = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    d = decode_bytes(buf.getvalue())
    assert d.format == "JPEG" and d.bit_depth == 8
    assert np.abs(d.pixels - a / 255.0).max() < 0.05


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA", "1"])
def test_colour_and_palette_to_gray(mode):
    g = np.zeros((8, 8), np.uint8)
    g[:, 4:] = 255
    im = Image.fromarray(g).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    d = decode_bytes(buf.getvalue())
    assert d.pixels.shape == (8, 8)
    np.testing.assert_allclose(d.pixels, g / 255.0, atol=1e-6)


def _dicom(pixels, photometric="MONOCHROME2", slope=None, intercept=None, center=None, width=None, with_pixels=True):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    if with_pixels:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_monochrome1_is_inverted():
    a = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))
    m2 = decode_bytes(_dicom(a, "MONOCHROME2"))
    m1 = decode_bytes(_dicom(a, "MONOCHROME1"))
    assert m2.format == "DICOM" and m2.bit_depth == 12
    np.testing.assert_allclose(m1.pixels, 1 - m2.pixels, atol=1e-6)
    assert m2.pixels[0, 0] == 0 and m2.pixels[0, -1] == 1


def test_dicom_window_is_applied():
    a = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))
    # rescale to -1024..3008, then window 0 +- 500: everything below -500 is black
    d = decode_bytes(_dicom(a, slope=1, intercept=-1024, center=0, width=1000))
    hu = a.astype(float) - 1024
    assert (d.pixels[:, hu[0] <= -500] == 0).all()
    assert (d.pixels[:, hu[0] >= 500] == 1).all()
    mid = (hu[0] > -450) & (hu[0] < 450)
    assert ((d.pixels[0, mid] > 0) & (d.pixels[0, mid] < 1)).all()


def test_dicom_without_pixel_data():
    with pytest.raises(DecodeError, match="no pixel data"):
        decode_bytes(_dicom(None, with_pixels=False), "x.dcm")


@pytest.mark.skipif(not (CXR / "dicom").is_dir(), reason="shared DICOM samples not found")
def test_shared_dicoms_monochrome1_is_the_negative():
    """The shared pair holds byte-identical pixel data; only the PhotometricInterpretation
    tag differs. Honouring MONOCHROME1 (low = white) must therefore give the exact
    negative of the MONOCHROME2 file: same anatomy, grey scale reversed."""
    import pydicom

    real = CXR / "dicom" / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    fake = CXR / "dicom" / "Fake_MONOHR1.dcm"
    assert pydicom.dcmread(real).PixelData == pydicom.dcmread(fake).PixelData
    a, b = decode_file(real), decode_file(fake)
    assert (a.width, a.height, a.format) == (b.width, b.height, "DICOM") == (1024, 1024, "DICOM")
    assert a.pixels.std() > 0.05  # a real image, not a blank
    np.testing.assert_allclose(b.pixels, 1.0 - a.pixels, atol=1e-6)


def _nifti(arr2d):
    import nibabel as nib

    # store as NIfTI expects (x right, y up): the inverse of the decoder's flip/transpose
    data = np.flipud(arr2d).T.copy()
    return nib.Nifti1Image(data, np.eye(4)).to_bytes()


def test_nifti_2d_orientation():
    a = np.zeros((20, 30), np.float32)
    a[:5, :10] = 1.0  # bright block top-left
    d = decode_bytes(_nifti(a), "x.nii")
    assert d.format == "NIFTI" and (d.width, d.height) == (30, 20)
    np.testing.assert_allclose(d.pixels, a)


def test_nifti_3d_is_rejected():
    import nibabel as nib

    data = nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)).to_bytes()
    with pytest.raises(DecodeError, match="not 2-D"):
        decode_bytes(data, "vol.nii")


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"hello, not an image", "not an image"),
])
def test_bad_bytes(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_bytes(data, "x.png")


def test_truncated_png():
    data = _png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    with pytest.raises(DecodeError, match="truncated"):
        decode_bytes(data[: len(data) // 2])


def test_missing_file(tmp_path):
    with pytest.raises(DecodeError, match="file not found"):
        decode_file(tmp_path / "nope.png")


# --- hostile input: non-finite pixels, special files, size cap --------------------------------------------

def _float_tiff(a):
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.float32), mode="F").save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("bad,counts", [
    ({(0, 0): np.nan}, "1 NaN, 0 Inf"),
    ({(0, 0): np.inf, (3, 4): -np.inf}, "0 NaN, 2 Inf"),
    ({(1, 1): np.nan, (2, 2): np.inf}, "1 NaN, 1 Inf"),
])
@pytest.mark.parametrize("fmt", ["tiff", "nifti"])
def test_non_finite_pixels_are_refused(fmt, bad, counts):
    a = np.random.default_rng(0).random((16, 12)).astype(np.float32)
    for where, v in bad.items():
        a[where] = v
    data, name = (_float_tiff(a), "x.tif") if fmt == "tiff" else (_nifti(a), "x.nii")
    with pytest.raises(DecodeError, match=rf"^non-finite pixel values \({counts}\)$"):
        decode_bytes(data, name)


def test_all_nan_image_is_refused_with_counts():
    with pytest.raises(DecodeError, match=r"non-finite pixel values \(64 NaN, 0 Inf\)"):
        decode_bytes(_float_tiff(np.full((8, 8), np.nan)), "x.tif")


def test_float_dicom_with_nan_is_refused():
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    a = np.random.default_rng(1).random((8, 8)).astype(np.float32)
    a[2, 3] = np.nan
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 8, 1, "MONOCHROME2"
    ds.BitsAllocated = 32
    ds.FloatPixelData = a.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(DecodeError, match=r"non-finite pixel values \(1 NaN, 0 Inf\)"):
        decode_bytes(buf.getvalue(), "x.dcm")


def test_finite_float_images_still_decode():
    a = np.linspace(-1000, 3000, 12 * 16, dtype=np.float32).reshape(12, 16)
    for data, name in ((_float_tiff(a), "x.tif"), (_nifti(a), "x.nii")):
        d = decode_bytes(data, name)
        assert np.isfinite(d.pixels).all() and d.pixels.min() == 0 and d.pixels.max() == 1


def test_content_beats_a_wrong_extension():
    a = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert decode_bytes(_png(a), "scan.dcm").format == "PNG"  # a PNG named .dcm is still a PNG
    assert decode_bytes(_png(a), "scan.nii").format == "PNG"


def test_special_files_are_never_opened(tmp_path):
    import os

    from featstore.decode import read_file

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening this for reading would block until a writer comes: it must not be opened
    with pytest.raises(DecodeError, match="FIFO"):
        read_file(fifo)
    with pytest.raises(DecodeError, match="device node"):
        read_file("/dev/null")  # the old code read it: "empty file"
    with pytest.raises(DecodeError, match="device node"):
        read_file("/dev/zero")  # the old code read it until memory ran out
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(DecodeError, match="^symlink loop$"):
        read_file(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DecodeError, match="broken symlink"):
        read_file(tmp_path / "dangling")
    with pytest.raises(DecodeError, match="is a directory"):
        read_file(tmp_path)


def test_size_cap(tmp_path, monkeypatch):
    from featstore.decode import DEFAULT_MAX_BYTES, read_file

    big = tmp_path / "big.png"
    with open(big, "wb") as f:  # sparse: no disk used, no time spent
        f.truncate(DEFAULT_MAX_BYTES + 1)
    with pytest.raises(DecodeError, match=rf"file too large \({DEFAULT_MAX_BYTES + 1} bytes, over the "
                                          rf"{DEFAULT_MAX_BYTES}-byte cap"):
        read_file(big)
    small = tmp_path / "small.png"
    small.write_bytes(_png(np.zeros((8, 8), np.uint8)))
    n = small.stat().st_size
    assert len(read_file(small, max_bytes=n)) == n
    with pytest.raises(DecodeError, match="file too large"):
        read_file(small, max_bytes=n - 1)
    monkeypatch.setenv("FEATSTORE_MAX_BYTES", str(n - 1))
    with pytest.raises(DecodeError, match="file too large"):
        read_file(small)


def _encoded(kind):
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (40, 52), dtype=np.uint8)
    buf = io.BytesIO()
    if kind == "jpeg":
        Image.fromarray(grey).save(buf, format="JPEG", quality=90)
    elif kind == "rgb-png":
        Image.fromarray(np.stack([grey, grey[::-1], grey[:, ::-1]], -1)).save(buf, format="PNG")
    elif kind == "palette-png":
        Image.fromarray(grey).convert("P").save(buf, format="PNG")
    elif kind == "16-bit-png":
        Image.fromarray(grey.astype(np.uint16) * 257).save(buf, format="PNG")
    else:
        Image.fromarray(grey).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["jpeg", "grey-png", "rgb-png", "palette-png", "16-bit-png"])
def test_uint8_decode_is_the_float_decode_in_bytes(kind):
    """embed asks for uint8 when its preprocessing takes it: the same pixels, v instead of v / 255;
    other bit depths stay float32."""
    data = _encoded(kind)
    f, u = decode_bytes(data, draft=32), decode_bytes(data, draft=32, uint8=True)
    if kind == "16-bit-png":
        assert u.pixels.dtype == np.float32
        np.testing.assert_array_equal(u.pixels, f.pixels)
    else:
        assert u.pixels.dtype == np.uint8 and f.pixels.dtype == np.float32
        np.testing.assert_array_equal(u.pixels.astype(np.float32) / 255.0, f.pixels)
    assert (u.width, u.height, u.bit_depth, u.format) == (f.width, f.height, f.bit_depth, f.format)


def test_preprocessings_that_take_uint8_give_what_they_give_on_floats():
    from featstore.preprocess import PREPROCESSINGS, to_input
    from featstore.backbones import NIH_ONNX_PIPELINE

    u = np.random.default_rng(2).integers(0, 256, (33, 47), dtype=np.uint8)
    takers = [p for p in PREPROCESSINGS.values() if p.takes_uint8]
    assert takers  # 'original' at least
    for p in takers:
        np.testing.assert_array_equal(to_input(p(u), 24, 1, NIH_ONNX_PIPELINE),
                                      to_input(p(u.astype(np.float32) / 255.0), 24, 1, NIH_ONNX_PIPELINE))
