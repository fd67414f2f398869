"""Replacing a library function everywhere lora_core holds it, for tests that must prove it is
never called (e.g. "no model loads before the output folder is checked").

`from lora_core.models import load_model` binds a name of its own in the importing module, so
patching the defining module alone misses every command that imported the function at the top.
"""
import sys

from lora_core.train import cli


def replace_everywhere(monkeypatch, function, replacement) -> int:
    """Patch every lora_core module attribute that is `function`; returns how many were patched."""
    list(cli._command_modules())  # the commands import what they use when the parser is built
    patched = 0
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "") or ""
        if name.startswith("lora_core") and getattr(module, function.__name__, None) is function:
            monkeypatch.setattr(module, function.__name__, replacement)
            patched += 1
    return patched
