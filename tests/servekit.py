"""Helpers for the server tests: tiny deployments that take text, and a real `promptmux serve` process."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import adapter_configs, make_adapter, make_base

SERVE_ADAPTERS = ("pt", "ptmlp", "prefix", "mpt")  # tasks pt, ptmlp, prefix, mpt/0, mpt/1, mpt/2
NEWER_ADAPTERS = ("cartridge", "cpt")  # PEFT's newer methods, served where PEFT supports them (CPT: causal LMs)
EXTRA_ADAPTER = "ptlstm"  # kept out of the deployment: the admin endpoint adds it under load
# The servers' logs and sitecustomize folders, in one folder per test process that conftest's pytest_sessionfinish
# removes (a file per server in /tmp itself had left hundreds behind; pytest-xdist's workers skip atexit handlers).
SCRATCH = tempfile.mkdtemp(prefix="promptmux-serve-")


def char_tokenizer(arch: str):
    """A character-level tokenizer that fits the tiny models' 120-token vocabulary (ids 4..98: ASCII 32..126)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<cls>": 2, "<sep>": 3}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    tok.decoder = decoders.Fuse()
    if arch == "bert":
        tok.post_processor = processors.TemplateProcessing(single="<cls> $A <sep>",
                                                           special_tokens=[("<cls>", 2), ("<sep>", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                       cls_token="<cls>", sep_token="<sep>")
    # The tiny GPT-2's EOS is id 0.
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>")


class TextDeployment:
    def __init__(self, arch: str, root: Path, build: bool = True):
        """build=False: the files are already in root (a shared build, conftest.built_once)."""
        from promptmux import export_deployment

        self.arch = arch
        self.base = root / "base"
        self.adapter_root = root / "adapters"
        cfgs = adapter_configs(arch)
        newer = tuple(n for n in NEWER_ADAPTERS if n in cfgs)
        names = SERVE_ADAPTERS + (EXTRA_ADAPTER,) + newer
        self.adapters = {name: self.adapter_root / name for name in names}
        self.deploy = root / "deploy"
        self.tasks = ["pt", "ptmlp", "prefix", "mpt/0", "mpt/1", "mpt/2", *newer]
        if build:
            make_base(arch, self.base)
            char_tokenizer(arch).save_pretrained(self.base)
            for seed, name in enumerate(names):
                make_adapter(arch, self.base, cfgs[name], self.adapters[name], seed=seed + 1)
            export_deployment(self.base, {n: p for n, p in self.adapters.items() if n != EXTRA_ADAPTER},
                              self.deploy, quiet=True)


class ServerProcess:
    """`promptmux serve DIR --port 0 ...` on loopback; the port comes from its first stdout line."""

    def __init__(self, deploy, *args: str, start_timeout: float = 120.0, step_delay: float = 0.0):
        """step_delay: seconds each generation step of the server sleeps first, so that a test can hold work in
        flight (a tiny model finishes before a test can look); set through a sitecustomize the server imports."""
        self.log = tempfile.NamedTemporaryFile("w+", dir=SCRATCH, suffix=".log", delete=False)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if step_delay:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [_slow_steps(step_delay), env.get("PYTHONPATH")]))
        # A session of its own: whatever the server starts (Ray's processes) can be stopped as one group.
        self.proc = subprocess.Popen([sys.executable, "-m", "promptmux", "serve", str(deploy), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                     start_new_session=True)
        line = self._first_line(start_timeout)
        self.url = json.loads(line)["serving"]
        self.grpc = json.loads(line).get("grpc")  # host:port with --grpc-port
        self.pid = self.proc.pid

    def _first_line(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = self.proc.stdout.readline()
                if line.startswith("{"):
                    return line
                if not line and self.proc.poll() is not None:
                    break
            elif self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"the server did not start:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:  # anything of its group still alive (it stopped without cleaning up)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode


def _slow_steps(delay: float) -> str:
    """A folder whose sitecustomize.py makes every Generator.step sleep `delay` seconds first."""
    folder = tempfile.mkdtemp(prefix="slow-steps-", dir=SCRATCH)
    Path(folder, "sitecustomize.py").write_text(
        "import time\n"
        "from promptmux.runtime.generate import Generator\n"
        "_step = Generator.step\n"
        "def _slow_step(self, *args):\n"
        f"    time.sleep({delay!r})\n"
        "    return _step(self, *args)\n"
        "Generator.step = _slow_step\n")
    return folder


def text_deployments(tmp_path_factory) -> dict[str, TextDeployment]:
    """Tiny BERT and GPT-2 deployments with a tokenizer, built once per test run (conftest's session fixture
    `text_deployments` serves them)."""
    from conftest import built_once

    return {arch: TextDeployment(arch, built_once(tmp_path_factory, f"serve-{arch}",
                                                  lambda folder, arch=arch: TextDeployment(arch, folder)), build=False)
            for arch in ("bert", "gpt2")}


def server_fixture(deploy, *args, **kwargs):
    """A generator for pytest fixtures: the server runs for the fixture's scope and is always stopped."""
    server = ServerProcess(deploy, *args, **kwargs)
    try:
        yield server
    finally:
        server.stop()


running_server = contextlib.contextmanager(server_fixture)  # with running_server(DIR, *args) as server: ...


def raw_exchange(url: str, data: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    """Send raw bytes on a fresh connection to url, read until the server closes it (or wait passes): (what came
    back, seconds). For what an HTTP client library will not send: partial or oversized heads."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        start = time.monotonic()
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out, time.monotonic() - start
