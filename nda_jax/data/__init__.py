"""nda_jax.data: host-side data, uint8 images and int32 labels.

  digits.py        embedded demo data (scikit-learn digits, moving-digit clips)
  cifar.py         CIFAR-10/100 from the official python-version files
  image_folder.py  ImageNet-style class folders (optional class subset)
  sources.py       random-access sources by name: SOURCES, make_source(cfg, split)
  pipeline.py      grain iterators: make_train_iterator, make_eval_iterator
"""
