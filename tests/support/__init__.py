"""What the tests and bench/ share: a real sshd login node, namespaced sites behind an
idle-killing nftables firewall, Slurm and COBalD/TARDIS, the relays as processes, and the
in-process chain fixtures.

Real HPC sites sit behind firewalls that silently forget idle TCP connections; this package
reproduces that with real OpenSSH, network namespaces and nftables, so tests and benchmarks
exercise the actual failure mode instead of a mock of it.
"""
