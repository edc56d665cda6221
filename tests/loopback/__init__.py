"""Real processes on 127.0.0.1: daemons, sshd (root), clients."""
