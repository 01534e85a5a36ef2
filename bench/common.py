"""Shared helpers for the benchmarks: environment record, results files, peak memory, timing.

Every benchmark writes ``bench/results/<name>.json`` through :func:`write_results`, which adds
the device, library versions and a UTC timestamp, so a number is never separated from where it
was measured.

Peak memory
-----------
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  memory allocated at the start: exactly the tensors PyTorch held, allocator cache excluded.
* CPU: PyTorch has no caching allocator on CPU, tensors come from ``malloc``. We read the
  kernel's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) after resetting
  it (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) at the end of setup, and subtract the
  resident set at that moment. Two things make this track live tensor memory closely: each
  measured variant runs in a fresh subprocess (:func:`run_isolated`), so nothing freed by an
  earlier variant is silently reused, and that subprocess sets ``MALLOC_MMAP_THRESHOLD_`` so
  glibc serves every allocation above 64 KiB with its own ``mmap`` and gives it back to the
  kernel on ``free`` (no heap retention hiding or inflating a peak). Where ``clear_refs`` is
  not available the fallback is ``ru_maxrss`` (lifetime peak) minus the resident set at the
  start, which is still correct in a fresh process whose setup is smaller than its workload.

Timing
------
Ratios are measured side by side in one process: variants alternate in ABBA order (so that
neither always runs first after the other), each is repeated, and medians are compared.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULT_PREFIX = "BENCH_RESULT "
MIB = 1024 * 1024

# glibc: allocations above this size get their own mmap and are unmapped on free (see module doc).
_ISOLATED_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def environment() -> dict:
    """Device, library versions and thread counts: recorded with every result."""
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if torch.cuda.is_available():
        info["device"] = f"cuda: {torch.cuda.get_device_name(0)}"
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"cpu: {_cpu_model()} ({os.cpu_count()} logical cores)"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_results(name: str, payload: dict, results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>.json`` atomically, with environment and timestamp added."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"benchmark name must be lowercase letters, digits and '_': {name!r}")
    directory = Path(results_dir) if results_dir is not None else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "timestamp_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "environment": environment(),
        **payload,
    }
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- peak memory


WORK_MARKER = ".iris-bench-work"


def claim_work_dir(work: Path, bench: str, fresh: bool = False) -> str | None:
    """Make `work` a bench's own folder (a marker written first), or say in one line why not: a
    non-empty folder without the marker was not made by a bench and is never touched. `fresh`
    deletes a folder that carries the marker."""
    import shutil

    work = Path(work)
    marker = work / WORK_MARKER
    if work.exists() and any(work.iterdir()) and not marker.exists():
        return f"--work-dir {work} is not empty and was not made by this bench; nothing was touched: choose another"
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"made by bench/{bench}.py\n")
    return None


def _proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


class PeakMemory:
    """Context manager: ``peak_bytes`` = peak memory above the level at entry.

    On CUDA devices, PyTorch's allocator statistics; on CPU, the resident-set high-water mark
    (see the module docstring for why and for the conditions under which it is exact).
    """

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated - memory_allocated at start"
        else:
            self._start = (_proc_status_kib("VmRSS") or 0) * 1024
            if _reset_rss_peak() and _proc_status_kib("VmHWM") is not None:
                self.method = "VmHWM after clear_refs reset - VmRSS at start"
                self._use_hwm = True
            else:
                self.method = "ru_maxrss - VmRSS at start (fresh process)"
                self._use_hwm = False
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self._use_hwm:
            peak = (_proc_status_kib("VmHWM") or 0) * 1024
        else:
            peak = _ru_maxrss_bytes()
        self.peak_bytes = max(0, peak - self._start)


def run_isolated(module: str, function: str, kwargs: dict, timeout: float = 600) -> dict:
    """Run ``module.function(**kwargs)`` in a fresh Python process and return its dict result.

    The function must return a JSON-serialisable dict. The child gets the glibc settings of
    the module docstring, so its resident-set peak tracks live tensor memory.
    """
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "import importlib\n"
        f"fn = getattr(importlib.import_module({module!r}), {function!r})\n"
        "result = fn(**json.loads(sys.argv[1]))\n"
        f"print({RESULT_PREFIX!r} + json.dumps(result), flush=True)\n"
    )
    env = {**os.environ, **_ISOLATED_ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=str(REPO_ROOT),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"isolated run of {module}.{function}({kwargs}) failed with code {proc.returncode}:\n"
            f"{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# ----------------------------------------------------------------------------- timing


def set_cpu_threads(threads: int) -> None:
    """Use ``threads`` intra-op CPU threads in this process and in :func:`run_isolated` children.

    The benchmarks default to one: the machines here are shared, and an OpenMP pool of two
    threads on two cores stalls at every small operator whenever another process holds a core
    (measured here: tiny-model generation 14x slower with 2 threads than with 1 under load).
    Ratios measured side by side do not depend on the choice; absolute CPU times are not
    reported as results anyway.
    """
    import torch

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)



def synchronize(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str = "cpu") -> float:
    """Wall-clock seconds of one call, with device synchronisation on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: str = "cpu",
) -> dict[str, list[float]]:
    """Time each variant ``repeats`` times, interleaved in ABBA order; returns seconds per call.

    ``warmup`` untimed rounds of every variant come first (allocator, caches, lazy init).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(time_call(variants[name], device))
    return times


def median(values: list[float]) -> float:
    if not values:
        raise ValueError("median of an empty list")
    return float(statistics.median(values))


def summarize_times(times: dict[str, list[float]]) -> dict[str, dict]:
    """Median, min and all samples (seconds) per variant, for the results file."""
    return {
        name: {"median_s": median(samples), "min_s": min(samples), "samples_s": samples}
        for name, samples in times.items()
    }


# ----------------------------------------------------------------------------- models and data


def build_qwen2(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    max_positions: int,
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
):
    """A randomly initialised Qwen2 causal LM with tied embeddings (fp32, seeded, no hub)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}, "
            f"and num_heads by num_kv_heads {num_kv_heads}"
        )
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model


def random_pairs(num_pairs: int, seq_len: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[tuple]:
    """(real, synthetic) ``EncodedSequence`` pairs of random tokens, all ``seq_len`` long.

    Equal lengths keep padding out of the comparison; timing and memory depend on shapes only.
    Token ids are drawn from [1, vocab_size): id 0 is free to serve as the pad id.
    """
    import torch

    from iris_ref.data import EncodedSequence

    if not 0 < prompt_len < seq_len:
        raise ValueError(f"need 0 < prompt_len < seq_len, got {prompt_len}, {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (num_pairs, 2, seq_len), generator=generator)
    pairs = []
    for i in range(num_pairs):
        prompt = ids[i, 0, :prompt_len].tolist()
        real = EncodedSequence(input_ids=prompt + ids[i, 0, prompt_len:].tolist(), prompt_length=prompt_len)
        synthetic = EncodedSequence(input_ids=prompt + ids[i, 1, prompt_len:].tolist(), prompt_length=prompt_len)
        pairs.append((real, synthetic))
    return pairs
