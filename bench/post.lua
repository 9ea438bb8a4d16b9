-- wrk: a small non-streaming completion request, as a client of llama-server sends it.
wrk.method = "POST"
wrk.body = '{"model":"bench","prompt":"The quick brown fox","max_tokens":4,"stream":false}'
wrk.headers["Content-Type"] = "application/json"
