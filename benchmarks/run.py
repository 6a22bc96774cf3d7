"""flambeau vs TorchServe 0.12.0, side by side, on the same archives and the same load.

One command (``python benchmarks/run.py``) builds the archives, installs TorchServe into
``benchmarks/.venv-ts`` if needed, and for each model runs TorchServe as shipped, TorchServe
tuned (``OMP_NUM_THREADS=1``) and flambeau as shipped, one after the other, each loaded by
``wrk`` (a C load generator: no Python in the measuring loop) at each concurrency. It prints
throughput, p50/p99 latency, cold start and memory, with flambeau/TorchServe ratios, and the
raw in-process torch throughput as the ceiling. Results go to ``benchmarks/out/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_models import MODELS, BenchModel, build_archive, raw_ceiling, request_body  # noqa: E402

TS_VENV = HERE / ".venv-ts"
OUT = HERE / "out"
PORT = 8080
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.body = f:read("*all")
f:close()
"""


@dataclass
class LoadResult:
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass
class RunResult:
    variant: str
    model: str
    cold_start_s: float
    ping_s: float = 0.0
    server_rss_mb: float = 0.0
    worker_rss_mb: float = 0.0
    idle_server_rss_mb: float = 0.0
    loads: list[LoadResult] = field(default_factory=list)


# ------------------------------------------------------------------------------------ setup


def ensure_torchserve() -> Path:
    python = TS_VENV / "bin" / "python"
    if not (TS_VENV / "bin" / "torchserve").exists():
        print("installing TorchServe 0.12.0 into", TS_VENV, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TS_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run(
            [*pip, "torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml", "numpy"],
            check=True,
        )
    return TS_VENV / "bin"


def ensure_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False)
        wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is required (apt-get install wrk)")
    return wrk


# ------------------------------------------------------------------------------------ servers


class Server:
    """Start/stop one server variant in its own working directory."""

    def __init__(self, variant: str, store: Path, model: str, ts_bin: Path) -> None:
        self.variant = variant
        self.store = store
        self.model = model
        self.ts_bin = ts_bin
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
        (self.workdir / "config.properties").write_text(
            "inference_address=http://127.0.0.1:8080\n"
            "management_address=http://127.0.0.1:8081\n"
            "metrics_address=http://127.0.0.1:8082\n"
            "disable_token_authorization=true\n"
        )
        self.env = {**os.environ, "LOG_LOCATION": str(self.workdir / "logs")}
        self.env.pop("OMP_NUM_THREADS", None)
        if variant == "torchserve-tuned":
            self.env["OMP_NUM_THREADS"] = "1"
        self.env["FLAMBEAU_PID_FILE"] = str(self.workdir / "flambeau.pid")
        self.ping_s = 0.0
        # TorchServe writes its pid file to $TMPDIR/.model_server.pid: keep it ours.
        self.env["TMPDIR"] = str(self.workdir)

    def start(self) -> float:
        args = [
            "--model-store",
            str(self.store),
            "--models",
            f"{self.model}={self.model}.mar",
            "--ncs",
            "--ts-config",
            str(self.workdir / "config.properties"),
        ]
        if self.variant.startswith("torchserve"):
            cmd = [str(self.ts_bin / "torchserve"), "--start", *args, "--disable-token-auth"]
            self.env["PATH"] = f"{self.ts_bin}:{self.env['PATH']}"
        else:
            cmd = [str(ROOT / ".venv" / "bin" / "flambeau"), "start", *args]
        started = time.monotonic()
        launcher = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        body = (HERE / "out" / f"{self.model}.bin").read_bytes()
        deadline = started + 180
        ping_s = None
        while time.monotonic() < deadline:
            if ping_s is None and _answers(f"http://127.0.0.1:{PORT}/ping"):
                ping_s = time.monotonic() - started
            if ping_s is not None:
                with contextlib.suppress(Exception):
                    if _post(f"http://127.0.0.1:{PORT}/predictions/{self.model}", body) == 200:
                        self.ping_s = ping_s
                        launcher.wait(60)
                        return time.monotonic() - started
            time.sleep(0.01)
        raise RuntimeError(f"{self.variant} never served {self.model}")

    def processes(self) -> tuple[psutil.Process | None, list[psutil.Process]]:
        """This server's frontend process and its worker processes (its descendants only:
        other servers on the machine are none of our business)."""
        pid_file = self.workdir / (
            ".model_server.pid" if self.variant.startswith("torchserve") else "flambeau.pid"
        )
        try:
            frontend = psutil.Process(int(pid_file.read_text().strip()))
            workers = [
                child
                for child in frontend.children(recursive=True)
                if "python" in (child.name() or "")
            ]
        except (OSError, ValueError, psutil.Error):
            return None, []
        return frontend, workers

    def stop(self) -> None:
        frontend, workers = self.processes()
        if self.variant.startswith("torchserve"):
            cmd = [str(self.ts_bin / "torchserve"), "--stop"]
        else:
            cmd = [str(ROOT / ".venv" / "bin" / "flambeau"), "stop"]
        subprocess.run(
            cmd,
            cwd=self.workdir,
            env=self.env,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Leave nothing of this server behind for the next variant (ports, CPU).
        for proc in [p for p in [frontend, *workers] if p is not None]:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        time.sleep(1.0)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _answers(url: str) -> bool:
    """Whether the server answers HTTP at all (any status: /ping is 500 until models load)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            response.read()
    except urllib.error.HTTPError:
        return True
    except (OSError, urllib.error.URLError):
        return False
    return True


def _post(url: str, body: bytes) -> int:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/octet-stream"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
        return int(response.status)


# ------------------------------------------------------------------------------------ load


def run_wrk(wrk: str, model: str, concurrency: int, seconds: float) -> LoadResult:
    script = OUT / "post.lua"
    script.write_text(WRK_SCRIPT)
    env = {**os.environ, "BENCH_BODY": str(OUT / f"{model}.bin")}
    threads = 1 if concurrency < 4 else 2
    out = subprocess.run(
        [
            wrk,
            "-t",
            str(threads),
            "-c",
            str(concurrency),
            "-d",
            f"{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{PORT}/predictions/{model}",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return LoadResult(concurrency, rps, _percentile(out, "50%"), _percentile(out, "99%"), errors)


def _percentile(out: str, label: str) -> float:
    match = re.search(rf"{re.escape(label)}\s+([\d.]+)(us|ms|s)", out)
    if match is None:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


class RssSampler:
    """Peak RSS of the frontend and the sum of workers while a load runs."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.frontend_mb = 0.0
        self.workers_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            frontend, workers = self.server.processes()
            with contextlib.suppress(psutil.Error):
                if frontend is not None:
                    self.frontend_mb = max(self.frontend_mb, frontend.memory_info().rss / 2**20)
                total = sum(w.memory_info().rss for w in workers) / 2**20
                self.workers_mb = max(self.workers_mb, total)
            self._stop.wait(0.25)


# ------------------------------------------------------------------------------------ main


def bench_variant(
    variant: str, model: BenchModel, args: argparse.Namespace, ts_bin: Path, wrk: str
) -> RunResult:
    server = Server(variant, OUT / "store", model.name, ts_bin)
    try:
        cold = server.start()
        result = RunResult(variant, model.name, cold, server.ping_s)
        frontend, _ = server.processes()
        if frontend is not None:
            result.idle_server_rss_mb = frontend.memory_info().rss / 2**20
        run_wrk(wrk, model.name, max(args.concurrency), 2)  # warm-up
        with RssSampler(server) as sampler:
            for concurrency in args.concurrency:
                load = run_wrk(wrk, model.name, concurrency, args.duration)
                result.loads.append(load)
                print(
                    f"  {variant:18} {model.name:8} c={concurrency:<3} {load.rps:9.1f} req/s  "
                    f"p50 {load.p50_ms:7.2f} ms  p99 {load.p99_ms:7.2f} ms  errors {load.errors}",
                    flush=True,
                )
        result.server_rss_mb = sampler.frontend_mb
        result.worker_rss_mb = sampler.workers_mb
        return result
    finally:
        server.stop()


def report(results: list[RunResult], ceilings: dict[str, float]) -> str:
    lines = []
    by_key = {(r.variant, r.model): r for r in results}
    for model in sorted({r.model for r in results}):
        fl = by_key.get(("flambeau", model))
        lines.append(f"\n## {model} (raw in-process ceiling: {ceilings[model]:.0f} req/s)\n")
        lines.append(
            "| variant | conc | req/s | p50 ms | p99 ms | errors | flambeau/this req/s "
            "| flambeau/this p50 |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for variant in ("torchserve-shipped", "torchserve-tuned", "flambeau"):
            run = by_key.get((variant, model))
            if run is None:
                continue
            for load in run.loads:
                ratio_rps = ratio_p50 = ""
                if fl is not None and variant != "flambeau":
                    mine = next(x for x in fl.loads if x.concurrency == load.concurrency)
                    ratio_rps = f"{mine.rps / load.rps:.2f}x"
                    ratio_p50 = f"{mine.p50_ms / load.p50_ms:.2f}x"
                elif variant == "flambeau":
                    ratio_rps = f"{load.rps / ceilings[model]:.2f}x of ceiling"
                lines.append(
                    f"| {variant} | {load.concurrency} | {load.rps:.1f} | "
                    f"{load.p50_ms:.2f} | {load.p99_ms:.2f} | {load.errors} | {ratio_rps} "
                    f"| {ratio_p50} |"
                )
        lines.append("")
        lines.append(
            "| variant | start to /ping s | start to model ready s | frontend RSS idle MiB "
            "| frontend RSS load MiB | workers RSS MiB |"
        )
        lines.append("|---|---|---|---|---|---|")
        for variant in ("torchserve-shipped", "torchserve-tuned", "flambeau"):
            run = by_key.get((variant, model))
            if run is not None:
                lines.append(
                    f"| {variant} | {run.ping_s:.2f} | {run.cold_start_s:.2f} "
                    f"| {run.idle_server_rss_mb:.0f} "
                    f"| {run.server_rss_mb:.0f} | {run.worker_rss_mb:.0f} |"
                )
        if fl is not None:
            for variant in ("torchserve-shipped", "torchserve-tuned"):
                ts = by_key.get((variant, model))
                if ts is not None:
                    lines.append(
                        f"\nflambeau/{variant}: "
                        f"start to /ping {fl.ping_s / ts.ping_s:.2f}x, "
                        f"start to model ready {fl.cold_start_s / ts.cold_start_s:.2f}x, "
                        f"frontend RSS under load {fl.server_rss_mb / ts.server_rss_mb:.2f}x"
                    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load run")
    parser.add_argument(
        "--variants", nargs="+", default=["torchserve-shipped", "torchserve-tuned", "flambeau"]
    )
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    wrk = ensure_wrk()
    ts_bin = (
        ensure_torchserve() if any(v.startswith("torchserve") for v in args.variants) else Path()
    )
    results: list[RunResult] = []
    ceilings: dict[str, float] = {}
    for name in args.models:
        model = MODELS[name]
        build_archive(model, OUT / "store")
        (OUT / f"{name}.bin").write_bytes(request_body(model))
        ceilings[name] = raw_ceiling(model)
        print(f"{name}: raw in-process ceiling {ceilings[name]:.0f} req/s", flush=True)
        for variant in args.variants:
            results.append(bench_variant(variant, model, args, ts_bin, wrk))
    text = report(results, ceilings)
    print(text)
    (OUT / "results.json").write_text(
        json.dumps({"results": [asdict(r) for r in results], "ceilings": ceilings}, indent=2)
    )
    (OUT / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
