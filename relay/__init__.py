"""hpc-relay: carry TCP streams from HPC compute nodes over SSH to an exit outside the firewall."""

import warnings

__version__ = "0.1.0"

# asyncssh touches cryptography's DSA classes at import time, which recent cryptography
# releases mark deprecated: the warning (ten lines on stderr) would open every command's
# output and bury one-line errors. Only that warning, raised inside asyncssh, is silenced.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh\.")
