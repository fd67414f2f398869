"""`python -m pytest` from the repository root shadows no installed package.

`-m` puts the working directory first on sys.path, and the repository's top-level folders
(kernels/, models/, train/, ...) are packages there. tests/conftest.py moves the root to the end of
sys.path; this test checks the outcome in the very process CI runs (`.ci/run` starts pytest with
`python -m pytest` from the root): every top-level name that an installed distribution provides is
found where that distribution put it, not in the repository. Before the fix, transformers 5's
`kernels` resolved to our kernels/ here.
"""
import importlib.metadata
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OURS = {"lora-core", "lora_core"}


def test_no_installed_top_level_name_resolves_into_the_repository():
    shadowed = {}
    for name, distributions in importlib.metadata.packages_distributions().items():
        if OURS & {d.lower() for d in distributions} or not name.isidentifier():
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a distribution's name with no importable module
            continue
        if spec is None:
            continue
        locations = [spec.origin] if spec.has_location else list(spec.submodule_search_locations or [])
        inside = [loc for loc in locations if Path(loc).resolve().is_relative_to(REPO)]
        if inside:
            shadowed[name] = (distributions, inside)
    assert not shadowed, f"installed names found in the repository instead: {shadowed}"
