"""HTTP plumbing shared by every listener: bounded requests, request targets, listeners,
client endpoints and connection pools, the management port's router and JSON errors."""
