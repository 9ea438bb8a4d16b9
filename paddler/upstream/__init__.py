"""The client side towards llama.cpp servers: the lean HTTP/1.1 client, its framing scanners,
client endpoints built once per upstream, the services owning connection pools, bounded reads
of small bodies and short reasons for failed requests."""
