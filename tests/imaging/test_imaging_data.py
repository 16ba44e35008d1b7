"""Site data from disk: datalists of NIfTI/DICOM/PNG/NPY files and MedMNIST npz files."""

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fedadapt.imaging.datalist import DataError, ImageSpec, load_split
from fedadapt.imaging.medmnist import load_medmnist

RNG = np.random.default_rng(0)


def write_nifti(path, arr):
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), str(path))
    return path.name


def write_png(path, arr):
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
    return path.name


def write_dicom(path, arr, z=0):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = ds.SeriesInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    ds.PatientID = "anon"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.InstanceNumber = z + 1
    ds.PixelData = np.asarray(arr, dtype=np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def datalist(tmp_path, training, **other):
    p = tmp_path / "datalist.json"
    p.write_text(json.dumps({"training": training, **other}))
    return p


def test_nifti_png_npy_dicom_classification_2d(tmp_path):
    items = [
        {"image": write_nifti(tmp_path / "a.nii.gz", RNG.random((20, 24)).astype("f4")), "label": 0},
        {"image": write_png(tmp_path / "b.png", RNG.integers(0, 255, (16, 16))), "label": 1},
        {"image": "c.npy", "label": 2},
        {"image": str(write_dicom(tmp_path / "d.dcm", RNG.integers(0, 4000, (16, 16)))), "label": 1},
    ]
    np.save(tmp_path / "c.npy", RNG.random((1, 40, 40)).astype("f4"))
    ds = load_split(datalist(tmp_path, items), "training", ImageSpec(spatial_size=(32, 32)))
    x, y = ds.tensors
    assert x.shape == (4, 1, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2, 1]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 + 1e-6  # ScaleIntensity


def test_rgb_png_multilabel_and_normalize(tmp_path):
    items = [{"image": write_png(tmp_path / f"{i}.png", RNG.integers(0, 255, (12, 12, 3))),
              "label": [1, 0, 1, 0]} for i in range(2)]
    spec = ImageSpec(channels=3, spatial_size=(16, 16), task="multilabel", num_classes=4,
                     intensity="normalize")
    x, y = load_split(datalist(tmp_path, items), "training", spec).tensors
    assert x.shape == (2, 3, 16, 16) and y.shape == (2, 4) and y.dtype == torch.float32
    assert abs(float(x[0].mean())) < 1e-4


def test_3d_nifti_and_dicom_series_segmentation(tmp_path):
    vol = RNG.random((10, 12, 8)).astype("f4")
    mask = (vol > 0.5).astype("u1")
    series = tmp_path / "series"
    series.mkdir()
    for z in range(4):
        write_dicom(series / f"{z}.dcm", RNG.integers(0, 4000, (10, 12)), z=z)
    seg = RNG.integers(0, 2, (10, 12, 4)).astype("u1")
    items = [{"image": write_nifti(tmp_path / "v.nii.gz", vol),
              "label": write_nifti(tmp_path / "m.nii.gz", mask)},
             {"image": "series", "label": write_nifti(tmp_path / "s.nii.gz", seg)}]
    spec = ImageSpec(spatial_dims=3, spatial_size=(8, 8, 8), task="segmentation", num_classes=2)
    x, y = load_split(datalist(tmp_path, [], validation=items), "validation", spec).tensors
    assert x.shape == (2, 1, 8, 8, 8) and y.shape == (2, 1, 8, 8, 8)
    assert y.dtype == torch.long and set(y.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("case, entry, spec_kw, needle", [
    ("missing", {"image": "nope.nii.gz", "label": 0}, {}, "file not found"),
    ("corrupt", {"image": "bad.nii.gz", "label": 0}, {}, "cannot read as NIfTI"),
    ("corrupt-dicom", {"image": "bad.dcm", "label": 0}, {}, "cannot read as DICOM"),
    ("channels", {"image": "rgb.png", "label": 0}, {}, "expected 1 channel(s), found 3"),
    ("size", {"image": "ok.nii", "label": 0}, {"resize": False}, "expected spatial size (32, 32)"),
    ("range", {"image": "ok.nii", "label": 7}, {}, "label 7 out of range; expected 0..2"),
    ("kind", {"image": "ok.nii", "label": [0, 1]}, {}, "expected a class index"),
    ("mask-range", {"image": "ok.nii", "label": "mask.nii"}, {"task": "segmentation",
                                                             "num_classes": 2},
     "mask values out of range; expected 0..1, found 5..5"),
])
def test_bad_input_names_file_expected_and_found(tmp_path, case, entry, spec_kw, needle):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    (tmp_path / "bad.dcm").write_bytes(b"not a dicom")
    write_png(tmp_path / "rgb.png", RNG.integers(0, 255, (8, 8, 3)))
    write_nifti(tmp_path / "ok.nii", RNG.random((16, 16)).astype("f4"))
    write_nifti(tmp_path / "mask.nii", np.full((16, 16), 5, dtype="u1"))
    with pytest.raises(DataError) as err:
        load_split(datalist(tmp_path, [entry]), "training", ImageSpec(**spec_kw))
    assert needle in str(err.value)
    named = "mask.nii" if case == "mask-range" else entry["image"]
    assert named in str(err.value) or "training[0]" in str(err.value)


def test_empty_split_and_bad_datalist(tmp_path):
    p = datalist(tmp_path, [])
    with pytest.raises(DataError, match="split 'training' is empty"):
        load_split(p, "training", ImageSpec())
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="x.json: not valid JSON"):
        load_split(tmp_path / "x.json", "training", ImageSpec())
    with pytest.raises(ValueError, match="ImageSpec.task='detect'"):
        ImageSpec(task="detect")


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_medmnist_2d_3d_multilabel(tmp_path):
    p = _npz(tmp_path / "pathmnist.npz",
             train_images=RNG.integers(0, 255, (5, 28, 28, 3), dtype=np.uint8),
             train_labels=RNG.integers(0, 9, (5, 1)),
             val_images=RNG.integers(0, 255, (2, 28, 28, 3), dtype=np.uint8),
             val_labels=np.array([[0], [8]]))
    x, y = load_medmnist(p, "val", ImageSpec(channels=3, num_classes=9)).tensors
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 8] and float(x.max()) <= 1.0
    p3 = _npz(tmp_path / "organ3d.npz", test_images=RNG.integers(0, 255, (3, 28, 28, 28), dtype=np.uint8),
              test_labels=RNG.integers(0, 11, (3, 1)))
    x, _ = load_medmnist(p3, "test", ImageSpec(spatial_dims=3, spatial_size=(16, 16, 16),
                                               num_classes=11)).tensors
    assert x.shape == (3, 1, 16, 16, 16)
    pc = _npz(tmp_path / "chest.npz", train_images=RNG.integers(0, 255, (4, 28, 28), dtype=np.uint8),
              train_labels=RNG.integers(0, 2, (4, 14)))
    _, y = load_medmnist(pc, "train", ImageSpec(task="multilabel", num_classes=14)).tensors
    assert y.shape == (4, 14)


def test_medmnist_bad_input(tmp_path):
    p = _npz(tmp_path / "m.npz", train_images=RNG.integers(0, 255, (3, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1], [5]]),
             val_images=np.zeros((0, 28, 28), np.uint8), val_labels=np.zeros((0, 1)))
    with pytest.raises(DataError, match=r"m.npz: 'train_labels': label out of range; expected 0..2, found 0..5"):
        load_medmnist(p, "train", ImageSpec())
    with pytest.raises(DataError, match=r"missing key 'test_images'"):
        load_medmnist(p, "test", ImageSpec())
    with pytest.raises(DataError, match=r"'val_images' is empty"):
        load_medmnist(p, "val", ImageSpec())
    with pytest.raises(DataError, match=r"expected 3 channel\(s\), found 1"):
        load_medmnist(p, "train", ImageSpec(channels=3, num_classes=9))
    with pytest.raises(DataError, match="file not found"):
        load_medmnist(tmp_path / "none.npz", "train", ImageSpec())
