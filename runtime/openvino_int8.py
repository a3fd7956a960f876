"""precision="int8" on the openvino backend (classifiers): static int8 made by NNCF's post-training quantization
(`nncf.quantize`, the transformer preset, SmoothQuant on), calibrated on the deployment's own batches.

Why NNCF and not a hand-written quantizer: it places the quantizers where OpenVINO's CPU plugin fuses them, its
transformer preset leaves layer norms, element-wise operations and the attention's softmax output unquantized
(NNCF 3.4: min_max/openvino_backend.py ignored metatypes, IgnoredPatternNames.MULTIHEAD_ATTENTION_OUTPUT), and
SmoothQuant moves activation outliers into the weights. Measured on the demo classifiers (studies/nncf_int8.py,
results/nncf-int8-minilm-amd-zen4.json; AMD EPYC Zen 4, 2 threads, each variant in its own process): against
fp32 ONNX Runtime, NNCF int8 on OpenVINO ran 2.08x / 2.52x / 2.45x at B = 1 / 8 / 32 x 64 tokens, ONNX Runtime's
dynamic int8 (quantize.py, with accuracy control) 1.79x / 2.05x / 2.07x; on held-out rows not calibrated on, NNCF
kept 98.1 % / 100 % of fp32's predictions (sentiment / topic; 96.1 % on sentiment without SmoothQuant), ONNX
Runtime's int8 97.0 % / 100 %. Which int8 is faster on another CPU is measured there: precision="fast" times both.

The calibration rows are the contract's (runtime.calibration_items: the user's texts or labelled rows, the
deployment's calibration file, or generated token ids), run through fp32 ONNX Runtime for up to MAX_TASKS of the
tasks whose batches run the graph (calibration_tasks; the main graph also gets prompt tasks' rows batched beside a
prefix task's, as mixed traffic sends them there), and the feeds the graph received are NNCF's dataset. The IR
is kept beside the converted one (openvino/<graph>.int8.xml) with a stamp naming the graph, the recipe, the
calibration rows and the tasks calibrated on; it is made again when one of them changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from promptmux.core.folder import FOLDED_GRAPH, GRAPH
from promptmux.kinds import kind_of

from .batch import round_robin
from .calibration import classifier_batches, items_digest
from .derived import graph_key, is_current, one_maker, stage, write_stamp
from .errors import BackendUnavailable
from .openvino_session import OpenVinoSession, convert_graph, import_openvino, ir_folder
from .text import too_long

if TYPE_CHECKING:  # the annotations only: runtime.py imports this module
    from promptmux.runtime.runtime import Runtime

log = logging.getLogger("promptmux.runtime")

RECIPE = "nncf-ptq-transformer-smoothquant"
MAX_TASKS = 8  # tasks calibrated on: a deployment of many tasks calibrates on a sample of them
MAX_BATCHES = 64  # NNCF dataset items (a batch of up to 32 rows each)
SCAN = 4096  # tasks looked at to find those whose batches run a graph


def import_nncf():
    try:
        import nncf
    except ImportError:
        raise BackendUnavailable("precision int8 on backend openvino needs NNCF, which is not installed: pip install "
                                 "'promptmux[int8]' (or use --backend onnxruntime, whose int8 needs nothing more)"
                                 ) from None
    return nncf


def int8_session(rt: Runtime, path: Path) -> OpenVinoSession:
    """An OpenVINO session over the NNCF int8 IR of graph `path` of rt's deployment (made first if it is missing
    or stale)."""
    xml = int8_ir(rt, path)
    return OpenVinoSession(path, "int8", rt.threads, ir=xml)


def recipe() -> str:
    """The recipe with NNCF's version: a contract measured on an IR another NNCF made is measured again."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{RECIPE}-nncf{version('nncf')}"
    except PackageNotFoundError:
        return RECIPE


def int8_ir(rt: Runtime, path: Path) -> Path:
    nncf = import_nncf()
    ov = import_openvino()
    path = path.resolve()
    folder = ir_folder(path.parent)
    items = getattr(rt, "calibration_items", None)
    tasks = calibration_tasks(rt, path)
    identity = {"graph": graph_key(path), "recipe": recipe(),
                "calibration": None if items is None else items_digest(items),
                "tasks": {t: rt.bank.digest(t) for t in tasks}}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    xml, stamp = folder / f"{path.stem}.int8.xml", folder / f"{path.stem}.int8.json"
    if is_current(xml, stamp, key):
        return xml
    # One process makes it; the others wait and find it made (two servers on one deployment, or deployments
    # sharing a graph): the .bin, .xml and stamp of one quantization, never a mix.
    with one_maker(xml):
        if is_current(xml, stamp, key):
            return xml
        if not tasks:
            raise BackendUnavailable(f"none of the first {SCAN} tasks runs {path.name}, so there is nothing to "
                                     "calibrate its int8 on; use --backend onnxruntime for int8")
        log.warning("quantizing %s to int8 with NNCF on %s (once per deployment, calibration and task set)",
                    path.name, "generated inputs" if items is None else f"{len(items)} calibration rows")
        fp32_xml = convert_graph(path, folder)
        feeds = calibration_feeds(rt, path, items, tasks)
        model = ov.Core().read_model(str(fp32_xml))
        names = [i.any_name for i in model.inputs]
        dataset = nncf.Dataset(feeds, lambda feed: {n: feed[n] for n in names})
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is the commands' JSON
            quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
        stamp.unlink(missing_ok=True)  # a process killed below leaves no stamp: the IR is made again
        with stage(xml) as tmp:
            staged = Path(tmp) / xml.name  # the fp32 IR's weights are memory-mapped: never write over a mapped file
            ov.save_model(quantized, str(staged), compress_to_fp16=False)
            for suffix in (".bin", ".xml"):
                os.replace(staged.with_suffix(suffix), xml.with_suffix(suffix))
        write_stamp(stamp, key, **identity, batches=len(feeds))
    return xml


def calibration_tasks(rt: Runtime, path: Path) -> list[str]:
    """The tasks graph `path` is calibrated on (of the first SCAN tasks): the folded task for the folded graph;
    where the deployment has a graph without prefix inputs, up to MAX_TASKS tasks without a key/value prefix for
    that one, and for the main graph up to MAX_TASKS tasks with one, then up to MAX_TASKS // 2 without (their rows
    run there too, batched beside a prefix task's: calibration_feeds); otherwise the first MAX_TASKS tasks."""
    if path.name == FOLDED_GRAPH:
        return [rt.folded_task] if rt.folded_task else []
    noprefix = (rt.manifest["graph"].get("noprefix") or {}).get("file")
    if not noprefix:
        return rt.bank.page(MAX_TASKS)[0]
    if path.name == noprefix:
        return _split_tasks(rt, 0, MAX_TASKS)[1]
    prefixed, plain = _split_tasks(rt, MAX_TASKS, MAX_TASKS // 2)
    return prefixed + plain if prefixed else []


def _split_tasks(rt: Runtime, with_prefix: int, without: int) -> tuple[list[str], list[str]]:
    """(up to `with_prefix` tasks with a key/value prefix, up to `without` tasks without), the first found among
    the first SCAN tasks; the scan stops once both are found (each task looked at is read from the bank)."""
    prefixed, plain, after, more, seen = [], [], None, True, 0
    while more and seen < SCAN and (len(prefixed) < with_prefix or len(plain) < without):
        names, more = rt.bank.page(256, after)
        if not names:
            break
        after, seen = names[-1], seen + len(names)
        for name in names:
            (prefixed if _has_prefix(rt, name) else plain).append(name)
            if len(prefixed) >= with_prefix and len(plain) >= without:
                break
    return prefixed[:with_prefix], plain[:without]


def _has_prefix(rt: Runtime, task: str) -> bool:
    """Whether the task's batches need the graph with prefix inputs (a key/value prefix)."""
    view = rt.bank.view(task)
    return kind_of(view).kv_prefix(view) is not None


def calibration_feeds(rt: Runtime, path: Path, items, tasks: list[str]) -> list[dict[str, np.ndarray]]:
    """The feeds graph `path` receives when fp32 ONNX Runtime answers the calibration rows, task by task (a task's
    labelled rows where it has some, else every text, else generated token ids): NNCF's dataset. On the main graph
    of a deployment that has one without prefix inputs, a task without a key/value prefix runs its rows in mixed
    batches, every other row given to the first prefix task: served traffic sends such batches there, and an IR
    calibrated on prefix tasks alone flipped every near-tied answer of a prompt task in mixed batches (the tiny
    test model of tests/test_precision.py::test_int8_on_openvino_..., whose contract now measures mixed batches)."""
    exact = type(rt)(rt.dir, backend="onnxruntime", threads=rt.threads)
    noprefix = (rt.manifest["graph"].get("noprefix") or {}).get("file")
    attr = {GRAPH: "session", FOLDED_GRAPH: "folded_session", noprefix: "noprefix_session"}.get(path.name)
    captured: list[dict] = []
    if attr is None or getattr(exact, attr) is None:
        return captured
    setattr(exact, attr, _Capture(getattr(exact, attr), captured))
    texts = [t for t in items or () if isinstance(t, str)] or None
    with_prefix = [t for t in tasks if _has_prefix(rt, t)] if noprefix and path.name == GRAPH else []
    partner = with_prefix[0] if with_prefix else None
    # prefix and prompt tasks in turn, so that the batch cap keeps some of each
    order = round_robin([with_prefix, [t for t in tasks if t not in with_prefix]]) if partner else tasks
    for task in order:
        mine = [r["text"] for r in items or () if isinstance(r, dict) and r["task"] == task]
        alone = partner is None or task in with_prefix
        for ids, mask, types in classifier_batches(exact, mine or texts, task):
            beside = not alone and not too_long(ids.shape[1], exact.bank.view(partner).num_virtual_tokens, partner,
                                                exact.max_positions)  # else alone: this graph never sees it
            exact.forward(ids, mask, [task if i % 2 == 0 or not beside else partner for i in range(len(ids))],
                          types)
            if len(captured) >= MAX_BATCHES:
                return captured
    return captured


class _Capture:
    """Wraps a session of the fp32 runtime: keeps a copy of the feeds of every batch it runs."""

    def __init__(self, session, out: list):
        self.session, self.out = session, out

    def run(self, feeds, bank_key=None):
        self.out.append({k: np.array(v) for k, v in feeds.items()})
        return self.session.run(feeds, bank_key)

    def __getattr__(self, name):  # input_names, ...
        return getattr(self.session, name)
