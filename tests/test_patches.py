"""The patch series applies to the pinned source; fetching and patching fail clearly."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import llama_source

ROOT = Path(__file__).resolve().parent.parent


def test_series_applies_to_pinned_source(tmp_path):
    tree = llama_source.prepare(tmp_path / "llama.cpp")
    header = (tree / "include" / "llama.h").read_text()
    assert "llama_layer_order_version" in header
    assert (tree / "src" / "llama-layer-order.cpp").is_file()


def test_each_patch_opens_with_its_description():
    patches = llama_source.series()
    assert patches, "no patches in patches/"
    for patch in patches:
        text = patch.read_text()
        head = text.split("\ndiff --git", 1)[0]
        subject = [line for line in head.splitlines() if line.startswith("Subject:")]
        assert subject, f"{patch.name} has no Subject line"
        body = head.split(subject[0], 1)[1].strip()
        assert len(body.split()) >= 20, f"{patch.name} should say what it changes and why"


def test_wrong_archive_hash_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / llama_source.SDIST_NAME
    fake.write_bytes(b"not the archive")
    monkeypatch.setenv("FRANKENLLAMA_SDIST", str(fake))
    with pytest.raises(llama_source.SourceError, match="sha256 is .* expected 832db069"):
        llama_source.fetch_sdist()


def _series_with_a_stale_patch(folder: Path, monkeypatch) -> None:
    """Make patches/ one patch whose context is not in llama.cpp."""
    folder.mkdir()
    (folder / "0001-broken.patch").write_text(
        "Subject: broken\n\n"
        "diff --git a/src/llama.cpp b/src/llama.cpp\n--- a/src/llama.cpp\n+++ b/src/llama.cpp\n"
        "@@ -1,1 +1,1 @@\n-this line is not in llama.cpp\n+neither is this\n")
    monkeypatch.setattr(llama_source, "PATCH_DIR", folder)


def test_patch_that_does_not_apply_names_itself(tmp_path, monkeypatch):
    _series_with_a_stale_patch(tmp_path / "patches", monkeypatch)
    with pytest.raises(llama_source.SourceError, match="0001-broken.patch does not apply"):
        llama_source.prepare(tmp_path / "llama.cpp")


def test_unpatched_tree_is_refused_as_prepared_dir(tmp_path, monkeypatch):
    tree = tmp_path / "llama.cpp"
    llama_source.extract(llama_source.fetch_sdist(), tree)
    monkeypatch.setenv("FRANKENLLAMA_LLAMA_CPP_DIR", str(tree))
    with pytest.raises(llama_source.SourceError, match="is not patched"):
        llama_source.prepare(tmp_path / "unused")


def test_cli_check_command():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "llama_source.py"), "check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "apply cleanly" in proc.stdout


def _added_lines_per_file(patch_text: str) -> dict[str, tuple[int, bool]]:
    """path -> (lines added, whether the patch creates the file)."""
    files: dict[str, tuple[int, bool]] = {}
    current = None
    for line in patch_text.splitlines():
        if line.startswith("diff --git a/"):
            current = line.split(" b/", 1)[1]
            files[current] = (0, False)
        elif current and line.startswith("new file mode"):
            files[current] = (files[current][0], True)
        elif current and line.startswith("+") and not line.startswith("+++"):
            files[current] = (files[current][0] + 1, files[current][1])
    return files


def test_upstream_files_get_short_hooks_only():
    """The layer-order and layer-program logic lives in files the series creates; llama.cpp's own
    files under src/ and include/ get at most 120 added or changed lines for plain orders (0001,
    0002) and 250 in all, and no per-architecture builder but the smollm3/llama4 NoPE choice (0002)
    is touched."""
    per_patch = [_added_lines_per_file(patch.read_text()) for patch in llama_source.series()]
    ours = {path for files in per_patch for path, (_, created) in files.items() if created}
    upstream = [{path: n for path, (n, _) in files.items() if path not in ours and path.startswith(("src/", "include/"))}
                for files in per_patch]
    plain = sum(sum(files.values()) for files in upstream[:2])
    assert plain <= 120, upstream[:2]
    assert sum(sum(files.values()) for files in upstream) <= 250, upstream
    touched = {path for files in upstream for path in files}
    assert {p for p in touched if p.startswith("src/models/")} <= {"src/models/smollm3.cpp", "src/models/llama4.cpp"}
    assert "src/llama-layer-program.cpp" in ours  # the program logic is in its own file


def test_every_per_layer_hparam_is_remapped(tmp_path):
    """Fails when upstream adds a per-layer hparams array that the layer order does not move."""
    tree = llama_source.prepare(tmp_path / "llama.cpp")
    hparams = (tree / "src" / "llama-hparams.h").read_text()
    per_layer = set(re.findall(r"std::(?:array<[^>]+,\s*LLAMA_MAX_LAYERS>|bitset<LLAMA_MAX_LAYERS>)\s+(\w+)\s*;", hparams))
    assert len(per_layer) >= 18
    remap = (tree / "src" / "llama-layer-order.cpp").read_text()
    moved = set(re.findall(r"remap\(hparams\.(\w+),\s*hparams_file\.\1\)", remap))
    assert per_layer == moved, f"not remapped: {sorted(per_layer - moved)}"


def test_rebase_reports_rejected_hunks(monkeypatch, tmp_path, capsys):
    """rebase on the pinned release applies cleanly; a patch whose context is gone is reported per
    file and hunk (the download is replaced by the pinned archive)."""
    import shutil

    def download(version, folder):
        copy = folder / f"llama_cpp_python-{version}.tar.gz"
        shutil.copy(llama_source.fetch_sdist(), copy)
        return copy

    monkeypatch.setattr(llama_source, "_download", download)
    assert llama_source.rebase(llama_source.VERSION) == 0
    assert "0003-" in capsys.readouterr().out
    _series_with_a_stale_patch(tmp_path / "patches", monkeypatch)
    assert llama_source.rebase(llama_source.VERSION) == 1
    assert "src/llama.cpp: 1 hunk(s) rejected" in capsys.readouterr().out
