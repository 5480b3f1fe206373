"""The A1111-compatible HTTP API (``/sdapi/v1/...``): a thin client of the engine.

:func:`webui.api.mount.mount_api` adds the routes to our FastAPI app. Jobs go through the shared
:class:`~webui.job_queue.JobQueue`, so API and UI jobs never run at once. One module per group of routes
(``routes_*``); request and response models in ``models.py``; error formatting in ``errors.py``.
"""
