"""The search service (``nirdml serve``, the ``nirdml[serve]`` extra: Starlette + uvicorn):
``app`` has the endpoints and their checks, ``batching`` the micro-batching of concurrent image
queries, ``page.html`` the search page."""
