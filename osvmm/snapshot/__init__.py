"""Snapshots: the file format (pure) and guest memory images.

``format.py`` turns a dict of states into the bytes of a state file and back
(magic, version, SHA-256); ``memfile.py`` writes guest memory as a sparse
image (zero pages are holes) with a CRC-32 per stored extent, and checks one.
Neither sees a partition or KVM: vmm/snapshot.py collects and applies the
states. docs/snapshots.md is the format's document.
"""
