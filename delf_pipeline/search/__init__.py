"""Search by photo: an index folder loaded once, answering one photo at a time (``query``, ``serve``)."""
