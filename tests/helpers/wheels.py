"""A minimal valid pure-Python wheel built with zipfile, for offline `pip download` tests."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

PACKAGE, VERSION = "lora-core-fixture-wheel", "1.0.3"
MEMBERS = {
    "lora_core_fixture_wheel/weights.bin": os.urandom(3 * 1024 * 1024 + 17),  # > one 1 MiB chunk
    "lora_core_fixture_wheel/data/prompts.txt": b"first prompt\nsecond prompt\n",
}


def build_wheel(directory: Path, package: str = PACKAGE, version: str = VERSION, members=None) -> Path:
    """A minimal valid pure-Python wheel holding `members` (path -> bytes)."""
    members = MEMBERS if members is None else members
    dist = f"{package.replace('-', '_')}-{version}"
    path = directory / f"{dist}-py3-none-any.whl"
    files = dict(members)
    files[f"{dist}.dist-info/METADATA"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
    files[f"{dist}.dist-info/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        b"Tag: py3-none-any\n")
    record = "".join(f"{name},,\n" for name in files) + f"{dist}.dist-info/RECORD,,\n"
    files[f"{dist}.dist-info/RECORD"] = record.encode()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path
