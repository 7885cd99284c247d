"""A harness for multi-process tests on CPU: gloo, a FileStore rendezvous, timeouts, clean teardown.

    results = run_distributed(fn, world_size, tmp_path, *args, timeout_s=60)

runs ``fn(rank, world_size, *args)`` in ``world_size`` new processes joined by a gloo process group
and returns the values they returned, by rank. Rules it enforces:

* rendezvous through ``init_method=file://<tmp>/store`` (a FileStore): no free-port race, no TCP store
  thread in rank 0 to outlive the group;
* every collective has a deadline: ``init_process_group(timeout=timeout_s)``, so a rank waiting for a
  peer that raised fails after ``timeout_s`` instead of hanging; the parent also gives up on the whole
  group after ``2 * timeout_s + 60`` s and terminates the processes it started;
* teardown always runs: a barrier (nobody destroys the group while a peer still talks to it), then
  ``destroy_process_group``, also after an exception;
* an exception in any rank fails the test with every failing rank's traceback.

``fn`` must be a module-level function and return something ``torch.load`` reads with
``weights_only=True``: tensors, numbers, strings, and lists / tuples / dicts of them.

Start method: "fork" by default (start_method="auto"): the children inherit the imported torch and
dit_fast, where a spawned child spends 8-15 s importing them again on this 2-core machine (dit_fast
imports torch._dynamo). The children only use the CPU, one thread each. "spawn" when the parent has
initialized CUDA (a forked child cannot use it, and should not inherit it), or when asked. Batch
several cases into one call either way. Under ``TRITON_INTERPRET=1`` the children patch the
interpreter as tests/conftest.py does (a no-op when inherited).
"""

import datetime
import os
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, fn: Callable, world_size: int, tmp: str, timeout_s: float, args: tuple) -> None:
    torch.set_num_threads(1)
    if os.environ.get("TRITON_INTERPRET") == "1":
        from tests import triton_interpreter
        triton_interpreter.patch_interpreter()
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    result = {"ok": False, "value": None, "error": ""}
    try:
        result["value"] = fn(rank, world_size, *args)
        result["ok"] = True
    except BaseException:  # reported by the parent with the rank's traceback
        result["error"] = traceback.format_exc()
    finally:
        try:
            dist.barrier()
        except Exception:  # a peer that failed or timed out: the group is already broken
            result["error"] += "\n(teardown barrier failed: " + traceback.format_exc(limit=1) + ")"
        dist.destroy_process_group()
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))


def run_distributed(fn: Callable, world_size: int, tmp_path, *args, timeout_s: float = 60.0,
                    start_method: str = "auto") -> List[Any]:
    """fn(rank, world_size, *args) on world_size gloo processes; returns their values by rank."""
    if start_method == "auto":
        start_method = "spawn" if torch.cuda.is_initialized() else "fork"
    tmp = os.path.join(str(tmp_path), f"dist_{fn.__name__}_{time.monotonic_ns()}")
    os.makedirs(tmp)
    context = mp.start_processes(_worker, args=(fn, world_size, tmp, timeout_s, args), nprocs=world_size,
                                 join=False, start_method=start_method)
    deadline = time.monotonic() + 2 * timeout_s + 60
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"{fn.__name__}: {world_size} processes still running after "
                                     f"{2 * timeout_s + 60:.0f} s (collective timeout {timeout_s} s)")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:  # died outside its try (e.g. init)
        raise AssertionError(f"{fn.__name__}: a process failed outside the test function:\n{exc}") from None
    finally:
        for process in context.processes:  # ours, by handle: never a broad kill
            if process.is_alive():
                process.terminate()
                process.join(5)
    results = []
    for r in range(world_size):
        path = os.path.join(tmp, f"rank{r}.pt")
        missing = {"ok": False, "value": None, "error": "no result: the process died before writing one"}
        results.append(torch.load(path, weights_only=True) if os.path.exists(path) else missing)
    errors = [f"--- rank {r} ---\n{res['error']}" for r, res in enumerate(results) if not res["ok"]]
    if errors:
        raise AssertionError(f"{fn.__name__} failed on {len(errors)} of {world_size} ranks:\n" + "\n".join(errors))
    return [res["value"] for res in results]
