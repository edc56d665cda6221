"""Reusable test infrastructure: a real sshd "login node" and a namespaced idle-killing firewall.

The relay exists because real HPC sites sit behind firewalls that silently forget idle TCP
connections; these helpers reproduce that with real OpenSSH, network namespaces and nftables so
tests exercise the actual failure mode instead of a mock of it.
"""
