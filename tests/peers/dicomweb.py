#!/usr/bin/env python3
"""The Python dicomweb-client against the gateway's /dicomweb. Each command
prints one JSON document on stdout for the Rust test to check.

  dicomweb.py store BASE PARTNER FILE...
      store_instances; prints the response data set (DICOM JSON)
  dicomweb.py search BASE PARTNER LEVEL [STUDY [SERIES]] [KEY=VALUE ...]
      search_for_studies / _series / _instances; LEVEL is studies, series or
      instances; `includefield=A,B` and `limit`, `offset`, `fuzzymatching`
      go as search parameters, other keys as search filters
  dicomweb.py retrieve BASE PARTNER STUDY [SERIES [SOP]] -- FILE...
      retrieve_study / _series / _instance; prints how many instances came
      back and how many equal (data set, file meta aside) one of FILE
  dicomweb.py metadata BASE PARTNER STUDY [SERIES [SOP]]
      retrieve_*_metadata; prints the count, PS3.18 F.2 rule violations and
      the BulkDataURIs
  dicomweb.py frames BASE PARTNER FILE FRAMES MEDIATYPE [TS]
      retrieve_instance_frames of the instance in FILE (already stored);
      prints, per frame, whether the bytes equal the frame in FILE
"""
import hashlib, json, re, sys
import pydicom
from pydicom.encaps import generate_frames
from dicomweb_client.api import DICOMwebClient

def client(base, partner):
    headers = {"X-Konsil-Partner": partner} if partner != "staff" else {}
    return DICOMwebClient(url=base, headers=headers)

def without_meta(ds):
    ds = pydicom.Dataset(ds)
    ds.file_meta = None
    return ds

def same(a, b):
    a, b = without_meta(a), without_meta(b)
    return a == b

def f2_violations(obj, path=""):
    """PS3.18 F.2 rules a JSON data set must follow."""
    out = []
    for tag, element in obj.items():
        where = f"{path}{tag}"
        if not re.fullmatch(r"[0-9A-F]{8}", tag):
            out.append(f"{where}: tag is not 8 uppercase hex digits")
        if not isinstance(element, dict) or "vr" not in element:
            out.append(f"{where}: no vr")
            continue
        vr = element["vr"]
        keys = set(element) - {"vr"}
        if len(keys) > 1 or not keys <= {"Value", "BulkDataURI", "InlineBinary"}:
            out.append(f"{where}: unexpected members {sorted(keys)}")
        if "Value" in element:
            value = element["Value"]
            if not isinstance(value, list):
                out.append(f"{where}: Value is not an array")
                continue
            for v in value:
                if vr == "PN" and v is not None and not isinstance(v, dict):
                    out.append(f"{where}: PN value is not an object")
                if vr == "SQ":
                    out.extend(f2_violations(v, where + "."))
                if vr in ("US", "UL", "SS", "SL", "FL", "FD") and not isinstance(v, (int, float)):
                    out.append(f"{where}: {vr} value is not a number")
    return out

def main():
    cmd, base, partner, *rest = sys.argv[1:]
    c = client(base, partner)
    if cmd == "store":
        datasets = [pydicom.dcmread(f) for f in rest]
        print(json.dumps(c.store_instances(datasets).to_json_dict()))
    elif cmd == "search":
        level, rest = rest[0], rest[1:]
        uids = [a for a in rest if "=" not in a]
        params = dict(a.split("=", 1) for a in rest if "=" in a)
        fields = params.pop("includefield", None)
        kwargs = {}
        if fields:
            kwargs["fields"] = fields.split(",")
        for key in ("limit", "offset"):
            if key in params:
                kwargs[key] = int(params.pop(key))
        if params.pop("fuzzymatching", None) == "true":
            kwargs["fuzzymatching"] = True
        kwargs["search_filters"] = params
        if level == "studies":
            found = c.search_for_studies(**kwargs)
        elif level == "series":
            found = c.search_for_series(*uids[:1], **kwargs)
        else:
            found = c.search_for_instances(*uids[:2], **kwargs)
        print(json.dumps(found))
    elif cmd == "retrieve":
        split = rest.index("--")
        uids, files = rest[:split], rest[split + 1:]
        originals = {}
        for f in files:
            ds = pydicom.dcmread(f)
            originals[ds.SOPInstanceUID] = ds
        if len(uids) == 1:
            got = c.retrieve_study(uids[0])
        elif len(uids) == 2:
            got = c.retrieve_series(*uids)
        else:
            got = [c.retrieve_instance(*uids)]
        identical = sum(1 for ds in got
                        if ds.SOPInstanceUID in originals and same(ds, originals[ds.SOPInstanceUID]))
        print(json.dumps({"retrieved": len(got), "identical": identical,
                          "uids": sorted(ds.SOPInstanceUID for ds in got)}))
    elif cmd == "metadata":
        if len(rest) == 1:
            meta = c.retrieve_study_metadata(rest[0])
        elif len(rest) == 2:
            meta = c.retrieve_series_metadata(*rest)
        else:
            meta = c.retrieve_instance_metadata(*rest)
            meta = [meta] if isinstance(meta, dict) else meta
        violations = [v for m in meta for v in f2_violations(m)]
        bulk = [e["BulkDataURI"] for m in meta for e in m.values() if "BulkDataURI" in e]
        # The metadata read back as a data set, to compare attributes.
        parsed = [pydicom.Dataset.from_json(m, bulk_data_uri_handler=lambda *a: b"") for m in meta]
        print(json.dumps({"count": len(meta), "violations": violations, "bulk": bulk,
                          "patient_ids": sorted({str(d.get("PatientID", "")) for d in parsed})}))
    elif cmd == "frames":
        path, frames, media = rest[0], [int(f) for f in rest[1].split(",")], rest[2]
        ts = rest[3] if len(rest) > 3 else None
        ds = pydicom.dcmread(path)
        n = int(ds.get("NumberOfFrames", 1) or 1)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            expected = list(generate_frames(ds.PixelData, number_of_frames=n))
        else:
            size = len(ds.PixelData) // n
            expected = [ds.PixelData[i * size:(i + 1) * size] for i in range(n)]
        media_types = ((media, ts),) if ts else ((media,),)
        got = c.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                         ds.SOPInstanceUID, frames, media_types=media_types)
        print(json.dumps([{"frame": f, "length": len(g),
                           "equal": expected[f - 1].rstrip(b"\0") == bytes(g).rstrip(b"\0")}
                          for f, g in zip(frames, got)]))
    else:
        sys.exit(__doc__)

main()
