"""`nora-serve` as a real process (the default model, SmolLM2-135M-Instruct, and its demo
adapters, on CPU) driven by the `nora` command line and the Python client: the announced example
command works, a chat question gets the right answer, and SIGTERM drains (health turns
NOT_SERVING, new calls are refused, a stream in flight finishes, exit status 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import jsonschema
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoTokenizer

from nora_client import NoraClient
from nora_proto.v1 import nora_pb2
from nora_runtime.checkpoint import default_checkpoint
from nora_server.app import DEMO_ADAPTER_DIR

DEMO_ADAPTERS = sorted(p.stem for p in DEMO_ADAPTER_DIR.glob("*.safetensors"))

BIN = Path(sys.executable).parent


def command(name: str, module: str) -> list[str]:
    """The installed console script, else the same entry point through `python -m`."""
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


class Serve:
    """`nora-serve` in a subprocess, its output collected line by line."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "NORA_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [*command("nora-serve", "nora_server.cli"), *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 180) -> str:
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line; output:\n"
                                     + "\n".join(self.output)) from None
            self.output.append(line)
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def serve():
    s = Serve("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0",
              "--device", "cpu", "--kv-cache-tokens-cpu", "8192", "--grace-seconds", "60")
    s.port = int(s.wait_for("nora: listening on").split()[3].rsplit(":", 1)[1])
    s.wait_for("nora: serving")
    yield s
    s.kill()


def nora_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*command("nora", "nora_client.cli"), *args], capture_output=True,
                          text=True, timeout=120)


def test_announced_example_and_cli_commands(serve):
    assert len(DEMO_ADAPTERS) >= 2
    adapters = serve.wait_for("nora: adapters:")
    assert adapters == f"nora: adapters: {', '.join(DEMO_ADAPTERS)}"
    example = serve.wait_for("nora: try")
    args = shlex.split(example.split("try", 1)[1])[1:]  # the words after `nora`
    assert args[:5] == ["--target", f"127.0.0.1:{serve.port}", "generate", "--chat",
                        "--adapter"]
    out = nora_cli(*args, "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert re.search(r"\[(length|eos): \d+ prompt \+ \d+ generated tokens\]", out.stderr)

    target = ("--target", f"127.0.0.1:{serve.port}")
    # the Quickstart's question, with the model's own sampling defaults
    out = nora_cli(*target, "generate", "--chat", "What is the capital of France?")
    assert out.returncode == 0 and "Paris" in out.stdout, out.stdout + out.stderr
    out = nora_cli(*target, "health")
    assert (out.returncode, out.stdout.strip()) == (0, "SERVING")
    out = nora_cli(*target, "adapters", "list")
    assert out.returncode == 0 and f"{len(DEMO_ADAPTERS)}/1024 slots used" in out.stdout
    assert [line.split("\t")[0] for line in out.stdout.splitlines()[1:]] == DEMO_ADAPTERS
    demo = DEMO_ADAPTERS[0]
    out = nora_cli(*target, "adapters", "load", "copy", "--path", f"{demo}.safetensors")
    assert out.returncode == 0
    assert out.stdout.startswith(f"loaded copy into slot {len(DEMO_ADAPTERS) + 1}")
    greedy = ("generate", "--chat", "--temperature", "0", "--max-new-tokens", "8", "Hi")
    copy = nora_cli(*target, *greedy, "--adapter", "copy")
    original = nora_cli(*target, *greedy, "--adapter", demo)
    assert copy.returncode == 0 and copy.stdout == original.stdout
    assert nora_cli(*target, "adapters", "unload", "copy").returncode == 0
    out = nora_cli(*target, *greedy, "--adapter", "copy")
    assert out.returncode == 1 and out.stderr.startswith("nora: NOT_FOUND:")
    out = nora_cli(*target, "tokenize", "Hi there")
    tokenizer = AutoTokenizer.from_pretrained(default_checkpoint())
    assert out.returncode == 0
    assert [int(t) for t in out.stdout.split()] == tokenizer.encode("Hi there")


def test_openai_sdk_against_the_default_model(serve):
    """The acceptance of issue 12 point 1: `nora-serve` with the default model, then the
    official openai SDK at the announced base URL (the base model and the demo adapters)."""
    import openai

    prefix = "nora: OpenAI-compatible API at "
    line = next((x for x in serve.output if x.startswith(prefix)), None) or serve.wait_for(prefix)
    url = line.removeprefix(prefix).split()[0]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    assert {m.id for m in api.models.list()} == {"SmolLM2-135M-Instruct", *DEMO_ADAPTERS}
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = api.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question,
                                      temperature=0, max_tokens=24)
    assert "Paris" in out.choices[0].message.content and out.choices[0].finish_reason == "stop"
    signed = api.chat.completions.create(model="sign-off", messages=question, temperature=0,
                                         max_tokens=32)
    assert "answered by nora" in signed.choices[0].message.content
    streamed = api.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question,
                                           temperature=0, max_tokens=24, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) \
        == out.choices[0].message.content
    text = api.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is",
                                  temperature=0, max_tokens=4)
    assert "Paris" in text.choices[0].text
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="no-such-adapter", messages=question, max_tokens=2)
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    structured = api.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=question, temperature=0, max_tokens=48,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "place", "schema": schema, "strict": True}})
    answer = json.loads(structured.choices[0].message.content)
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["city"]


def test_sigterm_drains_a_stream_in_flight(serve):
    with NoraClient(f"127.0.0.1:{serve.port}", retries=0, timeout=120) as nora:
        watch = health_pb2_grpc.HealthStub(nora.channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        # ~0.1-0.5 s a token on a loaded 2-core CPU: well inside the grace period
        call = nora.generate_stream("Hello", max_new_tokens=24, ignore_eos=True)
        parts = [next(call)]

        serve.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            nora.generate("Hello", max_new_tokens=4)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        parts += list(call)  # the stream in flight runs to its end
        assert parts[-1].finish_reason == nora_pb2.FINISH_REASON_LENGTH
        assert sum(len(p.token_ids) for p in parts) == 24
    assert serve.proc.wait(60) == 0
    serve.wait_for("nora: stopped")


def test_flags_and_environment_never_switch_security_off_by_word(monkeypatch, capsys):
    """Numbers may be turned off ("off", "none", ""); tokens and TLS files may not: an empty
    secret in a deployment must stop the server, not serve without auth."""
    from nora_server.cli import configs

    server, engine, _ = configs(["--metrics-port", "off", "--max-input-tokens", "none",
                                 "--auth-token", "s3cret"])
    assert server.metrics_port is None and server.max_input_tokens is None
    assert server.auth_token == "s3cret" and engine.model is None
    for argv, env in ((["--auth-token", ""], {}), ([], {"NORA_ADMIN_TOKEN": ""}),
                      (["--tls-cert", "", "--tls-key", ""], {}), ([], {"NORA_MODEL": ""})):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as exc:
            configs(argv)
        assert exc.value.code == 2, (argv, env)
        assert "must not be empty" in capsys.readouterr().err
        for k in env:
            monkeypatch.delenv(k)
    server, _, _ = configs(["--auth-token", "off"])
    assert server.auth_token == "off"  # a (weak) token, never "no auth"


def test_switch_interval_flag(monkeypatch, capsys):
    """--switch-interval-ms: 0.2 ms by default, "off" leaves Python's own, and a value outside
    (0, 1000] stops the server with a clear error."""
    from nora_server.cli import configs

    assert configs([])[0].switch_interval_ms == 0.2
    assert configs(["--switch-interval-ms", "off"])[0].switch_interval_ms is None
    monkeypatch.setenv("NORA_SWITCH_INTERVAL_MS", "1.5")
    assert configs([])[0].switch_interval_ms == 1.5
    for bad in ("0", "-1", "5000"):
        with pytest.raises(SystemExit):
            configs(["--switch-interval-ms", bad])
        assert "switch_interval_ms must be in (0, 1000]" in capsys.readouterr().err


# ---- process behaviour: ports, stuck workers, optional packages (issue 10) -----------------


def tiny_serve(*args: str) -> Serve:
    """`nora-serve` of the tiny test model (loads in seconds) on free ports."""
    from nora_runtime.tiny import tiny_checkpoint

    return Serve("--model", str(tiny_checkpoint()), "--device", "cpu", "--mode", "replace",
                 "--kv-cache-tokens-cpu", "2048", "--http-port", "0", *args)


def port_of(line: str) -> int:
    return int(line.split()[3].rsplit(":", 1)[1])


def test_ports_in_use_fail_with_one_clear_line():
    """Finding 12: two nora-serve processes bound the same gRPC port (SO_REUSEPORT) and shared
    its calls at random; a /metrics port in use ended in an OSError traceback and "Event loop
    is closed". Both now end with one clear line and exit status 1. With no --host the server
    listens on 127.0.0.1 (finding 10)."""
    first = tiny_serve("--port", "0", "--metrics-port", "0")
    try:
        line = first.wait_for("nora: listening on")
        assert line.startswith("nora: listening on 127.0.0.1:")  # loopback by default
        port = port_of(line)
        assert first.wait_for("nora: metrics at").startswith("nora: metrics at http://127.0.0.1:")

        second = tiny_serve("--port", str(port), "--metrics-port", "0")
        assert second.proc.wait(60) == 1
        out = second.wait_for("nora: cannot listen on")
        assert out.startswith(f"nora: cannot listen on 127.0.0.1:{port} (gRPC)")

        with socket.socket() as taken:  # a metrics port in use
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            third = tiny_serve("--port", "0", "--metrics-port", str(busy))
            assert third.proc.wait(60) == 1
            out = third.wait_for("nora: cannot listen on")
            assert out.startswith(f"nora: cannot listen on 127.0.0.1:{busy} (/metrics)")
        for s in (second, third):
            s.output += list(iter_lines(s))
            text = "\n".join(s.output)
            assert "Traceback" not in text and "Event loop is closed" not in text, text
        with NoraClient(f"127.0.0.1:{port}", retries=0, timeout=60) as nora:
            assert nora.health() in ("SERVING", "NOT_SERVING")  # the first one still answers
    finally:
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(60)


def iter_lines(s: Serve):
    while True:
        try:
            yield s.lines.get(timeout=1)
        except queue.Empty:
            return


def test_sigterm_exits_with_a_worker_thread_stuck(tmp_path):
    """Finding 7: with a worker thread stuck in a call that never returns (LoadAdapter of a
    named pipe in the store; a chat template that loops for hours), SIGTERM printed "stopped"
    but the process never exited. Now it exits within the grace period and a few seconds."""
    from transformers import AutoTokenizer

    from nora_runtime.tiny import tiny_checkpoint

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint(), model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = ("{% for i in range(100000) %}{% for j in range(100000) %}"
                               "{% endfor %}{% endfor %}{{ messages[0]['content'] }}")
    tokenizer.save_pretrained(model)
    store = tmp_path / "store"
    store.mkdir()
    s = Serve("--model", str(model), "--device", "cpu", "--mode", "replace",
              "--kv-cache-tokens-cpu", "2048", "--port", "0", "--metrics-port", "off",
              "--http-port", "off",
              "--grace-seconds", "1", "--adapter-dir", str(store))
    try:
        port = port_of(s.wait_for("nora: listening on"))
        s.wait_for("nora: serving")
        os.mkfifo(store / "pipe.safetensors")  # never written: an open for reading blocks

        def call(fn) -> None:
            with NoraClient(f"127.0.0.1:{port}", retries=0, timeout=60) as nora, \
                    contextlib.suppress(grpc.RpcError):
                fn(nora)

        stuck = [threading.Thread(target=call, args=(fn,), daemon=True) for fn in (
            lambda nora: nora.load_adapter("pipe", path="pipe.safetensors"),
            lambda nora: nora.generate(messages=[{"role": "user", "content": "hi"}]))]
        for t in stuck:
            t.start()
        time.sleep(3)  # both calls reach their worker threads
        start = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(1 + 15) == 0, "the process did not exit"
        assert time.monotonic() - start < 1 + 15
        s.wait_for("nora: stopped")
    finally:
        s.kill()


def test_optional_package_failing_at_import_is_skipped(tmp_path):
    """Code review: grpcio-health-checking newer than grpcio raises RuntimeError at import,
    which crashed startup. Any import failure of an optional package is logged and skipped."""
    # as the real packages' generated *_pb2_grpc modules do (the top-level package imports:
    # `import grpc` imports it and catches only ImportError)
    for name, sub in (("grpc_health", "v1"), ("grpc_reflection", "v1alpha")):
        (tmp_path / name / sub).mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / sub / "__init__.py").write_text(
            "raise RuntimeError('the generated code depends on grpcio>=9.9')\n")
    script = (
        "import asyncio\n"
        "from nora_server.app import NoraServer\n"
        "from nora_server.config import ServerConfig\n"
        "async def main():\n"
        "    server = NoraServer(ServerConfig(port=0, metrics_port=None, http_port=None))\n"
        "    await server.start()\n"
        "    print('started', server.port > 0, server._health is None, flush=True)\n"
        "    await server.stop(0)\n"
        "asyncio.run(main())\n")
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "started True True"
    assert "grpcio-health-checking failed to import (RuntimeError" in out.stderr
    assert "grpcio-reflection failed to import (RuntimeError" in out.stderr
