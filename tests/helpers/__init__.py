"""Helpers shared by several test modules: tiny models, tokenizers, fixture wheels, a toy LoRA model,
SFT settings. Imported as `helpers.<topic>` (pytest.ini puts tests/ on sys.path). Fixtures shared by
several modules live in tests/conftest.py instead.
"""
