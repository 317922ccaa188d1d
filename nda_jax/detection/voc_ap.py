"""VOC AP as Detectron2's PascalVOCDetectionEvaluator reports it for VOC2007 test
(the numbers MoCo publishes): per class, the VOC2007 11-point AP at an IoU
threshold (boxes in VOC's inclusive pixel convention, IoU > threshold to match,
`difficult` objects neither count as positives nor make a detection false);
AP = the mean over thresholds 0.50:0.95 (step 0.05) of the mean over classes,
AP50 / AP75 at 0.50 / 0.75, all in percent. Not COCO's AP (see coco_ap)."""
from typing import Mapping, Sequence

import numpy as np

THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2))


def eleven_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
  """VOC2007: mean over t in 0, 0.1, ..., 1 of the best precision at recall >= t (0 if none)."""
  return float(np.mean([precision[recall >= t].max() if np.any(recall >= t) else 0.0
                        for t in np.linspace(0, 1, 11)]))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """VOC's inclusive-pixel IoU (+1 on widths and heights) of one box against [n, 4]."""
  iw = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]) + 1, 0)
  ih = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]) + 1, 0)
  inter = iw * ih
  area = lambda b: (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
  return inter / (area(box) + area(boxes) - inter)


def class_ap(detections: Sequence[tuple[str, float, np.ndarray]],
             ground_truth: Mapping[str, tuple[np.ndarray, np.ndarray]],
             threshold: float) -> float:
  """One class's 11-point AP. detections: (image id, score, box); ground_truth:
  image id -> (boxes [n, 4], difficult [n])."""
  npos = sum(int((~d).sum()) for _, d in ground_truth.values())
  matched = {k: np.zeros(len(b), bool) for k, (b, _) in ground_truth.items()}
  tp, fp = [], []
  for image, _, box in sorted(detections, key=lambda d: -d[1]):
    boxes, difficult = ground_truth.get(image, (np.zeros((0, 4)), np.zeros(0, bool)))
    ious = _iou(np.asarray(box, np.float64), boxes) if len(boxes) else np.zeros(0)
    j = int(np.argmax(ious)) if len(ious) else -1
    if j >= 0 and ious[j] > threshold:
      if difficult[j]:
        continue                            # neither true nor false
      hit = not matched[image][j]
      matched[image][j] = True
      tp.append(hit), fp.append(not hit)
    else:
      tp.append(False), fp.append(True)
  if npos == 0:
    return 0.0
  tp, fp = np.cumsum(tp), np.cumsum(fp)
  recall = tp / npos
  precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
  return eleven_point_ap(recall, precision)


def evaluate(detections: Mapping[str, Sequence[tuple[str, float, np.ndarray]]],
             ground_truth: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]
             ) -> dict[str, float]:
  """{'AP', 'AP50', 'AP75'} in percent over the classes of `ground_truth` (class ->
  image -> (boxes, difficult)); `detections` is class -> [(image, score, box)]."""
  per_threshold = {t: np.mean([class_ap(detections.get(c, ()), gt, t) * 100
                               for c, gt in ground_truth.items()]) for t in THRESHOLDS}
  return {"AP": float(np.mean(list(per_threshold.values()))),
          "AP50": float(per_threshold[0.5]), "AP75": float(per_threshold[0.75])}
