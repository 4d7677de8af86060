"""llama-cpp-python 0.3.36's own test suite passes against frankenllama's library exactly as it does
against the unpatched one.

The suite (``tests/`` of the pinned source distribution, plus the vocabulary models it opens from
``vendor/llama.cpp/models/``) is extracted into a temporary folder and run twice with pytest in a
subprocess: once after ``import frankenllama`` (the patched library, bound the way users bind it)
and once with ``LLAMA_CPP_LIB_PATH`` at the unpatched build of the same source.  The per-test
outcomes (from ``--junitxml``) must be identical, every test must pass except those that need a
Hugging Face hub download, and those are skipped, with the same reason, in both runs.

Hub downloads: this suite runs offline, so ``huggingface_hub.hf_hub_download`` is replaced in the
subprocess by a function that skips the calling test (deterministically, even where the real
package is installed and the network is up).  The suite imports ``huggingface_hub`` and
``scipy.special.log_softmax`` at module level; where they are not installed, a stub module stands
in: the hub stub only skips, the ``log_softmax`` stub (imported but never called by the suite)
raises, so a test that started to use it would fail in both runs rather than pass.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import frankenllama
import llama_source

PEER_TESTS = ("test_llama.py", "test_llama_chat_format.py", "test_llama_grammar.py", "test_llama_speculative.py")
HUB_SKIP = "frankenllama peer suite: needs a Hugging Face hub download"
#: tests of the suite that run offline (and must pass in both bindings); the other 18 need the hub
MIN_PASSED = 8
#: the suite's plain-transformer hub model, and the tests that take it as a parameter
TRANSFORMER_HUB_FILE = "ggml-org/models/tinyllamas/stories15M-q4_0.gguf"
TRANSFORMER_CASES = "llama_cpp_transformer_model_path"

CONFTEST = '''
"""Written by frankenllama's tests/test_peer_suite.py: binds the library, stubs the hub."""
import json
import os
import sys
import types

import pytest

HUB_SKIP = {hub_skip!r}


SUBSTITUTES = json.loads(os.environ.get("PEER_SUBSTITUTES", "{{}}"))


def _hub_download(repo_id, filename=None, *args, **kwargs):
    local = SUBSTITUTES.get(f"{{repo_id}}/{{filename}}")
    if local is None:
        pytest.skip(f"{{HUB_SKIP}} ({{repo_id}}/{{filename}})")
    return local


def _stub(name, **attrs):
    module = types.ModuleType(name)
    module.__file__ = "<frankenllama peer-suite stub>"
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


try:
    import huggingface_hub
except ImportError:
    huggingface_hub = _stub("huggingface_hub")
huggingface_hub.hf_hub_download = _hub_download

try:
    import scipy.special  # noqa: F401
except ImportError:
    def _log_softmax(*args, **kwargs):
        raise NotImplementedError("scipy is not installed: the peer suite's stub only satisfies its import")
    sys.modules["scipy"] = _stub("scipy", special=_stub("scipy.special", log_softmax=_log_softmax))

if os.environ["PEER_BINDING"] == "frankenllama":
    import frankenllama  # noqa: F401  (binds the patched library before llama_cpp is imported)

import llama_cpp.llama_cpp as _lib_module

with open(os.environ["PEER_REPORT"], "w") as _f:
    json.dump({{"library": str(_lib_module._lib._name),
               "patched": hasattr(_lib_module._lib, "llama_layer_order_version")}}, _f)
'''


@pytest.fixture(scope="module")
def peer_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist's tests/ and the model files they open, laid out as in the source tree."""
    root = tmp_path_factory.mktemp("peer")
    prefix = f"llama_cpp_python-{llama_source.VERSION}/"
    with tarfile.open(llama_source.fetch_sdist()) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in PEER_TESTS:
            member = members[f"{prefix}tests/{name}"]
            (root / name).write_bytes(tar.extractfile(member).read())
        models = sorted({m for name in PEER_TESTS
                         for m in re.findall(r"\./(vendor/llama\.cpp/models/[\w.\-/]+)", (root / name).read_text())})
        assert models, "the peer suite names no local model file: has its layout changed?"
        for rel in models:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(members[prefix + rel]).read())
    (root / "conftest.py").write_text(CONFTEST.format(hub_skip=HUB_SKIP))
    (root / "pytest.ini").write_text("[pytest]\naddopts =\n")  # keep the repository's config out
    return root


def _run(suite: Path, binding: str, env_lib: str | None, *args: str,
         substitutes: dict[str, str] | None = None) -> tuple[dict[str, tuple[str, str]], dict, str]:
    """Run the suite; per-test (outcome, skip message), the conftest's library report, the output."""
    xml, report = suite / f"{binding}.xml", suite / f"{binding}.json"
    xml.unlink(missing_ok=True)
    report.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "PYTEST_ADDOPTS")}
    if binding == "stock":
        env.pop("FRANKENLLAMA_LIB_DIR", None)
    if env_lib is not None:
        env["LLAMA_CPP_LIB_PATH"] = env_lib
    # the cwd is the suite's folder (it opens ./vendor/...): make frankenllama importable from there too
    package_parent = str(Path(frankenllama.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_parent, *filter(None, [env.get("PYTHONPATH")])])
    env.update(PEER_BINDING=binding, PEER_REPORT=str(report), HF_HUB_OFFLINE="1",
               PEER_SUBSTITUTES=json.dumps(substitutes or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", f"--junitxml={xml}",
         *(args or PEER_TESTS)],
        cwd=suite, env=env, capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert xml.exists() and report.exists(), f"the {binding} run did not report:\n{output}"

    outcomes: dict[str, tuple[str, str]] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, child.get("message", "")
                break
        assert test_id not in outcomes, f"duplicate test id {test_id}"
        outcomes[test_id] = (outcome, message if outcome == "skipped" else "")
    return outcomes, json.loads(report.read_text()), output


def test_peer_suite_same_outcomes(peer_suite: Path, stock_lib_dir: str):
    patched, patched_lib, patched_out = _run(peer_suite, "frankenllama", None)
    stock, stock_lib, stock_out = _run(peer_suite, "stock", stock_lib_dir)

    # each run really used the library it was meant to
    assert patched_lib["patched"], patched_lib
    assert Path(patched_lib["library"]).resolve() == frankenllama.native_library_path().resolve()
    assert not stock_lib["patched"], stock_lib
    assert Path(stock_lib["library"]).resolve().parent == Path(stock_lib_dir).resolve()

    # the same tests, with the same outcome each
    assert sorted(patched) == sorted(stock), "the two runs collected different tests"
    differ = {t: (patched[t], stock[t]) for t in patched if patched[t] != stock[t]}
    assert not differ, (f"outcomes differ (frankenllama, stock): {differ}\n"
                        f"--- frankenllama run:\n{patched_out}\n--- stock run:\n{stock_out}")

    # and the suite passes: every test passes but those needing the hub, which are skipped for that
    bad = {t: o for t, o in patched.items()
           if o[0] in ("failure", "error") or (o[0] == "skipped" and HUB_SKIP not in o[1])}
    assert not bad, f"peer tests that neither pass nor skip for the hub: {bad}\n{patched_out}"
    passed = sorted(t for t, o in patched.items() if o[0] == "passed")
    assert len(passed) >= MIN_PASSED, f"only {len(passed)} peer tests passed: {passed}\n{patched_out}"
    # the suite's one test that loads a model through the library (a vocabulary-only GGUF) ran
    assert "test_llama::test_llama_cpp_tokenization" in passed


def test_peer_cache_tests_with_local_transformer(peer_suite: Path, stock_lib_dir: str, smollm2_path: str):
    """Beyond the offline suite: its prompt-cache and state save/load tests, parametrized over
    model kinds, are architecture-agnostic (they compare a cached or restored model against a fresh
    one), so their plain-transformer case also runs with SmolLM2 standing in for the hub's
    stories15M.  Same rule: identical outcomes in both bindings, and all of them pass."""
    selection = ("test_llama.py", "-k", TRANSFORMER_CASES)
    substitutes = {TRANSFORMER_HUB_FILE: smollm2_path}
    patched, patched_lib, patched_out = _run(peer_suite, "frankenllama", None, *selection, substitutes=substitutes)
    stock, stock_lib, stock_out = _run(peer_suite, "stock", stock_lib_dir, *selection, substitutes=substitutes)
    assert patched_lib["patched"] and not stock_lib["patched"]

    assert len(patched) == 4, f"expected the 4 transformer cases, ran {sorted(patched)}\n{patched_out}"
    assert patched == stock, f"outcomes differ:\n--- frankenllama:\n{patched_out}\n--- stock:\n{stock_out}"
    assert all(o[0] == "passed" for o in patched.values()), f"{patched}\n{patched_out}"
