"""The server side of every listener: listeners from endpoint strings, the guarded channel
(deadlines, connection caps, body memory), the bounded request and its target checks, who is
answering, and the management port's prefix router with the JSON error handling."""
