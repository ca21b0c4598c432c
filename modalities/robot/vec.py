"""A pool of environments in worker processes: reset and step many episodes at once.

Each worker holds one environment built by a picklable factory (`task.make_env`).  A worker
that dies (segfault in a simulator, killed by the OOM killer) or raises is replaced by a fresh
process and the call raises `WorkerCrashed` naming the lost slots, so the caller reruns those
episodes from their initial states (episodes are deterministic given the initial state and the
policy's noise, so a rerun is the same episode).

    pool = EnvPool(task.make_env, num_workers=4)
    obs_B_O = pool.reset([0, 1, 2, 3])
    obs_B_O, reward_B, done_B, success_B = pool.step(actions_B_A)
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np


class WorkerCrashed(RuntimeError):
    """One or more workers died or raised; they have been restarted.  `slots` lists them."""

    def __init__(self, slots: list[int], detail: str):
        super().__init__(f"environment workers {slots} crashed and were restarted ({detail}); rerun their episodes")
        self.slots = slots


def _worker(conn: Any, factory: Callable[[], Any]) -> None:
    env = factory()
    while True:
        try:
            cmd, arg = conn.recv()
        except (EOFError, KeyboardInterrupt):  # the parent has gone
            return
        try:
            if cmd == "reset":
                conn.send(("ok", env.reset(arg)))
            elif cmd == "step":
                obs, reward, done, info = env.step(arg)
                conn.send(("ok", (obs, reward, done, bool(info.get("success", False)))))
            elif cmd == "close":
                conn.send(("ok", None))
                return
        except Exception:  # noqa: BLE001 - reported to the parent, which restarts this worker
            conn.send(("error", traceback.format_exc(limit=3)))


class EnvPool:
    def __init__(self, factory: Callable[[], Any], num_workers: int, context: str = "spawn", timeout_s: float = 120.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1; got {num_workers}")
        self.factory, self.timeout_s = factory, timeout_s
        self.ctx = mp.get_context(context)
        self.workers: list[tuple[Any, Any]] = [self._start() for _ in range(num_workers)]
        self.restarts = 0

    def _start(self) -> tuple[Any, Any]:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, self.factory), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def _restart(self, slot: int) -> None:
        proc, conn = self.workers[slot]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        conn.close()
        self.workers[slot] = self._start()
        self.restarts += 1

    def _call(self, cmds: list[tuple[int, str, Any]]) -> list[Any]:
        for slot, cmd, arg in cmds:
            try:
                self.workers[slot][1].send((cmd, arg))
            except (BrokenPipeError, OSError):
                pass  # noticed below as a crash
        out, crashed, detail = [], [], ""
        for slot, _, _ in cmds:
            proc, conn = self.workers[slot]
            try:
                if not conn.poll(self.timeout_s):
                    raise TimeoutError(f"no answer in {self.timeout_s:.0f} s")
                status, value = conn.recv()
                if status == "error":
                    raise RuntimeError(value.strip().splitlines()[-1])
                out.append(value)
            except (EOFError, OSError, TimeoutError, RuntimeError) as e:
                crashed.append(slot)
                detail = f"{type(e).__name__}: {e}"
                out.append(None)
        if crashed:
            for slot in crashed:
                self._restart(slot)
            raise WorkerCrashed(crashed, detail)
        return out

    def reset(self, init_states: list[Any]) -> Any:
        """Reset worker i to `init_states[i]` (len <= num_workers); observations `[B, O]` (a list
        of per-episode dicts when the environment returns dicts)."""
        if len(init_states) > len(self.workers):
            raise ValueError(f"{len(init_states)} episodes but {len(self.workers)} workers; run them in chunks")
        obs = self._call([(i, "reset", s) for i, s in enumerate(init_states)])
        return obs if isinstance(obs[0], dict) else np.stack(obs)

    def step(
        self, actions_B_A: np.ndarray, active: list[int] | None = None
    ) -> dict[int, tuple[np.ndarray, float, bool, bool]]:
        """Step the `active` workers (default: all reset ones) with their rows of `actions_B_A`;
        returns {slot: (obs, reward, done, success)}."""
        active = list(range(len(actions_B_A))) if active is None else active
        results = self._call([(i, "step", actions_B_A[i]) for i in active])
        return dict(zip(active, results))

    def close(self) -> None:
        for proc, conn in self.workers:
            try:
                conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
