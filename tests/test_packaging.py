"""A plain (non-editable) `pip install .` imports correctly and installs no top-level export/runtime; the onnxscript
installed still has the rewrite-rule table the export edits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_install_imports_every_subpackage(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=600)
    top_level = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info"))
    assert top_level == ["bin", "promptmux"] or top_level == ["promptmux"], top_level
    code = ("import promptmux, promptmux.export.deploy, promptmux.runtime.runtime, promptmux.kernels, "
            "promptmux.bench, promptmux.demo, promptmux.cli, promptmux.library.retrieval; print(promptmux.__file__); "
            "print(sorted(p.name for p in (__import__('pathlib').Path(promptmux.demo.__file__).parent"
            " / 'adapters').glob('*/adapter_model.safetensors')))")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=env).stdout.splitlines()
    assert out[0].startswith(str(target))
    assert out[1] == "['adapter_model.safetensors', 'adapter_model.safetensors']"  # both demo adapters ship


def test_the_export_swaps_its_rewrite_rules_in_and_puts_the_table_back():
    """export/onnx_export.py drops SKIPPED_REWRITE_RULES from onnxscript's default table, and adds its own
    EXTRA_REWRITE_RULES, while it exports. If an onnxscript moves or renames that table or the rules, the swap
    silently does nothing: this says so."""
    from onnxscript import rewriter

    from promptmux.export.onnx_export import EXTRA_REWRITE_RULES, SKIPPED_REWRITE_RULES, _optimizer_rules

    table = rewriter._DEFAULT_REWRITE_RULES
    names = {getattr(r, "name", None) for r in table}
    assert SKIPPED_REWRITE_RULES <= names, f"this onnxscript has no rule named {SKIPPED_REWRITE_RULES - names}"
    with _optimizer_rules(SKIPPED_REWRITE_RULES, EXTRA_REWRITE_RULES):
        during = {getattr(r, "name", None) for r in rewriter._DEFAULT_REWRITE_RULES}
    assert during == (names - SKIPPED_REWRITE_RULES) | {"PromptmuxAttention3D"}
    assert rewriter._DEFAULT_REWRITE_RULES is table
