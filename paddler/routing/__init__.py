"""How an upstream is chosen for a request: the policies given to ``--policy``."""
