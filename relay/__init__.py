"""hpc-relay: carry TCP streams from HPC compute nodes over SSH to an exit outside the firewall."""

from relay.compat import fix_writelines_flow_control

__version__ = "0.1.0"

fix_writelines_flow_control()
