"""relay-exit: accepts carriers, runs sessions, dials what the policy allows."""
