"""COCO-style AP / AP50 / AP75 (pycocotools' COCOeval, 101-point interpolation, IoU
0.50:0.95, boxes as (x, y, width = xmax - xmin, height)) on VOC-style ground truth;
`difficult` objects become COCO crowd regions, which COCOeval ignores. Not the VOC
numbers MoCo publishes (see voc_ap)."""
import contextlib
import io
from typing import Mapping, Sequence

import numpy as np


def evaluate(detections: Sequence[tuple[str, int, float, np.ndarray]],
             ground_truth: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
             num_classes: int) -> dict[str, float]:
  """{'AP', 'AP50', 'AP75'} in percent. detections: (image, class, score, box xyxy);
  ground_truth: image -> (boxes [n, 4] xyxy, classes [n], difficult [n])."""
  try:
    from pycocotools import coco, cocoeval  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("COCO AP needs pycocotools: pip install -e '.[detection]'") from e
  ids = {name: i + 1 for i, name in enumerate(sorted(ground_truth))}
  xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
  annotations = []
  for name, (boxes, classes, difficult) in ground_truth.items():
    for box, c, d in zip(boxes, classes, difficult):
      annotations.append({"id": len(annotations) + 1, "image_id": ids[name],
                          "category_id": int(c), "bbox": xywh(box),
                          "area": float((box[2] - box[0]) * (box[3] - box[1])),
                          "iscrowd": int(d)})
  gt = coco.COCO()
  gt.dataset = {"images": [{"id": i} for i in ids.values()], "annotations": annotations,
                "categories": [{"id": c} for c in range(num_classes)]}
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
    if not detections:
      return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    dt = gt.loadRes([{"image_id": ids[im], "category_id": int(c), "score": float(s),
                      "bbox": xywh(b)} for im, c, s, b in detections])
    e = cocoeval.COCOeval(gt, dt, "bbox")
    e.evaluate(), e.accumulate(), e.summarize()
  return {k: max(float(e.stats[i]), 0.0) * 100 for i, k in enumerate(("AP", "AP50", "AP75"))}
