"""The hardware a run goes to: processes, machines, rendezvous, CPU or GPU."""

from __future__ import annotations

from dataclasses import dataclass

from tunefleet.launch.core.errors import TunefleetError


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """Where the run goes: every process of every machine."""

    num_processes: int = 1
    """Processes over all machines (one per GPU, or per CPU worker); the world size."""

    num_machines: int = 1
    """Machines (nodes); num_processes must split evenly over them."""

    machine_rank: int = 0
    """Rank of the machine this config is rendered for (0 = the one holding rank 0)."""

    main_process_ip: str | None = None
    """Address of machine 0; required with more than one machine."""

    main_process_port: int = 29500
    """Rendezvous port on machine 0."""

    use_cpu: bool = False
    """True: processes train on CPU (gloo); False: one GPU per process."""

    def __post_init__(self) -> None:
        if self.num_processes < 1 or self.num_machines < 1:
            raise TunefleetError(
                f"hardware: {self.num_processes} process(es) on {self.num_machines} machine(s)",
                "ask for at least 1 process on at least 1 machine",
            )
        if self.num_processes % self.num_machines:
            raise TunefleetError(
                f"hardware: {self.num_processes} processes do not split evenly over "
                f"{self.num_machines} machines",
                "use a multiple of the machine count",
            )
        if not 0 <= self.machine_rank < self.num_machines:
            raise TunefleetError(
                f"hardware: machine_rank {self.machine_rank} is not in 0..{self.num_machines - 1}",
                "number machines from 0",
            )
        if self.num_machines > 1 and not self.main_process_ip:
            raise TunefleetError(
                "hardware: several machines need main_process_ip (the address of machine 0)",
                "pass the address of the first machine",
            )
        if not 0 < self.main_process_port < 65536:
            raise TunefleetError(
                f"hardware: main_process_port {self.main_process_port} is not a TCP port", "use e.g. 29500"
            )

    @property
    def procs_per_machine(self) -> int:
        return self.num_processes // self.num_machines


def strategy_for(strategy: str, num_processes: int) -> str:
    """What `parallel.strategy` means on `num_processes` processes: `auto` is `single` on one
    process and `ddp` on several; `ddp` on one process runs as `single` (nothing to replicate).
    Every other strategy stays as written (compat refuses `single` on several processes)."""
    if strategy == "auto" or (strategy == "ddp" and num_processes == 1):
        return "single" if num_processes == 1 else "ddp"
    return strategy
