r"""Detection fine-tuning in torchvision: Faster R-CNN + FPN on an exported backbone.

  python -m nda_jax.detection.finetune --config=configs/voc_detection.py[:digits] \
      --backbone=FILE|none --data=VOC_ROOT --workdir=W

`--backbone` is a torchvision-layout file of `exporters.backbone` (its ResNet is read
off the file by `torch_resnet`; loaded with `weights_only`, so it runs no code) or
`none` (config.model.untrained, torchvision's init). `--data` is a VOC root
(`Annotations/`, `JPEGImages/`, `ImageSets/Main/<split>.txt`), read as Detectron2
reads VOC: boxes shifted to 0-based continuous coordinates (xmin - 1, ymin - 1, xmax,
ymax), `difficult` objects kept for training and ignored in evaluation. The test split
is evaluated once at the end; `W/metrics.json` holds both definitions of AP, labelled:
"VOC (Detectron2)" (`voc_ap`: VOC2007 11-point, AP over IoU 0.50:0.95, AP50, AP75 -
the numbers MoCo publishes) and "COCO (pycocotools)" (`coco_ap`). The workdir must be
new: a fine-tune is not resumed. Needs the `detection` extra.
"""
import bisect
import json
import os
import time
from typing import Any, Mapping

import ml_collections
import numpy as np

from nda_jax import extras
from nda_jax.detection import coco_ap, voc, voc_ap

_PROG = "nda_jax.detection.finetune"


def lr_factor(step: int, optim: Mapping[str, Any]) -> float:
  """Detectron2's WarmupMultiStepLR: linear warm-up from `warmup_factor` over
  `warmup_iters`, then x`gamma` at each of `steps` (iteration `step`, 0-based)."""
  warmup = 1.0
  if step < optim["warmup_iters"]:
    alpha = step / optim["warmup_iters"]
    warmup = optim["warmup_factor"] * (1 - alpha) + alpha
  return warmup * optim["gamma"] ** bisect.bisect_right(list(optim["steps"]), step)


def base_lr(config: ml_collections.ConfigDict) -> float:
  """The linear scaling rule: base_lr at base_batch, proportional to the batch."""
  return config.optim.base_lr * config.train.batch_size / config.optim.base_batch


# ---------------------------------------------------------------------------- data


def _image_ids(root: str, split: str) -> list[str]:
  path = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
  with open(path, encoding="utf-8") as f:
    return [line.split()[0] for line in f if line.strip()]


def check_voc_root(root: str, splits) -> None:
  """ValueError (one paragraph) for a `root` that is not a VOC tree with `splits`."""
  missing = [p for p in ("Annotations", "JPEGImages") if not os.path.isdir(os.path.join(root, p))]
  missing += [f"ImageSets/Main/{s}.txt" for s in splits
              if not os.path.isfile(os.path.join(root, "ImageSets", "Main", f"{s}.txt"))]
  if missing:
    raise ValueError(
        f"--data={root} is not a PASCAL VOC root: it lacks {', '.join(missing)}. Pass the "
        f"folder holding Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt (VOC's "
        f"VOCdevkit/VOC2007, or python -m nda_jax.tools.digits_voc --out=DIR).")


def load_split(root: str, split: str, classes) -> list[tuple[str, voc.Annotation, np.ndarray]]:
  """(image id, annotation, class indices) of every image of `split`; ValueError for an
  image without its files or an object of a class not in `classes`."""
  index = {name: i for i, name in enumerate(classes)}
  out = []
  for image_id in _image_ids(root, split):
    xml = os.path.join(root, "Annotations", f"{image_id}.xml")
    if not os.path.isfile(xml) or not os.path.isfile(_jpeg(root, image_id)):
      raise ValueError(f"--data={root}: ImageSets/Main/{split}.txt lists {image_id}, which has "
                       f"no Annotations/{image_id}.xml or JPEGImages/{image_id}.jpg")
    ann = voc.read_annotation(xml)
    unknown = sorted(set(ann.names) - set(index))
    if unknown:
      raise ValueError(f"{xml}: classes {unknown} are not config.data.classes "
                       f"({len(classes)}: {classes[:4]}...); set --config.data.classes")
    out.append((image_id, ann, np.asarray([index[n] for n in ann.names], np.int64)))
  return out


def _jpeg(root: str, image_id: str) -> str:
  return os.path.join(root, "JPEGImages", f"{image_id}.jpg")


def _detectron2_boxes(ann: voc.Annotation) -> np.ndarray:
  """VOC's 1-based inclusive boxes -> 0-based continuous ones, as Detectron2 loads them."""
  return ann.boxes - np.array([1.0, 1.0, 0.0, 0.0])


def _image(torch, root: str, image_id: str):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(_jpeg(root, image_id)) as im:
    array = np.asarray(im.convert("RGB"), np.float32) / 255.0
  return torch.from_numpy(array.transpose(2, 0, 1).copy())


# --------------------------------------------------------------------------- model


def load_backbone(path: str, config: ml_collections.ConfigDict):
  """The body of the detector: the exported ResNet of `path`, or an untrained one."""
  torch = extras.require("torch", "detection", "detection fine-tuning")
  from torchvision.ops import misc  # pylint: disable=g-import-not-at-top
  from nda_jax.detection import torch_resnet  # pylint: disable=g-import-not-at-top
  norm = {"batch_norm": torch.nn.BatchNorm2d, "frozen": misc.FrozenBatchNorm2d}.get(
      config.model.norm)
  if norm is None:
    raise ValueError(f"config.model.norm={config.model.norm!r}; valid: 'batch_norm', 'frozen'")
  if path == "none":
    return torch_resnet.ResNet(**config.model.untrained, norm_layer=norm)
  if not os.path.isfile(path):
    raise ValueError(f"--backbone={path} does not exist; pass a file of python -m "
                     f"nda_jax.exporters.backbone --format=torchvision, or --backbone=none")
  state_dict = extras.read_torch_file(
      path, "a file of python -m nda_jax.exporters.backbone --format=torchvision as "
            "--backbone (a Detectron2 .pkl is for Detectron2)")
  if not isinstance(state_dict, Mapping) or not all(
      isinstance(v, torch.Tensor) for v in state_dict.values()):
    raise ValueError(f"--backbone={path} holds no state_dict of tensors; write it with python "
                     f"-m nda_jax.exporters.backbone --format=torchvision.")
  return torch_resnet.from_state_dict(state_dict, norm_layer=norm)


def build_model(body, config: ml_collections.ConfigDict):
  """torchvision's FasterRCNN on BackboneWithFPN(`body`), the body's last
  `trainable_layers` of (conv1 + bn1, layer1..4) trainable as torchvision counts them."""
  from torchvision.models.detection import backbone_utils, faster_rcnn  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection import anchor_utils  # pylint: disable=g-import-not-at-top
  m = config.model
  if not 0 <= m.trainable_layers <= 5:
    raise ValueError(f"config.model.trainable_layers={m.trainable_layers}; valid: 0..5")
  train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:m.trainable_layers]
  train += ["bn1"] if m.trainable_layers == 5 else []
  for name, p in body.named_parameters():
    p.requires_grad_(name.startswith(tuple(train)))
  stages = ("layer1", "layer2", "layer3", "layer4")
  backbone = backbone_utils.BackboneWithFPN(
      body, return_layers={s: str(i) for i, s in enumerate(stages)},
      in_channels_list=list(body.stage_channels), out_channels=m.fpn_channels)
  anchors = anchor_utils.AnchorGenerator(tuple((s,) for s in m.anchor_sizes),
                                         ((0.5, 1.0, 2.0),) * len(m.anchor_sizes))
  d = config.data
  return faster_rcnn.FasterRCNN(
      backbone, num_classes=None, rpn_anchor_generator=anchors,
      min_size=tuple(d.min_size_train), max_size=d.max_size,
      box_batch_size_per_image=m.box_batch_size_per_image,
      box_head=faster_rcnn.TwoMLPHead(m.fpn_channels * 7 ** 2, m.representation_size),
      box_predictor=faster_rcnn.FastRCNNPredictor(m.representation_size, len(d.classes) + 1),
      rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n.train,
      rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n.test,
      rpn_post_nms_top_n_train=m.rpn_post_nms_top_n.train,
      rpn_post_nms_top_n_test=m.rpn_post_nms_top_n.test,
      box_score_thresh=config.eval.score_thresh,
      box_detections_per_img=config.eval.detections_per_img)


# ------------------------------------------------------------------ train / evaluate


def train(model, root: str, examples, config: ml_collections.ConfigDict, log=print) -> None:
  """config.train.iterations of SGD on `examples` (of `load_split`), in train mode
  (BatchNorm2d normalising with batch statistics and updating its running ones)."""
  torch = extras.require("torch", "detection", "detection fine-tuning")
  rng = np.random.default_rng(config.seed)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=base_lr(config), momentum=config.optim.momentum,
                        weight_decay=config.optim.weight_decay)
  schedule = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda step: lr_factor(step, config.optim))
  model.train()
  order, start = np.zeros(0, np.int64), time.time()
  for step in range(config.train.iterations):
    if len(order) < config.train.batch_size:
      order = np.concatenate([order, rng.permutation(len(examples))])
    batch, order = order[:config.train.batch_size], order[config.train.batch_size:]
    images, targets = [], []
    for i in batch:
      image_id, ann, labels = examples[i]
      image, boxes = _image(torch, root, image_id), _detectron2_boxes(ann)
      if rng.random() < config.data.p_flip:
        image = image.flip(-1)
        boxes = np.stack([image.shape[-1] - boxes[:, 2], boxes[:, 1],
                          image.shape[-1] - boxes[:, 0], boxes[:, 3]], axis=1)
      images.append(image)
      targets.append({"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      "labels": torch.as_tensor(labels + 1)})   # 0 is the background
    losses = model(images, targets)
    loss = sum(losses.values())
    if not torch.isfinite(loss):
      raise FloatingPointError(f"the loss is {loss.item()} at iteration {step}: lower "
                               f"--config.optim.base_lr")
    lr = opt.param_groups[0]["lr"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    schedule.step()
    if (step + 1) % config.train.log_every == 0 or step + 1 == config.train.iterations:
      parts = " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
      log(f"iteration {step + 1}/{config.train.iterations} | loss={loss.item():.3f} {parts} "
          f"| lr={lr:.6g} | {time.time() - start:.0f} s")


def evaluate(model, root: str, examples, config: ml_collections.ConfigDict
             ) -> dict[str, dict[str, float]]:
  """Both APs of the model's detections on `examples`, in percent, labelled by definition."""
  torch = extras.require("torch", "detection", "detection fine-tuning")
  model.eval()
  model.transform.min_size = (config.data.min_size_test,)
  classes = config.data.classes
  detections = []                              # (image, class, score, box 0-based xyxy)
  with torch.no_grad():
    for start in range(0, len(examples), config.eval.batch_size):
      chunk = examples[start:start + config.eval.batch_size]
      outputs = model([_image(torch, root, image_id) for image_id, _, _ in chunk])
      for (image_id, _, _), out in zip(chunk, outputs):
        for box, label, score in zip(out["boxes"].numpy(), out["labels"].numpy(),
                                     out["scores"].numpy()):
          detections.append((image_id, int(label) - 1, float(score), box.astype(np.float64)))
  voc_gt = {c: {} for c in classes}
  for image_id, ann, labels in examples:
    for k, c in enumerate(classes):
      voc_gt[c][image_id] = (ann.boxes[labels == k], ann.difficult[labels == k])
  voc_dt = {c: [] for c in classes}
  for image_id, k, score, box in detections:   # back to VOC's 1-based pixels, as Detectron2
    voc_dt[classes[k]].append((image_id, score, box + np.array([1.0, 1.0, 0.0, 0.0])))
  coco_gt = {image_id: (_detectron2_boxes(ann), labels, ann.difficult)
             for image_id, ann, labels in examples}
  return {"VOC (Detectron2)": voc_ap.evaluate(voc_dt, voc_gt),
          "COCO (pycocotools)": coco_ap.evaluate(detections, coco_gt, len(classes))}


def run(config: ml_collections.ConfigDict, backbone: str, data: str, workdir: str,
        log=print) -> dict[str, Any]:
  """Fine-tune, evaluate, write `workdir/metrics.json`; every input is checked before
  the workdir is made."""
  torch = extras.require("torch", "detection", "detection fine-tuning")
  extras.require("torchvision", "detection", "detection fine-tuning")
  extras.require("pycocotools", "detection", "COCO AP")
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise ValueError(f"--workdir={workdir} exists and is not empty; a fine-tune is not "
                     f"resumed: pass a new folder")
  check_voc_root(data, (config.data.train_split, config.data.test_split))
  train_set = load_split(data, config.data.train_split, config.data.classes)
  test_set = load_split(data, config.data.test_split, config.data.classes)
  if not train_set or not test_set:
    raise ValueError(f"--data={data}: the {config.data.train_split!r} or "
                     f"{config.data.test_split!r} image set is empty")
  torch.manual_seed(config.seed)
  if config.torch_threads:
    torch.set_num_threads(config.torch_threads)
  body = load_backbone(backbone, config)
  model = build_model(body, config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  t0 = time.time()
  train(model, data, train_set, config, log)
  t1 = time.time()
  metrics = evaluate(model, data, test_set, config)
  t2 = time.time()
  metrics.update({"backbone": backbone, "data": data, "iterations": config.train.iterations,
                  "train_images": len(train_set), "test_images": len(test_set),
                  "wall_s": {"train": round(t1 - t0, 1), "evaluate": round(t2 - t1, 1)}})
  with open(os.path.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=2)
  for name in ("VOC (Detectron2)", "COCO (pycocotools)"):
    log(f"{config.data.test_split} {name}: " + ", ".join(
        f"{k} {v:.1f}" for k, v in metrics[name].items()))
  return metrics


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from nda_jax import cli  # pylint: disable=g-import-not-at-top
  del argv   # cli.run rejects stray arguments.
  f = flags.FLAGS
  try:
    run(f.config, f.backbone, f.data, f.workdir)
  except (ValueError, FloatingPointError) as e:
    cli.fail(_PROG, str(e))


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from nda_jax import cli  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Detection recipe (configs/voc_detection.py[:digits]).")
  flags.mark_flag_as_required("config")
  flags.DEFINE_string("backbone", None, "An exported torchvision-layout backbone, or 'none'.",
                      required=True)
  flags.DEFINE_string("data", None, "A PASCAL VOC root.", required=True)
  flags.DEFINE_string("workdir", None, "A new folder for config.json and metrics.json.",
                      required=True)
  cli.run(main, _PROG, _CONFIG)
