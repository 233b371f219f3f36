"""Load benchmark of /encode: throughput and latency under concurrency, with and without batching.

Starts ``recmix-serve`` processes on free loopback ports, all serving the model repository: by
default one with the default settings (dynamic batching on, int8 encoder graphs on CPU), one with
batching off (``--max-queue-delay-ms 0``), and the same two with the float32 encoder graphs;
``--server NAME=FLAGS`` names others (to compare encode modes, say).
Then, in interleaved rounds (every cell once per round, so that all cells see the same machine
state), it runs closed-loop load against each: C clients, each with one keep-alive connection,
sending one image per request and the next as soon as the answer is read. Every cell is bounded
in time (and, with the Python client, in requests); besides throughput and latency it records
the images per inference run (the server's metrics) and the server's CPU time per request
(``/proc``, Linux). Last, it samples the first server's resident memory (RSS) every second
while it serves both models at concurrency 32 for ``--memory-seconds``.

The load generator is wrk when it is installed (``apt-get install wrk``), else a lean asyncio
client in this script (``--client`` chooses). The client shares the machine's cores with the
server; wrk costs a few microseconds of CPU per request where the Python client costs a few
hundred, which on a 2-core machine is CPU the server no longer gets. Whichever loads it, every
server and model is first warmed up by the Python client, which checks a full answer.

Writes ``load.md`` (the table and the target figures), ``load.json`` and ``load.png`` under --out.

    python scripts/bench_load.py --out results/load
    python scripts/bench_load.py --rounds 1 --seconds 1 --memory-seconds 5
    python scripts/bench_load.py --concurrency 1 32 --memory-seconds 10 \
        --server sequential="--encode-mode sequential" --server fused="--encode-mode fused" \
        --server concurrent="--encode-mode concurrent" --out results/load/encode_modes_http
    git worktree add ../recmix-before HEAD~1      # then, the two versions in one run:
    python scripts/bench_load.py --server before= --server after= \
        --source before=../recmix-before --compare after=before --out results/load/layers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bench_latency import HOST, free_port, start_server, test_image

DEFAULT_SERVERS = [  # name=recmix-serve flags: the defaults (int8 encoders on CPU), then float32
    "batching=",
    "no-batching=--max-queue-delay-ms 0",
    "float32 batching=--encoder-precision float32",
    "float32 no-batching=--encoder-precision float32 --max-queue-delay-ms 0",
]


# ---------------------------------------------------------------- a lean HTTP/1.1 client
# On a 2-core machine the load generator shares the CPU with the server; a client that costs
# little per request (a prebuilt request, a Content-Length read) leaves the CPU to the server.


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection(HOST, port))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send a prebuilt request; the status and the body of the answer."""
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
        if match is None:
            raise RuntimeError(f"answer without Content-Length: {head[:200]!r}")
        return status, await self.reader.readexactly(int(match.group(1)))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def encode_request(model: str, image: bytes) -> bytes:
    head = (
        f"POST /encode?model={model} HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Content-Type: image/png\r\nContent-Length: {len(image)}\r\n\r\n"
    )
    return head.encode() + image


def check_answer(body: bytes, model: str) -> None:
    answer = json.loads(body)
    assert answer["model"] == model and len(answer["results"]) == 1, answer


@dataclass
class Cell:
    model: str
    server: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0
    runs: float = 0.0  # inference runs and the images in them, from the server's metrics
    run_images: float = 0.0
    cpu_seconds: float = 0.0  # the server process's CPU time (all its threads)
    wrk_runs: list[WrkRun] = field(default_factory=list)


async def burst(
    port: int, model: str, image: bytes, concurrency: int, seconds: float, max_requests: int
) -> tuple[list[float], int, float]:
    """Closed-loop load for ``seconds`` or ``max_requests``: latencies, errors, elapsed."""
    raw = encode_request(model, image)
    connections = [await Connection.open(port) for _ in range(concurrency)]
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def client(conn: Connection, first: bool) -> None:
        nonlocal errors
        while time.perf_counter() < deadline and len(latencies) < max_requests:
            sent = time.perf_counter()
            status, body = await conn.request(raw)
            latencies.append(time.perf_counter() - sent)
            if status != 200:
                errors += 1
            elif first:  # check one full answer per client
                check_answer(body, model)
                first = False

    await asyncio.gather(*(client(conn, True) for conn in connections))
    elapsed = time.perf_counter() - start
    for conn in connections:
        await conn.close()
    return latencies, errors, elapsed


async def scrape(port: int, model: str) -> tuple[float, float]:
    """(runs, images in them) of /encode for a model, from the server's counters."""
    conn = await Connection.open(port)
    _, body = await conn.request(f"GET /metrics HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    await conn.close()
    labels = f'{{endpoint="/encode",model="{model}"}}'
    found = {}
    for suffix in ("count", "sum"):
        match = re.search(
            rf"^recmix_run_batch_size_{suffix}{re.escape(labels)} (\S+)$", body.decode(), re.M
        )
        found[suffix] = float(match.group(1)) if match else 0.0
    return found["count"], found["sum"]


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def memory_run(
    port: int,
    pid: int,
    models: list[str],
    image: bytes,
    seconds: float,
    concurrency: int,
    wrk: Wrk | None,
) -> list[tuple[float, float]]:
    """(seconds, RSS MiB) sampled every second while both models are under load."""
    samples = [(0.0, rss_mib(pid))]
    start = time.perf_counter()

    async def sampler() -> None:
        while (now := time.perf_counter() - start) < seconds:
            await asyncio.sleep(1.0)
            samples.append((round(now + 1.0, 1), rss_mib(pid)))

    per_model = max(1, concurrency // len(models))
    if wrk is not None:
        runs = await asyncio.gather(
            sampler(), *(wrk.burst(port, m, per_model, seconds) for m in models)
        )
        errors = sum(r.errors for r in runs[1:])
    else:
        results = await asyncio.gather(
            sampler(), *(burst(port, m, image, per_model, seconds, 10**9) for m in models)
        )
        errors = sum(r[1] for r in results[1:])
    if errors:
        raise SystemExit(f"{errors} errors during the memory run")
    return samples


# ---------------------------------------------------------------- wrk
# One wrk process per cell (one thread: it keeps up with thousands of requests a second on one
# core), scripted to POST the image and to print, when done, its counts and 999 latency
# quantiles, so that rounds can be pooled into one distribution per cell.

WRK_SCRIPT = """
local file = io.open(os.getenv("RECMIX_BENCH_IMAGE"), "rb")
wrk.method = "POST"
wrk.body = file:read("*all")
file:close()
wrk.headers["Content-Type"] = "image/png"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d\\n", summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout))
  for i = 1, 999 do
    io.write(string.format("Q %d\\n", latency:percentile(i / 10)))
  end
end
"""

QUANTILES = 999


@dataclass
class WrkRun:
    requests: int
    seconds: float
    errors: int
    quantiles: np.ndarray  # seconds, at 0.1 %, 0.2 %, ..., 99.9 %


class Wrk:
    """Runs wrk against a server, with the image in a file its script reads."""

    def __init__(self, image: bytes, folder: Path) -> None:
        self.script = folder / "post.lua"
        self.script.write_text(WRK_SCRIPT)
        self.image = folder / "image.png"
        self.image.write_bytes(image)

    async def burst(self, port: int, model: str, concurrency: int, seconds: float) -> WrkRun:
        whole = max(1, round(seconds))  # wrk takes whole seconds
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{whole}s", "--timeout", "10s"]
        command += ["-s", str(self.script), f"http://{HOST}:{port}/encode?model={model}"]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "RECMIX_BENCH_IMAGE": str(self.image)},
        )
        out, _ = await asyncio.wait_for(process.communicate(), timeout=whole + 30)
        text = out.decode()
        match = re.search(r"^RESULT (\d+) (\d+) (\d+) (\d+)$", text, re.M)
        if process.returncode != 0 or match is None:
            raise SystemExit(f"wrk failed (status {process.returncode}):\n{text}")
        requests, micros, status_errors, socket_errors = map(int, match.groups())
        quantiles = np.array([float(q) for q in re.findall(r"^Q (\d+)$", text, re.M)]) / 1e6
        assert len(quantiles) == QUANTILES, text
        return WrkRun(requests, micros / 1e6, status_errors + socket_errors, quantiles)


def wrk_version() -> str:
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).split("\n")[0].split(" [")[0].strip() or "wrk"


def pooled_quantiles(runs: list[WrkRun], percents: list[float]) -> list[float]:
    """Percentiles of the rounds' latencies together: each round's quantile grid stands for
    its requests, weighted by their number."""
    values = np.concatenate([r.quantiles for r in runs])
    weights = np.concatenate([np.full(QUANTILES, r.requests / QUANTILES) for r in runs])
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order]) / weights.sum()
    return [float(values[order][np.searchsorted(cumulative, p / 100)]) for p in percents]


# ---------------------------------------------------------------- the run


def summarize(cell: Cell) -> dict[str, Any]:
    if cell.wrk_runs:
        requests = sum(r.requests for r in cell.wrk_runs)
        p50, p99 = (1e3 * q for q in pooled_quantiles(cell.wrk_runs, [50, 99]))
    else:
        ms = np.array(cell.latencies) * 1e3
        requests = len(ms)
        p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    return {
        "model": cell.model,
        "server": cell.server,
        "concurrency": cell.concurrency,
        "requests": requests,
        "errors": cell.errors,
        "throughput_rps": requests / cell.seconds,
        "p50_ms": p50,
        "p99_ms": p99,
        "images_per_run": cell.run_images / cell.runs if cell.runs else None,
        "server_cpu_ms_per_request": 1e3 * cell.cpu_seconds / requests,
    }


async def run(
    args: argparse.Namespace, ports: dict[str, int], pids: dict[str, int], wrk: Wrk | None
) -> dict:
    image = test_image(None)
    cells = {
        (model, server, c): Cell(model, server, c)
        for model in args.models
        for server in ports
        for c in args.concurrency
    }
    for port in ports.values():  # warm up every server and model path
        for model in args.models:
            await burst(port, model, image, 8, 1.0, 500)
    for round_index in range(args.rounds):
        # alternate the order, so that no cell always follows the same one
        order = list(cells.values()) if round_index % 2 == 0 else list(cells.values())[::-1]
        for cell in order:
            port = ports[cell.server]
            runs0, images0 = await scrape(port, cell.model)
            cpu0 = cpu_seconds(pids[cell.server])
            if wrk is not None:
                done = await wrk.burst(port, cell.model, cell.concurrency, args.seconds)
                cell.wrk_runs.append(done)
                errors, elapsed = done.errors, done.seconds
            else:
                latencies, errors, elapsed = await burst(
                    port, cell.model, image, cell.concurrency, args.seconds, args.max_requests
                )
                cell.latencies += latencies
            cell.cpu_seconds += cpu_seconds(pids[cell.server]) - cpu0
            runs1, images1 = await scrape(port, cell.model)
            cell.errors += errors
            cell.seconds += elapsed
            cell.runs += runs1 - runs0
            cell.run_images += images1 - images0
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    rows = [summarize(cell) for cell in cells.values()]
    first = next(iter(ports))
    memory = await memory_run(
        ports[first],
        pids[first],
        args.models,
        image,
        args.memory_seconds,
        args.memory_concurrency,
        wrk,
    )
    return {"rows": rows, "memory": memory}


def targets(rows: list[dict], memory: list[tuple[float, float]], models: list[str]) -> dict:
    """The figures the performance targets are about, from one interleaved run."""
    by = {(r["model"], r["server"], r["concurrency"]): r for r in rows}
    servers = list(dict.fromkeys(r["server"] for r in rows))
    recmix, vae = models
    out: dict[str, Any] = {}
    for server in servers:
        for c in (1, 32):
            if (recmix, server, c) in by:
                ratio = by[recmix, server, c]["p50_ms"] / by[vae, server, c]["p50_ms"]
                out[f"p50 {recmix} / {vae}, concurrency {c}, {server}"] = ratio
    for server in servers:  # "X batching" against "X no-batching"
        unbatched = server.replace("no-batching", "").replace("batching", "no-batching")
        if "no-batching" in server or unbatched == server or unbatched not in servers:
            continue
        for model in models:
            if (model, server, 32) in by and (model, unbatched, 32) in by:
                on, off = by[model, server, 32], by[model, unbatched, 32]
                out[f"throughput {server} / {unbatched}, concurrency 32, {model}"] = (
                    on["throughput_rps"] / off["throughput_rps"]
                )
    out["errors"] = sum(r["errors"] for r in rows)
    rss = np.array([m for _, m in memory])
    settled = rss[len(rss) // 6 :]  # after the first tenth of a minute, allocations settle
    out[f"RSS at start / after {memory[len(rss) // 6][0]:.0f} s / at end / max, MiB"] = (
        f"{rss[0]:.1f} / {settled[0]:.1f} / {rss[-1]:.1f} / {rss.max():.1f}"
    )
    out["RSS growth after settling, MiB"] = float(settled[-1] - settled[0])
    return out


def compare(rows: list[dict], pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Server A against server B, per model and concurrency: p50 and throughput ratios."""
    by = {(r["model"], r["server"], r["concurrency"]): r for r in rows}
    out = []
    for a, b in pairs:
        for model, server, c in by:
            if server == a and (model, b, c) in by:
                ra, rb = by[model, a, c], by[model, b, c]
                out.append(
                    {
                        "model": model,
                        "servers": f"{a} / {b}",
                        "concurrency": c,
                        "p50_ratio": ra["p50_ms"] / rb["p50_ms"],
                        "throughput_ratio": ra["throughput_rps"] / rb["throughput_rps"],
                        "cpu_per_request_ratio": ra["server_cpu_ms_per_request"]
                        / rb["server_cpu_ms_per_request"],
                    }
                )
    return out


def markdown(report: dict, command: str) -> str:
    lines = [
        f"Made by `{command}` on {report['machine']}; load generator: {report['client']}.",
        "",
        "| model | server | concurrency | requests | throughput (req/s) | p50 ms | p99 ms | "
        "errors | images per run | server CPU ms per request |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        per_run = f"{r['images_per_run']:.1f}" if r["images_per_run"] else ""
        lines.append(
            f"| {r['model']} | {r['server']} | {r['concurrency']} | {r['requests']} | "
            f"{r['throughput_rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['errors']} | {per_run} | {r['server_cpu_ms_per_request']:.2f} |"
        )
    if report.get("comparisons"):
        lines += [
            "",
            "| model | servers | concurrency | p50 ratio | throughput ratio | "
            "server CPU per request ratio |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in report["comparisons"]:
            lines.append(
                f"| {r['model']} | {r['servers']} | {r['concurrency']} | {r['p50_ratio']:.3f} | "
                f"{r['throughput_ratio']:.3f} | {r['cpu_per_request_ratio']:.3f} |"
            )
    t = report["targets"]
    lines += ["", "| figure | value |", "|---|---|"]
    for key, value in t.items():
        lines.append(
            f"| {key} | {value:.2f} |" if isinstance(value, float) else f"| {key} | {value} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    rows = report["rows"]
    styles = ["-o", "--s", ":^", "-.v"]
    for model in report["models"]:
        for server, style in zip(report["servers"], styles, strict=False):
            sel = sorted(
                (r for r in rows if r["model"] == model and r["server"] == server),
                key=lambda r: r["concurrency"],
            )
            c = [r["concurrency"] for r in sel]
            label = f"{model}, {server}"
            axes[0].plot(c, [r["throughput_rps"] for r in sel], style, label=label)
            axes[1].plot(c, [r["p50_ms"] for r in sel], style, label=label)
            axes[2].plot(c, [r["p99_ms"] for r in sel], style, label=label)
    titles = ("throughput (req/s)", "p50 latency (ms)", "p99 latency (ms)")
    concurrency = sorted({r["concurrency"] for r in rows})
    for ax, title in zip(axes[:3], titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        ax.set_xlabel("concurrent clients")
        ax.set_title(f"/encode {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    seconds, mib = zip(*report["memory"], strict=True)
    axes[3].plot(seconds, mib, "-")
    axes[3].set_ylim(0, max(mib) * 1.2)
    axes[3].set_xlabel("seconds under load")
    axes[3].set_title(f"RSS (MiB) of the {next(iter(report['servers']))} server, both models")
    axes[3].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Example: python scripts/bench_load.py --out results/load",
    )
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--models", nargs=2, default=["mnist-recmix", "mnist-vae"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell and round")
    parser.add_argument(
        "--max-requests", type=int, default=20_000, help="per cell and round (Python client)"
    )
    parser.add_argument(
        "--client",
        choices=["wrk", "python"],
        default="wrk" if shutil.which("wrk") else "python",
        help="load generator (default: wrk when installed)",
    )
    parser.add_argument("--memory-seconds", type=float, default=60.0)
    parser.add_argument("--memory-concurrency", type=int, default=32)
    parser.add_argument(
        "--server",
        action="append",
        metavar="NAME=FLAGS",
        help="a server to start: a name and its recmix-serve flags (repeat; default: "
        f"{' and '.join(repr(s) for s in DEFAULT_SERVERS)})",
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="run the server NAME from the checkout DIR (another version of the service, to "
        "compare with this one in the same run; e.g. a `git worktree` of an earlier commit)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="A=B",
        help="also report server A's p50 and throughput over server B's at every concurrency",
    )
    parser.add_argument("--out", type=Path, help="write load.md, load.json and load.png here")
    args = parser.parse_args()
    servers = dict(s.partition("=")[::2] for s in args.server or DEFAULT_SERVERS)
    sources = {k: Path(v) for k, v in (s.partition("=")[::2] for s in args.source)}
    comparisons = [tuple(c.partition("=")[::2]) for c in args.compare]
    for name in [*sources, *(n for pair in comparisons for n in pair)]:
        if name not in servers:
            parser.error(f"no server named {name!r}; servers: {', '.join(servers)}")

    processes: dict[str, subprocess.Popen[bytes]] = {}
    ports = {}
    try:
        for name, flags in servers.items():
            ports[name] = free_port()
            processes[name] = start_server(
                args.model_dir, ports[name], shlex.split(flags), sources.get(name)
            )
        pids = {k: p.pid for k, p in processes.items()}
        with tempfile.TemporaryDirectory() as folder:
            wrk = Wrk(test_image(None), Path(folder)) if args.client == "wrk" else None
            result = asyncio.run(run(args, ports, pids, wrk))
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            process.wait(timeout=30)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "client": wrk_version() if args.client == "wrk" else "the asyncio client of this script",
        "models": args.models,
        "servers": servers,
        "sources": {k: str(v) for k, v in sources.items()},
        "settings": vars(args) | {"model_dir": str(args.model_dir), "out": str(args.out)},
        **result,
    }
    report["targets"] = targets(report["rows"], report["memory"], args.models)
    report["comparisons"] = compare(report["rows"], comparisons)
    command = shlex.join(["python", "scripts/bench_load.py", *sys.argv[1:]])
    text = markdown(report, command)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "load.md").write_text(text)
        (args.out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
        plot(report, args.out / "load.png")


if __name__ == "__main__":
    main()
