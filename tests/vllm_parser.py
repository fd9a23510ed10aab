"""vLLM's own command-line parser (in `.venv-vllm`), for tests that hold a rendered argv to what vLLM reads.

ONE process per test session answers every test (the `vllm_parser` fixture in tests/conftest.py): importing vLLM
takes 30 s on an idle core and 130 s on CI's loaded 2 cores, and three tests each paid it in their own
subprocess before. The process reads one JSON list of argvs per line and answers one line per request, marked
(vLLM's import may log to stdout), with for each argv what the parser and vLLM's engine arguments made of it,
or the parser's error for that argv.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
MARK = "@@baton-vllm-parse@@ "

SERVER = r"""
import json, sys, traceback
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.engine.arg_utils import AsyncEngineArgs
MARK = sys.argv[1]

def parse(argv):
    try:
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        validate_parsed_serve_args(args)
        args.model = args.model_tag or args.model
        engine = AsyncEngineArgs.from_cli_args(args)
    except BaseException as exc:  # argparse exits (SystemExit) on a flag it does not know
        return {"error": f"{type(exc).__name__}: {exc}"}
    kv = engine.kv_transfer_config
    return {"model": args.model, "host": args.host, "port": args.port,
            "shutdown_timeout": args.shutdown_timeout,
            "otlp_traces_endpoint": engine.otlp_traces_endpoint,
            "served_model_name": engine.served_model_name,
            "tensor_parallel_size": engine.tensor_parallel_size, "max_model_len": engine.max_model_len,
            "distributed_executor_backend": engine.distributed_executor_backend,
            "kv": None if kv is None else {"kv_connector": kv.kv_connector, "kv_role": kv.kv_role,
                                           "kv_buffer_device": kv.kv_buffer_device}}

print(MARK + json.dumps("ready"), flush=True)
for line in sys.stdin:
    print(MARK + json.dumps([parse(a) for a in json.loads(line)]), flush=True)
"""


class VllmParser:
    """The parser process; `parse(argvs)` -> one dict per argv (see SERVER), `close()` at the end."""

    def __init__(self, python: Path = VLLM_PYTHON, start_timeout: float = 600.0) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the process
        env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "VLLM_TARGET_DEVICE": "cpu",
               "VLLM_NO_USAGE_STATS": "1", "HOME": os.environ.get("HOME", "/root")}
        self._proc = subprocess.Popen([str(python), "-c", SERVER, MARK], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        self._answers: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._read(start_timeout)  # "ready": vLLM imported

    def _pump(self) -> None:
        """Every marked stdout line onto the queue (vLLM's own log lines dropped); None at EOF."""
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(MARK):
                self._answers.put(line[len(MARK):])
        self._answers.put(None)

    def parse(self, argvs: list[list[str]], timeout: float = 120.0) -> list[dict]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(argvs) + "\n")
        self._proc.stdin.flush()
        return self._read(timeout)

    def _read(self, timeout: float):
        try:
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"vLLM's parser did not answer within {timeout:.0f} s{self._tail()}") from None
        if answer is None:
            raise AssertionError(f"vLLM's parser exited (rc={self._proc.wait()}){self._tail()}")
        return json.loads(answer)

    def _tail(self) -> str:
        self._stderr.seek(0)
        return ": ...\n" + self._stderr.read()[-3000:]

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()
