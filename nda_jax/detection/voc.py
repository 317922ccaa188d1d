"""PASCAL VOC annotations (Annotations/<id>.xml), read as Detectron2's pascal_voc
loader reads them: boxes in the file's 1-based pixel coordinates, `difficult`
kept per object (evaluation ignores those objects, it does not drop them)."""
import dataclasses
import xml.etree.ElementTree as ET

import numpy as np


@dataclasses.dataclass(frozen=True)
class Annotation:
  """One image's objects: boxes [n, 4] (xmin, ymin, xmax, ymax), class names, difficult flags."""
  width: int
  height: int
  boxes: np.ndarray
  names: tuple[str, ...]
  difficult: np.ndarray


def read_annotation(path: str) -> Annotation:
  """ValueError naming the file and the missing field for an XML that is not VOC's."""
  try:
    root = ET.parse(path).getroot()
  except ET.ParseError as e:
    raise ValueError(f"{path} is not readable XML ({e})") from None

  def need(node, tag):
    child = node.find(tag)
    if child is None or child.text is None:
      raise ValueError(f"{path}: <{node.tag}> has no <{tag}>; a VOC annotation needs it")
    return child.text.strip()

  size = root.find("size")
  if size is None:
    raise ValueError(f"{path}: no <size>; a VOC annotation needs <size><width>, <height>")
  boxes, names, difficult = [], [], []
  for obj in root.findall("object"):
    names.append(need(obj, "name"))
    flag = obj.find("difficult")
    difficult.append(flag is not None and flag.text is not None and int(flag.text) == 1)
    box = obj.find("bndbox")
    if box is None:
      raise ValueError(f"{path}: an <object> has no <bndbox>")
    boxes.append([float(need(box, t)) for t in ("xmin", "ymin", "xmax", "ymax")])
  return Annotation(width=int(need(size, "width")), height=int(need(size, "height")),
                    boxes=np.asarray(boxes, np.float64).reshape(-1, 4), names=tuple(names),
                    difficult=np.asarray(difficult, bool))
