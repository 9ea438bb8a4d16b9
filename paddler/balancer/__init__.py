"""The proxy port: the reverse proxy (retries, ``/health``, ``/slots``) and the body relay."""
