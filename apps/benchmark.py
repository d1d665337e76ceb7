"""Measure a model package the llama-bench way, and how close its decoding comes to memory bandwidth.

    load        edge_qwen.load, once per repetition (the last model is kept); a load that first
                writes the package's prepacked copy for this machine (edge_qwen/prepacked.py) is
                timed apart, as the first load, in a process of its own
    warm-up     one untimed prefill + two decode steps
    per rep     fresh KV cache of prompt + gen positions
                prefill = one Model.forward over a seeded random prompt
                TTFT    = prefill + picking the first token (np.argmax)
                decode  = gen_tokens greedy steps, each a one-token forward + np.argmax
    then        peak RSS (the process high-water mark, read before the bandwidth probe allocates),
                bytes one decode step reads (from model.onnx's initializers and the KV cache),
                the machine's memory read bandwidth (numpy probe with as many threads as the session)

A decode step of a small LLM is memory-bound: every weight is read once per token. So
bytes per token x tokens/s is the bandwidth decoding achieves, and its fraction of what the
machine can read says how much headroom a faster kernel could still find.
"""

from __future__ import annotations

import gc
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edge_qwen.apps.machine import Machine, machine_info
from edge_qwen.cache import kv_bytes_per_token
from edge_qwen.config import QwenConfig
from edge_qwen.engine import check_context
from edge_qwen.loader import load
from edge_qwen.model import Model
from edge_qwen.package import read_manifest
from edge_qwen.prepacked import is_written
from edge_qwen.providers import physical_cores

PROMPT_SEED = 0
PROBE_BYTES = 512 << 20  # far past any cache: the probe reads memory, not L3
PROBE_TRIALS = 5
WARMUP_DECODE_STEPS = 2
# Initializer slots read one row per token (a lookup), not whole: op type -> input indices. For the
# traffic count the rotary caches are lookups too (one position per token).
GATHERED_INPUTS = {  # op type -> the inputs it reads a row per index of
    "Gather": (0,),
    "GatherBlockQuantized": (0, 2, 3),  # data, scales, zero points
    "GroupQueryAttention": (7, 8),  # cos and sin caches
}


@dataclass(frozen=True)
class Stat:
    """Median and spread (min, max) of one metric over the repetitions."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("a statistic needs at least one value")
        return cls(float(statistics.median(values)), float(min(values)), float(max(values)))

    def scaled(self, factor: float) -> Stat:
        return Stat(self.median * factor, self.min * factor, self.max * factor)


@dataclass(frozen=True)
class DecodeTraffic:
    """Bytes one decode step reads: every weight once (one row of a lookup table) plus the KV cache."""

    weight_bytes: int
    kv_cache_bytes: int  # at the average context of the timed decode steps
    average_context: float

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes


@dataclass(frozen=True)
class BenchResult:
    """What `edge-qwen bench` reports; timings are over `repetitions` runs."""

    package: str
    precision: str
    onnxruntime: str
    providers: tuple[str, ...]
    threads: int
    machine: Machine
    prompt_tokens: int
    gen_tokens: int
    repetitions: int
    load_seconds: Stat
    prefill_tokens_per_second: Stat
    decode_tokens_per_second: Stat
    ttft_seconds: Stat
    peak_rss_bytes: int
    # The load that wrote the package's prepacked copy for this machine, if there was none yet: its time
    # and peak RSS, in a process of its own (so peak_rss_bytes is of loads that mapped the copy).
    first_load_seconds: float | None
    first_load_peak_rss_bytes: int | None
    # Resident memory once the last load returned: anonymous (the heap, which only freeing returns)
    # and file-backed (the mapped weights and libraries, which the kernel can reclaim and share).
    anon_rss_after_load_bytes: int
    file_rss_after_load_bytes: int
    # The same after the runs, when the prompt's rows of the embedding table, the KV cache and the
    # activations have joined (read with peak_rss_bytes, before the bandwidth probe allocates).
    anon_rss_after_runs_bytes: int
    file_rss_after_runs_bytes: int
    package_bytes: int
    traffic: DecodeTraffic
    memory_bandwidth_bytes_per_second: float

    @property
    def achieved_bytes_per_second(self) -> Stat:
        return self.decode_tokens_per_second.scaled(self.traffic.total_bytes)

    @property
    def bandwidth_fraction(self) -> float:
        """Median decode bandwidth over the measured memory read bandwidth."""
        return self.achieved_bytes_per_second.median / self.memory_bandwidth_bytes_per_second

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_per_token"] = self.traffic.total_bytes
        out["achieved_bytes_per_second"] = asdict(self.achieved_bytes_per_second)
        out["bandwidth_fraction"] = self.bandwidth_fraction
        return out


@dataclass(frozen=True)
class _Timing:
    prefill: float
    ttft: float
    decode: float
    decode_steps: int


def run_benchmark(
    path: str | Path,
    prompt_tokens: int = 128,
    gen_tokens: int = 128,
    repetitions: int = 3,
    threads: int | None = None,
) -> BenchResult:
    """Benchmark the package at `path` (see the module docstring for the protocol)."""
    for name, value in (("prompt_tokens", prompt_tokens), ("gen_tokens", gen_tokens)):
        _check_positive(name, value)
    _check_positive("repetitions", repetitions)
    if threads is not None:
        _check_positive("threads", threads)
    root = Path(path)
    manifest = read_manifest(root)  # a bad package fails here, before any timing
    check_context(prompt_tokens, gen_tokens, manifest.max_context, "lower --prompt-tokens or --gen-tokens")
    threads = threads or physical_cores()

    model, load_seconds, first_load, first_peak = _timed_loads(root, threads, repetitions)
    after_load = rss_kinds()
    # Python's generator, not numpy's: numpy.random imports `secrets`, hence hashlib and libcrypto
    # (~4 MB resident), which nothing else of a token-ids run needs.
    ids = random.Random(PROMPT_SEED)
    prompt = np.array([ids.randrange(model.config.vocab_size) for _ in range(prompt_tokens)], np.int64)
    _time_generation(model, prompt, WARMUP_DECODE_STEPS)  # arena growth and first-run costs
    runs = [_time_generation(model, prompt, gen_tokens) for _ in range(repetitions)]
    after_runs = rss_kinds()
    peak_rss = peak_rss_bytes()  # after: never below what was just read; before the probe's array
    providers = tuple(model.providers)
    del model  # a 3B model and the probe's array need not share a 4 GB board
    gc.collect()

    return BenchResult(
        package=str(root),
        precision=manifest.precision,
        onnxruntime=ort.__version__,
        providers=providers,
        threads=threads,
        machine=machine_info(),
        prompt_tokens=prompt.size,
        gen_tokens=runs[0].decode_steps,
        repetitions=repetitions,
        load_seconds=Stat.of(load_seconds),
        prefill_tokens_per_second=Stat.of([prompt.size / r.prefill for r in runs]),
        decode_tokens_per_second=Stat.of([r.decode_steps / r.decode for r in runs]),
        ttft_seconds=Stat.of([r.ttft for r in runs]),
        peak_rss_bytes=peak_rss,
        first_load_seconds=first_load,
        first_load_peak_rss_bytes=first_peak,
        anon_rss_after_load_bytes=after_load["RssAnon"],
        file_rss_after_load_bytes=after_load["RssFile"],
        anon_rss_after_runs_bytes=after_runs["RssAnon"],
        file_rss_after_runs_bytes=after_runs["RssFile"],
        package_bytes=package_size(root),
        traffic=decode_traffic(root / "model.onnx", manifest.config, prompt.size, gen_tokens),
        memory_bandwidth_bytes_per_second=memory_read_bandwidth(threads),
    )


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _timed_loads(
    root: Path, threads: int, repetitions: int
) -> tuple[Model, list[float], float | None, int | None]:
    """Load `repetitions` times (each model freed before the next); returns the last model, the load
    times, and the time and peak RSS of a first load that wrote the prepacked copy, run in a process
    of its own so that its packing does not count in this one's peak."""
    first, first_peak = first_load(root, threads) if not is_written(root) else (None, None)
    seconds: list[float] = []
    model: Model | None = None
    for _ in range(repetitions):
        model = None
        gc.collect()
        model, took = _timed_load(root, threads)
        seconds.append(took)
    assert model is not None
    return model, seconds, first, first_peak


FIRST_LOAD = """
import json, sys, time
from edge_qwen.apps.benchmark import peak_rss_bytes
from edge_qwen.loader import load
start = time.perf_counter()
load(sys.argv[1], threads=int(sys.argv[2]))
print(json.dumps([time.perf_counter() - start, peak_rss_bytes()]))
"""


def first_load(root: Path, threads: int) -> tuple[float, int]:
    """Seconds and peak RSS of a load in a new process (which writes the prepacked copy, if missing)."""
    cmd = [sys.executable, "-c", FIRST_LOAD, str(root), str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds, peak = json.loads(done.stdout.strip().splitlines()[-1])
    return float(seconds), int(peak)


def _timed_load(root: Path, threads: int) -> tuple[Model, float]:
    start = time.perf_counter()
    model = load(root, threads=threads)
    return model, time.perf_counter() - start


def rss_kinds(status: Path = Path("/proc/self/status")) -> dict[str, int]:
    """This process's resident anonymous and file-backed bytes (RssAnon, RssFile); 0 where unknown."""
    found = status_bytes(status.read_text(), ("RssAnon", "RssFile")) if status.is_file() else {}
    return {key: found.get(key, 0) for key in ("RssAnon", "RssFile")}


def _time_generation(model: Model, prompt: np.ndarray, gen_tokens: int) -> _Timing:
    cache = model.new_cache(prompt.size + gen_tokens)
    start = time.perf_counter()
    logits = model.forward(prompt, cache)
    prefilled = time.perf_counter()
    token = int(np.argmax(logits))
    first = time.perf_counter()
    for _ in range(gen_tokens):
        logits = model.forward([token], cache)
        token = int(np.argmax(logits))
    done = time.perf_counter()
    assert cache.length == prompt.size + gen_tokens
    return _Timing(prefilled - start, first - start, done - first, gen_tokens)


def decode_traffic(
    model_onnx: Path, config: QwenConfig, prompt_tokens: int, gen_tokens: int
) -> DecodeTraffic:
    """Bytes a decode step reads, from the graph's initializers and the KV cache at the average context.

    Decode step i (0-based) attends over prompt + i + 1 positions, so the average is
    prompt + (gen + 1) / 2.
    """
    average_context = prompt_tokens + (gen_tokens + 1) / 2
    return DecodeTraffic(
        weight_bytes=weight_bytes_per_token(model_onnx),
        kv_cache_bytes=round(kv_bytes_per_token(config) * average_context),
        average_context=average_context,
    )


def weight_bytes_per_token(model_onnx: Path) -> int:
    """Weight bytes one decode step reads: all of each weight, but one row of a gathered table.

    Weights are the initializers in the external data file (inline ones are shape constants).
    Lookups (the embedding table, the rotary caches) read one row per token; a weight that some node
    reads whole (a tied lm_head reads the embedding's bytes through its own alias) counts whole. An
    fp16 weight that feeds a Cast counts at fp32 size: ONNX Runtime folds the Cast at load, so
    decoding reads the float32 copy. The graph is read without its external data.
    """
    import onnx  # the exporter's dependency; only the benchmark needs it at run time

    graph = onnx.load(str(model_onnx), load_external_data=False).graph
    gathered: set[str] = set()
    read_whole: set[str] = set()
    cast: set[str] = set()
    for node in graph.node:
        slots = GATHERED_INPUTS.get(node.op_type, ())
        for i, name in enumerate(node.input):
            (gathered if i in slots else read_whole).add(name)
        if node.op_type == "Cast":
            cast.update(node.input)
    total = 0
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        size = int({e.key: e.value for e in tensor.external_data}["length"])
        if tensor.name in gathered and tensor.name not in read_whole and tensor.dims:
            size //= tensor.dims[0]  # one row
        elif tensor.name in cast and tensor.data_type == onnx.TensorProto.FLOAT16:
            size *= 2  # folded to float32 at load
        total += size
    return total


def memory_read_bandwidth(threads: int, nbytes: int = PROBE_BYTES, trials: int = PROBE_TRIALS) -> float:
    """Bytes/s of summing a large float32 array split over `threads` threads: best of `trials`.

    numpy releases the GIL inside the sum, so the threads read their slices in parallel, as the
    session's intra-op threads read the weights.
    """
    data = np.ones(nbytes // 4, np.float32)  # writing it maps every page before the timing
    slices = np.array_split(data, threads)
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, slices))  # warm-up
        for _ in range(trials):
            start = time.perf_counter()
            list(pool.map(np.sum, slices))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark.

    On Linux, VmHWM of /proc/self/status: ru_maxrss would also count the parent's memory, since a
    process started with vfork + exec inherits the high-water mark of its parent's address space.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        hwm = vm_hwm_bytes(status.read_text())
        if hwm is not None:
            return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def vm_hwm_bytes(proc_status: str) -> int | None:
    """The VmHWM line of a /proc/<pid>/status text, in bytes."""
    return status_bytes(proc_status, ("VmHWM",)).get("VmHWM")


def status_bytes(proc_status: str, keys: tuple[str, ...]) -> dict[str, int]:
    """The named lines of a /proc/<pid>/status text, in bytes (the kernel reports kB)."""
    found = {}
    for line in proc_status.splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            found[key] = int(value.split()[0]) * 1024
    return found


def package_size(root: Path) -> int:
    """Bytes of the package folder's files."""
    return sum(p.stat().st_size for p in root.iterdir() if p.is_file())
