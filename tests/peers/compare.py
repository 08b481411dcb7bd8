#!/usr/bin/env python3
"""compare.py SENT STORED: exit 0 when the stored file's data set equals the sent one
(every element, pixel data included; file meta aside), else print the differences."""
import sys
import pydicom

sent, stored = (pydicom.dcmread(p, force=True) for p in sys.argv[1:3])
diffs = []
# Data Set Trailing Padding carries no information and senders may drop it
# (DCMTK does); it is not part of the comparison.
PADDING = 0xFFFCFFFC
tags = sorted((set(sent.keys()) | set(stored.keys())) - {PADDING})
for tag in tags:
    a, b = sent.get(tag), stored.get(tag)
    if a is None or b is None:
        diffs.append(f"{tag}: only in {'stored' if a is None else 'sent'}")
    elif a.value != b.value:
        diffs.append(f"{tag} {a.keyword}: values differ")
if stored.file_meta.TransferSyntaxUID != sent.file_meta.TransferSyntaxUID:
    diffs.append(f"transfer syntax {sent.file_meta.TransferSyntaxUID} -> {stored.file_meta.TransferSyntaxUID}")
if diffs:
    print("\n".join(diffs))
    sys.exit(1)
