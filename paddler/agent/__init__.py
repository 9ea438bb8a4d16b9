"""``paddler agent``: reports one llama.cpp server to a balancer."""
