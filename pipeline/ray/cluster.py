"""Ray session, CPU shares and error helpers shared by the Ray engines."""

from __future__ import annotations

import math
from typing import Any

try:
    import ray
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    from sensor.errors import PrivcamError as _PrivcamError

    raise _PrivcamError(f"the Ray backend needs the optional extra: pip install 'privcam[ray]' ({_err})") from None


from sensor.errors import ConfigError, PrivcamError


# -- Ray session and resources --------------------------------------------------------------------------------
def ensure_ray(ray_address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``ray_address`` (e.g. ``ray://head:10001`` or ``auto``) or start a local Ray; reuse a running
    session. Returns True when this call started or connected (so the caller should shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if ray_address:
        ray.init(address=ray_address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)
    return True


def cluster_cpus() -> tuple[float, float]:
    """(CPUs in the cluster, CPUs of the largest alive node)."""
    total = float(ray.cluster_resources().get("CPU", 0.0))
    nodes = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return total, float(max(nodes, default=total))


def share_cpus(processes: int, reserve: float = 0.0, per_process: float | None = None) -> float:
    """Logical CPUs per process so that ``processes`` of them plus ``reserve`` fit the cluster (never more than
    one node holds), or ``per_process`` when given; raises ConfigError when that would not fit (Ray would wait
    for CPUs that never come)."""
    total, node = cluster_cpus()
    if total <= 0:
        raise PrivcamError("the Ray cluster reports no CPUs")
    if per_process is not None:
        if per_process * processes + reserve > total + 1e-9 or per_process > node:
            raise ConfigError("ray", "cpus_per_actor", f"at most {(total - reserve) / processes:.2f} for "
                              f"{processes} processes on {total:g} CPUs (one node has {node:g})", per_process)
        return float(per_process)
    return max(math.floor(min(node, (total - reserve) / processes) * 100) / 100, 0.01)  # down: the sum must fit


def ray_info(ray_address: str | None, **extra: Any) -> dict[str, Any]:
    total, node = cluster_cpus()
    return {"version": ray.__version__, "address": ray_address or "local",
            "nodes": sum(1 for n in ray.nodes() if n.get("Alive")), "cluster_cpus": total, **extra}


def innermost(err: BaseException) -> BaseException:
    """The original error inside Ray's wrappers (``RayTaskError.cause``, ``__cause__``)."""
    inner = err
    while True:
        nxt = getattr(inner, "cause", None) or inner.__cause__
        if not isinstance(nxt, BaseException) or nxt is inner:
            return inner
        inner = nxt


def error_text(err: BaseException) -> str:
    """The innermost cause of a (Ray-wrapped) error, as ``Type: message`` on one line."""
    inner = innermost(err)
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}"


class DataContextFor:
    """Ray Data settings for one privcam dataset, restored on exit: progress bars and info logs off (privcam
    shows its own bar), and blocks of about ``block_bytes`` (Ray Data would otherwise merge a read task's
    output into blocks of up to 128 MiB, i.e. a whole small recording per block and per actor call)."""

    def __init__(self, block_bytes: int) -> None:
        self.block_bytes = block_bytes

    def __enter__(self) -> DataContextFor:
        import logging

        ctx = ray.data.DataContext.get_current()
        self._saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.target_max_block_size)
        ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
        ctx.target_max_block_size = self.block_bytes
        self._logger = logging.getLogger("ray.data")
        self._level = self._logger.level
        self._logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc: object) -> None:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.target_max_block_size = self._saved
        self._logger.setLevel(self._level)


