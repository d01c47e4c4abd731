"""The match picture of a photo's best verified candidate, drawn as ``show-matches`` draws."""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ..extractors.build import decode_mode
from ..formats.images import decode_bytes
from ..search.searcher import Answer, Searcher
from ..tools.show_matches import draw_matches


def match_picture(searcher: Searcher, answer: Answer, data: bytes, height: int = 360) -> bytes | None:
    """JPEG bytes of the photo beside the preview of its best verified candidate, matches drawn;
    None when no candidate was verified or the index keeps no preview of it.

    data: the photo's encoded bytes, decoded again in colour when the index decodes grey.
    """
    best = searcher.verify_best(answer)
    if best is None:
        return None
    index_id, result = best.index_id, best.result
    preview_path = searcher.index.preview(index_id)
    if preview_path is None:
        return None
    with Image.open(preview_path) as opened:
        preview = np.asarray(opened.convert("RGB"))
    photo = answer.image
    if decode_mode(searcher.config.extract) != "RGB":
        conf = searcher.config.extract
        photo, _ = decode_bytes(data, conf.max_image_size, "RGB", searcher.max_pixels)
    original = np.asarray(searcher.index.store.size(index_id), np.float32)  # (height, width)
    loc_candidate = best.candidate.locations * (np.asarray(preview.shape[:2], np.float32) / original)
    loc_photo = best.query.locations / answer.factors.astype(np.float32)
    settings = searcher.config.rerank
    caption = [f"{answer.photo}  vs  {index_id} (landmark {searcher.labels.get(index_id, '?')})",
               f"{result.matches} putative matches (faint), {result.inliers} inliers (green): "
               f"{best.matched_by}, {settings.verifier}"]
    picture = draw_matches(photo, preview, loc_photo, loc_candidate, result, caption, height)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError(f"OpenCV cannot encode the match picture {picture.shape} as JPEG")
    return encoded.tobytes()
