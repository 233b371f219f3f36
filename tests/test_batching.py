"""Dynamic micro-batching: the batcher alone, then the runtime and the HTTP service with it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_support import png, settings_for

from service.http.app import create_app
from service.model.errors import BatchFailed, InvalidInput, UnsupportedMediaType
from service.serving.batching import Batcher
from service.serving.runtime import Runtime

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


class Recorder:
    """A ``run`` that adds 1 to every row of every job, and remembers each batch it was given."""

    def __init__(self, fail_when: Callable[[list[np.ndarray]], bool] = lambda jobs: False) -> None:
        self.batches: list[list[np.ndarray]] = []
        self.fail_when = fail_when
        self.lock = threading.Lock()

    def __call__(self, jobs: list[np.ndarray]) -> list[np.ndarray]:
        with self.lock:
            self.batches.append(jobs)
        if self.fail_when(jobs):
            raise RuntimeError("the model failed")
        rows = np.concatenate(jobs) + 1  # one call for the whole batch
        return np.split(rows, np.cumsum([len(j) for j in jobs])[:-1])


def _batcher(run: Recorder, executor: ThreadPoolExecutor, **options: Any) -> Batcher:
    settings = {"max_batch_size": 64, "max_delay": 0.05, **options}
    return Batcher("test", run, executor=executor, **settings)


async def _ready(job: np.ndarray) -> tuple[np.ndarray, int]:
    return job, len(job)


async def _refused() -> tuple[np.ndarray, int]:
    raise InvalidInput("image 0: not an image")


def _jobs(sizes: Sequence[int]) -> list[np.ndarray]:
    """Distinct rows for every request: request k's rows are 100 k, 100 k + 1, ..."""
    return [100.0 * k + np.arange(size) for k, size in enumerate(sizes)]


# ---------------------------------------------------------------- the batcher alone


def test_each_request_gets_its_own_rows(executor: ThreadPoolExecutor) -> None:
    run = Recorder()
    batcher = _batcher(run, executor)
    jobs = _jobs([1, 3, 2, 5, 1, 4])

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.submit(_ready(j), lambda r: r) for j in jobs))

    results = asyncio.run(main())
    for job, result in zip(jobs, results, strict=True):
        np.testing.assert_array_equal(result, job + 1)
    # requests that arrive together run together: one call
    assert len(run.batches) == 1 and len(run.batches[0]) == len(jobs)


def test_batches_hold_at_most_max_batch_size_rows(executor: ThreadPoolExecutor) -> None:
    run = Recorder()
    batcher = _batcher(run, executor, max_batch_size=4)
    jobs = _jobs([1, 3, 2, 2, 6, 1])  # the request of 6 rows runs alone, never split

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.submit(_ready(j), lambda r: r) for j in jobs))

    results = asyncio.run(main())
    for job, result in zip(jobs, results, strict=True):
        np.testing.assert_array_equal(result, job + 1)
    sizes = [sum(len(j) for j in batch) for batch in run.batches]
    assert all(size <= 4 for size in sizes if size != 6)
    assert 6 in sizes and len(run.batches) > 1
    # in arrival order
    assert [j[0] for batch in run.batches for j in batch] == [j[0] for j in jobs]


def test_a_refused_request_does_not_disturb_its_batch(executor: ThreadPoolExecutor) -> None:
    run = Recorder()
    batcher = _batcher(run, executor)
    jobs = _jobs([2, 1, 3])

    async def main() -> list[Any]:
        submits = [batcher.submit(_ready(j), lambda r: r) for j in jobs]
        submits.insert(1, batcher.submit(_refused(), lambda r: r))
        return await asyncio.gather(*submits, return_exceptions=True)

    first, refused, *rest = asyncio.run(main())
    assert isinstance(refused, InvalidInput)
    for job, result in zip(jobs, [first, *rest], strict=True):
        np.testing.assert_array_equal(result, job + 1)
    assert len(run.batches) == 1 and len(run.batches[0]) == 3


def test_a_failed_run_fails_its_whole_batch_and_nothing_else(executor: ThreadPoolExecutor) -> None:
    run = Recorder(fail_when=lambda jobs: any(j[0] == 100.0 for j in jobs))  # request 1's batch
    batcher = _batcher(run, executor)
    jobs = _jobs([1, 2, 1])

    async def main() -> tuple[list[Any], np.ndarray]:
        batch = [batcher.submit(_ready(j), lambda r: r) for j in jobs]
        failed = await asyncio.wait_for(asyncio.gather(*batch, return_exceptions=True), 10)
        later = await asyncio.wait_for(batcher.submit(_ready(np.array([7.0])), lambda r: r), 10)
        return failed, later

    failed, later = asyncio.run(main())
    assert all(isinstance(outcome, BatchFailed) for outcome in failed)
    assert "failed" in failed[0].message and "retry" in failed[0].message
    assert len({id(outcome) for outcome in failed}) == len(failed)  # one error per request
    np.testing.assert_array_equal(later, [8.0])  # the batcher still works


def test_a_failed_conversion_fails_only_its_request(executor: ThreadPoolExecutor) -> None:
    batcher = _batcher(Recorder(), executor)

    def broken(result: np.ndarray) -> Any:
        raise UnsupportedMediaType("cannot answer this one")

    async def main() -> list[Any]:
        jobs = _jobs([1, 1, 1])
        converts = [lambda r: r, broken, lambda r: r]
        submits = [batcher.submit(_ready(j), c) for j, c in zip(jobs, converts, strict=True)]
        return await asyncio.gather(*submits, return_exceptions=True)

    ok, failed, also_ok = asyncio.run(main())
    assert isinstance(failed, UnsupportedMediaType)
    np.testing.assert_array_equal(ok, [1.0])
    np.testing.assert_array_equal(also_ok, [201.0])


def test_a_lone_request_waits_for_nothing(executor: ThreadPoolExecutor) -> None:
    batcher = _batcher(Recorder(), executor, max_delay=30.0)

    async def main() -> float:
        start = time.perf_counter()
        await batcher.submit(_ready(np.zeros(1)), lambda r: r)
        return time.perf_counter() - start

    assert asyncio.run(main()) < 5.0  # far below the 30 s delay


def test_a_batch_waits_for_requests_being_prepared(executor: ThreadPoolExecutor) -> None:
    """One request is still being prepared: the other waits for it, at most max_delay."""
    run = Recorder()
    batcher = _batcher(run, executor, max_delay=30.0)

    async def main() -> None:
        release = asyncio.Event()

        async def slow() -> tuple[np.ndarray, int]:
            await release.wait()
            return np.ones(1), 1

        first = asyncio.ensure_future(batcher.submit(_ready(np.zeros(1)), lambda r: r))
        second = asyncio.ensure_future(batcher.submit(slow(), lambda r: r))
        await asyncio.sleep(0.2)
        assert not first.done() and run.batches == []  # waiting for the second
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)

    asyncio.run(main())
    assert len(run.batches) == 1 and len(run.batches[0]) == 2


def test_the_delay_bounds_the_wait(executor: ThreadPoolExecutor) -> None:
    run = Recorder()
    batcher = _batcher(run, executor, max_delay=0.05)

    async def main() -> None:
        never = asyncio.Event()

        async def stuck() -> tuple[np.ndarray, int]:
            await never.wait()
            return np.ones(1), 1

        waiting = asyncio.ensure_future(batcher.submit(stuck(), lambda r: r))
        result = await asyncio.wait_for(batcher.submit(_ready(np.zeros(1)), lambda r: r), 10)
        np.testing.assert_array_equal(result, [1.0])
        waiting.cancel()

    asyncio.run(main())
    assert len(run.batches) == 1 and len(run.batches[0]) == 1


# ---------------------------------------------------------------- the runtime with batching


class Observed:
    """The runtime's metrics, kept: images per run, per model and operation."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, str, int]] = []
        self.queued: list[tuple[str, str, float]] = []

    def observe_stage(self, model: str, stage: str, seconds: float) -> None:
        pass

    def observe_batch(self, model: str, operation: str, size: int) -> None:
        pass

    def observe_queue(self, model: str, operation: str, seconds: float) -> None:
        self.queued.append((model, operation, seconds))

    def observe_run(self, model: str, operation: str, rows: int) -> None:
        self.runs.append((model, operation, rows))


@pytest.fixture(scope="module")
def runtimes(tiny_model_repo: Path) -> Iterator[dict[str, tuple[Runtime, Observed]]]:
    out = {}
    for name, delay in (("batched", 2000.0), ("alone", 0.0)):
        observed = Observed()
        runtime = Runtime(settings_for(tiny_model_repo, max_queue_delay_ms=delay), observed)
        runtime.load()
        out[name] = (runtime, observed)
    yield out
    for runtime, _ in out.values():
        runtime.close()


# (images, seed) per request: mixed batch sizes, one model; the 96x96 image is preprocessed in a
# worker thread (too large for the event loop), and the batch waits for it
REQUESTS = [
    ([png(0)], 0),
    ([png(1), png(2), png(3)], 1),
    ([png(4, size=96)], 2),
    ([png(5), png(6)], 3),
    ([png(7)], 4),
]


def _submit_all(runtime: Runtime, operation: str, **params: Any) -> list[Any]:
    runner = runtime.model("tiny-recmix")

    def submit(images: list[bytes], seed: int) -> Any:
        keep = lambda result: result  # noqa: E731 -- the result itself, no answer built
        if operation == "encode":
            return runtime.encode(runner, images, keep)
        if operation == "reconstruct":
            return runtime.reconstruct(runner, images, "sample", seed, keep)
        if operation == "sample":
            return runtime.sample(runner, images, 3, True, seed, keep)
        return runtime.log_likelihood(runner, images, 40, seed, keep)

    async def main() -> list[Any]:
        return await asyncio.gather(*(submit(images, seed) for images, seed in REQUESTS))

    return asyncio.run(main())


def _arrays(result: Any) -> list[np.ndarray]:
    return [v.astype(np.float64) for v in vars(result).values() if isinstance(v, np.ndarray)]


@pytest.mark.parametrize("operation", ["encode", "reconstruct", "sample", "loglik"])
def test_batched_answers_equal_unbatched_ones(
    runtimes: dict[str, tuple[Runtime, Observed]], operation: str
) -> None:
    """Concurrent requests of mixed sizes share one run, and each gets what it would alone."""
    batched_runtime, observed = runtimes["batched"]
    observed.runs.clear()
    batched = _submit_all(batched_runtime, operation)
    alone = _submit_all(runtimes["alone"][0], operation)
    for (images, _), got, expected in zip(REQUESTS, batched, alone, strict=True):
        for a, b in zip(_arrays(got), _arrays(expected), strict=True):
            assert a.shape[0] == len(images)  # its own rows, no more, no fewer
            # the same draws (seeded); float32 matrix products differ in the last bits only
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    total = sum(len(images) for images, _ in REQUESTS)
    assert observed.runs == [("tiny-recmix", operation, total)]


def test_batching_off_runs_each_request_alone(
    runtimes: dict[str, tuple[Runtime, Observed]],
) -> None:
    runtime, observed = runtimes["alone"]
    assert runtime._batchers == {}
    observed.runs.clear()
    _submit_all(runtime, "encode")
    assert sorted(rows for _, _, rows in observed.runs) == sorted(len(i) for i, _ in REQUESTS)


def test_queue_time_is_observed(runtimes: dict[str, tuple[Runtime, Observed]]) -> None:
    runtime, observed = runtimes["batched"]
    observed.queued.clear()
    _submit_all(runtime, "encode")
    assert len(observed.queued) == len(REQUESTS)
    assert all(0 <= seconds < 10 for _, _, seconds in observed.queued)


# ---------------------------------------------------------------- over HTTP


def _slow_down(runner: Any) -> None:
    """Each encoder call takes half a second more: requests arriving meanwhile gather."""
    encode = runner.encode

    def slow(x: np.ndarray) -> Any:
        time.sleep(0.5)
        return encode(x)

    runner.encode = slow


def test_concurrent_clients_get_their_own_answers(tiny_model_repo: Path) -> None:
    """Clients in threads, one sending an undecodable image: it alone gets its 400."""
    bodies = [[png(k), png(k + 10)] if k % 3 else [png(k)] for k in range(12)]
    bodies[5] = [png(5), png(6)[:60]]  # the second image is cut short: undecodable

    def post(client: TestClient, images: list[bytes]) -> Any:
        files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        return client.post("/encode", files=files)

    answers = {}
    for delay in (50.0, 0.0):
        with TestClient(create_app(settings_for(tiny_model_repo, max_queue_delay_ms=delay))) as c:
            _slow_down(c.app.state.runtime.model("tiny-recmix"))  # type: ignore[attr-defined]
            with ThreadPoolExecutor(len(bodies)) as pool:
                answers[delay] = list(pool.map(lambda images: post(c, images), bodies))
            runs = c.get("/metrics").text
        if delay:  # the images of several requests went through one run
            count = sum(
                float(line.split()[-1])
                for line in runs.splitlines()
                if line.startswith("recmix_run_batch_size_count")
            )
            assert count < len(bodies) - 2
    for k, (batched, alone) in enumerate(zip(answers[50.0], answers[0.0], strict=True)):
        if k == 5:
            assert batched.status_code == alone.status_code == 400
            assert batched.json()["error"]["code"] == "undecodable_image"
            continue
        assert batched.status_code == 200, batched.text
        got, expected = batched.json()["results"], alone.json()["results"]
        assert len(got) == len(bodies[k])
        for a, b in zip(got, expected, strict=True):
            for ca, cb in zip(a["components"], b["components"], strict=True):
                np.testing.assert_allclose(ca["mean"], cb["mean"], rtol=1e-4, atol=1e-5)
                assert ca["weight"] == pytest.approx(cb["weight"], abs=1e-6)


def test_a_failed_run_answers_every_request_of_its_batch(tiny_model_repo: Path) -> None:
    settings = settings_for(tiny_model_repo, max_queue_delay_ms=50.0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        runner = client.app.state.runtime.model("tiny-recmix")  # type: ignore[attr-defined]

        def broken(x: np.ndarray) -> Any:
            time.sleep(0.2)
            raise RuntimeError("onnxruntime failed")

        runner.encode = broken
        files = [("file", ("0.png", png(0), "image/png"))]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: client.post("/encode", files=files), range(6)))
    for answer in answers:
        assert answer.status_code == 500
        error = answer.json()["error"]
        assert error["code"] == "batch_failed" and "retry" in error["message"]
        assert "onnxruntime" not in error["message"]  # no internals
