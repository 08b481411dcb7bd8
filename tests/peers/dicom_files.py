#!/usr/bin/env python3
"""Test data for the DIMSE integration tests, made with pydicom.

  dicom_files.py samples OUTDIR      copy pydicom's sample files across transfer syntaxes
  dicom_files.py ct OUTDIR N PID ACC [--noext] [--study UID] [--issuer ISSUER]
                                     synthetic N-slice 512x512 CT study (ACC "-": none)
  dicom_files.py tiny OUTDIR N       N tiny (8x8) secondary capture instances
  dicom_files.py big PATH MIB        one multiframe instance of about MIB MiB, written in chunks
  dicom_files.py bad OUTDIR          files that must be refused, and a conflicting pair
  dicom_files.py private PATH        one instance of a private (non-standard) storage SOP class

Each command prints one TSV line per file: path, SOP class, SOP instance, transfer syntax.
"""
import os, shutil, struct, sys
import numpy as np
import pydicom
from pydicom.data import get_testdata_file, get_charset_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (generate_uid, ExplicitVRLittleEndian, CTImageStorage,
                         SecondaryCaptureImageStorage, PYDICOM_IMPLEMENTATION_UID)

ROOT = "1.2.826.0.1.3680043.8.498."

# One file per transfer syntax family the gateway must store unchanged.
SAMPLES = [
    "MR_small_implicit.dcm",        # implicit VR little endian
    "MR_small.dcm",                 # explicit VR little endian
    "MR_small_bigendian.dcm",       # explicit VR big endian
    "image_dfl.dcm",                # deflated explicit VR little endian
    "SC_rgb_jpeg_dcmtk.dcm",        # JPEG baseline
    "JPGExtended.dcm",              # JPEG extended
    "JPEG-LL.dcm",                  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",# JPEG-LS lossless
    "JPEGLSNearLossless_08.dcm",    # JPEG-LS near-lossless
    "MR_small_jp2klossless.dcm",    # JPEG 2000 lossless
    "JPEG2000.dcm",                 # JPEG 2000
    "MR_small_RLE.dcm",             # RLE lossless
    "emri_small.dcm",               # multiframe
    "rtdose.dcm",                   # multiframe RT dose
    "rtplan.dcm",                   # no pixel data
    "test-SR.dcm",                  # structured report, nested sequences
    "chrH31.dcm", "chrX1.dcm", "chrFren.dcm", "chrRuss.dcm",  # character sets
]

def row(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    print(f"{path}\t{ds.file_meta.MediaStorageSOPClassUID}\t{ds.file_meta.MediaStorageSOPInstanceUID}\t{ds.file_meta.TransferSyntaxUID}")

def samples(out):
    os.makedirs(out, exist_ok=True)
    for name in SAMPLES:
        src = get_testdata_file(name) if not name.startswith("chr") else next(iter(get_charset_files(name)), None)
        if src is None:
            sys.exit(f"pydicom sample {name} not found (is pydicom-data installed?)")
        dst = os.path.join(out, name)
        shutil.copyfile(src, dst)
        row(dst)

def base_dataset(sop_class, sop_uid, study, series, pid="GW-TEST-0001", acc="ACC0001"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset(); ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "101010", acc
    ds.Modality = "CT" if sop_class == CTImageStorage else "OT"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.PatientName, ds.PatientID = "Müller^Jürgen", pid
    ds.PatientBirthDate, ds.PatientSex = "19700101", "M"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyID, ds.SeriesNumber = "1", 1
    return ds

def ct(out, n, pid, acc, noext, study=None, issuer=None):
    os.makedirs(out, exist_ok=True)
    study, series, frame = study or generate_uid(ROOT), generate_uid(ROOT), generate_uid(ROOT)
    yy, xx = np.mgrid[0:512, 0:512]
    for i in range(n):
        ds = base_dataset(CTImageStorage, generate_uid(ROOT), study, series, pid, "" if acc == "-" else acc)
        if issuer:
            ds.IssuerOfPatientID = issuer
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = i + 1
        ds.FrameOfReferenceUID = frame
        ds.ImagePositionPatient = [-250, -250, -5 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 512
        ds.PixelSpacing = [0.5, 0.5]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.PixelData = (((xx + yy + i * 7) % 4096).astype(np.uint16)).tobytes()
        name = f"CT{i + 1:04d}" + ("" if noext else ".dcm")
        path = os.path.join(out, name)
        ds.save_as(path, enforce_file_format=True)
        row(path)

def tiny(out, n):
    os.makedirs(out, exist_ok=True)
    study, series = generate_uid(ROOT), generate_uid(ROOT)
    for i in range(n):
        ds = base_dataset(SecondaryCaptureImageStorage, generate_uid(ROOT), study, series)
        ds.InstanceNumber = i + 1
        ds.ConversionType = "WSD"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = bytes(range(64))
        path = os.path.join(out, f"SC{i + 1:05d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        row(path)

def big(path, mib):
    """A multiframe secondary capture of about `mib` MiB, written without holding it in memory."""
    frame_bytes = 1024 * 1024  # 1024x1024 8-bit
    frames = max(1, mib)
    ds = base_dataset("1.2.840.10008.5.1.4.1.1.7.2", generate_uid(ROOT), generate_uid(ROOT), generate_uid(ROOT))
    ds.Modality = "OT"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = "33"
    ds.Rows = ds.Columns = 1024
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.save_as(path, enforce_file_format=True)
    length = frame_bytes * frames
    chunk = (np.arange(frame_bytes, dtype=np.uint32) % 251).astype(np.uint8).tobytes()
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length))
        for _ in range(frames):
            f.write(chunk)
    row(path)

def bad(out):
    os.makedirs(out, exist_ok=True)
    study, series = generate_uid(ROOT), generate_uid(ROOT)
    def sc(uid=None):
        ds = base_dataset(SecondaryCaptureImageStorage, uid or generate_uid(ROOT), study, series)
        ds.ConversionType = "WSD"
        return ds
    # A valid header followed by bytes that are no data set.
    ds = sc(); path = os.path.join(out, "garbage.dcm"); ds.save_as(path, enforce_file_format=True)
    with open(path, "rb") as f:
        head = f.read()
    meta_end = 132 + 12 + struct.unpack("<I", head[140:144])[0]
    with open(path, "wb") as f:
        f.write(head[:meta_end] + b"\x08\x00\x16\x00UI\xff\xff" + os.urandom(64))
    # No StudyInstanceUID.
    ds = sc(); del ds.StudyInstanceUID
    ds.save_as(os.path.join(out, "nostudy.dcm"), enforce_file_format=True)
    # A StudyInstanceUID with a leading zero in a component.
    ds = sc(); ds.StudyInstanceUID = "1.2.03.4"
    ds.save_as(os.path.join(out, "baduid.dcm"), enforce_file_format=True)
    # Two different objects under one SOP Instance UID.
    uid = generate_uid(ROOT)
    ds = sc(uid); ds.SeriesDescription = "first"
    ds.save_as(os.path.join(out, "conflict_a.dcm"), enforce_file_format=True)
    ds = sc(uid); ds.SeriesDescription = "second, different"
    ds.save_as(os.path.join(out, "conflict_b.dcm"), enforce_file_format=True)
    for name in sorted(os.listdir(out)):
        print(os.path.join(out, name))

def private(path):
    ds = base_dataset("1.2.826.0.1.3680043.8.498.77.1", generate_uid(ROOT), generate_uid(ROOT), generate_uid(ROOT))
    ds.Modality = "OT"
    ds.save_as(path, enforce_file_format=True)
    row(path)

def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "samples": samples(args[0])
    elif cmd == "ct":
        option = lambda name: args[args.index(name) + 1] if name in args else None
        ct(args[0], int(args[1]), args[2], args[3], "--noext" in args, option("--study"), option("--issuer"))
    elif cmd == "tiny": tiny(args[0], int(args[1]))
    elif cmd == "big": big(args[0], int(args[1]))
    elif cmd == "bad": bad(args[0])
    elif cmd == "private": private(args[0])
    else: sys.exit(__doc__)

main()
