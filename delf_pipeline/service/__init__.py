"""Search by photo over HTTP: a FastAPI app (:mod:`.app`) and its web page (``static/``),
served by ``delf-pipeline serve`` (:mod:`.serve`). Needs the ``serve`` extra."""
