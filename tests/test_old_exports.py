"""Exports written by older moe-dist code keep loading, to the same logits.

The fixtures in tests/fixtures/exports/*.tar.gz were written before the package restructure and are
never regenerated (see their README); they are unpacked into a temporary folder for the tests. Loading goes
both ways an export is used: through the installed
package (`import moe_dist` registers the classes), and with `trust_remote_code=True` in a process that
never imports moe_dist, where the model code carried in the folder runs.
"""

import tarfile
import textwrap
from pathlib import Path

import pytest
import torch
from launcher import FIXTURES, run_without_moe_dist
from safetensors.torch import load_file

ARCHIVES = sorted((FIXTURES / "exports").glob("*.tar.gz"))
EXPORTS = sorted(name for archive in ARCHIVES for name in {m.split("/")[0] for m in tarfile.open(archive).getnames()})


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("old_exports")
    for archive in ARCHIVES:
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    return root


def test_there_are_old_exports_to_check():
    assert set(EXPORTS) >= {"v0.1-tiny-moe", "v0.1-tiny-modern"}


@pytest.mark.parametrize("name", EXPORTS)
def test_old_export_loads_with_the_installed_package_to_the_same_logits(unpacked, name):
    export = unpacked / name
    from transformers import AutoModelForCausalLM

    import moe_dist  # noqa: F401

    reference = load_file(export / "reference.safetensors")
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(model).__module__.startswith("moe_dist.")
    with torch.no_grad():
        logits = model(reference["input_ids"], use_cache=False).logits
    torch.testing.assert_close(logits, reference["logits"], atol=1e-5, rtol=0)
    # Decoding with the cache is the path transformers changes under us (5.24 renamed it).
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ids = reference["input_ids"][:1]
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize("name", EXPORTS)
def test_old_export_loads_with_trust_remote_code_without_moe_dist(unpacked, name, tmp_path):
    export = unpacked / name
    script = textwrap.dedent(f"""
        import sys
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(export)!r}, trust_remote_code=True).eval()
        assert "moe_dist" not in sys.modules, "moe_dist was imported"
        reference = load_file({str(export / "reference.safetensors")!r})
        with torch.no_grad():
            logits = model(reference["input_ids"], use_cache=False).logits
        torch.testing.assert_close(logits, reference["logits"], atol=1e-5, rtol=0)
        print("OK", type(model).__module__)
    """)
    result = run_without_moe_dist(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK transformers_modules." in result.stdout
