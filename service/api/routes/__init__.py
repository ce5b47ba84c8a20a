"""One router per resource: ``segment`` (POST /segment and POST /dicomweb/studies/{uid}/segment), ``models``,
``health`` (/healthz, /readyz), ``metrics``, ``docs`` (the offline /docs and /static), ``page`` (the page at /)."""
