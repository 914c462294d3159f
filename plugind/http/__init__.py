"""HTTP: the read API (:5002) and the write gateway (:5003), as Starlette apps.

Named ``plugind.http`` rather than a top-level ``http`` so it never shadows the standard library
module that Starlette and uvicorn import.
"""
