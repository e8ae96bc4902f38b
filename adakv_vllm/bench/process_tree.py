"""A process and its descendants (vLLM's engine core and worker, or a server's): CPU seconds and peak RSS.

Peak RSS is the sum over the tree of every live process's high-water mark (VmHWM): an upper bound
on the tree's peak, since shared libraries count once per process and the peaks need not coincide;
the same process layout on both sides of a comparison keeps the ratio fair.
"""

from __future__ import annotations

from pathlib import Path


class ProcessTree:
    def __init__(self, pid: int | None = None):
        import psutil  # a dependency of vLLM

        self.gone = (OSError, psutil.Error)  # a process that exited in between
        try:
            self.root = psutil.Process(pid)
        except self.gone:
            self.root = None

    def processes(self) -> list:
        if self.root is None:
            return []
        try:
            return [self.root, *self.root.children(recursive=True)]
        except self.gone:
            return []

    def cpu_seconds(self) -> float:
        """User + system seconds of the live processes and of the children they have reaped."""
        total = 0.0
        for p in self.processes():
            try:
                t = p.cpu_times()
            except self.gone:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def peak_rss_mib(self) -> dict[str, float]:
        """{"pid name": VmHWM MiB} of every live process of the tree."""
        out = {}
        for p in self.processes():
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
                name = p.name()
            except self.gone:
                continue
            kib = next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
            if kib is not None:
                out[f"{p.pid} {name}"] = kib / 1024
        return out
