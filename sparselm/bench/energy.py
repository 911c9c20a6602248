"""Energy counters: Linux powercap (Intel RAPL) on CPU, NVML on NVIDIA GPUs.

`EnergyMeter.start()` / `.stop()` return joules between the two calls, or None with
`.reason` saying why this machine cannot measure energy (no powercap, unreadable counters in
a VM or without root, no NVML).
"""
from __future__ import annotations

from pathlib import Path

POWERCAP = Path("/sys/class/powercap")


class EnergyMeter:
    def __init__(self, device: str = "cpu"):
        self.device = device
        self.reason: str | None = None
        self._zones: list[tuple[Path, int]] = []  # (energy_uj file, wrap-around range)
        self._nvml = None
        self._begin: list[int] = []
        if device.startswith("cuda"):
            self._init_nvml()
        else:
            self._init_rapl()

    def _init_rapl(self) -> None:
        if not POWERCAP.exists():
            self.reason = "no /sys/class/powercap on this machine (no RAPL counters exposed, e.g. in a VM)"
            return
        # Top-level package zones only (intel-rapl:0, intel-rapl:1): sub-zones are inside them.
        for zone in sorted(POWERCAP.glob("intel-rapl:*")):
            if zone.name.count(":") != 1:
                continue
            energy = zone / "energy_uj"
            try:
                int(energy.read_text())
                wrap = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            self._zones.append((energy, wrap))
        if not self._zones:
            self.reason = "RAPL counters under /sys/class/powercap are missing or not readable (needs root)"

    def _init_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            index = int(self.device.split(":")[1]) if ":" in self.device else 0
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            self._nvml = (pynvml, handle)
        except Exception as err:  # noqa: BLE001 - any NVML failure means: cannot measure
            self.reason = f"NVML energy counter unavailable ({type(err).__name__}: {err})"

    @property
    def available(self) -> bool:
        return self.reason is None

    def _read(self) -> list[int]:
        if self._nvml is not None:
            pynvml, handle = self._nvml
            return [int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)) * 1000]  # mJ -> uJ
        return [int(path.read_text()) for path, _ in self._zones]

    def start(self) -> None:
        if self.available:
            self._begin = self._read()

    def stop(self) -> float | None:
        """Joules since start(), or None when energy cannot be measured here."""
        if not self.available:
            return None
        total = 0
        for i, now in enumerate(self._read()):
            delta = now - self._begin[i]
            if delta < 0 and self._zones:  # the counter wrapped around
                delta += self._zones[i][1]
            total += delta
        return total / 1e6
