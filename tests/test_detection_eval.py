"""VOC annotations and the VOC07 11-point AP of Detectron2's PascalVOCDetectionEvaluator,
on cases computed by hand (no torch)."""
import numpy as np
import pytest

from nda_jax.detection import coco_ap, voc, voc_ap


def _gt(*boxes, difficult=None):
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  return boxes, np.asarray(difficult or [False] * len(boxes), bool)


def test_duplicate_detection_is_false_positive():
  # tp, duplicate of the same object (fp), tp: recall .5 .5 1, precision 1 .5 2/3.
  # 11 points: t = 0..0.5 -> 1 (6 points), t = 0.6..1 -> 2/3 (5 points).
  gt = {"im": _gt([0, 0, 9, 9], [20, 20, 29, 29])}
  dets = [("im", 0.9, [0, 0, 9, 9]), ("im", 0.8, [0, 0, 9, 9]), ("im", 0.7, [20, 20, 29, 29])]
  assert voc_ap.class_ap(dets, gt, 0.5) == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_difficult_objects_are_ignored_not_dropped():
  # fp on background, a hit on the difficult object (ignored), tp: precision 1/2 at recall 1.
  # Counting it as an object would give 2/3; dropping it (the hit becomes fp) 1/3.
  gt = {"im": _gt([0, 0, 9, 9], [20, 20, 29, 29], difficult=[False, True])}
  dets = [("im", 0.9, [50, 50, 59, 59]), ("im", 0.8, [20, 20, 29, 29]), ("im", 0.7, [0, 0, 9, 9])]
  assert voc_ap.class_ap(dets, gt, 0.5) == pytest.approx(0.5)


def test_inclusive_pixel_iou_and_strict_threshold():
  # [1,1,10,10] holds 10x10 pixels, [1,1,10,6] 10x6: IoU 0.6 (0.49 without the +1).
  gt = {"c": {"im": _gt([1, 1, 10, 10])}}
  got = voc_ap.evaluate({"c": [("im", 1.0, [1, 1, 10, 6])]}, gt)
  # Matched at 0.50 and 0.55 only (IoU must exceed the threshold): AP = 2 * 100 / 10.
  assert got == pytest.approx({"AP": 20.0, "AP50": 100.0, "AP75": 0.0})
  half = voc_ap.evaluate({"c": [("im", 1.0, [1, 1, 10, 5])]}, gt)   # IoU exactly 0.5
  assert half["AP50"] == 0.0


def test_mean_over_classes_and_missing_class():
  gt = {"a": {"im": _gt([0, 0, 9, 9])}, "b": {"im": _gt([20, 20, 29, 29])}}
  got = voc_ap.evaluate({"a": [("im", 0.5, [0, 0, 9, 9])]}, gt)   # no detection of 'b'
  assert got == pytest.approx({"AP": 50.0, "AP50": 50.0, "AP75": 50.0})


def test_eleven_point_ap_closed_form():
  recall = np.array([0.25, 0.5, 0.75])
  precision = np.array([1.0, 0.5, 0.6])
  # t=0..0.2 -> 1 (3 points), 0.3..0.7 -> 0.6 (5), 0.8..1 -> 0 (3).
  assert voc_ap.eleven_point_ap(recall, precision) == pytest.approx((3 + 5 * 0.6) / 11)


XML = """<annotation><size><width>64</width><height>48</height><depth>3</depth></size>
<object><name>three</name><difficult>0</difficult><bndbox><xmin>2</xmin><ymin>3</ymin>
<xmax>20</xmax><ymax>30</ymax></bndbox></object>
<object><name>seven</name><difficult>1</difficult><bndbox><xmin>30</xmin><ymin>5</ymin>
<xmax>40</xmax><ymax>17</ymax></bndbox></object>
<object><name>one</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>9</ymax>
</bndbox></object></annotation>"""


def test_read_annotation(tmp_path):
  path = tmp_path / "a.xml"
  path.write_text(XML)
  a = voc.read_annotation(str(path))
  assert (a.width, a.height, a.names) == (64, 48, ("three", "seven", "one"))
  np.testing.assert_array_equal(a.boxes, [[2, 3, 20, 30], [30, 5, 40, 17], [1, 1, 5, 9]])
  np.testing.assert_array_equal(a.difficult, [False, True, False])
  path.write_text(XML.replace("<name>one</name>", ""))
  with pytest.raises(ValueError, match="no <name>"):
    voc.read_annotation(str(path))
  path.write_text("<annotation>")
  with pytest.raises(ValueError, match="not readable XML"):
    voc.read_annotation(str(path))


def test_coco_ap_duplicate_detection_101_points():
  pytest.importorskip("pycocotools")
  gt = {"im": (np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([1, 1]),
               np.array([False, False]))}
  dets = [("im", 1, 0.9, [0, 0, 10, 10]), ("im", 1, 0.8, [0, 0, 10, 10]),
          ("im", 1, 0.7, [20, 20, 30, 30])]
  # Interpolated precision 1 at recall 0..0.50 (51 of 101 points), 2/3 at 0.51..1 (50):
  # the same at every IoU threshold (exact boxes). VOC07's 11 points give 28/33 instead.
  want = (51 + 50 * 2 / 3) / 101 * 100
  assert coco_ap.evaluate(dets, gt, num_classes=2) == pytest.approx(
      {"AP": want, "AP50": want, "AP75": want})


def test_coco_ap_ignores_difficult():
  pytest.importorskip("pycocotools")
  gt = {"im": (np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([0, 0]),
               np.array([False, True]))}
  # fp, a hit on the crowd (ignored), tp: precision 1/2 at every recall -> 50; counted as an
  # object 2/3, dropped (the hit a fp) 1/3.
  dets = [("im", 0, 0.9, [50, 50, 60, 60]), ("im", 0, 0.8, [20, 20, 30, 30]),
          ("im", 0, 0.7, [0, 0, 10, 10])]
  assert coco_ap.evaluate(dets, gt, num_classes=1)["AP"] == pytest.approx(50.0)
