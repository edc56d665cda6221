"""hpc-relay: carry TCP streams from HPC compute nodes over SSH to an exit outside the firewall."""

__version__ = "0.1.0"
