"""One router per resource: ``segment`` (POST /segment), ``models``, ``health`` (/healthz, /readyz), ``metrics``."""
