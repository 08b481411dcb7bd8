#!/usr/bin/env python3
"""Extract the FHIR R4 (4.0.1) core definitions Konsil validates against into
profiles/r4/, reproducibly, from the official npm package
hl7.fhir.r4.examples@4.0.1 (FHIR is CC0).

    conformance/fhir/extract_r4_profiles.py [--package DIR_OR_TGZ] [--out profiles/r4]

Without --package the script fetches the package with `npm pack`.

Writes:
- structure-definitions.json: a Bundle (collection) of the core
  StructureDefinitions with their snapshots: every resource, every complex
  and primitive data type, and the core type profiles (SimpleQuantity, ...).
  Documentation text (definition, comment, requirements, mappings, narrative)
  is dropped to keep the file small; every element keeps what validation and
  _summary need (path, cardinality, types, regexes, bindings, constraints,
  isSummary, isModifier, fixed/pattern values).
- valuesets-required.json: a Bundle of the ValueSets that those definitions
  bind with strength "required", each with its `expansion` computed here from
  the package's CodeSystems (whole systems, listed concepts, is-a /
  descendent-of filters, included value sets, excludes). A value set drawing
  on a code system that cannot be enumerated (MIME types, currencies, UCUM)
  is written without an expansion and marked so; the validator checks those
  codes' syntax only.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "hl7.fhir.r4.examples@4.0.1"

SD_KEYS = [
    "resourceType", "id", "url", "version", "name", "title", "status", "kind",
    "abstract", "type", "baseDefinition", "derivation", "fhirVersion",
]
ELEMENT_KEYS = [
    "id", "path", "sliceName", "min", "max", "contentReference", "type",
    "maxLength", "constraint", "isModifier", "isSummary", "binding",
]
NOT_ENUMERABLE = "http://konsil.dev/fhir/StructureDefinition/valueset-not-enumerable"


def load_package(arg):
    if arg and os.path.isdir(arg):
        return arg
    tmp = tempfile.mkdtemp(prefix="fhir-r4-")
    tgz = arg
    if not tgz:
        subprocess.run(["npm", "pack", "--silent", PACKAGE], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        tgz = glob.glob(os.path.join(tmp, "*.tgz"))[0]
    with tarfile.open(tgz) as tar:
        tar.extractall(tmp, filter="data")
    return os.path.join(tmp, "package")


def read_all(pkg, prefix):
    out = {}
    for path in sorted(glob.glob(os.path.join(pkg, prefix + "-*.json"))):
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
        out[res["url"]] = res
    return out


def wanted(sd):
    if sd.get("kind") == "logical" or "snapshot" not in sd:
        return False
    if sd.get("derivation") == "constraint":
        # Core type profiles (SimpleQuantity, MoneyQuantity, ...), not the
        # extension definitions nor resource profiles.
        return (sd.get("kind") == "complex-type" and sd.get("type") != "Extension"
                and sd["url"].startswith("http://hl7.org/fhir/StructureDefinition/")
                and "example" not in sd["url"])
    return True


def strip_element(e):
    out = {k: e[k] for k in ELEMENT_KEYS if k in e}
    for k, v in e.items():
        if k.startswith("fixed") or k.startswith("pattern"):
            out[k] = v
    if "constraint" in out:
        out["constraint"] = [
            {k: c[k] for k in ("key", "severity", "human", "expression") if k in c}
            for c in out["constraint"]
        ]
    if "binding" in out:
        out["binding"] = {k: out["binding"][k] for k in ("strength", "valueSet") if k in out["binding"]}
    return out


def strip_sd(sd):
    out = {k: sd[k] for k in SD_KEYS if k in sd}
    out["snapshot"] = {"element": [strip_element(e) for e in sd["snapshot"]["element"]]}
    return out


def concepts_of(concepts, system, root=None, under=False):
    """Codes of a CodeSystem's concept tree; with root, only that concept's
    descendants (under=True) or it and its descendants."""
    found = []

    def walk(items, inside):
        for c in items:
            here = inside or (root is not None and c["code"] == root)
            if root is None or inside or (here and not under):
                found.append({"system": system, "code": c["code"], "display": c.get("display")})
            walk(c.get("concept", []), here)

    walk(concepts, root is None)
    return found


class Expander:
    def __init__(self, valuesets, codesystems):
        self.valuesets = valuesets
        self.codesystems = codesystems

    def part(self, inc):
        """Codes of one include/exclude, or None if not enumerable."""
        codes = None
        system = inc.get("system")
        if system:
            if inc.get("concept"):
                codes = [{"system": system, "code": c["code"], "display": c.get("display")}
                         for c in inc["concept"]]
            else:
                cs = self.codesystems.get(system)
                if cs is None or cs.get("content") != "complete":
                    return None
                filters = inc.get("filter", [])
                if not filters:
                    codes = concepts_of(cs.get("concept", []), system)
                else:
                    codes = None
                    for f in filters:
                        if f["property"] != "concept" or f["op"] not in ("is-a", "descendent-of"):
                            return None
                        these = concepts_of(cs.get("concept", []), system, f["value"],
                                            under=f["op"] == "descendent-of")
                        keys = {(c["system"], c["code"]) for c in these}
                        codes = these if codes is None else [c for c in codes if (c["system"], c["code"]) in keys]
        for url in inc.get("valueSet", []):
            sub = self.expand(url)
            if sub is None:
                return None
            if codes is None:
                codes = sub
            else:
                keys = {(c["system"], c["code"]) for c in sub}
                codes = [c for c in codes if (c["system"], c["code"]) in keys]
        return codes

    def expand(self, url):
        vs = self.valuesets.get(url.split("|")[0])
        if vs is None:
            return None
        compose = vs.get("compose", {})
        codes, seen = [], set()
        for inc in compose.get("include", []):
            part = self.part(inc)
            if part is None:
                return None
            for c in part:
                key = (c["system"], c["code"])
                if key not in seen:
                    seen.add(key)
                    codes.append(c)
        for exc in compose.get("exclude", []):
            part = self.part(exc)
            if part is None:
                return None
            drop = {(c["system"], c["code"]) for c in part}
            codes = [c for c in codes if (c["system"], c["code"]) not in drop]
        return codes


def bundle(resources):
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": r["url"], "resource": r} for r in resources]}


def write(path, value):
    with open(path, "w", encoding="utf-8") as f:
        # One entry per line: small diffs, still compact.
        head = {k: v for k, v in value.items() if k != "entry"}
        f.write(json.dumps(head, ensure_ascii=False)[:-1] + ',"entry":[\n')
        f.write(",\n".join(json.dumps(e, ensure_ascii=False, separators=(",", ":"))
                           for e in value["entry"]))
        f.write("\n]}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", help="unpacked package dir or .tgz (default: npm pack %s)" % PACKAGE)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "profiles", "r4"))
    args = ap.parse_args()
    pkg = load_package(args.package)
    sds = [strip_sd(sd) for sd in read_all(pkg, "StructureDefinition").values() if wanted(sd)]
    sds.sort(key=lambda sd: (sd["kind"], sd["url"]))
    expander = Expander(read_all(pkg, "ValueSet"), read_all(pkg, "CodeSystem"))
    bound = sorted({e["binding"]["valueSet"].split("|")[0]
                    for sd in sds for e in sd["snapshot"]["element"]
                    if e.get("binding", {}).get("strength") == "required" and "valueSet" in e["binding"]})
    valuesets = []
    for url in bound:
        source = expander.valuesets.get(url)
        vs = {"resourceType": "ValueSet", "url": url, "status": "active"}
        if source is not None:
            vs.update({k: source[k] for k in ("id", "version", "name") if k in source})
        codes = expander.expand(url)
        if codes is None:
            vs["extension"] = [{"url": NOT_ENUMERABLE, "valueBoolean": True}]
        else:
            vs["expansion"] = {
                "timestamp": "2019-11-01T09:29:23+11:00",  # the package's date: reproducible
                "total": len(codes),
                "contains": [{k: v for k, v in c.items() if v is not None} for c in codes],
            }
        valuesets.append(vs)
    os.makedirs(args.out, exist_ok=True)
    write(os.path.join(args.out, "structure-definitions.json"), bundle(sds))
    write(os.path.join(args.out, "valuesets-required.json"), bundle(valuesets))
    open_sets = [v["url"] for v in valuesets if "expansion" not in v]
    print("%d StructureDefinitions, %d required ValueSets (%d not enumerable: %s)"
          % (len(sds), len(valuesets), len(open_sets), ", ".join(open_sets)), file=sys.stderr)


if __name__ == "__main__":
    main()
